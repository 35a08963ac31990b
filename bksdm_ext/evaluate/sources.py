"""What a model of an evaluation can be, and its pipeline.

- a WebUI checkpoint (.safetensors/.ckpt) or a diffusers pipeline folder: loaded by the benchmark's engine;
- a training job's checkpoint, `JOB/checkpoints/step-N` of a distill, lcm or dreambooth job: the pipeline
  is the job's base model (its config.toml's teacher / model / base_model: VAE, text encoder, tokenizer,
  scheduler) with the checkpoint's weights in it, the ones the job would export (the EMA where it keeps
  one, `train.checkpoints.exported_weights`): for distillation a student built from the teacher in the
  job's layout, for a LoRA run the base model with the job's adapters;
- a training job's folder: each of its complete checkpoints, oldest first, so one evaluation shows a
  student improving from checkpoint to checkpoint. Each is named `JOB step-N` in the results.

Only complete checkpoints are loaded (`bksdm_ext.job`: `step-N/` holding state.json; one being written
is a dot-named folder until it is renamed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BKSDMError
from ..io import check_model_source
from ..job import PARTIAL_PREFIX, JobFolder, checkpoint_step
from ..job_config import read_toml


def model_setting(kind: str | None) -> str:
    """The setting of a kind's config naming the model its checkpoints' weights go into; '' for a kind whose
    checkpoints hold no model (or no kind)."""
    from .. import kinds

    known = kinds.all().get(kind or "")
    return getattr(known.config_class(), "model_setting", "") if known else ""


def kinds_with_models() -> list[str]:
    """The kinds whose checkpoints hold a model (training jobs)."""
    from .. import kinds

    return [name for name in kinds.all() if model_setting(name)]


@dataclass(frozen=True)
class JobCheckpoint:
    """A complete checkpoint of a training job."""

    job: JobFolder
    kind: str
    step: int

    @property
    def path(self) -> Path:
        return self.job.checkpoint_dir(self.step)

    @property
    def name(self) -> str:
        return f"{self.job.root.name} step-{self.step}"


def job_kind(path: Path) -> str | None:
    """The kind of the job whose folder `path` is (its config.toml's `kind`), None for any other folder."""
    config = JobFolder(path).config
    if not config.is_file():
        return None
    kind = read_toml(config).get("kind")
    return kind if isinstance(kind, str) else ""


def _trained_job(path: Path, source: str) -> str:
    """The kind of a training job's folder; a BKSDMError for a job of another kind."""
    kind = job_kind(path)
    if not model_setting(kind):
        what = f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}" if kind else "a"
        raise BKSDMError(f"{source} is {what} job folder without checkpoints of a model "
                         f"(only {', '.join(kinds_with_models())} jobs have them): give its output model instead.")
    return kind


def as_checkpoint(source: str) -> JobCheckpoint | None:
    """The job checkpoint `source` names (`JOB/checkpoints/step-N`), None when it names none.

    A checkpoint that is not complete (being written, or its writing killed) is a BKSDMError."""
    path = Path(source).expanduser()
    if path.parent.name != "checkpoints" or not path.is_dir():
        return None
    step = checkpoint_step(path)
    if step is None and not path.name.startswith(PARTIAL_PREFIX):
        return None
    job_dir = path.parent.parent
    if job_kind(job_dir) is None:
        return None
    kind = _trained_job(job_dir, str(job_dir))
    if step is None or not (path / "state.json").is_file():
        raise BKSDMError(f"{source} is a checkpoint not completely written (the job is writing it, or was killed "
                         "while it did): give a complete checkpoints/step-N, or the job's folder.")
    return JobCheckpoint(JobFolder(job_dir), kind, step)


def job_checkpoints(source: str) -> list[JobCheckpoint] | None:
    """Each complete checkpoint of the training job whose folder (or checkpoints/ folder) `source` is,
    oldest first; None when `source` is no job folder. A job without a complete one is a BKSDMError."""
    path = Path(source).expanduser()
    if path.name == "checkpoints" and job_kind(path.parent) is not None:
        path = path.parent
    if not path.is_dir() or job_kind(path) is None:
        return None
    kind = _trained_job(path, source)
    folder = JobFolder(path)
    found = [JobCheckpoint(folder, kind, checkpoint_step(p)) for p in folder.complete_checkpoints()]
    if not found:
        raise BKSDMError(f"The {kind} job {source} has no complete checkpoint yet: wait for its first one (its "
                         "checkpoint_every setting), or give its output model.")
    return found


def check(source: str, name: str = "model") -> None:
    """Refuse, with one line, a model that is neither a model, a job's checkpoint nor a training job's folder."""
    checkpoint = as_checkpoint(source)
    found = [checkpoint] if checkpoint else job_checkpoints(source)
    if found:
        setting = model_setting(found[0].kind)
        base = base_model(found[0])
        if not base:
            raise BKSDMError(f"{found[0].name}: the job's config.toml names no {setting}.")
        check_model_source(base, f"{found[0].name}: the job's {setting}", hub=False)
        return
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "unet" / "config.json").is_file():
        raise BKSDMError(f"{name} {source} is neither a diffusers pipeline folder (unet/config.json), a training "
                         "job's folder (config.toml) nor one of its checkpoints/step-N.")
    check_model_source(source, name, hub=False)


def expand(models: list[str]) -> list[str]:
    """The models with each training job's folder replaced by its complete checkpoints, oldest first."""
    out = []
    for source in models:
        found = job_checkpoints(str(source))
        out += [str(c.path) for c in found] if found else [str(source)]
    return out


def job_config(checkpoint: JobCheckpoint):
    from .. import kinds

    return kinds.get(checkpoint.kind).config_class().load(checkpoint.job.config)


def base_model(checkpoint: JobCheckpoint) -> str:
    return str(getattr(job_config(checkpoint), model_setting(checkpoint.kind)) or "")


def load(source: str, device, dtype=None):
    """The benchmark engine's `Pipeline` of any model `check` accepts."""
    from ..timings.bench import load_pipeline

    checkpoint = as_checkpoint(source)
    if checkpoint is None:
        path = Path(source).expanduser()
        if path.parent.name == "checkpoints" and checkpoint_step(path) is not None and not path.exists():
            raise _gone(path)
        return load_pipeline(source, device, dtype)
    return load_checkpoint(checkpoint, device, dtype)


def _gone(path: Path) -> BKSDMError:
    return BKSDMError(f"{path} is gone (its job keeps only its newest checkpoints_keep): resume this evaluation "
                      "if it was given the job's folder (it then takes the checkpoints there are), or give another.")


def load_checkpoint(checkpoint: JobCheckpoint, device, dtype=None):
    """The job's base model with the checkpoint's exported weights in it, named `JOB step-N`."""
    import torch

    from ..timings.bench import describe_unet, load_pipeline, short_hash
    from ..train.checkpoints import exported_weights

    config = job_config(checkpoint)
    pipe = load_pipeline(base_model(checkpoint), device, dtype)
    modules = config.checkpoint_modules(pipe)
    try:
        weights, group = exported_weights(checkpoint.path)
    except OSError:  # removed meanwhile: a running job keeps its newest checkpoints_keep only
        raise _gone(checkpoint.path) from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module, _, param = key.partition(".")
        by_module.setdefault(module, {})[param] = tensor
    unknown = sorted(set(by_module) - set(modules))
    for name, state in by_module.items():
        if name in unknown:
            continue
        result = modules[name].load_state_dict(state, strict=False)
        if result.unexpected_keys:
            unknown.append(f"{name}.{result.unexpected_keys[0]}")
    if unknown:
        raise BKSDMError(f"{checkpoint.path} does not fit its job's config.toml (e.g. {unknown[0]}): was the config "
                         "edited after training?")
    unet = modules.get("student", pipe.unet).to(device=pipe.device, dtype=pipe.dtype).eval()
    pipe.text_encoder.to(device=pipe.device, dtype=pipe.dtype)
    if "student" in modules:  # a new layout; adapters keep the base model's
        pipe.layout, _ = describe_unet(unet, pipe.scheduler_config)
    pipe.unet, pipe.name = unet, checkpoint.name
    pipe.checkpoint_hash = short_hash(checkpoint.path / f"{group}.safetensors")
    print(f"{checkpoint.name}: {config.kind} job's {model_setting(checkpoint.kind)} {base_model(checkpoint)} with "
          f"the {'EMA' if group == 'ema' else 'trained'} weights of {checkpoint.path}", flush=True)
    return pipe
