"""Fuzzing the disk cache: any storable result comes back exactly; a damaged entry is a miss, never an error."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphflow.disk_cache import DiskCache
from tests.graphflow.test_disk_cache import same

KEY = "ab" * 16
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool]

tensors = st.builds(lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                                * 50).to(dtype),
                    st.lists(st.integers(0, 4), max_size=3), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
arrays = st.builds(lambda values, dtype: np.array(values, dtype=np.int64).astype(dtype),
                   st.lists(st.integers(-100, 100), max_size=6), st.sampled_from([np.int16, np.float64, np.uint8]))
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars | tensors | arrays,
                      lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=12)
SETTINGS = settings(max_examples=40, deadline=None, database=None)  # no example database in the work tree


@SETTINGS
@given(outputs=st.dictionaries(st.text(max_size=6), values, max_size=4))
def test_any_storable_result_comes_back_exactly(outputs: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        cache = DiskCache(directory)
        assert cache.put(KEY, outputs)
        assert same(cache.get(KEY), outputs)


@SETTINGS
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(["flip", "drop", "insert"]),
                                st.integers(0, 255)), min_size=1, max_size=4))
def test_a_damaged_entry_is_a_miss_or_still_means_the_same(edits: list[tuple[float, str, int]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        cache = DiskCache(directory)
        outputs = {"image": torch.rand(2, 3, 4), "half": torch.rand(3).bfloat16(), "meta": {"n": 1, "s": ["x"]}}
        assert cache.put(KEY, outputs)
        data = bytearray(cache.path(KEY).read_bytes())
        for where, edit, byte in edits:
            at = int(where * len(data))
            if edit == "flip":
                data[at] ^= byte or 1
            elif edit == "drop":
                del data[at]
            else:
                data.insert(at, byte)
        Path(cache.path(KEY)).write_bytes(bytes(data))
        got = cache.get(KEY)  # a flip that cancels out, or turns header padding into a tab, changes nothing
        assert (got is None and not cache.path(KEY).exists()) or same(got, outputs)
