"""Shared pieces of the training tests: a small captioned image folder, job folders, subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int = 8, size=(72, 80), seed: int = 0, metadata: bool = True) -> Path:
    """`count` random colour PNGs (and a metadata.jsonl with a caption each)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        # smooth colour fields rather than pure noise, so a model can fit them
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize(size, Image.BILINEAR)
        image.save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture of thing number {i}"})
    if metadata:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def small_settings(**overrides) -> dict:
    """Fast settings for tiny models: fp32, 64 px, no samples, one loader process."""
    settings = dict(resolution=64, train_batch_size=2, gradient_accumulation_steps=1, max_steps=4,
                    checkpoint_every=0, sample_every=0, log_every=1, num_workers=0, mixed_precision="no")
    settings.update(overrides)
    return settings


def one_thread_env() -> dict:
    """Environment for training subprocesses: tiny models run fastest on one thread, and offline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def run_module(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=one_thread_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TensorBoard event file in `log_dir` (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])  # 8 length + 4 crc, data, 4 crc
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def webui_apply_lora(model: torch.nn.Module, lora: dict, prefix: str, multiplier: float = 1.0) -> int:
    """What the WebUI's Lora extension does to a Linear or Conv2d: W += up @ down * alpha / rank * multiplier,
    with both flattened to matrices and the product shaped as W (its lyco_helpers.rebuild_conventional)."""
    modules = {prefix + name.replace(".", "_"): m for name, m in model.named_modules()}
    applied = 0
    for key in {k.split(".")[0] for k in lora}:
        module = modules[key.replace("lora_unet_", prefix, 1)]
        down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
        updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(module.weight.shape)
        with torch.no_grad():
            module.weight += updown * (lora[f"{key}.alpha"] / down.shape[0]) * multiplier
        applied += 1
    return applied


def progress(job_dir: Path) -> dict:
    return json.loads((job_dir / "progress.json").read_text())


@pytest.fixture
def one_thread():
    """Tiny models are overhead-bound; extra threads only contend (and this machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
