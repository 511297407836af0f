"""Nodes for tests/ray/test_attack_ray.py: a cheap seeded picture that can also take its time (in cancellable
steps), fail, or end its whole process (the Ray actor running it) at a chosen seed or once per marker file."""

from __future__ import annotations

import os
import time
from typing import Any

from graphflow import types
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output


class AttackPaint(Node):
    """A `size`² picture of seeded noise. At seed `crash` (or when the file `crash_once` exists, which it removes
    first) the process exits on the spot, as a segfaulting extension would; at seed `fail` the node raises; `deaf`, it
    takes its time without looking at its cancel token (a long model load, an extension's C loop)."""

    category = "test"
    inputs = (Input("seed", types.INT, "Noise seed.", default=0),
              Input("size", types.INT, "Side in pixels.", default=8, min=1, max=64),
              Input("seconds", types.FLOAT, "How long to take, in cancellable steps of 0.05 s.", default=0.0),
              Input("crash", types.INT, "The seed whose job kills its process.", default=-1),
              Input("crash_once", types.STRING, "A marker file: kill the process once, removing it.", default=""),
              Input("fail", types.INT, "The seed whose job fails.", default=-1),
              Input("deaf", types.BOOL, "Take the time without looking at the cancel token.", default=False))
    outputs = (Output("image", types.IMAGE, "The noise."),)

    def run(self, ctx: Any, seed: int, size: int, seconds: float, crash: int, crash_once: str,
            fail: int, deaf: bool) -> dict[str, Any]:
        import torch

        if seed == crash:
            os._exit(3)
        if crash_once:
            try:
                os.unlink(crash_once)
            except FileNotFoundError:
                pass
            else:
                os._exit(3)
        if seed == fail:
            raise NodeInputError(f"seed {seed} is the failing one")
        steps = round(seconds / 0.05)
        if deaf:
            time.sleep(seconds)
            steps = 0
        for step in range(steps):
            time.sleep(0.05)
            ctx.progress(step + 1, steps)
        generator = torch.Generator().manual_seed(seed)
        return {"image": torch.rand(1, size, size, 3, generator=generator)}


NODES = (AttackPaint,)
