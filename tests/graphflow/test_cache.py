"""The result cache on its own: cache keys (what goes in, what stays out) and the byte-bounded LRU."""

from typing import Any

import numpy as np
import torch

from graphflow.cache import MemoryCache, cache_key, estimate_bytes, file_digest, key_parts
from graphflow.compiled import CompiledNode, Link
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, STRING
from nodes.primitives import Math


class Blur(Node):
    """Version 1 of a node type whose key must change when its version does."""

    inputs = (Input("radius", FLOAT, default=1.0),)
    outputs = (Output("value", FLOAT),)


class BlurV2(Blur):
    type_name = "Blur"
    version = "2.0.0"


class Reader(Node):
    """A node with a file input, whose bytes (not name) go into the key."""

    inputs = (Input("path", STRING, file=True), Input("mode", STRING, default="rgb"))
    outputs = (Output("text", STRING),)


def key_of(node_type: type[Node], inputs: dict[str, Any], upstream: dict[str, str] | None = None,
           files: dict[str, str] | None = None) -> str:
    node = CompiledNode("node", node_type, inputs)
    return cache_key(key_parts(node, upstream or {}, files or {}))


def math_inputs(a: Any, b: Any = 0.0, op: str = "add") -> dict[str, Any]:
    return {"a": a, "b": b, "op": op}


def test_key_parts_are_printable_and_list_type_version_then_inputs_in_declared_order() -> None:
    node = CompiledNode("sum", Math, math_inputs(Link("x", "value"), 2.5))

    parts = key_parts(node, {"x": "k1"}, {})

    assert parts == ["Math@1.0.0", "a=<k1.value>", "b=2.5", "op='add'"]


def test_key_does_not_depend_on_node_id() -> None:
    inputs = math_inputs(1.0, 2.0)

    first = cache_key(key_parts(CompiledNode("first", Math, inputs), {}, {}))
    second = cache_key(key_parts(CompiledNode("second", Math, dict(inputs)), {}, {}))

    assert first == second


def test_key_changes_with_any_literal_input() -> None:
    base = key_of(Math, math_inputs(1.0, 2.0, "add"))

    assert key_of(Math, math_inputs(1.5, 2.0, "add")) != base
    assert key_of(Math, math_inputs(1.0, 3.0, "add")) != base
    assert key_of(Math, math_inputs(1.0, 2.0, "mul")) != base
    assert key_of(Math, math_inputs(1.0, 2.0, "add")) == base


def test_key_tells_literal_types_apart() -> None:
    keys = {key_of(Math, math_inputs(value)) for value in (1, 1.0, "1", True, None)}

    assert len(keys) == 5


def test_key_of_linked_input_uses_source_key_and_output_name_not_source_id() -> None:
    via_x = key_of(Math, math_inputs(Link("x", "result")), {"x": "same"})
    via_y = key_of(Math, math_inputs(Link("y", "result")), {"y": "same"})
    other_source = key_of(Math, math_inputs(Link("x", "result")), {"x": "different"})
    other_output = key_of(Math, math_inputs(Link("x", "value")), {"x": "same"})

    assert via_x == via_y
    assert other_source != via_x
    assert other_output != via_x


def test_key_of_list_input_keeps_item_order() -> None:
    upstream = {"p": "kp", "q": "kq"}

    forward = key_of(Math, math_inputs([Link("p", "v"), Link("q", "v")]), upstream)
    backward = key_of(Math, math_inputs([Link("q", "v"), Link("p", "v")]), upstream)

    assert forward != backward


def test_key_changes_with_node_version() -> None:
    assert Blur.type_name == BlurV2.type_name == "Blur"
    assert key_parts(CompiledNode("b", BlurV2, {"radius": 1.0}), {}, {})[0] == "Blur@2.0.0"
    assert key_of(Blur, {"radius": 1.0}) != key_of(BlurV2, {"radius": 1.0})


def test_key_of_file_input_uses_content_digest_not_file_name() -> None:
    digest = file_digest(b"pixels")

    a = key_of(Reader, {"path": "a.png", "mode": "rgb"}, files={"path": digest})
    b = key_of(Reader, {"path": "b.png", "mode": "rgb"}, files={"path": digest})
    changed = key_of(Reader, {"path": "a.png", "mode": "rgb"}, files={"path": file_digest(b"other pixels")})

    assert a == b
    assert changed != a
    assert key_parts(CompiledNode("r", Reader, {"path": "a.png", "mode": "rgb"}), {}, {"path": digest})[1] \
        == f"path=file:{digest}"


def test_cache_key_and_file_digest_are_stable_hex_digests() -> None:
    assert cache_key(["Math@1.0.0", "a=1.0"]) == cache_key(["Math@1.0.0", "a=1.0"])
    assert cache_key(["Math@1.0.0", "a=1.0"]) != cache_key(["Math@1.0.0", "a=2.0"])
    assert len(cache_key(["x"])) == 32 and int(cache_key(["x"]), 16) >= 0
    assert file_digest(b"abc") == file_digest(b"abc") != file_digest(b"abd")


def test_estimate_bytes_is_exact_for_tensors_and_arrays() -> None:
    assert estimate_bytes(torch.zeros(2, 8, 8, 3)) == 2 * 8 * 8 * 3 * 4
    assert estimate_bytes(torch.zeros(4, 4, dtype=torch.float16)) == 32
    assert estimate_bytes(np.zeros((3, 5), dtype=np.uint8)) == 15
    assert estimate_bytes({"image": torch.zeros(16), "mask": torch.zeros(8)}) == 64 + 64 + 32


def tensor_result(elements: int) -> dict[str, Any]:
    """A result whose estimated size is 64 + 4 * elements bytes."""
    return {"value": torch.zeros(elements)}


def test_memory_cache_counts_bytes_of_what_it_holds() -> None:
    cache = MemoryCache(10_000)

    cache.put("a", tensor_result(100))
    cache.put("b", tensor_result(50))

    assert cache.bytes == (64 + 400) + (64 + 200)
    assert len(cache) == 2 and "a" in cache and "b" in cache
    cache.discard("a")
    assert cache.bytes == 64 + 200 and "a" not in cache
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_memory_cache_put_of_existing_key_replaces_without_double_counting() -> None:
    cache = MemoryCache(10_000)
    cache.put("a", tensor_result(100))

    replacement = tensor_result(10)
    cache.put("a", replacement)

    assert len(cache) == 1
    assert cache.bytes == 64 + 40
    assert cache.get("a") is replacement


def test_memory_cache_returns_the_stored_result_and_counts_hits_and_misses() -> None:
    cache = MemoryCache(10_000)
    result = tensor_result(4)
    cache.put("a", result)

    assert cache.get("a") is result
    assert cache.get("a") is result
    assert cache.get("missing") is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 1, 0)


def test_memory_cache_evicts_least_recently_put_first_when_over_budget() -> None:
    size = estimate_bytes(tensor_result(100))
    cache = MemoryCache(2 * size)
    cache.put("a", tensor_result(100))
    cache.put("b", tensor_result(100))

    cache.put("c", tensor_result(100))

    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.bytes == 2 * size <= cache.max_bytes
    assert cache.stats.evictions == 1


def test_memory_cache_get_makes_an_entry_most_recently_used() -> None:
    size = estimate_bytes(tensor_result(100))
    cache = MemoryCache(2 * size)
    cache.put("a", tensor_result(100))
    cache.put("b", tensor_result(100))

    cache.get("a")
    cache.put("c", tensor_result(100))

    assert "a" in cache and "b" not in cache and "c" in cache


def test_memory_cache_evicts_as_many_entries_as_a_large_result_needs() -> None:
    small = estimate_bytes(tensor_result(10))
    cache = MemoryCache(4 * small)
    for key in "abcd":
        cache.put(key, tensor_result(10))

    cache.put("big", tensor_result(50))  # 264 bytes: needs the room of three 104-byte entries

    assert [key for key in "abcd" if key in cache] == ["d"]
    assert "big" in cache
    assert cache.bytes == small + estimate_bytes(tensor_result(50)) <= cache.max_bytes
    assert cache.stats.evictions == 3


def test_memory_cache_does_not_store_a_result_larger_than_its_budget_and_keeps_the_rest() -> None:
    cache = MemoryCache(1_000)
    cache.put("small", tensor_result(10))

    cache.put("huge", tensor_result(1_000))

    assert "huge" not in cache
    assert cache.get("huge") is None
    assert "small" in cache and cache.bytes == 64 + 40
    assert cache.stats.evictions == 0


def test_memory_cache_with_zero_budget_stores_nothing() -> None:
    cache = MemoryCache(0)

    cache.put("a", tensor_result(1))

    assert len(cache) == 0 and cache.bytes == 0


def test_engine_options_a_node_uses_are_part_of_its_key() -> None:
    class Precise(Node):
        """A node whose result depends on the dtype the engine runs in."""

        uses_options = ("dtype",)
        inputs = (Input("x", FLOAT, default=1.0),)
        outputs = (Output("y", FLOAT),)

    node = CompiledNode("p", Precise, {"x": 1.0})
    fp16 = key_parts(node, {}, {}, {"dtype": "fp16", "device": "cuda"})
    assert fp16[1] == "option dtype='fp16'"
    assert cache_key(fp16) != cache_key(key_parts(node, {}, {}, {"dtype": "fp32", "device": "cuda"}))
    assert cache_key(fp16) == cache_key(key_parts(node, {}, {}, {"dtype": "fp16", "device": "cpu"}))
