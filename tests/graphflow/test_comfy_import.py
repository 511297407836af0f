"""graphflow.comfy: ComfyUI workflows (API format, UI format, PNG metadata) imported, validated and run.

The workflows are small JSON files under tests/graphs/comfy/, written as ComfyUI writes them; they run on the
tiny models, laid out in a models folder the way ComfyUI keeps one (checkpoints/, controlnet/, loras/, vae/).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphflow import Engine
from graphflow.cli import main
from graphflow.comfy import COMFY_CLASSES, Imported, comfy_class_info, import_file, import_prompt
from graphflow.errors import ValidationError
from tests.nodes.test_lora import make_lora

WORKFLOWS = Path(__file__).parents[1] / "graphs" / "comfy"


@pytest.fixture(scope="module")
def comfy_dirs(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ComfyUI models folder holding the tiny models (diffusers folders, which CheckpointLoader reads without a
    hub, and a LoRA file), and an input folder with a 96 x 80 photo and a 64 x 64 mask."""
    root = tmp_path_factory.mktemp("comfy")
    models, inputs = root / "models", root / "input"
    for folder, name, source in [("checkpoints", "sd15", "sd15"), ("checkpoints", "sd15-inpaint", "sd15-inpaint"),
                                 ("controlnet", "canny", "controlnet-canny"), ("vae", "sd15-vae", "sd15/vae")]:
        shutil.copytree(tiny_models / source, models / folder / name)
    (models / "loras").mkdir()
    make_lora(tiny_models, "sd15", root / "lora", seed=1).rename(models / "loras" / "tiny-lora.safetensors")
    inputs.mkdir()
    pixels = np.zeros((80, 96, 4), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]
    pixels[16:64, 24:72, 1:3] = 200
    pixels[..., 3] = 255
    pixels[24:40, 24:40, 3] = 0  # a transparent square: LoadImage's mask
    Image.fromarray(pixels, "RGBA").save(inputs / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 8:40] = 255
    Image.fromarray(mask, "L").save(inputs / "mask.png")
    return models, inputs


def run(imported: Imported, comfy_dirs: tuple[Path, Path], out: Path) -> list[Path]:
    """Run an imported document on the tiny models; the files its SaveImage nodes wrote."""
    models, inputs = comfy_dirs
    engine = Engine(input_dirs=[models, inputs], output_dir=out)
    return engine.run(imported.document).files


def test_an_api_workflow_becomes_named_nodes_that_validate_and_run(comfy_dirs: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    imported = import_file(WORKFLOWS / "txt2img_api.json", models_dir=comfy_dirs[0])
    nodes = imported.document["nodes"]
    assert imported.node_names == {"3": ["ksampler_3"], "4": ["checkpoint_loader_simple_4"],
                                   "5": ["empty_latent_image_5"], "6": ["clip_text_encode_6"],
                                   "7": ["clip_text_encode_7"], "8": ["vae_decode_8"], "9": ["save_image_9"]}
    assert imported.outputs == {"9": "save_image_9"}
    sampler = nodes["ksampler_3"]["inputs"]
    assert sampler["positive"] == {"from": "clip_text_encode_6.conditioning"}
    assert sampler["latent"] == {"from": "empty_latent_image_5.latent"}
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["scheduler"]) == (7, 3, 7.0, "euler")
    assert nodes["checkpoint_loader_simple_4"]["inputs"]["model"] == str(comfy_dirs[0] / "checkpoints" / "sd15")
    assert {comfy_id: item.level for comfy_id, item in imported.fidelity.items()} == {
        "3": "approximate", "4": "exact", "5": "exact", "6": "exact", "7": "exact", "8": "exact", "9": "exact"}
    assert "k-diffusion" in imported.fidelity["3"].reason
    files = run(imported, comfy_dirs, tmp_path / "out")
    assert [file.name for file in files] == ["ComfyUI_00000.png"]
    with Image.open(files[0]) as image:
        assert image.size == (64, 48)


# ComfyUI's widgets of each class in the order its UI saves their values (control_after_generate: the seed's
# "randomize" widget; upload: LoadImage's upload button), as ComfyUI's nodes.py declares them
UI_WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"], "VAELoader": ["vae_name"], "ControlNetLoader": ["control_net_name"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"], "CLIPTextEncode": ["text"],
    "CLIPSetLastLayer": ["stop_at_clip_layer"], "ControlNetApply": ["strength"],
    "ControlNetApplyAdvanced": ["strength", "start_percent", "end_percent"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": ["add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"],
    "EmptyLatentImage": ["width", "height", "batch_size"], "VAEDecode": [], "VAEEncode": [],
    "VAEEncodeForInpaint": ["grow_mask_by"], "SetLatentNoiseMask": [],
    "LatentUpscale": ["upscale_method", "width", "height", "crop"], "LatentUpscaleBy": ["upscale_method", "scale_by"],
    "LoadImage": ["image", "upload"], "LoadImageMask": ["image", "channel", "upload"], "SaveImage": ["filename_prefix"],
    "PreviewImage": [], "ImageScale": ["upscale_method", "width", "height", "crop"],
    "ImageScaleBy": ["upscale_method", "scale_by"], "Canny": ["low_threshold", "high_threshold"],
    "InvertMask": [], "ThresholdMask": ["value"], "GrowMask": ["expand", "tapered_corners"], "ImageToMask": ["channel"],
    "PrimitiveInt": ["value", "control_after_generate"], "PrimitiveFloat": ["value"], "PrimitiveString": ["value"],
    "PrimitiveStringMultiline": ["value"], "PrimitiveBoolean": ["value"],
}


def ui_workflow(prompt: dict[str, dict]) -> dict:
    """The UI-format workflow ComfyUI's editor saves for an API prompt: nodes with positional widget values and
    a links table [id, from, slot, to, input slot, type]."""
    nodes, links = [], []
    for node_id, entry in prompt.items():
        widgets = UI_WIDGETS[entry["class_type"]]
        # a widget fed by a link keeps the value it had before in the UI's list, which the link overrides
        values = [{"control_after_generate": "randomize", "upload": "image"}.get(name, entry["inputs"].get(name))
                  if not isinstance(entry["inputs"].get(name), list) else "stale" for name in widgets]
        inputs = []
        for name, value in entry["inputs"].items():
            if isinstance(value, list):
                kind = COMFY_CLASSES[prompt[value[0]]["class_type"]].outputs[value[1]]
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), len(inputs), kind])
                inputs.append({"name": name, "type": kind, "link": len(links)})
        nodes.append({"id": int(node_id), "type": entry["class_type"], "mode": 0, "inputs": inputs,
                      "widgets_values": values, "properties": {}})
    return {"last_node_id": max(int(key) for key in prompt), "nodes": nodes, "links": links, "groups": [],
            "version": 0.4}


def test_every_mapped_class_imports_validates_and_runs_from_api_and_ui_format(comfy_dirs: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    models, inputs = comfy_dirs
    prompt = json.loads((WORKFLOWS / "every_class_api.json").read_text())
    assert {entry["class_type"] for entry in prompt.values()} == set(COMFY_CLASSES) == set(UI_WIDGETS)
    imported = import_prompt(prompt, models_dir=models, input_dir=inputs)
    (tmp_path / "ui.json").write_text(json.dumps(ui_workflow(prompt)))
    assert import_file(tmp_path / "ui.json", models_dir=models, input_dir=inputs).document["nodes"] == \
        imported.document["nodes"]
    assert {item.node_class for item in imported.fidelity.values()} == set(COMFY_CLASSES)
    nodes = imported.document["nodes"]
    assert nodes["clip_text_encode_4"]["inputs"]["clip_skip"] == 1  # CLIPSetLastLayer -2, through the LoRA's clip
    # the Primitive nodes' values, written into the inputs they feed
    assert nodes["clip_text_encode_4"]["inputs"]["text"] == "a (red:1.2) house"
    assert (nodes["ksampler_8"]["inputs"]["seed"], nodes["ksampler_8"]["inputs"]["cfg"]) == (1, 5.0)
    assert nodes["save_image_10"]["inputs"]["prefix"] == "txt2img"
    assert nodes["canny_13"]["inputs"] | {"image": None} == {"image": None, "low": 51, "high": 153, "blur": 2}
    assert nodes["ksampler_18"]["inputs"]["control"] == [{"from": "control_net_apply_15.control"},
                                                         {"from": "control_net_apply_advanced_16.control"}]
    # denoise 0.6 of 3 steps: ComfyUI runs the last 3 of int(3 / 0.6) = 5 steps, graphflow int(5 * 0.6) of 5
    assert (nodes["ksampler_18"]["inputs"]["steps"], nodes["ksampler_18"]["inputs"]["strength"]) == (5, 0.6)
    assert nodes["ksampler_27"]["inputs"]["mask"] == {"from": "threshold_mask_36.mask"}  # SetLatentNoiseMask
    assert nodes["ksampler_advanced_30"]["inputs"]["strength"] == 0.5  # steps 2..4 of 4
    assert nodes["vae_encode_for_inpaint_22_grow"]["inputs"]["pixels"] == 3
    assert imported.node_names["3"] == [] and imported.node_names["26"] == []
    assert imported.outputs == {"10": "save_image_10", "20": "preview_image_20", "25": "save_image_25",
                                "33": "save_image_33"}
    files = run(imported, comfy_dirs, tmp_path / "out")
    sizes = {}
    for file in files:
        with Image.open(file) as image:
            sizes[file.name] = image.size
    assert sizes == {"txt2img_00000.png": (64, 64), "ComfyUI_preview_00000.png": (64, 64),
                     "inpaint_00000.png": (64, 64), "hires_00000.png": (48, 48)}


def test_a_bypassed_ui_node_passes_its_inputs_through(comfy_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    prompt = json.loads((WORKFLOWS / "every_class_api.json").read_text())
    workflow = ui_workflow(prompt)
    next(node for node in workflow["nodes"] if node["type"] == "LoraLoader")["mode"] = 4
    (tmp_path / "bypassed.json").write_text(json.dumps(workflow))
    imported = import_file(tmp_path / "bypassed.json", models_dir=comfy_dirs[0], input_dir=comfy_dirs[1])
    nodes = imported.document["nodes"]
    assert "lora_loader_2" not in nodes and "2" not in imported.fidelity
    assert nodes["ksampler_8"]["inputs"]["model"] == {"from": "checkpoint_loader_simple_1.model"}
    assert nodes["clip_text_encode_4"]["inputs"]["clip"] == {"from": "checkpoint_loader_simple_1.clip"}


def test_the_ui_format_imports_as_its_api_prompt_through_reroutes_primitives_and_muted_nodes(
        comfy_dirs: tuple[Path, Path]) -> None:
    ui = import_file(WORKFLOWS / "txt2img_ui.json", models_dir=comfy_dirs[0])
    api = import_file(WORKFLOWS / "txt2img_api.json", models_dir=comfy_dirs[0])
    assert ui.document["nodes"] == api.document["nodes"]  # seed 7 from the PrimitiveNode, clip through the Reroute
    assert set(ui.fidelity) == {"3", "4", "5", "6", "7", "8", "9"}  # no note, reroute, primitive or muted preview


def test_a_comfyui_png_imports_its_prompt_chunk(comfy_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", (WORKFLOWS / "txt2img_ui.json").read_text())
    Image.new("RGB", (8, 8)).save(tmp_path / "ComfyUI_00001_.png", pnginfo=info)
    imported = import_file(tmp_path / "ComfyUI_00001_.png", models_dir=comfy_dirs[0])
    assert imported.document["nodes"] == import_prompt(prompt, models_dir=comfy_dirs[0]).document["nodes"]
    assert imported.document["name"] == "ComfyUI_00001_"
    workflow_only = PngInfo()
    workflow_only.add_text("workflow", (WORKFLOWS / "txt2img_ui.json").read_text())
    Image.new("RGB", (8, 8)).save(tmp_path / "ui.png", pnginfo=workflow_only)
    assert import_file(tmp_path / "ui.png", models_dir=comfy_dirs[0]).document["nodes"] == imported.document["nodes"]
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValidationError, match="carries no ComfyUI workflow"):
        import_file(tmp_path / "plain.png")


def test_unknown_classes_are_listed_together_with_their_node_ids() -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    prompt["20"] = {"class_type": "IPAdapterAdvanced", "inputs": {}}
    prompt["21"] = {"class_type": "UltimateSDUpscale", "inputs": {}}
    prompt["22"] = {"class_type": "KSamplr", "inputs": {}}
    with pytest.raises(ValidationError) as raised:
        import_prompt(prompt)
    errors = raised.value.errors
    assert errors[0].code == "unknown_node_type"
    assert "3 ComfyUI classes cannot be imported: IPAdapterAdvanced, KSamplr, UltimateSDUpscale" in errors[0].message
    assert [(error.node, error.found) for error in errors[1:]] == [
        ("20", "IPAdapterAdvanced"), ("21", "UltimateSDUpscale"), ("22", "KSamplr")]
    assert "did you mean 'KSampler'" in errors[3].message


def test_bad_links_and_values_are_listed_together() -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    prompt["3"]["inputs"] |= {"model": ["4", 1], "latent_image": ["55", 0], "sampler_name": "eulr"}
    prompt["8"]["inputs"]["vae"] = ["4", 3]
    del prompt["6"]["inputs"]["clip"]
    with pytest.raises(ValidationError) as raised:
        import_prompt(prompt)
    found = {(error.node, error.input, str(error.code)) for error in raised.value.errors}
    assert found == {("3", "model", "type_mismatch"), ("3", "latent_image", "bad_link"),
                     ("3", "sampler_name", "invalid_value"), ("8", "vae", "bad_link"),
                     ("6", "clip", "missing_required_input")}
    assert "did you mean 'euler'" in str(raised.value)


def test_model_names_resolve_in_the_models_folder_and_never_outside_it(comfy_dirs: tuple[Path, Path]) -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "sd16"
    with pytest.raises(ValidationError, match="did you mean 'sd15'") as raised:
        import_prompt(prompt, models_dir=comfy_dirs[0])
    assert (raised.value.errors[0].node, raised.value.errors[0].code) == ("4", "file_not_found")
    prompt["4"]["inputs"]["ckpt_name"] = "../../secret"
    with pytest.raises(ValidationError, match="outside its folder"):
        import_prompt(prompt, models_dir=comfy_dirs[0])
    prompt["4"]["inputs"]["ckpt_name"] = "sd15"
    unresolved = import_prompt(prompt)  # no models folder: relative to the run's first --input-dir
    assert unresolved.document["nodes"]["checkpoint_loader_simple_4"]["inputs"]["model"] == "checkpoints/sd15"


def test_import_comfy_writes_the_document_and_prints_the_fidelity_summary(
        comfy_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "g.json"
    assert main(["import-comfy", str(WORKFLOWS / "txt2img_api.json"), "-o", str(target),
                 "--models-dir", str(comfy_dirs[0])]) == 0
    printed = capsys.readouterr().out
    assert "3   KSampler                approximate  ksampler_3" in printed
    assert "7 ComfyUI nodes: 6 exact, 1 approximate, 0 unsupported" in printed
    assert main(["validate", str(target)]) == 0
    assert json.loads(target.read_text())["nodes"]["ksampler_3"]["type"] == "Sampler"
    capsys.readouterr()
    assert main(["import-comfy", str(WORKFLOWS / "txt2img_ui.json"), "-o", str(target), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fidelity"]["3"] == {"level": "approximate", "node_class": "KSampler",
                                       "graphflow_nodes": ["ksampler_3"], "reason": imported_reason("3")}
    assert report["outputs"] == {"9": "save_image_9"}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"1": {"class_type": "Mystery", "inputs": {}}}))
    assert main(["import-comfy", str(broken), "-o", str(tmp_path / "never.json")]) == 1
    assert "Mystery" in capsys.readouterr().err and not (tmp_path / "never.json").exists()


def imported_reason(comfy_id: str) -> str:
    return import_file(WORKFLOWS / "txt2img_api.json").fidelity[comfy_id].reason


def test_object_info_lists_every_mapped_class_in_comfyuis_shape(comfy_dirs: tuple[Path, Path]) -> None:
    from graphflow.comfy.mappings import TRANSLATORS

    info = comfy_class_info(comfy_dirs[0], comfy_dirs[1])
    assert set(info) == set(COMFY_CLASSES) == set(TRANSLATORS)
    sampler = info["KSampler"]
    assert list(sampler["input"]["required"]) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                                  "positive", "negative", "latent_image", "denoise"]
    assert sampler["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert (sampler["output"], sampler["output_node"], sampler["category"]) == (["LATENT"], False, "sampling")
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["sd15", "sd15-inpaint"]
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["mask.png", "photo.png"]
    assert info["ControlNetApplyAdvanced"]["output_name"] == ["positive", "negative"]
    assert info["SaveImage"]["output_node"] is True


def test_importing_never_imports_torch() -> None:
    code = ("import sys, json; from graphflow.comfy import import_file; "
            f"import_file({str(WORKFLOWS / 'txt2img_ui.json')!r}); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_denoise_becomes_a_strength_that_runs_comfyuis_steps_from_its_point_of_the_schedule() -> None:
    from graphflow.comfy.samplers import denoise_window

    for steps in range(1, 61):
        for percent in range(5, 100, 5):
            total, strength = denoise_window(steps, percent / 100)
            assert total == max(int(steps / (percent / 100)), steps)
            assert int(total * strength) == steps, (steps, percent)  # graphflow's (diffusers') count of steps run
    assert denoise_window(20, 1.0) == (20, 1.0)


def test_an_img2img_ksampler_runs_exactly_its_steps(comfy_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from graphflow.events import NodeProgress

    prompt = json.loads((WORKFLOWS / "every_class_api.json").read_text())
    keep = {"1", "2", "3", "4", "5", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20", "41"}
    prompt = {key: value for key, value in prompt.items() if key in keep}
    prompt["18"]["inputs"] |= {"steps": 4, "denoise": 0.3, "sampler_name": "euler"}  # int(4 / 0.3) = 13
    imported = import_prompt(prompt, models_dir=comfy_dirs[0], input_dir=comfy_dirs[1])
    assert imported.document["nodes"]["ksampler_18"]["inputs"]["steps"] == 13
    progress: list[NodeProgress] = []
    engine = Engine(input_dirs=list(comfy_dirs), output_dir=tmp_path)
    engine.run(imported.document, on_event=lambda event: progress.append(event)
               if isinstance(event, NodeProgress) and event.node == "ksampler_18" else None)
    assert [(event.step, event.total) for event in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert imported.comfy_ids["ksampler_18"] == "18"


def test_samplers_map_by_method_and_those_without_a_counterpart_are_unsupported() -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    cases = {("dpmpp_2m", "karras"): ("dpmpp_2m_karras", "approximate"),
             ("euler_ancestral", "normal"): ("euler_a", "approximate"),
             ("dpmpp_2m_sde", "exponential"): ("dpmpp_2m", "approximate"),
             ("lcm", "sgm_uniform"): ("default", "unsupported")}
    for (sampler_name, scheduler), (expected, level) in cases.items():
        prompt["3"]["inputs"] |= {"sampler_name": sampler_name, "scheduler": scheduler}
        imported = import_prompt(prompt)
        assert imported.document["nodes"]["ksampler_3"]["inputs"]["scheduler"] == expected
        assert imported.fidelity["3"].level == level
    assert "no LCM scheduler" in imported.fidelity["3"].reason
    assert imported.summary().endswith("7 ComfyUI nodes: 6 exact, 0 approximate, 1 unsupported")


def test_a_ksampler_advanced_that_stops_early_is_unsupported() -> None:
    prompt = json.loads((WORKFLOWS / "every_class_api.json").read_text())
    prompt["30"]["inputs"] |= {"end_at_step": 3, "return_with_leftover_noise": "enable", "add_noise": "disable"}
    fidelity = import_prompt(prompt).fidelity["30"]
    assert fidelity.level == "unsupported"
    assert "end_at_step 3" in fidelity.reason and "add_noise disable" in fidelity.reason


def test_graphflow_validation_problems_name_the_comfyui_node(comfy_dirs: tuple[Path, Path]) -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    prompt["5"]["inputs"]["batch_size"] = 100  # ComfyUI allows 4096, graphflow's EmptyLatent 64
    prompt["4"]["inputs"]["ckpt_name"] = "sd15.safetensors"  # a diffusers folder of the same stem serves
    with pytest.raises(ValidationError) as raised:
        import_prompt(prompt, models_dir=comfy_dirs[0])
    [error] = raised.value.errors
    assert (error.node, error.input, str(error.code)) == ("5", "batch", "value_out_of_range")
    assert error.message.startswith("EmptyLatentImage (graphflow node empty_latent_image_5)")


def test_a_loop_of_comfyui_nodes_is_refused_by_name() -> None:
    prompt = json.loads((WORKFLOWS / "every_class_api.json").read_text())
    prompt["26"]["inputs"]["samples"] = ["30", 0]  # 26 -> 27 -> 28 -> 29 -> 30 -> 26
    with pytest.raises(ValidationError) as raised:
        import_prompt(prompt)
    [error] = raised.value.errors
    loop = error.message.split(": ", 1)[1].split(" -> ")
    assert str(error.code) == "cycle" and set(loop) == {"26", "27", "28", "29", "30"} and loop[0] == loop[-1]


def test_a_missing_file_name_is_reported_and_an_explicit_null_takes_comfyuis_default() -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    prompt["5"]["inputs"]["batch_size"] = None
    assert import_prompt(prompt).document["nodes"]["empty_latent_image_5"]["inputs"]["batch"] == 1
    del prompt["4"]["inputs"]["ckpt_name"]
    with pytest.raises(ValidationError, match="ckpt_name is missing"):
        import_prompt(prompt)


def test_every_comfyui_sampler_maps_onto_one_of_the_samplers_schedulers() -> None:
    from graphflow.comfy.samplers import COMFY_SAMPLERS, COMFY_SCHEDULERS, sampler_choice
    from graphflow.registry import default_registry

    sampler = default_registry().get("Sampler")
    assert sampler is not None
    choices = next(item.choices for item in sampler.inputs if item.name == "scheduler")
    for sampler_name in COMFY_SAMPLERS:
        for scheduler in COMFY_SCHEDULERS:
            choice = sampler_choice(sampler_name, scheduler)
            assert choice.scheduler in choices
            assert choice.supported == (choice.scheduler != "default"), sampler_name


def test_a_widget_takes_a_link_only_from_a_primitive_node_with_a_value_it_accepts() -> None:
    prompt = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    prompt["10"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 500.0}}
    prompt["11"] = {"class_type": "PrimitiveString", "inputs": {"value": "eulr"}}
    prompt["3"]["inputs"] |= {"cfg": ["10", 0], "sampler_name": ["11", 0], "seed": ["5", 0]}
    with pytest.raises(ValidationError) as raised:
        import_prompt(prompt)
    found = {(error.input, str(error.code)): error.message for error in raised.value.errors}
    assert set(found) == {("cfg", "invalid_value"), ("sampler_name", "invalid_value"), ("seed", "type_mismatch")}
    assert "(from PrimitiveFloat 10) is out of ComfyUI's range" in found["cfg", "invalid_value"]
    assert "did you mean 'euler'" in found["sampler_name", "invalid_value"]
