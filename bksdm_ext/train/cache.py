"""A one-pass cache of VAE latents and text embeddings, in safetensors shards.

Encoding every image and caption once removes the VAE and text-encoder passes from each training
step (about a fifth of the official code's step, BKSDM.md §3). The cache folder is named by a hash of
the data (file names, sizes, modification times, captions), the preprocessing and the two encoders'
weights, so a change to any of them makes a new cache and an unchanged one is reused by any job.
Latents are the posterior mean of the center crop. For random flips the flipped crop is encoded too
(the VAE is not flip-equivariant, so flipping a latent is not flipping the image): about a fifth more
space, and each flip is the one the image pipeline would have made.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from safetensors import safe_open

from ..io import write_safetensors
from .data import augment, open_rgb, reject_reason
from .models import encode_images, encode_prompts

SHARD = 512  # pairs per shard file


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bksdm" / "latents"


def bytes_per_pair(resolution: int, text_dim: int, max_tokens: int, flipped: bool = False) -> int:
    """fp16 latent (4 × (R/8)²; twice with the flipped crop) plus fp16 text embedding (tokens × width)."""
    return 2 * ((1 + flipped) * 4 * (resolution // 8) ** 2 + max_tokens * text_dim)


def cache_key(items, resolution: int, parts: dict, flipped: bool = False) -> str:
    h = hashlib.sha256()
    h.update(f"v1 {resolution}{' flipped' if flipped else ''}".encode())
    for path, caption in items:
        stat = path.stat()
        h.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{caption}\n".encode())
    for name in ("vae", "text_encoder"):
        h.update(_model_fingerprint(parts[name]).encode())
    return h.hexdigest()[:20]


def _model_fingerprint(model) -> str:
    """Config plus a few weight statistics: cheap, and any retrained or swapped model changes it."""
    h = hashlib.sha256(json.dumps(model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config),
                                  sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in list(model.parameters())[::7]:
            h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """The shards of one cache folder; `build()` fills missing shards, resumable after a kill."""

    def __init__(self, root: Path, key: str, items, resolution: int, flipped: bool = False):
        self.dir, self.items, self.resolution, self.flipped = Path(root) / key, items, resolution, flipped
        self.shards = (len(items) + SHARD - 1) // SHARD

    def shard_path(self, i: int) -> Path:
        return self.dir / f"shard-{i:05d}.safetensors"

    @property
    def complete(self) -> bool:
        return all(self.shard_path(i).exists() for i in range(self.shards))

    def build(self, parts: dict, device, rank: int = 0, world: int = 1, log=print) -> None:
        """Encode this rank's missing shards (shard i belongs to rank i % world)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(rank, self.shards, world):
            if self.shard_path(i).exists():
                continue
            chunk = list(enumerate(self.items[i * SHARD : (i + 1) * SHARD], start=i * SHARD))
            latents, flipped, texts, kept = [], [], [], []
            for start in range(0, len(chunk), 16):
                group = [(j, path, caption) for j, (path, caption) in chunk[start : start + 16]
                         if reject_reason(path, max(1, self.resolution // 2)) is None]
                if not group:
                    continue
                pixels = torch.stack([augment(open_rgb(p), self.resolution, True, False, random.Random(0))
                                      for _, p, _ in group])
                with torch.inference_mode():
                    latents.append(encode_images(parts["vae"], pixels, sample=False).to(torch.float16).cpu())
                    if self.flipped:
                        flipped.append(encode_images(parts["vae"], pixels.flip(-1), sample=False)
                                       .to(torch.float16).cpu())
                    texts.append(encode_prompts(parts["tokenizer"], parts["text_encoder"], [c for _, _, c in group],
                                                device).to(torch.float16).cpu())
                kept += [j for j, _, _ in group]
            tensors = {"index": torch.tensor(kept, dtype=torch.int64)}
            if kept:
                tensors.update(latents=torch.cat(latents).contiguous(), text=torch.cat(texts).contiguous())
                if flipped:
                    tensors["latents_flipped"] = torch.cat(flipped).contiguous()
            write_safetensors(self.shard_path(i), tensors)
            log(f"cache shard {i + 1}/{self.shards}: {len(kept)} of {len(chunk)} pairs usable")

    def dataset(self, random_flip: bool, seed: int) -> "CachedPairs":
        return CachedPairs([self.shard_path(i) for i in range(self.shards)], random_flip, seed)


class CachedPairs:
    """Dataset over the cache's shards, read lazily: (latent, text embedding), of the flipped crop at random."""

    def __init__(self, shards: list[Path], random_flip: bool, seed: int):
        self.shards, self.random_flip, self.seed = shards, random_flip, seed
        self.rows = []  # (shard number, row in shard, item index)
        for number, path in enumerate(shards):
            with safe_open(str(path), "pt") as f:
                self.rows += [(number, row, int(i)) for row, i in enumerate(f.get_tensor("index"))]
        self._open = {}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch, position = key
        number, row, index = self.rows[position]
        if number not in self._open:
            # numpy slices: safetensors 0.4's torch slicing indexes in a way recent torch deprecates
            self._open[number] = safe_open(str(self.shards[number]), "np")
        shard = self._open[number]
        flip = self.random_flip and random.Random(f"{self.seed}:{epoch}:{index}").random() < 0.5
        latent = shard.get_slice("latents_flipped" if flip else "latents")[row : row + 1][0]
        text = shard.get_slice("text")[row : row + 1][0]
        return {"latents": torch.from_numpy(latent), "text": torch.from_numpy(text), "index": index}
