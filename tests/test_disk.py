"""Disk space: a job that cannot fit is refused before its first step; a disk that fills mid-job or
mid-conversion fails with a clear message and loses nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bksdm_ext.io import folder_bytes
from bksdm_ext.job import JobFolder, PARTIAL_PREFIX, run_job
from bksdm_ext.train import checkpoints
from bksdm_ext.train.config import MAX_STEPS, DistillConfig
from train_helpers import one_thread, one_thread_env, progress, run_module, small_settings, write_images  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def test_checkpoints_needed_counts_the_peak_of_writing_before_pruning():
    # steps 2, 4, 6, 8 and the end: five writes
    assert checkpoints.checkpoints_needed(0, 10, 2, keep=0, existing=0) == 5
    assert checkpoints.checkpoints_needed(0, 10, 2, keep=3, existing=0) == 4  # three kept + the one being written
    assert checkpoints.checkpoints_needed(0, 10, 2, keep=1, existing=0) == 2
    assert checkpoints.checkpoints_needed(4, 10, 2, keep=3, existing=2) == 2  # resumed: 6, 8, end; two held already
    assert checkpoints.checkpoints_needed(0, 10, 0, keep=3, existing=0) == 1  # only at the end (or a cancel)
    assert checkpoints.checkpoints_needed(0, 10, 2, keep=2, existing=5) == 1  # more held than kept: one at a time
    params = [torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(2, 5))]
    adamw = torch.optim.AdamW(params)
    assert checkpoints.checkpoint_bytes(params, True, adamw) == 20 * 4 * (1 + 1 + 2)  # weights, EMA, two moments
    assert checkpoints.checkpoint_bytes(params, False, adamw) == 20 * 4 * 3


def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_its_first_step(tmp_path, tiny_pipeline_v1, one_thread,
                                                                              capsys):
    data = write_images(tmp_path / "data", 2)
    job = tmp_path / "job"
    job.mkdir()
    # a checkpoint every step, all kept, for the most steps a job may have (10**7): hundreds of terabytes
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                  **small_settings(max_steps=MAX_STEPS, checkpoint_every=1, checkpoints_keep=0)).save(job / "config.toml")
    assert run_job("distill", job) == 1
    state = progress(job)
    assert state["state"] == "failed" and state["message"].startswith("Not enough disk space")
    assert "checkpoints_keep" in state["message"] and "checkpoint(s) of about" in state["message"]
    assert not state.get("step") and not (job / "losses.csv").exists() and not JobFolder(job).complete_checkpoints()

    # keeping two is what the disk allows: the same job then runs
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                  **small_settings(max_steps=2, checkpoint_every=1, checkpoints_keep=2)).save(job / "config.toml")
    capsys.readouterr()
    assert run_job("distill", job) == 0 and progress(job)["state"] == "done"
    # what was checked is in the log: steps 1 and 2 each write one, both kept
    assert re.search(r"Disk: 2 checkpoint\(s\) of about [\d.]+ MB and the finished model: up to [\d.]+ MB of "
                     r"[\d.]+ [GT]B free under ", capsys.readouterr().out)


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 MB file system (tmpfs) that tests can fill; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of `disk`'s free space."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
    return filler


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_clearly_and_keeps_the_last_checkpoint(tmp_path, tiny_pipeline_v1, small_disk):
    data = write_images(tmp_path / "data", 4)
    job = small_disk / "job"
    job.mkdir()
    settings = small_settings(max_steps=12, checkpoint_every=1, checkpoints_keep=0, log_every=10**6)
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings).save(job / "config.toml")
    process = subprocess.Popen([sys.executable, "-m", "bksdm_ext.job", "distill", "--job-dir", str(job)], cwd=REPO,
                               env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import time

        end = time.time() + 240
        while len(JobFolder(job).complete_checkpoints()) < 2:
            assert process.poll() is None, process.stdout.read()
            assert time.time() < end, "timed out"
            time.sleep(0.02)
        process.send_signal(signal.SIGSTOP)  # nothing is written or freed while the disk fills
        size = folder_bytes(JobFolder(job).complete_checkpoints()[0])
        filler = _fill(small_disk, leave=size // 2)  # the next checkpoint cannot fit
        process.send_signal(signal.SIGCONT)
        output, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 1, output
    state = progress(job)
    last = JobFolder(job).complete_checkpoints()[-1]
    assert state["state"] == "failed", output
    assert state["message"].startswith("The disk is full") and f"{last.name}, is intact" in state["message"]
    assert not list((job / "checkpoints").glob(f"{PARTIAL_PREFIX}*")), "the partial checkpoint is removed"
    # ... and its space given back: all that was left free, but the few pages of progress.json and the like
    assert shutil.disk_usage(small_disk).free >= size // 2 - (64 << 10)
    tensors, training, rng, saved = checkpoints.load_checkpoint(last)
    assert saved["step"] == int(last.name.split("-")[1]) and "optimizer" in training and rng

    # free the space, resume from that checkpoint: the job finishes
    os.unlink(filler)
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                  **{**settings, "max_steps": saved["step"] + 1}).save(job / "config.toml")
    result = run_module(["bksdm_ext.job", "distill", "--job-dir", str(job), "--resume", "latest"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resumed from {last}" in result.stdout and progress(job)["state"] == "done"


def test_the_latent_cache_is_refused_when_its_disk_is_too_small(tmp_path, tiny_pipeline_v1, small_disk, one_thread):
    from bksdm_ext.train import distill

    data = write_images(tmp_path / "data", 4)
    _fill(small_disk, leave=8 << 10)  # the cache of four pairs takes about 20 KB
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), cache=True,
                           cache_dir=str(small_disk / "cache"), **small_settings(max_steps=1))
    with pytest.raises(Exception, match="Not enough disk space: the latent cache needs about .* turn the cache off"):
        distill.train(config, tmp_path / "job")


def test_converting_onto_a_full_disk_says_so_and_leaves_nothing_behind(tiny_pipeline_v1, small_disk, capsys):
    from bksdm_ext.cli import main

    out = small_disk / "models"
    out.mkdir()
    (out / "kept.safetensors").write_bytes(b"an earlier file")
    filler = _fill(small_disk, leave=256 << 10)  # far less than the model
    assert main(["convert", str(tiny_pipeline_v1), str(out / "tiny.safetensors")]) == 2
    message = capsys.readouterr().err
    assert "The disk is full: tiny.safetensors (about" in message and "Free some space" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["kept.safetensors"]  # no temp file, the other one untouched
    assert (out / "kept.safetensors").read_bytes() == b"an earlier file"

    # to a folder: the half-built folder goes too
    assert main(["convert", str(tiny_pipeline_v1), str(out / "tiny-folder")]) == 2
    message = capsys.readouterr().err
    assert "The disk is full: tiny-folder could not be written" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["kept.safetensors"]

    os.unlink(filler)
    assert main(["convert", str(tiny_pipeline_v1), str(out / "tiny.safetensors")]) == 0
    assert main(["convert", str(tiny_pipeline_v1), str(out / "tiny-folder")]) == 0
