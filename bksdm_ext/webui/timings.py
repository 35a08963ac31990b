"""Recording every WebUI generation into the timing store, and the paper's benchmark through the WebUI.

The AlwaysVisible script in `scripts/bksdm.py` calls `begin` (process), `batch_done`
(postprocess_batch), `before_hr` and `end` (postprocess). U-Net evaluations and VAE decodes are timed
by forward hooks installed once per loaded model; the CFG denoiser callbacks mark where one sampler
evaluation starts and ends, so cond/uncond run as two forwards still count as one evaluation.
Only one generation runs at a time (the WebUI's queue lock), but one may run inside another (e.g.
ADetailer's inpainting from postprocess_image): the inner one is recorded on its own and the outer one
resumes when it ends (one run without our script, as ADetailer's usually are, counts its U-Net
evaluations into the outer generation: they are real work of that generation). A generation that
died without reaching postprocess is dropped once its processing object is gone.
Nothing here may break a generation: every error is logged once and recording stops.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from modules import devices, script_callbacks, shared

from ..errors import BKSDMError
from ..timings import stats
from ..timings.device import describe_cached
from ..timings.protocol import Protocol, schedule_as_run
from ..timings.recorder import GenerationRecorder, RecorderSlot
from ..timings.store import GenerationRecord, TimingStore, new_record_id

log = logging.getLogger(__name__)

SLOT = RecorderSlot("timings")
ATTRIBUTE = "_bksdm_timing"  # the per-generation state, kept on the processing object


@dataclass
class _Generation:
    recorder: GenerationRecorder
    processing: weakref.ref  # the processing object: gone means the generation died without postprocess
    source: str
    run_id: str
    record: bool = True  # False for benchmark warm-up images
    batches: int = 0
    hires_pending: bool = False  # between before_hr and the hires pass's first evaluation
    record_id: str = field(default_factory=new_record_id)


class _Settings:
    keep = 10_000  # retention: newest records kept
    store: TimingStore | None = None


settings = _Settings()
_running: list[_Generation] = []  # outermost first; the last one is being recorded


def store_path() -> Path:
    from .extension import data_dir

    return data_dir() / "timings.sqlite3"


def open_store() -> TimingStore:
    """The store of the current data folder (reopened when the setting changes)."""
    path = store_path()
    if settings.store is None or settings.store.path != path:
        if settings.store is not None:
            settings.store.close()
        settings.store = TimingStore(path, keep=settings.keep)
    return settings.store


def _safely(fn):
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # recording must never break a generation
            SLOT.failed(error)

    return run


def hook_model(sd_model) -> None:
    """Install the U-Net and VAE-decoder hooks on a loaded model (once per model)."""
    model = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    SLOT.hook_unet(model)
    SLOT.hook_decoder(getattr(getattr(sd_model, "first_stage_model", None), "decoder", None))


@_safely
def _on_model_loaded(sd_model) -> None:
    hook_model(sd_model)


@_safely
def _on_cfg_denoiser(params) -> None:
    recorder = SLOT.active
    if recorder is None:
        return
    hook_model(shared.sd_model)  # a hires checkpoint or refiner may have been swapped in
    generation = _running[-1] if _running else None
    if generation is not None and generation.recorder is recorder and generation.hires_pending:
        generation.hires_pending = False
        recorder.begin_sampling()  # the hires pass: sampling ended at before_hr, for the upscale
    recorder.begin_evaluation()


@_safely
def _on_cfg_denoised(params) -> None:
    if SLOT.active is not None:
        SLOT.active.end_evaluation()


def install() -> None:
    """Register the callbacks and API routes; the WebUI drops them on reload and calls this again."""
    # callbacks take a name from WebUI 1.9 on; 1.6-1.8 refuse the keyword
    named = {"name": "bksdm_timings"} if "name" in inspect.signature(script_callbacks.on_app_started).parameters else {}
    script_callbacks.on_app_started(lambda demo, app: routes(app), **named)
    script_callbacks.on_model_loaded(_on_model_loaded, **named)
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser, **named)
    script_callbacks.on_cfg_denoised(_on_cfg_denoised, **named)
    script_callbacks.on_script_unloaded(SLOT.remove_hooks, **named)
    from modules import sd_models

    loaded = sd_models.model_data.sd_model  # not shared.sd_model: reading that would load a model
    if loaded is not None:
        _on_model_loaded(loaded)


@_safely
def begin(p, source: str = "webui", run_id: str = "", record: bool = True) -> None:
    """Start timing a generation (the script's `process`)."""
    hook_model(shared.sd_model)
    recorder = GenerationRecorder(devices.device)
    generation = _Generation(recorder, weakref.ref(p), source, run_id, record)
    setattr(p, ATTRIBUTE, generation)
    _running[:] = [g for g in _running if g.processing() is not None] + [generation]
    p.sample = _timed_sample(p, recorder)
    SLOT.active = recorder
    recorder.start()


def _timed_sample(p, recorder: GenerationRecorder):
    """This object's `sample`, timed as sampling (each batch, both hires passes). It holds `p` weakly, so
    a processing object whose generation died is freed and its recording dropped."""
    sample = p.sample
    is_method = getattr(sample, "__self__", None) is p
    sample = sample.__func__ if is_method else sample  # another extension's wrapper is kept as it is
    processing = weakref.ref(p)

    def timed_sample(*args, **kwargs):
        call = (lambda: sample(processing(), *args, **kwargs)) if is_method else (lambda: sample(*args, **kwargs))
        if SLOT.active is not recorder:
            return call()
        _safely(recorder.begin_sampling)()
        try:
            return call()
        finally:
            _safely(recorder.end_sampling)()

    return timed_sample


@_safely
def before_hr(p) -> None:
    """Upscaling between the hires passes is not sampling."""
    generation = getattr(p, ATTRIBUTE, None)
    if generation is not None and SLOT.active is generation.recorder:
        generation.recorder.end_sampling()
        generation.hires_pending = True


@_safely
def batch_done(p) -> None:
    generation = getattr(p, ATTRIBUTE, None)
    if generation is not None:
        generation.batches += 1


@_safely
def end(p) -> GenerationRecord | None:
    """Finish timing (the script's `postprocess`) and store the record; returns it."""
    generation = getattr(p, ATTRIBUTE, None)
    if generation is None:
        return None
    delattr(p, ATTRIBUTE)
    _running[:] = [g for g in _running if g is not generation]
    SLOT.active = next((g.recorder for g in reversed(_running) if not g.recorder.broken), None)
    if generation.recorder.broken:
        return None
    timings = generation.recorder.finish()
    if not generation.record or generation.batches == 0:  # warm-up, or interrupted before any image
        return None
    record = GenerationRecord(**generation_fields(p, generation), **timings.record_fields(),
                              **describe_cached(str(devices.device)).record_fields(), **environment_fields())
    open_store().add(record)
    return record


def generation_fields(p, generation: _Generation) -> dict:
    sd_model = shared.sd_model
    info = getattr(sd_model, "bksdm_info", None)
    layout = getattr(info, "layout", None)
    layout = getattr(layout, "name", layout)  # a Layout or its name
    img2img = hasattr(p, "init_images")
    hires = bool(getattr(p, "enable_hr", False))
    checkpoint_info = getattr(sd_model, "sd_checkpoint_info", None)
    sampler, schedule = schedule_as_run(p.sampler_name or "", getattr(p, "scheduler", None),
                                        getattr(p, "extra_generation_params", None) or {})
    return dict(
        record_id=generation.record_id, source=generation.source, run_id=generation.run_id,
        checkpoint=p.sd_model_name or getattr(checkpoint_info, "name_for_extra", "") or "",
        checkpoint_hash=p.sd_model_hash or "",
        layout="sd" if layout in (None, "teacher") else str(layout),  # "sd": a standard model
        version=str(getattr(info, "version", "") or ""),
        sampler=sampler, schedule=schedule,
        mode="img2img" if img2img else "txt2img", steps=int(p.steps), width=int(p.width), height=int(p.height),
        batch_size=int(p.batch_size), n_iter=generation.batches, cfg_scale=float(p.cfg_scale),
        seed=int(p.all_seeds[0]) if getattr(p, "all_seeds", None) else int(p.seed), hires=hires,
        denoising_strength=float(p.denoising_strength) if (img2img or hires) and p.denoising_strength is not None else None,
    )


def environment_fields() -> dict:
    from modules import launch_utils, sd_hijack

    precision = str(devices.dtype_unet).replace("torch.", "")
    if getattr(devices, "unet_needs_upcast", False):
        precision += " (upcast)"
    if getattr(shared.opts, "fp8_storage", "Disable") not in ("Disable", None, False):
        precision += " (fp8 weights)"
    attention = getattr(sd_hijack.model_hijack, "optimization_method", None) or \
        getattr(shared.opts, "cross_attention_optimization", "")
    return dict(attention=str(attention or ""), precision=precision, webui_version=launch_utils.git_tag())


def benchmark_processing(protocol: Protocol, seed: int):
    """A txt2img processing object for one benchmark image: the protocol, nothing saved."""
    from modules import processing

    fields = set(getattr(processing.StableDiffusionProcessing, "__dataclass_fields__", {}))
    sampler = {"sampler_name": protocol.sampler}
    if protocol.schedule == "karras":  # 1.9+ has a separate scheduler; before, it is part of the sampler name
        sampler = {"sampler_name": protocol.sampler, "scheduler": "Karras"} if "scheduler" in fields else \
            {"sampler_name": f"{protocol.sampler} Karras"}
    return processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=protocol.prompt, negative_prompt=protocol.negative_prompt,
        steps=protocol.steps, cfg_scale=protocol.cfg_scale, width=protocol.width, height=protocol.height,
        seed=seed, batch_size=protocol.batch_size, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
        **sampler)


def _load_checkpoint(title: str) -> None:
    """Make `title` the WebUI's checkpoint, the way its settings do (process_images reloads from them)."""
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise BKSDMError(f"No checkpoint named {title!r}: refresh the checkpoint list and pick one from it.")
    if shared.sd_model is None:  # reading it waits for a load in progress (the WebUI's first one runs in a thread)
        raise BKSDMError("The WebUI has no model loaded: load a checkpoint first, then run the benchmark.")
    # run_callbacks=False: the setting's own callback reloads under the queue lock, which we hold
    shared.opts.set("sd_model_checkpoint", info.title, run_callbacks=False)
    sd_models.reload_model_weights()


def run_benchmark(checkpoint_titles: list[str], protocol: Protocol, progress=print) -> list[GenerationRecord]:
    """The paper's protocol through the WebUI's own processing for each checkpoint; returns the records.

    Holds the WebUI's queue lock so no user generation interleaves with the measurement, and puts
    the user's checkpoint back afterwards."""
    from modules import call_queue, processing

    protocol.validate()
    run_id = new_record_id()[:12]
    records = []
    with call_queue.queue_lock:
        original = shared.opts.sd_model_checkpoint
        try:
            for title in checkpoint_titles:
                _load_checkpoint(title)
                for index in range(protocol.warmup + protocol.images):
                    p = benchmark_processing(protocol, protocol.seed + index * protocol.batch_size)
                    begin(p, "webui-bench", run_id, record=index >= protocol.warmup)
                    try:
                        processing.process_images(p)
                        batch_done(p)
                    finally:
                        record = end(p)
                    if record is not None:
                        records.append(record)
                        progress(f"{record.checkpoint} ({record.layout}): {record.seconds_per_image:.3f} s/image")
        finally:
            _load_checkpoint(original)
    return records


def checkpoint_titles() -> list[str]:
    """What the benchmark can compare: the WebUI's checkpoint list."""
    from modules import sd_models

    return sd_models.checkpoint_tiles()


class BenchmarkRequest(BaseModel):
    checkpoints: list[str]
    images: int = Protocol.images
    warmup: int = Protocol.warmup
    width: int = Protocol.width
    height: int = Protocol.height
    steps: int = Protocol.steps
    sampler: str = Protocol.sampler
    cfg_scale: float = Protocol.cfg_scale
    seed: int = Protocol.seed


def routes(app) -> None:
    """GET /bksdm/v1/timings (the grouped table) and POST /bksdm/v1/timings/benchmark."""
    from dataclasses import asdict

    from fastapi import HTTPException

    @app.get("/bksdm/v1/timings")
    def timings_table(reference: str = "", source: str = ""):
        records = stats.filter_records(open_store().records(), source=source or None)
        return {"records": len(records), "groups": [asdict(row) for row in stats.group(records, reference or None)]}

    @app.post("/bksdm/v1/timings/benchmark")
    def benchmark(request: BenchmarkRequest):
        protocol = Protocol(images=request.images, warmup=request.warmup, width=request.width, height=request.height,
                            steps=request.steps, sampler=request.sampler, cfg_scale=request.cfg_scale,
                            seed=request.seed)
        try:
            records = run_benchmark(request.checkpoints, protocol)
        except BKSDMError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        reference = records[0].checkpoint if records else None
        return {"run_id": records[0].run_id if records else "", "records": len(records),
                "groups": [asdict(row) for row in stats.group(records, reference)]}
