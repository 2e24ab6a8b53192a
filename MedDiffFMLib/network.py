"""The MedDiff-FM denoiser: MONAI's DiffusionModelUNet with condition channels and a body-region class."""
from __future__ import annotations

import os
import sys
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


class OneDNNConv3d(nn.Conv3d):
    """An nn.Conv3d (same weights) that takes oneDNN's kernel in CPU float32 inference whatever the input's size.

    Why: PyTorch picks its plain im2col kernel for small inputs (batch x channels x depth x height <= 20480, e.g. one
    32^3 window of 16 channels), 2-4x slower per window than oneDNN's. The sampler sends a lone window at every step
    when the window count leaves one over a full batch (the lung nodule's 9 windows in batches of 4), and a box of
    one window (a small lesion) is nothing else (benchmarks/README.md, session 23). Results agree to float rounding.
    Training (gradients on), GPUs, other dtypes and torch.compile keep PyTorch's choice; the CPU never autocasts
    here (`tasks.common.autocast_dtype`)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and not torch.is_grad_enabled()
                and torch.backends.mkldnn.enabled and not _compiling()):
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    if is_compiling is None:  # earlier: dynamo's own, loaded once anything was compiled
        is_compiling = getattr(sys.modules.get("torch._dynamo"), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def use_onednn_on_cpu(module: nn.Module) -> nn.Module:
    """Turn every zero-padded nn.Conv3d of `module` into a `OneDNNConv3d` (in place; parameters untouched), where
    this PyTorch has oneDNN."""
    if torch.backends.mkldnn.is_available():
        for layer in module.modules():
            if type(layer) is nn.Conv3d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
                layer.__class__ = OneDNNConv3d
    return module


def check_compiler(device: torch.device) -> None:
    """Refuse torch.compile before any work when its code generator is missing: it would fail at the first
    network call, after the set-up, with a compiler traceback."""
    import importlib.util
    import shutil

    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise InputError("--compile on a GPU needs Triton (pip install triton; it comes with PyTorch's Linux "
                             "CUDA wheels); run without --compile")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++", "cl") if c):
        raise InputError("--compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl), and gains "
                         "nothing there (benchmarks/README.md); run without --compile")


def uncompiled(model: nn.Module) -> nn.Module:
    """The network itself: torch.compile wraps it in a module of another class, which forwards its attributes."""
    return getattr(model, "_orig_mod", model)


class MedDiffNet(nn.Module):
    """eps = net(x_t, t, cond, region): input is [x_t, cond] concatenated on channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet  # heavy import, only when a model is built

        self.cfg = cfg
        self.unet = use_onednn_on_cpu(DiffusionModelUNet(out_channels=1, **unet_kwargs(cfg)))

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
