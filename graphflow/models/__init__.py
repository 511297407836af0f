"""Models: the manager that loads each model once, device and dtype choice, sources, tiny test models.

Nothing here imports torch at import time.
"""

from graphflow.models.devices import Placement, placement, resolve_device, resolve_dtype, torch_dtype
from graphflow.models.manager import ModelHandle, ModelKey, ModelManager, shared_manager

__all__ = ["ModelHandle", "ModelKey", "ModelManager", "Placement", "placement", "resolve_device", "resolve_dtype",
           "shared_manager", "torch_dtype"]
