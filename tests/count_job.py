"""A tiny job kind for the runner's tests: counts steps, following the job contract of bksdm_ext/job.py
(progress.json, losses.csv, samples/, checkpoints/, the cancel request, `--resume latest`).

Adding a kind is this module (its config and run function) and one `kinds.register` line; the runner
runs it as `python -m bksdm_ext.job count --job-dir DIR [--resume latest]`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bksdm_ext import kinds
from bksdm_ext.job import JobFolder, Progress
from bksdm_ext.job_config import JobConfig, setting


@dataclass
class CountConfig(JobConfig):
    kind = "count"

    steps: int = setting(6, "How many steps to count.", label="Steps", group="Recipe", min=1)
    step_s: float = setting(0.2, "Seconds per step.", label="Seconds per step", group="Recipe", min=0.0)
    checkpoint_every: int = setting(2, "Save a checkpoint every N steps.", label="Checkpoint every", group="Output",
                                    min=1)
    label: str = setting("count", "Any text.", label="Label", group="Output")
    ignore_cancel: bool = setting(False, "Ignore the cancel file and SIGTERM (tests escalation).",
                                  label="Ignore cancel", group="Recipe", advanced=True)
    spawn_child: bool = setting(False, "Start a grandchild in its own session (tests tree kill).",
                                label="Spawn a child", group="Recipe", advanced=True)


def run(config: CountConfig, job_dir: Path, resume: str | None) -> str:
    job = JobFolder(job_dir)
    if config.ignore_cancel:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config.spawn_child:
        # in a session of its own, as torch elastic starts the ranks under `accelerate launch`
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        (job.root / "child.pid").write_text(str(child.pid))
    start, last_checkpoint = 0, None
    found = job.find_checkpoint(resume)
    if found is not None:
        last_checkpoint = str(found)
        start = json.loads((found / "state.json").read_text())["step"]
    print(f"count: starting at step {start} of {config.steps}", flush=True)
    t0 = time.time()

    def progress(state: str, step: int, message: str = "") -> None:
        rate = (step - start) / max(time.time() - t0, 1e-6)
        job.write_progress(Progress(
            state=state, step=step, total_steps=config.steps,
            losses={"task": 1.0 / (step + 1), "kd_out": 0.5 / (step + 1)},
            samples_per_s=rate, eta_s=(config.steps - step) / rate if rate else None,
            last_checkpoint=last_checkpoint, message=message, pid=os.getpid()).update())

    def checkpoint(step: int) -> str:
        final = job.checkpoints / f"step-{step:06d}"
        if final.exists():  # cancelled right at a checkpoint step
            return str(final)
        temp = job.partial_checkpoint_dir(step)
        temp.mkdir(parents=True, exist_ok=True)
        (temp / "state.json").write_text(json.dumps({"step": step}))
        os.replace(temp, final)
        return str(final)

    progress("running", start)
    for step in range(start + 1, config.steps + 1):
        time.sleep(config.step_s)
        with open(job.losses, "a") as f:
            if f.tell() == 0:
                f.write("step,task,kd_out,lr\n")
            f.write(f"{step},{1.0 / (step + 1)},{0.5 / (step + 1)},0.001\n")
        from PIL import Image

        Image.new("RGB", (16, 16), (step * 20 % 256, 80, 160)).save(job.samples / f"step-{step:06d}.png")
        if step % config.checkpoint_every == 0:
            last_checkpoint = checkpoint(step)
        print(f"count: step {step}", flush=True)
        if job.cancel_requested() and not config.ignore_cancel:
            last_checkpoint = checkpoint(step)
            progress("cancelled", step, "Cancelled.")
            return "cancelled"
        progress("running", step)
    (job.output / "result.txt").write_text(str(config.steps))
    progress("done", config.steps, "Counted.")
    return "done"


KIND = kinds.register(kinds.Kind("count", "Count", "count_job:CountConfig", "count_job:run", help="count (tests)"))
