"""A tiny job kind for the runner's tests: counts steps, following the job contract of
bksdm_ext/jobs/runner.py to the letter (progress.json, losses.csv, samples/, checkpoints/, the
`cancel` file, `--resume latest`). Run as `python -m count_job count --job-dir DIR [--resume latest]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bksdm_ext.errors import BKSDMError
from bksdm_ext.jobs import toml
from bksdm_ext.jobs.kinds import JobKind


@dataclass
class CountConfig:
    steps: int = field(default=6, metadata={"help": "How many steps to count."})
    step_s: float = field(default=0.2, metadata={"help": "Seconds per step."})
    checkpoint_every: int = field(default=2, metadata={"help": "Save a checkpoint every N steps."})
    label: str = field(default="count", metadata={"help": "Any text."})
    ignore_cancel: bool = field(default=False, metadata={"help": "Ignore the cancel file and SIGTERM (tests escalation)."})
    spawn_child: bool = field(default=False, metadata={"help": "Start a grandchild in its own session (tests tree kill)."})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CountConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise BKSDMError(f"Unknown count settings: {', '.join(sorted(unknown))}.")
        return cls(**values)

    def validate(self) -> None:
        if self.steps < 1:
            raise BKSDMError("steps must be at least 1.")


KIND = JobKind("count", "Count", "count_job:CountConfig", module="count_job")


def write_json(path: Path, data: dict) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data))
    os.replace(temp, path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["count"])
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--resume")
    args = parser.parse_args(argv)
    job = args.job_dir
    config = CountConfig.from_dict(toml.read(job / "config.toml"))
    if config.ignore_cancel:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config.spawn_child:
        # in a session of its own, as torch elastic starts the ranks under `accelerate launch`
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        (job / "child.pid").write_text(str(child.pid))
    start, last_checkpoint = 0, None
    if args.resume == "latest":
        done = sorted((job / "checkpoints").glob("step-*"))
        if done:
            last_checkpoint = str(done[-1])
            start = json.loads((done[-1] / "state.json").read_text())["step"]
    print(f"count: starting at step {start} of {config.steps}", flush=True)
    t0 = time.time()

    def progress(state: str, step: int, message: str = "") -> None:
        rate = (step - start) / max(time.time() - t0, 1e-6)
        write_json(job / "progress.json", {
            "state": state, "step": step, "total_steps": config.steps,
            "losses": {"task": 1.0 / (step + 1), "kd_out": 0.5 / (step + 1)},
            "samples_per_s": rate, "eta_s": (config.steps - step) / rate if rate else None,
            "last_checkpoint": last_checkpoint, "last_sample": None, "message": message,
            "updated": time.time(), "pid": os.getpid()})

    def checkpoint(step: int) -> str:
        final = job / "checkpoints" / f"step-{step:06d}"
        if final.exists():  # cancelled right at a checkpoint step
            return str(final)
        temp = final.with_name(".tmp-" + final.name)
        temp.mkdir(parents=True, exist_ok=True)
        (temp / "state.json").write_text(json.dumps({"step": step}))
        os.replace(temp, final)
        return str(final)

    progress("running", start)
    for step in range(start + 1, config.steps + 1):
        time.sleep(config.step_s)
        with open(job / "losses.csv", "a") as f:
            if f.tell() == 0:
                f.write("step,task,kd_out,lr\n")
            f.write(f"{step},{1.0 / (step + 1)},{0.5 / (step + 1)},0.001\n")
        from PIL import Image

        Image.new("RGB", (16, 16), (step * 20 % 256, 80, 160)).save(job / "samples" / f"step-{step:06d}.png")
        if step % config.checkpoint_every == 0:
            last_checkpoint = checkpoint(step)
        print(f"count: step {step}", flush=True)
        if (job / "cancel").exists() and not config.ignore_cancel:
            last_checkpoint = checkpoint(step)
            progress("cancelled", step, "Cancelled.")
            return 0
        progress("running", step)
    (job / "output" / "result.txt").write_text(str(config.steps))
    progress("done", config.steps, "Counted.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
