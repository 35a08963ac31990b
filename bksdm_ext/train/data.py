"""Training data: an image folder with metadata.jsonl / metadata.csv (the LAION-Aesthetics layout).

Preprocessing follows the paper: resize the shorter side, crop (center or random), random flip,
scale to [-1, 1]. Unusable items (a file name that is not text or leaves the folder, a missing file
or caption, a broken or truncated image, one over the decompression-bomb pixel limit, grayscale,
tiny) are skipped and counted in the log and progress.json, never fatal; a dataset without one usable item is refused before any model loads.
Augmentation randomness comes from (seed, epoch, index) alone, so a resumed run sees the same data.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BKSDMError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Metadata:
    items: list[tuple[Path, str]]  # (image path, caption)
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def read_metadata(folder: str, image_column: str = "file_name", caption_column: str = "text") -> Metadata:
    """The (image, caption) pairs of an image folder; raises BKSDMError if there are none."""
    root = Path(folder) if folder else None
    if root is None or not root.is_dir():
        raise BKSDMError(f"Data folder {folder!r} does not exist: give a folder with images and metadata.jsonl.")
    rows = _metadata_rows(root)
    meta = Metadata(items=[])
    inside = root.resolve()
    for row in rows:
        name, caption = row.get(image_column), row.get(caption_column)
        if name is None or name == "":
            meta.skipped["no file name"] += 1
        elif not isinstance(name, str):
            meta.skipped["file name not text"] += 1
        elif not isinstance(caption, str) or not caption.strip():
            meta.skipped["missing caption"] += 1
        elif not (root / name).resolve().is_relative_to(inside):
            meta.skipped["file outside the data folder"] += 1
        elif not (root / name).is_file():
            meta.skipped["missing file"] += 1
        else:
            meta.items.append((root / name, caption.strip()))
    if not meta.items:
        reasons = ", ".join(f"{n} {r}" for r, n in meta.skipped.items()) or "no rows"
        raise BKSDMError(f"The dataset in {root} has no usable pair ({reasons}): each row needs "
                         f"'{image_column}' naming an existing image and a non-empty '{caption_column}'.")
    return meta


def _metadata_rows(root: Path) -> list[dict]:
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    try:
        if jsonl.is_file():
            rows = []
            for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise BKSDMError(f"{jsonl} line {number} is not JSON: fix or delete that line.") from None
            return [r for r in rows if isinstance(r, dict)]
        if table.is_file():
            with open(table, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as error:
        raise BKSDMError(f"Cannot read the metadata in {root}: {error}") from None
    raise BKSDMError(f"{root} has no metadata.jsonl or metadata.csv (one row per image: file_name, text).")


def list_images(folder: str, name: str, allow_empty: bool = False) -> list[Path]:
    """The images of a plain folder (DreamBooth); refuses other files, and an empty folder unless allowed."""
    root = Path(folder) if folder else None
    if root is None or not root.is_dir():
        raise BKSDMError(f"{name} {folder!r} is not a folder: give a folder of images.")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise BKSDMError(f"{name} {root} holds files that are not images: {', '.join(others[:5])}. "
                         f"Keep only {', '.join(IMAGE_SUFFIXES)} files there.")
    broken = [p.name for p in files if reject_reason(p, 1) in ("broken image", "too many pixels")]
    if broken:
        raise BKSDMError(f"{name}: cannot read these images (broken, truncated or over {max_pixels():,} pixels): "
                         f"{', '.join(broken[:5])}. Replace or remove them.")
    if not files and not allow_empty:
        raise BKSDMError(f"{name} {root} holds no images.")
    return files


def max_pixels() -> int:
    """The largest image decoded: Pillow's decompression-bomb limit (89 megapixels unless the user set it).

    Pillow only warns below twice that, and a 12000x12000 PNG of a few hundred KB would decode to gigabytes.
    """
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or 89_478_485


def reject_reason(path: Path, min_side: int) -> str | None:
    """Why an image cannot be trained on (broken, too many pixels, grayscale, too small), or None if it can."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the check below counts it as a skip instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
        with image:
            mode, size = image.mode, image.size
            if size[0] * size[1] > max_pixels():
                return "too many pixels"
            image.load()
    except Image.DecompressionBombError:  # over twice the limit: Pillow refuses at open
        return "too many pixels"
    except Exception:  # PIL raises many types for a broken or truncated file
        return "broken image"
    if mode in ("1", "L", "LA", "I", "I;16", "F"):
        return "grayscale"
    if min(size) < min_side:
        return "too small"
    return None


def open_rgb(path: Path):
    """The image as RGB (palette and alpha images are colour images too)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def augment(image, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Resize the shorter side to `resolution`, crop a square, maybe flip; a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CaptionedImages:
    """Map-style dataset keyed by (epoch, index): image tensor and caption, or the reason it was skipped."""

    def __init__(self, items, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.items, self.resolution = items, resolution
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.min_side = max(1, resolution // 2)  # more than 2x upscaling is too blurry to learn from

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key
        path, caption = self.items[index]
        reason = reject_reason(path, self.min_side)
        if reason:
            return {"skipped": reason, "index": index}
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        pixels = augment(open_rgb(path), self.resolution, self.center_crop, self.random_flip, rng)
        return {"pixels": pixels, "caption": caption, "index": index}


class ResumableSampler:
    """Endless stream of (epoch, index) for one rank: a seeded shuffle per epoch, starting at `start`.

    Every rank walks the same permutation and takes every `world`-th item, so the data position of a
    run is one number (items consumed per rank) and resuming needs nothing else.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world, self.start, self.shuffle = size, seed, rank, world, start, shuffle

    def __iter__(self):
        import torch

        per_epoch = max(1, self.size // self.world)  # equal share per rank; the remainder waits for the next epoch
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            if self.shuffle:
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            else:
                order = list(range(self.size))
            mine = (order * self.world)[self.rank :: self.world][:per_epoch]  # repeats only when size < world
            for index in mine[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0


def collate(samples: list[dict]) -> dict:
    """Stack the usable samples field by field (tensors stacked, numbers as a tensor, text as a list);
    count the skipped ones by reason."""
    import torch

    good = [s for s in samples if "skipped" not in s]
    batch = {"skipped": dict(Counter(s["skipped"] for s in samples if "skipped" in s)), "count": len(good)}
    for key in good[0] if good else ():
        values = [s[key] for s in good]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class Batches:
    """This rank's endless stream of non-empty micro-batches; `position` counts loader batches consumed,
    which is all a checkpoint needs to resume the data where it stopped."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0,
                 num_workers: int = 0):
        import torch
        from torch.utils.data import DataLoader

        sampler = ResumableSampler(len(dataset), seed, rank, world, start * batch_size)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                 num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
        self.position, self._batches = start, iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        skipped = Counter()
        for _ in range(1000):
            batch = next(self._batches)
            self.position += 1
            skipped.update(batch["skipped"])
            if batch["count"]:
                batch["skipped"] = dict(skipped)
                return batch
        raise BKSDMError(f"No usable image in 1000 batches in a row ({dict(skipped)}): check the dataset.")


def batch_source(dataset, config, accelerator):
    """`make_batches(start)` for `loop.fit`: this rank's micro-batches of `dataset` from loader position start."""
    def make_batches(start: int) -> Batches:
        return Batches(dataset, config.train_batch_size, config.seed, accelerator.process_index,
                       accelerator.num_processes, start, config.num_workers)

    return make_batches
