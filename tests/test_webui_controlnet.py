"""ControlNet on a BK model: the pure residual map, and the adapter on a stand-in of the extension's hook."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.addons import controlnet as placement
from bksdm_ext.student import student_state_dict
from bksdm_ext.webui.controlnet import ControlNetPatch, ResidualRouter
from bksdm_ext.webui.hypertile import depth_layers
from tiny import CROSS_DIM, LATENT, tiny_unet, tiny_unet_config
from webui_standins import FixedControlModel, Processing, controlnet_extension, ldm_unet


@pytest.mark.parametrize("layout", ["base", "small", "tiny"])
def test_each_student_input_block_takes_the_residual_of_the_teacher_block_it_was_copied_from(layout):
    # shown on the weights themselves: student input block j holds teacher input block i's tensors
    teacher = tiny_unet("teacher", "v1", seed=2).state_dict()
    ldm_teacher = {layouts.unet_key_to_ldm(k, "teacher"): v for k, v in teacher.items()}
    keys = [layouts.unet_key_to_diffusers(k, layout) for k in ldm_unet(tiny_unet_config(layout)).state_dict()]
    student = {layouts.unet_key_to_ldm(k, layout): v for k, v in student_state_dict(teacher, keys, layout).items()}
    inputs, middle = placement.residual_sources(layout)
    for j, i in enumerate(inputs):
        block = [k for k in student if k.startswith(f"input_blocks.{j}.")]
        assert block and all(torch.equal(student[k], ldm_teacher[k.replace(f"input_blocks.{j}.", f"input_blocks.{i}.", 1)])
                             for k in block)
    assert (middle is not None) == any(k.startswith("middle_block.") for k in student)
    dropped = set(placement.dropped_residuals(layout))
    assert dropped == set(range(13)) - set(inputs) - {middle}
    assert {"base": {2, 5, 8, 11}, "small": {2, 5, 8, 11, 12}, "tiny": {2, 5, 8, 9, 10, 11, 12}}[layout] == dropped


def test_scales_route_with_their_residuals():
    soft = [0.825 ** (12 - i) for i in range(13)]
    inputs, middle = placement.route(soft, "small")
    assert inputs == [soft[i] for i in (0, 1, 3, 4, 6, 7, 9, 10)] and middle is None
    with pytest.raises(Exception, match="13 residuals"):
        placement.route(soft[:10], "small")


@functools.lru_cache(maxsize=None)
def sd_residuals():
    """13 residuals shaped like the tiny teacher's input-block outputs and middle block output."""
    teacher = ldm_unet(tiny_unet_config("teacher"))
    x, t, context = inputs()
    from ldm.modules.diffusionmodules.util import timestep_embedding

    emb = teacher.time_embed(timestep_embedding(t, teacher.model_channels))
    shapes, h = [], x
    with torch.no_grad():
        for block in teacher.input_blocks:
            h = block(h, emb, context)
            shapes.append(h.shape)
        shapes.append(teacher.middle_block(h, emb, context).shape)
    generator = torch.Generator().manual_seed(4)
    return [torch.randn(s, generator=generator) for s in shapes]


def inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, LATENT, LATENT, generator=generator), torch.tensor([500]),
            torch.randn(1, 5, CROSS_DIM, generator=generator))


def run(layout, patched=True, **param_options):
    cn = controlnet_extension()
    said = []
    if patched:
        ControlNetPatch(cn.Script, cn.UnetHook, lambda: layout, say=said.append).install()
    unet = ldm_unet(tiny_unet_config(layout or "teacher"))
    param = cn.ControlParams(FixedControlModel(sd_residuals()), 0.7, cn.ControlModelType.ControlNet, **param_options)
    hook = cn.UnetHook()
    hook.hook(model=unet, sd_ldm=None, control_params=[param], process=Processing())
    with torch.no_grad():
        for _ in range(2):  # two steps: the routing starts afresh at each
            cn.added.clear()
            unet(*inputs())
    hook.restore()
    return cn.added, unet


@pytest.mark.parametrize("layout", ["base", "small", "tiny"])
@pytest.mark.parametrize("options", [{}, {"soft_injection": True}, {"advanced_weighting": [0.1 * i for i in range(13)]}])
def test_through_the_hook_each_skip_gets_its_teacher_blocks_residual_with_its_scale(layout, options):
    added, unet = run(layout, **options)
    scales = [0.7] * 13
    if options.get("soft_injection"):
        scales = [0.7 * 0.825 ** (12 - i) for i in range(13)]
    if options.get("advanced_weighting"):
        scales = options["advanced_weighting"]
    residuals = sd_residuals()
    sources, middle = placement.residual_sources(layout)
    middle_base, middle_added = added[0]
    if middle is None:
        assert not middle_added.any()
    else:
        assert torch.allclose(middle_added, residuals[12] * scales[12])
    skips = added[1:]
    assert len(skips) == len(unet.output_blocks) == len(sources)
    for k, (skip, residual) in enumerate(skips):
        source = sources[len(sources) - 1 - k]  # output block k takes the skip of input block n-1-k
        assert residual.shape == skip.shape
        assert torch.allclose(residual, residuals[source] * scales[source])


def test_on_sd_nothing_changes_and_unpatched_a_bk_layout_crashes():
    added, _ = run(None)
    residuals = sd_residuals()
    assert all(torch.allclose(x, residuals[11 - k] * 0.7) for k, (_, x) in enumerate(added[1:]))
    # the extension as it is on BK-SDM-Small: SD's 13 residuals popped in SD's order
    with pytest.raises(RuntimeError, match="size of tensor"):
        run("small", patched=False)


def test_units_that_address_blocks_otherwise_are_refused_and_the_rest_runs():
    cn = controlnet_extension()
    said = []
    ControlNetPatch(cn.Script, cn.UnetHook, lambda: "small", say=said.append).install()
    cn.Script.models.update(canny=SimpleNamespace(type=cn.ControlModelType.ControlNet),
                            t2i=SimpleNamespace(type=cn.ControlModelType.T2I_Adapter),
                            ipa=SimpleNamespace(type=cn.ControlModelType.IPAdapter))
    p = Processing()
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=None))
    p.units = [SimpleNamespace(enabled=True, module="reference_only", model="None"),
               SimpleNamespace(enabled=True, module="none", model="t2i"),
               SimpleNamespace(enabled=True, module="none", model="canny"),
               SimpleNamespace(enabled=True, module="ip-adapter_clip_sd15", model="ipa"),
               SimpleNamespace(enabled=False, module="none", model="canny")]
    kept = cn.Script.get_enabled_units(p)
    assert kept == [p.units[2]]
    assert len(p.comments) == 3 and "reference units read SD's input_blocks 8, 10 and 11" in p.comments[0]
    assert all("BK-SDM-Small's blocks" in c for c in p.comments)
    assert p.extra_generation_params["BK-SDM ControlNet"] == (
        "ControlNet unit 0 (reference_only) refused; ControlNet unit 1 (none) refused; "
        "ControlNet unit 3 (ip-adapter_clip_sd15) refused")
    # a unit that reaches the hook another way is refused there, and the model runs without it
    unet = ldm_unet(tiny_unet_config("small"))
    t2i = cn.ControlParams(FixedControlModel(sd_residuals()), 1.0, cn.ControlModelType.T2I_Adapter)
    hook = cn.UnetHook()
    hook.hook(model=unet, sd_ldm=None, control_params=[t2i], process=p)
    assert hook.control_params == []
    with torch.no_grad():
        unet(*inputs())


def test_router_positions():
    router = ResidualRouter(lambda r: r, "small")
    assert router.sources == [None] * 4 + [0, 1, 3, 4, 6, 7, 9, 10] + [None]
    assert ResidualRouter(lambda r: r, "base").sources[12] == 12
    assert ResidualRouter(lambda r: r, "tiny").sources == [None] * 6 + [0, 1, 3, 4, 6, 7] + [None]


SD_HYPERTILE_LDM = {  # hypertile.DEPTH_LAYERS' LDM names, WebUI 1.10.1
    0: ["input_blocks.1.1", "input_blocks.2.1", "output_blocks.9.1", "output_blocks.10.1", "output_blocks.11.1"],
    1: ["input_blocks.4.1", "input_blocks.5.1", "output_blocks.6.1", "output_blocks.7.1", "output_blocks.8.1"],
    2: ["input_blocks.7.1", "input_blocks.8.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1"],
    3: ["middle_block.1"],
}


def test_hypertile_depths_follow_the_layout():
    as_sd = {d: [f"diffusion_model.{n}.transformer_blocks.0.attn1" for n in names] for d, names in SD_HYPERTILE_LDM.items()}
    assert depth_layers("teacher") == as_sd
    small = depth_layers("small")
    assert small[0] == [f"diffusion_model.{n}.transformer_blocks.0.attn1" for n in
                        ("input_blocks.1.1", "output_blocks.6.1", "output_blocks.7.1")]
    assert small[3] == []
    tiny = depth_layers("tiny")
    assert tiny[2] == [f"diffusion_model.{n}.transformer_blocks.0.attn1" for n in
                       ("input_blocks.5.1", "output_blocks.0.1", "output_blocks.1.1")]
    modules = {f"diffusion_model.{n}" for n, _ in ldm_unet(tiny_unet_config("tiny")).named_modules()}
    assert all(name in modules for names in tiny.values() for name in names)


def test_hypertile_hooks_a_bk_unet_by_its_layouts_table():
    from types import ModuleType

    from bksdm_ext.webui import hypertile

    standin = ModuleType("hypertile")
    standin.DEPTH_LAYERS = {0: ["sd"]}
    seen = []
    standin.hypertile_hook_model = lambda model, width, height, **kw: seen.append(standin.DEPTH_LAYERS)
    current = {"layout": "small"}
    hypertile.install(standin, lambda: current["layout"])
    unet_wrapper, vae = SimpleNamespace(diffusion_model=None), SimpleNamespace()
    standin.hypertile_hook_model(vae, 64, 64, enable=True)
    standin.hypertile_hook_model(unet_wrapper, 64, 64, enable=True)
    current["layout"] = None
    standin.hypertile_hook_model(unet_wrapper, 64, 64, enable=True)
    assert seen == [{0: ["sd"]}, depth_layers("small"), {0: ["sd"]}] and standin.DEPTH_LAYERS == {0: ["sd"]}
