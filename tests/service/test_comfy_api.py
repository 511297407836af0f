"""ComfyUI's API on a real `graphflow serve` subprocess, driven the way ComfyUI's own
script_examples/websockets_api_example.py drives ComfyUI: websocket-client on /ws?clientId=..., urllib for
POST /prompt, GET /history/{id} and GET /view."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websocket  # websocket-client, as ComfyUI's example uses

from tests.service.server import Server

MAPPED = {"CheckpointLoaderSimple", "CLIPTextEncode", "CLIPSetLastLayer", "KSampler", "KSamplerAdvanced",
          "EmptyLatentImage", "VAEDecode", "VAEEncode", "VAEEncodeForInpaint", "SetLatentNoiseMask", "LoadImage",
          "LoadImageMask", "SaveImage", "PreviewImage", "ControlNetLoader", "ControlNetApply",
          "ControlNetApplyAdvanced", "Canny", "ImageScale", "LatentUpscale", "LoraLoader", "VAELoader"}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Server]:
    """A server as a ComfyUI script meets it: no token (loopback), a models folder in ComfyUI's layout."""
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models"
    shutil.copytree(tiny_models / "sd15", models / "checkpoints" / "sd15")
    inputs = root / "input"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    running = Server(root, tiny_models, "--no-auth", "--models-dir", str(models), "--input-dir", str(inputs),
                     "--cors-origin", "http://allowed.example").start()
    yield running
    running.stop()


def example_prompt(seed: int = 5, text: str = "masterpiece best quality man") -> dict[str, Any]:
    """ComfyUI's example prompt, on the tiny checkpoint, 2 steps at 32 x 32."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": seed, "steps": 2}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 32, "width": 32}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": text}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


class ComfyClient:
    """The functions of ComfyUI's websocket example, with the message log kept for the assertions."""

    def __init__(self, server_address: str) -> None:
        self.server_address = server_address
        self.client_id = str(uuid.uuid4())
        self.ws = websocket.WebSocket()
        self.ws.connect(f"ws://{server_address}/ws?clientId={self.client_id}", timeout=180)  # a loaded machine
        self.messages: list[dict[str, Any]] = []

    def queue_prompt(self, prompt: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode("utf-8")
        request = urllib.request.Request(f"http://{self.server_address}/prompt", data=data)
        return json.loads(urllib.request.urlopen(request).read())  # type: ignore[no-any-return]

    def get_image(self, filename: str, subfolder: str, folder_type: str) -> bytes:
        values = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        with urllib.request.urlopen(f"http://{self.server_address}/view?{values}") as response:
            return response.read()  # type: ignore[no-any-return]

    def get_history(self, prompt_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.server_address}/history/{prompt_id}") as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def wait_until_done(self, prompt_id: str) -> None:
        while True:
            out = self.ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                self.messages.append(message)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        return

    def get_images(self, prompt: dict[str, Any]) -> tuple[str, dict[str, list[bytes]]]:
        prompt_id = self.queue_prompt(prompt)["prompt_id"]
        self.wait_until_done(prompt_id)
        history = self.get_history(prompt_id)[prompt_id]
        output_images = {}
        for node_id, node_output in history["outputs"].items():
            if "images" in node_output:
                output_images[node_id] = [self.get_image(image["filename"], image["subfolder"], image["type"])
                                          for image in node_output["images"]]
        return prompt_id, output_images

    def of(self, prompt_id: str) -> list[tuple[str, Any]]:
        """(type, node) of the messages about one prompt, in order."""
        return [(m["type"], m["data"].get("node")) for m in self.messages if m["data"].get("prompt_id") == prompt_id]


def address(server: Server) -> str:
    return server.url.removeprefix("http://")


@pytest.fixture
def connect(comfy: Server) -> Iterator[Callable[[], ComfyClient]]:
    """Makes ComfyClients on the server; their websockets are closed after the test."""
    made: list[ComfyClient] = []

    def client() -> ComfyClient:
        made.append(ComfyClient(address(comfy)))
        return made[-1]

    yield client
    for each in made:
        each.ws.close()


def test_comfyuis_example_client_runs_a_prompt_and_reads_its_image(comfy: Server,
                                                                     connect: Callable[[], ComfyClient]) -> None:
    client = connect()
    bystander = connect()  # another client's socket hears no messages of this prompt
    prompt_id, images = client.get_images(example_prompt())
    assert client.messages[0]["type"] == "status" and client.messages[0]["data"]["sid"] == client.client_id
    kinds = client.of(prompt_id)
    assert kinds[0] == ("execution_start", None) and kinds[1] == ("execution_cached", None)
    executing = [node for kind, node in kinds if kind == "executing"]
    assert executing[-1] is None and set(executing[:-1]) == set(example_prompt())
    order = {node: index for index, node in enumerate(executing[:-1])}
    for node_id, node in example_prompt().items():  # each node runs after the nodes it reads
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert order[value[0]] < order[node_id]
    progress = [m["data"] for m in client.messages if m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"], p["prompt_id"]) for p in progress] == [(1, 2, "3", prompt_id),
                                                                                    (2, 2, "3", prompt_id)]
    sampler = kinds.index(("executing", "3"))
    assert kinds[sampler + 1:sampler + 3] == [("progress", "3"), ("progress", "3")]
    assert kinds[-3:] == [("executed", "9"), ("execution_success", None), ("executing", None)]

    history = client.get_history(prompt_id)[prompt_id]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert [kind for kind, _ in history["status"]["messages"]] == ["execution_start", "execution_cached",
                                                                   "execution_success"]
    assert history["prompt"][1] == prompt_id and history["prompt"][2] == example_prompt()
    assert comfy.client.get("/api/history", params={"max_items": 1}).json() == {prompt_id: history}
    (image,) = history["outputs"]["9"]["images"]
    executed = next(m["data"] for m in client.messages if m["type"] == "executed")
    assert executed["output"]["images"] == [image] and image["type"] == "output"
    assert image["filename"].startswith("ComfyUI_") and image["filename"].endswith(".png")
    assert images["9"] == [(comfy.data / "outputs" / image["subfolder"] / image["filename"]).read_bytes()]
    assert images["9"][0].startswith(b"\x89PNG\r\n\x1a\n")

    bystander.ws.settimeout(0.5)
    heard = []
    try:
        while True:
            heard.append(json.loads(bystander.ws.recv())["type"])
    except websocket.WebSocketTimeoutException:
        pass
    assert heard and set(heard) == {"status"}


def test_a_prompt_posted_again_comes_from_cache_and_still_reports_its_image(
        connect: Callable[[], ComfyClient]) -> None:
    client = connect()
    _, first = client.get_images(example_prompt(seed=11))
    again_id, again = client.get_images(example_prompt(seed=11))
    assert again == first
    kinds = client.of(again_id)
    cached = next(m["data"]["nodes"] for m in client.messages
                  if m["type"] == "execution_cached" and m["data"]["prompt_id"] == again_id)
    assert set(cached) == set(example_prompt())
    assert kinds == [("execution_start", None), ("execution_cached", None), ("executed", "9"),
                     ("execution_success", None), ("executing", None)]


def test_object_info_describes_the_mapped_classes_with_the_models_folder(comfy: Server) -> None:
    info = comfy.client.get("/object_info").json()
    assert set(info) >= MAPPED
    loader = info["CheckpointLoaderSimple"]
    assert loader["input"]["required"]["ckpt_name"][0] == ["sd15"]
    assert loader["output"] == ["MODEL", "CLIP", "VAE"] and loader["output_node"] is False
    assert info["SaveImage"]["output_node"] is True
    assert "euler" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert comfy.client.get("/object_info/KSampler").json() == {"KSampler": info["KSampler"]}
    assert comfy.client.get("/api/object_info/Nope").json() == {}


def test_a_bad_prompt_answers_400_with_every_problem_under_its_node_id(comfy: Server) -> None:
    prompt = example_prompt()
    prompt["3"]["inputs"].update(sampler_name="no_such_sampler", steps=0)
    prompt["5"]["inputs"]["batch_size"] = 0
    response = comfy.client.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["node_errors"]) == {"3", "5"}
    sampler = body["node_errors"]["3"]
    assert sampler["class_type"] == "KSampler" and sampler["dependent_outputs"] == ["9"]
    assert {error["extra_info"]["input_name"] for error in sampler["errors"]} == {"sampler_name", "steps"}
    assert all(error["type"] == "invalid_value" and error["message"] for error in sampler["errors"])

    prompt = example_prompt()
    prompt["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    body = comfy.client.post("/prompt", json={"prompt": prompt}).json()
    (error,) = body["node_errors"]["4"]["errors"]
    assert error["type"] == "file_not_found" and "missing.safetensors" in error["details"]

    missing = comfy.client.post("/prompt", json={"client_id": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "no_prompt"
    assert missing.json()["node_errors"] == {}
    unknown = comfy.client.post("/prompt", json={"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert unknown.status_code == 400 and "NoSuchNode" in unknown.json()["error"]["details"]
    assert comfy.client.post("/prompt", content=b"{not json").status_code == 400
    too_large = comfy.client.post("/api/prompt", json={"prompt": example_prompt(text="x" * (5 << 20))})
    assert too_large.status_code == 413


def test_a_failing_job_sends_execution_error_then_executing_null(connect: Callable[[], ComfyClient]) -> None:
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "broken"}}}
    client = connect()
    answer = client.queue_prompt(prompt)
    assert answer["node_errors"] == {} and isinstance(answer["number"], int)
    client.wait_until_done(answer["prompt_id"])
    kinds = client.of(answer["prompt_id"])
    assert kinds[0] == ("execution_start", None) and ("executing", "1") in kinds
    assert [kind for kind, _ in kinds[-2:]] == ["execution_error", "executing"] and kinds[-1][1] is None
    error = next(m["data"] for m in client.messages if m["type"] == "execution_error")
    assert error["node_id"] == "1" and error["node_type"] == "LoadImage" and error["exception_message"]
    history = client.get_history(answer["prompt_id"])[answer["prompt_id"]]
    assert history["status"] == {"status_str": "error", "completed": False,
                                 "messages": history["status"]["messages"]}
    assert history["status"]["messages"][-1][0] == "execution_error" and history["outputs"] == {}


def test_view_serves_nothing_outside_the_output_folder(comfy: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    outputs = comfy.data / "outputs"
    (outputs / "sub").mkdir(parents=True, exist_ok=True)
    (outputs / "sub" / "inside.png").write_bytes(b"\x89PNG inside")
    (outputs / "link.png").symlink_to(secret)
    (outputs / "linked").symlink_to(tmp_path, target_is_directory=True)

    def view(**query: str) -> httpx.Response:
        return comfy.client.get("/view", params=query)

    assert view(filename="inside.png", subfolder="sub").content == b"\x89PNG inside"
    assert view(filename="inside.png", subfolder="sub", type="output").status_code == 200
    refused = [
        view(filename="../secret.png"), view(filename=str(secret)), view(filename="..", subfolder="sub"),
        view(filename="secret.png", subfolder=".."), view(filename="secret.png", subfolder="../.."),
        view(filename="secret.png", subfolder=str(tmp_path)), view(filename="secret.png", subfolder="sub/../.."),
        view(filename="..\\secret.png"), view(filename="secret.png", subfolder="..\\.."),
        view(filename="link.png"), view(filename="secret.png", subfolder="linked"),
        view(filename="queue.db", subfolder="..", type="output"), view(filename="queue.db", type="input"),
        view(filename="token", type="../"), view(filename="../queue.db", type="temp"),
        view(filename="queue.db", subfolder="..", type="temp"), view(filename="missing.png"),
        comfy.client.get("/view?filename=%2e%2e%2fqueue.db"),
        comfy.client.get("/view?filename=inside.png&subfolder=sub%00"),
    ]
    assert [response.status_code for response in refused] == [400, 400, 400, 403, 403, 403, 403, 400, 403, 403,
                                                                403, 403, 400, 400, 400, 404, 404, 400, 403]
    assert all(b"secret" not in response.content for response in refused)


def test_comfy_routes_need_the_token_when_the_server_has_one(server: Server) -> None:
    assert httpx.post(f"{server.url}/prompt", json={"prompt": example_prompt()}).status_code == 401
    assert httpx.get(f"{server.url}/history").status_code == 401
    assert httpx.get(f"{server.url}/view", params={"filename": "x.png"}).status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"ws://{address(server)}/ws?clientId=a", timeout=10)
    ws = websocket.create_connection(f"ws://{address(server)}/ws?clientId=a", timeout=10,
                                     header=[f"Authorization: Bearer {server.token}"])
    assert json.loads(ws.recv()) == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                                "sid": "a"}}
    ws.close()


def test_pages_of_other_sites_can_neither_post_prompts_nor_listen(comfy: Server) -> None:
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    posted = comfy.client.post("/prompt", content=json.dumps({"prompt": example_prompt()}), headers=evil)
    assert posted.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"ws://{address(comfy)}/ws", timeout=10, origin="http://evil.example")
    allowed = websocket.create_connection(f"ws://{address(comfy)}/ws", timeout=10, origin="http://allowed.example")
    assert json.loads(allowed.recv())["type"] == "status"
    allowed.close()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(f"{comfy.url}/prompt", data=b"{}",
                                                      headers={"Origin": "http://evil.example"}))


def test_interrupt_stops_the_running_prompt_with_execution_interrupted(comfy: Server,
                                                                      connect: Callable[[], ComfyClient]) -> None:
    prompt = example_prompt(seed=21)
    prompt["3"]["inputs"]["steps"] = 400
    client = connect()
    prompt_id = client.queue_prompt(prompt)["prompt_id"]
    while True:
        message = json.loads(client.ws.recv())
        client.messages.append(message)
        if message["type"] == "progress":
            break
    assert comfy.client.post("/interrupt", json={}).json() == {"interrupted": [prompt_id]}
    client.wait_until_done(prompt_id)
    kinds = client.of(prompt_id)
    assert [kind for kind, _ in kinds[-2:]] == ["execution_interrupted", "executing"] and kinds[-1][1] is None
    interrupted = next(m["data"] for m in client.messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
    assert len([kind for kind, _ in kinds if kind == "progress"]) < 400
    assert client.get_history(prompt_id)[prompt_id]["status"]["status_str"] == "error"
