"""Distillation: loss terms, feature-KD hooks, the loop (overfit, resume, cancel, kill), outputs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.errors import BKSDMError
from bksdm_ext.student import build_student
from bksdm_ext.train import cache as core_cache
from bksdm_ext.job import JobFolder
from bksdm_ext.train import losses
from bksdm_ext.train.checkpoints import load_checkpoint
from bksdm_ext.train.config import DistillConfig
from tiny import load_ldm_unet_strictly, tiny_unet, tiny_unet_config
from train_helpers import (one_thread, one_thread_env, progress, run_module, small_settings,  # noqa: F401
                           tensorboard_scalars, write_images)

REPO = Path(__file__).resolve().parents[1]


# --- loss terms on fixed tensors ----------------------------------------------------------------


def test_loss_terms_equal_hand_computed_values():
    shape = (2, 4, 3, 3)
    student, target, teacher = torch.zeros(shape), torch.full(shape, 2.0), torch.ones(shape)
    f_student = [torch.zeros(2, 5), torch.ones(1, 7)]
    f_teacher = [torch.full((2, 5), 3.0), torch.ones(1, 7) * 1.5]
    total, terms = losses.distill_loss(student, teacher, target, f_student, f_teacher, (1.0, 2.0, 0.5))
    assert terms["task"].item() == pytest.approx(4.0)  # (0 - 2)^2
    assert terms["out_kd"].item() == pytest.approx(1.0)  # (0 - 1)^2
    assert terms["feat_kd"].item() == pytest.approx(9.0 + 0.25)  # (0 - 3)^2 + (1 - 1.5)^2, each a mean
    assert total.item() == pytest.approx(4.0 + 2 * 1.0 + 0.5 * 9.25)


def test_normalised_feature_term_is_the_squared_error_over_the_teachers_mean_square():
    shape = (2, 4, 3, 3)
    student, target, teacher = torch.zeros(shape), torch.full(shape, 2.0), torch.ones(shape)
    f_student = [torch.zeros(2, 5), torch.tensor([[1.0, 2.0], [3.0, 4.0]])]
    f_teacher = [torch.full((2, 5), 3.0), torch.tensor([[2.0, 2.0], [1.0, 0.0]])]
    # stage 0: mean (0-3)^2 = 9 over mean 3^2 = 9 -> 1; stage 1: mean(1, 0, 4, 16) = 5.25 over mean(4, 4, 1, 0) = 2.25
    total, terms = losses.distill_loss(student, teacher, target, f_student, f_teacher, (1.0, 1.0, 1.0),
                                       stage_names=["down_blocks.0", "up_blocks.1"], normalised=True,
                                       stage_weights=[0.5, 2.0])
    assert terms["feat_kd.down_blocks.0"].item() == pytest.approx(1.0)
    assert terms["feat_kd.up_blocks.1"].item() == pytest.approx(5.25 / 2.25)
    assert terms["feat_kd"].item() == pytest.approx(0.5 * 1.0 + 2.0 * 5.25 / 2.25)
    assert total.item() == pytest.approx(4.0 + 1.0 + 0.5 + 2.0 * 5.25 / 2.25)
    # the paper's plain sum, per stage too
    _, plain = losses.distill_loss(student, teacher, target, f_student, f_teacher, (1.0, 1.0, 1.0))
    assert plain["feat_kd.0"].item() == pytest.approx(9.0) and plain["feat_kd.1"].item() == pytest.approx(5.25)
    assert plain["feat_kd"].item() == pytest.approx(14.25)


def test_v_prediction_target_is_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v = α_t ε − σ_t x0
    assert torch.allclose(losses.diffusion_target(scheduler, latents, noise, t), expected, atol=1e-6)
    scheduler.register_to_config(prediction_type="epsilon")
    assert losses.diffusion_target(scheduler, latents, noise, t) is noise


# --- feature-KD hooks ---------------------------------------------------------------------------

STAGES = [f"down_blocks.{i}" for i in range(4)]
PAPER_PAIRS = {  # BKSDM.md §3, written out by hand: (teacher, student)
    "base": [(s, s) for s in STAGES] + [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)],
    "small": [(s, s) for s in STAGES] + [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)],
    "tiny": [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
             ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
             ("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"), ("up_blocks.3", "up_blocks.2")],
}


@pytest.mark.parametrize("layout", ["base", "small", "tiny"])
def test_hook_pairs_are_the_papers(layout):
    assert sorted(layouts.feature_kd_pairs(layout)) == sorted(PAPER_PAIRS[layout])


def _distill_backward(layout: str, checkpointing: bool):
    teacher = tiny_unet("teacher")
    student, _ = build_student(teacher, layout)
    if checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    teacher_tap, student_tap = losses.feature_taps(teacher, student, layout)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 6, 32)
    with torch.inference_mode(), teacher_tap:
        teacher_out = teacher(x, t, text).sample
    teacher_out, teacher_features = teacher_out.clone(), [f.clone() for f in teacher_tap.outputs()]
    with student_tap:
        student_out = student(x, t, text).sample
    student_features = student_tap.outputs()
    for s, f in zip(student_features, teacher_features):
        assert s.shape == f.shape
    total, terms = losses.distill_loss(student_out, teacher_out, torch.randn_like(x), student_features,
                                       teacher_features, (1.0, 1.0, 1.0))
    total.backward()
    return student, student_tap, terms


@pytest.mark.parametrize("layout,checkpointing", [("base", False), ("small", False), ("tiny", False), ("tiny", True)])
def test_every_student_parameter_receives_gradient(one_thread, layout, checkpointing):
    student, _, terms = _distill_backward(layout, checkpointing)
    assert terms["feat_kd"].item() > 0
    no_grad = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_tiny_proj_out_feature_carries_gradient_under_checkpointing(one_thread):
    # the official code's reentrant checkpointing left this feature without a graph
    _, tap, _ = _distill_backward("tiny", checkpointing=True)
    assert tap.features["down_blocks.2.attentions.0.proj_out"].grad_fn is not None


def test_taps_find_modules_on_the_unwrapped_model_and_survive_wrapping():
    student = tiny_unet("small")
    wrapped = torch.nn.Sequential(student)  # names gain a prefix, as under DDP's `module.`
    tap = losses.FeatureTap(student, ["down_blocks.0", "up_blocks.3"])
    with tap:
        wrapped[0](torch.randn(1, 4, 8, 8), 3, encoder_hidden_states=torch.randn(1, 4, 32))
    assert [f.shape[1] for f in tap.outputs()] == [32, 32]
    with pytest.raises(ValueError, match="not in the model"):
        losses.FeatureTap(wrapped, ["down_blocks.0"])


# --- config and data ----------------------------------------------------------------------------


def test_config_round_trips_and_validates(tmp_path, tiny_pipeline_v1):
    data = write_images(tmp_path / "data", 2)
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), layout="tiny")
    for name in ("c.toml", "c.json"):
        config.save(tmp_path / name)
        assert DistillConfig.load(tmp_path / name) == config
    config.validate()
    assert config.learning_rate == 5e-5 and config.train_batch_size * config.gradient_accumulation_steps == 256
    assert DistillConfig.setting("lambda_feat_kd").help
    bad = [
        (dict(layout="huge"), "Unknown layout"),
        (dict(layout="teacher"), "student layout"),
        (dict(layout="down=3,1,1,2"), r"^Layout spec 'down=3,1,1,2': each down stage keeps 1 or 2 R-A pairs\."),
        (dict(teacher=str(tmp_path / "nope")), "does not exist"),
        (dict(data=str(tmp_path)), "no metadata"),
        (dict(resolution=100), "multiple of 8"),
    ]
    for change, message in bad:
        with pytest.raises(BKSDMError, match=message):
            DistillConfig(**{**config.to_dict(), **change}).validate()
    with pytest.raises(BKSDMError, match="Unknown distill setting"):
        DistillConfig.from_dict({"teacher": "x", "learning_rat": 1})


def test_bad_items_are_skipped_and_counted_and_an_unusable_dataset_refused(tmp_path, tiny_pipeline_v1, one_thread):
    from PIL import Image

    from bksdm_ext.train import distill
    from bksdm_ext.train.data import read_metadata

    data = write_images(tmp_path / "data", 3)
    Image.new("L", (80, 80)).save(data / "gray.png")
    Image.new("RGB", (10, 10)).save(data / "small.png")
    (data / "broken.png").write_bytes(b"not a png")
    lines = (data / "metadata.jsonl").read_text()
    extra = ['{"file_name": "gray.png", "text": "g"}', '{"file_name": "small.png", "text": "s"}',
             '{"file_name": "broken.png", "text": "b"}', '{"file_name": "missing.png", "text": "m"}',
             '{"file_name": "0.png", "text": ""}']
    (data / "metadata.jsonl").write_text(lines + "\n".join(extra) + "\n")
    meta = read_metadata(str(data))
    assert len(meta.items) == 6 and meta.skipped == {"missing file": 1, "missing caption": 1}

    job = tmp_path / "job"
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                           **small_settings(train_batch_size=6, max_steps=1, checkpoint_every=1))
    assert distill.train(config, job) == "done"
    skipped = {r: n for r, n in load_checkpoint(JobFolder(job).complete_checkpoints()[-1])[3]["skipped"].items()}
    assert skipped == {"grayscale": 1, "too small": 1, "broken image": 1}

    # nothing usable: refused before any model is loaded (the teacher path is never read)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"broken")
    (bad / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "x"}\n')
    with pytest.raises(BKSDMError, match="usable"):
        distill.train(DistillConfig(teacher="nobody/nothing", data=str(bad), **small_settings()), tmp_path / "job2")


# --- the loop -----------------------------------------------------------------------------------


def test_overfitting_eight_images_halves_the_loss(tmp_path, tiny_pipeline_v1, one_thread):
    from bksdm_ext.train import distill

    data = write_images(tmp_path / "data", 8)
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), layout="tiny", use_ema=False,
                           **small_settings(train_batch_size=8, max_steps=50, learning_rate=2e-3, log_every=1))
    assert distill.train(config, tmp_path / "job") == "done"
    totals = [row["total"] for row in JobFolder(tmp_path / "job").read_losses()]
    assert len(totals) == 50
    first, last = totals[0], sum(totals[-5:]) / 5  # step 1's loss is the untrained student's
    assert last < first / 2, (first, last)
    # the same curves as TensorBoard events
    events = tensorboard_scalars(tmp_path / "job" / "tb")
    assert sorted(events["loss/total"]) == list(range(1, 51))
    assert [events["loss/total"][step] for step in range(1, 51)] == pytest.approx(totals, rel=1e-6)
    assert set(events) >= {"loss/task", "loss/out_kd", "loss/feat_kd", "samples_per_s"}


def test_every_stage_term_is_a_losses_csv_column_and_normalised_weighted_kd_trains(tmp_path, tiny_pipeline_v1,
                                                                                  one_thread):
    from bksdm_ext.train import distill

    data = write_images(tmp_path / "data", 2)
    stages = [s for _, s in layouts.feature_kd_pairs("tiny")]
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), layout="tiny", use_ema=False,
                           feature_kd="normalised", feature_kd_stage_weights=[1, 1, 1, 0, 2, 1],
                           **small_settings(max_steps=2))
    config.validate()
    assert distill.train(config, tmp_path / "job") == "done"
    rows = JobFolder(tmp_path / "job").read_losses()
    assert [f"feat_kd.{s}" for s in stages] == [k for k in rows[0] if k.startswith("feat_kd.")]
    for row in rows:
        weighted = sum(w * row[f"feat_kd.{s}"] for w, s in zip([1, 1, 1, 0, 2, 1], stages))
        assert row["feat_kd"] == pytest.approx(weighted, rel=1e-5)
        assert 0 < row["feat_kd.down_blocks.0"] < 10  # a relative error, not the activations' scale
    with pytest.raises(BKSDMError, match="needs 6 non-negative numbers"):
        DistillConfig(**{**config.to_dict(), "feature_kd_stage_weights": [1, 2]}).validate()
    with pytest.raises(BKSDMError, match="feature_kd must be one of"):
        DistillConfig(**{**config.to_dict(), "feature_kd": "l1"}).validate()


# shaped as BK-SDM-Base (one pair per stage, mid kept), but copied from other teacher pairs: only our
# metadata tells them apart
CUSTOM = "down=1,1,1,1 mid=yes down_from=1,0,0,1"


def test_a_custom_layout_spec_distils_and_its_output_loads_strictly_as_that_layout(tmp_path, tiny_pipeline_v1,
                                                                                   one_thread):
    import json

    from bksdm_ext import detect, io
    from bksdm_ext.convert import LAYOUT_CONFIG_KEY, load_model
    from bksdm_ext.train import distill

    lay = layouts.get_layout(CUSTOM)
    assert layouts.get_layout("base").layers_per_block == lay.layers_per_block and lay.down_from != \
        layouts.get_layout("base").down_from
    models = tmp_path / "models"
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(write_images(tmp_path / "data", 2)), layout=CUSTOM,
                           output_dir=str(models), **small_settings(max_steps=2))
    config.validate()
    assert distill.train(config, tmp_path / "job") == "done"
    # its feature-KD pairs, as the layout table gives them, are the loss terms
    stages = [s for _, s in layouts.feature_kd_pairs(lay)]
    rows = JobFolder(tmp_path / "job").read_losses()
    assert len(rows) == 2 and len([k for k in rows[0] if k.startswith("feat_kd.")]) == len(stages) == 8
    # the output: named by the layout's slug, recorded as the spec in the file and the diffusers copy
    single = models / f"bk-sdm-{layouts.slug(lay)}.safetensors"
    assert io.read_metadata(single)["bksdm.layout"] == lay.name
    folder = tmp_path / "job" / "output" / single.stem
    assert json.loads((folder / "unet" / "config.json").read_text())[LAYOUT_CONFIG_KEY] == lay.name
    for source in (single, folder):  # detected as the spec, not as BK-SDM-Base of the same shapes
        assert load_model(source).detection.layout == lay.name
    tensors, metadata = io.read_safetensors(single)
    assert detect.detect_unet(tensors, metadata).layout == lay.name
    load_ldm_unet_strictly(single)


def _bitsandbytes_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("adamw8bit", marks=pytest.mark.skipif(
    not _bitsandbytes_importable(), reason="bitsandbytes is not installed (.ci/setup installs it: its 8-bit AdamW "
                                           "runs on CPU too, 0.50 checked)"))])
def test_n_steps_resume_n_steps_equals_2n_straight(tmp_path, tiny_pipeline_v1, one_thread, optimizer):
    from bksdm_ext.train import distill

    data = write_images(tmp_path / "data", 5)
    settings = small_settings(max_steps=4, train_batch_size=2, gradient_accumulation_steps=2, random_flip=True,
                              center_crop=False, checkpoint_every=2, optimizer=optimizer)
    straight = tmp_path / "straight"
    distill.train(DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings), straight)
    halves = tmp_path / "halves"
    distill.train(DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **{**settings, "max_steps": 2}), halves)
    assert [p.name for p in JobFolder(halves).complete_checkpoints()] == ["step-2"]
    distill.train(DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings), halves, resume="latest")
    a, b = JobFolder(straight).read_losses(), JobFolder(halves).read_losses()
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        for term in ("total", "task", "out_kd", "feat_kd"):
            assert row_a[term] == pytest.approx(row_b[term], abs=1e-6), (row_a["step"], term)
    final_a, training = load_checkpoint(JobFolder(straight).complete_checkpoints()[-1])[:2]
    final_b = load_checkpoint(JobFolder(halves).complete_checkpoints()[-1])[0]
    states = [state.get("__bnb_optimizer_quant_state__", state) for state in training["optimizer"]["state"].values()]
    moments = {v.dtype for state in states for k, v in state.items() if k in ("state1", "state2", "exp_avg", "exp_avg_sq")}
    # bitsandbytes keeps tensors under 4096 elements in fp32, the rest in 8 bits
    assert moments == ({torch.uint8, torch.float32} if optimizer == "adamw8bit" else {torch.float32})
    for group in ("trainable", "ema"):
        for key, tensor in final_a[group].items():
            assert torch.allclose(tensor, final_b[group][key], atol=1e-6), key


@pytest.mark.skipif(not _bitsandbytes_importable(), reason="bitsandbytes is not installed")
def test_the_8bit_optimiser_is_built_without_bitsandbytes_import_noise():
    code = ("import torch; from types import SimpleNamespace as C; from bksdm_ext.train.speed import make_optimizer; "
            "c = C(lr=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, "
            "optimizer='adamw8bit'); print(type(make_optimizer([torch.nn.Parameter(torch.zeros(3))], c, None)).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=one_thread_env(),
                            cwd=REPO, timeout=120)
    assert result.stdout.strip() == "AdamW8bit", result.stderr
    assert "Failed" not in result.stderr, result.stderr  # a job log would show it


def test_single_file_output_loads_strictly_into_the_ldm_unet_from_our_yaml(tmp_path, tiny_pipeline_v1, one_thread):
    import importlib

    import yaml
    from safetensors.torch import load_file

    from bksdm_ext.train import distill

    data = write_images(tmp_path / "data", 2)
    job = tmp_path / "job"
    models = tmp_path / "models" / "Stable-diffusion"  # the WebUI's models folder as output_dir
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), layout="tiny", output_dir=str(models),
                           **small_settings(max_steps=1, sample_every=1, sample_steps=2, sample_prompts=["a cat"],
                                            checkpoint_every=1))
    assert distill.train(config, job) == "done"
    state = progress(job) if (job / "progress.json").exists() else {}
    assert state["state"] == "done" and state["step"] == 1
    assert (job / "samples" / "teacher-0.png").is_file() and (job / "samples" / "step-000001-0.png").is_file()
    # only the single file and its yaml in the models folder; the diffusers copy stays in the job folder
    assert sorted(p.name for p in models.iterdir()) == ["bk-sdm-tiny.safetensors", "bk-sdm-tiny.yaml"]
    assert (job / "output" / "bk-sdm-tiny" / "model_index.json").is_file()
    single = models / "bk-sdm-tiny.safetensors"
    params = yaml.safe_load(single.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]
    assert params["params"] == {**layouts.ldm_unet_params_from_config(tiny_unet_config("tiny")),
                                **{k: params["params"][k] for k in ("use_checkpoint",)}}
    module, name = params["target"].rsplit(".", 1)
    unet = getattr(importlib.import_module(module), name)(**params["params"])
    prefix = "model.diffusion_model."
    weights = {k[len(prefix):]: v for k, v in load_file(str(single)).items() if k.startswith(prefix)}
    unet.load_state_dict(weights, strict=True)
    # the file holds the trained EMA student, not the teacher's tensors
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(job / "output" / "bk-sdm-tiny", subfolder="unet")
    ema = load_checkpoint(JobFolder(job).complete_checkpoints()[-1])[0]["ema"]
    for key, tensor in trained.state_dict().items():
        assert torch.equal(tensor, ema[f"student.{key}"]), key


def test_cancel_file_saves_a_checkpoint_and_reports_cancelled(tmp_path, tiny_pipeline_v1):
    data = write_images(tmp_path / "data", 4)
    job = tmp_path / "job"
    job.mkdir()
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **small_settings(max_steps=10_000)).save(
        job / "config.toml")
    process = subprocess.Popen([sys.executable, "-m", "bksdm_ext.job", "distill", "--job-dir", str(job)], cwd=REPO,
                               env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (job / "progress.json").exists() and progress(job)["step"] >= 2, process)
        (job / "cancel").touch()
        assert process.wait(120) == 0
    finally:
        process.kill()
    state = progress(job)
    assert state["state"] == "cancelled" and state["step"] >= 2
    assert JobFolder(job).complete_checkpoints()[-1].name == f"step-{state['step']}"


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_resumable(tmp_path, tiny_pipeline_v1):
    data = write_images(tmp_path / "data", 4)
    job = tmp_path / "job"
    job.mkdir()
    settings = small_settings(max_steps=10_000, checkpoint_every=1, checkpoints_keep=2, log_every=50)
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings).save(job / "config.toml")
    process = subprocess.Popen([sys.executable, "-m", "bksdm_ext.job", "distill", "--job-dir", str(job)], cwd=REPO,
                               env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = job / "checkpoints"
    try:
        _wait_for(lambda: len(JobFolder(job).complete_checkpoints()) >= 2, process)
        while not any(p.name.startswith(".tmp-") and any(p.iterdir()) for p in checkpoints.iterdir()):
            assert process.poll() is None
        process.send_signal(signal.SIGKILL)  # mid-write: the temp folder already holds files
        process.wait(30)
    finally:
        process.kill()
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert partial, "the kill should have hit a checkpoint being written"
    last = JobFolder(job).complete_checkpoints()[-1]
    tensors, training, rng, state = load_checkpoint(last)
    assert state["step"] == int(last.name.split("-")[1]) and "optimizer" in training and rng
    assert int(partial[0].name.rsplit("-", 1)[1]) > state["step"]

    # resume from it: two more steps, and the partial folder is cleaned up by the next save
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                  **{**settings, "max_steps": state["step"] + 2}).save(job / "config.toml")
    result = run_module(["bksdm_ext.job", "distill", "--job-dir", str(job), "--resume", "latest"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resumed from {last}" in result.stdout
    assert progress(job)["state"] == "done" and progress(job)["step"] == state["step"] + 2


@pytest.mark.slow
def test_two_process_accelerate_run_has_two_ranks_and_firing_hooks(tmp_path, tiny_pipeline_v1):
    from bksdm_ext.convert import convert

    data = write_images(tmp_path / "data", 4)
    job = tmp_path / "job"
    job.mkdir()
    settings = small_settings(max_steps=2, checkpoint_every=2)
    teacher = tmp_path / "teacher.safetensors"  # a single file: both ranks need it converted, once
    convert(tiny_pipeline_v1, teacher)
    DistillConfig(teacher=str(teacher), data=str(data), **settings).save(job / "config.toml")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(one_thread_env(), XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                             "-m", "bksdm_ext.job", "distill", "--job-dir", str(job)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    state = progress(job)
    assert state["state"] == "done" and state["losses"]["feat_kd"] > 0  # taps raise if a hook did not fire
    assert len(list((JobFolder(job).complete_checkpoints()[-1]).glob("rng-*.safetensors"))) == 2
    assert (job / "output" / "bk-sdm-small.safetensors").is_file()


def _wait_for(condition, process, timeout: float = 240):
    end = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the training process ended early"
        assert time.time() < end, "timed out"
        time.sleep(0.05)


# --- command line and cache ---------------------------------------------------------------------


def test_cli_builds_the_same_config_from_flags_and_files(tmp_path, tiny_pipeline_v1):
    from bksdm_ext.cli import main

    data = write_images(tmp_path / "data", 2)
    base = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **small_settings())
    base.save(tmp_path / "base.toml")
    job = tmp_path / "job"
    assert main(["distill", "--config", str(tmp_path / "base.toml"), "--layout", "tiny", "--no-random-flip",
                 "--sample-prompts", "a", "b", "--learning-rate", "1e-4", "--job-dir", str(job), "--write-only"]) == 0
    written = DistillConfig.load(job / "config.toml")
    assert written == DistillConfig(**{**base.to_dict(), "layout": "tiny", "random_flip": False,
                                       "sample_prompts": ["a", "b"], "learning_rate": 1e-4})
    assert main(["distill", "--teacher", str(tmp_path / "missing"), "--data", str(data), "--write-only",
                 "--job-dir", str(tmp_path / "job2")]) == 2  # a BKSDMError: message, no traceback


def test_latent_cache_is_built_once_reused_and_invalidated(tmp_path, tiny_pipeline_v1, one_thread, capsys):
    from bksdm_ext.train import distill

    data = write_images(tmp_path / "data", 3)
    settings = small_settings(max_steps=1, cache=True, cache_dir=str(tmp_path / "cache"), train_batch_size=3)
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings)
    assert distill.train(config, tmp_path / "a") == "done"
    out = capsys.readouterr().out
    assert "Building the latent cache" in out and "3 pairs x" in out
    shards = list((tmp_path / "cache").glob("*/shard-*.safetensors"))
    assert len(shards) == 1
    from safetensors.torch import load_file

    shard = load_file(str(shards[0]))
    assert shard["latents"].shape == (3, 4, 8, 8) and shard["latents"].dtype == torch.float16
    assert shard["text"].shape == (3, 77, 32)
    # random flips: the flipped crop is encoded, which is not the flipped latent
    import random

    from diffusers import AutoencoderKL

    from bksdm_ext.train.data import augment, open_rgb
    from bksdm_ext.train.models import encode_images

    vae = AutoencoderKL.from_pretrained(tiny_pipeline_v1, subfolder="vae")
    pixels = augment(open_rgb(data / "0.png"), 64, True, False, random.Random(0))[None].flip(-1)
    with torch.no_grad():
        expected = encode_images(vae, pixels, sample=False)[0]
    cached = shard["latents_flipped"][0].float()
    # the VAE ran in bf16 (teacher_half): ~4e-3 off; the flipped latent is ~0.18 off
    assert (cached - expected).abs().max() < 0.02
    assert (cached - shard["latents"][0].float().flip(-1)).abs().max() > 0.05
    pairs = core_cache.LatentCache(tmp_path / "cache", shards[0].parent.name, [], 64).dataset(True, config.seed)
    pairs.shards, pairs.rows = [shards[0]], [(0, 0, 0)]
    drawn = {bool(torch.equal(pairs[(epoch, 0)]["latents"], shard["latents_flipped"][0])) for epoch in range(12)}
    assert drawn == {True, False}  # both the crop and its flip are served, by the seeded coin

    distill.train(DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings), tmp_path / "b")
    assert "Using the latent cache" in capsys.readouterr().out
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("number 0", "number zero"))
    distill.train(DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **settings), tmp_path / "c")
    assert "Building the latent cache" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_metadata_csv_is_read_like_jsonl(tmp_path):
    from bksdm_ext.train.data import read_metadata

    data = write_images(tmp_path / "data", 2, metadata=False)
    (data / "metadata.csv").write_text('file_name,text\n0.png,"a cat, sitting"\n1.png,\n')
    meta = read_metadata(str(data))
    assert [(p.name, c) for p, c in meta.items] == [("0.png", "a cat, sitting")]
    assert meta.skipped == {"missing caption": 1}


def test_paper_precision_settings_run_on_cpu_as_bf16(tmp_path, tiny_pipeline_v1):
    # its own process: accelerate keeps one precision per process (as each job has)
    data = write_images(tmp_path / "data", 2)
    job = tmp_path / "job"
    job.mkdir()
    DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                  **small_settings(max_steps=2, mixed_precision="fp16", teacher_half=True)).save(job / "config.toml")
    result = run_module(["bksdm_ext.job", "distill", "--job-dir", str(job)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "training in bf16 on the CPU" in result.stdout and "mixed precision bf16" in result.stdout
    rows = JobFolder(job).read_losses()
    assert len(rows) == 2 and all(0 < row["total"] < 100 for row in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_is_reused_without_page_faults():
    """Steps that allocate and free large blocks fault every page each time by default; once memory is
    kept, they stop faulting after a few steps (torch's 64-byte-aligned blocks settle into the heap)."""
    script = """
import resource, sys, torch
from bksdm_ext.train.speed import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
faults = []
for step in range(12):  # a "step": blocks of several sizes, freed in another order than made
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(64 << 20); b = torch.ones(16 << 20); del a; c = torch.ones(32 << 20); del b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[6:]))
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True,
                                       text=True, cwd=Path(__file__).parents[1]).stdout)
              for mode in ("default", "kept")}
    pages = 6 * ((64 + 16 + 32) << 22) // 4096  # six steps' blocks (float32), in 4 KiB pages
    assert faults["default"] > pages // 2  # the test would notice if the default stopped faulting
    assert faults["kept"] < pages // 100, faults
