"""A generated dataset to try training on: filled circles of colours, their outlines as control images.

`write_circles_dataset(folder)` writes a dataset folder (graphflow.training.dataset's layout) in well under a second:
targets are circles filled with one of four colours on black, control images their white 2-pixel outlines, prompts
"a red circle" and so on. A ControlNet trained on it learns to put a filled circle where the outline is.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 210, 40)}


def write_circles_dataset(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write `count` examples of `size` x `size` pixels into `folder` (created; must not hold a dataset yet)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    for name in ("images", "conditioning"):
        (folder / name).mkdir(parents=True)
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        x, y = rng.integers(size // 4, 3 * size // 4, 2)
        radius = int(rng.integers(size // 8, size // 3))
        distance = np.hypot(columns - x, rows - y)
        target = np.zeros((size, size, 3), np.uint8)
        target[distance < radius] = COLOURS[colour]
        outline = np.zeros((size, size, 3), np.uint8)
        outline[(distance < radius) & (distance >= radius - 2)] = 255
        Image.fromarray(target).save(folder / "images" / f"{index}.png")
        Image.fromarray(outline).save(folder / "conditioning" / f"{index}.png")
        (folder / "images" / f"{index}.txt").write_text(f"a {colour} circle\n", encoding="utf-8")
    return folder
