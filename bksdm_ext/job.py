"""The job contract: what a job folder holds, and the one process that runs a job in it.

A job is `python -m bksdm_ext.job KIND --job-dir DIR [--resume latest]` (through `accelerate launch`
when more than one process or machine is configured). Its folder DIR holds:

- `config.toml`: what the user asked (`kind = "..."` and the kind's settings); the job reads it;
- `progress.json`: a `Progress`, written atomically by the job, read by the runner, API and tab;
- `log.txt`: the process's stdout and stderr (the runner appends them);
- `losses.csv` and `tb/`: the loss terms per step (CSV and TensorBoard events);
- `checkpoints/step-<int>/`: complete checkpoints hold `state.json`; one being written has a dot-name
  (`.tmp-step-<int>`) until it is renamed, so a kill never leaves one that looks complete;
- `samples/`: validation images;
- `output/`: the finished model's diffusers copy and, unless the config names another output folder,
  its single-file checkpoint and yaml (`Outputs` says where each goes);
- `outputs.json`: every output path the job has written (a continued job may replace its own outputs,
  never a foreign file);
- `cancel`: a cancel request; the job saves a checkpoint at its next step, writes state "cancelled"
  and exits 0.

`run_job` loads the config through the kind registry, validates and runs it, and makes
progress.json tell the outcome: done, cancelled, or failed with a readable message (the traceback
goes to the log). Exit code 0 for done or cancelled, 1 for failed.

Core level: imports nothing from train/, jobs/, ui/ or webui/.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BKSDMError

CHECKPOINT_PREFIX = "step-"
PARTIAL_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"  # a checkpoint being written; renamed to step-N when complete
STATES = ("running", "done", "failed", "cancelled")  # what a job writes; the runner adds its own


# --- the folder ---------------------------------------------------------------------------------


class JobFolder:
    """The paths of a job folder (see the module's docstring); creating or reading nothing by itself."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"JobFolder({str(self.root)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    config = property(lambda self: self.root / "config.toml")
    progress_file = property(lambda self: self.root / "progress.json")
    log = property(lambda self: self.root / "log.txt")
    losses = property(lambda self: self.root / "losses.csv")
    cancel_file = property(lambda self: self.root / "cancel")
    checkpoints = property(lambda self: self.root / "checkpoints")
    samples = property(lambda self: self.root / "samples")
    tb = property(lambda self: self.root / "tb")
    output = property(lambda self: self.root / "output")
    class_images = property(lambda self: self.root / "class_images")  # DreamBooth's generated class images
    owned_outputs = property(lambda self: self.root / "outputs.json")

    def create(self) -> "JobFolder":
        """Make the folder and its checkpoints/, samples/ and output/."""
        for sub in (self.checkpoints, self.samples, self.output):
            sub.mkdir(parents=True, exist_ok=True)
        return self

    # progress

    def read_progress(self) -> "Progress":
        return Progress.read(self.progress_file)

    def write_progress(self, progress: "Progress") -> None:
        progress.write(self.progress_file)

    # checkpoints

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    def partial_checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"{PARTIAL_PREFIX}{step}"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints (`step-<int>/` holding state.json), oldest first."""
        found = []
        try:
            entries = list(self.checkpoints.iterdir())
        except OSError:
            return []
        for p in entries:
            step = checkpoint_step(p)
            if step is not None and (p / "state.json").is_file():
                found.append((step, p))
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def has_checkpoint(self) -> bool:
        return self.latest_checkpoint() is not None

    def find_checkpoint(self, resume: str | None) -> Path | None:
        """`latest` → newest complete checkpoint (None if none yet); a path or `step-N` → that one."""
        if not resume:
            return None
        if resume == "latest":
            return self.latest_checkpoint()
        path = Path(resume)
        if not path.is_absolute():
            path = self.checkpoints / resume
        if not (path / "state.json").is_file():
            raise BKSDMError(f"No complete checkpoint at {path}: use --resume latest or a checkpoints/step-N folder.")
        return path

    def remove_partial_checkpoints(self) -> None:
        """Delete the temp folders of checkpoints whose writing was killed: never loadable, often gigabytes."""
        for partial in self.checkpoints.glob(f"{PARTIAL_PREFIX}*") if self.checkpoints.is_dir() else ():
            shutil.rmtree(partial, ignore_errors=True)

    # cancel request

    def request_cancel(self) -> None:
        self.cancel_file.touch()

    def cancel_requested(self) -> bool:
        return self.cancel_file.exists()

    def clear_cancel(self) -> None:
        try:
            self.cancel_file.unlink()
        except OSError:
            pass

    # losses

    def read_losses(self) -> list[dict[str, float]]:
        """The rows of losses.csv as numbers ([] before the first)."""
        try:
            with open(self.losses, newline="", encoding="utf-8") as f:
                return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        except FileNotFoundError:
            return []


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint's folder name `step-<int>`; None for any other name."""
    name = Path(path).name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


# --- progress -----------------------------------------------------------------------------------


@dataclass
class Progress:
    """progress.json: what a job reports. Every reader goes through `read`, every writer through `write`."""

    state: str = ""  # "" before the job wrote one; then one of STATES
    step: int = 0
    total_steps: int = 0
    losses: dict = field(default_factory=dict)
    samples_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    last_sample: str | None = None
    message: str = ""
    updated: float = 0.0
    pid: int | None = None
    output: str | None = None  # the finished model (single file, or folder)
    elapsed_s: float | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Progress":
        """The progress in `path`; defaults where there is none, or it is half written or not valid."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        return cls.from_dict(data) if isinstance(data, dict) else cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Progress":
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data and _fits(f, data[f.name]):
                values[f.name] = data[f.name]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public(self) -> dict[str, Any]:
        """What the REST API and the tab show of it (the runner's record says state and message)."""
        return {name: getattr(self, name) for name in PUBLIC_PROGRESS}

    def write(self, path: str | os.PathLike) -> None:
        """Write atomically (readers see the old progress or the new one)."""
        from .io import write_text

        write_text(path, json.dumps(self.to_dict(), indent=1))

    def update(self, **fields) -> "Progress":
        """Set `fields` and `updated` (now); returns self."""
        for name, value in fields.items():
            if name not in _PROGRESS_FIELDS:
                raise KeyError(f"progress.json has no field {name!r}")
            setattr(self, name, value)
        self.updated = time.time()
        return self


_PROGRESS_FIELDS = frozenset(f.name for f in dataclasses.fields(Progress))
PUBLIC_PROGRESS = ("step", "total_steps", "losses", "samples_per_s", "eta_s", "last_checkpoint", "last_sample",
                   "output", "updated")


def _fits(f: dataclasses.Field, value: Any) -> bool:
    text = str(f.type)
    if value is None:
        return "None" in text
    if text.startswith("dict"):
        return isinstance(value, dict)
    if text.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if text.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


# --- where the outputs go -----------------------------------------------------------------------


class Outputs:
    """Where a job's finished model goes, defined once.

    - the single-file WebUI checkpoint `NAME.safetensors` and its `NAME.yaml`: in `output_dir` when the
      config names one (the WebUI's models folder), else in the job's output/;
    - the diffusers copy `NAME/` (and a LoRA's diffusers file `NAME-diffusers/`): always in the job's
      output/, never in the WebUI's models folder.

    The job folder's `outputs.json` lists what the job wrote. A path that exists is the job's own when
    it lies in the job folder or is listed there; `claim` refuses a foreign one.
    """

    def __init__(self, folder: JobFolder | str | os.PathLike, output_dir: str | os.PathLike = "", name: str = ""):
        self.folder = folder if isinstance(folder, JobFolder) else JobFolder(folder)
        self.dir = Path(output_dir).expanduser() if output_dir else self.folder.output
        self.name = name

    @property
    def single(self) -> Path:
        return self.dir / f"{self.name}.safetensors"

    @property
    def yaml(self) -> Path:
        return self.dir / f"{self.name}.yaml"

    @property
    def diffusers(self) -> Path:
        return self.folder.output / self.name

    @property
    def lora_diffusers(self) -> Path:
        return self.folder.output / f"{self.name}-diffusers"

    def owned(self) -> set[str]:
        try:
            data = json.loads(self.folder.owned_outputs.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return {str(p) for p in data.get("outputs", [])} if isinstance(data, dict) else set()

    def is_ours(self, path: Path) -> bool:
        path = Path(path).absolute()
        root = self.folder.root.absolute()
        return path == root or root in path.parents or str(path) in self.owned()

    def check_free(self, *paths: Path) -> None:
        """Refuse, before any work, a path that exists and is not this job's own."""
        for path in paths:
            if (path.exists() or path.is_symlink()) and not self.is_ours(path):
                raise BKSDMError(f"{path} already exists: choose another name (output_name) or output folder.")

    def claim(self, *paths: Path) -> None:
        """Remove this job's earlier `paths` and record them as its own, before it writes them.

        A path that exists and is not the job's own is refused (BKSDMError), and nothing is removed.
        """
        from .io import write_json

        self.check_free(*paths)
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        owned = self.owned() | {str(Path(p).absolute()) for p in paths}
        write_json(self.folder.owned_outputs, {"outputs": sorted(owned)})


# --- the job process ----------------------------------------------------------------------------


def run_job(kind_name: str, job_dir: str | os.PathLike, resume: str | None = None) -> int:
    """Run the job in `job_dir` (its config.toml) and keep progress.json's state true to the outcome.

    Returns the exit code: 0 for done or cancelled, 1 for failed (the message is in progress.json).
    """
    from . import kinds

    folder = JobFolder(job_dir)
    try:
        kind = kinds.get(kind_name)
        config = kind.config_class().load(folder.config)
        config.validate()
        outcome = kind.run_function()(config, folder.root, resume)
    except BKSDMError as error:
        return _fail(folder, str(error))
    except Exception as error:  # any other failure: readable line in progress, traceback in the log
        traceback.print_exc()
        return _fail(folder, failure_message(error, folder))
    return 0 if outcome in ("done", "cancelled") else 1


def failure_message(error: BaseException, folder: JobFolder) -> str:
    from .io import disk_full

    if disk_full(error):
        last = folder.latest_checkpoint()
        kept = f"the last complete checkpoint, {last.name}, is intact" if last else "no checkpoint was saved yet"
        where = getattr(error, "filename", None) or folder.root
        return (f"The disk is full (writing under {where}): {kept}. Free some space "
                f"(or lower checkpoints_keep), then resume the job.")
    return f"{type(error).__name__}: {error}"


def _fail(folder: JobFolder, message: str) -> int:
    print(f"FAILED: {message}", file=sys.stderr, flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        progress = folder.read_progress().update(state="failed", message=message, pid=os.getpid())
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
            folder.write_progress(progress)
        except OSError as error:  # a full disk: the message above is in the log, the exit code tells the runner
            print(f"progress.json not updated: {error}", file=sys.stderr, flush=True)
    return 1


def job_command(kind_name: str, job_dir: str | os.PathLike, resume: bool) -> list[str]:
    """The arguments after `python` that run a job (the runner adds `accelerate launch` in front)."""
    return ["-m", "bksdm_ext.job", kind_name, "--job-dir", str(job_dir)] + (["--resume", "latest"] if resume else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bksdm_ext.job",
                                     description="Run the job in a job folder (its config.toml).")
    parser.add_argument("kind", help="The job's kind (see bksdm_ext.kinds).")
    parser.add_argument("--job-dir", required=True, type=Path, help="The job folder, with config.toml in it.")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest complete checkpoint, or a fresh start if none) or a checkpoint folder.")
    args = parser.parse_args(argv)
    return run_job(args.kind, args.job_dir, args.resume)


if __name__ == "__main__":
    sys.exit(main())
