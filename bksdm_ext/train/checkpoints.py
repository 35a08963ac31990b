"""Checkpoints of a training run and the random states they carry.

A checkpoint is `checkpoints/step-N/` of the job folder (`bksdm_ext.job` says what a complete one is):
the trainable weights and their EMA as safetensors, the optimiser state (plain tensors, loadable with
weights_only=True), one RNG file per rank and `state.json`, written last. It is written into a
dot-named temporary folder and renamed into place, so a kill at any moment leaves the previous one
whole. RNG states are saved and restored here rather than by accelerate (0.21's `load_state` silently
skips them under recent torch).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import disk_full, existing_parent, free_bytes, human_size, require_free_space, write_text
from ..job import JobFolder

FULL_DISK_BYTES = 16 << 20  # a write that failed with less than this left free is taken for a full disk


# --- random states ------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random state a step touches, as tensors (safetensors-storable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": torch.tensor([np_state[2], np_state[3], np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    pos, has_gauss, gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((3, tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- writing and reading -------------------------------------------------------------------------


def save_checkpoint(job_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], training: dict,
                    rng: dict[str, torch.Tensor], state: dict, keep: int, rank: int = 0, accelerator=None) -> Path:
    """Write checkpoints/step-N atomically: `tensors` groups to safetensors, the rest beside them.

    `training` (optimiser and scheduler state dicts) is plain tensors and numbers, loadable with
    weights_only=True. Every rank writes its own RNG file into the temp folder before the main
    process renames it.
    """
    folder = JobFolder(job_dir)
    root, final, tmp = folder.checkpoints, folder.checkpoint_dir(step), folder.partial_checkpoint_dir(step)
    main = rank == 0
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    try:
        save_file(rng, str(tmp / f"rng-{rank}.safetensors"))
        if main:
            for name, group in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in group.items()},
                          str(tmp / f"{name}.safetensors"))
            torch.save(training, tmp / "training.pt")
        _barrier(accelerator)
        if main:
            _fsync_dir_files(tmp)
            write_text(tmp / "state.json", json.dumps({**state, "step": step}, indent=1))
    except BaseException as error:
        # torch.save reports a full disk as "unexpected pos": read the disk before freeing the partial
        full = isinstance(error, Exception) and free_bytes(root) < FULL_DISK_BYTES
        if main:  # give the partial checkpoint's space back at once
            shutil.rmtree(tmp, ignore_errors=True)
        if full and not disk_full(error):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from error
        raise
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in folder.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def load_checkpoint(path: Path, rank: int = 0) -> tuple[dict, dict, dict, dict]:
    """(tensors by group, training state, RNG state of this rank, state.json)."""
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors") if not p.name.startswith("rng-")}
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng-{rank}.safetensors"
    rng = load_file(str(rng_file)) if rng_file.exists() else {}
    state = json.loads((path / "state.json").read_text())
    return tensors, training, rng, state


def exported_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a complete checkpoint that the job would export, and their group: the EMA where the
    run keeps one (distillation's student, LCM's target network), else the trained weights. Keys are
    `<module>.<parameter>` (`student.`, `unet.`, `text_encoder.`), as `loop.fit` names them."""
    group = "ema" if (path / "ema.safetensors").is_file() else "trainable"
    return load_file(str(path / f"{group}.safetensors")), group


# --- disk space ---------------------------------------------------------------------------------


def checkpoint_bytes(params, ema: bool, optimizer) -> int:
    """About what one checkpoint takes: the trainable weights, their fp32 EMA and AdamW's two moments."""
    weights = sum(p.numel() * p.element_size() for p in params)
    numel = sum(p.numel() for p in params)
    moments = 2 * numel * (1 if "8bit" in type(optimizer).__name__ else 4)
    return weights + (4 * numel if ema else 0) + moments


def checkpoints_needed(step: int, max_steps: int, every: int, keep: int, existing: int) -> int:
    """How many more checkpoints' worth of disk the rest of a run needs at its peak.

    The run writes one every `every` steps before `max_steps` and one at the end (or at a cancel); a
    new one is complete before the oldest beyond `keep` (0: keep all) is deleted.
    """
    writes = 1 + (len(range(every * (step // every + 1), max_steps, every)) if every else 0)
    if not keep:
        return writes
    return max(min(keep, existing + writes - 1) + 1 - existing, 1)


def check_disk_space(job_dir: Path, config, checkpoint_size: int, step: int,
                     output: tuple[Path, int] | None = None) -> str:
    """Refuse, before the first step, a run whose checkpoints (and finished model) cannot fit on disk.

    Returns what it checked, for the log.
    """
    count = checkpoints_needed(step, config.max_steps, config.checkpoint_every, config.checkpoints_keep,
                               len(JobFolder(job_dir).complete_checkpoints()))
    needs = [(JobFolder(job_dir).checkpoints, count * checkpoint_size,
              f"{count:,} checkpoint(s) of about {human_size(checkpoint_size)}")]
    if output is not None:
        needs.append((output[0], output[1], "the finished model"))
    by_disk: dict[int, list] = {}
    for path, size, what in needs:  # the output folder may lie on another disk
        where = existing_parent(path)
        entry = by_disk.setdefault(where.stat().st_dev, [path, where, 0, []])
        entry[2] += size
        entry[3].append(what)
    checked = []
    for path, where, size, what in by_disk.values():
        free = require_free_space(path, size, " and ".join(what),
                                  f"Free some space, lower checkpoints_keep (now {config.checkpoints_keep}; 0 keeps "
                                  "all), or put the job folder and output_dir on a larger disk.")
        checked.append(f"{' and '.join(what)}: up to {human_size(size)} of {human_size(free)} free under {where}")
    return "Disk: " + "; ".join(checked) + "."


def _barrier(accelerator):
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _fsync_dir_files(directory: Path) -> None:
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
