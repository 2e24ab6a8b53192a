"""Resampling, HU windows mapped to [-1, 1] and their inverse, and the body-region guess."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

# Regions and their paper windows live in config (the model config records them); re-exported here.
from .config import PAPER_WINDOWS as REGION_WINDOWS, REGIONS  # noqa: F401
from .errors import InputError
from .io import Volume
from .orientation import AxisOrder

Window = Union[str, Sequence[float]]


def as_window(window: Window) -> Tuple[float, float]:
    """(lo, hi) HU bounds from a region name or an explicit (lo, hi) pair, e.g. (-160, 240)."""
    if isinstance(window, str):
        if window not in REGION_WINDOWS:
            raise InputError(f"unknown region {window!r}; choose one of {', '.join(REGIONS)}")
        return REGION_WINDOWS[window]
    low, high = (float(v) for v in window)
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise InputError(f"a HU window is two finite numbers (lo, hi) with hi > lo, got ({low}, {high})")
    return low, high


def window_to_unit(hu, window: Window):
    """Clip HU to the window and map it linearly to [-1, 1] (numpy arrays, torch tensors or floats)."""
    low, high = as_window(window)
    width = high - low
    clipped = hu.clip(low, high) if hasattr(hu, "clip") else min(max(hu, low), high)
    if isinstance(clipped, np.ndarray) and clipped.dtype.kind == "f":  # a new array: a whole CT is 300 MB a copy
        clipped -= low
        clipped *= 2.0 / width
        clipped -= 1.0
        return clipped
    return (clipped - low) * (2.0 / width) - 1.0


def unit_to_hu(x, window: Window):
    """Inverse of `window_to_unit` on the window's range: [-1, 1] back to HU (no clipping)."""
    low, high = as_window(window)
    return (x + 1.0) * ((high - low) / 2.0) + low


def resample(vol: Volume, spacing: Sequence[float] = (1.0, 1.0, 1.0), is_mask: bool = False) -> Volume:
    """Resample to `spacing` (x, y, z mm) keeping the direction and the field of view: the voxel count is the
    extent over the new spacing (rounded), and the grid is centred on the old one, so neither end moves by more
    than rounding and no output voxel lies beyond the source's outer voxel faces.

    Linear interpolation for images, nearest neighbour for label maps.
    """
    spacing = tuple(float(s) for s in spacing)
    size_xyz = tuple(reversed(vol.shape))
    new_size = resampled_size(vol, spacing)
    # Shift (mm, along each image axis) of the first voxel centre that keeps the grid's centre where it was.
    shift = [((n - 1) * old - (m - 1) * new) / 2.0 for n, m, old, new in zip(size_xyz, new_size, vol.spacing, spacing)]
    direction = np.asarray(vol.direction, float).reshape(3, 3)
    reference = sitk.Image(new_size, sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetOrigin(tuple(np.asarray(vol.origin, float) + direction @ np.asarray(shift)))
    reference.SetDirection(vol.direction)
    return _resample_onto(vol, reference, is_mask)


def resampled_size(vol: Volume, spacing: Sequence[float]) -> List[int]:
    """Voxels (x, y, z) of `resample(vol, spacing)`: the extent over the new spacing, rounded."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(0 < s < float("inf") for s in spacing):
        raise InputError(f"target spacing must be three positive numbers in mm (x, y, z), got {spacing}")
    return [max(1, int(round(n * old / new))) for n, old, new in zip(reversed(vol.shape), vol.spacing, spacing)]


def resample_like(vol: Volume, reference: Volume, is_mask: bool = False) -> Volume:
    """Resample `vol` onto the grid of `reference` (e.g. back to the original grid after processing)."""
    grid = sitk.Image(list(reversed(reference.shape)), sitk.sitkUInt8)
    grid.SetSpacing(reference.spacing)
    grid.SetOrigin(reference.origin)
    grid.SetDirection(reference.direction)
    return _resample_onto(vol, grid, is_mask)


def _resample_onto(vol: Volume, reference: sitk.Image, is_mask: bool) -> Volume:
    if is_mask:
        # Nearest neighbour breaks exact ties (an output voxel halfway between two source slices) towards the higher
        # source index. Read in patient axis order, the source's higher index is the same physical direction however
        # the file stores its axes, so a flipped or permuted copy of a mask resamples to the same voxels.
        order = AxisOrder.of(vol.direction)
        image = (vol if order.identity else order.volume(vol)).to_sitk()
        interpolator, fill = sitk.sitkNearestNeighbor, 0
    else:
        # Voxels outside the source extent get its minimum (air / padding), not 0 HU (water).
        image = sitk.Cast(vol.to_sitk(), sitk.sitkFloat32)
        interpolator, fill = sitk.sitkLinear, float(vol.array.min())
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, fill)
    return Volume.from_sitk(out, dtype=vol.array.dtype if is_mask else np.float32)


#: guess_region works on this isotropic spacing (mm): fast, and fine enough for whole-body features.
REGION_GUESS_SPACING = 3.0
#: Lung parenchyma (smoothed at 3 mm): above the air outside the body (~-1000 HU), below fat.
LUNG_PARENCHYMA_HU = (-950.0, -600.0)
#: Fraction of the body that is air/lung (threshold anatomy) above which a scan is called chest.
CHEST_LUNG_FRACTION = 0.2
#: A cropped field of view is a chest when this fraction of it is parenchyma core (parenchyma one voxel in from its
#: edges: the partial-volume rims of the air around a body, a table or a limb do not count), or when
#: CHEST_LUNG_FRACTION of it is parenchyma and a smaller core remains (heavy noise or a small crop erodes the core)...
CROPPED_CHEST_CORE_FRACTION = 0.12
CROPPED_CHEST_MIN_CORE_FRACTION = 0.09
#: ... and that core has lung texture: median in-plane std (3 x 3 voxels) of at least this many HU. Vessels and
#: septa give lung 32-49 HU (smooth kernels the least), low-dose noise more; the smooth padding, foam or blankets
#: around a limb, whose density can be the lung's, give 5-27 HU (shared IBSI limb CTs, clean and at 2.5e4 photons).
LUNG_TEXTURE_MIN_STD_HU = 30.0
#: Air inside the body (HU) that counts as an airway: below the partial-volume rim (-500..-300 HU) at the skin.
AIRWAY_MAX_HU = -600.0
#: Fraction of a small cross-section's body that is airway for head_neck (a neck's trachea: a few percent).
AIRWAY_MIN_FRACTION = 0.01
#: Fraction of axial slices whose bone encloses most of the body (a skull) for head_neck.
HEAD_SKULL_SLICE_FRACTION = 0.3
#: Median axial body cross-section (cm^2) below which a scan is not a trunk (neck, head, limb).
TRUNK_MIN_AREA_CM2 = 350.0
#: Body length (mm) along the patient axis beyond which a scan is whole-body (`other`).
WHOLE_BODY_MIN_LENGTH_MM = 1000.0


#: guess_region's reason when it finds no body to go by (callers warn: `other` is then a default, not a finding).
REGION_UNKNOWN = (f"no body found by the threshold anatomy on a {REGION_GUESS_SPACING:g} mm grid (a small or edge "
                  "crop?); region unknown, so 'other': set it yourself (--region)")


def guess_region(vol: Volume) -> Tuple[str, str]:
    """Guess the body region from the image; returns (region, a sentence saying how it decided).

    Rules, in order, on threshold anatomy at 3 mm in LPS orientation: body longer than 1 m -> other
    (whole body); lung air >= 20% of the body -> chest; bone enclosing
    most of the body cross-section (a skull) in >= 30% of slices -> head_neck; a small cross-section
    (< 350 cm^2) -> head_neck if it holds an airway, else other (limb); otherwise abdomen.
    A cropped field of view (body open to the image border) -> chest if >= 12% of it is the core of lung
    parenchyma (LUNG_PARENCHYMA_HU, above the air outside the body; or >= 20% parenchyma with a core >= 9%) with
    lung texture: a crop through the lung
    leaves the lung outside the body mask, and smooth padding around a limb can have the lung's density.
    An airway is air below AIRWAY_MAX_HU inside the body, not the partial-volume rim at the skin.
    """
    from scipy import ndimage

    from .anatomy import threshold_anatomy

    # Axial slices along array axis 0 whatever the acquisition plane (sagittal/coronal series too).
    coarse = resample(vol, (REGION_GUESS_SPACING,) * 3)
    coarse = AxisOrder.of(coarse.direction).volume(coarse)
    labels = threshold_anatomy(coarse)
    body = labels > 0
    if not body.any():
        return "other", REGION_UNKNOWN
    body_length_mm = np.count_nonzero(body.any(axis=(1, 2))) * REGION_GUESS_SPACING
    if body_length_mm > WHOLE_BODY_MIN_LENGTH_MM:
        return "other", (f"whole body: the body spans {body_length_mm:.0f} mm head to foot "
                         f"(> {WHOLE_BODY_MIN_LENGTH_MM:.0f} mm)")
    lung_fraction = float(np.count_nonzero(labels == 1)) / np.count_nonzero(body)
    if lung_fraction >= CHEST_LUNG_FRACTION:
        return "chest", (f"{lung_fraction:.0%} of the body is air/lung "
                         f"(>= {CHEST_LUNG_FRACTION:.0%})")
    cropped = _touches_border(body)
    if cropped:
        parenchyma, core, texture = _parenchyma_core(coarse.array)
        enough = core >= CROPPED_CHEST_CORE_FRACTION or (parenchyma >= CHEST_LUNG_FRACTION
                                                         and core >= CROPPED_CHEST_MIN_CORE_FRACTION)
        if enough and texture >= LUNG_TEXTURE_MIN_STD_HU:
            lo, hi = LUNG_PARENCHYMA_HU
            return "chest", (f"cropped field of view, {parenchyma:.0%} of it lung parenchyma ({lo:g}..{hi:g} HU), "
                             f"{core:.0%} away from its edges, with lung texture (std {texture:.0f} HU "
                             f">= {LUNG_TEXTURE_MIN_STD_HU:g})")
    slice_areas = body.sum(axis=(1, 2))
    occupied = slice_areas > 0
    skull_slices = 0
    for bone, area in zip(labels[occupied] == 4, slice_areas[occupied]):
        enclosed = ndimage.binary_fill_holes(ndimage.binary_closing(bone))
        skull_slices += int(np.count_nonzero(enclosed) > 0.5 * area)
    skull_fraction = skull_slices / int(np.count_nonzero(occupied))
    if skull_fraction >= HEAD_SKULL_SLICE_FRACTION:
        return "head_neck", (f"bone encloses most of the body cross-section (a skull) in "
                             f"{skull_fraction:.0%} of slices (>= {HEAD_SKULL_SLICE_FRACTION:.0%})")
    pixel_cm2 = REGION_GUESS_SPACING ** 2 / 100.0
    median_area = float(np.median(slice_areas[occupied])) * pixel_cm2
    facts = (f"median body cross-section {median_area:.0f} cm^2, air/lung {lung_fraction:.0%} of the body, "
             f"skull in {skull_fraction:.0%} of slices")
    if median_area < TRUNK_MIN_AREA_CM2:
        airway = float(np.count_nonzero(body & (coarse.array < AIRWAY_MAX_HU))) / np.count_nonzero(body)
        facts += f", {airway:.1%} of the body below {AIRWAY_MAX_HU:g} HU"
        if airway >= AIRWAY_MIN_FRACTION and not cropped:
            return "head_neck", f"small cross-section with an airway ({facts})"
        return "other", f"extremity or crop: small cross-section, no airway, no skull ({facts})"
    return "abdomen", f"trunk-sized cross-section without much lung or a skull ({facts})"


def _parenchyma_core(hu: np.ndarray) -> Tuple[float, float, float]:
    """Fractions of the image that are lung parenchyma, and parenchyma one voxel in from its in-plane edges (the
    core), and the median in-plane std (3 x 3 voxels) of HU in the core."""
    from scipy import ndimage

    hu = hu.astype(np.float64)  # squares of HU: float32 would lose the std in the mean of squares
    lo, hi = LUNG_PARENCHYMA_HU
    cross = np.zeros((1, 3, 3), bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    parenchyma = (hu > lo) & (hu < hi)
    core = ndimage.binary_erosion(parenchyma, cross)
    if not core.any():
        return float(np.mean(parenchyma)), 0.0, 0.0
    mean = ndimage.uniform_filter(hu, (1, 3, 3))
    std = np.sqrt(np.maximum(ndimage.uniform_filter(hu * hu, (1, 3, 3)) - mean * mean, 0.0))
    return float(np.mean(parenchyma)), float(np.mean(core)), float(np.median(std[core]))


def _touches_border(body: np.ndarray) -> bool:
    """True if the body reaches the in-plane image border in most slices (a cropped field of view)."""
    edges = body[:, 0, :].any(1) | body[:, -1, :].any(1) | body[:, :, 0].any(1) | body[:, :, -1].any(1)
    occupied = body.any(axis=(1, 2))
    return bool(np.count_nonzero(edges & occupied) > 0.5 * np.count_nonzero(occupied))
