"""BK checkpoints in the WebUI: what is loaded, importing diffusers folders, checking the loaded U-Net."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from modules import sd_models, shared
from pydantic import BaseModel

from .. import layouts
from ..errors import BKSDMError
from ..jobs.api import http_answer
from .loader import loaded_info, loading, state

SUBFOLDER = "BK-SDM"  # under models/Stable-diffusion: the dropdown shows "BK-SDM/<name>"


def models_dir() -> Path:
    return Path(sd_models.model_path) / SUBFOLDER


def lora_dir() -> Path:
    """The built-in Lora extension's folder, where jobs put the LoRAs they make: --lora-dir (its default is
    models/Lora under the models folder, which follows --data-dir and --models-dir)."""
    configured = getattr(shared.cmd_opts, "lora_dir", None)  # the Lora extension's preload adds the flag
    if configured:
        return Path(configured)
    from modules import paths

    return Path(paths.models_path) / "Lora"


def model_report() -> dict:
    """GET /bksdm/v1/model: the loaded checkpoint's layout, version and key check, and whether a load is
    under way (`state`: "loading", "loaded" or "none"; `loading`: the checkpoint being loaded)."""
    title, info = loading(), loaded_info()
    return {"state": "loading" if title else "loaded" if info else "none", "loading": title, "loaded": info,
            "last_refusal": state.last_refusal}


def import_checkpoint(source: str, name: str = "", half: bool = True) -> dict:
    """Convert a diffusers folder (or a single file) into models/Stable-diffusion/BK-SDM and list it."""
    from ..convert import convert

    src = Path(source).expanduser()
    if not src.exists():
        raise BKSDMError(f"{src} does not exist: give the path of a diffusers folder, e.g. a download of "
                         "nota-ai/bk-sdm-small, or a training job's output folder.")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name or src.name.removesuffix(".safetensors")).strip("-.") or "bk-sdm"
    target = models_dir() / f"{stem}.safetensors"
    if target.exists():
        raise BKSDMError(f"{target.name} already exists in {models_dir()}: choose another name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    notes = convert(src, target, half=half)
    refresh_checkpoints()
    info = sd_models.CheckpointInfo(str(target))
    return {"checkpoint": info.title, "path": str(target), "notes": list(notes or [])}


def refresh_checkpoints() -> None:
    """Re-list checkpoints, as the WebUI's refresh button does (the dropdown's choices follow)."""
    sd_models.list_models()


def verify_loaded_unet(seed: int = 0, latent: int = 8) -> dict:
    """Run the WebUI's U-Net and the diffusers U-Net of the same layout on the same weights and input.

    Shows inside the WebUI process that what it built for a BK layout computes what the published
    (diffusers) model computes.
    """
    from diffusers import UNet2DConditionModel

    info = loaded_info()
    if not info or not info.get("layout"):
        raise BKSDMError("Load a BK-SDM checkpoint first: the loaded model is not a BK layout.")
    layout, version = info["layout"], info["version"]
    webui_unet = shared.sd_model.model.diffusion_model
    device = next(webui_unet.parameters()).device
    dtype = next(webui_unet.parameters()).dtype
    config = layouts.unet_config(layout, version)
    weights = {layouts.unet_key_to_diffusers(k, layout): v for k, v in webui_unet.state_dict().items()}
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    reference.load_state_dict(weights, strict=True, assign=True)
    reference.eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, latent, latent, generator=generator).to(device, dtype)
    t = torch.tensor([500], device=device)
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=generator).to(device, dtype)
    with torch.no_grad():
        ours = webui_unet(x, t, context=context).float()
        theirs = reference(x, t, encoder_hidden_states=context).sample.float()
    return {"layout": layout, "version": version, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": (ours - theirs).abs().max().item(), "output_std": theirs.std().item()}


def checkpoint_files(refresh: bool = False) -> dict[str, str]:
    """The checkpoint list, title -> file, for the tab's model pickers; `refresh` re-lists first (the
    selection stays: checkpoints.install wraps list_models)."""
    if refresh:
        refresh_checkpoints()
    return {info.title: info.filename for info in sd_models.checkpoints_list.values()}


def current_checkpoint() -> str | None:
    """The file of the checkpoint selected in the WebUI's dropdown (None when nothing listed is selected)."""
    title = shared.opts.data.get("sd_model_checkpoint")
    info = sd_models.get_closet_checkpoint_match(title) if title else None
    return info.filename if info is not None else None


def checkpoint_title(path: Path) -> str:
    """The list's title of checkpoint file `path` ("Use in txt2img" selects it); re-lists when it is new."""
    def find():
        target = Path(path).resolve()
        return next((t for t, f in checkpoint_files().items() if Path(f).resolve() == target), None)

    title = find()
    if title is None:
        refresh_checkpoints()
        title = find()
    if title is None:
        raise BKSDMError(f"{path} is not in the checkpoint list: its output folder is not one of the WebUI's model "
                         f"folders. Move it to {models_dir()} (or set the job's output folder there) and refresh.")
    return title


def models_view_rows() -> list[dict]:
    """GET /bksdm/v1/models: the Models view, each BK checkpoint of the list with its costs and speed."""
    from . import timings
    from .models_view import models_view

    listed = [(info.title, info.filename) for info in sd_models.checkpoints_list.values()]
    return [row.as_dict() for row in models_view(listed, timings.open_store().records())]


class ImportRequest(BaseModel):
    source: str
    name: str = ""
    half: bool = True


def routes(app, guard, origin, logins) -> None:
    """/bksdm/v1/model… on the WebUI's FastAPI app, behind the same origin and login checks as the jobs API."""
    from fastapi import APIRouter

    from ..jobs.api import gated_route

    router = APIRouter(tags=["BK-SDM"], route_class=gated_route(origin, logins))
    router.add_api_route("/bksdm/v1/model", lambda: model_report(), methods=["GET"])
    router.add_api_route("/bksdm/v1/models", lambda: http_answer(models_view_rows), methods=["GET"])
    router.add_api_route("/bksdm/v1/model/verify", lambda: http_answer(verify_loaded_unet), methods=["POST"])

    def import_route(request: ImportRequest):
        def run():
            guard.check("Importing a checkpoint from a server path")
            return import_checkpoint(request.source, request.name, request.half)

        return http_answer(run)

    router.add_api_route("/bksdm/v1/import", import_route, methods=["POST"])
    app.include_router(router)
