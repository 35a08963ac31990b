"""FID, IS and CLIP score from local weight files, and the distance of a student to its teacher.

Nothing here downloads: every network is read from a file the user has, and a missing file is one
BKSDMError naming it and where to get it.

- FID: clean-fid 0.1.35 in its "clean" mode (PIL bicubic resize to 299 px in float, no quantisation),
  on the pool3 features of Inception-v3 (TensorFlow's 2015-12-05 graph as stylegan2-ada's TorchScript),
  then the Fréchet distance (computed as clean-fid's, faster: see `frechet_distance`). The paper (BK-SDM §5) used pytorch-fid on 30K images against the 41K
  MS-COCO val2014 statistics: a FID of another variant, N or reference is a different number.
- IS: from the same network, softmax of the logits without the output bias (as the original TF code,
  stylegan2-ada and torch-fidelity), 10 splits: one weight file for FID and IS.
- CLIP score: mean cosine similarity of each image's and its caption's open_clip embeddings (not x100,
  not clipped at 0: the scale of the paper's 0.2958).
- Teacher distance: at the same prompts and seeds, the pixel MSE of the 256 px images (in [0, 1]) and,
  given a CLIP model, the mean cosine similarity of their CLIP image embeddings.

How the files are read: the Inception file is a TorchScript archive, loaded by clean-fid's
`InceptionV3W` with `torch.jit.load`. That is not Python's pickle and not `torch.load`: torch's C++
importer compiles the archive's TorchScript source and reads its constants with torch's own
unpickler, which builds only tensors and TorchScript types. It is still code (running the model runs
the archive's TorchScript) and torch's documentation warns that crafted data can execute code during
`torch.jit.load`, so only the published file should be used: its sha256 is recorded with every result.
open_clip models are created with `pretrained=None` and their weights read through `bksdm_ext.io`
(safetensors, or `torch.load(weights_only=True)`), never through open_clip's own `torch.load`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import io
from ..errors import BKSDMError
from .weights import CLIP_HELP, INCEPTION_URL, inception_file, sha256

FID_VARIANT = "clean-fid clean"  # named beside every FID: the paper's is pytorch-fid
IS_SPLITS = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATS_FORMAT = "bksdm-fid-stats-1"


# --- Inception: FID features and IS logits ------------------------------------------------------


class Inception:
    """clean-fid's InceptionV3W built from a local file; called on a (B, 3, 299, 299) batch in [0, 255]
    it returns pool3 features, the `custom_feat_extractor` clean-fid's folder functions take."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W

        self.file = inception_file(path)
        self.device = torch.device(device)
        try:
            self.model = InceptionV3W(str(self.file.parent), download=False, resize_inside=False).to(self.device)
        except (RuntimeError, ValueError) as error:
            raise BKSDMError(f"{self.file} is not a readable TorchScript Inception ({error}); download it again "
                             f"from {INCEPTION_URL}.") from None
        self.model.eval()
        if not hasattr(self.model.base, "output"):
            raise BKSDMError(f"{self.file} has no output layer, so it gives no Inception Score: use the file from "
                             f"{INCEPTION_URL}.")
        self.sha256 = sha256(self.file)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device))

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The classifier's logits without its bias (the original IS), from pool3 features."""
        weight = self.model.base.output.weight.detach().float().cpu().numpy()
        return features.astype(np.float64) @ weight.T.astype(np.float64)

    def features(self, files: Sequence[str | os.PathLike], batch_size: int = 32) -> np.ndarray:
        """(N, 2048) pool3 features of image files, resized as clean-fid's "clean" mode does."""
        from cleanfid.fid import get_files_features

        if not files:
            raise BKSDMError("No images to compute Inception features of.")
        return get_files_features([str(f) for f in files], model=self, num_workers=0, batch_size=batch_size,
                                  device=self.device, mode="clean", verbose=False)


# --- FID ----------------------------------------------------------------------------------------


@dataclass
class FIDStatistics:
    """Mean and covariance of Inception features, with how many images and which variant made them."""

    mu: np.ndarray
    sigma: np.ndarray
    images: int
    variant: str = FID_VARIANT
    source: str = ""

    @classmethod
    def of(cls, features: np.ndarray, source: str = "") -> "FIDStatistics":
        if len(features) < 2:
            raise BKSDMError(f"FID needs at least 2 images ({len(features)} given): its covariance is undefined.")
        features = features.astype(np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features), source=source)

    def save(self, path: str | os.PathLike) -> Path:
        """Our own .npz (numbers only, read back without pickle), written atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            raise BKSDMError(f"{path}: FID statistics are written as a .npz file.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, format=STATS_FORMAT, mu=self.mu, sigma=self.sigma, images=self.images,
                     variant=self.variant, source=self.source)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FIDStatistics":
        path = Path(path)
        if not path.is_file():
            raise BKSDMError(f"The FID reference {path} does not exist: give a reference image folder or a .npz "
                             "written by `bksdm fid-stats`.")
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data.get("format", "")) != STATS_FORMAT:
                    raise BKSDMError(f"{path} is not a statistics file written by `bksdm fid-stats` (other tools' "
                                     "files use other resizing and networks): compute it again with it.")
                return cls(data["mu"], data["sigma"], int(data["images"]), str(data["variant"]), str(data["source"]))
        except (OSError, ValueError, KeyError) as error:
            raise BKSDMError(f"{path} is not a readable FID statistics file ({error}).") from None


def frechet_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    """d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), of two feature Gaussians of the same variant.

    clean-fid's `frechet_distance` takes scipy's `sqrtm` of the 2048x2048 product: 3 to 5 minutes per FID
    on a 2-core CPU. The same trace comes from two symmetric eigendecompositions in seconds (and stays
    exact for the rank-deficient covariances of fewer than 2048 images): with S_a = R R^T on its range,
    (S_a S_b)^1/2 has the square roots of the eigenvalues of R^T S_b R. Tests check it against clean-fid's.
    """
    if a.variant != b.variant:
        raise BKSDMError(f"FID statistics of different variants ({a.variant!r} and {b.variant!r}) do not compare.")
    if a.mu.shape != b.mu.shape:
        raise BKSDMError(f"FID statistics of {a.mu.shape[0]} and {b.mu.shape[0]} features do not compare.")
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a.sigma, b.sigma))


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Tr((S_a S_b)^1/2) of two covariance matrices."""
    values, vectors = np.linalg.eigh(sigma_a)
    keep = values > values.max() * len(values) * np.finfo(np.float64).eps  # S_a's range
    root = vectors[:, keep] * np.sqrt(values[keep])  # S_a = root @ root.T
    inner = np.linalg.eigvalsh(root.T @ sigma_b @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under `folder` (recursively), sorted."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BKSDMError(f"The image folder {folder} does not exist.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BKSDMError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def reference_statistics(reference: str | os.PathLike, inception: Inception, batch_size: int = 32) -> FIDStatistics:
    """The FID reference: our .npz as it is, or the statistics of an image folder computed now."""
    reference = Path(reference).expanduser()
    if reference.suffix == ".npz":
        return FIDStatistics.load(reference)
    return FIDStatistics.of(inception.features(image_files(reference), batch_size), source=str(reference))


# --- IS -----------------------------------------------------------------------------------------


def is_splits(images: int, splits: int = IS_SPLITS) -> int:
    """The parts IS is averaged over: 10, or 1 below 20 images (a part of one image always scores 1)."""
    return splits if images >= 2 * splits else 1


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over parts of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016); `is_splits` parts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise BKSDMError("The Inception Score needs a (N, classes) array of logits with N >= 1.")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, is_splits(len(log_p), splits)):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# --- CLIP ---------------------------------------------------------------------------------------


class Clip:
    """An open_clip model from a local weights file: `model` is an architecture name (ViT-g-14, ViT-B-32…)
    or an open_clip config .json (its stem becomes the name)."""

    def __init__(self, weights: str | os.PathLike, model: str = "ViT-g-14", device: str | torch.device = "cpu"):
        import open_clip

        self.weights = Path(weights).expanduser()
        if not self.weights.is_file():
            raise BKSDMError(f"The CLIP weights {self.weights} are missing: {CLIP_HELP}. Nothing is downloaded at "
                             "run time.")
        self.name = _open_clip_name(model)
        config = open_clip.get_model_config(self.name)
        if "hf_model_name" in config.get("text_cfg", {}) or "timm_model_name" in config.get("vision_cfg", {}):
            raise BKSDMError(f"open_clip model {self.name} builds its towers from Hugging Face or timm downloads; "
                             "choose a plain open_clip architecture (ViT-g-14, ViT-H-14, ViT-B-32...).")
        self.device = torch.device(device)
        self.model = open_clip.create_model(self.name, pretrained=None, device="cpu")
        self._load_state(open_clip)
        self.model.to(self.device).eval()
        visual = self.model.visual
        self.preprocess = open_clip.image_transform(visual.image_size, is_train=False, mean=visual.image_mean,
                                                    std=visual.image_std)
        self.tokenizer = open_clip.get_tokenizer(self.name)
        self.sha256 = sha256(self.weights)

    def _load_state(self, open_clip) -> None:
        from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed

        state, _ = io.read_weights(self.weights)  # safetensors, or torch.load(weights_only=True)
        if state and all(key.startswith("module.") for key in state):
            state = {key[len("module."):]: value for key, value in state.items()}
        if "positional_embedding" in state and not hasattr(self.model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        resize_pos_embed(state, self.model)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise BKSDMError(f"{self.weights} does not hold open_clip {self.name} weights ({first[:200]}); give "
                             "the architecture the file was trained as (clip_model).") from None

    @torch.no_grad()
    def image_embeddings(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        """Unit-length image embeddings of PIL images (or uint8 HxWx3 arrays), float32 on the CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(_pil(image)) for image in images[start:start + batch_size]])
            out.append(_unit(self.model.encode_image(batch.to(self.device)).float().cpu()))
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(_unit(self.model.encode_text(tokens).float().cpu()))
        return torch.cat(out) if out else torch.zeros(0)


def _open_clip_name(model: str) -> str:
    import open_clip

    path = Path(model).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise BKSDMError(f"The open_clip config {path} does not exist.")
        open_clip.add_model_config(path)  # open_clip's own registry: the file's stem names the model
        model = path.stem
    model = model.replace("/", "-")
    if open_clip.get_model_config(model) is None:
        raise BKSDMError(f"Unknown open_clip model {model!r}: give an architecture name open_clip ships "
                         "(ViT-g-14, ViT-H-14, ViT-B-32, ...) or an open_clip config .json.")
    return model


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


def _pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def cosine_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) embedding batches."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise BKSDMError(f"Embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)} do not pair up.")
    return (_unit(a) * _unit(b)).sum(dim=1)


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of each image with its caption (the paper's CLIP score scale)."""
    return float(cosine_similarities(image_embeddings, text_embeddings).mean())


# --- teacher distance ---------------------------------------------------------------------------

DISTANCE_SIZE = 256  # pixel MSE is taken on the 256 px images the paper's metrics see


@dataclass
class TeacherDistance:
    """How far a student's images are from its teacher's at the same prompts and seeds."""

    pixel_mse: float  # mean squared difference of the 256 px images, pixels in [0, 1]
    clip_image_similarity: float | None  # mean cosine of their CLIP image embeddings (None without CLIP)
    images: int


def pixel_mse(teacher, student) -> tuple[float, int]:
    """(sum of per-image mean squared differences, number of pairs) of two image sequences, each image
    squashed to 256x256 (PIL bicubic) unless it already is; pixels in [0, 1]."""
    total, count = 0.0, 0
    for a, b in zip(teacher, student, strict=True):
        a, b = _pixels(a), _pixels(b)
        total += float(np.mean((a - b) ** 2))
        count += 1
    return total, count


def _pixels(image) -> np.ndarray:
    from PIL import Image

    image = _pil(image)
    if image.size != (DISTANCE_SIZE, DISTANCE_SIZE):
        image = image.resize((DISTANCE_SIZE, DISTANCE_SIZE), Image.BICUBIC)
    return np.asarray(image, dtype=np.float64) / 255.0


def teacher_distance(teacher_images: Sequence, student_images: Sequence, clip: Clip | None = None,
                     embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> TeacherDistance:
    """The teacher distance of a student: image i of each from the same prompt and seed.

    Images are PIL images, uint8 arrays or files. `embeddings`: the two sets' CLIP image embeddings when
    the caller has them already (else they are computed with `clip`, when given).
    """
    if len(teacher_images) != len(student_images) or not teacher_images:
        raise BKSDMError(f"The teacher distance pairs image i of each model: {len(teacher_images)} teacher and "
                         f"{len(student_images)} student images given.")
    total, count = pixel_mse(teacher_images, student_images)
    similarity = None
    if embeddings is None and clip is not None:
        embeddings = clip.image_embeddings(teacher_images), clip.image_embeddings(student_images)
    if embeddings is not None:
        similarity = float(cosine_similarities(*embeddings).mean())
    return TeacherDistance(pixel_mse=total / count, clip_image_similarity=similarity, images=count)

