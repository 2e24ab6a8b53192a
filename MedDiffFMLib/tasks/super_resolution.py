"""Slice super-resolution (paper, section 3.5): thick-slice CT -> thin slices with a ControlNet-tuned model.

Degradation model: each thick slice is the mean of `factor` consecutive thin slices (H); its adjoint-like
inverse H^T repeats each thick slice `factor` times, so H(H^T y) = y. Sampling is DiffPIR from pure noise:
after every network evaluation the clean-image estimate x0 gets the closed-form data step
    x0_hat = x0 + H^T(y - H x0) / (1 + rho_t),  rho_t = lambda sigma_n^2 / sigma_bar_t^2,
and the ControlNet sees the thick input linearly interpolated onto the thin grid. This is the paper's step as
written. The exact minimiser of |y - Hx|^2 + rho_t |x - x0|^2 for slice averaging is x0 + R(y - H x0) / (1 +
factor rho_t) with R the repetition (R = factor H^*), so here the data weigh `factor` times more than in that
exact step at the same lambda: lambda here is the exact step's lambda times `factor`.

With the paper's sigma_n = 1.0 the data step fades out as sigma_bar_t -> 0, so the last steps follow the
prior alone and the slice averages drift from the measured thick slices. By default the result is
therefore projected onto the data once at the end (in HU): onto the volumes whose every group of `factor` thin
slices averages exactly to its thick slice and whose values stay above air (or the input's lowest value, if
higher; or a padding voxel's own value) and below what a scanner stores (`project_in_range`). That shifts each
group by one value, so the detail within the group is kept, except where a value would leave that range
(x <- x + H^T(y - H x) alone put lung voxels below air).
`project=False` gives the paper's plain DiffPIR output, unclipped.

The model sees only its region's HU window. Voxels outside it (air, lung or bone in a soft-tissue window)
would come back clipped to the window edges; they get the thick slices interpolated instead (`_full_range`),
and the final projection then holds in HU for every voxel, so a super-resolved CT keeps its full HU range.
Windows that hold no voxel of the HU window are therefore not evaluated; the voxels no evaluated window holds
take the interpolated input as their x0 during sampling.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..finetune import ControlledCondition, check_task
from ..io import Volume
from ..orientation import in_patient_axes
from ..preprocess import unit_to_hu, window_to_unit
from ..validation import MAX_ANISOTROPY, check_ct, check_volume_type
from .common import (anatomy_for, check_count, check_seed, check_setup_memory, check_window_size, input_floor,
                     make_sampler, model_config, model_window, resolve_region, sampling_steps, task_device,
                     window_weight)

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int, int], None]]

#: DiffPIR's share of fresh noise in each re-noising step (not stated by the paper; a moderate value).
DEFAULT_ZETA = 0.3
#: Super-resolution refines axis z; an in-plane spacing this much larger than both others means thick sagittal or
#: coronal slices.
THICK_AXIS_MARGIN = 1.1


def average_slices(thin: torch.Tensor, factor: int) -> torch.Tensor:
    """H: mean of each group of `factor` consecutive slices along dim -3 (z); a short last group is
    averaged over the slices it has."""
    n = thin.shape[-3]
    groups = -(-n // factor)
    padded = F.pad(thin, (0, 0, 0, 0, 0, groups * factor - n))
    sums = padded.unflatten(-3, (groups, factor)).sum(dim=-3)
    counts = torch.full((groups,), float(factor), dtype=thin.dtype, device=thin.device)
    counts[-1] = n - (groups - 1) * factor
    return sums / counts.reshape(groups, 1, 1)


def repeat_slices(thick: torch.Tensor, factor: int, n_thin: int) -> torch.Tensor:
    """H^T as in the paper: every thick slice repeated `factor` times along dim -3, cut to n_thin slices."""
    return thick.repeat_interleave(factor, dim=-3)[..., :n_thin, :, :]


def interpolate_slices(thick: torch.Tensor, factor: int, n_thin: int) -> torch.Tensor:
    """The thick slices linearly interpolated along z onto n_thin thin slices (the ControlNet condition).

    A thick slice sits at the centre of its group of thin slices; thin slices beyond the first/last
    thick centre take that slice's value.
    """
    n_thick = thick.shape[-3]
    if n_thick == 1:
        return thick.expand(thick.shape[:-3] + (n_thin,) + thick.shape[-2:])
    centres = torch.arange(n_thick, dtype=torch.float64) * factor + (factor - 1) / 2.0
    position = torch.arange(n_thin, dtype=torch.float64)
    upper = torch.searchsorted(centres, position).clamp(1, n_thick - 1)
    lower = upper - 1
    weight = ((position - centres[lower]) / factor).clamp(0.0, 1.0).to(thick.dtype).reshape(-1, 1, 1)
    return thick[..., lower, :, :] * (1 - weight) + thick[..., upper, :, :] * weight


def degrade(thin: torch.Tensor, factor: int) -> torch.Tensor:
    """Training condition for a thin patch: slice-averaged by `factor`, interpolated back to its grid."""
    return interpolate_slices(average_slices(thin, factor), factor, thin.shape[-3])


def thin_geometry(volume: Volume, factor: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(spacing, origin) of the thin grid: z spacing / factor, origin moved along the slice axis so each
    thick slice centre is the mean position of its `factor` thin slices; direction is unchanged."""
    sx, sy, sz = volume.spacing
    thin_dz = sz / factor
    slice_axis = np.asarray(volume.direction, dtype=float).reshape(3, 3)[:, 2]
    origin = np.asarray(volume.origin) - (factor - 1) / 2.0 * thin_dz * slice_axis
    return (sx, sy, thin_dz), tuple(float(o) for o in origin)


#: Float32 copies of the thin grid held at once (the condition, the sampled result on the CPU, the interpolated
#: input, the blend and the projection's work: about 10 measured at the peak).
THIN_GRID_COPIES = 10


def check_factor(factor) -> int:
    """The slice factor (thin slices per thick slice) as an int."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not float(factor).is_integer() or factor < 2:
        raise InputError(f"the slice factor must be a whole number >= 2 (thin slices per thick slice), got {factor!r}")
    return int(factor)


@in_patient_axes
def super_resolve(volume: Volume, model: torch.nn.Module, factor: int = 5, nfe: int = 100, lam: float = 1.0,
                  sigma_n: float = 1.0, zeta: float = DEFAULT_ZETA, region: Optional[str] = None, seed: int = 0,
                  device: Union[str, torch.device] = "auto", overlap: float = 0.5, window_batch: Optional[int] = None,
                  precision: str = "auto", project: bool = True, progress: Progress = None,
                  window_size: Optional[int] = None) -> Volume:
    """Thin-slice CT (HU) on the grid `factor` times finer along z than the thick input `volume`.

    `model` is a super-resolution `ControlledNet`. `sigma_n` is the assumed noise of the thick slices in
    the model's [-1, 1] intensity scale and `lam` the prior weight: smaller `sigma_n` holds the result
    closer to the input (sigma_n -> 0: the slice averages equal the input exactly, within the window).
    `zeta` is DiffPIR's share of fresh noise per step. `project` enforces exact slice-average consistency
    at the end (see the module docstring). The model works in the region's HU window; voxels outside it
    (air, lung, bone in a soft-tissue window) get the input interpolated between slices instead, blended in
    over a margin at the window edges.
    """
    seed = check_seed(seed)
    nfe = check_count(nfe, "the number of network evaluations (nfe)")
    factor = check_factor(factor)
    check_volume_type(volume)
    sx, sy, sz = volume.spacing
    if min(volume.spacing) > 0 and max(sx, sy) > THICK_AXIS_MARGIN * max(min(sx, sy), sz):
        raise InputError(
            "super-resolution makes the axial slices thinner, but this CT's voxels are largest in-plane (spacing "
            f"x, y, z = {', '.join(f'{s:g}' for s in volume.spacing)} mm in patient order): it holds thick sagittal "
            "or coronal slices. Resample it to axial slices first (e.g. the preprocess command or Slicer's Resample "
            "Scalar Volume)")
    # Anisotropy is judged on the grid made: thick slices far coarser than the pixels are what this task is for.
    thin = (sx, sy, sz / factor)
    ratio = max(thin) / min(thin) if min(volume.spacing) > 0 else 0.0
    if ratio > MAX_ANISOTROPY:
        raise InputError(f"factor {factor} makes slices {sz / factor:.4g} mm apart, on pixels of {sx:.4g} x "
                         f"{sy:.4g} mm: a grid {ratio:.0f} times finer along one axis than another (at most "
                         f"{MAX_ANISOTROPY:.0f}); choose a factor nearer {max(2, round(sz / min(sx, sy)))}, which "
                         "makes the slices about as far apart as the pixels")
    check_ct(dataclasses.replace(volume, spacing=thin))  # the other checks of a CT (shape, NaN, HU), as before
    if sigma_n < 0 or lam <= 0:
        raise InputError(f"need sigma_n >= 0 and lambda > 0, got sigma_n={sigma_n}, lambda={lam}")
    if not 0.0 <= zeta <= 1.0:
        raise InputError(f"zeta (share of fresh noise per step) must be in [0, 1], got {zeta}")
    check_task(model, "super-resolution")
    if sz < min(sx, sy):
        log.warning("the slices (%g mm apart) are already thinner than the in-plane voxels (%g x %g mm): "
                    "super-resolution adds slices %g mm apart, finer than any detail this CT holds", sz, sx, sy,
                    sz / factor)
    if model.slice_factor not in (None, factor):
        log.warning("this model was fine-tuned to make %d thin slices per thick slice; factor %d is outside what "
                    "it learnt, so expect a weaker result", model.slice_factor, factor)
    cfg = model_config(model)
    check_window_size(cfg, window_size)
    region = resolve_region(volume, region, cfg)
    window = model_window(cfg, region)
    device = task_device(model, device)

    n_thin = volume.shape[0] * factor
    check_setup_memory((n_thin, *volume.shape[1:]), THIN_GRID_COPIES,
                       work=f"super-resolution by {factor} ({n_thin} thin slices of {sz / factor:.3g} mm)",
                       remedy="give a smaller factor (--factor), or crop the CT to the region of interest")
    thick = torch.from_numpy(window_to_unit(volume.array.astype(np.float32), window))
    spacing, origin = thin_geometry(volume, factor)
    control = interpolate_slices(thick, factor, n_thin)
    guide = Volume(unit_to_hu(control.numpy(), window), spacing, origin, volume.direction)
    cond = ControlledCondition(cfg, control.numpy(), guide.spacing_zyx, region, anatomy_for(guide, cfg))
    sampler = make_sampler(model, guide.shape, guide.spacing_zyx, region, None, device, overlap, window_batch,
                           precision, cond=cond, window_size=window_size)

    schedule = sampler.schedule
    y = thick.to(device)[None, None]

    def data_step(x0: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        rho = lam * sigma_n ** 2 / float(schedule.sigma_bar(t)) ** 2
        return x0 + repeat_slices(y - average_slices(x0, factor), factor, n_thin) / (1.0 + rho)

    steps = sampling_steps(nfe, schedule)
    weight = window_weight(volume.array, window)  # per thick voxel: how much of the model's result is kept
    windows = sampler.active_windows(repeat_slices(torch.from_numpy(weight > 0), factor, n_thin))
    log.info("%d of %d windows hold voxels of the [%g, %g] HU window", len(windows), sampler.num_windows, *window)
    x = sampler.run(None, steps, seed, x0_transform=data_step, zeta=zeta, progress=progress, windows=windows,
                    fallback=control[None, None].to(device))
    # The projection is applied once, in HU after the blend (_full_range): the blend weight is constant within a
    # group of thin slices, so a projection before it would be undone there anyway.
    return guide.with_array(_full_range(unit_to_hu(x[0, 0].cpu().numpy(), window), volume.array, weight, factor,
                                        project))


def _full_range(resolved: np.ndarray, thick_hu: np.ndarray, weight: np.ndarray, factor: int,
                project: bool) -> np.ndarray:
    """The model's thin slices where the input lies in its window; elsewhere (air, lung, bone in a soft-tissue
    window), which the model would return clipped, the thick slices interpolated.

    The blend `weight` (`window_weight` of the thick input) is decided per thick voxel and repeated over its thin
    slices, so a group is one mix of two results; with `project` the group then averages exactly to its thick
    voxel, in HU.
    """
    n_thin = resolved.shape[0]
    measured = torch.from_numpy(thick_hu.astype(np.float32))
    weight = repeat_slices(torch.from_numpy(weight), factor, n_thin)
    outside = interpolate_slices(measured, factor, n_thin)
    blended = outside + weight * (torch.from_numpy(resolved.astype(np.float32)) - outside)
    if project:  # no thin value below air (or its thick voxel, if lower) or above what a scanner stores
        lowest = torch.clamp(measured, max=input_floor(thick_hu))
        return project_in_range(blended, measured, factor, lowest, max(float(thick_hu.max()), CT_MAX_HU)).numpy()
    return blended.numpy().astype(np.float32)


#: What a 12-bit CT stores at most; thin slices may exceed their thick average, so this, not the input's highest,
#: bounds them (unless the input holds more).
CT_MAX_HU = 3071.0
#: Halvings of the search for each group's shift: the range (a few thousand HU) down to well under 0.001 HU.
PROJECTION_BISECTIONS = 32


def project_in_range(thin: torch.Tensor, thick: torch.Tensor, factor: int, lo, hi: float) -> torch.Tensor:
    """The nearest volume to `thin` whose groups of `factor` slices average to `thick` and whose values lie in
    [lo, hi]; `lo` is a number or one per thick voxel (its group), and each thick value must lie in its range.

    That nearest point is clip(thin + shift, lo, hi) with one shift per group (the constraints' optimality
    conditions), and the clipped group mean only grows with the shift: found by bisection, for all groups at once.
    """
    n_thin = thin.shape[-3]
    thin = thin.float()
    lo = torch.as_tensor(lo, dtype=thin.dtype).expand_as(thick)
    lo_thin = repeat_slices(lo, factor, n_thin)

    def clipped(shift: torch.Tensor) -> torch.Tensor:
        return torch.maximum(thin + repeat_slices(shift, factor, n_thin), lo_thin).clamp_(max=hi)

    below = lo - _group_extreme(thin, factor, torch.amax)  # every value at its lowest
    above = hi - _group_extreme(thin, factor, torch.amin)  # every value at hi
    for _ in range(PROJECTION_BISECTIONS):
        shift = (below + above) / 2
        low_mean = average_slices(clipped(shift), factor) < thick
        below = torch.where(low_mean, shift, below)
        above = torch.where(low_mean, above, shift)
    return clipped((below + above) / 2)


def _group_extreme(thin: torch.Tensor, factor: int, reduce) -> torch.Tensor:
    """The max (or min) over each group of `factor` slices (a short last group over the slices it has)."""
    n = thin.shape[-3]
    groups = -(-n // factor)
    padded = torch.cat([thin, thin[..., -1:, :, :].expand(*thin.shape[:-3], groups * factor - n, *thin.shape[-2:])],
                       dim=-3)
    return reduce(padded.unflatten(-3, (groups, factor)), dim=-3)
