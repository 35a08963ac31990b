"""The `evaluate` job: every model generates the same prompts at the same seeds, then the images are scored.

The job folder (bksdm_ext.job) holds, besides config.toml, progress.json and log.txt:
- `images/m<K>/<i>.png`: prompt i by model K (K = its place in the list, the teacher is 0), squashed to
  the evaluation size; `images/m<K>/model.json` says which model and settings made them. Each image is
  written atomically, so one that exists is whole: a resumed job reuses them and generates the rest.
- `checkpoints/step-<N>/state.json`: N images are done (what makes the job resumable for the runner);
- `results.json`, `results.csv`, `grid.png`: see `results`.

Generation goes through the timing benchmark's engine (`bksdm_ext.timings.bench`); the metric networks
are loaded after it, when the diffusion models have left memory.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from pathlib import Path

from ..errors import BKSDMError
from ..io import write_image, write_json
from ..job import JobFolder, Progress
from .config import EvaluateConfig
from . import sources
from .prompts import read_prompts

IMAGE_NAME = "{:05d}.png"


def run(config: EvaluateConfig, job_dir: str | os.PathLike, resume: str | None = None) -> str:
    """Run the evaluation in `job_dir`; "done" or "cancelled". With `resume`, images already there are kept."""
    folder = JobFolder(job_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    # each training job's folder stands for its complete checkpoints, as they are now
    config = dataclasses.replace(config, models=sources.expand(config.models))
    prompts = read_prompts(config.prompts, config.limit)
    names = config.metric_names()
    images_root = folder.root / "images"
    if not resume and images_root.exists():
        shutil.rmtree(images_root)  # a fresh start: nothing of an earlier run is trusted
    check_weights(config, names)
    progress = Progress(state="running", total_steps=len(config.models) * len(prompts), pid=os.getpid())
    outcome = generate_all(config, folder, prompts, progress)
    if outcome == "cancelled":
        folder.write_progress(progress.update(state="cancelled",
                                              message=f"Cancelled after {progress.step} images; resume generates "
                                                      "the rest."))
        return outcome
    from . import results, scoring

    folder.write_progress(progress.update(message="Scoring the images."))
    scores = scoring.score(config, folder, prompts, names, say=lambda m: _say(folder, progress, m))
    table = results.write_results(config, folder, prompts, scores)
    print(results.format_table(table), flush=True)
    folder.write_progress(progress.update(state="done", output=str(folder.root / "results.json"),
                                          message=results.summary(table)))
    return "done"


def check_weights(config: EvaluateConfig, names) -> None:
    """Load the Inception network now (it is small), so a broken file fails before hours of generation."""
    if "fid" in names or "is" in names:
        from .metrics import Inception

        Inception(config.inception, "cpu")


def model_dir(images_root: Path, index: int) -> Path:
    return images_root / f"m{index}"


def image_path(images_root: Path, index: int, prompt_index: int) -> Path:
    return model_dir(images_root, index) / IMAGE_NAME.format(prompt_index)


def generation_key(config: EvaluateConfig, source: str, prompts: list[str]) -> dict:
    """What the images of one model depend on: when any of it changes, they are generated again."""
    import hashlib

    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    protocol = {name: getattr(config, name) for name in ("sampler", "schedule", "steps", "cfg_scale", "resolution",
                                                           "eval_size", "seed", "negative_prompt")}
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    return {"source": str(path.resolve()), "files": hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16],
            "protocol": protocol, "prompts": digest}


def generate_all(config: EvaluateConfig, folder: JobFolder, prompts: list[str], progress: Progress) -> str:
    """Generate every missing image, model by model; "cancelled" when a cancel was requested."""
    images_root = folder.root / "images"
    plan = []
    for index, source in enumerate(config.models):
        key = generation_key(config, source, prompts)
        directory = model_dir(images_root, index)
        info = read_json_or_empty(directory / "model.json")
        if info.get("key") != key and directory.exists():
            print(f"Model {index} ({source}) or the protocol changed since its images were made: generating them "
                  "again.", flush=True)
            shutil.rmtree(directory)
            info = {}
        missing = [i for i in range(len(prompts)) if not image_path(images_root, index, i).is_file()]
        plan.append((index, source, key, info, missing))
    done = progress.total_steps - sum(len(missing) for *_, missing in plan)
    started, made = time.time(), 0
    folder.write_progress(progress.update(step=done, message=f"{done} of {progress.total_steps} images exist."))
    if done:
        print(f"Reusing {done} images already generated.", flush=True)
    for index, source, key, info, missing in plan:
        if not missing:
            continue
        if folder.cancel_requested():
            return "cancelled"
        generator, info = _load_model(config, source, key, index, len(config.models), folder, progress)
        write_json(model_dir(images_root, index) / "model.json", info)
        protocol = config.protocol()
        seconds = []
        try:
            for start in range(0, len(missing), config.batch_size):
                if folder.cancel_requested():
                    return "cancelled"
                batch = missing[start:start + config.batch_size]
                images, timings = generator(protocol, [config.seed + i for i in batch],
                                            prompts=[prompts[i] for i in batch])
                for i, image in zip(batch, images):
                    save_image(image, image_path(images_root, index, i), config.eval_size)
                seconds.append(timings.total_s / len(batch))
                done, made = done + len(batch), made + len(batch)
                rate = made / (time.time() - started)
                mark_checkpoint(folder, done)
                folder.write_progress(progress.update(
                    step=done, samples_per_s=rate, eta_s=(progress.total_steps - done) / rate,
                    elapsed_s=time.time() - started,
                    message=f"Model {index + 1}/{len(config.models)} ({info['name']}): image {done}/"
                            f"{progress.total_steps}"))
        finally:
            generator.close()
            if seconds:
                info["seconds_per_image"] = sum(seconds) / len(seconds)
                write_json(model_dir(images_root, index) / "model.json", info)
            del generator
            gc.collect()
            _empty_cuda_cache()
    return "done"


def _load_model(config, source, key, index, count, folder, progress):
    from ..timings.bench import Generator

    device, dtype = resolve_device(config)
    folder.write_progress(progress.update(message=f"Loading model {index + 1}/{count}: {source}"))
    print(f"Loading model {index + 1}/{count}: {source} on {device}", flush=True)
    pipe = sources.load(source, device, dtype)
    info = {"key": key, "source": str(source), "name": pipe.name, "layout": pipe.layout, "version": pipe.version,
            "hash": pipe.checkpoint_hash, "device": str(device), "precision": str(pipe.dtype).replace("torch.", "")}
    return Generator(pipe, "auto"), info


def resolve_device(config: EvaluateConfig):
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BKSDMError("device is cuda but no CUDA device is available here: set device to cpu or auto.")
    dtype = {"auto": None, "fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[config.precision]
    return device, dtype


def save_image(image, path: Path, size: int) -> None:
    """A uint8 (3, H, W) tensor squashed to size x size (PIL bicubic, as the paper's evaluation), written
    atomically as PNG."""
    from PIL import Image

    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.BICUBIC)
    write_image(path, picture)


def mark_checkpoint(folder: JobFolder, done: int) -> None:
    """checkpoints/step-<done>/state.json (complete once renamed), older marks removed: the images on
    disk are the job's state, this tells the runner it can resume."""
    partial, final = folder.partial_checkpoint_dir(done), folder.checkpoint_dir(done)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(partial / "state.json", {"images": done})
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in folder.complete_checkpoints()[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def read_json_or_empty(path: Path) -> dict:
    """A small JSON file of the job folder, or {} when it is missing or damaged (then it is made again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _say(folder: JobFolder, progress: Progress, message: str) -> None:
    print(message, flush=True)
    folder.write_progress(progress.update(message=message))


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

