"""The MedDiff-FM denoiser: MONAI's DiffusionModelUNet with condition channels and a body-region class."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from .conditioning import condition_channels
from .config import ModelConfig
from .errors import InputError


def unet_kwargs(cfg: ModelConfig) -> dict:
    """Architecture arguments shared by the UNet and its ControlNet copy. Attention runs through torch's fused
    scaled_dot_product_attention (the same weights and results: 2e-6 apart on the registered model; on a GPU it
    does not write out the attention matrices)."""
    return dict(
        spatial_dims=3,
        in_channels=1 + condition_channels(cfg),
        num_res_blocks=cfg.num_res_blocks,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_head_channels=tuple(cfg.num_head_channels),
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=len(cfg.regions),
        use_flash_attention=True,
    )


class MedDiffNet(nn.Module):
    """eps = net(x_t, t, cond, region): input is [x_t, cond] concatenated on channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet  # heavy import, only when a model is built

        self.cfg = cfg
        self.unet = DiffusionModelUNet(out_channels=1, **unet_kwargs(cfg))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, region: torch.Tensor,
                down_residuals: Optional[Sequence[torch.Tensor]] = None,
                mid_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.unet(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t, class_labels=region,
                         down_block_additional_residuals=down_residuals,
                         mid_block_additional_residual=mid_residual)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_loaded(model) -> None:
    """Refuse what is not a loaded network, with the fix for the usual slips of a script."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, (str, os.PathLike)):
        hint = f"load it first: model, cfg, info = MedDiffFMLib.checkpoints.load_model({str(model)!r})"
    elif isinstance(model, tuple):
        hint = "pass the model itself, the first item of what MedDiffFMLib.checkpoints.load_model returns"
    else:
        hint = "load one with MedDiffFMLib.checkpoints.load_model"
    raise InputError(f"expected a loaded MedDiffFM model, got {type(model).__name__}; {hint}")


def controlnet_task(model: nn.Module) -> Optional[str]:
    """The task a ControlNet (`finetune.ControlledNet`) was fine-tuned for; None for a base model."""
    return getattr(model, "task", None)
