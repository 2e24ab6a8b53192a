"""Global coordinates match voxel positions in the whole-volume frame; the encoding has the paper's form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedDiffFMLib.anatomy import encode_anatomy
from MedDiffFMLib.conditioning import VolumeCondition, assemble
from MedDiffFMLib.config import preset
from MedDiffFMLib.position import axis_coords, global_coords, positional_encoding


def test_plain_crop_coordinates_are_voxel_centres():
    c = axis_coords(11, 3, 7, 4)
    torch.testing.assert_close(c, torch.tensor([-1 + 2 * i / 10 for i in (3, 4, 5, 6)]))
    whole = axis_coords(11, 0, 11, 11)
    assert whole[0] == -1 and whole[-1] == 1


def test_resized_region_coordinates_match_interpolation():
    """Resizing the coordinate ramp itself with trilinear interpolation gives the same coordinates."""
    full = (20, 12, 9)
    ramp = global_coords(full, (0, 0, 0), full, full)  # exact voxel-centre coordinates
    start, stop, out = (4, 2, 1), (20, 10, 9), (8, 4, 4)
    region = ramp[:, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    resized = F.interpolate(region[None], size=out, mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(global_coords(full, start, stop, out), resized, atol=1e-5, rtol=0)


def test_positional_encoding_values():
    coords = torch.tensor([0.25, -0.5, 1.0]).reshape(3, 1, 1, 1)
    pe = positional_encoding(coords, 3)
    assert pe.shape == (18, 1, 1, 1)
    # z channel, k = 2: sin(4 pi 0.25), cos(4 pi 0.25)
    assert math.isclose(pe[4].item(), math.sin(4 * math.pi * 0.25), abs_tol=1e-6)
    assert math.isclose(pe[5].item(), math.cos(4 * math.pi * 0.25), abs_tol=1e-6)
    # x channel, k = 0
    assert math.isclose(pe[12].item(), math.sin(math.pi * 1.0), abs_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_volume_condition_window_equals_the_training_assembly(dtype):
    """Sampling writes each condition channel from a per-axis line into the caller's tensor; training stacks
    the box's coordinates with `assemble`. Both must give the network the same values, for a sub-box of a
    larger volume (offset frame) and when written into a slice of a reduced-precision stack."""
    cfg = preset("tiny")
    full, offset, shape = (20, 18, 24), (2, 0, 5), (12, 9, 16)
    labels = np.random.default_rng(0).integers(0, cfg.anatomy["num_classes"] + 1, shape).astype(np.uint8)
    cond = VolumeCondition(cfg, shape, (2.5, 0.7, 0.7), "chest", labels, offset_zyx=offset, full_shape_zyx=full)
    start, size = (3, 1, 4), (8, 7, 10)
    g0 = [a + o for a, o in zip(start, offset)]
    box = tuple(slice(a, a + n) for a, n in zip(start, size))
    expected = assemble(cfg, torch.from_numpy(encode_anatomy(labels[box], cond.spec)),
                        global_coords(full, g0, [a + n for a, n in zip(g0, size)], size), cond.spacing)
    stack = torch.full((cond.num_channels, 2) + size, float("nan"), dtype=dtype)
    written = cond.window(start, size, out=stack[:, 1])
    assert written.data_ptr() == stack[:, 1].data_ptr() and bool(stack[:, 0].isnan().all())
    assert torch.equal(stack[:, 1], expected.to(dtype))
    assert torch.equal(cond.window(start, size), expected)
