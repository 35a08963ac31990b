"""The paper's timing protocol as one typed description, shared by the CLI, the tab and the benchmark.

BK-SDM (arXiv 2305.15798), Jetson AGX Orin comparison: 512x512, 20 steps, DPM++ 2M Karras, CFG 7.
Seed 1234, warm-up images excluded and N measured images are this project's protocol around it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BKSDMError

K_SAMPLERS = {  # WebUI name -> k_diffusion.sampling function name
    "Euler": "sample_euler",
    "Heun": "sample_heun",
    "DPM++ 2M": "sample_dpmpp_2m",
    "DPM++ SDE": "sample_dpmpp_sde",
}
# Samplers run by a diffusers scheduler whatever the backend: LCM = LCMScheduler (the WebUI's "LCM", 1.8+);
# PNDM (PLMS), SD-v1's own and the paper's evaluation sampler
DIFFUSERS_SAMPLERS = ("LCM", "PNDM")
SAMPLERS = (*K_SAMPLERS, *DIFFUSERS_SAMPLERS)
SCHEDULES = ("karras", "normal")


@dataclass(frozen=True)
class Protocol:
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule: str = "karras"
    cfg_scale: float = 7.0
    seed: int = 1234
    warmup: int = 1
    images: int = 5
    batch_size: int = 1
    prompt: str = "a golden retriever sitting on a wooden floor, photo"
    negative_prompt: str = ""
    strength: float | None = None  # img2img (SDEdit) denoising strength; None for txt2img

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise BKSDMError(f"Unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}.")
        if self.schedule not in SCHEDULES:
            raise BKSDMError(f"Unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise BKSDMError(f"Size {self.width}x{self.height}: width and height must be positive multiples of 8.")
        if self.steps < 1 or self.images < 1 or self.warmup < 0 or self.batch_size < 1:
            raise BKSDMError("Steps, images and batch size must be at least 1, warm-up at least 0.")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise BKSDMError(f"Denoising strength {self.strength} must be in (0, 1].")


# WebUI < 1.9 folds the noise schedule into the sampler's name ("DPM++ 2M Karras"); 1.9+ keeps it apart.
_SCHEDULE_SUFFIXES = ("Karras", "Exponential")


def sampler_and_schedule(sampler: str, schedule: str = "") -> tuple[str, str]:
    """(sampler, schedule) in the 1.9+ form, so records of every WebUI version group together."""
    if not schedule:
        for suffix in _SCHEDULE_SUFFIXES:
            if sampler.endswith(" " + suffix):
                return sampler[: -len(suffix) - 1], suffix
    return sampler, schedule


def schedule_as_run(sampler: str, scheduler: str | None, extra_params: dict) -> tuple[str, str]:
    """(sampler, schedule) as a WebUI generation's infotext tells them, in the 1.9+ form.

    The scheduler asked for (the UI's "Automatic") is not always the one used: the WebUI writes the one
    its sampler really ran with into `extra_generation_params["Schedule type"]` (1.9+: the sampler's own
    schedule behind "Automatic"; 1.6-1.8: the `k_sched_type` setting when it overrides), and that entry is
    what the infotext shows. Otherwise 1.9+ shows the scheduler asked for and 1.6-1.8 fold the schedule
    into the sampler's name ("DPM++ 2M Karras").
    """
    sampler, folded = sampler_and_schedule(sampler)
    schedule = str((extra_params or {}).get("Schedule type") or scheduler or folded or "")
    if schedule.islower():  # 1.6-1.8's k_sched_type values ("karras") against 1.9+'s labels ("Karras")
        schedule = schedule[:1].upper() + schedule[1:]
    return sampler, schedule
