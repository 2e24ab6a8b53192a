"""Resampling, HU windows and their inverse, and the body-region guess, on the real cases."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import (ABDOMEN_NII, ABDOMEN_SMALL_NII, CHEST_NODULE_NRRD, CHEST_NRRD, CT_DATA, HEAD_TILTED_DICOM,
                      LIMB_NII, REPO, grid_centre)
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.evaluate import axial_first, central_block
from MedDiffFMLib.io import Volume, read_mask, read_volume
from MedDiffFMLib.lowdose import simulate_low_dose
from MedDiffFMLib.preprocess import (REGION_WINDOWS, REGIONS, guess_region, resample, resample_like,
                                     unit_to_hu, window_to_unit)


@pytest.fixture(scope="module")
def chest():
    return read_volume(CHEST_NRRD)


def test_paper_windows():
    assert REGIONS == ("head_neck", "chest", "abdomen", "other")
    # (lo, hi) HU from the paper's level/width: L50/W400, L-500/W1800, L60/W360.
    assert REGION_WINDOWS["head_neck"] == (-150, 250)
    assert REGION_WINDOWS["chest"] == (-1400, 400)
    assert REGION_WINDOWS["abdomen"] == (-120, 240)
    assert window_to_unit(-1400.0, "chest") == -1.0
    assert window_to_unit(-500.0, "chest") == 0.0
    assert window_to_unit(400.0, "chest") == 1.0
    assert window_to_unit(5000.0, (-120, 240)) == 1.0


@pytest.mark.parametrize("region", REGIONS)
def test_window_inverse_is_identity_on_the_window(chest, region):
    low, high = REGION_WINDOWS[region]
    unit = window_to_unit(chest.array, region)
    assert unit.dtype == np.float32 and unit.min() >= -1.0 and unit.max() <= 1.0
    # Bone (3071 HU) saturates every window; air (-1024 HU) all but the chest window (lo -1400).
    assert unit.max() == 1.0
    assert unit.min() == pytest.approx(-1.0 if region != "chest" else (-1024 + 1400) / 900 - 1, abs=1e-6)
    expected = np.clip(chest.array, low, high)
    np.testing.assert_allclose(unit_to_hu(unit, region), expected, atol=1e-4 * (high - low))
    x = np.linspace(-1, 1, 101)
    np.testing.assert_allclose(window_to_unit(unit_to_hu(x, region), region), x, atol=1e-12)


def test_window_on_torch_tensors_matches_numpy(chest):
    hu = chest.array[20, ::8, ::8]
    np.testing.assert_allclose(window_to_unit(torch.from_numpy(hu), "abdomen").numpy(),
                               window_to_unit(hu, "abdomen"), atol=1e-6)


def test_unknown_region_and_bad_window():
    with pytest.raises(InputError, match="unknown region"):
        window_to_unit(0.0, "pelvis")
    with pytest.raises(InputError, match="hi > lo"):
        window_to_unit(0.0, (40, 0))
    for window in [(0.0, float("nan")), (float("nan"), 100.0), (float("-inf"), 100.0), (0.0, float("inf"))]:
        with pytest.raises(InputError, match="two finite numbers"):  # NaN passed the hi > lo test, inf divided to 0
            window_to_unit(0.0, window)


def test_mask_resampling_does_not_depend_on_how_the_axes_are_stored():
    """Resampling 5 mm slices to 2 mm puts some output slices exactly halfway between two source slices. Nearest
    neighbour must pick the same one whether the mask is stored as is, flipped or permuted (the same physical mask),
    else a flipped copy of a training mask lands a slice off."""
    m = (np.random.default_rng(0).random((12, 20, 18)) < 0.3).astype(np.uint8)
    image = sitk.GetImageFromArray(m)
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetOrigin((3.0, -2.0, 10.0))
    as_is = resample(Volume.from_sitk(image, dtype=np.uint8), (1.0, 1.0, 2.0), is_mask=True)
    flipped = resample(Volume.from_sitk(sitk.Flip(image, [False, False, True]), dtype=np.uint8), (1.0, 1.0, 2.0),
                       is_mask=True)
    assert flipped.direction[8] == -1.0 and np.array_equal(flipped.array[::-1], as_is.array)
    # Sagittal-first storage: its x axis is the patient's z, so the 2 mm go first.
    permuted = resample(Volume.from_sitk(sitk.PermuteAxes(image, [2, 0, 1]), dtype=np.uint8), (2.0, 1.0, 1.0),
                        is_mask=True)
    back = sitk.Resample(permuted.to_sitk(), as_is.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayFromImage(back), as_is.array)


def test_resample_to_1mm_keeps_extent_and_hu(chest):
    iso = resample(chest, (1.0, 1.0, 1.0))
    assert iso.spacing == (1.0, 1.0, 1.0) and iso.direction == chest.direction
    assert iso.shape == (240, 292, 292)  # round(48*5), round(512*0.5703)
    np.testing.assert_allclose(grid_centre(iso), grid_centre(chest), atol=1e-6)
    # Same physical extent and the same tissue mix: mean HU within a few HU.
    assert abs(float(iso.array.mean()) - float(chest.array.mean())) < 5.0


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, -1, 1, 0, 0, 0, -1, 0)])
def test_resample_up_and_down_keeps_every_voxel_inside_the_source(direction):
    """A uniform image stays uniform: no output voxel falls outside the source and takes the fill value
    (before, upsampling 2.5 -> 1 mm put the last slice 1.5 mm beyond the source's last voxel centre)."""
    array = np.full((16, 24, 20), 40.0, np.float32)
    array[0, 0, 0] = -1000.0  # the fill value, the image minimum, must not appear elsewhere
    vol = Volume(array, (0.7, 0.9, 2.5), (-12.3, 45.6, -78.9), direction)
    for spacing in ((1.0, 1.0, 1.0), (0.3, 2.0, 3.3)):
        out = resample(vol, spacing)
        assert out.shape == tuple(int(round(n * old / new)) for n, old, new in
                                  zip(vol.shape, reversed(vol.spacing), reversed(spacing)))
        for far_end in (out.array[-1], out.array[:, -1], out.array[:, :, -1], out.array[0, 4:, 4:]):
            np.testing.assert_allclose(far_end, 40.0, atol=1e-3)
        np.testing.assert_allclose(grid_centre(out), grid_centre(vol), atol=1e-6)


def test_resample_mask_is_nearest_and_keeps_volume(chest):
    nodule = read_mask(CHEST_NODULE_NRRD, like=chest)
    iso = resample(nodule, (1.0, 1.0, 1.0), is_mask=True)
    assert iso.array.dtype == nodule.array.dtype and set(np.unique(iso.array)) == {0, 1}
    ml = lambda v: v.array.astype(bool).sum() * np.prod(v.spacing) / 1000  # noqa: E731
    assert ml(nodule) == pytest.approx(1.4, rel=0.1)  # MANIFEST.md
    assert ml(iso) == pytest.approx(ml(nodule), rel=0.15)


def test_resample_back_to_the_original_grid():
    limb = read_volume(LIMB_NII)
    back = resample_like(resample(limb, (2.0, 2.0, 2.0)), limb)
    assert back.same_grid(limb)
    # Down- and up-sampling blurs edges only: the median error stays small against a 2400 HU range.
    assert np.median(np.abs(back.array - limb.array)) < 15.0


def test_resample_refuses_bad_spacing(chest):
    with pytest.raises(InputError, match="positive"):
        resample(chest, (1.0, 0.0, 1.0))


@pytest.mark.parametrize("path, region", [
    (CHEST_NRRD, "chest"), (ABDOMEN_SMALL_NII, "abdomen"), (HEAD_TILTED_DICOM, "head_neck"), (LIMB_NII, "other"),
])
def test_guess_region_on_real_cases(path, region):
    guessed, reason = guess_region(read_volume(path))
    assert guessed == region
    assert "%" in reason  # the reason quotes the measured fractions


def test_guess_region_recognises_chest_crops_through_the_lung():
    """A crop inside the chest leaves the lung open to the image border, outside the body mask: the
    parenchyma fraction of the field of view decides."""
    pulmonary = read_volume(CT_DATA / "totalsegmentator" / "pulmonary_ct_cropped" / "ct_cropped.nii.gz")
    region, reason = guess_region(pulmonary)
    assert region == "chest" and "cropped field of view" in reason
    assert guess_region(read_volume(REPO / "Resources" / "SampleData" / "chest_ct_crop.nii.gz"))[0] == "chest"
    # A limb crop in air (air at -1000 HU, below the parenchyma range) stays "other".
    assert guess_region(read_volume(LIMB_NII))[0] == "other"
    # So does the denoising benchmark's chest block under simulated low dose: noise does not hide the lung.
    chest = axial_first(read_volume(CHEST_NRRD))
    lung = central_block(chest, 8, 256)
    region, reason = guess_region(simulate_low_dose(lung, 2.5e4, seed=0))
    assert region == "chest" and "lung texture" in reason
    # Nor do heavy noise or a smaller crop, with the lung's ends (both leave a core of 10 %, where 21-27 % is
    # parenchyma), or a smooth reconstruction kernel (less texture).
    depth = chest.shape[0]
    for block in (simulate_low_dose(central_block(chest, depth, 256), 1e4, seed=0), central_block(chest, depth, 192)):
        region, reason = guess_region(block)
        assert region == "chest" and "10% away from its edges" in reason, reason
    smooth = lung.with_array(ndimage.gaussian_filter(lung.array, (0, 2, 2)).astype(np.float32))
    assert guess_region(smooth)[0] == "chest"


@pytest.mark.parametrize("case", ["STS_002", "STS_008", "STS_010", "STS_025", "STS_028"])
def test_guess_region_calls_limbs_on_lung_dense_padding_limbs(case):
    """These limb crops are 18-31% voxels of lung density (padding, a cushion, the rims of air around the table)
    and the rim at the skin is air-like: that read as a chest crop (002, 008, 010, 025) or as a neck's airway (028).
    Smooth padding has no lung texture, and a rim is no airway; nor does low-dose noise give them either."""
    limb = read_volume(CT_DATA / "ibsi_sts" / case / "CT_image.nii.gz")
    region, reason = guess_region(limb)
    assert region == "other" and "no airway" in reason, reason
    assert guess_region(simulate_low_dose(central_block(axial_first(limb), 8), 2.5e4, seed=0))[0] == "other"


def _cylinder_phantom(lumen_hu=None, rim_hu=None):
    """A 12 cm wide soft-tissue cylinder in air on a 3 mm grid (a neck-sized cross-section, 113 cm^2), with an
    optional 18 mm central lumen and an optional one-voxel rim under the skin."""
    z, y, x = np.mgrid[:40, :60, :60]
    radius = np.hypot(y - 29.5, x - 29.5)
    hu = np.where(radius < 20, 40.0, -1000.0).astype(np.float32)
    if rim_hu is not None:
        hu[(radius >= 19) & (radius < 20)] = rim_hu
    if lumen_hu is not None:
        hu[radius < 3] = lumen_hu
    return Volume(hu, (3.0, 3.0, 3.0))


def test_guess_region_needs_air_in_a_small_cross_section_for_a_neck():
    region, reason = guess_region(_cylinder_phantom(lumen_hu=-1000.0))
    assert region == "head_neck" and "airway" in reason
    # A partial-volume rim at the skin (-400 HU: fat-air, inside the body mask) is no airway; neither is fat.
    assert guess_region(_cylinder_phantom(rim_hu=-400.0))[0] == "other"
    assert guess_region(_cylinder_phantom(lumen_hu=-100.0))[0] == "other"


def test_guess_region_is_independent_of_array_orientation_and_sees_whole_body():
    abdomen = read_volume(ABDOMEN_SMALL_NII)
    # The same scan stored as a sagittal stack (axes permuted, geometry adjusted) is still abdomen.
    sagittal = Volume.from_sitk(sitk.DICOMOrient(abdomen.to_sitk(), "ASL"))
    assert sagittal.shape != abdomen.shape
    assert guess_region(sagittal)[0] == "abdomen"
    # Four copies of a 34 cm chest-abdomen-pelvis scan stacked head to foot: 1.3 m of body.
    trunk = read_volume(ABDOMEN_NII)
    long_body = Volume(np.concatenate([trunk.array] * 4, axis=0), trunk.spacing, trunk.origin, trunk.direction)
    region, reason = guess_region(long_body)
    assert region == "other" and "whole body" in reason


def test_a_crop_without_body_warns_that_its_region_is_a_default(caplog):
    """`other` is then a fallback, not a finding: the task says so as a warning, and how to set the region."""
    import logging

    from MedDiffFMLib.config import preset
    from MedDiffFMLib.preprocess import REGION_UNKNOWN
    from MedDiffFMLib.tasks.common import resolve_region

    air = np.full((20, 40, 40), -1000.0, np.float32)
    air[10, 20, 20] = 40.0  # one voxel of tissue is no body
    volume = Volume(air, (1.0, 1.0, 1.0))
    assert guess_region(volume) == ("other", REGION_UNKNOWN)
    with caplog.at_level(logging.INFO):
        assert resolve_region(volume, None, preset("tiny")) == "other"
    assert [r.levelname for r in caplog.records if "body region other guessed" in r.message] == ["WARNING"]
    assert "set it yourself (--region)" in caplog.text
