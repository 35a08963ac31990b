"""Latent consistency distillation: the maths on fixed tensors, the lcm job (LoRA and full), its outputs."""

from __future__ import annotations

import math

import pytest
import torch

from bksdm_ext.train import lcm

# --- the maths on fixed tensors -----------------------------------------------------------------


def test_solver_takes_every_twentieth_of_a_thousand_timesteps():
    steps = lcm.solver_timesteps(1000, 50)
    assert steps.tolist() == [20 * i - 1 for i in range(1, 51)]


def test_boundary_scalings_match_the_lcm_scheduler_and_are_the_identity_at_zero():
    from diffusers import LCMScheduler

    t = torch.tensor([0, 1, 19, 999])
    c_skip, c_out = lcm.boundary_scalings(t)
    scheduler = LCMScheduler()
    for i, step in enumerate(t.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(out), rel=1e-6, abs=1e-12)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0


def test_predicted_x0_and_noise_invert_the_forward_process_for_eps_and_v():
    alphas = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
    x0, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([2, 8])
    a = alphas[t].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for kind, output in (("epsilon", eps), ("v_prediction", v)):
        assert torch.allclose(lcm.predicted_x0(output, t, noisy, kind, alphas), x0, atol=1e-5)
        assert torch.allclose(lcm.predicted_noise(output, t, noisy, kind, alphas), eps, atol=1e-5)
    with pytest.raises(ValueError, match="sample"):
        lcm.predicted_x0(eps, t, noisy, "sample", alphas)


def test_lcd_loss_equals_a_hand_computed_value():
    # 4 training timesteps, a 2-step solver (timesteps 1 and 3, skip 2); index 1: t_{n+k} = 3, t_n = 1
    alphas = torch.tensor([0.9, 0.8, 0.5, 0.2], dtype=torch.float64)
    schedule = lcm.Schedule(alphas, "epsilon", lcm.solver_timesteps(4, 2))
    assert schedule.timesteps.tolist() == [1, 3] and schedule.skip == 2
    one = torch.ones(1, 1, 1, 1)
    latents, noise, text, uncond = one, 0.5 * one, 0.2 * one, 0.1 * one
    student = lambda x, t, c: 0.5 * x  # noqa: E731 (ε predictions of made-up networks)
    teacher = lambda x, t, c: c + 0 * x  # noqa: E731
    target = lambda x, t, c: 0.25 * x  # noqa: E731
    w = torch.tensor([2.0])
    loss, terms = lcm.lcd_loss(student, teacher, target, latents, noise, text, uncond, torch.tensor([1]), w, schedule)

    def scalings(t):
        return 0.25 / ((10 * t) ** 2 + 0.25), 10 * t / math.sqrt((10 * t) ** 2 + 0.25)

    def x0_of(eps, x, a):
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    z = math.sqrt(0.2) * 1 + math.sqrt(0.8) * 0.5  # noised at t = 3
    skip3, out3 = scalings(3)
    prediction = skip3 * z + out3 * x0_of(0.5 * z, z, 0.2)
    x0 = x0_of(0.2, z, 0.2) + 2 * (x0_of(0.2, z, 0.2) - x0_of(0.1, z, 0.2))  # teacher's guided x0 and ε
    eps = 0.2 + 2 * (0.2 - 0.1)
    x_prev = math.sqrt(0.8) * x0 + math.sqrt(0.2) * eps  # DDIM to t = 1 (ᾱ = 0.8)
    skip1, out1 = scalings(1)
    goal = skip1 * x_prev + out1 * x0_of(0.25 * x_prev, x_prev, 0.8)
    expected = math.sqrt((prediction - goal) ** 2 + 0.001 ** 2) - 0.001
    assert expected == pytest.approx(0.1383822, abs=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["mse"].item() == pytest.approx((prediction - goal) ** 2, rel=1e-4)


def test_lcd_loss_reaches_the_student_only_and_index_zero_ends_at_the_boundary():
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    schedule = lcm.Schedule(alphas, "epsilon", lcm.solver_timesteps())
    net = torch.nn.Conv2d(4, 4, 1)
    teacher = torch.nn.Conv2d(4, 4, 1).requires_grad_(False)
    seen = []

    def target(x, t, c):
        seen.append(t)
        return teacher(x)

    latents = torch.randn(2, 4, 2, 2)
    loss, _ = lcm.lcd_loss(lambda x, t, c: net(x), lambda x, t, c: teacher(x), target, latents,
                           torch.randn_like(latents), torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 49]),
                           torch.tensor([3.0, 15.0]), schedule)
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert seen[0].tolist() == [0, 979]  # t_n = max(t_{n+k} - 20, 0)


def test_guidance_is_drawn_in_its_range():
    w = lcm.draw_guidance(1000, 3.0, 15.0, torch.Generator().manual_seed(0), "cpu")
    assert 3.0 <= w.min() and w.max() <= 15.0 and w.std() > 3
    assert lcm.draw_guidance(4, 8.0, 8.0, torch.Generator(), "cpu").tolist() == [8.0] * 4
