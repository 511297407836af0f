"""The results of the service's jobs, stored by content: `DATA/results/<sha256>.png` and `<sha256>.json`.

A job's row references its summary (the JSON: outputs, files, ran and cached nodes, timings); the summary names
the PNGs. Identical images are stored once, and a file, once written (atomically), never changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphflow.atomic import atomic_write

_NAME = re.compile(r"[0-9a-f]{64}\.(png|json)")
IMAGE = "IMAGE"
_SUMMARIES_KEPT = 4096  # summaries held in memory for job listings


class ResultStore:
    """PNG and JSON files named by the sha256 of their bytes, under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._summaries: dict[str, dict[str, Any]] = {}  # name -> summary, oldest first

    def put(self, data: bytes, suffix: str) -> str:
        """Store `data` (once per content); its name, `<sha256>.<suffix>`."""
        return store_by_content(self.root, data, suffix)

    def path(self, name: str) -> Path | None:
        """The file of a stored name; None for a name that is not one (no path from a client reaches further)."""
        if not _NAME.fullmatch(name):
            return None
        path = self.root / name
        return path if path.is_file() else None

    def summary(self, name: str) -> dict[str, Any] | None:
        """A stored summary, read once: a file named by its content never changes (treat it as read-only)."""
        summary = self._summaries.get(name)
        if summary is None:
            path = self.path(name)
            if path is None:
                return None
            summary = json.loads(path.read_text("utf-8"))
            if len(self._summaries) >= _SUMMARIES_KEPT:
                self._summaries.pop(next(iter(self._summaries)))
            self._summaries[name] = summary
        return summary

    def store_run(self, result: Any, output_types: Mapping[str, str]) -> str:
        """Store a RunResult: each IMAGE output as 8-bit PNGs, each PNG file output nodes wrote, and the summary;
        the summary's name."""
        return self.store_portable(portable_run(result, output_types))

    def store_portable(self, portable: Mapping[str, Any]) -> str:
        """Store what `portable_run` made of a run (here, or on a Ray actor); the summary's name."""
        outputs: dict[str, Any] = {}
        files: list[str] = []
        for name, output in portable["outputs"].items():
            if "pngs" in output:
                images = [self.put(png, "png") for png in output["pngs"]]
                files.extend(images)
                outputs[name] = {"type": output["type"], "files": images}
            else:
                outputs[name] = output
        written = [self.put(data, "png") for data in portable["written"]]
        files.extend(written)
        summary = {"outputs": outputs, "files": list(dict.fromkeys(files)), "written": written,
                   "ran": list(portable["ran"]), "cached": list(portable["cached"]),
                   "timings": dict(portable["timings"]), "seconds": portable["seconds"]}
        return self.put(json.dumps(summary, indent=1, sort_keys=True).encode("utf-8"), "json")


def portable_run(result: Any, output_types: Mapping[str, str]) -> dict[str, Any]:
    """A RunResult as plain data and PNG bytes (never tensors): what a Ray actor sends back for the store."""
    outputs: dict[str, Any] = {}
    for name, value in result.outputs.items():
        kind = output_types.get(name, "?")
        outputs[name] = {"type": IMAGE, "pngs": image_pngs(value)} if kind == IMAGE \
            else {"type": kind, "value": _plain(value)}
    return {"outputs": outputs,
            "written": [Path(path).read_bytes() for path in result.files if str(path).endswith(".png")],
            "ran": list(result.ran), "cached": list(result.cached), "timings": dict(result.timings),
            "seconds": result.seconds}


def store_by_content(folder: Path, data: bytes, suffix: str) -> str:
    """Write `data` as `folder/<sha256>.<suffix>` unless that file is there already; its name."""
    name = f"{hashlib.sha256(data).hexdigest()}.{suffix}"
    path = folder / name
    if not path.exists():
        atomic_write(path, data, exclusive=True)  # False when a racing writer placed the same bytes first
    return name


def image_pngs(batch: Any) -> list[bytes]:
    """An IMAGE value (float tensor [B, H, W, 3] in 0..1) as one 8-bit PNG per image."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(batch.detach().float().mul(255).round().clamp(0, 255).to("cpu").numpy(), dtype=np.uint8)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def _plain(value: Any) -> Any:
    """A JSON value for an output that is one, else a short description (a model handle, a tensor)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, (bool, int, float, str)) for item in value):
        return list(value)
    shape = getattr(value, "shape", None)
    text = f"{type(value).__name__} {list(shape)}" if shape is not None else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
