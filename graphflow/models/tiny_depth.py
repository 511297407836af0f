"""A tiny random-weight DPT depth model in transformers' format, for tests and the offline demo.

Its depth maps are noise shaped by the picture, not depth; what it exercises is the real loading
and pre/post-processing path of the Depth node (`DPTForDepthEstimation` + `DPTImageProcessor`).
"""

from __future__ import annotations

from pathlib import Path

# transformers' own DPT tests use this geometry; saved, it is about 0.6 MB
_CONFIG = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
           "backbone_out_indices": [0, 1, 2, 3], "num_attention_heads": 4, "intermediate_size": 37,
           "neck_hidden_sizes": [16, 32], "fusion_hidden_size": 32, "is_hybrid": False}


def write_tiny_dpt(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random DPT (config, model.safetensors, preprocessor config) into `folder`; return it.

    The same `seed` writes the same weights; the global random state is left as it was.
    """
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(DPTConfig(**_CONFIG))
    model.save_pretrained(folder, safe_serialization=True)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor.save_pretrained(folder)
    return folder
