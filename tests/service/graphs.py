"""Small documents the service tests submit."""

from __future__ import annotations

from typing import Any


def arithmetic(a: float = 1.0) -> dict[str, Any]:
    """Math and JoinText with params: queue mechanics without models."""
    return {"graphflow": 1, "name": "arithmetic",
            "params": {"a": {"type": "FLOAT", "default": a, "min": -100, "max": 100},
                       "word": {"type": "STRING", "default": "x", "choices": ["x", "y", "z"]}},
            "nodes": {"sum": {"type": "Math", "inputs": {"a": {"param": "a"}, "b": 2, "op": "add"}},
                      "text": {"type": "JoinText", "inputs": {"texts": [{"param": "word"}, "!"], "separator": ""}}},
            "outputs": {"sum": "sum.result", "text": "text.text"}}


def tiny_sd(steps: int = 2, size: int = 32) -> dict[str, Any]:
    """A tiny SD1.5 render written to a PNG: files and progress."""
    return {"graphflow": 1, "name": "tiny_sd",
            "params": {"seed": {"type": "INT", "default": 0}, "steps": {"type": "INT", "default": steps, "min": 1},
                       "prompt": {"type": "STRING", "default": "a room"}},
            "nodes": {
                "sd": {"type": "CheckpointLoader", "inputs": {"model": "tiny:sd15"}},
                "positive": {"type": "TextEncode",
                             "inputs": {"clip": {"from": "sd.clip"}, "text": {"param": "prompt"}}},
                "negative": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": ""}},
                "size": {"type": "EmptyLatent", "inputs": {"width": size, "height": size}},
                "sample": {"type": "Sampler", "inputs": {
                    "model": {"from": "sd.model"}, "positive": {"from": "positive.conditioning"},
                    "negative": {"from": "negative.conditioning"}, "latent": {"from": "size.latent"},
                    "seed": {"param": "seed"}, "steps": {"param": "steps"}}},
                "decode": {"type": "VAEDecode",
                           "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "sample.latent"}}},
                "save": {"type": "SaveImage", "inputs": {"image": {"from": "decode.image"}, "prefix": "tiny"}}},
            "outputs": {"image": "decode.image"}}
