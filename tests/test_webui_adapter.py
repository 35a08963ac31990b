"""The WebUI adapter's wraps on a stand-in WebUI (no WebUI here): the checkpoint list, refusals at
preflight, and the model route's loading state. The stand-in copies what the real functions do that the
wraps depend on (modules/sd_models.py at v1.10.1); the real-WebUI tests check the same against a WebUI."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bksdm_ext.errors import BKSDMError

# the smallest files of each kind, by their key names (shapes matter only for BK layouts)
WHOLE = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
         "model.diffusion_model.input_blocks.11.0.in_layers.0.weight": (8,),
         "model.diffusion_model.middle_block.1.proj_in.weight": (8, 8, 1, 1),
         "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
         "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (16, 8)}
UNET_ONLY = {k: s for k, s in WHOLE.items() if k.startswith("model.diffusion_model.")}
VAE_ONLY = {"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}
LORA = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 8),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": (8, 4)}


def write(path: Path, shapes: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return str(path)


class _Opts:
    def __init__(self):
        self.data = {}


class _Info:
    def __init__(self, filename: str, models: Path):
        self.filename = filename
        path = Path(filename)
        self.name = str(path.relative_to(models)) if models in path.parents else path.name
        self.name_for_extra = path.stem
        self.title = f"{self.name} [{abs(hash(self.name)) % 10**10:010d}]"
        self.ids = [self.title, self.name, self.name_for_extra]

    def register(self, sd_models):
        sd_models.checkpoints_list[self.title] = self
        for alias in self.ids:
            sd_models.checkpoint_aliases[alias] = self


class _Model(torch.nn.Module):
    def __init__(self, info):
        super().__init__()
        self.sd_checkpoint_info, self.sd_model_checkpoint = info, info.filename
        self.weight = torch.nn.Parameter(torch.zeros(1))


def _standin(models: Path, ckpt: str | None):
    """`modules` with sd_models / sd_models_config / shared as far as the adapter uses them."""
    shared = types.ModuleType("modules.shared")
    shared.opts, shared.cmd_opts = _Opts(), types.SimpleNamespace(ckpt=ckpt)
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.checkpoints_list, sd_models.checkpoint_aliases = {}, {}
    sd_models.model_path = str(models)
    sd_models.model_data = types.SimpleNamespace(sd_model=None, lock=threading.Lock(), was_loaded_at_least_once=False)
    sd_models.seen_loading = []  # what the model route said while the stand-in loaded

    def list_models():  # the WebUI's: --ckpt first, and it takes the selection
        sd_models.checkpoints_list.clear()
        sd_models.checkpoint_aliases.clear()
        if ckpt and os.path.exists(ckpt):
            info = _Info(ckpt, models)
            info.register(sd_models)
            shared.opts.data["sd_model_checkpoint"] = info.title
        for path in sorted(models.rglob("*.safetensors")):
            _Info(str(path), models).register(sd_models)

    def get_closet_checkpoint_match(search):
        return next((info for title, info in sorted(sd_models.checkpoints_list.items()) if search in title), None)

    def select_checkpoint():
        return sd_models.checkpoint_aliases[shared.opts.data["sd_model_checkpoint"]]

    def load_model(checkpoint_info=None, already_loaded_state_dict=None):
        from safetensors.torch import load_file

        info = checkpoint_info or select_checkpoint()
        from bksdm_ext.webui import models as route

        sd_models.seen_loading.append(route.model_report())
        state_dict = load_file(info.filename)
        sd_models_config.find_checkpoint_config(state_dict, info)
        model = _Model(info)
        sd_models.load_model_weights(model, info, state_dict, None)
        sd_models.model_data.sd_model = model
        return model

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        info = info or select_checkpoint()
        loaded = sd_model or sd_models.model_data.sd_model
        if loaded is not None and loaded.sd_model_checkpoint == info.filename:
            return loaded
        return sd_models.load_model(info)

    sd_models.list_models, sd_models.get_closet_checkpoint_match = list_models, get_closet_checkpoint_match
    sd_models.select_checkpoint, sd_models.load_model = select_checkpoint, load_model
    sd_models.reload_model_weights = reload_model_weights
    sd_models.load_model_weights = lambda model, info, state_dict, timer: None
    sd_models.shared = shared
    sd_models_config = types.ModuleType("modules.sd_models_config")
    sd_models_config.find_checkpoint_config = lambda state_dict, info: "v1-inference.yaml"
    sd_models_config.find_checkpoint_config_near_filename = lambda info: None
    modules = types.ModuleType("modules")
    modules.__path__ = []
    modules.shared, modules.sd_models, modules.sd_models_config = shared, sd_models, sd_models_config
    return modules


@pytest.fixture
def webui(monkeypatch, tmp_path):
    """A stand-in WebUI started with --ckpt, its start-up list made, and our adapter modules imported."""
    models = tmp_path / "models" / "Stable-diffusion"
    ckpt = write(tmp_path / "ckpts" / "sd1-teacher.safetensors", WHOLE)
    write(models / "BK-SDM" / "mine.safetensors", WHOLE)
    modules = _standin(models, ckpt)
    for name in ("shared", "sd_models", "sd_models_config"):
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name in ("loader", "checkpoints", "models"):
        monkeypatch.delitem(sys.modules, f"bksdm_ext.webui.{name}", raising=False)
    modules.sd_models.list_models()  # at start, before extensions load
    ns = types.SimpleNamespace(modules=modules, models=models, tmp=tmp_path,
                               loader=importlib.import_module("bksdm_ext.webui.loader"),
                               checkpoints=importlib.import_module("bksdm_ext.webui.checkpoints"),
                               route=importlib.import_module("bksdm_ext.webui.models"))
    yield ns
    for name in ("loader", "checkpoints", "models"):
        sys.modules.pop(f"bksdm_ext.webui.{name}", None)


def _title(sd_models, stem):
    return next(t for t, info in sd_models.checkpoints_list.items() if info.name_for_extra == stem)


def _select(webui, stem):
    sd_models, shared = webui.modules.sd_models, webui.modules.shared
    shared.opts.data["sd_model_checkpoint"] = _title(sd_models, stem)
    return sd_models.reload_model_weights()


def test_a_refresh_keeps_the_users_selection_also_with_ckpt(webui):
    sd_models, opts = webui.modules.sd_models, webui.modules.shared.opts
    assert opts.data["sd_model_checkpoint"] == _title(sd_models, "sd1-teacher")  # --ckpt at start
    opts.data["sd_model_checkpoint"] = _title(sd_models, "mine")  # the user picks another one
    sd_models.list_models()
    assert opts.data["sd_model_checkpoint"] == _title(sd_models, "sd1-teacher")  # the WebUI's own refresh moves it
    opts.data["sd_model_checkpoint"] = _title(sd_models, "mine")
    webui.checkpoints.install()
    webui.checkpoints.install()  # Reload UI: not wrapped twice
    sd_models.list_models()
    assert opts.data["sd_model_checkpoint"] == _title(sd_models, "mine")
    (webui.models / "BK-SDM" / "mine.safetensors").unlink()  # gone: the refresh's own choice stands
    sd_models.list_models()
    assert opts.data["sd_model_checkpoint"] == _title(sd_models, "sd1-teacher")


def test_diffusers_folder_parts_are_not_listed(webui):
    sd_models = webui.modules.sd_models
    pipeline = webui.models / "BK-SDM" / "job-output"
    (pipeline).mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    write(pipeline / "unet" / "diffusion_pytorch_model.safetensors", {"conv_in.weight": (8, 4, 3, 3)})
    write(pipeline / "vae" / "diffusion_pytorch_model.safetensors", VAE_ONLY)
    write(webui.models / "BK-SDM" / "job-output.safetensors", WHOLE)
    sd_models.list_models()
    assert sum("diffusion_pytorch_model" in t for t in sd_models.checkpoints_list) == 2  # the WebUI lists them
    webui.checkpoints.install()
    sd_models.list_models()
    assert sorted(info.name_for_extra for info in sd_models.checkpoints_list.values()) == [
        "job-output", "mine", "sd1-teacher"]
    assert not any("diffusion_pytorch_model" in info.filename for info in sd_models.checkpoint_aliases.values())


@pytest.mark.parametrize("kind, shapes, message", [
    ("unet-only", UNET_ONLY, "U-Net-only file"),
    ("vae-only", VAE_ONLY, "VAE only.*models/VAE"),
    ("lora", LORA, "LoRA.*models/Lora"),
    ("diffusers-unet", {"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)},
     "diffusers naming"),
])
def test_a_file_that_is_no_checkpoint_is_refused_at_preflight_and_the_model_stays(webui, kind, shapes, message):
    sd_models = webui.modules.sd_models
    write(webui.models / f"{kind}.safetensors", shapes)
    webui.loader.install()
    sd_models.list_models()
    before = _select(webui, "mine")
    assert sd_models.model_data.sd_model is before and before.bksdm_info.filename == "mine.safetensors"
    with pytest.raises(BKSDMError, match=message):
        _select(webui, kind)
    assert sd_models.model_data.sd_model is before  # refused before anything was unloaded
    report = webui.route.model_report()
    assert report["loaded"]["filename"] == "mine.safetensors" and report["state"] == "loaded"
    assert report["last_refusal"]["checkpoint"] == _title(sd_models, kind)
    assert report["last_refusal"]["message"].startswith("This file")


def test_the_model_route_says_loading_while_a_checkpoint_loads(webui):
    sd_models = webui.modules.sd_models
    webui.loader.install()
    assert webui.route.model_report() == {"state": "none", "loading": None, "loaded": None, "last_refusal": None}
    with sd_models.model_data.lock:  # the start-up thread holds it before it calls load_model
        report = webui.route.model_report()
    assert (report["state"], report["loading"]) == ("loading", _title(sd_models, "sd1-teacher"))
    sd_models.load_model()  # the start-up load
    _select(webui, "mine")  # a switch
    _select(webui, "mine")  # before each generation: no load
    assert [(seen["state"], seen["loading"]) for seen in sd_models.seen_loading] == [
        ("loading", _title(sd_models, "sd1-teacher")), ("loading", _title(sd_models, "mine"))]
    assert webui.route.model_report()["state"] == "loaded" and webui.loader.state.loading is None


def test_loads_in_two_threads_that_overlap_leave_no_loading_state_behind(webui):
    state = webui.loader.state
    start_up, switch = state.loading_of(types.SimpleNamespace(title="start-up")), state.loading_of(types.SimpleNamespace(title="switch"))
    start_up.__enter__()
    switch.__enter__()  # asked for while the start-up load finishes
    assert state.loading == "switch"
    start_up.__exit__(None, None, None)
    assert state.loading == "switch"
    switch.__exit__(None, None, None)
    assert state.loading is None


def test_loras_made_by_jobs_go_to_the_lora_extensions_folder(webui, monkeypatch):
    shared = webui.modules.shared
    monkeypatch.setitem(sys.modules, "modules.paths", types.SimpleNamespace(models_path=str(webui.tmp / "models")))
    assert webui.route.lora_dir() == webui.tmp / "models" / "Lora"  # the Lora extension's default
    shared.cmd_opts.lora_dir = str(webui.tmp / "my-loras")  # --lora-dir
    assert webui.route.lora_dir() == webui.tmp / "my-loras"
