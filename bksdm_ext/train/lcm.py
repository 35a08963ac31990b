"""Latent consistency distillation (LCD, Luo et al. 2023, arXiv 2310.04378), as plain functions over tensors.

The maths follows diffusers' `examples/consistency_distillation/train_lcm_distill{_lora,}_sd_wds.py`
(BKSDM.md §6): a skipping-step DDIM solver over 50 of the 1,000 training timesteps, the teacher's
classifier-free guidance with w drawn from [w_min, w_max] (the LCM form x_c + w (x_c − x_u)), the
boundary-condition scalings c_skip / c_out, and a pseudo-Huber loss. `lcd_loss` puts them together for
one batch; the networks come in as functions `(x, t, text) -> output`, so the loss is testable on
hand-made ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def solver_timesteps(num_train_timesteps: int = 1000, num_solver_steps: int = 50) -> torch.Tensor:
    """The DDIM solver's timesteps k−1, 2k−1, …, T−1 with k = T / steps (diffusers' DDIMSolver)."""
    skip = num_train_timesteps // num_solver_steps
    return torch.arange(1, num_solver_steps + 1, dtype=torch.long) * skip - 1


def boundary_scalings(timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency parameterisation f(x, t) = c_skip x + c_out x̂0 (LCMScheduler's).

    c_skip(0) ≈ 1 and c_out(0) = 0, so f is the identity at the boundary t = 0.
    """
    scaled = timestep_scaling * timesteps.double()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def predicted_x0(output, timesteps, sample, prediction_type: str, alphas_cumprod):
    """x̂0 from a U-Net output at `timesteps`: ε-prediction (x − σ ε) / α, v-prediction α x − σ v."""
    alpha_bar = _per_sample(alphas_cumprod[timesteps.cpu()], sample)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output
    raise ValueError(f"Unsupported prediction type {prediction_type!r}")


def predicted_noise(output, timesteps, sample, prediction_type: str, alphas_cumprod):
    """ε̂ from a U-Net output: ε-prediction itself, v-prediction α v + σ x."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        alpha_bar = _per_sample(alphas_cumprod[timesteps.cpu()], sample)
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * sample
    raise ValueError(f"Unsupported prediction type {prediction_type!r}")


def ddim_step(x0, noise, alpha_bar_prev):
    """One deterministic DDIM step to the earlier timestep: √ᾱ_prev x̂0 + √(1 − ᾱ_prev) ε̂."""
    alpha_bar_prev = _per_sample(alpha_bar_prev, x0)
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * noise


def guided(cond, uncond, w):
    """The LCM paper's classifier-free guidance: cond + w (cond − uncond) (w = 0 is the plain conditional)."""
    w = _per_sample(w, cond)
    return cond + w * (cond - uncond)


def pseudo_huber(prediction, target, c: float = 0.001):
    """mean(√((a − b)² + c²) − c): L2-like near 0, L1-like far away (Song & Dhariwal 2023)."""
    return torch.mean(torch.sqrt((prediction.float() - target.float()) ** 2 + c ** 2) - c)


def draw_guidance(batch: int, w_min: float, w_max: float, generator: torch.Generator, device) -> torch.Tensor:
    """w ~ U[w_min, w_max] per sample (w_min = w_max: one fixed guidance)."""
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator, device=device)


@dataclass(frozen=True)
class Schedule:
    """The noise schedule and solver of a run: the model's ᾱ_t, its prediction type, the solver's timesteps."""

    alphas_cumprod: torch.Tensor  # float64 on the CPU, length num_train_timesteps
    prediction_type: str
    timesteps: torch.Tensor  # solver_timesteps(...)
    timestep_scaling: float = 10.0
    huber_c: float = 0.001

    @classmethod
    def of(cls, scheduler, num_solver_steps: int = 50, **kw) -> "Schedule":
        """From a diffusers DDPM-style scheduler's config (its ᾱ_t and prediction type)."""
        alphas = scheduler.alphas_cumprod.double().cpu()
        return cls(alphas, scheduler.config.prediction_type, solver_timesteps(len(alphas), num_solver_steps), **kw)

    @property
    def skip(self) -> int:
        return int(len(self.alphas_cumprod) // len(self.timesteps))


def lcd_loss(student: Net, teacher: Net, target: Net, latents, noise, text, uncond_text, index, w,
             schedule: Schedule):
    """(loss, {term: value}) of latent consistency distillation on one batch (LCM, Algorithm 1).

    z = noised latents at t_{n+k} = solver timestep `index`; the teacher's guided DDIM step takes z to
    t_n; the student's consistency output at t_{n+k} must match the target network's at t_n (the
    student itself for LoRA, its EMA for full distillation: pass the same function or another).
    """
    start = schedule.timesteps[index.cpu()]
    end = (start - schedule.skip).clamp(min=0)
    alphas, kind = schedule.alphas_cumprod, schedule.prediction_type
    device = latents.device
    start_d, end_d = start.to(device), end.to(device)
    alpha_bar = _per_sample(alphas[start], latents)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise

    c_skip_start, c_out_start = (_per_sample(c, latents) for c in boundary_scalings(start, 0.5,
                                                                                    schedule.timestep_scaling))
    student_x0 = predicted_x0(student(noisy, start_d, text).float(), start, noisy, kind, alphas)
    prediction = c_skip_start * noisy + c_out_start * student_x0
    with torch.no_grad():
        both = teacher(torch.cat([noisy, noisy]), torch.cat([start_d, start_d]), torch.cat([text, uncond_text]))
        out_cond, out_uncond = both.float().chunk(2)
        x0 = guided(predicted_x0(out_cond, start, noisy, kind, alphas),
                    predicted_x0(out_uncond, start, noisy, kind, alphas), w)
        eps = guided(predicted_noise(out_cond, start, noisy, kind, alphas),
                     predicted_noise(out_uncond, start, noisy, kind, alphas), w)
        x_prev = ddim_step(x0, eps, alphas[end])
        c_skip, c_out = (_per_sample(c, latents) for c in boundary_scalings(end, 0.5, schedule.timestep_scaling))
        goal = c_skip * x_prev + c_out * predicted_x0(target(x_prev, end_d, text).float(), end, x_prev, kind, alphas)
    loss = pseudo_huber(prediction, goal, schedule.huber_c)
    return loss, {"mse": torch.nn.functional.mse_loss(prediction.detach().float(), goal.float())}
