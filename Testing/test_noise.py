"""Noise-level estimation: known noise on a smooth phantom, and added noise on real CT."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ABDOMEN_SMALL_NII
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.io import Volume, read_volume
from MedDiffFMLib.noise import _interpolation_matrix, estimate_noise


def phantom(noise_by_slice, seed=1):
    """Smooth soft tissue (about 10..70 HU) with an air strip and white noise of a given std per slice."""
    z, y, x = np.mgrid[:len(noise_by_slice), :64, :64]
    image = 40 + 30 * np.sin(x / 10.0) * np.cos(y / 13.0)
    image[:, :5] = -1000.0
    noise = np.asarray(noise_by_slice, float)[:, None, None]
    image = image + noise * np.random.default_rng(seed).normal(size=image.shape)
    return Volume(image.astype(np.float32), (0.9, 0.9, 2.5))


def test_known_noise_per_slice():
    levels = [15.0] * 12 + [45.0] * 12
    estimate = estimate_noise(phantom(levels))
    np.testing.assert_allclose(estimate.slice_sigma_hu[1:11], 15.0, rtol=0.1)
    np.testing.assert_allclose(estimate.slice_sigma_hu[13:23], 45.0, rtol=0.1)
    assert 15.0 < estimate.sigma_hu < 45.0
    assert estimate.sigma_map_hu.shape == (24, 64, 64)
    np.testing.assert_allclose(estimate.sigma_map_hu[2:10, 10:], 15.0, rtol=0.15)
    np.testing.assert_allclose(estimate.sigma_map_hu[14:22, 10:], 45.0, rtol=0.15)
    assert "HU" in estimate.describe()


@pytest.mark.parametrize("spacing_mm", [0.57, 1.0, 1.7, 3.0])
def test_white_noise_is_read_at_its_std_whatever_the_box(spacing_mm):
    """The estimate is the mode of local stds, which lies below the noise std by a factor that grows as the box
    shrinks (3 x 3 voxels at 1.7 mm and above: 6.5 %); it is corrected for that."""
    estimates = [estimate_noise(Volume((40.0 + 30.0 * np.random.default_rng(seed).normal(size=(6, 128, 128)))
                                       .astype(np.float32), (spacing_mm, spacing_mm, 2.5))).sigma_hu
                 for seed in range(3)]
    assert np.mean(estimates) == pytest.approx(30.0, rel=0.02)


def test_noise_varying_in_plane():
    """Noise 15 HU on the left half, 45 HU on the right: the map follows it away from the boundary."""
    z, y, x = np.mgrid[:6, :96, :96]
    image = 40 + 30 * np.sin(x / 10.0) * np.cos(y / 13.0)
    image[:, :5] = -1000.0
    noise = np.where(x < 48, 15.0, 45.0)
    image = (image + noise * np.random.default_rng(2).normal(size=image.shape)).astype(np.float32)
    sigma_map = estimate_noise(Volume(image, (0.9, 0.9, 2.5))).sigma_map_hu
    left, right = sigma_map[:, 10:, 5:30], sigma_map[:, 10:, 66:]
    assert np.median(right) > 2.0 * np.median(left)
    assert np.median(left) == pytest.approx(15.0, rel=0.3) and np.median(right) == pytest.approx(45.0, rel=0.3)


def test_added_noise_adds_in_variance_on_real_ct():
    """Real CT already has noise s0; adding white noise of 40 HU must give about sqrt(s0^2 + 40^2)."""
    ct = read_volume(ABDOMEN_SMALL_NII)
    original = estimate_noise(ct).sigma_hu
    assert 3.0 < original < 40.0
    noisy = ct.with_array(ct.array + np.random.default_rng(0).normal(0, 40, ct.shape).astype(np.float32))
    assert estimate_noise(noisy).sigma_hu == pytest.approx(np.hypot(original, 40.0), rel=0.08)


def test_refuses_image_without_soft_tissue():
    air_and_bone = np.where(np.indices((10, 40, 40))[2] < 20, -1000.0, 1000.0).astype(np.float32)
    with pytest.raises(InputError, match="--noise-level"):
        estimate_noise(Volume(air_and_bone))


@pytest.mark.parametrize("cells, cell_size, size", [(18, 30, 512), (3, 7, 20), (1, 5, 4)])
def test_block_interpolation_matches_scipy_zoom(cells, cell_size, size):
    """The map's block values are spread by two small matrix products; scipy's linear zoom is the reference."""
    from scipy import ndimage

    blocks = np.random.default_rng(cells).random((2, cells, cells))
    reference = ndimage.zoom(blocks, (1.0, cell_size, cell_size), order=1, mode="nearest",
                             grid_mode=True)[:, :size, :size]
    weights = _interpolation_matrix(cells, cell_size, size)
    np.testing.assert_allclose(weights @ blocks @ weights.T, reference, rtol=1e-5, atol=1e-6)
