"""Diffusion maths: cosine schedule, forward noising, x0/epsilon conversions, strided reverse steps.

Pure functions over a `Schedule`. Coefficients are computed in float64 and applied in float32, so the
maths stays exact under bf16 autocast of the network (only the network runs in reduced precision).
Timestep convention (as MONAI/diffusers): t in 0..T-1, abar[t] = prod_{s<=t} (1 - beta_s); the state
"before" t = 0 is the clean image, so abar(-1) = 1.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .config import SCHEDULES

TimeLike = Union[int, torch.Tensor]


class Schedule:
    """Noise schedule: betas and their cumulative products, float64."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1D array of values in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.T = len(betas)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal (2021): abar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)."""
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)
        return cls(betas)

    @classmethod
    def from_name(cls, name: str, T: int) -> "Schedule":
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        return cls.cosine(T)

    def abar(self, t: TimeLike) -> torch.Tensor:
        """abar at integer timestep(s) t, float64; t = -1 gives 1 (the clean image)."""
        t64 = torch.as_tensor(t, dtype=torch.long)
        table = torch.from_numpy(np.concatenate([[1.0], self.alphas_cumprod]))
        return table[t64 + 1]

    def sigma_bar(self, t: TimeLike) -> torch.Tensor:
        """Noise-to-signal ratio sqrt((1 - abar)/abar): the Gaussian noise std of x_t/sqrt(abar)."""
        a = self.abar(t)
        return torch.sqrt((1 - a) / a)

    def t_for_sigma(self, sigma: float) -> int:
        """The timestep whose sigma_bar is closest to `sigma` (DiffPIR's t_start for noise level sigma)."""
        sb = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        return int(np.argmin(np.abs(sb - sigma)))


def _coef(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample float64 coefficients to x's shape as float32 (never bf16)."""
    values = values.to(device=like.device, dtype=torch.float32)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: TimeLike, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = schedule.abar(t)
    return _coef(a.sqrt(), x0) * x0.float() + _coef((1 - a).sqrt(), x0) * noise.float()


def predict_x0(schedule: Schedule, x_t: torch.Tensor, t: TimeLike, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = schedule.abar(t)
    return (x_t.float() - _coef((1 - a).sqrt(), x_t) * eps.float()) / _coef(a.sqrt(), x_t)


def eps_from_x0(schedule: Schedule, x_t: torch.Tensor, t: TimeLike, x0: torch.Tensor) -> torch.Tensor:
    """The noise that takes x0 to x_t at step t (inverse of predict_x0)."""
    a = schedule.abar(t)
    return (x_t.float() - _coef(a.sqrt(), x_t) * x0.float()) / _coef((1 - a).sqrt(), x_t)


def reverse_step(schedule: Schedule, x_t: torch.Tensor, t: int, t_prev: int, x0: torch.Tensor,
                 eta: float = 1.0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One reverse step t -> t_prev (< t) given the clean-image estimate x0 (DDIM family).

    eta = 1 is the ancestral DDPM posterior q(x_{t_prev} | x_t, x0) (exactly DDPM when t_prev = t - 1);
    eta = 0 is deterministic DDIM. Any stride is allowed, so the number of network evaluations is free.
    """
    if not t_prev < t:
        raise ValueError(f"reverse_step needs t_prev < t, got t={t}, t_prev={t_prev}")
    a_t, a_prev = schedule.abar(t), schedule.abar(t_prev)
    eps = eps_from_x0(schedule, x_t, t, x0)
    var = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    mean = _coef(a_prev.sqrt(), x_t) * x0.float() + _coef((1 - a_prev - var).clamp(min=0).sqrt(), x_t) * eps
    if eta == 0 or t_prev < 0:
        return mean
    if noise is None:
        raise ValueError("reverse_step with eta > 0 needs a noise tensor (drawn from a seeded generator)")
    return mean + _coef(var.sqrt(), x_t) * noise.float()


def diffpir_step(schedule: Schedule, x_t: torch.Tensor, t: int, t_prev: int, x0_hat: torch.Tensor,
                 zeta: float, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """DiffPIR's update (Zhu et al. 2023): re-noise the data-consistent x0_hat to level t_prev, mixing the
    effective noise of x_t (weight sqrt(1 - zeta)) with fresh noise (weight sqrt(zeta); None when zeta is 0)."""
    a_prev = schedule.abar(t_prev)
    if t_prev < 0:
        return x0_hat.float()
    eps_hat = eps_from_x0(schedule, x_t, t, x0_hat)
    if zeta == 0:
        mixed = eps_hat
    elif noise is None:
        raise ValueError("diffpir_step with zeta > 0 needs a noise tensor (drawn from a seeded generator)")
    else:
        mixed = math.sqrt(1 - zeta) * eps_hat + math.sqrt(zeta) * noise.float()
    return _coef(a_prev.sqrt(), x_t) * x0_hat.float() + _coef((1 - a_prev).sqrt(), x_t) * mixed


def timesteps(nfe: int, t_start: int, t_end: int = 0) -> list:
    """Descending, evenly skipped network-evaluation steps from t_start down to t_end (inclusive).

    With nfe larger than the number of available steps every step is used once.
    """
    if nfe < 1:
        raise ValueError(f"the number of function evaluations must be >= 1, got {nfe}")
    if not 0 <= t_end <= t_start:
        raise ValueError(f"need 0 <= t_end <= t_start, got t_start={t_start}, t_end={t_end}")
    n = min(nfe, t_start - t_end + 1)
    if n == 1:
        return [int(t_start)]
    steps = np.round(np.linspace(t_start, t_end, n)).astype(int)
    return [int(s) for s in steps]


def training_timesteps(batch: int, T: int, generator: torch.Generator, low_noise_fraction: float = 0.0,
                       low_noise_max_t: int = 250) -> torch.Tensor:
    """Training timesteps: uniform over 0..T-1, except that a fraction is drawn from t < low_noise_max_t,
    the range that denoising, anomaly detection and inpainting start from (synthesis still sees all t)."""
    uniform = torch.randint(0, T, (batch,), generator=generator)
    low = torch.randint(0, low_noise_max_t, (batch,), generator=generator)
    pick_low = torch.rand(batch, generator=generator) < low_noise_fraction
    return torch.where(pick_low, low, uniform)
