"""ComfyUI's sampler and scheduler names on graphflow's Sampler, and its `denoise` and step windows as strength.

ComfyUI samples with k-diffusion on its own sigma schedules; graphflow's Sampler runs diffusers' schedulers.
Each ComfyUI sampler maps onto the diffusers scheduler that takes the same kind of step (Euler, Heun, DPM++ 2M,
...), so images agree in character but not pixel for pixel.

Step semantics differ too. ComfyUI's KSampler with `denoise` d < 1 and S steps builds a schedule of int(S / d)
steps and runs its last S; graphflow (as diffusers' img2img) builds a schedule of `steps` and runs its last
floor(steps * strength). The import sets steps = int(S / d) and strength = S / int(S / d): the same S steps
over the same schedule length, starting at the same point of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerChoice:
    """The graphflow scheduler for a ComfyUI sampler, and why it is not ComfyUI's own (empty: the same method)."""

    scheduler: str
    note: str = ""
    supported: bool = True


# ComfyUI sampler name -> graphflow Sampler scheduler; the methods without a diffusers twin take the closest one
SAMPLERS: dict[str, SamplerChoice] = {
    "euler": SamplerChoice("euler"),
    "euler_ancestral": SamplerChoice("euler_a"),
    "heun": SamplerChoice("heun"),
    "dpmpp_2m": SamplerChoice("dpmpp_2m"),
    "lms": SamplerChoice("lms"),
    "ddim": SamplerChoice("euler", "ComfyUI's ddim takes Euler steps, so Euler runs"),
    "uni_pc": SamplerChoice("unipc", "ComfyUI's uni_pc is UniPC bh1, diffusers' UniPC defaults to bh2"),
    "uni_pc_bh2": SamplerChoice("unipc"),
    "euler_cfg_pp": SamplerChoice("euler", "CFG++ guidance is not available; plain Euler runs"),
    "euler_ancestral_cfg_pp": SamplerChoice("euler_a", "CFG++ guidance is not available; Euler ancestral runs"),
    "heunpp2": SamplerChoice("heun", "no Heun++ in diffusers; Heun runs"),
    "dpm_2": SamplerChoice("heun", "no DPM2 in graphflow; Heun (also second order) runs"),
    "dpm_2_ancestral": SamplerChoice("euler_a", "no DPM2 ancestral in graphflow; Euler ancestral runs"),
    "dpmpp_2s_ancestral": SamplerChoice("euler_a", "no DPM++ 2S ancestral in graphflow; Euler ancestral runs"),
    "dpmpp_sde": SamplerChoice("dpmpp_2m", "no DPM++ SDE in graphflow; deterministic DPM++ 2M runs"),
    "dpmpp_sde_gpu": SamplerChoice("dpmpp_2m", "no DPM++ SDE in graphflow; deterministic DPM++ 2M runs"),
    "dpmpp_2m_sde": SamplerChoice("dpmpp_2m", "no DPM++ 2M SDE in graphflow; deterministic DPM++ 2M runs"),
    "dpmpp_2m_sde_gpu": SamplerChoice("dpmpp_2m", "no DPM++ 2M SDE in graphflow; deterministic DPM++ 2M runs"),
    "dpmpp_3m_sde": SamplerChoice("dpmpp_2m", "no DPM++ 3M SDE in graphflow; DPM++ 2M runs"),
    "dpmpp_3m_sde_gpu": SamplerChoice("dpmpp_2m", "no DPM++ 3M SDE in graphflow; DPM++ 2M runs"),
    "dpmpp_2s_ancestral_cfg_pp": SamplerChoice("euler_a", "no DPM++ 2S ancestral CFG++ in graphflow; Euler "
                                               "ancestral runs"),
    "dpmpp_2m_cfg_pp": SamplerChoice("dpmpp_2m", "CFG++ guidance is not available; plain DPM++ 2M runs"),
    "ipndm": SamplerChoice("pndm", "no iPNDM in graphflow; PNDM (also pseudo-numerical multistep) runs"),
    "ipndm_v": SamplerChoice("pndm", "no iPNDM-v in graphflow; PNDM (also pseudo-numerical multistep) runs"),
    "deis": SamplerChoice("dpmpp_2m", "no DEIS in graphflow; DPM++ 2M (also an exponential multistep) runs"),
    "res_multistep": SamplerChoice("dpmpp_2m", "no RES multistep in graphflow; DPM++ 2M runs"),
    "res_multistep_cfg_pp": SamplerChoice("dpmpp_2m", "no RES multistep CFG++ in graphflow; DPM++ 2M runs"),
    "res_multistep_ancestral": SamplerChoice("euler_a", "no RES multistep ancestral in graphflow; Euler ancestral "
                                             "runs"),
    "res_multistep_ancestral_cfg_pp": SamplerChoice("euler_a", "no RES multistep ancestral CFG++ in graphflow; "
                                                    "Euler ancestral runs"),
    "ddpm": SamplerChoice("euler_a", "no DDPM sampling in graphflow; Euler ancestral (also stochastic) runs"),
    "lcm": SamplerChoice("default", "no LCM scheduler in graphflow; the checkpoint's own scheduler runs",
                         supported=False),
    "dpm_fast": SamplerChoice("default", "no DPM fast in graphflow; the checkpoint's own scheduler runs",
                              supported=False),
    "dpm_adaptive": SamplerChoice("default", "no adaptive DPM in graphflow; the checkpoint's own scheduler runs",
                                  supported=False),
    **{name: SamplerChoice("default", f"no {name} sampler in graphflow; the checkpoint's own scheduler runs",
                           supported=False)
       for name in ("gradient_estimation", "er_sde", "seeds_2", "seeds_3", "sa_solver")},
}
COMFY_SAMPLERS = tuple(SAMPLERS)
COMFY_SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                    "linear_quadratic", "kl_optimal")


def sampler_choice(sampler_name: str, scheduler: str) -> SamplerChoice:
    """The graphflow scheduler for ComfyUI's (sampler_name, scheduler) pair, with what differs."""
    choice = SAMPLERS[sampler_name]
    notes = [choice.note] if choice.note else []
    if scheduler == "karras":
        if choice.scheduler == "dpmpp_2m":
            return SamplerChoice("dpmpp_2m_karras", "; ".join(notes), choice.supported)
        notes.append(f"no Karras sigmas for {choice.scheduler}: the scheduler's own spacing is used")
    elif scheduler not in ("normal", "simple", "sgm_uniform"):
        notes.append(f"ComfyUI's {scheduler} sigma spacing is not available: the scheduler's own is used")
    return SamplerChoice(choice.scheduler, "; ".join(notes), choice.supported)


def strength_running(steps: int, total: int) -> float:
    """The smallest strength at which graphflow's Sampler with `total` steps runs exactly `steps` of them
    (it runs int(total * strength))."""
    if steps >= total:
        return 1.0
    strength = steps / total
    while int(total * strength) < steps:  # steps / total * total can fall a hair short in floating point
        strength = math.nextafter(strength, 2.0)
    return strength


def denoise_window(steps: int, denoise: float) -> tuple[int, float]:
    """graphflow (steps, strength) for ComfyUI's KSampler (steps, denoise): the last `steps` of an
    int(steps / denoise)-step schedule, as ComfyUI runs them."""
    if denoise > 0.9999:  # ComfyUI's own cut-off for "full denoise"
        return steps, 1.0
    total = max(int(steps / denoise), steps)
    return total, strength_running(steps, total)
