"""A node pack with a value type of its own, as a plugin would write it: PALETTE, made by one node and read by others.

Each node counts its runs, so tests can tell which nodes ran and which came from the cache.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from graphflow import types
from graphflow.node import Input, Node, Output

PALETTE = types.register("PALETTE", "a few RGB colours, to recolour images with")

RUNS: Counter[str] = Counter()  # node type -> runs, across engines (tests compare before and after)


@dataclass(frozen=True)
class Palette:
    colors: tuple[tuple[int, int, int], ...]


class MakePalette(Node):
    """Draw `count` colours from a seeded generator."""

    category = "palette"
    inputs = (Input("count", types.INT, "How many colours.", default=4, min=1, max=16),
              Input("seed", types.INT, "Generator seed.", default=0))
    outputs = (Output("palette", PALETTE, "The colours."),)

    def run(self, ctx: Any, count: int, seed: int) -> dict[str, Any]:
        RUNS["MakePalette"] += 1
        rng = random.Random(seed)
        return {"palette": Palette(tuple((rng.randrange(256), rng.randrange(256), rng.randrange(256))
                                         for _ in range(count)))}


class MergePalettes(Node):
    """Join palettes, in list order."""

    category = "palette"
    inputs = (Input("palettes", PALETTE, "Palettes to join.", list=True),)
    outputs = (Output("palette", PALETTE),)

    def run(self, ctx: Any, palettes: list[Palette]) -> dict[str, Any]:
        RUNS["MergePalettes"] += 1
        return {"palette": Palette(tuple(color for palette in palettes for color in palette.colors))}


class PaletteSize(Node):
    """How many colours a palette holds (plus those of an optional second one)."""

    category = "palette"
    inputs = (Input("palette", PALETTE, "The palette."),
              Input("extra", PALETTE, "Another palette to count.", optional=True))
    outputs = (Output("count", types.INT),)

    def run(self, ctx: Any, **inputs: Any) -> dict[str, Any]:
        RUNS["PaletteSize"] += 1
        extra = inputs["extra"]
        return {"count": len(inputs["palette"].colors) + (len(extra.colors) if extra is not None else 0)}


NODES = (MakePalette, MergePalettes, PaletteSize)
