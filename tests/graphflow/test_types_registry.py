"""Value types that node packs register: named like the built-ins, declared once, and carried by links through
validation, the schema, the builder, the engine and the cache key exactly like the built-in non-scalar types."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from graphflow import Engine, Graph, Input, Node, Output, ValidationError, types
from graphflow.cache import key_parts
from graphflow.cli import main
from graphflow.errors import Code, GraphflowError
from graphflow.registry import NodeRegistry, default_registry
from graphflow.schema import TYPE_KEYWORD, document_schema
from graphflow.types import TypeRegistrationError
from graphflow.validation import compile_document
from nodes import Int, Math
from tests.graphflow.palette_plugin import PALETTE, RUNS, MakePalette, MergePalettes, Palette, PaletteSize

PLUGIN = "tests.graphflow.palette_plugin"

DOCUMENT: dict[str, Any] = {
    "graphflow": 1,
    "name": "palettes",
    "params": {"seed": {"type": "INT", "default": 3}},
    "nodes": {
        "warm": {"type": "MakePalette", "inputs": {"count": 3, "seed": {"param": "seed"}}},
        "cool": {"type": "MakePalette", "inputs": {"count": 2, "seed": 9}},
        "both": {"type": "MergePalettes",
                 "inputs": {"palettes": [{"from": "warm.palette"}, {"from": "cool.palette"}]}},
        "size": {"type": "PaletteSize",
                 "inputs": {"palette": {"from": "both.palette"}, "extra": {"from": "cool.palette"}}},
    },
    "outputs": {"count": "size.count", "palette": "both.palette"},
}


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return default_registry([PLUGIN])


def fresh_engine(registry: NodeRegistry, tmp_path: Path) -> Engine:
    return Engine(registry, input_dirs=[tmp_path], output_dir=tmp_path / "out")


def runs_during(action: Any) -> dict[str, int]:
    """Runs per node type of the palette nodes while `action()` ran."""
    before = dict(RUNS)
    action()
    return {name: count - before.get(name, 0) for name, count in RUNS.items() if count != before.get(name, 0)}


def with_input(node: str, name: str, value: Any) -> dict[str, Any]:
    document = json.loads(json.dumps(DOCUMENT))
    document["nodes"][node]["inputs"][name] = value
    return document


# registering


def test_register_returns_the_name_and_the_type_is_known_with_its_description() -> None:
    assert PALETTE == "PALETTE"
    assert types.is_known("PALETTE")
    assert types.known_types()["PALETTE"] == types.ValueType("PALETTE", "a few RGB colours, to recolour images with")
    assert list(types.known_types()) == sorted(types.known_types())
    assert types.known_types().keys() >= types.BUILTIN_TYPES
    assert not types.is_known("NEVER_REGISTERED") and not types.is_known(["IMAGE"]) and not types.is_known(None)


def test_registering_again_with_the_same_settings_is_harmless() -> None:
    assert types.register("PALETTE", "a few RGB colours, to recolour images with") == "PALETTE"
    assert types.register("REGISTRY_TEST_TWICE") == types.register("REGISTRY_TEST_TWICE", "") == "REGISTRY_TEST_TWICE"


def test_registering_a_name_again_with_another_description_is_an_error() -> None:
    assert issubclass(TypeRegistrationError, GraphflowError) and issubclass(TypeRegistrationError, ValueError)
    with pytest.raises(TypeRegistrationError, match="PALETTE is already registered as 'a few RGB colours"):
        types.register("PALETTE", "a colour scheme")
    assert types.known_types()["PALETTE"].description == "a few RGB colours, to recolour images with"


@pytest.mark.parametrize("name", ["IMAGE", "INT", "LATENT", "PATHS"])
def test_builtin_names_cannot_be_registered(name: str) -> None:
    with pytest.raises(TypeRegistrationError, match=f"{name} is a built-in type"):
        types.register(name, types.known_types()[name].description)


@pytest.mark.parametrize("name", ["lora", "Lora", "1LORA", "_LORA", "LORA-X", "LO RA", "LORA.X", "", "LORA\n",
                                  " LORA", "L\u00d6RA", "\uff2c\uff2f\uff32\uff21", "L" * 65, 3, None, b"LORA",
                                  ("LORA",)])
def test_odd_names_are_refused(name: Any) -> None:
    with pytest.raises(TypeRegistrationError, match="must be upper case letters, digits and '_'"):
        types.register(name)
    assert not types.is_known(name)


def test_names_like_the_builtins_are_accepted() -> None:
    # shapes of real names, spelt so that no node pack registers them first (nodes/ registers CLIP_VISION)
    for name in ("REGISTRY_TEST_VISION", "Q9", "Z", "RT_ADAPTER_V2", "Q" * 64):
        assert types.register(name) == name and types.is_known(name)


def test_a_description_that_is_not_text_is_refused() -> None:
    with pytest.raises(TypeRegistrationError, match="must be text"):
        types.register("REGISTRY_TEST_DESCRIBED", 3)  # type: ignore[arg-type]
    assert not types.is_known("REGISTRY_TEST_DESCRIBED")


def test_registration_from_many_threads_at_once_keeps_every_type_and_one_declaration() -> None:
    start = threading.Barrier(16)
    errors: list[BaseException] = []

    def register(index: int) -> None:
        start.wait()
        try:
            for round in range(50):
                types.register("REGISTRY_TEST_SHARED", "shared by every thread")
                types.register(f"REGISTRY_TEST_T{index}_{round}")
                assert types.is_known("REGISTRY_TEST_SHARED")
        except BaseException as error:  # collected: an assertion in a thread would go unseen
            errors.append(error)

    threads = [threading.Thread(target=register, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    known = types.known_types()
    assert all(f"REGISTRY_TEST_T{index}_{round}" in known for index in range(16) for round in range(50))
    assert known["REGISTRY_TEST_SHARED"] == types.ValueType("REGISTRY_TEST_SHARED", "shared by every thread")


def test_conflicting_registrations_from_two_threads_let_exactly_one_win() -> None:
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def register(description: str) -> None:
        start.wait()
        try:
            types.register("REGISTRY_TEST_RACE", description)
            outcomes.append(description)
        except TypeRegistrationError:
            outcomes.append("refused")

    threads = [threading.Thread(target=register, args=(description,)) for description in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(outcomes) == 2 and outcomes.count("refused") == 1
    assert types.known_types()["REGISTRY_TEST_RACE"].description == next(o for o in outcomes if o != "refused")


# declaring nodes


def test_a_node_with_an_unregistered_type_fails_when_declared() -> None:
    with pytest.raises(TypeError) as raised:
        class UsesLora(Node):
            inputs = (Input("lora", "REGISTRY_TEST_UNREGISTERED_LORA"),)
            outputs = (Output("model", types.MODEL),)

            def run(self, ctx: Any, lora: Any) -> dict[str, Any]:
                return {"model": lora}

    message = str(raised.value)
    assert "UsesLora" in message and "input 'lora'" in message
    assert "unknown type 'REGISTRY_TEST_UNREGISTERED_LORA'" in message
    assert "graphflow.types.register('REGISTRY_TEST_UNREGISTERED_LORA'" in message


def test_an_unknown_type_names_the_closest_known_one() -> None:
    with pytest.raises(TypeError, match=r"output 'image' has unknown type 'IMAGES'; did you mean 'IMAGE'\?"):
        class Typo(Node):
            outputs = (Output("image", "IMAGES"),)

            def run(self, ctx: Any) -> dict[str, Any]:
                return {}


def test_a_lower_case_type_names_the_upper_case_one() -> None:
    with pytest.raises(TypeError, match=r"input 'palette' has unknown type 'palette'; did you mean 'PALETTE'\?"):
        class LowerCase(Node):
            inputs = (Input("palette", "palette"),)

            def run(self, ctx: Any, palette: Any) -> dict[str, Any]:
                return {}


def test_a_type_that_is_not_a_name_is_refused_when_declared() -> None:
    with pytest.raises(TypeError, match=r"input 'image' has type <class 'str'>, which is not a type name"):
        class NotAName(Node):
            inputs = (Input("image", str),)  # type: ignore[arg-type]

            def run(self, ctx: Any, image: Any) -> dict[str, Any]:
                return {}


def test_a_node_may_use_a_type_registered_after_import_of_graphflow() -> None:
    late = types.register("REGISTRY_TEST_LATE", "registered just before its node")

    class UsesLate(Node):
        inputs = (Input("value", late, optional=True),)
        outputs = (Output("value", late),)

        def run(self, ctx: Any, value: Any) -> dict[str, Any]:
            return {"value": value}

    assert UsesLate.input_map["value"].type == "REGISTRY_TEST_LATE"
    assert not UsesLate.input_map["value"].accepts_literal  # registered types are never scalars


def test_inputs_of_registered_types_may_only_default_to_none() -> None:
    with pytest.raises(TypeError, match=r"inputs \['palette'\] take values only through links"):
        class DefaultPalette(Node):
            inputs = (Input("palette", PALETTE, default="warm"),)

            def run(self, ctx: Any, palette: Any) -> dict[str, Any]:
                return {}


# documents


def colors(count: int, seed: int) -> tuple[tuple[int, int, int], ...]:
    rng = random.Random(seed)
    return tuple((rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(count))


def test_a_document_passing_a_registered_type_runs_end_to_end(registry: NodeRegistry, tmp_path: Path) -> None:
    engine = fresh_engine(registry, tmp_path)
    results: list[Any] = []

    ran = runs_during(lambda: results.append(engine.run(DOCUMENT)))

    result = results[0]
    assert result.outputs == {"count": 3 + 2 + 2, "palette": Palette(colors(3, 3) + colors(2, 9))}
    assert sorted(result.ran) == ["both", "cool", "size", "warm"] and result.cached == []
    assert ran == {"MakePalette": 2, "MergePalettes": 1, "PaletteSize": 1}


def test_a_second_run_comes_from_the_cache(registry: NodeRegistry, tmp_path: Path) -> None:
    engine = fresh_engine(registry, tmp_path)
    first = engine.run(DOCUMENT)
    results: list[Any] = []

    ran = runs_during(lambda: results.append(engine.run(DOCUMENT)))

    assert ran == {}
    assert results[0].ran == [] and sorted(results[0].cached) == ["both", "size"]  # their sources are not needed
    assert results[0].outputs == first.outputs


def test_changing_an_upstream_input_re_runs_exactly_the_nodes_downstream(registry: NodeRegistry,
                                                                          tmp_path: Path) -> None:
    engine = fresh_engine(registry, tmp_path)
    engine.run(DOCUMENT)
    results: list[Any] = []

    ran = runs_during(lambda: results.append(engine.run(DOCUMENT, {"seed": 4})))

    assert sorted(results[0].ran) == ["both", "size", "warm"]  # "cool" is untouched by the seed
    assert ran == {"MakePalette": 1, "MergePalettes": 1, "PaletteSize": 1}


def test_links_of_a_registered_type_key_by_the_upstream_key_and_output(registry: NodeRegistry) -> None:
    graph = compile_document(DOCUMENT, registry)
    keys = {"warm": "k-warm", "cool": "k-cool", "both": "k-both"}

    parts = key_parts(graph.nodes["size"], keys, {})

    assert parts == ["PaletteSize@1.0.0", "palette=<k-both.palette>", "extra=<k-cool.palette>"]
    assert key_parts(graph.nodes["both"], keys, {})[1] == "palettes=[<k-warm.palette>,<k-cool.palette>]"


def test_identical_producers_of_a_registered_type_share_one_result(registry: NodeRegistry, tmp_path: Path) -> None:
    document = json.loads(json.dumps(DOCUMENT))
    document["nodes"]["cool"]["inputs"] = {"count": 3, "seed": 3}  # now the same as "warm"
    results: list[Any] = []

    ran = runs_during(lambda: results.append(fresh_engine(registry, tmp_path).run(document)))

    assert ran["MakePalette"] == 1
    assert results[0].outputs["count"] == 3 + 3 + 3


def test_a_link_of_a_registered_type_into_another_type_is_a_type_mismatch(registry: NodeRegistry) -> None:
    document = json.loads(json.dumps(DOCUMENT))
    document["nodes"]["half"] = {"type": "Math", "inputs": {"a": {"from": "warm.palette"}, "b": 2.0}}
    document["nodes"]["n"] = {"type": "Int", "inputs": {"value": 3}}
    document["nodes"]["size"]["inputs"]["extra"] = {"from": "n.value"}

    with pytest.raises(ValidationError) as raised:
        compile_document(document, registry)

    errors = {(error.node, error.input): error for error in raised.value.errors}
    assert set(errors) == {("half", "a"), ("size", "extra")}
    assert errors["half", "a"].code == Code.TYPE_MISMATCH
    assert (errors["half", "a"].expected, errors["half", "a"].found) == ("FLOAT", "PALETTE from warm.palette")
    assert (errors["size", "extra"].expected, errors["size", "extra"].found) == ("PALETTE", "INT from n.value")
    assert "n.value is INT but 'extra' takes PALETTE" in errors["size", "extra"].message


def test_two_registered_types_do_not_mix(registry: NodeRegistry) -> None:
    other = types.register("REGISTRY_TEST_SWATCH", "not a palette")

    class Swatch(Node):
        outputs = (Output("swatch", other),)

        def run(self, ctx: Any) -> dict[str, Any]:
            return {"swatch": None}

    mixed = NodeRegistry([*registry, Swatch])
    document = with_input("size", "extra", {"from": "s.swatch"})
    document["nodes"]["s"] = {"type": "Swatch"}

    with pytest.raises(ValidationError) as raised:
        compile_document(document, mixed)

    assert [(e.code, e.node, e.input, e.expected, e.found) for e in raised.value.errors] == [
        (Code.TYPE_MISMATCH, "size", "extra", "PALETTE", "REGISTRY_TEST_SWATCH from s.swatch")]


@pytest.mark.parametrize("value", ["warm", 3, True, None, ["warm"], {"colors": []}])
def test_a_registered_type_takes_no_literal(registry: NodeRegistry, value: Any) -> None:
    with pytest.raises(ValidationError) as raised:
        compile_document(with_input("size", "palette", value), registry)

    (error,) = raised.value.errors
    assert (error.code, error.node, error.input) == (Code.INVALID_VALUE, "size", "palette")


def test_a_template_param_of_a_registered_type_is_linked_in(registry: NodeRegistry, tmp_path: Path) -> None:
    (tmp_path / "count.json").write_text(json.dumps({
        "graphflow": 1, "params": {"palette": {"type": "PALETTE"}},
        "nodes": {"size": {"type": "PaletteSize", "inputs": {"palette": {"param": "palette"}}}},
        "outputs": {"count": "size.count"}}), encoding="utf-8")
    document = {"graphflow": 1, "nodes": {
        "warm": {"type": "MakePalette", "inputs": {"count": 5}},
        "counted": {"template": "count.json", "inputs": {"palette": {"from": "warm.palette"}}}},
        "outputs": {"count": "counted.count"}}

    (tmp_path / "uses.json").write_text(json.dumps(document), encoding="utf-8")

    result = fresh_engine(registry, tmp_path).run(tmp_path / "uses.json")

    assert result.outputs["count"] == 5


# the builder


def test_the_builder_passes_a_registered_type_and_runs(registry: NodeRegistry, tmp_path: Path) -> None:
    g = Graph("palettes")
    seed = g.param("seed", "INT", 3)
    warm = g.add(MakePalette(count=3, seed=seed), "warm")
    cool = g.add(MakePalette(count=2, seed=9), "cool")
    both = g.add(MergePalettes(palettes=[warm.palette, cool.palette]), "both")
    size = g.add(PaletteSize(palette=both.palette, extra=cool.palette), "size")
    g.output("count", size.count)
    g.output("palette", both.palette)

    assert warm.palette.type == PALETTE
    assert g.to_document() == DOCUMENT
    assert fresh_engine(registry, tmp_path).run(g).outputs["count"] == 7


def test_the_builder_refuses_a_wrong_type_at_the_call() -> None:
    with pytest.raises(ValidationError) as raised:
        PaletteSize(palette=Int(value=3).value)

    (error,) = raised.value.errors
    assert (error.code, error.input, error.expected, error.found) == (
        Code.TYPE_MISMATCH, "palette", "PALETTE", "INT from Int.value")
    with pytest.raises(ValidationError, match="cannot connect PALETTE output to FLOAT input"):
        Math(a=MakePalette().palette)
    with pytest.raises(ValidationError, match="PALETTE values cannot be written literally"):
        PaletteSize(palette="warm")


def test_a_builder_param_of_a_registered_type_is_declared() -> None:
    g = Graph()
    palette = g.param("palette", PALETTE)

    g.add(PaletteSize(palette=palette), "size")

    assert g.to_document()["params"] == {"palette": {"type": "PALETTE"}}
    with pytest.raises(ValidationError, match="param 'palette' is PALETTE but this input takes INT"):
        Int(value=palette)


def test_the_builder_signature_shows_the_registered_type() -> None:
    import inspect

    assert str(inspect.signature(PaletteSize)) == "(*, palette: 'PALETTE', extra: 'PALETTE' = None)"


# the schema and `graphflow nodes`


def test_the_schema_lists_registered_types_and_annotates_inputs(registry: NodeRegistry) -> None:
    schema = document_schema(registry)

    param_types = schema["$defs"]["param"]["properties"]["type"]["anyOf"]
    assert {"const": "PALETTE", "description": "a few RGB colours, to recolour images with"} in param_types
    assert {"const": "IMAGE", "description": types.known_types()["IMAGE"].description} in param_types
    size = schema["$defs"]["node.PaletteSize"]["properties"]["inputs"]["properties"]
    assert size["palette"][TYPE_KEYWORD] == "PALETTE" and size["extra"][TYPE_KEYWORD] == "PALETTE"
    assert size["palette"]["anyOf"] == [{"$ref": "#/$defs/link"}, {"$ref": "#/$defs/paramRef"}]  # no literal
    jsonschema.Draft202012Validator.check_schema(schema)


def test_the_schema_accepts_links_and_refuses_literals_of_registered_types(registry: NodeRegistry) -> None:
    validator = jsonschema.Draft202012Validator(document_schema(registry))

    assert list(validator.iter_errors(DOCUMENT)) == []
    assert list(validator.iter_errors(with_input("size", "palette", "warm"))) != []
    declared = json.loads(json.dumps(DOCUMENT))
    declared["params"]["palette"] = {"type": "PALETTE"}
    assert list(validator.iter_errors(declared)) == []
    declared["params"]["palette"] = {"type": "PALETTES"}
    assert list(validator.iter_errors(declared)) != []


def test_graphflow_nodes_lists_the_registered_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--plugin", PLUGIN, "nodes", "--json"]) == 0
    listed = {node["type"]: node for node in json.loads(capsys.readouterr().out)}

    assert listed["PaletteSize"]["inputs"][0] | {"description": ""} == {
        "name": "palette", "type": "PALETTE", "description": "", "required": True, "optional": False,
        "list": False, "file": False, "model": False}
    assert listed["MakePalette"]["outputs"] == [{"name": "palette", "type": "PALETTE", "description": "The colours."}]
    assert main(["--plugin", PLUGIN, "nodes"]) == 0
    assert "out palette: PALETTE. The colours." in capsys.readouterr().out


def test_graphflow_run_passes_a_registered_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "palettes.json"
    path.write_text(json.dumps(DOCUMENT), encoding="utf-8")

    assert main(["--plugin", PLUGIN, "run", str(path), "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert "count = 7" in capsys.readouterr().out
    assert main(["validate", str(path)]) == 1  # without the plugin its node types are unknown
    assert "no node type named 'MakePalette'" in capsys.readouterr().out
