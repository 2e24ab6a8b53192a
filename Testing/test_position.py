"""Global coordinates match voxel positions in the whole-volume frame; the encoding has the paper's form."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from MedDiffFMLib.position import axis_coords, global_coords, grid_positional_encoding, positional_encoding


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


@pytest.mark.parametrize("box", [((3, 0, 5), (11, 9, 17), (8, 9, 12)),  # plain crop
                                 ((0, 2, 1), (20, 18, 24), (6, 8, 7))])  # region resized to the patch
def test_grid_encoding_equals_the_encoding_of_the_coordinates(box):
    starts, stops, out = box
    full = (20, 18, 24)
    expected = positional_encoding(global_coords(full, starts, stops, out), 4)
    torch.testing.assert_close(grid_positional_encoding(full, starts, stops, out, 4), expected, atol=1e-6, rtol=0)
