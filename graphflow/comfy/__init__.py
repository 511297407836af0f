"""Import ComfyUI workflows (API format, UI format, PNGs ComfyUI saved) as graphflow documents; torch-free."""

from graphflow.comfy.classes import COMFY_CLASSES, ComfyClass, ComfyInput, comfy_class_info
from graphflow.comfy.importer import Fidelity, Imported, import_file, import_prompt

__all__ = ["COMFY_CLASSES", "ComfyClass", "ComfyInput", "Fidelity", "Imported", "comfy_class_info", "import_file",
           "import_prompt"]
