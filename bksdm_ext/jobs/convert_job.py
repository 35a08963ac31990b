"""The Import / Convert job: `bksdm_ext.convert.convert` run as a job, so a multi-GB conversion never
blocks the WebUI's process or its memory. Follows the job contract of `runner.py`:
`python -m bksdm_ext.jobs.convert_job convert --job-dir DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BKSDMError

FORMS = ("webui", "diffusers")
VERSIONS = ("auto", "v1", "v2-base", "v2-768")


@dataclass
class ConvertConfig:
    """Import a model: a diffusers folder or a single file, written in the form the WebUI (or diffusers) loads."""

    kind = "convert"

    source: str = field(default="", metadata={
        "help": "A diffusers folder (e.g. a download of nota-ai/bk-sdm-small) or a .safetensors/.ckpt checkpoint."})
    to: str = field(default="webui", metadata={
        "help": "webui: one .safetensors with its .yaml beside it (LDM keys); diffusers: a pipeline folder.",
        "choices": FORMS})
    name: str = field(default="", metadata={"help": "Name of the result, without extension (empty = the source's)."})
    output_dir: str = field(default="", metadata={
        "help": "Where the result goes (empty = the job folder's output/)."})
    half: bool = field(default=True, metadata={"help": "Write fp16: half the size, as the WebUI runs it anyway."})
    version: str = field(default="auto", metadata={
        "help": "The SD version, when the source cannot tell (v2-base and v2-768 share shapes).", "choices": VERSIONS})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ConvertConfig":
        values = {k: v for k, v in values.items() if k != "kind"}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BKSDMError(f"Unknown convert setting(s): {', '.join(unknown)}.")
        for f in dataclasses.fields(cls):
            wanted = type(f.default)
            if f.name in values and not isinstance(values[f.name], wanted):
                raise BKSDMError(f"Setting {f.name} must be a {wanted.__name__}, not {values[f.name]!r}.")
        return cls(**values)

    def validate(self) -> None:
        from ..io import check_name, check_writable

        check_name(self.name, "name")
        if self.output_dir:
            check_writable(self.output_dir, "output_dir")
        if not self.source:
            raise BKSDMError("Set source: a diffusers folder or a .safetensors/.ckpt checkpoint.")
        source = Path(self.source).expanduser()
        if not source.exists():
            raise BKSDMError(f"source {self.source} does not exist: give a diffusers folder or a checkpoint file.")
        if source.is_file() and source.suffix.lower() not in (".safetensors", ".ckpt"):
            raise BKSDMError(f"source {self.source} is not a .safetensors or .ckpt checkpoint.")
        if self.to not in FORMS:
            raise BKSDMError(f"to must be one of {', '.join(FORMS)}, not {self.to!r}.")
        if self.version not in VERSIONS:
            raise BKSDMError(f"version must be one of {', '.join(VERSIONS)}, not {self.version!r}.")

    def destination(self, job_dir: Path) -> Path:
        source = Path(self.source).expanduser()
        stem = self.name or source.name.removesuffix(source.suffix if source.is_file() else "")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "bk-sdm"
        folder = Path(self.output_dir).expanduser() if self.output_dir else job_dir / "output"
        return folder / (f"{stem}.safetensors" if self.to == "webui" else stem)


def _progress(job_dir: Path, state: str, step: int, message: str, started: float, output: str | None = None) -> None:
    data = {"state": state, "step": step, "total_steps": 1, "losses": {}, "samples_per_s": None, "eta_s": None,
            "last_checkpoint": None, "last_sample": None, "message": message, "updated": time.time(),
            "pid": os.getpid(), "output": output, "elapsed_s": time.time() - started}
    from ..io import write_text

    write_text(job_dir / "progress.json", json.dumps(data, indent=1))


def run(job_dir: Path) -> int:
    from ..convert import convert
    from . import toml

    started = time.time()
    try:
        config = ConvertConfig.from_dict(toml.read(job_dir / "config.toml"))
        config.validate()
        target = config.destination(job_dir)
        if target.exists():
            raise BKSDMError(f"{target} already exists: choose another name or output folder.")
        _progress(job_dir, "running", 0, f"Converting {config.source}.", started)
        print(f"Converting {config.source} -> {target}", flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = convert(config.source, target, half=config.half,
                        version=None if config.version == "auto" else config.version)
    except BKSDMError as error:
        print(f"FAILED: {error}", file=sys.stderr, flush=True)
        _progress(job_dir, "failed", 0, str(error), started)
        return 1
    except Exception as error:  # a readable line in the tab; the traceback goes to the log
        traceback.print_exc()
        _progress(job_dir, "failed", 0, f"{type(error).__name__}: {error}", started)
        return 1
    for line in lines:
        print(line, flush=True)
    _progress(job_dir, "done", 1, f"Imported as {target}.", started, str(target))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bksdm_ext.jobs.convert_job")
    parser.add_argument("kind", choices=["convert"])
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--resume", default=None, help="accepted for the job contract; a conversion starts over")
    return run(parser.parse_args(argv).job_dir)


if __name__ == "__main__":
    sys.exit(main())
