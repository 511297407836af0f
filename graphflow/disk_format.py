"""How one node result is one safetensors file: tensors and arrays in their own dtypes, the rest in a manifest.

The file's `__metadata__` holds the format, the key it was written for, graphflow's JSON manifest
(dicts, lists, tuples, JSON scalars, registered payload dataclasses, and which leaves are tensors,
numpy arrays or numpy scalars, with their dtypes and shapes) and a digest of all of it. Only exact
types are written, and reading checks everything it returns against the manifest and the digest: a
file that is not exactly what was written for that key is `Unreadable`. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT = "2"  # format 1 was one .npz archive per key: never read now, only counted and evicted
_MAX_DEPTH = 100  # real outputs nest a few levels; deeper is refused on put and a forgery on get
# stored as themselves (no float32 round trip); the names are the same in torch and numpy
_TENSOR_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                            "uint8", "uint16", "uint32", "uint64", "bool", "complex64"})
_NUMPY_DTYPES = _TENSOR_DTYPES - {"bfloat16"}  # numpy has none of its own
_SCALARS = (bool, int, float, str)


_PAYLOADS: dict[str, type] = {}  # registered name -> frozen dataclass whose instances may be stored


def payload(cls: type) -> type:
    """Class decorator: instances of the frozen dataclass `cls` may be stored, field by field, as
    `{"payload": "module.Name", "fields": {...}}`. Reading builds only registered classes, from their fields:
    nothing in a file names code to run."""
    import dataclasses

    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__qualname__} is not a frozen dataclass; only those are stored as payloads")
    _PAYLOADS[f"{cls.__module__}.{cls.__qualname__}"] = cls  # a module imported again replaces its class
    return cls


class NotStorable(Exception):
    """A value that has no exact, pickle-free form on disk."""


class Unreadable(Exception):
    """An entry that is not one this cache wrote for this key."""


def encode_entry(key: str, outputs: dict[str, Any]) -> bytes:
    """The file for `outputs` under `key`; NotStorable when some value has no exact form."""
    import safetensors.torch

    if type(outputs) is not dict:
        raise NotStorable(f"outputs are a {type(outputs).__name__}, not a dict")
    tensors: dict[str, Any] = {}
    manifest = json.dumps(_encode(outputs, tensors, 0))
    metadata = {"format": FORMAT, "key": key, "manifest": manifest, "digest": _digest(key, manifest, tensors)}
    return safetensors.torch.save(tensors, metadata)


def decode_entry(key: str, data: bytes) -> dict[str, Any]:
    """The outputs stored in `data` for `key`; Unreadable unless the file is exactly what was written for it."""
    import safetensors.torch

    size = int.from_bytes(data[:8], "little")  # the header; safetensors.torch.load returns no metadata
    if len(data) < 8 or size > len(data) - 8:
        raise Unreadable(f"{len(data)} bytes, too short for a safetensors file")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise Unreadable(f"not graphflow's format {FORMAT}")
    if metadata.get("key") != key:
        raise Unreadable(f"the entry of key {metadata.get('key')!r}")
    manifest = metadata.get("manifest")
    tensors = safetensors.torch.load(data)
    if not isinstance(manifest, str) or metadata.get("digest") != _digest(key, manifest, tensors):
        raise Unreadable("its content does not match its digest")
    used: set[str] = set()
    outputs = _decode(json.loads(manifest), tensors, used, 0)
    if type(outputs) is not dict or used != tensors.keys():
        raise Unreadable("its manifest does not describe its tensors")
    return outputs


def _digest(key: str, manifest: str, tensors: dict[str, Any]) -> str:
    """A hash of everything `get` returns: the key, the manifest, and each tensor's name, dtype, shape and bytes."""
    import torch

    digest = hashlib.sha256()  # faster than blake2b where CPUs have SHA instructions
    parts: list[Any] = [FORMAT.encode(), key.encode(), manifest.encode()]
    for name in sorted(tensors):
        tensor = tensors[name]
        data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""  # empty ones may have stride 0
        parts += [name.encode(), f"{_dtype_name(tensor.dtype)}{list(tensor.shape)}".encode(), data]
    for part in parts:
        digest.update(memoryview(part).nbytes.to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")  # numpy's non-native byte orders read '>i2', which no table lists


def _encode(value: Any, tensors: dict[str, Any], depth: int) -> Any:
    """The manifest entry for `value`, moving every tensor and array into `tensors` (exact types only)."""
    if depth > _MAX_DEPTH:
        raise NotStorable(f"nested deeper than {_MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind in _SCALARS:
        return value
    if kind is list or kind is tuple:
        return {kind.__name__: [_encode(item, tensors, depth + 1) for item in value]}
    if kind is dict:
        if not all(type(name) is str for name in value):
            raise NotStorable("a dict with keys that are not strings")
        return {"dict": {name: _encode(item, tensors, depth + 1) for name, item in value.items()}}
    name = f"{kind.__module__}.{kind.__qualname__}"
    if _PAYLOADS.get(name) is kind:
        import dataclasses

        fields = {field.name: _encode(getattr(value, field.name), tensors, depth + 1)
                  for field in dataclasses.fields(value) if field.init}
        return {"payload": name, "fields": fields}
    leaf, tensor = _as_tensor(value, tensors)
    name = str(len(tensors))
    tensors[name] = tensor
    return {leaf: name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def _as_tensor(value: Any, others: dict[str, Any]) -> tuple[str, Any]:
    """The leaf kind of a tensor or numpy value, and a contiguous CPU tensor of it sharing no storage with `others`."""
    import torch

    module, name = type(value).__module__, type(value).__name__
    if module == "torch" and name == "Tensor":
        if value.layout != torch.strided or value.is_quantized or _dtype_name(value.dtype) not in _TENSOR_DTYPES:
            raise NotStorable(f"a {value.layout} tensor of {value.dtype}")
        kind, tensor = "tensor", value.detach().to("cpu").resolve_conj().resolve_neg()
    elif module == "numpy" and _dtype_name(getattr(value, "dtype", None)) in _NUMPY_DTYPES:
        import numpy as np

        kind = "ndarray" if type(value) is np.ndarray else "scalar" if isinstance(value, np.generic) else None
        if kind is None:
            raise NotStorable(f"a {module}.{name}")
        array = np.asarray(value, order="C")  # torch takes no negative strides
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    else:
        raise NotStorable(f"a {module}.{name}")
    storage = tensor.untyped_storage().data_ptr()
    if not tensor.is_contiguous() or any(storage == other.untyped_storage().data_ptr() for other in others.values()):
        # safetensors refuses both; a copy of its own (cheaper than clone) stores what the tensor shows
        tensor = torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)
    return kind, tensor


def _decode(node: Any, tensors: dict[str, Any], used: set[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise Unreadable(f"its manifest nests deeper than {_MAX_DEPTH} levels")
    if node is None or type(node) in _SCALARS:
        return node
    kind = next(iter(node), None) if type(node) is dict else None
    body = node.get(kind) if kind is not None else None
    if kind in ("list", "tuple") and len(node) == 1 and type(body) is list:
        items = [_decode(item, tensors, used, depth + 1) for item in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and len(node) == 1 and type(body) is dict:
        return {name: _decode(item, tensors, used, depth + 1) for name, item in body.items()}
    if kind in ("tensor", "ndarray", "scalar") and node.keys() == {kind, "dtype", "shape"}:
        return _decode_leaf(kind, node, tensors, used)
    if kind == "payload" and node.keys() == {"payload", "fields"} and type(node["fields"]) is dict:
        return _decode_payload(body, node["fields"], tensors, used, depth)
    raise Unreadable(f"its manifest holds an unknown entry {str(node)[:80]!r}")


def _decode_payload(name: Any, fields: dict[str, Any], tensors: dict[str, Any], used: set[str], depth: int) -> Any:
    import dataclasses

    cls = _PAYLOADS.get(name) if type(name) is str else None
    if cls is None:
        raise Unreadable(f"its manifest names payload {str(name)[:80]!r}, which is not registered")
    expected = {field.name for field in dataclasses.fields(cls) if field.init}
    if fields.keys() != expected:
        raise Unreadable(f"payload {name} has fields {sorted(fields)[:10]}, not {sorted(expected)}")
    try:
        return cls(**{field: _decode(item, tensors, used, depth + 1) for field, item in fields.items()})
    except (TypeError, ValueError) as error:  # the class's own checks refused the values
        raise Unreadable(f"payload {name} refused its fields: {error}") from error


def _decode_leaf(kind: str, node: dict[str, Any], tensors: dict[str, Any], used: set[str]) -> Any:
    name = node[kind]
    if type(name) is not str or name not in tensors or name in used:
        raise Unreadable(f"its manifest names tensor {name!r}, which is missing or named twice")
    used.add(name)
    value = tensors[name] if kind == "tensor" else tensors[name].numpy()
    allowed = _TENSOR_DTYPES if kind == "tensor" else _NUMPY_DTYPES
    found = _dtype_name(value.dtype)
    if found not in allowed or [found, list(value.shape)] != [node["dtype"], node["shape"]]:
        raise Unreadable(f"tensor {name!r} is {found} {list(value.shape)}; the manifest says "
                          f"{node['dtype']} {node['shape']}")
    return value[()] if kind == "scalar" else value
