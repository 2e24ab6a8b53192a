"""Whole-volume CT synthesis from pure noise with the sliding-window sampler (paper, Fig. 4).

The output grid (size, spacing, origin, direction) is the user's choice, or that of a reference CT or an
anatomy label map. The network is conditioned on the body region and, when given, on anatomy: a label
map on the output grid, or the anatomy computed from the reference CT. Without anatomy the anatomy
channels are zero, as in the training-time anatomy dropout.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError
from ..io import Volume
from ..orientation import in_patient_axes
from ..preprocess import unit_to_hu
from ..validation import check_ct, check_dimensions, check_spacing, MIN_AXIS_VOXELS
from . import common

log = logging.getLogger(__name__)

#: Default network evaluations. Strided sampling with few steps is under-dispersed even with a perfect
#: denoiser (Testing/test_sampling.py: 50 ancestral steps give ~12% too little spread, DDIM ~6%).
DEFAULT_NFE = 100


@in_patient_axes
def synthesize(model: torch.nn.Module, region: Optional[str] = None,
               size_xyz: Optional[Sequence[int]] = None, spacing_xyz: Optional[Sequence[float]] = None,
               reference: Optional[Volume] = None, anatomy_labels: Optional[Volume] = None,
               nfe: int = DEFAULT_NFE, eta: float = 1.0, seed: int = 0,
               device: Union[str, torch.device] = "auto", overlap: float = 0.5, window_batch: Optional[int] = None,
               precision: str = "auto", progress: Optional[Callable[[int, int], None]] = None,
               window_size: Optional[int] = None) -> Volume:
    """Synthesise a CT (HU) with the model's window for `region`.

    Grid: `reference`'s, else `anatomy_labels`'s, else `size_xyz` voxels of `spacing_xyz` mm (origin 0,
    identity direction). Anatomy: `anatomy_labels` if given, else computed from `reference`, else none.
    `region` None is guessed from the reference. `eta` 1 = ancestral (DDPM) steps, 0 = DDIM.
    """
    seed = common.check_seed(seed)
    nfe = common.check_count(nfe, "the number of network evaluations (nfe)")
    device = common.task_device(model, device)
    common.check_base(model, "synthesis")
    cfg = common.model_config(model)
    common.check_window_size(cfg, window_size)
    grid = _output_grid(size_xyz, spacing_xyz, reference, anatomy_labels)
    region = common.resolve_region(reference, region, cfg)
    labels = None
    if anatomy_labels is not None:
        labels = common.anatomy_for(grid, cfg, user_labels=anatomy_labels, from_image=False)
    elif reference is not None:
        labels = common.anatomy_for(reference, cfg)
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"eta must be in [0, 1] (1 = DDPM, 0 = DDIM), got {eta}")

    sampler = common.make_sampler(model, grid.shape, grid.spacing_zyx, region, labels, device,
                                  overlap=overlap, window_batch=window_batch, precision=precision,
                                  window_size=window_size)
    steps = common.sampling_steps(nfe, sampler.schedule)
    x0 = sampler.run(None, steps, seed, eta=eta, progress=progress)
    window = common.model_window(cfg, region)
    hu = unit_to_hu(x0[0, 0].cpu().numpy(), window).astype(np.float32)
    # Not below air as a scanner stores it: the window's lower edge is -1400 HU for the chest.
    return grid.with_array(np.clip(hu, max(window[0], common.CT_AIR_HU), window[1], out=hu))


def check_grid_given(size_xyz, spacing_xyz, reference, anatomy_labels) -> None:
    """Refuse a call that gives no output grid: neither a reference CT nor an anatomy label map, nor a size and
    spacing. The command checks it first (with its file paths for the volumes), before the options that depend on
    the grid and before loading the model."""
    if reference is None and anatomy_labels is None and (size_xyz is None or spacing_xyz is None):
        raise InputError("give the output size and spacing (--size X Y Z --spacing X Y Z), a reference "
                         "CT (--reference) or an anatomy label map (--anatomy)")


def _output_grid(size_xyz, spacing_xyz, reference: Optional[Volume], anatomy_labels: Optional[Volume]) -> Volume:
    """A Volume of zeros on the output grid."""
    check_grid_given(size_xyz, spacing_xyz, reference, anatomy_labels)
    if reference is not None:
        check_ct(reference)
        like = reference
    elif anatomy_labels is not None:
        _check_output_spacing(anatomy_labels.spacing)
        like = anatomy_labels
    else:
        size = tuple(int(n) for n in size_xyz)
        spacing = tuple(float(s) for s in spacing_xyz)
        if len(size) != 3 or len(spacing) != 3:
            raise InputError(f"size and spacing need three values (x y z), got {size_xyz} and {spacing_xyz}")
        if min(size) < MIN_AXIS_VOXELS:
            raise InputError(f"output size must be >= {MIN_AXIS_VOXELS} voxels per axis, got {size}")
        _check_output_spacing(spacing)
        check_dimensions(tuple(reversed(size)))
        return Volume(_no_voxels(tuple(reversed(size))), spacing)
    return Volume(_no_voxels(like.shape), like.spacing, like.origin, like.direction)


def _check_output_spacing(spacing) -> None:
    """The output grid is held to the spacing rules of every input CT."""
    concerns = []
    check_spacing(spacing, concerns)
    for concern in concerns:
        log.warning("output grid: %s", concern)


def _no_voxels(shape_zyx) -> np.ndarray:
    """Zeros that take no memory: the grid only lends its shape and geometry, and a requested size far too
    large must reach the memory check with its clear message rather than fail to allocate here."""
    return np.broadcast_to(np.float32(0.0), tuple(shape_zyx))
