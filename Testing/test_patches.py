"""Multi-level patches carry the exact global coordinates and effective spacing of what they sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ABDOMEN_SMALL_NII
from MedDiffFMLib.anatomy import threshold_anatomy
from MedDiffFMLib.io import read_volume
from MedDiffFMLib.patches import MODES, sample_patch
from MedDiffFMLib.position import global_coords
from MedDiffFMLib.preprocess import window_to_unit


@pytest.fixture(scope="module")
def ct():
    """Real abdomen CT, 30 x 101 x 122 voxels (z, y, x) at 3 mm: thinner than a 32^3 patch along z."""
    vol = read_volume(ABDOMEN_SMALL_NII)
    return window_to_unit(vol.array, "abdomen").astype(np.float32), threshold_anatomy(vol), vol.spacing_zyx


def _ramps(shape):
    return global_coords(shape, (0, 0, 0), shape, shape).numpy()


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("mode", MODES)
def test_coordinate_channels_are_the_sampled_positions(ct, mode, size):
    """A coordinate ramp put in as the image comes out equal to the coordinate channel it claims."""
    image, labels, spacing = ct
    ramps = _ramps(image.shape)
    for axis in range(3):
        patch = sample_patch(ramps[axis], labels, spacing, mode, size, np.random.default_rng(7))
        coords = patch["coords"]
        inside = (coords.abs() <= 1 + 1e-6).all(dim=0)
        assert patch["image"].shape == (1, size, size, size) and coords.shape == (3, size, size, size)
        torch.testing.assert_close(patch["image"][0][inside], coords[axis][inside], atol=1e-5, rtol=0)
        if mode != "crop":
            assert bool(inside.all())  # resized modes never leave the volume


def test_crop_pads_thin_axes_with_air_and_extrapolated_coordinates(ct):
    image, labels, spacing = ct
    patch = sample_patch(image, labels, spacing, "crop", 32, np.random.default_rng(3))
    z = patch["coords"][0, :, 0, 0].double()
    step = 2.0 / (image.shape[0] - 1)
    np.testing.assert_allclose(np.diff(z.numpy()), step, atol=1e-5)  # one affine ramp, padding included
    padded = z.abs() > 1 + 1e-6
    assert int(padded.sum()) == 32 - image.shape[0]
    assert bool((patch["image"][0][padded] == -1).all()) and bool((patch["anatomy_labels"][padded] == 0).all())
    assert patch["spacing_zyx"] == tuple(spacing)


def test_effective_spacing_and_label_sampling(ct):
    image, labels, spacing = ct
    size = 16
    n = np.array(image.shape)
    expected = {"whole": np.array(spacing) * n / size,
                "crop2x": np.array(spacing) * np.minimum(2 * size, n) / size,
                "crop": np.array(spacing)}
    for mode in MODES:
        patch = sample_patch(image, labels, spacing, mode, size, np.random.default_rng(1))
        np.testing.assert_allclose(patch["spacing_zyx"], expected[mode], rtol=1e-9)
        # Nearest-neighbour labels: the label of the voxel closest to each sample position (ties, as in
        # 2x downsampling, go to the upper voxel like torch's nearest-exact).
        c = patch["coords"].double().numpy()
        position = [(c[a] + 1) / 2 * (n[a] - 1) for a in range(3)]
        index = tuple(np.clip(np.floor(p + 0.5 + 1e-3).astype(int), 0, m - 1) for p, m in zip(position, n))
        agree = np.mean(patch["anatomy_labels"].numpy() == labels[index])
        assert patch["anatomy_labels"].dtype == torch.uint8 and agree > 0.999, (mode, agree)


def test_same_rng_same_patch_and_unknown_mode(ct):
    image, labels, spacing = ct
    a = sample_patch(image, labels, spacing, "crop2x", 16, np.random.default_rng(5))
    b = sample_patch(image, labels, spacing, "crop2x", 16, np.random.default_rng(5))
    c = sample_patch(image, labels, spacing, "crop2x", 16, np.random.default_rng(6))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["coords"], b["coords"])
    assert not torch.equal(a["coords"], c["coords"])
    with pytest.raises(ValueError, match="unknown patch mode"):
        sample_patch(image, labels, spacing, "tiles", 16, np.random.default_rng(0))
