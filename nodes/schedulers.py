"""The Sampler's scheduler choices: diffusers scheduler classes built from the checkpoint's scheduler config.

A choice is built the way diffusers users swap schedulers,
`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`: the checkpoint's own
scheduler is made from its `scheduler_config.json` first, so keys the file leaves out take that
class's defaults (as `pipe.scheduler.config` has them), then the chosen class is made from its config.
"""

from __future__ import annotations

from typing import Any

from graphflow.errors import NodeInputError

# choice -> (diffusers class, extra config); "default" is the checkpoint's own scheduler
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)


def make_scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """A fresh scheduler (schedulers keep per-run state) for choice `name`."""
    own_name = scheduler_config.get("_class_name")
    own = _scheduler_class(own_name).from_config(scheduler_config) if own_name else None
    if name == "default":
        if own is None:
            raise NodeInputError("the checkpoint's scheduler config names no scheduler class (_class_name); "
                                 f"choose one of {', '.join(SCHEDULERS)}")
        return own
    class_name, extra = SCHEDULERS[name]
    return _scheduler_class(class_name).from_config(scheduler_config if own is None else own.config, **extra)


def _scheduler_class(class_name: str) -> type:
    import diffusers
    from diffusers import SchedulerMixin

    found = getattr(diffusers, class_name, None)
    # the name comes from a config file: only ever a diffusers scheduler class, never any other attribute
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise NodeInputError(f"the checkpoint's scheduler {class_name!r} is not a diffusers scheduler; "
                             f"choose one of {', '.join(SCHEDULERS)}")
    return found
