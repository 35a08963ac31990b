"""Validation images of a training run: the fixed prompts rendered with the model being trained."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import write_image


@torch.no_grad()
def render_samples(pipeline_parts: dict, unet, prompts, directory: Path, stem: str, steps: int, resolution: int,
                   seed: int) -> list[Path]:
    """Render the fixed prompts with `unet` and the rest of a pipeline; PNGs `stem-i.png`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    parts = pipeline_parts
    scheduler = PNDMScheduler.from_config(parts["scheduler"].config)
    was_training = unet.training
    unet.eval()
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        image = pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution,
                     generator=generator, guidance_scale=7.5).images[0]
        paths.append(write_image(directory / f"{stem}-{i}.png", image))
    unet.train(was_training)
    return paths
