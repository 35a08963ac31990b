"""The paper's generation benchmark outside the WebUI, recorded into the timing store.

Protocol (BK-SDM, arXiv 2305.15798, Jetson AGX Orin table): 512x512, 20 steps, DPM++ 2M with Karras
sigmas, CFG 7, seed 1234, warm-up images excluded, N measured images. Sampling uses k-diffusion's
samplers on the diffusers U-Net when k-diffusion imports, else diffusers' DPMSolverMultistepScheduler
(dpmsolver++, order 2, Karras sigmas): the same method. PNDM (SD-v1's scheduler, the paper's
evaluation sampler) always runs through diffusers' PNDMScheduler.

`generate` is also the engine of the `evaluate` job: one prompt and one seed per image there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import detect, layouts
from ..errors import BKSDMError
from ..pipeline_folder import unet_dir
from . import device as device_info
from .protocol import DIFFUSERS_SAMPLERS, K_SAMPLERS, Protocol
from .recorder import GenerationRecorder, RecorderSlot
from .store import GenerationRecord, TimingStore, new_record_id

log = logging.getLogger(__name__)


def k_diffusion_available() -> bool:
    try:
        import k_diffusion.sampling  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Pipeline:
    """The parts of a diffusers Stable Diffusion folder a generation needs, on one device."""

    name: str
    checkpoint_hash: str
    layout: str
    version: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod


def describe_unet(unet, scheduler_config: dict) -> tuple[str, str]:
    """(timing layout name, SD version) of a U-Net, by the project's detector: "sd" for a standard model."""
    state_dict = unet.state_dict()
    detection = detect.detect_unet(state_dict)
    version = detect.resolve_version(detection, state_dict, scheduler_config=scheduler_config).version
    return ("sd" if detection.layout == layouts.TEACHER.name else detection.layout), version


def short_hash(path: Path) -> str:
    """sha256 of the U-Net weights, first 10 hex digits (the WebUI's short hash length)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def load_pipeline(folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> Pipeline:
    """A diffusers pipeline folder, or a single-file checkpoint (converted once into the model cache)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..io import load_pretrained
    from ..tokenizer import fix_max_length

    if Path(folder).is_file():
        from ..train.models import single_file_folder

        folder = single_file_folder(Path(folder))
    unet_folder, root = unet_dir(folder)
    if root is None:
        raise BKSDMError(f"{folder} is a U-Net folder; the benchmark needs a whole pipeline folder "
                         "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    device = torch.device(device)
    weights = sorted(unet_folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(
        unet_folder.glob("diffusion_pytorch_model*.bin"))
    unet = load_pretrained(UNet2DConditionModel, unet_folder, torch_dtype=dtype).to(device).eval()
    vae = load_pretrained(AutoencoderKL, root / "vae", torch_dtype=dtype).to(device).eval()
    text_encoder = load_pretrained(CLIPTextModel, root / "text_encoder", torch_dtype=dtype).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    fix_max_length(tokenizer, text_encoder.config.to_dict())
    scheduler_config = dict(DDPMScheduler.load_config(root / "scheduler"))
    layout, version = describe_unet(unet, scheduler_config)
    return Pipeline(name=root.name, checkpoint_hash=short_hash(weights[0]) if weights else "",
                    layout=layout, version=version,
                    unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler_config=scheduler_config, device=device, dtype=dtype)


class _DiffusersModel(torch.nn.Module):
    """A diffusers U-Net with the (x, t, cond) call k-diffusion's discrete wrappers make."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond):
        # the sampler works in float32 (as the WebUI does); the U-Net in its own precision
        return self.unet(x.to(self.unet.dtype), t, encoder_hidden_states=cond).sample.float()


def k_denoiser(pipe: Pipeline):
    """The U-Net as a k-diffusion denoiser (eps or v prediction), as the WebUI wraps its models."""
    from k_diffusion import external

    alphas = pipe.alphas_cumprod.to(pipe.device)
    wrapper = external.DiscreteVDDPMDenoiser if pipe.prediction_type == "v_prediction" else external.DiscreteEpsDDPMDenoiser
    return wrapper(_DiffusersModel(pipe.unet), alphas, quantize=False)


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompt: str | list[str], negative: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) of `prompt` repeated `batch` times, or of a list of prompts (one per image)."""
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)

    def encode(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(pipe.device)
        return pipe.text_encoder(ids)[0]

    return encode(prompts), encode([negative] * len(prompts))


@torch.no_grad()
def encode_image(pipe: Pipeline, image: torch.Tensor) -> torch.Tensor:
    """An image batch in [-1, 1] (B, 3, H, W) to scaled latents."""
    latents = pipe.vae.encode(image.to(pipe.device, pipe.dtype)).latent_dist.mean
    return latents.float() * pipe.vae.config.scaling_factor


def _noise(protocol: Protocol, seed: int, pipe: Pipeline, batch: int | None = None) -> torch.Tensor:
    # CPU generator: the same image on every device, as the WebUI's "CPU" RNG source
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch or protocol.batch_size, 4, protocol.height // 8, protocol.width // 8)
    return torch.randn(shape, generator=generator).to(pipe.device)


def img2img_sigmas(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that img2img runs, as the WebUI does (without "fix steps"):
    t_enc = int(strength * steps) and t_enc + 1 sampler steps."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]


@torch.no_grad()
def sample_k_diffusion(pipe: Pipeline, protocol: Protocol, cond, uncond, noise, init_latent=None) -> torch.Tensor:
    from k_diffusion import sampling

    denoiser = k_denoiser(pipe)
    if protocol.schedule == "karras":
        sigmas = sampling.get_sigmas_karras(protocol.steps, denoiser.sigma_min.item(), denoiser.sigma_max.item(),
                                            device=pipe.device)
    else:
        sigmas = denoiser.get_sigmas(protocol.steps)
    if init_latent is not None:
        sigmas = img2img_sigmas(sigmas, protocol.steps, protocol.strength)
        x = init_latent + noise * sigmas[0]
    else:
        x = noise * sigmas[0]
    scale = protocol.cfg_scale

    def guided(x, sigma):  # classifier-free guidance: cond and uncond in one U-Net batch
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond]))
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + (out_cond - out_uncond) * scale

    sample = getattr(sampling, K_SAMPLERS[protocol.sampler])
    return sample(guided, x, sigmas, disable=True)


def diffusers_scheduler(pipe: Pipeline, protocol: Protocol):
    """The protocol's sampler as a diffusers scheduler: PNDM, or DPM++ 2M (the k-diffusion-free path)."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    if protocol.sampler == "PNDM":
        # SD-v1's scheduler as StableDiffusionPipeline runs it (PLMS steps, no Runge-Kutta warm-up)
        return PNDMScheduler.from_config(pipe.scheduler_config, skip_prk_steps=True)
    return DPMSolverMultistepScheduler.from_config(
        pipe.scheduler_config, use_karras_sigmas=protocol.schedule == "karras",
        algorithm_type="dpmsolver++", solver_order=2)


@torch.no_grad()
def sample_diffusers(pipe: Pipeline, protocol: Protocol, cond, uncond, noise, init_latent=None) -> torch.Tensor:
    """PNDM, or DPM++ 2M (Karras) for when k-diffusion is absent, through diffusers' schedulers."""
    if protocol.sampler not in ("DPM++ 2M", *DIFFUSERS_SAMPLERS) or init_latent is not None:
        raise BKSDMError("Without k-diffusion only txt2img with DPM++ 2M or PNDM can run: install k-diffusion "
                         "or use --sampler 'DPM++ 2M' without --strength.")
    scheduler = diffusers_scheduler(pipe, protocol)
    scheduler.set_timesteps(protocol.steps, device=pipe.device)
    latents = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        model_output = pipe.unet(model_input.to(pipe.dtype), t, encoder_hidden_states=context).sample.float()
        out_uncond, out_cond = model_output.chunk(2)
        latents = scheduler.step(out_uncond + (out_cond - out_uncond) * protocol.cfg_scale, t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_lcm(pipe: Pipeline, protocol: Protocol, cond, uncond, noise, init_latent=None) -> torch.Tensor:
    """Multistep consistency sampling (LCM, Luo et al. 2023) through diffusers' LCMScheduler: the WebUI's
    "LCM" sampler. CFG 1 runs the conditional batch alone (a few-step model's usual 1-2); above 1 the
    unconditional batch joins, as for the other samplers."""
    from diffusers import LCMScheduler

    if init_latent is not None:
        raise BKSDMError("The LCM sampler is benchmarked for txt2img only: drop --strength.")
    scheduler = LCMScheduler.from_config(pipe.scheduler_config)
    scheduler.set_timesteps(protocol.steps, device=pipe.device)
    generator = torch.Generator(pipe.device).manual_seed(protocol.seed)
    guided = protocol.cfg_scale > 1
    context = torch.cat([uncond, cond]) if guided else cond
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        output = pipe.unet(model_input.to(pipe.dtype), t, encoder_hidden_states=context).sample.float()
        if guided:
            out_uncond, out_cond = output.chunk(2)
            output = out_uncond + (out_cond - out_uncond) * protocol.cfg_scale
        latents = scheduler.step(output, t, latents, generator=generator).prev_sample
    return latents


@torch.no_grad()
def generate(pipe: Pipeline, protocol: Protocol, recorder: GenerationRecorder, seed: int | list[int],
             backend: str = "k-diffusion", init_image: torch.Tensor | None = None, prompts: list[str] | None = None):
    """One batch of images, timed: total, sampling (inside), decode (by the slot's decoder hook).

    The benchmark: `protocol.prompt` x batch size, one seed for the batch's noise. Evaluation: `prompts`
    and a list of seeds, one each per image, so an image never depends on the batch it was made in.
    """
    recorder.start()
    cond, uncond = encode_prompts(pipe, prompts or protocol.prompt, protocol.negative_prompt, protocol.batch_size)
    init_latent = encode_image(pipe, init_image) if init_image is not None else None
    if isinstance(seed, int):
        noise = _noise(protocol, seed, pipe)
    else:
        noise = torch.cat([_noise(protocol, one, pipe, batch=1) for one in seed])
    if protocol.sampler == "LCM":
        sample = sample_lcm
    elif backend == "k-diffusion" and protocol.sampler in K_SAMPLERS:
        sample = sample_k_diffusion
    else:
        sample = sample_diffusers
    with recorder.sampling():
        latents = sample(pipe, protocol, cond, uncond, noise, init_latent)
    images = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.dtype)).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return images, recorder.finish()


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "k-diffusion" if k_diffusion_available() else "diffusers"
    if backend == "k-diffusion" and not k_diffusion_available():
        raise BKSDMError("k-diffusion does not import here: install it or use --backend diffusers.")
    return backend


def attention_name(unet) -> str:
    processors = getattr(unet, "attn_processors", {})
    return type(next(iter(processors.values()))).__name__ if processors else ""


class Generator:
    """A loaded pipeline with the timing hooks on its U-Net and VAE decoder: each call is one timed batch."""

    def __init__(self, pipe: Pipeline, backend: str = "auto"):
        self.pipe, self.backend = pipe, resolve_backend(backend)
        self.slot = RecorderSlot("bench")
        self.slot.hook_unet(pipe.unet)
        self.slot.hook_decoder(pipe.vae.decoder)

    def __call__(self, protocol: Protocol, seed: int | list[int], init_image: torch.Tensor | None = None,
                 prompts: list[str] | None = None):
        """(uint8 images (B, 3, H, W) on the CPU, Timings) of one batch; see `generate`."""
        recorder = GenerationRecorder(self.pipe.device)
        self.slot.active = recorder
        try:
            return generate(self.pipe, protocol, recorder, seed, self.backend, init_image, prompts)
        finally:
            self.slot.active = None

    def close(self) -> None:
        self.slot.remove_hooks()


def run_benchmark(folders: list, protocol: Protocol, store: TimingStore, device: str = "cpu",
                  dtype: torch.dtype | None = None, backend: str = "auto", init_image: torch.Tensor | None = None,
                  progress: Callable[[str], None] = log.info) -> list[GenerationRecord]:
    """Run the protocol on each pipeline folder; every measured image batch becomes one stored record."""
    check_protocol(protocol, init_image)
    backend = resolve_backend(backend)
    described = device_info.describe(device)
    run_id = new_record_id()[:12]
    records = []
    for folder in folders:
        pipe = load_pipeline(folder, device, dtype)
        generator = Generator(pipe, backend)
        for index in range(protocol.warmup + protocol.images):
            record = measure(generator, protocol, index, run_id, described, init_image)
            if index < protocol.warmup:
                continue
            store.add(record)
            records.append(record)
            progress(f"{pipe.name} ({pipe.layout}): image {index - protocol.warmup + 1}/{protocol.images} "
                     f"{record.seconds_per_image:.3f} s, {record.unet_calls} U-Net calls")
        generator.close()
        del pipe, generator
    return records


def check_protocol(protocol: Protocol, init_image: torch.Tensor | None = None) -> None:
    protocol.validate()
    if (init_image is None) != (protocol.strength is None):
        raise BKSDMError("img2img needs both an init image and a denoising strength.")


def measure(generator: Generator, protocol: Protocol, index: int, run_id: str, described,
            init_image: torch.Tensor | None = None) -> GenerationRecord:
    """The record of one timed batch, the `index`-th of a run (seed `protocol.seed + index * batch size`)."""
    pipe, seed = generator.pipe, protocol.seed + index * protocol.batch_size
    _, timings = generator(protocol, seed, init_image)
    return GenerationRecord(
        checkpoint=pipe.name, checkpoint_hash=pipe.checkpoint_hash, layout=pipe.layout, version=pipe.version,
        sampler=protocol.sampler, schedule=protocol.schedule, steps=protocol.steps,
        width=protocol.width, height=protocol.height, batch_size=protocol.batch_size,
        cfg_scale=protocol.cfg_scale, seed=seed,
        mode="txt2img" if protocol.strength is None else "img2img", denoising_strength=protocol.strength,
        source="bench", run_id=run_id, attention=attention_name(pipe.unet),
        precision=str(pipe.dtype).replace("torch.", ""), **timings.record_fields(),
        **described.record_fields())
