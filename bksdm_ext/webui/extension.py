"""Everything the extension registers with the WebUI; `scripts/bksdm.py` only calls `setup()`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from modules import script_callbacks, sd_models, shared

from .. import layouts
from . import checkpoints, loader
from .decide import positional_conflicts

SECTION = ("bksdm", "BK-SDM")


class _Extension:
    runner = None
    guard = None
    origin = None
    tab = None  # our tab's Blocks, as on_ui_tabs last built it
    lent = False  # the hand-off unloaded the model and a generation brought it back
    lora = None  # the LoraPatch of the built-in Lora extension, once installed
    placed: frozenset = frozenset()  # block-positional extensions our patches place: "controlnet", "hypertile"


ext = _Extension()


def data_dir() -> Path:
    configured = getattr(shared.opts, "bksdm_data_dir", "") or ""
    if configured:
        return Path(configured).expanduser()
    from modules import paths

    return Path(paths.data_path) / "bksdm"


def _guard():
    from ..jobs.guard import AccessGuard

    if ext.guard is None:
        ext.guard = AccessGuard.from_cmd_opts(shared.cmd_opts)
    return ext.guard


def _origin():
    """The WebUI's own pages: its bound address (and this machine's names under --listen) and its CORS flags."""
    from ..jobs.origin import OriginPolicy

    if ext.origin is None:
        ext.origin = OriginPolicy.from_cmd_opts(shared.cmd_opts, _guard().bound_host)
    return ext.origin


def _logins(app):
    """Who may use our routes when the WebUI has logins: its --api-auth and --gradio-auth users (None: no logins)."""
    from ..jobs.logins import Logins

    try:
        from modules.initialize_util import get_gradio_auth_creds  # 1.6+
        creds = list(get_gradio_auth_creds())
    except ImportError:
        creds = []
    return Logins.of(getattr(shared.cmd_opts, "api_auth", None), creds, lambda: getattr(app, "tokens", None) or {})


def _handoff_wanted() -> bool:
    import torch

    return bool(getattr(shared.opts, "bksdm_vram_handoff", True)) and torch.cuda.is_available()


# The hand-off moves the model with the WebUI's own send_model_to_cpu / send_model_to_device (1.6+),
# not unload_model_weights: on 1.6 that drops the model, and the next generation then reuses it
# without the WebUI's hijack (its text encoder no longer on the WebUI's device or prompt handling).


def _unload_for_job() -> bool:
    """Free the GPU for a training job; False when there was nothing to do (the runner then skips the reload)."""
    if not _handoff_wanted() or sd_models.model_data.sd_model is None:
        return False
    from modules import call_queue

    with call_queue.queue_lock:  # the runner's thread: never in the middle of a generation
        model = sd_models.model_data.sd_model
        if model is None:
            return False
        sd_models.send_model_to_cpu(model)
    return True


def _reload_after_jobs() -> None:
    from modules import call_queue

    with call_queue.queue_lock:  # as the WebUI's own "load the checkpoint to VRAM" action does it
        ext.lent = False
        if sd_models.model_data.sd_model is not None:
            sd_models.send_model_to_device(sd_models.model_data.sd_model)


def lend_model_for_generation() -> None:
    """Before a generation: if our jobs moved the WebUI's model to RAM, bring it back for this generation
    (it would otherwise run with its model on the CPU: a device-mismatch error). The runner's next tick
    moves it out again once the generation is over, finished or failed (`_give_gpu_back`)."""
    if ext.runner is None or not ext.runner.handoff_active:
        return
    ext.lent = True
    if sd_models.model_data.sd_model is not None:
        print("[BK-SDM] A training job holds the GPU: the model is back on it for this generation only.")
        sd_models.send_model_to_device(sd_models.model_data.sd_model)


def on_model_loaded(*_) -> None:
    """A checkpoint loaded while our jobs hold the GPU (a switch in the dropdown) goes back to RAM too."""
    if ext.runner is not None and ext.runner.handoff_active:
        ext.lent = True


def _give_gpu_back() -> None:
    """The runner's tick while our jobs hold the GPU: move out what a generation took back, once it is over."""
    if not ext.lent:
        return
    from modules import call_queue

    if not call_queue.queue_lock.acquire(blocking=False):  # a generation is running: next tick
        return
    try:
        if sd_models.model_data.sd_model is not None:
            sd_models.send_model_to_cpu(sd_models.model_data.sd_model)
        ext.lent = False
    finally:
        call_queue.queue_lock.release()


def runner():
    """The job runner, created on first use with the data folder of the settings."""
    if ext.runner is None:
        from ..jobs.runner import Runner, RunnerSettings

        settings = RunnerSettings(max_gpu_jobs=int(getattr(shared.opts, "bksdm_max_gpu_jobs", 1) or 1),
                                  vram_handoff=True)
        ext.runner = Runner(data_dir(), settings, before_gpu_job=_unload_for_job,
                            after_queue_empty=_reload_after_jobs, during_handoff=_give_gpu_back,
                            env={"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                               os.environ.get("PYTHONPATH")]))})
        ext.runner.start()
    return ext.runner


def on_ui_settings() -> None:
    options = {
        "bksdm_data_dir": shared.OptionInfo("", "BK-SDM data folder (jobs, timings); empty: <WebUI data>/bksdm"),
        "bksdm_vram_handoff": shared.OptionInfo(
            True, "Unload the WebUI's model while BK-SDM training jobs use the GPU (CUDA only)"),
        "bksdm_max_gpu_jobs": shared.OptionInfo(1, "BK-SDM jobs running on the GPU at once"),
        "bksdm_lora_from_sd": shared.OptionInfo(
            "", "LoRAs made for SD: names (comma-separated, * for all) placed by the block map on BK models even "
                "when their keys also fit the BK layout"),
    }
    for key, option in options.items():
        option.section = SECTION
        shared.opts.add_option(key, option)


def patch_positional() -> None:
    """ControlNet and Hypertile follow the BK layout, once their scripts are loaded; idempotent."""
    if "controlnet" not in ext.placed:
        from modules import scripts

        from . import controlnet

        found = controlnet.find(getattr(scripts, "scripts_data", []))
        if found is not None:
            controlnet.ControlNetPatch(*found, loader.loaded_layout).install()
            ext.placed |= {"controlnet"}
    if "hypertile" not in ext.placed and "hypertile" in sys.modules:
        from . import hypertile

        hypertile.install(sys.modules["hypertile"], loader.loaded_layout)
        ext.placed |= {"hypertile"}


def on_app_started(demo, app) -> None:
    from ..jobs.api import jobs_router
    from ..jobs.origin import OurEvents, install_same_origin
    from .models import routes

    patch_positional()

    # gradio builds a handler's gr.Request from the body of a POST to /api|run/predict, so the real
    # Host and Origin are checked in front of the app (after the WebUI's own setup_middleware)
    install_same_origin(app, _origin(), OurEvents(demo, ext.tab if demo is not None else None))
    logins = _logins(app)
    routes(app, _guard(), _origin(), logins)
    app.include_router(jobs_router(runner(), _guard(), _origin(), logins))
    # --gradio-allowed-path defaults to the WebUI's data folder, which holds ours: the job store,
    # configs and logs are never files to serve (the tab's gallery shows gradio's copies of the samples)
    if demo is not None and hasattr(demo, "blocked_paths"):
        demo.blocked_paths = [*(demo.blocked_paths or []), str(data_dir().resolve())]


def on_ui_tabs():
    from .. import kinds
    from ..ui.tab import TabContext, build_tab
    from . import timings
    from .models import (checkpoint_files, checkpoint_title, current_checkpoint, lora_dir, models_dir,
                         models_view_rows)

    # finished models land in models/Stable-diffusion/BK-SDM, so the checkpoint list shows them, and LoRAs
    # in the Lora folder, where the Lora extension finds them (the checkpoint list refuses them)
    outputs = {"output_dir": str(models_dir())}
    context = TabContext(runner(), _guard(), origin=_origin(), timings_store=timings.store_path,
                         benchmark=timings.run_benchmark, checkpoint_choices=timings.checkpoint_titles,
                         checkpoints=checkpoint_files, use_checkpoint=checkpoint_title, models_rows=models_view_rows,
                         current_checkpoint=current_checkpoint, samplers=sampler_names,
                         lora_output_dir=str(lora_dir()), form_defaults={name: outputs for name, kind in kinds.all().items()
                                        if "output_dir" in {s.name for s in kind.config_class().settings()}})
    ext.tab = build_tab(context)
    return [(ext.tab, "BK-SDM", "bksdm")]


def sampler_names() -> list[str]:
    """The names of the WebUI's samplers (1.6-1.10: `sd_samplers.all_samplers`; "LCM" from 1.8)."""
    from modules import sd_samplers

    return [sampler.name for sampler in sd_samplers.all_samplers]


def on_script_unloaded() -> None:
    if ext.runner is not None:
        ext.runner.stop()  # jobs are separate processes: they go on and are re-attached after reload
        ext.runner = None


def infotext(p) -> None:
    """Record the BK layout in the image's infotext and warn about positional extensions."""
    info = loader.loaded_info()
    if not info or not info.get("layout"):
        return
    title = layouts.get_layout(info["layout"]).title
    p.extra_generation_params["BK-SDM"] = f"{info['layout']} ({info['version']})"
    patch_positional()
    problems = positional_conflicts(shared.opts, p, ext.placed)
    for problem in problems:
        p.comment(f"BK-SDM: {problem} — it does not apply to {title}.")  # shown under the image
    if problems:  # and kept with the image, also for API callers (who do not get the comments)
        p.extra_generation_params["BK-SDM warning"] = ", ".join(problem.split()[0] for problem in problems)


def _lora_base_layout(hashes: list[str]) -> str | None:
    """The layout of the user's checkpoint with one of these hashes (kohya's `ss_*` base-model hashes:
    full sha256 or the WebUI's legacy short hash), read from its header; None when none matches."""
    from .decide import check, header_tensors

    for info in list(sd_models.checkpoints_list.values()):
        known = {h.lower() for h in (getattr(info, "sha256", None), getattr(info, "hash", None)) if h}
        if not known & set(hashes) or not info.filename.lower().endswith(".safetensors"):
            continue
        try:
            detection = check(header_tensors(info.filename)[0])
        except Exception:  # noqa: BLE001 - a broken file names no layout; the keys decide
            return None
        return detection.layout if detection is not None else "teacher"
    return None


def _lora_from_sd(name: str) -> bool:
    """Settings > BK-SDM > 'LoRAs made for SD': names, comma-separated, or * for all."""
    names = {n.strip() for n in str(getattr(shared.opts, "bksdm_lora_from_sd", "") or "").split(",") if n.strip()}
    return "*" in names or name in names


def patch_lora(*_) -> None:
    """Place every LoRA applied to a BK model by the block map, in the built-in Lora extension."""
    from .lora import LoraPatch

    networks = sys.modules.get("networks")  # extensions-builtin/Lora loads before user extensions
    if networks is not None and hasattr(networks, "load_network") and ext.lora is None:
        ext.lora = LoraPatch(networks, sd_models, loader.loaded_layout, _lora_base_layout, _lora_from_sd)
        ext.lora.install()


def process_batch(p) -> None:
    """After the extra networks are active: the placed/dropped counts of the LoRAs in the infotext."""
    from . import lora

    networks = sys.modules.get("networks")
    if networks is not None and loader.loaded_layout():
        lora.infotext(networks, p)


def setup() -> None:
    from . import timings

    loader.install()
    checkpoints.install()
    timings.install()
    patch_lora()
    script_callbacks.on_model_loaded(patch_lora)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_script_unloaded(on_script_unloaded)
