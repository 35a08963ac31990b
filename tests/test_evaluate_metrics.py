"""The evaluation metrics on tiny stand-in networks written as files and read through the users' loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from cleanfid.fid import frechet_distance as clean_frechet
from scipy import linalg
from tiny_metrics import write_tiny_clip, write_tiny_inception

from bksdm_ext.errors import BKSDMError
from bksdm_ext.evaluate import metrics, prompts


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return metrics.Inception(write_tiny_inception(tmp_path_factory.mktemp("inception")).parent)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config, weights = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return metrics.Clip(weights, str(config))


def write_images(folder, count, seed=0, side=64):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def hand_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """d^2 = |mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), written out independently."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root_x = linalg.sqrtm(s_x).real
    cross = linalg.sqrtm(root_x @ s_y @ root_x).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(cross))


def test_fid_of_a_set_against_itself_is_zero(inception, tmp_path):
    files = write_images(tmp_path / "a", 6)
    features = inception.features(files)
    assert features.shape == (6, 2048) and features.std() > 0  # the images give different features
    stats = metrics.FIDStatistics.of(features)
    assert abs(metrics.frechet_distance(stats, stats)) < 1e-6
    # through the reference paths users have: a folder, and its statistics saved once as our .npz
    folder_stats = metrics.reference_statistics(tmp_path / "a", inception)
    assert abs(metrics.frechet_distance(stats, folder_stats)) < 1e-6
    saved = folder_stats.save(tmp_path / "ref.npz")
    loaded = metrics.reference_statistics(saved, inception)
    assert loaded.images == 6 and loaded.variant == metrics.FID_VARIANT
    assert abs(metrics.frechet_distance(stats, loaded)) < 1e-6
    other = metrics.FIDStatistics.of(inception.features(write_images(tmp_path / "b", 6, seed=1)))
    assert metrics.frechet_distance(stats, other) > 1e-3


def test_fid_equals_the_frechet_distance_computed_by_hand_on_fixed_features():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5))
    y = rng.normal(loc=0.5, scale=2.0, size=(50, 5)) @ rng.normal(size=(5, 5))
    a, b = metrics.FIDStatistics.of(x), metrics.FIDStatistics.of(y)
    fid = metrics.frechet_distance(a, b)
    assert fid == pytest.approx(hand_frechet(x, y), rel=1e-9)
    assert fid == pytest.approx(clean_frechet(a.mu, a.sigma, b.mu, b.sigma), rel=1e-9)  # clean-fid's own
    assert fid > 1  # not a degenerate case
    # fewer images than features (rank-deficient covariances), as a small evaluation has
    x, y = rng.normal(size=(6, 12)), rng.normal(size=(7, 12)) * 3
    a, b = metrics.FIDStatistics.of(x), metrics.FIDStatistics.of(y)
    assert metrics.frechet_distance(a, b) == pytest.approx(clean_frechet(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)


def test_statistics_of_another_variant_or_tool_are_refused(tmp_path):
    stats = metrics.FIDStatistics.of(np.random.default_rng(0).normal(size=(4, 3)))
    other = metrics.FIDStatistics(stats.mu, stats.sigma, 4, variant="pytorch-fid")
    with pytest.raises(BKSDMError, match="different variants"):
        metrics.frechet_distance(stats, other)
    np.savez(tmp_path / "theirs.npz", mu=stats.mu, sigma=stats.sigma)  # e.g. a pytorch-fid statistics file
    with pytest.raises(BKSDMError, match="fid-stats"):
        metrics.FIDStatistics.load(tmp_path / "theirs.npz")


def test_inception_score_of_identical_predictions_is_one_and_of_confident_distinct_ones_is_their_count(inception):
    same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (40, 1))
    assert metrics.inception_score(same) == pytest.approx((1.0, 0.0), abs=1e-9)
    distinct = np.full((40, 4), -50.0)
    distinct[np.arange(40), np.arange(40) % 4] = 50.0  # 4 classes, each predicted with certainty
    assert metrics.inception_score(distinct)[0] == pytest.approx(4.0, rel=1e-6)
    # IS logits come from the Inception's own output layer, without its bias
    features = np.random.default_rng(1).normal(size=(3, 2048))
    weight = inception.model.base.output.weight.detach().double().numpy()
    assert np.allclose(inception.logits(features), features @ weight.T)


def test_clip_score_is_the_mean_cosine_of_image_and_caption_embeddings(clip, tmp_path):
    images = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    expected = (1.0 + 0.0 + 2 / (2 * 2 ** 0.5)) / 3
    assert metrics.clip_score(images, texts) == pytest.approx(expected, rel=1e-12)
    # on the tiny open_clip model: the same formula over its unit embeddings
    files = write_images(tmp_path / "c", 3, side=32)
    captions = ["a red square", "a photo of a dog", "noise"]
    image_emb, text_emb = clip.image_embeddings(files), clip.text_embeddings(captions)
    assert image_emb.shape == (3, 16) and torch.allclose(image_emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert metrics.clip_score(image_emb, text_emb) == pytest.approx(float((image_emb * text_emb).sum(1).mean()),
                                                                    abs=1e-6)


def test_teacher_distance_of_the_teacher_itself_is_zero_and_grows_with_the_difference(clip, tmp_path):
    teacher = write_images(tmp_path / "t", 3, side=256)
    student = write_images(tmp_path / "s", 3, seed=5, side=256)
    own = metrics.teacher_distance(teacher, teacher, clip)
    assert own.pixel_mse == 0 and own.clip_image_similarity == pytest.approx(1.0, abs=1e-6) and own.images == 3
    other = metrics.teacher_distance(teacher, student, clip)
    arrays = [np.asarray(Image.open(p), dtype=np.float64) / 255 for p in teacher + student]
    expected = np.mean([np.mean((arrays[i] - arrays[i + 3]) ** 2) for i in range(3)])
    assert other.pixel_mse == pytest.approx(expected, rel=1e-12) and other.clip_image_similarity < 1
    with pytest.raises(BKSDMError, match="pairs image i"):
        metrics.teacher_distance(teacher, student[:2])


def test_every_weight_load_is_safetensors_or_weights_only(tmp_path, monkeypatch):
    """The Inception is TorchScript (torch.jit.load, never torch.load or pickle); CLIP weights are read by
    our loader: safetensors, or torch.load(weights_only=True) for a .bin."""
    import pickle

    calls = []
    real_load = torch.load

    def watched_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle.load was called")

    monkeypatch.setattr(torch, "load", watched_load)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    metrics.Inception(write_tiny_inception(tmp_path / "inception"))
    config, weights = write_tiny_clip(tmp_path / "clip")
    metrics.Clip(weights, str(config))
    assert calls == []  # neither touched torch.load
    from safetensors.torch import load_file

    bin_file = tmp_path / "clip" / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in load_file(weights).items()}}, bin_file)
    metrics.Clip(bin_file, str(config))  # pickle.Unpickler still refused: torch's weights_only unpickler is its own
    assert calls == [True]


def test_a_missing_weight_file_is_one_message_naming_it(tmp_path):
    with pytest.raises(BKSDMError, match=r"inception-2015-12-05\.pt are missing: download https://nvlabs"):
        metrics.Inception(tmp_path)
    with pytest.raises(BKSDMError, match=r"CLIP weights .*nowhere\.safetensors are missing: .*CLIP-ViT-g-14"):
        metrics.Clip(tmp_path / "nowhere.safetensors")
    config, weights = write_tiny_clip(tmp_path / "clip")
    with pytest.raises(BKSDMError, match="does not hold open_clip ViT-B-32 weights"):
        metrics.Clip(weights, "ViT-B-32")


def test_prompt_sets_from_caption_files_and_the_shipped_default(tmp_path):
    shipped = prompts.read_prompts()
    assert len(shipped) >= 300 and len(set(shipped)) == len(shipped)
    assert prompts.read_prompts("default", limit=5) == shipped[:5]
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a cat on a mat\nb.png,\"a dog, running\"\n")
    assert prompts.read_prompts(tmp_path / "metadata.csv") == ["a cat on a mat", "a dog, running"]
    (tmp_path / "c.jsonl").write_text('{"caption": "one"}\n\n{"caption": "two"}\n')
    assert prompts.read_prompts(tmp_path / "c.jsonl", limit=1) == ["one"]
    (tmp_path / "p.txt").write_text("# comment\nfirst\n\nsecond\n")
    assert prompts.read_prompts(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "bad.csv").write_text("file_name,label\na.png,x\n")
    with pytest.raises(BKSDMError, match="no caption column"):
        prompts.read_prompts(tmp_path / "bad.csv")
