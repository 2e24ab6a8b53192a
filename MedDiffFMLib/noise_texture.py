"""Training noise with the texture of CT noise: white noise shaped in-plane like filtered back-projection.

Why: denoising starts the reverse process from the CT itself, so the noise the network meets first is the
scanner's. After filtered back-projection that noise is correlated within each axial slice: its power spectrum
rises with frequency (the ramp filter) and falls at the top (the kernel's apodisation and the interpolation of
the back-projection), and slices are nearly independent. A prior trained on white noise only under-removes such
noise at mid frequencies and takes some low-frequency structure for noise (benchmarks/README.md, session 16).

The shape used is |f| hann(|f| / c)^2 with the cutoff c (cycles per voxel) drawn per patch from CUTOFF_RANGE:
a low cutoff is a smooth kernel, a high one a sharp kernel. The simulated low dose of `lowdose` (ramp filter,
linear interpolation) peaks near 0.3 cycles per pixel, inside the range.
"""
from __future__ import annotations

import math

import torch

#: Hann cutoffs (cycles per voxel) of the apodised ramp, drawn uniformly; the radial frequency reaches 0.71.
CUTOFF_RANGE = (0.4, 1.2)
#: Above this share of the timesteps (t = 300 of 1000) the training noise stays white: the restoration tasks start
#: below it, and sampling from pure noise (synthesis) must keep seeing the white noise it starts from.
MAX_T_FRACTION = 0.3


def fbp_like_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """Noise of `shape` (batch, channels, slices, rows, columns), unit variance in expectation, independent between
    slices, with the in-plane power spectrum of ramp-filtered back-projection (one random cutoff per batch item)."""
    batch, rows, columns = shape[0], shape[-2], shape[-1]
    white = torch.randn(shape, generator=generator)
    cutoff = CUTOFF_RANGE[0] + (CUTOFF_RANGE[1] - CUTOFF_RANGE[0]) * torch.rand(batch, generator=generator)
    radial = torch.sqrt(torch.fft.fftfreq(rows)[:, None] ** 2 + torch.fft.fftfreq(columns)[None, :] ** 2)
    ratio = radial[None] / cutoff[:, None, None]
    hann = torch.where(ratio < 1, 0.5 * (1 + torch.cos(math.pi * ratio)), torch.zeros(()))
    power = radial[None] * hann ** 2
    # White noise filtered by amplitude a has variance mean(a^2): normalising the power keeps the variance 1.
    amplitude = torch.sqrt(power / power.mean(dim=(-2, -1), keepdim=True))
    amplitude = amplitude.reshape(batch, *([1] * (len(shape) - 3)), rows, columns)
    return torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real.contiguous()


def training_noise(shape, t: torch.Tensor, num_timesteps: int, generator: torch.Generator,
                   fraction: float) -> torch.Tensor:
    """The forward-process noise of a training batch: white, except that each item with t below MAX_T_FRACTION of
    the `num_timesteps` has CT texture (`fbp_like_noise`) with probability `fraction`. With fraction 0 it draws
    exactly what white noise alone does."""
    noise = torch.randn(shape, generator=generator)
    if fraction <= 0:
        return noise
    pick = (torch.rand(shape[0], generator=generator) < fraction) & (t < MAX_T_FRACTION * num_timesteps)
    if pick.any():  # the filtering costs several times the white draw: only for the items that use it
        noise[pick] = fbp_like_noise((int(pick.sum()),) + tuple(shape[1:]), generator)
    return noise
