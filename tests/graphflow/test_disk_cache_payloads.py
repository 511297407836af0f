"""LATENT and CONDITIONING values are frozen dataclasses the disk cache stores field by field, never pickled;
a file can name only registered payload classes, with exactly their fields."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from graphflow.disk_cache import DiskCache
from graphflow.disk_format import NotStorable, encode_entry, payload
from nodes.conditioning import Conditioning
from nodes.latents import Latent
from tests.graphflow.test_disk_cache_hostile import KEY, forged, leaf, outputs


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b and type(a) is type(b)


@pytest.fixture
def cache(tmp_path: Path) -> DiskCache:
    return DiskCache(tmp_path / "cache")


def test_latents_and_conditioning_come_back_as_the_same_dataclasses(cache: DiskCache) -> None:
    latent = Latent(torch.rand(2, 4, 8, 8), "sdxl", 8, False, torch.rand(2, 8, 8, 8), 0.13025,
                    torch.rand(2, 64, 64), torch.rand(2, 8, 8, 8).half())
    negative = Conditioning("sdxl", torch.zeros(1, 77, 64).half(), torch.zeros(1, 32).half())
    conditioning = Conditioning("sdxl", torch.rand(1, 77, 64).half(), torch.rand(1, 32).half(), negative)
    value = {"latent": latent, "conditioning": conditioning, "empty": Latent(torch.zeros(1, 4, 2, 3), empty=True)}

    assert cache.put(KEY, value)
    again = cache.get(KEY)
    assert again is not None and all(same(again[name], value[name]) for name in value)
    assert again["empty"].size == (24, 16) and again["conditioning"].default_negative.pooled.dtype == torch.float16


def test_a_dataclass_that_is_not_registered_is_not_stored(cache: DiskCache) -> None:
    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        x: int

    with pytest.raises(NotStorable):
        encode_entry(KEY, {"value": Unregistered(1)})
    assert not cache.put(KEY, {"value": Unregistered(1)})


def test_only_frozen_dataclasses_can_be_registered() -> None:
    class Plain:
        pass

    @dataclasses.dataclass
    class Mutable:
        x: int

    for cls in (Plain, Mutable):
        with pytest.raises(TypeError, match="not a frozen dataclass"):
            payload(cls)


HOSTILE = {
    "unregistered class": {"payload": "os.system", "fields": {}},
    "a registered class's module path elsewhere": {"payload": "nodes.latents.Latentx", "fields": {}},
    "missing fields": {"payload": "nodes.latents.Latent", "fields": {"samples": leaf(shape=(1, 4, 1, 1))}},
    "extra field": {"payload": "nodes.conditioning.Conditioning",
                    "fields": {"family": "sd15", "embeds": leaf(shape=(1, 4, 1, 1)), "pooled": None,
                               "default_negative": None, "__class__": "x"}},
    "fields not an object": {"payload": "nodes.latents.Latent", "fields": ["x"]},
    "more keys": {"payload": "nodes.latents.Latent", "fields": {}, "module": "os"},
}


@pytest.mark.parametrize("manifest", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_forged_payload_is_a_miss_that_is_removed(cache: DiskCache, manifest: dict) -> None:
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).write_bytes(forged(outputs(value=manifest), {"0": torch.zeros(1, 4, 1, 1)}))
    assert cache.get(KEY) is None
    assert not os.path.lexists(cache.path(KEY))
