"""The `evaluate` job's typed config: the models (teacher first), the prompt set, the metrics and their
weight files, and the generation protocol with the paper's values as defaults (BKSDM.md §5: PNDM,
25 steps, CFG 7.5, 512 px squashed to 256 px)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BKSDMError
from ..job_config import JobConfig, setting
from ..timings.protocol import SAMPLERS, SCHEDULES, Protocol
from . import sources, weights

METRICS = ("fid", "is", "clip", "teacher-distance")
AUTO = "auto"  # every metric whose weight files are set (teacher distance from two models on)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp16", "fp32", "bf16")


@dataclass
class EvaluateConfig(JobConfig):
    """Generate the same prompts at the same seeds with every model, then score the images."""

    kind = "evaluate"

    models: list = setting((), "Models to evaluate; the FIRST is the teacher the others are compared with: WebUI "
                           "checkpoints (.safetensors/.ckpt), diffusers pipeline folders, a distill/lcm/dreambooth "
                           "job's checkpoints/step-N, or such a job's folder (each of its checkpoints).",
                           label="Models (teacher first)", group="Model", positional=True, nargs="+", kind="model")
    prompts: str = setting("default", "Caption file (.csv/.jsonl with a text column, or .txt, one per line), e.g. "
                           "the MS-COCO val2014 captions; 'default': the 314 prompts shipped with BK-SDM.",
                           label="Prompts", group="Data", kind="path")
    limit: int = setting(0, "Use the first N prompts only (0: all).", label="First N prompts", group="Data", min=0)
    metrics: str = setting(AUTO, "Comma-separated: fid, is, clip, teacher-distance; 'auto': those whose weight "
                           "files are set (teacher distance from two models on).", label="Metrics", group="Recipe")
    reference: str = setting("", "FID reference: an image folder or a .npz from `bksdm fid-stats`.",
                             label="FID reference", group="Data", kind="path")
    inception: str = setting("", f"clean-fid's {weights.INCEPTION_FILE} (or its folder), for FID and IS: "
                             f"{weights.INCEPTION_URL}", label="Inception weights", group="Model", kind="path")
    clip_weights: str = setting("", "open_clip weights for the CLIP score and the teacher distance's CLIP "
                                "similarity (.safetensors, or a state dict .bin/.pt read with weights_only).",
                                label="CLIP weights", group="Model", kind="path")
    clip_model: str = setting("ViT-g-14", "The open_clip architecture of clip_weights (the paper: ViT-g-14, "
                              "laion2b_s34b_b88k), or an open_clip config .json.", label="CLIP architecture",
                              group="Model")
    sampler: str = setting("PNDM", "Sampler (the paper: PNDM, diffusers' default for SD-v1).", label="Sampler",
                           group="Recipe", choices=SAMPLERS)
    schedule: str = setting("normal", "Noise schedule of the k-diffusion samplers (PNDM has its own).",
                            label="Schedule", group="Recipe", choices=SCHEDULES, advanced=True)
    steps: int = setting(25, "Sampling steps.", label="Steps", group="Recipe", min=1, max=1000)
    cfg_scale: float = setting(7.5, "Classifier-free guidance scale.", label="CFG scale", group="Recipe", min=0.0)
    resolution: int = setting(512, "Generated image side in pixels.", label="Resolution", group="Recipe", min=64,
                              multiple_of=8)
    eval_size: int = setting(256, "Side the images are squashed to (PIL bicubic) before scoring, as the paper's "
                             "evaluation does.", label="Evaluation size", group="Recipe", min=16)
    seed: int = setting(1234, "Seed of the first prompt; prompt i uses seed + i, for every model.", label="Seed",
                        group="Recipe", min=0)
    negative_prompt: str = setting("", "Negative prompt (the paper: none).", label="Negative prompt",
                                   group="Recipe", advanced=True, kind="prompt")
    batch_size: int = setting(1, "Images per U-Net batch (images do not depend on it).", label="Batch size",
                              group="Speed & memory", min=1)
    device: str = setting("auto", "Where to run (auto: CUDA when available).", label="Device",
                          group="Speed & memory", choices=DEVICES)
    precision: str = setting("auto", "auto: fp16 on CUDA, fp32 on CPU.", label="Precision", group="Speed & memory",
                             choices=PRECISIONS)
    grid_prompts: int = setting(8, "Prompts shown in the grid (teacher | students, side by side).",
                                label="Grid rows", group="Output", min=0)

    def metric_names(self) -> tuple[str, ...]:
        """The metrics to compute, in METRICS order."""
        if self.metrics.strip() == AUTO:
            chosen = {"fid"} if self.inception and self.reference else set()
            chosen |= {"is"} if self.inception else set()
            chosen |= {"clip"} if self.clip_weights else set()
            chosen |= {"teacher-distance"} if self.model_count() > 1 else set()
        else:
            chosen = {m.strip().lower() for m in self.metrics.split(",") if m.strip()}
        unknown = sorted(chosen - set(METRICS))
        if unknown:
            raise BKSDMError(f"Unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)} or 'auto'.")
        return tuple(m for m in METRICS if m in chosen)

    def model_count(self) -> int:
        """How many models are evaluated: a training job's folder counts each of its complete checkpoints."""
        try:
            return len(sources.expand(self.models))
        except BKSDMError:  # a bad job folder: validate names it
            return len(self.models)

    def protocol(self) -> Protocol:
        """The generation protocol in the timing benchmark's terms (its engine generates the images)."""
        return Protocol(width=self.resolution, height=self.resolution, steps=self.steps, sampler=self.sampler,
                        schedule=self.schedule, cfg_scale=self.cfg_scale, seed=self.seed, warmup=0,
                        images=1, batch_size=self.batch_size, prompt="", negative_prompt=self.negative_prompt)

    def validate(self) -> None:
        super().validate()
        if not self.models:
            raise BKSDMError("Give at least one model to evaluate (the teacher first).")
        for model in self.models:
            sources.check(str(model), "model")
        names = self.metric_names()
        if not names:
            raise BKSDMError("No metric to compute: set the Inception or CLIP weights, give two models for the "
                             "teacher distance, or name the metrics.")
        if ("fid" in names or "is" in names):
            if not self.inception:
                raise BKSDMError(f"FID and IS need clean-fid's Inception weights: download {weights.INCEPTION_URL} "
                                 "and set inception to it.")
            weights.inception_file(self.inception)  # missing: one message naming it
        if "fid" in names:
            if not self.reference:
                raise BKSDMError("FID needs a reference: an image folder (e.g. MS-COCO val2014) or a .npz from "
                                 "`bksdm fid-stats`.")
            if not Path(self.reference).expanduser().exists():
                raise BKSDMError(f"The FID reference {self.reference} does not exist.")
        if "clip" in names and not self.clip_weights:
            raise BKSDMError(f"The CLIP score needs open_clip weights: {weights.CLIP_HELP}; set clip_weights.")
        if self.clip_weights:
            weights.check_clip_weights(self.clip_weights)
        if "teacher-distance" in names and self.model_count() < 2:
            raise BKSDMError("The teacher distance compares students with the first model: give two models or more.")
        self.protocol().validate()
