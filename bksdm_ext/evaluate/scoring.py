"""Scoring an evaluation's images: FID and IS (one Inception pass per model), CLIP score, teacher distance."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..job import JobFolder
from . import metrics
from .config import EvaluateConfig


def score(config: EvaluateConfig, folder: JobFolder, prompts: list[str], names, say: Callable[[str], None] = print,
          ) -> dict:
    """{"models": [per model: metric -> value], "reference": {...} | None, "weights": {...}}."""
    from .run import image_path, resolve_device

    device, _ = resolve_device(config)
    images_root = folder.root / "images"
    files = [[image_path(images_root, k, i) for i in range(len(prompts))] for k in range(len(config.models))]
    scores: list[dict] = [{"images": len(prompts)} for _ in config.models]
    out: dict = {"models": scores, "reference": None, "weights": {}}
    if "fid" in names or "is" in names:
        inception = metrics.Inception(config.inception, device)
        out["weights"]["inception"] = {"file": str(inception.file), "sha256": inception.sha256}
        reference = None
        if "fid" in names:
            say(f"FID reference: {config.reference}")
            reference = _reference(config, folder, inception)
            out["reference"] = {"source": config.reference, "images": reference.images, "variant": reference.variant}
        for k, model_files in enumerate(files):
            say(f"Inception features of model {k + 1}/{len(files)}")
            features = inception.features(model_files)
            if reference is not None:
                scores[k]["fid"] = metrics.frechet_distance(metrics.FIDStatistics.of(features), reference)
            if "is" in names:
                scores[k]["is"], scores[k]["is_std"] = metrics.inception_score(inception.logits(features))
                scores[k]["is_splits"] = metrics.is_splits(len(features))
        del inception
    clip_embeddings = None
    if config.clip_weights and ("clip" in names or "teacher-distance" in names):
        say(f"Loading CLIP {config.clip_model} from {config.clip_weights}")
        clip = metrics.Clip(config.clip_weights, config.clip_model, device)
        out["weights"]["clip"] = {"model": clip.name, "file": str(clip.weights), "sha256": clip.sha256}
        clip_embeddings = []
        texts = clip.text_embeddings(prompts) if "clip" in names else None
        for k, model_files in enumerate(files):
            say(f"CLIP embeddings of model {k + 1}/{len(files)}")
            clip_embeddings.append(clip.image_embeddings(model_files))
            if texts is not None:
                scores[k]["clip"] = metrics.clip_score(clip_embeddings[k], texts)
        del clip
    if "teacher-distance" in names:
        for k, model_files in enumerate(files):
            say(f"Teacher distance of model {k + 1}/{len(files)}")
            pair = (clip_embeddings[0], clip_embeddings[k]) if clip_embeddings else None
            distance = metrics.teacher_distance(files[0], model_files, embeddings=pair)
            scores[k]["pixel_mse"] = distance.pixel_mse
            if distance.clip_image_similarity is not None:
                scores[k]["clip_image_similarity"] = distance.clip_image_similarity
    return out


def _reference(config: EvaluateConfig, folder: JobFolder, inception: metrics.Inception) -> metrics.FIDStatistics:
    """The reference statistics; a folder's are computed once per job (kept as reference-stats.npz)."""
    source = Path(config.reference).expanduser()
    if source.suffix == ".npz":
        return metrics.FIDStatistics.load(source)
    cached = folder.root / "reference-stats.npz"
    if cached.is_file():
        stats = metrics.FIDStatistics.load(cached)
        if stats.source == str(source):
            return stats
    stats = metrics.reference_statistics(source, inception)
    stats.save(cached)
    return stats
