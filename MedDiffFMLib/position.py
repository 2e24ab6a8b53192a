"""Global position of every voxel of a patch in the frame of the whole volume, and its sin/cos encoding.

The coordinate of a voxel centre along an axis of n voxels is -1 + 2 i / (n - 1): the first voxel is -1 and
the last +1 (paper, section 3.3). A patch cut from the volume, or a region resized to the patch size,
carries the coordinates of the points it samples, so image-level and patch-level inputs share one frame.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def axis_coords(full_size: int, start: float, stop: float, n_out: int) -> torch.Tensor:
    """Normalised coordinates of n_out points that sample voxels [start, stop) of an axis of full_size voxels.

    When stop - start == n_out the points are the voxel centres themselves (a plain crop); otherwise they
    are the sample positions of `torch.nn.functional.interpolate(..., align_corners=False)` resizing that
    region to n_out points, so the coordinates match the resized image exactly.
    """
    if full_size < 1 or n_out < 1 or not 0 <= start < stop <= full_size:
        raise ValueError(f"invalid axis range [{start}, {stop}) of {full_size} voxels -> {n_out} points")
    step = (stop - start) / n_out
    centres = start - 0.5 + (torch.arange(n_out, dtype=torch.float64) + 0.5) * step
    if full_size == 1:
        return torch.zeros(n_out, dtype=torch.float32)
    return (-1 + 2 * centres / (full_size - 1)).float()


def global_coords(full_shape: Sequence[int], starts: Sequence[float], stops: Sequence[float],
                  out_shape: Sequence[int]) -> torch.Tensor:
    """(3, d, h, w) coordinate channels (z, y, x) for a box [starts, stops) of a volume of full_shape,
    sampled on out_shape points."""
    axes = [axis_coords(int(n), float(a), float(b), int(m))
            for n, a, b, m in zip(full_shape, starts, stops, out_shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def positional_encoding(coords: torch.Tensor, frequencies: int) -> torch.Tensor:
    """sin(2^k pi c), cos(2^k pi c) for k = 0..L-1 and each coordinate channel c: (6L, ...) for 3 channels."""
    channels = []
    for c in coords:
        for k in range(frequencies):
            arg = (2.0 ** k) * math.pi * c
            channels += [torch.sin(arg), torch.cos(arg)]
    return torch.stack(channels) if channels else coords.new_zeros((0,) + tuple(coords.shape[1:]))

