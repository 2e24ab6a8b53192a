"""Lesion generation (paper, section 3.5): synthesise the CT around a lesion mask with a lesion ControlNet.

Only a box around the mask is sampled (its bounding box plus a margin, grown to at least the training patch
where the volume allows, and to one window when a larger one is asked for); the box keeps its place in the
whole volume through the global coordinates, and the generated box (at the training patch, whatever the
window) is pasted into a copy of the input with a linear blend over the outer half of the margin
(`paste_weights`), so the box leaves no seam. `prepare_box` is shared with
lesion inpainting, which samples the same box but keeps the known voxels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from ..anatomy import THRESHOLD_CLASSES
from ..conditioning import VolumeCondition, anatomy_spec
from ..config import ModelConfig
from ..errors import InputError
from ..finetune import ControlledCondition, check_task, is_controlnet
from ..io import Volume
from ..orientation import in_patient_axes
from ..preprocess import unit_to_hu, window_to_unit
from ..sampling import SlidingWindowSampler
from ..validation import check_ct, check_mask
from .common import (anatomy_for, check_count, check_seed, check_window_size, clip_to_input_range, make_sampler,
                     mask_box, model_config, model_window, resolve_region, sampling_steps, task_device, window_weight)

Progress = Optional[Callable[[int, int], None]]
Box = Tuple[slice, slice, slice]

log = logging.getLogger(__name__)

#: Context kept around the lesion on every side (mm).
DEFAULT_MARGIN_MM = 10.0


def paste_weights(box: Box, volume_shape: Sequence[int], spacing_zyx: Sequence[float],
                  width_mm: float) -> np.ndarray:
    """Weights of the generated box when pasted: 1 inside, falling linearly to 0 over `width_mm` towards
    every box face that lies inside the volume (a face on the volume border has nothing to blend with)."""
    shape = [s.stop - s.start for s in box]
    weights = np.ones(shape, np.float32)
    for axis, (s, n, spacing) in enumerate(zip(box, volume_shape, spacing_zyx)):
        ramp = max(width_mm / spacing, 1.0)
        index = np.arange(shape[axis], dtype=np.float32) + 0.5
        low = index / ramp if s.start > 0 else np.inf
        high = (shape[axis] - index) / ramp if s.stop < n else np.inf
        profile = np.clip(np.minimum(low, high), 0.0, 1.0)
        weights *= profile.reshape([-1 if a == axis else 1 for a in range(3)])
    return weights


@dataclass
class BoxJob:
    """A box of a volume prepared for sliding-window sampling, with its known image in [-1, 1]."""

    box: Box  # the box sampled: `core`, grown to at least one window along every axis the volume allows
    core: Box  # the mask's box grown by the margin and to at least the training patch, whatever the window
    inside: np.ndarray  # bool, the mask on the box
    known: torch.Tensor  # (1, 1, *box shape) the input in [-1, 1]
    window: Tuple[float, float]
    sampler: SlidingWindowSampler


def lesion_anatomy(labels: np.ndarray, inside: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The anatomy condition for a lesion ControlNet: soft tissue inside the lesion mask (threshold anatomy).

    The ControlNet learnt lesions whose anatomy was computed from CTs that held them: soft-tissue density. Computed
    from a CT without the lesion, the mask reads as the tissue it was drawn on, and on healthy lung the ControlNet
    then grows no lesion at all (benchmarks/README.md, session 15). Other anatomy sources are left as computed.
    """
    if anatomy_spec(cfg).source != "threshold":
        return labels
    soft_tissue = next(label for label, name in THRESHOLD_CLASSES.items() if name == "soft tissue")
    return np.where(inside, np.asarray(soft_tissue, labels.dtype), labels)


def surrounding_anatomy(labels: np.ndarray, inside: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The anatomy condition for a base model filling a mask: each masked voxel takes the label of the nearest voxel
    outside the mask (in mm), so the mask is filled after its surroundings, not after what it held (computed from
    the CT, a lesion's own tissue classes would bring the lesion back). A mask over the whole box is left as is."""
    if inside.all() or not inside.any():
        return labels
    nearest = ndimage.distance_transform_edt(inside, sampling=spacing_zyx, return_distances=False,
                                             return_indices=True)
    return np.where(inside, labels[tuple(nearest)], labels)


def prepare_box(volume: Volume, mask: Volume, model: torch.nn.Module, region: Optional[str], margin_mm: float,
                device: Union[str, torch.device], overlap: float, window_batch: Optional[int], precision: str,
                mask_name: str = "mask", window_size: Optional[int] = None) -> BoxJob:
    """Check the inputs and set up sampling of the box around `mask` in the frame of the whole volume.

    A `ControlledNet` gets the mask as its control volume and soft tissue in the mask's anatomy
    (`lesion_anatomy`); a plain base model gets the usual condition, with the mask's anatomy taken from its
    surroundings (`surrounding_anatomy`). The box is at least the training patch and one window (`window_size`,
    None: the training patch) along every axis the volume allows, and holds the `core` box, which does not depend
    on the window.
    """
    check_ct(volume)
    check_mask(mask, volume, name=mask_name)
    cfg = model_config(model)
    window_size = check_window_size(cfg, window_size)
    region = resolve_region(volume, region, cfg)
    window = model_window(cfg, region)
    inside_all = mask.array > 0
    core = mask_box(inside_all, volume.spacing_zyx, margin_mm, cfg.patch_size)
    # Growing the minimum size moves a box's start down and its end up only, so the box holds the core.
    box = core if window_size <= cfg.patch_size else mask_box(inside_all, volume.spacing_zyx, margin_mm, window_size)
    inside = inside_all[box]
    if inside.all():
        size = " x ".join(map(str, inside.shape))
        raise InputError(f"the {mask_name} covers every voxel of the box it is worked in ({size} voxels, z y x): "
                         "no tissue around it is left for the result to fit; draw it over the part to replace only, "
                         "or use synthesize for a wholly new image")
    anatomy = anatomy_for(volume, cfg)[box]
    place = dict(offset_zyx=[s.start for s in box], full_shape_zyx=volume.shape)
    if is_controlnet(model):
        anatomy = lesion_anatomy(anatomy, inside, cfg)
        cond = ControlledCondition(cfg, inside.astype(np.float32), volume.spacing_zyx, region, anatomy, **place)
    else:
        anatomy = surrounding_anatomy(anatomy, inside, volume.spacing_zyx)
        cond = VolumeCondition(cfg, inside.shape, volume.spacing_zyx, region, anatomy, **place)
    device = task_device(model, device)
    sampler = make_sampler(model, inside.shape, volume.spacing_zyx, region, None, device, overlap, window_batch,
                           precision, cond=cond, window_size=window_size)
    known = torch.from_numpy(window_to_unit(volume.array[box].astype(np.float32), window))[None, None]
    return BoxJob(box, core, inside, known.to(device), window, sampler)


@in_patient_axes
def generate_lesion(volume: Volume, lesion_mask: Volume, model: torch.nn.Module, nfe: int = 100,
                    margin_mm: float = DEFAULT_MARGIN_MM, region: Optional[str] = None, seed: int = 0,
                    device: Union[str, torch.device] = "auto", overlap: float = 0.5, window_batch: Optional[int] = None,
                    precision: str = "auto", progress: Progress = None, window_size: Optional[int] = None) -> Volume:
    """A copy of `volume` whose box around `lesion_mask` is synthesised anew, with a lesion where the mask is.

    `model` is a lesion `ControlledNet`. The whole box around the mask (at least the training patch, whatever
    `window_size`) is generated anew, voxels outside the lesion too; to keep the surroundings of the lesion as
    they are, use `inpaint`. The lesion lies within the region's HU window; around it, voxels outside the
    window (air, bone) keep their input values.
    """
    seed = check_seed(seed)
    nfe = check_count(nfe, "the number of network evaluations (nfe)")
    check_task(model, "lesion")
    job = prepare_box(volume, lesion_mask, model, region, margin_mm, device, overlap, window_batch, precision,
                      mask_name="lesion mask", window_size=window_size)
    # On thick slices the training patch, not the mask, can set the box: say how much of the CT is replaced.
    extent = " x ".join(f"{(s.stop - s.start) * spacing:.0f}" for s, spacing in zip(job.core, volume.spacing_zyx))
    log.info("generating a box of %s mm (z, y, x) anew: the lesion mask's box plus %g mm, and at least the model's "
             "%d^3 training patch where the CT allows", extent, margin_mm, model_config(model).patch_size)
    steps = sampling_steps(nfe, job.sampler.schedule)
    x = job.sampler.run(None, steps, seed, progress=progress)
    # Only the core box is pasted, so the region rewritten does not depend on the window (a larger sampled box
    # is generated too, then dropped); around the lesion, voxels outside the model's window (air, bone) keep
    # their input values.
    around = np.zeros(job.inside.shape, np.float32)
    around[tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(job.core, job.box))] = paste_weights(
        job.core, volume.shape, volume.spacing_zyx, margin_mm / 2)
    weights = np.maximum(around * window_weight(volume.array[job.box], job.window), job.inside)
    out = volume.array.astype(np.float32, copy=True)
    generated = clip_to_input_range(unit_to_hu(x[0, 0].cpu().numpy(), job.window), volume.array, job.box)
    out[job.box] = weights * generated + (1 - weights) * out[job.box]
    return volume.with_array(out)
