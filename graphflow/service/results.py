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
        outputs: dict[str, Any] = {}
        files: list[str] = []
        for name, value in result.outputs.items():
            if output_types.get(name) == IMAGE:
                images = [self.put(png, "png") for png in image_pngs(value)]
                files.extend(images)
                outputs[name] = {"type": IMAGE, "files": images}
            else:
                outputs[name] = {"type": output_types.get(name, "?"), "value": _plain(value)}
        written = [self.put(Path(path).read_bytes(), "png") for path in result.files if str(path).endswith(".png")]
        files.extend(written)
        summary = {"outputs": outputs, "files": list(dict.fromkeys(files)), "written": written,
                   "ran": list(result.ran), "cached": list(result.cached), "timings": dict(result.timings),
                   "seconds": result.seconds}
        return self.put(json.dumps(summary, indent=1, sort_keys=True).encode("utf-8"), "json")


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
