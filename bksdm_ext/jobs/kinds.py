"""The kinds of job the runner can start: which typed config describes one and how it is run.

A kind's config class has `from_dict(dict)` and `to_dict()` (and may have `validate()`); its
process is `python -m MODULE KIND --job-dir DIR [--resume latest]` (the job contract, see runner).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import BKSDMError


@dataclass(frozen=True)
class JobKind:
    name: str
    title: str
    config_class: str  # "package.module:ClassName", imported only when needed
    module: str = "bksdm_ext.train"
    gpu: bool = True  # GPU jobs share the queue's GPU slots; others start at once

    def load_config_class(self) -> type:
        module_name, _, class_name = self.config_class.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise BKSDMError(f"{self.title} jobs are not available in this installation ({error}).") from None

    def build_config(self, values: dict[str, Any]) -> Any:
        """The typed config for `values`, validated; a BKSDMError says what to fix."""
        cls = self.load_config_class()
        try:
            config = cls.from_dict(values)
        except BKSDMError:
            raise
        except (TypeError, ValueError, KeyError) as error:
            raise BKSDMError(f"Invalid {self.title} settings: {error}") from None
        if hasattr(config, "validate"):
            config.validate()
        return config


BUILTIN_KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("distill", "Distill", "bksdm_ext.train.config:DistillConfig"),
        JobKind("dreambooth", "DreamBooth", "bksdm_ext.train.config:DreamBoothConfig"),
        JobKind("convert", "Import / Convert", "bksdm_ext.jobs.convert_job:ConvertConfig",
                module="bksdm_ext.jobs.convert_job", gpu=False),
    )
}

