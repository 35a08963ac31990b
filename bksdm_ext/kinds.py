"""The one registry of job kinds: each kind is declared once, here (or, for a kind from elsewhere, by
`register`). The CLI, the REST API, the runner, the tab and the WebUI's form defaults all read it.

A kind names its config class ("module:Class", a `job_config.JobConfig`) and the function that runs
it ("module:function", `run(config, job_dir: Path, resume: str | None) -> "done" | "cancelled"`),
both imported only when needed; `bksdm_ext.job.run_job` is the process that calls it.

A kind registered outside this module is found in a job's own process through the environment:
`BKSDM_KIND_MODULES` (os.pathsep-separated module names, set by the runner for such kinds) is
imported on a miss, and those modules call `register` when imported.

Core level: imports nothing from train/, jobs/, ui/ or webui/.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import BKSDMError

MODULES_ENV = "BKSDM_KIND_MODULES"


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    config: str  # "package.module:ClassName" of its JobConfig
    run: str  # "package.module:function": run(config, job_dir, resume) -> "done" | "cancelled"
    gpu: bool = True  # GPU jobs share the queue's GPU slots; others start at once
    help: str = ""  # one line for `bksdm --help`

    @property
    def module(self) -> str:
        """The module that defines the kind's run function (imported by the job process)."""
        return self.run.partition(":")[0]

    def config_class(self) -> type:
        return _load(self.config, self.title)

    def run_function(self) -> Callable[..., str]:
        return _load(self.run, self.title)

    def build_config(self, values: dict[str, Any]):
        """The typed config for `values`, validated; a BKSDMError says what to fix."""
        cls = self.config_class()
        try:
            config = cls.from_dict(values)
        except BKSDMError:
            raise
        except (TypeError, ValueError, KeyError) as error:
            raise BKSDMError(f"Invalid {self.title} settings: {error}") from None
        config.validate()
        return config


def _load(target: str, title: str):
    module_name, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise BKSDMError(f"{title} jobs are not available in this installation ({error}).") from None


_KINDS: dict[str, Kind] = {}
_BUILTIN: frozenset[str] = frozenset()


def register(kind: Kind) -> Kind:
    """Add (or replace) a kind; returns it."""
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind registered outside this module (tests); the built-in ones stay."""
    if name not in _BUILTIN:
        _KINDS.pop(name, None)


def get(name: str) -> Kind:
    """The kind called `name`; an unknown name is an error naming the known kinds, never a fallback."""
    if name not in _KINDS:
        _import_env_modules()
    try:
        return _KINDS[name]
    except KeyError:
        raise BKSDMError(f"Unknown job kind {name!r}; choose one of {', '.join(_KINDS)}.") from None


def all() -> dict[str, Kind]:  # noqa: A001 - the registry's name for "every kind"
    """Every registered kind by name, the built-in ones first."""
    return dict(_KINDS)


def is_builtin(name: str) -> bool:
    return name in _BUILTIN


def _import_env_modules() -> None:
    for module in filter(None, os.environ.get(MODULES_ENV, "").split(os.pathsep)):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # get() then names the kinds it knows


# --- the built-in kinds: one line each ----------------------------------------------------------

register(Kind("distill", "Distill", "bksdm_ext.train.config:DistillConfig", "bksdm_ext.train.distill:train",
              help="distillation retraining of a BK-SDM student from an SD teacher (paper recipe defaults)"))
register(Kind("dreambooth", "DreamBooth", "bksdm_ext.train.config:DreamBoothConfig",
              "bksdm_ext.train.dreambooth:train",
              help="DreamBooth personalisation (full or LoRA) of a BK-SDM or SD model"))
register(Kind("convert", "Import / Convert", "bksdm_ext.jobs.convert_job:ConvertConfig",
              "bksdm_ext.jobs.convert_job:run",
              gpu=False, help="import a model (diffusers folder or single file) for the WebUI or diffusers"))
register(Kind("prune", "Prune", "bksdm_ext.jobs.prune_job:PruneConfig", "bksdm_ext.jobs.prune_job:run", gpu=False,
              help="remove blocks from an SD-1.x/2.x model without retraining (sd-nomid, or a layout spec)"))
register(Kind("sensitivity", "Block sensitivity", "bksdm_ext.sensitivity.job:SensitivityConfig",
              "bksdm_ext.sensitivity.job:run",
              help="how much each block of an SD teacher matters (BK-SDM App. C), and a layout for a target size"))
register(Kind("lcm", "Few-step (LCM)", "bksdm_ext.train.lcm_distill:LcmConfig", "bksdm_ext.train.lcm_distill:train",
              help="latent-consistency distillation of a BK-SDM or SD model into a 2-8 step one (LoRA or full)"))
register(Kind("evaluate", "Evaluate", "bksdm_ext.evaluate.config:EvaluateConfig", "bksdm_ext.evaluate.run:run",
              help="FID, IS, CLIP score and teacher distance of a teacher and its students, from local weights"))
_BUILTIN = frozenset(_KINDS)
