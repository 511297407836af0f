"""Content-addressed results: how a node's cache key is made, and the bounded LRU that holds them.

A key hashes the node type and version, every literal input, the key and output name of every
linked input, and the bytes of every file input. Node ids are not part of it, so identical
nodes share one result and a re-run repeats only what changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
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


def estimate_bytes(value: Any) -> int:
    """Approximate memory held by a result: exact for tensors and arrays, rough for the rest."""
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
    return sys.getsizeof(value)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class MemoryCache:
    """Node results by key, least recently used evicted first once `max_bytes` is exceeded.

    A result larger than the whole budget is not stored.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        size = estimate_bytes(outputs)
        self.discard(key)
        if size > self.max_bytes:
            return
        self._entries[key] = (outputs, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
            self.stats.evictions += 1

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
