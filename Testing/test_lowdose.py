"""Projection-domain low-dose simulation on real CT crops."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import CHEST_NRRD
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.io import Volume, read_volume
from MedDiffFMLib.lowdose import simulate_low_dose


@pytest.fixture(scope="module")
def chest_crop() -> Volume:
    """2 axial slices, 96x96 pixels through the mediastinum and lung of a real chest CT (0.57 mm pixels)."""
    vol = read_volume(CHEST_NRRD)
    return Volume(vol.array[23:25, 200:296, 180:276].copy(), vol.spacing, vol.origin, vol.direction)


def test_noise_grows_as_dose_falls_and_mean_is_kept(chest_crop):
    before = chest_crop.array.copy()
    stds = []
    for photons in (1e6, 1e5, 2.5e4):
        noisy = simulate_low_dose(chest_crop, photons=photons, seed=3)
        noise = noisy.array.astype(np.float64) - before
        stds.append(noise.std())
        # Reconstructed noise is zero-mean: the mean HU of the slice is kept to well under 1 std / 10.
        assert abs(noise.mean()) < 0.1 * noise.std()
    # Quantum noise std goes as 1/sqrt(dose): x10 fewer photons ~ x3.2, x4 fewer ~ x2.
    assert 2.5 < stds[1] / stds[0] < 4.0
    assert 1.7 < stds[2] / stds[1] < 2.3
    np.testing.assert_array_equal(chest_crop.array, before)  # input untouched


def test_huge_dose_is_noise_free_and_seed_is_reproducible(chest_crop):
    clean = simulate_low_dose(chest_crop, photons=1e14, seed=0)
    assert np.abs(clean.array - chest_crop.array).max() < 0.5  # HU
    a = simulate_low_dose(chest_crop, photons=1e5, seed=7)
    b = simulate_low_dose(chest_crop, photons=1e5, seed=7)
    c = simulate_low_dose(chest_crop, photons=1e5, seed=8)
    np.testing.assert_array_equal(a.array, b.array)
    assert not np.array_equal(a.array, c.array)


def test_geometry_kept_and_plain_arrays(chest_crop):
    noisy = simulate_low_dose(chest_crop, photons=1e5, seed=0)
    assert noisy.same_grid(chest_crop) and noisy.array.dtype == np.float32
    one_slice = simulate_low_dose(chest_crop.array[0], photons=1e5, seed=0,
                                  pixel_size_mm=chest_crop.spacing[0])
    # Same first slice, same generator state -> identical to the volume's first slice.
    np.testing.assert_array_equal(one_slice, noisy.array[0])
    with pytest.raises(InputError):
        simulate_low_dose(chest_crop.array, photons=1e5)  # array without pixel size
    with pytest.raises(InputError):
        simulate_low_dose(chest_crop, photons=0)


def test_denser_object_gives_more_noise():
    """Physics: fewer photons get through bone than water, so its reconstruction is noisier."""
    water = np.zeros((1, 64, 64), dtype=np.float32)
    noise_water = simulate_low_dose(water, photons=1e5, seed=1, pixel_size_mm=1.0)
    noise_bone = simulate_low_dose(water + 1000.0, photons=1e5, seed=1, pixel_size_mm=1.0) - 1000.0
    assert 1.0 < noise_water.std() < 0.9 * noise_bone.std()


@pytest.mark.parametrize("transpose", [False, True])
def test_noise_sits_where_the_dense_object_is_in_non_square_slices(transpose):
    """A bone block at one end of a wide (or tall) slice: the noise must be strongest on the block,
    i.e. the slice is padded to a square and cropped back in place."""
    slab = np.full((4, 64, 128), -1000.0, dtype=np.float32)
    slab[:, 12:52, 8:48] = 1500.0
    on_block, far = (slice(None), slice(12, 52), slice(8, 48)), (slice(None), slice(12, 52), slice(80, 120))
    if transpose:
        slab = slab.transpose(0, 2, 1).copy()
        on_block, far = (on_block[0], on_block[2], on_block[1]), (far[0], far[2], far[1])
    noise = simulate_low_dose(slab, photons=1e4, seed=0, pixel_size_mm=1.0) - slab
    assert noise[on_block].std() > 1.5 * noise[far].std()


def test_finer_pixels_are_noisier_at_the_same_photons_per_ray():
    """The same water slab sampled with 0.5 mm pixels: each pixel holds less matter, so its attenuation estimate,
    and the HU converted from it, are noisier (without the pixel size the ratio falls below 1)."""
    water = np.zeros((1, 64, 64), dtype=np.float32)
    fine = simulate_low_dose(water, photons=1e5, seed=1, pixel_size_mm=0.5).std()
    coarse = simulate_low_dose(water, photons=1e5, seed=1, pixel_size_mm=1.0).std()
    assert 1.2 < fine / coarse < 2.0


def test_scanner_padding_below_air_attenuates_nothing():
    """-3024 HU outside the scan field is no negative matter: the noise is the same as with air there."""
    body = np.full((1, 64, 64), -1000.0, dtype=np.float32)
    body[:, 16:48, 16:48] = 0.0
    padded = body.copy()
    padded[:, :6, :6] = -3024.0
    noise_air = simulate_low_dose(body, photons=1e5, seed=1, pixel_size_mm=1.0) - body
    noise_padded = simulate_low_dose(padded, photons=1e5, seed=1, pixel_size_mm=1.0) - padded
    np.testing.assert_allclose(noise_padded, noise_air, atol=1e-2)
