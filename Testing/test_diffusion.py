"""Schedule maths against closed forms and MONAI's own cosine schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedDiffFMLib import diffusion as D


@pytest.fixture(scope="module")
def sched():
    return D.Schedule.cosine(1000)


def test_cosine_matches_closed_form(sched):
    s, T = 0.008, 1000
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 87, 495, 998):
        assert sched.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert np.all(np.diff(sched.alphas_cumprod) < 0)
    assert sched.betas.max() <= 0.999


def test_cosine_agrees_with_monai(sched):
    from monai.networks.schedulers import DDPMScheduler

    monai_abar = DDPMScheduler(num_train_timesteps=1000, schedule="cosine").alphas_cumprod.double().numpy()
    np.testing.assert_allclose(sched.alphas_cumprod, monai_abar, rtol=1e-5, atol=1e-8)


def test_sigma_bar_landmarks(sched):
    # Verified values (NOTES-MONAI): sigma_bar 0.15 at t ~ 87, 1.0 at t ~ 495.
    assert abs(sched.t_for_sigma(0.15) - 87) <= 1
    assert abs(sched.t_for_sigma(1.0) - 495) <= 1
    assert float(sched.abar(-1)) == 1.0


def test_t_for_sigma_inverts_sigma_bar(sched):
    """Exact, not within one step: DiffPIR starts at the level of the noise, so a step too high or low shows."""
    for t in (5, 87, 300, 495, 800):
        assert sched.t_for_sigma(float(sched.sigma_bar(t))) == t


def test_diffpir_step_mixes_old_and_fresh_noise_preserving_the_variance(sched):
    g = torch.Generator().manual_seed(0)
    x0, eps, fresh = (torch.randn(1, 1, 4, 4, 4, generator=g) for _ in range(3))
    xt = D.q_sample(sched, x0, 200, eps)
    a = float(sched.abar(100))
    for zeta in (0.0, 0.3, 1.0):
        expected = math.sqrt(a) * x0 + math.sqrt(1 - a) * (math.sqrt(1 - zeta) * eps + math.sqrt(zeta) * fresh)
        got = D.diffpir_step(sched, xt, 200, 100, x0, zeta, fresh if zeta else None)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(D.diffpir_step(sched, xt, 200, -1, x0, 0.3, fresh), x0)  # the last step: x0 itself


def test_q_sample_and_predict_x0_are_inverse(sched):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)
    t = torch.tensor([10, 900])
    xt = D.q_sample(sched, x0, t, eps)
    torch.testing.assert_close(D.predict_x0(sched, xt, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(D.eps_from_x0(sched, xt, t, x0), eps, atol=1e-4, rtol=1e-4)
    a = float(sched.abar(10))
    torch.testing.assert_close(xt[0], (math.sqrt(a) * x0[0] + math.sqrt(1 - a) * eps[0]).float())


def test_reverse_step_is_ddpm_posterior_for_consecutive_steps(sched):
    """eta = 1, t_prev = t - 1: mean and variance equal the DDPM posterior q(x_{t-1} | x_t, x0)."""
    t = 300
    b, a_t, a_p = sched.betas[t], sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
    x0, xt = torch.full((1, 1, 2, 2, 2), 0.3), torch.full((1, 1, 2, 2, 2), -0.2)
    mean = (math.sqrt(a_p) * b / (1 - a_t)) * 0.3 + (math.sqrt(1 - b) * (1 - a_p) / (1 - a_t)) * -0.2
    var = (1 - a_p) / (1 - a_t) * b
    zero = D.reverse_step(sched, xt, t, t - 1, x0, eta=1.0, noise=torch.zeros_like(xt))
    one = D.reverse_step(sched, xt, t, t - 1, x0, eta=1.0, noise=torch.ones_like(xt))
    torch.testing.assert_close(zero, torch.full_like(xt, mean), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one - zero, torch.full_like(xt, math.sqrt(var)), atol=1e-6, rtol=1e-5)


def test_final_step_returns_x0(sched):
    x0, xt = torch.rand(1, 1, 2, 2, 2), torch.rand(1, 1, 2, 2, 2)
    torch.testing.assert_close(D.reverse_step(sched, xt, 0, -1, x0, eta=1.0, noise=torch.randn_like(xt)), x0)
    torch.testing.assert_close(D.diffpir_step(sched, xt, 5, -1, x0, 0.3, torch.randn_like(xt)), x0)


def test_diffpir_step_needs_fresh_noise_only_when_zeta_is_positive(sched):
    x0, xt = torch.rand(1, 1, 2, 2, 2), torch.rand(1, 1, 2, 2, 2)
    noise = torch.randn_like(xt)
    torch.testing.assert_close(D.diffpir_step(sched, xt, 50, 20, x0, 0.0, None),
                               D.diffpir_step(sched, xt, 50, 20, x0, 0.0, noise))
    with pytest.raises(ValueError, match="noise"):
        D.diffpir_step(sched, xt, 50, 20, x0, 0.3, None)


def test_timesteps():
    assert D.timesteps(5, 999) == [999, 749, 500, 250, 0]
    assert D.timesteps(100, 10) == list(range(10, -1, -1))
    assert D.timesteps(1, 87) == [87]
    with pytest.raises(ValueError):
        D.timesteps(0, 10)


def test_training_timesteps_weighting():
    g = torch.Generator().manual_seed(1)
    t = D.training_timesteps(20000, 1000, g, low_noise_fraction=0.7, low_noise_max_t=250)
    low = (t < 250).float().mean().item()
    assert 0.7 + 0.3 * 0.25 - 0.02 < low < 0.7 + 0.3 * 0.25 + 0.02
    assert t.max() >= 990  # the whole range is still covered for synthesis
