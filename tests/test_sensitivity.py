"""The block sensitivity analysis (BK-SDM App. C) on a tiny teacher: bksdm_ext.sensitivity."""

import importlib
import json

import pytest
import torch
import yaml

from bksdm_ext import io, layouts
from bksdm_ext.convert import checkpoint
from bksdm_ext.errors import BKSDMError
from bksdm_ext.evaluate import metrics
from bksdm_ext.prune import prune
from bksdm_ext.sensitivity import analysis, blocks
from bksdm_ext.sensitivity.job import SensitivityConfig, run
from tiny import tiny_unet, write_tiny_pipeline
from tiny_metrics import write_tiny_clip

IDENTITY, DESTRUCTIVE = "down0.1", "up1.1"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models on a loaded machine: one thread is many times faster than two fighting for cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rigged_teacher():
    """A tiny teacher whose down0.1 is an identity by construction (zero output projections) and whose
    up1.1 drowns the image in a constant (its attention adds a large per-channel offset everywhere)."""
    unet = tiny_unet()
    with torch.no_grad():
        block = unet.down_blocks[0]
        block.resnets[1].conv2.weight.zero_()
        block.resnets[1].conv2.bias.zero_()
        block.attentions[1].proj_out.weight.zero_()
        block.attentions[1].proj_out.bias.zero_()
        torch.manual_seed(1)
        bias = unet.up_blocks[2].attentions[1].proj_out.bias
        bias.copy_(torch.randn_like(bias) * 3000)
    return unet


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("rigged"), unet=_rigged_teacher())


def _config(teacher, **kw):
    values = dict(teacher=str(teacher), prompts=["a red bus", "a cat on a bench"], steps=2, resolution=64,
                  target_fraction=0.75, device="cpu")
    values.update(kw)
    return SensitivityConfig.from_dict(values)


def test_units_and_their_stand_ins_follow_the_shapes():
    config = tiny_unet().config
    names = [u.name for u in blocks.units()]
    assert len(names) == 22 and names[0] == "down0.0" and names[-1] == "inner" and "mid" in names
    assert blocks.stand_in(config, "down0.1") == "identity"  # 32 -> 32
    assert blocks.stand_in(config, "down1.0") == "channel interpolation"  # 32 -> 64
    assert blocks.stand_in(config, "up3.0") == "channel interpolation"  # concatenated with a skip
    assert blocks.stand_in(config, "mid") == blocks.stand_in(config, "inner") == "none"
    pairs = [u for u in blocks.units("pairs") if u.is_group]
    assert [u.name for u in pairs][:2] == ["down0.0+down0.1", "down1.0+down1.1"] and len(pairs) == 12


def test_channel_interpolation_resamples_the_channel_axis():
    x = torch.arange(3.0).reshape(1, 3, 1, 1)
    assert blocks.ChannelInterpolation(5)(x).flatten().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert blocks.ChannelInterpolation(3)(x) is x


def test_removal_changes_the_output_and_puts_everything_back():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 32)
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=context).sample
        for unit in blocks.units("pairs"):
            with blocks.removed(unet, unit) as pruned:
                out = pruned(x, t, encoder_hidden_states=context).sample
            assert out.shape == full.shape and not torch.allclose(out, full), unit.name
        assert torch.equal(unet(x, t, encoder_hidden_states=context).sample, full)
    assert unet.state_dict().keys() == before.keys() and all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert blocks.removed_parameters(unet, blocks.Unit("mid", ("mid",))) == sum(
        p.numel() for p in unet.mid_block.parameters())


def test_identity_block_ranks_harmless_destructive_ranks_worst_and_the_proposal_builds(tmp_path, rigged,
                                                                                      monkeypatch):
    clip_config, clip_weights = write_tiny_clip(tmp_path / "clip")
    embedded = {"images": 0, "texts": 0}
    for name, key in (("image_embeddings", "images"), ("text_embeddings", "texts")):
        real = getattr(metrics.Clip, name)

        def counted(self, items, *args, real=real, key=key, **kwargs):
            embedded[key] += len(items)
            return real(self, items, *args, **kwargs)

        monkeypatch.setattr(metrics.Clip, name, counted)
    job = tmp_path / "job"
    assert run(_config(rigged, clip_weights=str(clip_weights), clip_model=str(clip_config)), job) == "done"
    # each image (2 of the teacher, 2 per unit) and each prompt embedded once, for the CLIP score and distance
    assert embedded == {"images": 2 + 22 * 2, "texts": 2}
    table = (job / "output" / "sensitivity.csv").read_text().splitlines()
    assert table[0].endswith(",clip_score,clip_score_drop,clip_image_similarity")
    ranked = [line.split(",")[0] for line in table[1:]]
    assert ranked[0] == IDENTITY and ranked[-1] == DESTRUCTIVE
    identity, destructive = table[1].split(","), table[-1].split(",")
    assert float(identity[3]) == 0.0  # an identity removed changes no pixel
    # nor its CLIP score; its images embed as the teacher's
    assert abs(float(identity[7])) < 1e-6 and float(identity[8]) > 1 - 1e-6
    assert float(destructive[8]) < 1 - 1e-3 and float(destructive[7]) != 0.0
    teacher_clip = float(identity[6]) + float(identity[7])
    assert f"CLIP score (tiny-clip-test) of the full teacher: {teacher_clip:.4f}" in \
        (job / "output" / "proposal.txt").read_text()
    assert (job / "output" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    progress = json.loads((job / "progress.json").read_text())
    assert progress["state"] == "done" and progress["step"] == progress["total_steps"] == 23 * 2
    proposal = (job / "output" / "proposal.txt").read_text()
    spec = proposal.split("--keep '")[1].split("'")[0]
    lay = layouts.get_layout(spec)
    assert DESTRUCTIVE not in proposal.split("Build it")[0] and "not reached" not in proposal
    # the proposed layout builds from the teacher and loads strictly into the LDM U-Net of its yaml
    out = tmp_path / "proposed.safetensors"
    prune(rigged, out, spec, say=lambda line: None)
    tensors, metadata = io.read_safetensors(out)
    assert metadata["bksdm.layout"] == lay.name
    unet_config = yaml.safe_load(out.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]
    module, name = unet_config["target"].rsplit(".", 1)
    ldm = getattr(importlib.import_module(module), name)(**unet_config["params"])
    ldm.load_state_dict({k[len(checkpoint.UNET_PREFIX):]: v for k, v in tensors.items()
                         if k.startswith(checkpoint.UNET_PREFIX)}, strict=True)
    teacher_parameters = sum(p.numel() for p in tiny_unet().parameters())
    kept = sum(v.numel() for k, v in tensors.items() if k.startswith(checkpoint.UNET_PREFIX))
    assert kept <= 0.75 * teacher_parameters


def test_cancel_and_resume_score_only_what_is_missing(tmp_path, rigged, monkeypatch):
    job = tmp_path / "job"
    calls = []
    real = metrics.teacher_distance

    def scoring(teacher_images, student_images, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            (job / "cancel").write_text("")
        return real(teacher_images, student_images, *args, **kwargs)

    monkeypatch.setattr(metrics, "teacher_distance", scoring)
    config = _config(rigged, prompts=["a red bus"])
    assert run(config, job) == "cancelled"
    progress = json.loads((job / "progress.json").read_text())
    assert progress["state"] == "cancelled" and progress["step"] == 1 + 5
    teacher_png = next((job / "sensitivity" / "teacher").iterdir())
    stamp = teacher_png.stat().st_mtime_ns
    assert run(config, job, resume="latest") == "done"
    assert len(calls) == 22 and teacher_png.stat().st_mtime_ns == stamp
    scores = json.loads((job / "sensitivity" / "scores.json").read_text())
    assert sum(len(v) for v in scores.values()) == 22


def test_the_chart_of_pairs_and_clip_scores(tmp_path):
    """A pair of a stage can mix an identity and a channel interpolation: it has its own colour."""
    table = [analysis.Row("down1.0+down1.1", "channel interpolation + identity", 10, 0.5, 0.1, 2, 0.2, 0.9),
             analysis.Row("down0.1", "identity", 5, 0.0, 0.0, 2, 0.3, 1.0)]
    for teacher_clip_score in (None, 0.3):
        path = analysis.bar_chart(table, tmp_path / "chart.png", "pairs", teacher_clip_score)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_chosen_units_are_scored_and_the_time_of_all_is_estimated(tmp_path, rigged):
    job = tmp_path / "job"
    assert run(_config(rigged, prompts=["a red bus"], units=["mid", IDENTITY]), job) == "done"
    table = (job / "output" / "sensitivity.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == [IDENTITY, "mid"]
    assert json.loads((job / "progress.json").read_text())["total_steps"] == 1 + 2
    assert "all 22 units at these settings take about" in (job / "output" / "proposal.txt").read_text()
    with pytest.raises(BKSDMError, match=r"^Unknown unit 'down9\.0' for groups=single: give names such as"):
        _config(rigged, units=["down9.0"]).validate()
    with pytest.raises(BKSDMError, match=r"^The CLIP weights \S+nowhere\.safetensors are missing: open_clip weights"):
        _config(rigged, clip_weights=str(tmp_path / "nowhere.safetensors")).validate()
    # units of which no layout can be made: no proposal (and no command that would refuse the whole teacher)
    [line] = analysis.propose({"down0.1": 0.1, "up1.1": 0.2}, dict(tiny_unet().config), 0.7).lines()
    assert line.startswith("No layout to propose: none of the scored units can be removed as a layout")


def test_proposal_stops_where_no_layout_is_smaller():
    damage = {name: 1.0 for name in blocks.elementary_units()}
    config = tiny_unet().config
    proposal = analysis.propose(damage, dict(config), 0.01)
    assert not proposal.reached and layouts.get_layout(proposal.spec).down == (1, 1, 1)
    assert not layouts.get_layout(proposal.spec).mid_block


def test_sensitivity_refuses_a_pruned_model(tmp_path):
    small = write_tiny_pipeline(tmp_path / "small", "small")
    with pytest.raises(BKSDMError, match="not a full SD U-Net"):
        run(_config(small), tmp_path / "job")
