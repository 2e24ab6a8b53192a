"""Resampling, HU windows mapped to [-1, 1] and their inverse, and the body-region guess."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import Volume

#: Coarse region classes (class label = index), as in the paper plus `other` for extremities/whole body.
REGIONS = ("head_neck", "chest", "abdomen", "other")

#: (level, width) in HU per region: the paper's windows; `other` uses the head-and-neck soft window.
REGION_WINDOWS: Dict[str, Tuple[float, float]] = {
    "head_neck": (50.0, 400.0),
    "chest": (-500.0, 1800.0),
    "abdomen": (60.0, 360.0),
    "other": (50.0, 400.0),
}

Window = Union[str, Sequence[float]]


def as_window(window: Window) -> Tuple[float, float]:
    """(level, width) from a region name or a (level, width) pair."""
    if isinstance(window, str):
        if window not in REGION_WINDOWS:
            raise InputError(f"unknown region {window!r}; choose one of {', '.join(REGIONS)}")
        return REGION_WINDOWS[window]
    level, width = (float(v) for v in window)
    if width <= 0:
        raise InputError(f"window width must be > 0 HU, got {width}")
    return level, width


def window_to_unit(hu, window: Window):
    """Clip HU to the window and map it linearly to [-1, 1] (numpy arrays, torch tensors or floats)."""
    level, width = as_window(window)
    low, high = level - width / 2.0, level + width / 2.0
    clipped = hu.clip(low, high) if hasattr(hu, "clip") else min(max(hu, low), high)
    return (clipped - low) * (2.0 / width) - 1.0


def unit_to_hu(x, window: Window):
    """Inverse of `window_to_unit` on the window's range: [-1, 1] back to HU (no clipping)."""
    level, width = as_window(window)
    return (x + 1.0) * (width / 2.0) + (level - width / 2.0)


def resample(vol: Volume, spacing: Sequence[float] = (1.0, 1.0, 1.0), is_mask: bool = False) -> Volume:
    """Resample to `spacing` (x, y, z mm) keeping origin and direction; the extent is preserved.

    Linear interpolation for images, nearest neighbour for label maps.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"target spacing must be three positive numbers in mm (x, y, z), got {spacing}")
    size_xyz = tuple(reversed(vol.shape))
    new_size = [max(1, int(round(n * old / new))) for n, old, new in zip(size_xyz, vol.spacing, spacing)]
    reference = sitk.Image(new_size, sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetOrigin(vol.origin)
    reference.SetDirection(vol.direction)
    return _resample_onto(vol, reference, is_mask)


def resample_like(vol: Volume, reference: Volume, is_mask: bool = False) -> Volume:
    """Resample `vol` onto the grid of `reference` (e.g. back to the original grid after processing)."""
    grid = sitk.Image(list(reversed(reference.shape)), sitk.sitkUInt8)
    grid.SetSpacing(reference.spacing)
    grid.SetOrigin(reference.origin)
    grid.SetDirection(reference.direction)
    return _resample_onto(vol, grid, is_mask)


def _resample_onto(vol: Volume, reference: sitk.Image, is_mask: bool) -> Volume:
    image = vol.to_sitk()
    if is_mask:
        interpolator, fill = sitk.sitkNearestNeighbor, 0
    else:
        # Voxels outside the source extent get its minimum (air / padding), not 0 HU (water).
        interpolator, fill = sitk.sitkLinear, float(vol.array.min())
        image = sitk.Cast(image, sitk.sitkFloat32)
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, fill)
    return Volume.from_sitk(out, dtype=vol.array.dtype if is_mask else np.float32)
