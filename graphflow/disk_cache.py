"""Results kept across processes: the on-disk tier for nodes whose results are expensive.

Node types opt in with `disk_cache = True` (preprocessed maps, encodings, latents). A result is
stored as one `.npz` file per cache key: arrays and tensors as arrays, everything else as a JSON
manifest. Nothing is pickled, so reading a cache directory never runs code. Values that are
neither arrays, tensors nor JSON data (model handles, for instance) are simply not stored.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from graphflow.atomic import atomic_write

_FORMAT = 1


class _NotStorable(Exception):
    pass


class DiskCache:
    """A directory of results by cache key, least recently used removed once `max_bytes` is exceeded."""

    def __init__(self, directory: str | Path, max_bytes: int = 10 << 30) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result, or None when absent or unreadable (an unreadable file is removed)."""
        import numpy as np

        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as archive:
                manifest = json.loads(archive["manifest"].tobytes())
                if manifest.get("format") != _FORMAT:
                    return None
                outputs = _decode(manifest["outputs"], archive)
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        return outputs

    def put(self, key: str, outputs: dict[str, Any]) -> bool:
        """Store a result; False when some value cannot be stored without pickling."""
        import numpy as np

        arrays: dict[str, Any] = {}
        try:
            manifest = {"format": _FORMAT, "outputs": _encode(outputs, arrays)}
        except _NotStorable:
            return False
        arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        try:
            atomic_write(self._path(key), buffer.getvalue())
            self._evict()
        except OSError:  # a full disk or an unusable directory costs the cached copy, never the run
            return False
        return True

    def _evict(self) -> None:
        files = []
        for entry in self.directory.glob("*/*.npz"):
            with contextlib.suppress(FileNotFoundError):  # another process may evict at the same time
                status = entry.stat()
                files.append((status.st_mtime_ns, status.st_size, entry))
        total = sum(size for _, size, _ in files)
        for _, size, entry in sorted(files, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            entry.unlink(missing_ok=True)
            total -= size


def _encode(value: Any, arrays: dict[str, Any]) -> Any:
    """JSON for `value`, moving every array and tensor into `arrays`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(item, arrays) for item in value]}
    if isinstance(value, dict) and all(isinstance(name, str) for name in value):
        return {"dict": {name: _encode(item, arrays) for name, item in value.items()}}
    name = f"a{len(arrays)}"
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype != object:
        arrays[name] = value
        return {"array": name}
    if type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        import torch

        # numpy has no bfloat16: store such tensors as float32 (exact) and cast back on load
        exact = value.detach().cpu()
        arrays[name] = (exact.float() if exact.dtype == torch.bfloat16 else exact).numpy()
        return {"tensor": name, "dtype": str(exact.dtype).removeprefix("torch.")}
    raise _NotStorable(type(value).__name__)


def _decode(value: Any, archive: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if "list" in value:
        return [_decode(item, archive) for item in value["list"]]
    if "dict" in value:
        return {name: _decode(item, archive) for name, item in value["dict"].items()}
    if "array" in value:
        return archive[value["array"]]
    import torch

    return torch.from_numpy(archive[value["tensor"]]).to(getattr(torch, value["dtype"]))
