"""Everything the network sees besides the noisy image: anatomy, global position, voxel spacing.

Channel order (see DESIGN.md): anatomy (cfg.anatomy encoding), 3 global coordinates (z, y, x),
6L sin/cos encodings of them, 3 log2 effective voxel spacings (z, y, x) in mm.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .anatomy import AnatomySpec, encode_anatomy
from .config import ModelConfig
from .position import axis_coords, positional_encoding


def anatomy_spec(cfg: ModelConfig) -> AnatomySpec:
    return AnatomySpec.from_dict(cfg.anatomy)


def condition_channels(cfg: ModelConfig) -> int:
    return anatomy_spec(cfg).num_channels + 3 + 6 * cfg.pe_frequencies + 3


def assemble(cfg: ModelConfig, anatomy: torch.Tensor, coords: torch.Tensor,
             spacing_zyx: Sequence[float]) -> torch.Tensor:
    """Stack encoded anatomy (A, d, h, w), coordinates (3, d, h, w), their sin/cos encoding and spacing into
    (C, d, h, w): the training patches' condition (`VolumeCondition.window` writes the same values in place)."""
    spacing = torch.log2(torch.as_tensor(spacing_zyx, dtype=torch.float32))
    spacing = spacing.reshape(3, 1, 1, 1).expand((3,) + tuple(coords.shape[1:]))
    encoding = positional_encoding(coords, cfg.pe_frequencies)
    return torch.cat([anatomy.float(), coords, encoding, spacing])


class VolumeCondition:
    """Condition channels for any window of a volume, built on demand: for a whole CT, a stack of every channel is
    many times the CT's memory (the sampler keeps one only where it fits, e.g. on a large GPU).

    `shape_zyx` is the grid being sampled; it may be a sub-box (at `offset_zyx`) of a larger volume of
    `full_shape_zyx`, whose frame then defines the global coordinates (e.g. inpainting a bounding box).
    `anatomy_labels` is a label map on the sampled grid (None: no anatomy given, channels are zero, as in
    the training-time anatomy dropout).
    """

    def __init__(self, cfg: ModelConfig, shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                 region: str, anatomy_labels: Optional[np.ndarray] = None,
                 offset_zyx: Sequence[int] = (0, 0, 0), full_shape_zyx: Optional[Sequence[int]] = None):
        self.cfg = cfg
        self.shape = tuple(int(s) for s in shape_zyx)
        self.spacing = tuple(float(s) for s in spacing_zyx)
        self.region = cfg.region_index(region)
        self.offset = tuple(int(o) for o in offset_zyx)
        self.full_shape = tuple(int(s) for s in (full_shape_zyx or self.shape))
        if anatomy_labels is not None and tuple(anatomy_labels.shape) != self.shape:
            raise ValueError(f"anatomy label map {anatomy_labels.shape} does not match the grid {self.shape}")
        self.labels = anatomy_labels
        self.spec = anatomy_spec(cfg)
        self.num_channels = condition_channels(cfg)

    def window(self, start: Sequence[int], size: Sequence[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, d, h, w) condition for the box [start, start + size) of the sampled grid: the values `assemble`
        gives from the box's coordinates, written into `out` when given (any device and dtype, e.g. a slab of
        the whole-volume stack on the GPU), else into a new float32 tensor. Position and spacing channels vary
        along one axis or none, so each is broadcast into place from a line: nothing box-sized is stacked or
        concatenated (that dominated a large volume's set-up)."""
        size = tuple(int(s) for s in size)
        if out is None:
            out = torch.empty((self.num_channels,) + size)
        a, n_pe = self.spec.num_channels, 2 * self.cfg.pe_frequencies
        if self.labels is None:
            out[:a].zero_()
        else:
            box = tuple(slice(s, s + n) for s, n in zip(start, size))
            out[:a].copy_(torch.from_numpy(encode_anatomy(self.labels[box], self.spec)))
        for dim, (full, first, n) in enumerate(zip(self.full_shape, start, size)):
            first += self.offset[dim]
            line = axis_coords(full, first, first + n, n)[None]
            view = [1, 1, 1]
            view[dim] = n
            # The lines are computed on the CPU (bit-identical to training) and moved before broadcasting, so
            # only `n` values cross to the device, not the box.
            encoding = positional_encoding(line, self.cfg.pe_frequencies)
            out[a + dim].copy_(line.to(out.device).reshape(view))
            pe = a + 3 + n_pe * dim
            out[pe:pe + n_pe].copy_(encoding.to(out.device).reshape([n_pe] + view))
        for dim, log_spacing in enumerate(torch.log2(torch.as_tensor(self.spacing, dtype=torch.float32))):
            out[a + 3 + 3 * n_pe + dim].fill_(float(log_spacing))
        return out
