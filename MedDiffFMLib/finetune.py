"""ControlNet fine-tuning: a trainable copy of the pre-trained encoder steers the frozen base model.

`ControlledNet` wraps a pre-trained `MedDiffNet`: MONAI's `ControlNet` is built with the base UNet's
architecture, its shared weights are copied from the base UNet, and its residual outputs go through
zero-initialised convolutions, so before any training the controlled model predicts exactly what the
base model predicts. Only the ControlNet trains; the base stays frozen.

The control signal is one extra volume at full patch resolution (the upsampled thick-slice CT for
super-resolution, the lesion mask for lesion generation). It travels as the last channel of the condition
(`ControlledCondition` for sampling), so the sliding-window sampler windows it with everything else and
a `ControlledNet` is called exactly like a `MedDiffNet`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .conditioning import VolumeCondition, condition_channels
from .config import ModelConfig
from .errors import InputError
from .network import MedDiffNet, unet_kwargs

#: Fine-tuning tasks and what their control volume holds.
TASKS = {
    "super-resolution": "the thick-slice CT, slice-averaged and upsampled to the thin grid, in [-1, 1]",
    "lesion": "the lesion mask (1 inside, 0 outside)",
}


class ControlledNet(nn.Module):
    """eps = net(x_t, t, cond, region, control): the frozen base model plus ControlNet residuals."""

    def __init__(self, base: MedDiffNet, task: str):
        super().__init__()
        from monai.networks.nets import ControlNet  # heavy import, only when a model is built
        from monai.networks.utils import copy_model_state

        if task not in TASKS:
            raise ValueError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}")
        self.task = task
        self.cfg = base.cfg
        self.base = base
        # A single embedding level keeps the control volume at the patch resolution (MONAI's default
        # embedding assumes a condition 8x larger than a latent image).
        self.controlnet = ControlNet(conditioning_embedding_in_channels=1,
                                     conditioning_embedding_num_channels=(self.cfg.channels[0],),
                                     **unet_kwargs(self.cfg))
        copy_model_state(self.controlnet, base.unet)
        self.base.requires_grad_(False)
        self.base.eval()

    def train(self, mode: bool = True) -> "ControlledNet":
        """Only the ControlNet switches mode: the frozen base always runs as at inference."""
        self.training = mode
        self.controlnet.train(mode)
        return self

    def trainable_parameters(self):
        return self.controlnet.parameters()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """`cond` is the base model's condition with the control volume appended as its last channel
        (what `ControlledCondition` windows give), so a ControlledNet drops in wherever a MedDiffNet runs."""
        expected = condition_channels(self.cfg) + 1
        if cond.shape[1] != expected:
            raise ValueError(f"a ControlledNet needs {expected} condition channels (the model's {expected - 1} "
                             f"plus the control volume), got {cond.shape[1]}")
        base_cond, control = cond[:, :-1], cond[:, -1:]
        x = torch.cat([x_t, base_cond.to(x_t.dtype)], dim=1)
        down, mid = self.controlnet(x, t, controlnet_cond=control.to(x_t.dtype), class_labels=region)
        return self.base(x_t, t, base_cond, region, down_residuals=down, mid_residual=mid)


class ControlledCondition(VolumeCondition):
    """A `VolumeCondition` whose windows carry a control volume (on the sampled grid) as one extra, last channel."""

    def __init__(self, cfg: ModelConfig, control: np.ndarray, spacing_zyx: Sequence[float], region: str,
                 anatomy_labels: Optional[np.ndarray] = None, offset_zyx: Sequence[int] = (0, 0, 0),
                 full_shape_zyx: Optional[Sequence[int]] = None):
        super().__init__(cfg, control.shape, spacing_zyx, region, anatomy_labels, offset_zyx, full_shape_zyx)
        self.control = torch.as_tensor(np.asarray(control, dtype=np.float32))

    def window(self, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        box = tuple(slice(a, a + s) for a, s in zip(start, size))
        return torch.cat([super().window(start, size), self.control[box][None]])


def check_task(model: nn.Module, task: str) -> None:
    """Refuse a model that is not a ControlNet fine-tuned for `task`."""
    found = getattr(model, "task", None) if isinstance(model, ControlledNet) else None
    if found != task:
        what = f"a {found} ControlNet" if found else "not a ControlNet fine-tuned model"
        raise InputError(f"this task needs a model fine-tuned for {task} (`finetune --task {task}`); the "
                         f"given model is {what}")
