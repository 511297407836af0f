"""Content-addressed results: how a node's cache key is made, and the bounded LRU that holds them.

A key hashes the node type and version, every literal input, the key and output name of every
linked input, and the bytes of every file input. Node ids are not part of it, so identical
nodes share one result and a re-run repeats only what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from graphflow.compiled import CompiledNode, Link


def key_parts(node: CompiledNode, upstream: Mapping[str, str], files: Mapping[str, str],
              options: Mapping[str, Any] = MappingProxyType({})) -> list[str]:
    """The printable parts a node's cache key is made of, in a fixed order.

    `upstream` maps node ids to their keys; `files` maps file input names to content digests;
    `options` are the engine's options, of which the node's `uses_options` count.
    """
    parts = [f"{node.node_type.type_name}@{node.node_type.version}"]
    parts.extend(f"option {name}={options.get(name)!r}" for name in node.node_type.uses_options)
    for name, value in node.inputs.items():
        if name in files:
            parts.append(f"{name}=file:{files[name]}")
        else:
            parts.append(f"{name}={_encode(value, upstream)}")
    return parts


def cache_key(parts: list[str]) -> str:
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


def file_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _encode(value: Any, upstream: Mapping[str, str]) -> str:
    if isinstance(value, Link):
        return f"<{upstream[value.node]}.{value.output}>"
    if isinstance(value, list):
        return "[" + ",".join(_encode(item, upstream) for item in value) + "]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)  # distinct per type: 1, 1.0, '1', True
    return json.dumps(value, sort_keys=True)


_SCALARS = frozenset({int, float, bool, type(None)})


def estimate_bytes(value: Any) -> int:
    """Approximate memory held by a result: exact for tensors and arrays, rough for the rest."""
    kind = type(value)
    if kind in _SCALARS:
        return sys.getsizeof(value)
    if kind is dict:
        return 64 + sum(map(estimate_bytes, value.values()))
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, (str, bytes)):
        return len(value) + 49
    if isinstance(value, Mapping):
        return 64 + sum(estimate_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return 56 + sum(estimate_bytes(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a ControlApplication holds its image
        return 64 + sum(estimate_bytes(getattr(value, field.name)) for field in dataclasses.fields(value))
    return sys.getsizeof(value)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class MemoryCache:
    """Node results by key, least recently used evicted first once `max_bytes` is exceeded.

    A result larger than the whole budget is not stored. Safe to share between threads: every
    operation holds one lock, so `bytes` is always exactly the sum of the sizes of what it holds.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        size = estimate_bytes(outputs)  # outside the lock: it may walk a large result
        with self._lock:
            self._discard(key)
            if size > self.max_bytes:
                return
            self._entries[key] = (outputs, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.stats.evictions += 1

    def discard(self, key: str) -> None:
        with self._lock:
            self._discard(key)

    def _discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def may_hold(self, key: str) -> bool:
        """Whether `key` is held, as a quick hint taken without the lock (one dict lookup, atomic in CPython): follow
        a True with `get`."""
        return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
