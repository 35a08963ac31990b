"""The `sensitivity` job kind: BK-SDM App. C's block sensitivity analysis on any SD teacher.

For each unit (`blocks.units`), the teacher without it generates the prompt set at fixed seeds
through the project's one generation engine (`timings.bench.generate`); each image is scored
against the full teacher's with the teacher distance (pixel MSE; given a CLIP model, also the
cosine of the two images' CLIP embeddings), and by its CLIP score (against its prompt). Each image is
embedded once, for both. Outputs, in the job's output/:
`sensitivity.csv` (the damage table), `sensitivity.png` (its bar chart, as Fig. 19) and
`proposal.txt` (a layout for the target size, as a spec `bksdm prune --keep` takes).

Resume: the teacher's images (`sensitivity/teacher/*.png`, lossless) and every score
(`sensitivity/scores.json`) are kept as they are made; a resumed job scores only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BKSDMError
from ..evaluate.weights import check_clip_weights
from ..io import check_model_source, write_json
from ..job import JobFolder, Progress
from ..job_config import JobConfig, setting

# Captions in the manner of MS-COCO's (the paper scores on 5K of those); any list can replace them. Four, at
# 6 steps: a CPU run of a full-size SD-v1 makes 23 x 4 images in under an hour on 2 cores (README, "The
# pruning lab", has the estimate and what it rests on).
DEFAULT_PROMPTS = (
    "a man riding a wave on top of a surfboard", "a red double decker bus driving down a street",
    "two giraffes standing next to each other in a field", "a kitchen with a stove, a sink and cabinets",
)
PAPER_PROMPTS, PAPER_SIDE, PAPER_STEPS = 5000, 512, 25
SAMPLERS = ("DPM++ 2M", "Euler", "Heun", "DPM++ SDE")


@dataclass
class SensitivityConfig(JobConfig):
    """Score how much removing each block of an SD teacher changes its images (BK-SDM App. C)."""

    kind = "sensitivity"

    teacher: str = setting("", "The SD-1.x/2.x teacher: a diffusers pipeline folder (convert a single file first).",
                           label="Teacher model", group="Model", kind="model")
    prompts: list = setting(list(DEFAULT_PROMPTS), "Prompts to generate, one image per prompt and seed; every run "
                            "makes (1 + units) x prompts x seeds images. These defaults (4 prompts, 6 steps, 256 px: "
                            "92 images) take about 48 min for a full-size SD-v1 on a 2-core CPU (estimated from "
                            "the same engine's measured 4.2 s per guided step and 6 s per image besides); more "
                            "prompts give a steadier ranking. The paper's size (5K MS-COCO captions, "
                            f"512 px, 25 steps: {PAPER_PROMPTS * 23:,} images with the 22 single units) is an "
                            "estimated 30-50 h on one A100-class GPU (1-1.5 s an image; not measured). The job log "
                            "says what both take at the speed it measured.", label="Prompts", group="Data")
    seeds: int = setting(1, "Seeds per prompt (seed, seed+1, ...).", label="Seeds", group="Data", min=1, max=64)
    seed: int = setting(1234, "First seed.", label="Seed", group="Data", advanced=True, min=0)
    steps: int = setting(6, "Sampling steps per image.", label="Steps", group="Recipe", min=1, max=150)
    resolution: int = setting(256, "Image side in pixels.", label="Resolution", group="Recipe", min=64, max=1024,
                              multiple_of=8)
    cfg_scale: float = setting(7.5, "Classifier-free guidance scale.", label="CFG scale", group="Recipe", min=0.0,
                               max=30.0)
    sampler: str = setting("DPM++ 2M", "Sampler (k-diffusion, Karras sigmas).", label="Sampler", group="Recipe",
                           choices=SAMPLERS, advanced=True)
    groups: str = setting("single", "single: each block alone (22 units); pairs: also each two neighbouring blocks "
                          "of a stage (twice the time).", label="Units", group="Recipe", choices=("single", "pairs"))
    units: list = setting([], "Score only these units, named as in the table (down1.0, mid, up2.2, inner; a pair "
                          "down1.0+down1.1); empty: all of the chosen Units. The proposal uses the scored ones.",
                          label="Only these units", group="Recipe", advanced=True)
    target_fraction: float = setting(0.7, "Size of the proposed layout, as a share of the teacher's U-Net parameters.",
                                     label="Target size", group="Output", min=0.05, max=1.0)
    clip_weights: str = setting("", "open_clip weights (optional): adds each unit's CLIP score (its images "
                                "against their prompts) and the CLIP image similarity to the teacher's images "
                                "(.safetensors, or a state dict .bin/.pt read with weights_only). The ranking and "
                                "the proposal stay by pixel MSE.", label="CLIP weights", group="Model", kind="path")
    clip_model: str = setting("ViT-g-14", "The open_clip architecture of the CLIP weights (the paper's evaluation: "
                              "ViT-g-14), or an open_clip config .json.", label="CLIP architecture", group="Model",
                              advanced=True)
    device: str = setting("auto", "auto: CUDA when there is one, else the CPU.", label="Device",
                          group="Speed & memory", choices=("auto", "cpu", "cuda"))

    def validate(self) -> None:
        super().validate()
        check_model_source(self.teacher, "teacher", hub=False)
        if not Path(self.teacher).expanduser().is_dir():
            raise BKSDMError("teacher must be a diffusers pipeline folder: convert a single file first "
                             "(bksdm convert MODEL.safetensors FOLDER).")
        if not [p for p in self.prompts if str(p).strip()]:
            raise BKSDMError("Give at least one prompt.")
        if self.clip_weights:
            check_clip_weights(self.clip_weights)
        self.chosen_units()

    def chosen_units(self) -> list:
        """The units to score: those of `groups`, or the ones `units` names among them."""
        from .blocks import units

        known = units(self.groups)
        if not self.units:
            return known
        names = {u.name: u for u in known}
        unknown = [str(n) for n in self.units if n not in names]
        if unknown:
            raise BKSDMError(f"Unknown unit {unknown[0]!r} for groups={self.groups}: give names such as down1.0, mid, "
                             "up2.2, inner (or down1.0+down1.1 with groups=pairs).")
        return [u for u in known if u.name in set(self.units)]


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial")
    Image.fromarray(_hwc(image)).save(tmp, format="PNG")
    tmp.replace(path)


def _hwc(image: torch.Tensor):
    """A (C, H, W) uint8 image as the (H, W, C) array the teacher distance reads."""
    return image.permute(1, 2, 0).numpy()


def _load_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def run(config: SensitivityConfig, job_dir: Path, resume: str | None = None) -> str:
    from ..evaluate import metrics
    from ..timings import bench
    from ..timings.protocol import Protocol
    from ..timings.recorder import GenerationRecorder
    from . import analysis, blocks

    folder = JobFolder(job_dir).create()
    work = folder.root / "sensitivity"
    if not resume and work.exists():
        shutil.rmtree(work)
    (work / "teacher").mkdir(parents=True, exist_ok=True)
    scores_file = work / "scores.json"
    # unit -> "prompt-seed" -> {"pixel_mse": ..., with CLIP also "clip_score", "clip_image_similarity"}
    scores: dict[str, dict[str, dict[str, float]]] = (json.loads(scores_file.read_text()) if scores_file.is_file()
                                                       else {})

    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    pipe = bench.load_pipeline(config.teacher, device)
    if pipe.layout != "sd":
        raise BKSDMError(f"The teacher is {pipe.layout}, not a full SD U-Net: the analysis removes blocks from SD.")
    units = config.chosen_units()
    prompts = [str(p) for p in config.prompts if str(p).strip()]
    cases = [(i, config.seed + s) for i in range(len(prompts)) for s in range(config.seeds)]
    protocol = Protocol(width=config.resolution, height=config.resolution, steps=config.steps, sampler=config.sampler,
                        cfg_scale=config.cfg_scale, seed=config.seed, warmup=0, images=1)
    protocol.validate()
    backend = bench.resolve_backend("auto")

    def image(unet, case) -> torch.Tensor:
        prompt, seed = prompts[case[0]], case[1]
        images, _ = bench.generate(dataclasses.replace(pipe, unet=unet), dataclasses.replace(protocol, prompt=prompt),
                                   GenerationRecorder(device), seed, backend)
        return images[0]

    total = (1 + len(units)) * len(cases)
    done = sum(len(v) for v in scores.values())
    progress = Progress(state="running", total_steps=total, step=done, pid=None,
                        message=f"Sensitivity of {len(units)} units on {len(cases)} images each.").update()
    folder.write_progress(progress)
    started, made = time.time(), 0

    def advance(message: str) -> None:
        nonlocal done, made
        done, made = done + 1, made + 1
        rate = (time.time() - started) / made
        progress.update(step=done, eta_s=rate * (total - done), message=message, elapsed_s=time.time() - started)
        folder.write_progress(progress)

    def cancelled() -> bool:
        if folder.cancel_requested():
            folder.clear_cancel()
            folder.write_progress(progress.update(state="cancelled", message=f"Cancelled at {done}/{total} images; "
                                                  "resume continues from there."))
            return True
        return False

    teacher_images = {}
    for case in cases:
        path = work / "teacher" / f"{case[0]:04d}-{case[1]}.png"
        if not path.is_file():
            if cancelled():
                return "cancelled"
            _save_png(image(pipe.unet, case), path)
            advance(f"teacher image {case[0] + 1}/{len(prompts)}")
        teacher_images[case] = _hwc(_load_png(path))
    clip = metrics.Clip(config.clip_weights, config.clip_model, device) if config.clip_weights else None
    if clip is not None:  # each prompt, and each teacher image, embedded once for the whole run
        texts = clip.text_embeddings(prompts)
        teacher_embeddings = dict(zip(cases, clip.image_embeddings([teacher_images[c] for c in cases])))
        teacher_clip_score = metrics.clip_score(torch.stack([teacher_embeddings[c] for c in cases]),
                                                texts[[c[0] for c in cases]])

    def score(case, picture) -> dict[str, float]:
        if clip is None:
            return {"pixel_mse": metrics.teacher_distance([teacher_images[case]], [picture]).pixel_mse}
        embedding = clip.image_embeddings([picture])
        distance = metrics.teacher_distance([teacher_images[case]], [picture],
                                            embeddings=(teacher_embeddings[case][None], embedding))
        return {"pixel_mse": distance.pixel_mse, "clip_image_similarity": distance.clip_image_similarity,
                "clip_score": metrics.clip_score(embedding, texts[case[0]][None])}

    for unit in units:
        unit_scores = scores.setdefault(unit.name, {})
        pending = [c for c in cases if f"{c[0]}-{c[1]}" not in unit_scores]
        if not pending:
            continue
        with blocks.removed(pipe.unet, unit) as unet:
            for case in pending:
                if cancelled():
                    return "cancelled"
                unit_scores[f"{case[0]}-{case[1]}"] = score(case, _hwc(image(unet, case)))
                write_json(scores_file, scores)
                advance(f"without {unit.name}: image {len(unit_scores)}/{len(cases)}")

    table = analysis.rows({u.name: list(scores[u.name].values()) for u in units},
                          {u.name: " + ".join(sorted({blocks.stand_in(dict(pipe.unet.config), p) for p in u.parts}))
                           for u in units},
                          {u.name: blocks.removed_parameters(pipe.unet, u) for u in units})
    reference = teacher_clip_score if clip is not None else None
    out = folder.output
    analysis.write_table(table, out / "sensitivity.csv", reference)
    analysis.bar_chart(table, out / "sensitivity.png", f"{pipe.name}: damage without each block "
                       f"({len(cases)} images, {config.steps} steps, {config.resolution} px)", reference)
    single = {r.unit: r.damage for r in table if "+" not in r.unit}
    proposal = analysis.propose(single, dict(pipe.unet.config), config.target_fraction)
    seconds = (time.time() - started) / made if made else None
    lines = proposal.lines()
    if clip is not None:
        lines.append(f"CLIP score ({clip.name}) of the full teacher: {teacher_clip_score:.4f}; each unit's is in "
                     "sensitivity.csv.")
    if seconds:
        every = len(blocks.units(config.groups))  # the estimates are for all units, also when `units` chose some
        scale = (PAPER_STEPS / config.steps) * (PAPER_SIDE / config.resolution) ** 2
        paper = (1 + every) * PAPER_PROMPTS * config.seeds * seconds * scale / 3600
        lines.append(f"This run: {seconds:.2f} s per image on {device}; all {every} units at these settings take "
                     f"about {(1 + every) * len(cases) * seconds / 3600:.2f} h here. The paper's size "
                     f"({PAPER_PROMPTS:,} prompts, {PAPER_SIDE} px, {PAPER_STEPS} steps) would take about "
                     f"{paper:,.0f} h here, scaling by steps and pixels.")
    from ..io import write_text

    write_text(out / "proposal.txt", "\n".join(lines) + "\n")
    print(analysis.format_table(table, reference), flush=True)
    print("\n".join(lines), flush=True)
    folder.write_progress(progress.update(state="done", step=total, eta_s=0.0, message=lines[0],
                                          output=str(out / "sensitivity.csv")))
    return "done"
