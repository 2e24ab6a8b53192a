"""Multi-level training patches (paper, section 3.2): the whole volume, a 2x region and a plain crop.

Every patch has the same size P^3 and carries the global coordinates of the points it samples in the frame
of the whole volume, plus its effective voxel spacing, so the network can tell the three levels apart:
- `whole`:  the whole volume resized to P^3 (image level);
- `crop2x`: a random box of 2P voxels per axis (clamped to the volume) resized to P^3;
- `crop`:   a random box of P voxels per axis, not resized (patch level).
Resizing uses trilinear interpolation with align_corners=False, whose sample points are exactly those of
`position.axis_coords`, and nearest-exact for the anatomy labels (the same sample points, rounded).

Volumes thinner than P along an axis in `crop` mode are padded (image -1, labels 0) at a random offset;
the padded voxels get *extrapolated* coordinates (the voxel grid continued past the edge, so |c| > 1),
which keeps the coordinate channels an affine function of the voxel index everywhere in the patch.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .position import axis_coords

MODES = ("whole", "crop2x", "crop")


def sample_patch(image_unit: np.ndarray, labels: np.ndarray, spacing_zyx: Sequence[float], mode: str,
                 size: int, rng: np.random.Generator) -> Dict[str, object]:
    """One P^3 training patch from a windowed volume (z, y, x) in [-1, 1] and its anatomy label map.

    Returns image (1, P, P, P) float32, anatomy_labels (P, P, P) uint8, coords (3, P, P, P) float32
    (z, y, x) and spacing_zyx, the effective voxel spacing in mm of the patch as the network sees it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown patch mode {mode!r}; choose one of {', '.join(MODES)}")
    shape = tuple(int(n) for n in image_unit.shape)
    if tuple(labels.shape) != shape:
        raise ValueError(f"anatomy labels {tuple(labels.shape)} do not match the image {shape}")
    extent = {"whole": shape, "crop2x": tuple(min(2 * size, n) for n in shape),
              "crop": tuple(min(size, n) for n in shape)}[mode]
    starts = tuple(int(rng.integers(0, n - e + 1)) for n, e in zip(shape, extent))
    box = tuple(slice(a, a + e) for a, e in zip(starts, extent))
    image = torch.from_numpy(np.ascontiguousarray(image_unit[box], dtype=np.float32))
    label_box = torch.from_numpy(np.ascontiguousarray(labels[box], dtype=np.uint8))

    if mode == "crop":
        # Pad thin axes to P at a random offset; no resize, so the native spacing is the effective one.
        pad_before = tuple(int(rng.integers(0, size - e + 1)) for e in extent)
        image, label_box = _pad_to(image, label_box, pad_before, size)
        axes = [_axis_with_padding(n, a, e, before, size)
                for n, a, e, before in zip(shape, starts, extent, pad_before)]
        spacing = tuple(float(s) for s in spacing_zyx)
    else:
        out = (size, size, size)
        image = F.interpolate(image[None, None], size=out, mode="trilinear", align_corners=False)[0, 0]
        label_box = F.interpolate(label_box[None, None].float(), size=out, mode="nearest-exact")[0, 0]
        label_box = label_box.to(torch.uint8)
        # Upsampled axes sample up to half a voxel past the edge centres, where interpolation repeats the
        # edge voxel; clamping gives those points the edge voxel's coordinate too, so coords match exactly.
        axes = [axis_coords(n, a, a + e, size).clamp(-1.0, 1.0) for n, a, e in zip(shape, starts, extent)]
        spacing = tuple(float(s) * e / size for s, e in zip(spacing_zyx, extent))

    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return {"image": image[None].contiguous(), "anatomy_labels": label_box.contiguous(),
            "coords": coords, "spacing_zyx": spacing}


def _pad_to(image: torch.Tensor, labels: torch.Tensor, before: Tuple[int, ...],
            size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if all(n == size for n in image.shape):
        return image, labels
    # F.pad lists (before, after) pairs from the last axis backwards.
    pads = []
    for n, b in reversed(list(zip(image.shape, before))):
        pads += [b, size - n - b]
    image = F.pad(image, pads, value=-1.0)
    labels = F.pad(labels, pads, value=0)
    return image, labels


def _axis_with_padding(full_size: int, start: int, extent: int, before: int, size: int) -> torch.Tensor:
    """Coordinates of the crop's voxels, continued linearly over `before` / trailing padding voxels."""
    inside = axis_coords(full_size, start, start + extent, extent)
    if extent == size:
        return inside
    # A padded axis is the whole axis (extent == full_size < size); one voxel is 2 / (n - 1) units.
    step = 2.0 / (full_size - 1) if full_size > 1 else 0.0
    index = torch.arange(size, dtype=torch.float64) - before
    return (inside[0].double() + index * step).float()
