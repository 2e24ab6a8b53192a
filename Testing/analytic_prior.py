"""A denoiser with a known optimum, for testing samplers: x0 ~ N(mu(position), std^2) independently per voxel.

For that prior the optimal noise prediction is closed-form:
    eps*(x_t, t) = (x_t - sqrt(abar) mu) sqrt(1 - abar) / (abar std^2 + 1 - abar),
so a correct sampler must return samples with mean mu and standard deviation std. mu depends on the
global coordinates in the condition channels, which checks that each window gets its own position.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from MedDiffFMLib.conditioning import anatomy_spec
from MedDiffFMLib.config import ModelConfig, preset
from MedDiffFMLib.diffusion import Schedule
from MedDiffFMLib.position import global_coords


def tilted_mean(coords: torch.Tensor) -> torch.Tensor:
    """mu = 0.1 + 0.3 z - 0.2 x on the (-1..1) global coordinates (z, y, x) of shape (B, 3, ...)."""
    return 0.1 + 0.3 * coords[:, 0:1] - 0.2 * coords[:, 2:3]


class AnalyticGaussian(nn.Module):
    def __init__(self, std: float = 0.2, mean_fn: Callable[[torch.Tensor], torch.Tensor] = tilted_mean,
                 cfg: ModelConfig = None):
        super().__init__()
        self.cfg = cfg or preset("tiny")
        self.schedule = Schedule.from_name(self.cfg.schedule, self.cfg.num_train_timesteps)
        self.std = std
        self.mean_fn = mean_fn
        self.coord_channel = anatomy_spec(self.cfg).num_channels

    def forward(self, x_t, t, cond, region):
        a = self.schedule.abar(t).float().reshape(-1, 1, 1, 1, 1).to(x_t.device)
        mu = self.mean_fn(cond[:, self.coord_channel:self.coord_channel + 3].float())
        return (x_t.float() - a.sqrt() * mu) * (1 - a).sqrt() / (a * self.std ** 2 + 1 - a)

    def mean_volume(self, shape_zyx) -> torch.Tensor:
        """mu on a whole grid, (1, 1, *shape)."""
        coords = global_coords(shape_zyx, (0, 0, 0), shape_zyx, shape_zyx)[None]
        return self.mean_fn(coords)
