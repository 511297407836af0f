"""What each ComfyUI class becomes in graphflow: one small translator per class, registered in TRANSLATORS.

A translator reads its ComfyUI node's inputs (links as Sources, widget values as given), adds graphflow nodes,
and returns its outputs in ComfyUI's order with its fidelity. Classes that only change a value ComfyUI passes
along (CLIPSetLastLayer, SetLatentNoiseMask, the ControlNet apply nodes) add no node of their own, or one that
the Sampler reads from a list: their effect travels on the Source to the node that uses it.
"""

from __future__ import annotations

from collections.abc import Callable

from graphflow.comfy.classes import MODEL_SUFFIXES, PRIMITIVES
from graphflow.comfy.importer import NodeImport, Source, Translation, Translator
from graphflow.comfy.samplers import denoise_window, sampler_choice, strength_running
from graphflow.errors import Code

TRANSLATORS: dict[str, Translator] = {}

SAMPLING = ("ComfyUI samples with k-diffusion on its own sigma schedule and noise; graphflow runs diffusers' "
            "{scheduler} scheduler: the same kind of step, different pixels")
WEIGHTING = ("ComfyUI weights (word:1.2) by moving each token's embedding away from the empty prompt's; "
             "graphflow weights as A1111 (scaled, mean kept)")
RESAMPLING = "ComfyUI resizes with torch's interpolate (and Pillow for lanczos); graphflow with Pillow in float"
LATENT_RESAMPLING = "ComfyUI resizes latents with torch's interpolate; graphflow with its own filters (Pillow's)"


def translator(*class_names: str) -> Callable[[Translator], Translator]:
    """Register a function as the translator of these ComfyUI classes."""

    def register(function: Translator) -> Translator:
        for name in class_names:
            TRANSLATORS[name] = function
        return function

    return register


@translator("CheckpointLoaderSimple")
def checkpoint(node: NodeImport) -> Translation:
    path = node.model_path("ckpt_name")
    name = node.add("CheckpointLoader", {"model": path})
    single = path.lower().endswith(MODEL_SUFFIXES)
    return Translation((Source(f"{name}.model", "MODEL"), Source(f"{name}.clip", "CLIP"),
                        Source(f"{name}.vae", "VAE")),
                       reason="a single-file checkpoint: diffusers takes its configs from the HF cache or hub "
                              "(or set CheckpointLoader's config)" if single else "")


@translator("VAELoader")
def vae_loader(node: NodeImport) -> Translation:
    name = node.add("VAELoader", {"model": node.model_path("vae_name")})
    return Translation((Source(f"{name}.vae", "VAE"),))


@translator("ControlNetLoader")
def controlnet_loader(node: NodeImport) -> Translation:
    name = node.add("ControlNetLoader", {"model": node.model_path("control_net_name")})
    return Translation((Source(f"{name}.controlnet", "CONTROL_NET"),))


@translator("LoraLoader")
def lora_loader(node: NodeImport) -> Translation:
    clip = node.source("clip")
    assert clip is not None
    name = node.add("LoraLoader", {"model": node.link("model"), "clip": node.link("clip"),
                                   "lora": node.model_path("lora_name"),
                                   "strength_model": node.value("strength_model"),
                                   "strength_clip": node.value("strength_clip")})
    return Translation((Source(f"{name}.model", "MODEL"), clip.with_(link=f"{name}.clip")))


@translator("CLIPSetLastLayer")
def clip_set_last_layer(node: NodeImport) -> Translation:
    clip = node.source("clip")
    assert clip is not None
    skip = -1 - int(node.value("stop_at_clip_layer"))
    return Translation((clip.with_(clip_skip=skip),), reason=f"no node of its own: the TextEncode nodes it feeds "
                       f"get clip_skip {skip}")


@translator("CLIPTextEncode")
def clip_text_encode(node: NodeImport) -> Translation:
    clip = node.source("clip")
    assert clip is not None
    text = str(node.value("text"))
    inputs = {"clip": node.link("clip"), "text": text, "weighting": True}
    if clip.clip_skip:
        inputs["clip_skip"] = clip.clip_skip
    name = node.add("TextEncode", inputs)
    weighted = any(bracket in text for bracket in "()[]")
    return Translation((Source(f"{name}.conditioning", "CONDITIONING"),), "approximate" if weighted else "exact",
                       WEIGHTING if weighted else "")


def _control(node: NodeImport, start: float, end: float) -> str:
    inputs = {"controlnet": node.link("control_net"), "image": node.link("image"), "scale": node.value("strength")}
    if (start, end) != (0.0, 1.0):
        inputs |= {"start": start, "end": end}
    return node.add("ControlApply", inputs) + ".control"


CONTROL = ("graphflow (as diffusers) adds the ControlNet's residuals to both halves of classifier-free guidance, "
           "ComfyUI only to the conditioning it is attached to")


@translator("ControlNetApply")
def controlnet_apply(node: NodeImport) -> Translation:
    conditioning = node.source("conditioning")
    assert conditioning is not None
    control = _control(node, 0.0, 1.0)
    return Translation((conditioning.with_(controls=(*conditioning.controls, control)),), "approximate", CONTROL)


@translator("ControlNetApplyAdvanced")
def controlnet_apply_advanced(node: NodeImport) -> Translation:
    positive, negative = node.source("positive"), node.source("negative")
    assert positive is not None and negative is not None
    control = _control(node, float(node.value("start_percent")), float(node.value("end_percent")))
    reason = CONTROL + "; start/end are fractions of the steps, ComfyUI's of the noise schedule"
    if node.source("vae") is not None:
        reason += "; the vae input is not used"
    return Translation((positive.with_(controls=(*positive.controls, control)),
                        negative.with_(controls=(*negative.controls, control))), "approximate", reason)


@translator("EmptyLatentImage")
def empty_latent(node: NodeImport) -> Translation:
    name = node.add("EmptyLatent", {"width": node.value("width"), "height": node.value("height"),
                                    "batch": node.value("batch_size")})
    return Translation((Source(f"{name}.latent", "LATENT", empty=True),))


@translator("VAEDecode")
def vae_decode(node: NodeImport) -> Translation:
    name = node.add("VAEDecode", {"vae": node.link("vae"), "latent": node.link("samples")})
    return Translation((Source(f"{name}.image", "IMAGE"),))


ENCODE = ("ComfyUI crops images to multiples of 8 (graphflow needs them) and starts from the encoder's latent "
          "with its own noise; graphflow draws it with the Sampler's seed")


@translator("VAEEncode")
def vae_encode(node: NodeImport) -> Translation:
    name = node.add("VAEEncode", {"vae": node.link("vae"), "image": node.link("pixels")})
    return Translation((Source(f"{name}.latent", "LATENT"),), "approximate", ENCODE)


@translator("VAEEncodeForInpaint")
def vae_encode_for_inpaint(node: NodeImport) -> Translation:
    mask = node.link("mask")
    grow = int(node.value("grow_mask_by"))
    if grow:  # ComfyUI dilates with a grow x grow square: about grow // 2 pixels each way
        mask = {"from": node.add("GrowMask", {"mask": mask, "pixels": grow // 2}, "grow") + ".mask"}
    name = node.add("VAEEncode", {"vae": node.link("vae"), "image": node.link("pixels"), "mask": mask})
    reason = ENCODE + "; ComfyUI greys the masked pixels before encoding" + \
        (f" and grows the mask with a {grow}x{grow} square, graphflow with a disc of radius {grow // 2}"
         if grow else "")
    return Translation((Source(f"{name}.latent", "LATENT"),), "approximate", reason)


@translator("SetLatentNoiseMask")
def set_latent_noise_mask(node: NodeImport) -> Translation:
    latent, mask = node.source("samples"), node.source("mask")
    assert latent is not None and mask is not None
    return Translation((latent.with_(mask=mask.link),), "approximate",
                       "no node of its own: the Sampler it feeds gets the mask, which must be the image's size "
                       "(ComfyUI resizes it)")


@translator("LatentUpscale", "LatentUpscaleBy")
def latent_upscale(node: NodeImport) -> Translation:
    inputs = {"latent": node.link("samples"), "method": node.value("upscale_method")}
    inputs |= _size(node)
    name = node.add("LatentUpscale", inputs)
    exact = node.value("upscale_method") == "nearest-exact"
    return Translation((Source(f"{name}.latent", "LATENT"),), "exact" if exact else "approximate",
                       "" if exact else LATENT_RESAMPLING)


@translator("ImageScale", "ImageScaleBy")
def image_scale(node: NodeImport) -> Translation:
    method = node.value("upscale_method")
    inputs = {"image": node.link("image"), "method": method} | _size(node)
    name = node.add("ImageScale", inputs)
    exact = method == "nearest-exact"
    return Translation((Source(f"{name}.image", "IMAGE"),), "exact" if exact else "approximate",
                       "" if exact else RESAMPLING)


def _size(node: NodeImport) -> dict[str, object]:
    if node.spec.input("scale_by") is not None:
        return {"scale_by": node.value("scale_by")}
    return {"width": node.value("width"), "height": node.value("height"), "crop": node.value("crop")}


@translator("InvertMask")
def invert_mask(node: NodeImport) -> Translation:
    name = node.add("InvertMask", {"mask": node.link("mask")})
    return Translation((Source(f"{name}.mask", "MASK"),))


@translator("ThresholdMask")
def threshold_mask(node: NodeImport) -> Translation:
    name = node.add("ThresholdMask", {"mask": node.link("mask"), "threshold": node.value("value")})
    return Translation((Source(f"{name}.mask", "MASK"),))


@translator("GrowMask")
def grow_mask(node: NodeImport) -> Translation:
    expand = int(node.value("expand"))
    name = node.add("GrowMask", {"mask": node.link("mask"), "pixels": expand})
    shape = "a diamond" if node.value("tapered_corners") else "a square"
    return Translation((Source(f"{name}.mask", "MASK"),), "approximate",
                       f"ComfyUI grows by {abs(expand)} pixels into {shape} (3x3 steps), graphflow into a disc")


@translator("ImageToMask")
def image_to_mask(node: NodeImport) -> Translation:
    channel = node.value("channel")
    if channel == "alpha":
        node.error(Code.INVALID_VALUE, "takes the alpha channel, which graphflow's RGB images do not have (LoadImage "
                   "gives it as its mask output)", "channel", "red, green or blue", "alpha")
    name = node.add("ImageToMask", {"image": node.link("image"), "channel": channel})
    return Translation((Source(f"{name}.mask", "MASK"),))


@translator(*PRIMITIVES)
def primitive(node: NodeImport) -> Translation:
    return Translation((Source("", node.spec.outputs[0]),), reason="no node of its own: its value is written into "
                       "the inputs it feeds")


@translator("Canny")
def canny(node: NodeImport) -> Translation:
    low, high = (round(float(node.value(name)) * 255) for name in ("low_threshold", "high_threshold"))
    name = node.add("Canny", {"image": node.link("image"), "low": low, "high": high, "blur": 2})
    return Translation((Source(f"{name}.image", "IMAGE"),), "approximate",
                       f"thresholds x255 ({low}, {high}); ComfyUI's Canny is kornia's (5x5 Gaussian blur, sigma 1, "
                       "float gradients), graphflow's OpenCV's after a 5x5 blur")


@translator("LoadImage")
def load_image(node: NodeImport) -> Translation:
    name = node.add("LoadImage", {"path": node.image_path("image")})
    return Translation((Source(f"{name}.image", "IMAGE"), Source(f"{name}.mask", "MASK")),
                       reason="of an animation, the first frame only (ComfyUI loads every frame)")


@translator("LoadImageMask")
def load_image_mask(node: NodeImport) -> Translation:
    name = node.add("LoadMask", {"path": node.image_path("image"), "channel": node.value("channel")})
    return Translation((Source(f"{name}.mask", "MASK"),))


@translator("SaveImage")
def save_image(node: NodeImport) -> Translation:
    prefix = str(node.value("filename_prefix"))
    node.add("SaveImage", {"image": node.link("images"), "prefix": prefix})
    reason = "files are PREFIX_00000.png (ComfyUI: PREFIX_00001_.png), with the graphflow graph embedded"
    if "%" in prefix:
        return Translation((), "approximate", reason + "; ComfyUI's %...% tokens are not expanded")
    return Translation((), reason=reason)


@translator("PreviewImage")
def preview_image(node: NodeImport) -> Translation:
    node.add("SaveImage", {"image": node.link("images"), "prefix": "ComfyUI_preview"})
    return Translation((), reason="saved as ComfyUI_preview_NNNNN.png under the output directory")


@translator("KSampler")
def ksampler(node: NodeImport) -> Translation:
    latent = node.source("latent_image")
    assert latent is not None
    steps, denoise = int(node.value("steps")), float(node.value("denoise"))
    notes: list[str] = []
    if denoise <= 0:
        node.error(Code.INVALID_VALUE, "with denoise 0 returns its latent unchanged; graphflow's Sampler always "
                   "runs at least one step", "denoise", "a denoise above 0", str(denoise))
    if latent.empty:
        total, strength = steps, 1.0
        if denoise < 0.9999:
            notes.append(f"text-to-image from an empty latent: graphflow starts from pure noise, not at denoise "
                         f"{denoise}")
    else:
        total, strength = denoise_window(steps, denoise) if denoise > 0 else (steps, 1.0)
        if strength < 1.0:
            notes.append(f"denoise {denoise} of {steps} steps: steps {total}, strength {strength:.4g}, the last "
                         f"{steps} steps of a {total}-step schedule as ComfyUI runs them")
        elif 0 < denoise < 0.9999:
            notes.append(f"denoise {denoise} of {steps} steps: ComfyUI's schedule of int({steps} / {denoise}) = "
                         f"{total} steps runs whole, and so does graphflow's")
    return _sampler(node, latent, node.value("seed"), total, strength, notes)


@translator("KSamplerAdvanced")
def ksampler_advanced(node: NodeImport) -> Translation:
    latent = node.source("latent_image")
    assert latent is not None
    steps, start, end = (int(node.value(name)) for name in ("steps", "start_at_step", "end_at_step"))
    notes: list[str] = []
    level = "approximate"
    if start >= min(steps, end):
        node.error(Code.INVALID_VALUE, f"starts at step {start} of {min(steps, end)}: no step runs",
                   "start_at_step", f"below {min(steps, end)}", str(start))
    strength = 1.0
    if start > 0:
        if latent.empty:
            notes.append(f"text-to-image from an empty latent: graphflow runs all steps, not from step {start}")
        else:
            strength = strength_running(steps - start, steps)
            notes.append(f"start_at_step {start}: strength {strength:.4g}, the last {steps - start} of {steps} steps")
    if end < steps:
        level = "unsupported"
        notes.append(f"graphflow samples to the end of the schedule: end_at_step {end} and leftover noise are "
                     "not reproduced")
    if node.value("add_noise") == "disable":
        level = "unsupported"
        notes.append("graphflow always noises its start latent (add_noise disable is not reproduced)")
    return _sampler(node, latent, node.value("noise_seed"), steps, strength, notes, level)


def _sampler(node: NodeImport, latent: Source, seed: object, steps: int, strength: float, notes: list[str],
             level: str = "approximate") -> Translation:
    positive, negative = node.source("positive"), node.source("negative")
    assert positive is not None and negative is not None
    choice = sampler_choice(str(node.value("sampler_name")), str(node.value("scheduler")))
    inputs: dict[str, object] = {"model": node.link("model"), "positive": {"from": positive.link},
                                 "negative": {"from": negative.link}}
    controls = list(dict.fromkeys((*positive.controls, *negative.controls)))
    if controls:
        inputs["control"] = [{"from": control} for control in controls]
    inputs["latent"] = {"from": latent.link}
    if latent.mask is not None:
        inputs["mask"] = {"from": latent.mask}
    inputs |= {"seed": seed, "steps": steps, "cfg": node.value("cfg"), "scheduler": choice.scheduler}
    if strength < 1.0:
        inputs["strength"] = strength
    name = node.add("Sampler", inputs)
    reasons = [SAMPLING.format(scheduler=choice.scheduler), *([choice.note] if choice.note else []), *notes]
    return Translation((Source(f"{name}.latent", "LATENT"),),
                       level if choice.supported else "unsupported", "; ".join(reasons))
