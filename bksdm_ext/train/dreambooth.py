"""DreamBooth personalisation of a BK-SDM (or SD) model (BKSDM.md §4), full or LoRA, on the shared core.

    loss = ‖target − ε(instance)‖² + w_prior ‖target − ε(class)‖²

Read `train` top to bottom: data (instance photos, class images generated once), models (full
fine-tuning or peft LoRA adapters), the loss of one micro-batch, the loop (`loop.fit`), the output
(single-file checkpoint, or a LoRA file in the WebUI's LDM naming plus the diffusers form).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .. import layouts
from ..io import write_image, write_text
from .config import DreamBoothConfig
from .loop import Job, fit
from .samples import render_samples
from .speed import apply_speedups, half_dtype
from .data import Batches, CaptionedImages, list_images
from .export import check_output_free, export_model, model_bytes, output_dir, outputs
from .losses import diffusion_target, prior_preservation_loss
from .models import encode_images, encode_prompts, freeze, layout_of, load_parts

UNET_LORA_TARGETS = ("to_q", "to_v")
TEXT_LORA_TARGETS = ("q_proj", "v_proj")


def train(config: DreamBoothConfig, job_dir, resume: str | None = None, accelerator=None) -> str:
    job = Job(config, job_dir, accelerator)
    acc, device = job.accelerator, job.device

    # data
    instance_images = list_images(config.instance_data, "instance_data")
    name = config.output_name or f"dreambooth-{Path(config.instance_data).name}"
    check_output_free(job, name)
    with acc.main_process_first():  # a single-file model is converted once, by the main process
        parts = load_parts(config.base_model)
    layout = layout_of(parts["unet"].config)
    job.say(f"Base model: {layouts.get_layout(layout).title}; {len(instance_images)} instance images; "
            f"mode {config.mode}.")
    class_images = []
    if config.prior_preservation:
        class_dir = Path(config.class_data) if config.class_data else job.folder.class_images
        if acc.is_main_process:
            generate_class_images(job, class_dir, parts)
        acc.wait_for_everyone()
        class_images = list_images(str(class_dir), "class images")[: config.num_class_images]

    # models: frozen VAE; U-Net and text encoder trained in full or through LoRA adapters
    frozen_dtype = half_dtype(device)
    freeze(parts["vae"], frozen_dtype, device)
    unet, text_encoder = parts["unet"].to(device), parts["text_encoder"].to(device)
    train_text = config.train_text_encoder
    if config.mode == "lora":
        add_lora(unet, config.lora_rank, config.lora_alpha, UNET_LORA_TARGETS)
        if train_text:
            add_lora(text_encoder, config.text_lora_rank, config.text_lora_alpha, TEXT_LORA_TARGETS)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_text)
    if not train_text:
        freeze(text_encoder, frozen_dtype, device)
    apply_speedups(unet, config, trainable=True).train()
    if config.gradient_checkpointing and train_text:
        text_encoder.gradient_checkpointing_enable()
    modules = {"unet": acc.prepare(unet)}
    if train_text:
        modules["text_encoder"] = acc.prepare(text_encoder.train())
    scheduler = parts["scheduler"]

    dataset = PairedImages(instance_images, config.instance_prompt, class_images, config.class_prompt, config)

    def make_batches(start: int) -> Batches:
        return Batches(dataset, config.train_batch_size, config.seed, acc.process_index, acc.num_processes, start,
                       config.num_workers)

    def loss_fn(batch):
        pixels, prompts = batch["pixels"], batch["caption"]
        if config.prior_preservation:  # instance half, then class half
            pixels, prompts = torch.cat([pixels, batch["class_pixels"]]), prompts + batch["class_caption"]
        with job.timer("encode"), torch.inference_mode():
            latents = encode_images(parts["vae"], pixels, job.generator).float()
        latents = latents.clone()
        with job.timer("text"):
            encoder = modules.get("text_encoder", text_encoder)
            with contextlib.nullcontext() if train_text else torch.inference_mode():
                text = encode_prompts(parts["tokenizer"], encoder, prompts, device)
            text = text if train_text else text.clone()
        noise = torch.randn(latents.shape, generator=job.generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=job.generator, device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)
        with job.timer("unet"):
            prediction = modules["unet"](noisy, timesteps, text.float()).sample
        if config.prior_preservation:
            return prior_preservation_loss(prediction, target, config.prior_loss_weight)
        instance = torch.nn.functional.mse_loss(prediction.float(), target.float())
        return instance, {"instance": instance}

    def render(step, ema):
        with _autocast(device, frozen_dtype):
            return render_samples(parts, unet, config.sample_prompts, job.folder.samples, f"step-{step:06d}",
                                  config.sample_steps, config.resolution, config.seed)

    # the loop
    trained = [unet, text_encoder] if train_text else [unet]
    if config.mode == "lora":  # the adapters, in the WebUI's file and as a diffusers/peft folder
        size = 2 * sum(4 * p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    else:
        size = model_bytes(parts["root"], *trained)
    outcome, _ = fit(job, modules, loss_fn, make_batches, render if acc.is_main_process else None, None, resume,
                     output=(output_dir(job), size))

    # output
    if outcome == "done":
        if acc.is_main_process:
            if config.mode == "lora":
                out = export_lora(job, unet, text_encoder if train_text else None, layout, name, config)
            else:
                out = export_model(job, unet, parts["root"], name, text_encoder if train_text else None)
            job.progress.update(state="done", message=f"Finished: {out}", output=str(out))
        acc.wait_for_everyone()
    job.progress.close()
    return outcome


# --- data ---------------------------------------------------------------------------------------


class PairedImages:
    """Item i: instance photo i (mod their number) and, with prior preservation, class image i (mod theirs)."""

    def __init__(self, instance_images, instance_prompt, class_images, class_prompt, config: DreamBoothConfig):
        def images(paths, prompt):
            return CaptionedImages([(p, prompt) for p in paths], config.resolution, config.center_crop,
                                   config.random_flip, config.seed)

        self.instances = images(instance_images, instance_prompt)
        self.classes = images(class_images, class_prompt) if class_images else None
        self.size = max(len(instance_images), len(class_images))

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        epoch, index = key
        item = self.instances[(epoch, index % len(self.instances))]
        if self.classes is None or "skipped" in item:
            return item
        other = self.classes[(epoch, index % len(self.classes))]
        if "skipped" in other:
            return other
        return {**item, "class_pixels": other["pixels"], "class_caption": other["caption"]}


def generate_class_images(job: Job, folder: Path, parts: dict) -> None:
    """Fill `folder` up to num_class_images with the generator's images of the class prompt.

    Image i comes from seed + i and is written atomically, so an interrupted generation resumes
    where it stopped and images already there (generated or the user's own) are kept.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    config = job.config
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list_images(str(folder), "class images", allow_empty=True))
    missing = config.num_class_images - have
    job.say(f"Class images in {folder}: {have} there, {max(0, missing)} to generate.")
    if missing <= 0:
        return
    gen_parts = load_parts(config.class_generator) if config.class_generator else parts
    pipe = StableDiffusionPipeline(vae=gen_parts["vae"], text_encoder=gen_parts["text_encoder"],
                                   tokenizer=gen_parts["tokenizer"], unet=gen_parts["unet"],
                                   scheduler=PNDMScheduler.from_config(gen_parts["scheduler"].config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    write_text(folder / ".class_images.json", json.dumps({
        "prompt": config.class_prompt, "generator": config.class_generator or config.base_model,
        "resolution": config.resolution, "guidance": config.class_guidance, "steps": config.class_steps}))
    index = 0
    with torch.no_grad():
        for _ in range(missing):
            while (folder / f"class-{index:05d}.png").exists():
                index += 1
            generator = torch.Generator("cpu").manual_seed(config.seed + index)
            image = pipe(config.class_prompt, num_inference_steps=config.class_steps, height=config.resolution,
                         width=config.resolution, guidance_scale=config.class_guidance, generator=generator).images[0]
            write_image(folder / f"class-{index:05d}.png", image)
            job.progress.update(message=f"generated class image {index + 1}")
    job.say(f"Generated {missing} class images.")


# --- models -------------------------------------------------------------------------------------


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets) -> None:
    """peft LoRA adapters on the named linear layers; only they are trained."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_modules(model: torch.nn.Module):
    """(module name, lora down weight, lora up weight, scaling) of every peft LoRA layer of `model`."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield (name, module.lora_A["default"].weight, module.lora_B["default"].weight,
                   module.scaling["default"])


def webui_lora_state_dict(unet, text_encoder, layout: str, text_family: str = "v1",
                          text_alpha: float | None = None, unet_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The LoRA in the WebUI Lora extension's naming: LDM module names, so pruned indices map right.

    U-Net: `lora_unet_<LDM module with _>.{lora_down,lora_up}.weight` and `.alpha` (the extension
    scales by alpha / rank). Text encoder: `lora_te_text_model_encoder_layers_N_self_attn_q_proj…`,
    which the extension maps to CLIP for v1 and, for v2, to OpenCLIP's fused attention
    `model_transformer_resblocks_N_attn` — applied there only when q, k, v and out_proj all have
    weights, so v2 adds k_proj and out_proj with a zero up-projection.
    """
    out: dict[str, torch.Tensor] = {}

    def put(key: str, down, up, alpha: float):
        out[f"{key}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))

    for name, down, up, scaling in lora_modules(unet):
        ldm = layouts.unet_key_to_ldm(f"{name}.weight", layout)[: -len(".weight")]
        put("lora_unet_" + ldm.replace(".", "_"), down, up, scaling * down.shape[0])
    if text_encoder is not None:
        for name, down, up, scaling in lora_modules(text_encoder):
            key = "lora_te_" + name.replace(".", "_")
            put(key, down, up, scaling * down.shape[0])
            if text_family == "v2" and name.endswith(".q_proj"):
                attention = name[: -len(".q_proj")]
                modules = dict(text_encoder.named_modules())
                for extra in ("k_proj", "out_proj"):
                    width = modules[f"{attention}.{extra}"].out_features
                    put(f"lora_te_{attention.replace('.', '_')}_{extra}", torch.zeros_like(down),
                        torch.zeros(width, down.shape[0]), scaling * down.shape[0])
    return out


def export_lora(job: Job, unet, text_encoder, layout: str, name: str, config: DreamBoothConfig) -> Path:
    """`name.safetensors` for the WebUI (LDM naming) and `name-diffusers/` (diffusers' LoRA file)."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    from ..io import write_safetensors

    out = outputs(job, name)
    out.claim(out.single, out.lora_diffusers)  # this job's earlier ones go; a foreign one is refused
    family = "v2" if unet.config.cross_attention_dim == 1024 else "v1"
    path = write_safetensors(out.single, webui_lora_state_dict(unet, text_encoder, layout, family),
                             {"ss_network_module": "networks.lora", "ss_network_dim": str(config.lora_rank),
                              "ss_network_alpha": str(config.lora_alpha), "bksdm.layout": layout,
                              "bksdm.base_model": str(config.base_model)})
    StableDiffusionPipeline.save_lora_weights(
        out.lora_diffusers, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder) if text_encoder is not None else None)
    job.say(f"Wrote {path} (use <lora:{name}:1> on the {layouts.get_layout(layout).title} model it was trained on).")
    return path


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype)
