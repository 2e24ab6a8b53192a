"""Patient axis order: tasks and the threshold anatomy give the same answer however a CT's axes are stored."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ABDOMEN_SMALL_NII, CHEST_NRRD
from MedDiffFMLib.anatomy import threshold_anatomy
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.io import Volume, read_volume
from MedDiffFMLib.orientation import AxisOrder
from MedDiffFMLib.tasks import common
from MedDiffFMLib.tasks.denoise import denoise
from MedDiffFMLib.tasks.super_resolution import super_resolve

_TURN = math.radians(25)
DIRECTIONS = {
    "reversed x, y (RAS storage)": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "sagittal first": (0, 0, 1, 1, 0, 0, 0, -1, 0),
    "coronal, left-handed": (1, 0, 0, 0, 0, 1, 0, 1, 0),
    "oblique 25 degrees": (math.cos(_TURN), -math.sin(_TURN), 0, math.sin(_TURN), math.cos(_TURN), 0, 0, 0, 1),
}
DIRECTIONS["oblique sagittal"] = tuple((np.reshape(DIRECTIONS["oblique 25 degrees"], (3, 3))
                                       @ np.reshape(DIRECTIONS["sagittal first"], (3, 3))).ravel())


def stored_as(vol: Volume, permutation, flips) -> Volume:
    """The same image stored with its ITK axes permuted and reversed (SimpleITK moves the geometry)."""
    image = sitk.Flip(sitk.PermuteAxes(vol.to_sitk(), permutation), flips)
    return Volume.from_sitk(image, dtype=vol.array.dtype)


def stored_back(vol: Volume, permutation, flips) -> Volume:
    """The inverse of `stored_as` with the same arguments."""
    inverse = [int(a) for a in np.argsort(permutation)]
    return Volume.from_sitk(sitk.PermuteAxes(sitk.Flip(vol.to_sitk(), flips), inverse), dtype=vol.array.dtype)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_axis_order_agrees_with_dicom_orient_and_inverts_exactly(direction):
    array = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    vol = Volume(array, (0.7, 0.9, 2.5), (-12.3, 45.6, -78.9), direction)
    order = AxisOrder.of(direction)
    patient = order.volume(vol)
    reference = Volume.from_sitk(sitk.DICOMOrient(vol.to_sitk(), "LPS"))
    np.testing.assert_array_equal(patient.array, reference.array)
    assert patient.same_grid(reference), patient.grid_differences(reference)
    assert AxisOrder.of(patient.direction).identity
    back = order.inverse().volume(patient)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.same_grid(vol, 1e-9)


def test_threshold_anatomy_does_not_depend_on_storage_order():
    """Before, a sagittal-first copy of the chest CT lost most of its lung: the body mask filled holes per
    slice of array axis 0 whatever that axis was."""
    # Ten whole 512 x 512 slices: the body must be closed in-plane for the lungs to be filled in.
    chest = Volume.from_sitk(sitk.RegionOfInterest(read_volume(CHEST_NRRD).to_sitk(), (512, 512, 10), (0, 0, 20)))
    labels = threshold_anatomy(chest)
    assert np.count_nonzero(labels == 1) > 0.1 * np.count_nonzero(labels)  # the lungs are there
    for permutation, flips in (((2, 0, 1), (False, True, False)), ((1, 2, 0), (True, False, True))):
        stored = stored_as(chest, permutation, flips)
        back = stored_back(stored.with_array(threshold_anatomy(stored)), permutation, flips)
        assert back.same_grid(chest)
        np.testing.assert_array_equal(back.array, labels)


def test_denoise_runs_in_patient_axes_and_returns_the_callers_grid():
    """The bundled abdomen example is stored with x and y reversed (as NIfTI from RAS tools often is). Denoising
    it, its LPS copy or a sagittal-first copy gives one result, each on its input's own grid."""
    model = common.load_task_model("tiny", "cpu")
    ct = Volume.from_sitk(sitk.RegionOfInterest(read_volume(ABDOMEN_SMALL_NII).to_sitk(), (32, 32, 20), (45, 0, 5)))
    assert not AxisOrder.of(ct.direction).identity
    lps = Volume.from_sitk(sitk.DICOMOrient(ct.to_sitk(), "LPS"))
    sagittal = stored_as(lps, (2, 0, 1), (False, False, True))
    settings = dict(nfe=2, noise_level=20.0, region="abdomen", window_batch=8, seed=3)
    reference = denoise(lps, model, **settings).denoised
    for stored in (ct, sagittal):
        result = denoise(stored, model, **settings)
        assert result.denoised.same_grid(stored, 0.0) and result.denoised.array.dtype == np.float32
        again = Volume.from_sitk(sitk.DICOMOrient(result.denoised.to_sitk(), "LPS"))
        np.testing.assert_allclose(again.array, reference.array, atol=1e-3)
    assert np.abs(reference.array - lps.array).max() > 1.0  # it did denoise


def test_super_resolution_refuses_thick_sagittal_slices_but_not_stored_axial_ones(tiny_base):
    """It refines patient axis z: thick sagittal slices are refused; thick axial slices stored sagittal-first are
    not (they fail later only because `tiny_base` is not a super-resolution model)."""
    array = read_volume(ABDOMEN_SMALL_NII).array[:8]
    with pytest.raises(InputError, match="sagittal or coronal"):
        super_resolve(Volume(array, (4.0, 0.8, 0.8)), tiny_base, factor=4)
    axial_stored_sagittal = stored_as(Volume(array, (0.8, 0.8, 4.0)), (2, 0, 1), (False, False, False))
    assert axial_stored_sagittal.spacing[0] == 4.0
    with pytest.raises(InputError, match="fine-tuned for super-resolution"):
        super_resolve(axial_stored_sagittal, tiny_base, factor=4)


def test_preview_shows_patient_views_however_the_ct_is_stored(tmp_path):
    from MedDiffFMLib.io import write_preview

    ct = Volume.from_sitk(sitk.RegionOfInterest(read_volume(ABDOMEN_SMALL_NII).to_sitk(), (60, 50, 20), (30, 20, 5)))
    lps = Volume.from_sitk(sitk.DICOMOrient(ct.to_sitk(), "LPS"))
    pngs = []
    for name, vol in (("lps", lps), ("ras", ct), ("sagittal", stored_as(lps, (2, 0, 1), (True, False, False)))):
        labels = threshold_anatomy(vol)
        pngs.append(write_preview(vol, tmp_path / f"{name}.png", (-160, 240), labels=labels).read_bytes())
    assert pngs[0] == pngs[1] == pngs[2]


def test_masks_and_label_arrays_follow_the_ct_and_bad_grids_are_described_in_the_callers_frame():
    """Keyword arguments, a mask on the CT's grid, anatomy labels as a plain array: all reordered with the CT. A mask
    whose only fault is its origin is refused as such, not with the sizes of the reordered CT."""
    model = common.load_task_model("tiny", "cpu")
    lps = Volume.from_sitk(sitk.RegionOfInterest(read_volume(ABDOMEN_SMALL_NII).to_sitk(), (32, 32, 20), (45, 0, 5)))
    lps = Volume.from_sitk(sitk.DICOMOrient(lps.to_sitk(), "LPS"))
    sagittal = stored_as(lps, (2, 0, 1), (False, True, False))
    box = np.zeros(lps.shape, np.uint8)
    box[6:14, 8:24, 8:24] = 1
    labels = threshold_anatomy(lps)
    settings = dict(nfe=1, noise_level=20.0, region="abdomen", window_batch=8)
    reference = denoise(lps, model, mask=lps.with_array(box), anatomy_labels=labels, **settings).denoised
    stored_box = stored_as(lps.with_array(box), (2, 0, 1), (False, True, False))
    result = denoise(volume=sagittal, model=model, mask=stored_box, anatomy_labels=threshold_anatomy(sagittal),
                     **settings).denoised
    assert result.same_grid(sagittal, 0.0)
    np.testing.assert_allclose(stored_back(result, (2, 0, 1), (False, True, False)).array, reference.array,
                               atol=1e-3)
    shifted = Volume(stored_box.array, stored_box.spacing, tuple(o + 5.0 for o in stored_box.origin),
                     stored_box.direction)
    with pytest.raises(InputError, match=r"mask is not on the grid of the image: origin \(x,y,z\) mm") as refused:
        denoise(sagittal, model, mask=shifted, **settings)
    assert "size" not in str(refused.value) and "spacing" not in str(refused.value)


def test_super_resolution_does_not_refuse_a_thin_axial_ct_for_its_axes(tiny_base):
    array = read_volume(ABDOMEN_SMALL_NII).array[:8]
    with pytest.raises(InputError, match="fine-tuned for super-resolution"):
        super_resolve(Volume(array, (0.78, 0.78, 0.625)), tiny_base, factor=4)


def test_evaluation_cuts_axial_cases_from_a_ct_stored_sagittal_first(tmp_path):
    from MedDiffFMLib.evaluate import load_cases
    from MedDiffFMLib.io import write_volume

    lps = Volume.from_sitk(sitk.RegionOfInterest(read_volume(CHEST_NRRD).to_sitk(), (96, 80, 24), (200, 200, 12)))
    write_volume(lps, tmp_path / "a" / "ct.nii.gz")
    write_volume(stored_as(lps, (2, 0, 1), (False, False, False)), tmp_path / "b" / "ct.nii.gz")
    (axial,), (sagittal,) = (load_cases([tmp_path / d / "ct.nii.gz"], 4, context=2) for d in "ab")
    np.testing.assert_array_equal(sagittal.volume.array, axial.volume.array)
    assert sagittal.volume.shape == (8, 80, 96)


def test_anomaly_evaluation_scores_axial_slices_of_files_stored_coronal_first(tmp_path, chest_nodule_crop):
    """The image-level AUROC and the slice counts are over axial slices, as the report says, whatever the storage."""
    from MedDiffFMLib.cli import main
    from MedDiffFMLib.io import write_volume

    ct, nodule = chest_nodule_crop
    scores = nodule.with_array((nodule.array > 0) + np.random.default_rng(0).normal(0, 0.6, nodule.shape))
    tables = []
    for folder, store in (("axial", lambda v: v), ("coronal", lambda v: stored_as(v, (0, 2, 1), (False,) * 3))):
        paths = [write_volume(store(v), tmp_path / folder / f"{name}.nii.gz")
                 for v, name in ((scores, "s"), (nodule, "m"), (ct, "ct"))]
        assert main(["evaluate", "anomaly", "--scores", str(paths[0]), "--masks", str(paths[1]),
                     "--images", str(paths[2]), "--out", str(tmp_path / folder / "out")]) == 0
        tables.append((tmp_path / folder / "out" / "anomaly_results.csv").read_text())
    assert read_volume(tmp_path / "coronal" / "s.nii.gz").shape != scores.shape  # really stored otherwise
    assert tables[0] == tables[1]
    assert f",{int(nodule.array.any(axis=(1, 2)).sum())}," in tables[0]  # the nodule's axial slices


def test_anomaly_evaluation_turns_the_mask_as_the_scores_on_a_grid_near_a_tie(tmp_path, chest_nodule_crop):
    """At 45 degrees in-plane the patient axis order is a tie: a mask whose direction differs within the grid
    tolerance must still be turned as the scores are, or the two no longer overlap."""
    from MedDiffFMLib.cli import main
    from MedDiffFMLib.io import write_volume

    ct, nodule = chest_nodule_crop
    scores = (nodule.array > 0) + np.random.default_rng(0).normal(0, 0.6, nodule.shape)
    paths = {}
    for name, array, angle in (("s", scores, math.pi / 4), ("m", nodule.array, math.pi / 4 + 3e-4)):
        turn = (math.cos(angle), -math.sin(angle), 0, math.sin(angle), math.cos(angle), 0, 0, 0, 1)
        paths[name] = write_volume(Volume(array, nodule.spacing, nodule.origin, turn), tmp_path / f"{name}.nii.gz")
    assert AxisOrder.of(read_volume(paths["s"]).direction) != AxisOrder.of(read_volume(paths["m"]).direction)
    assert main(["evaluate", "anomaly", "--scores", str(paths["s"]), "--masks", str(paths["m"]),
                 "--out", str(tmp_path / "out")]) == 0
    row = (tmp_path / "out" / "anomaly_results.csv").read_text().splitlines()[1].split(",")
    assert float(row[1]) > 0.8  # pixel AUROC of these scores on their own mask (0.5 with the mask turned)


def test_preprocess_spacing_is_in_patient_axes_however_the_file_stores_them(tmp_path, capsys, caplog):
    """Before, `--spacing 2 2 5` went to the file's own axes: a sagittal-first series got 5 mm right-left."""
    from MedDiffFMLib.cli import main

    crop = Volume.from_sitk(sitk.ReadImage(str(CHEST_NRRD))[200:264, 330:394, 24:40], dtype="float32")
    sagittal = stored_as(crop, (2, 0, 1), (False, False, True))
    spacings = {}
    for name, vol in (("axial", crop), ("sagittal", sagittal)):
        sitk.WriteImage(vol.to_sitk(), str(tmp_path / f"{name}.nrrd"))
        out = tmp_path / f"{name}_2x2x5.nii.gz"
        assert main(["preprocess", str(tmp_path / f"{name}.nrrd"), "-o", str(out), "--spacing", "2", "2", "5",
                     "--region", "chest"]) == 0
        written = read_volume(out)
        spacings[name] = AxisOrder.of(written.direction).spacing(written.spacing)
        assert AxisOrder.of(written.direction) == AxisOrder.of(vol.direction)  # stored as its input
    assert spacings == {"axial": (2.0, 2.0, 5.0), "sagittal": (2.0, 2.0, 5.0)}
    # The input's spacing is named in patient axes too, for both.
    named = "voxel spacing (0.5703, 0.5703, 5) mm (right-left, front-back, head-foot) is anisotropic"
    assert caplog.text.count(named) == 2
    assert read_volume(tmp_path / "sagittal_2x2x5.nii.gz").spacing == (5.0, 2.0, 2.0)  # the file's own axes
    # The voxel counts a refusal names are in the same patient order.
    assert main(["preprocess", str(tmp_path / "sagittal.nrrd"), "-o", str(tmp_path / "coarse.nii.gz"), "--spacing",
                 "1", "1", "40", "--region", "chest"]) == 2
    assert "--spacing 1 1 40 mm leaves a grid of 36 x 36 x 2 voxels (x y z)" in capsys.readouterr().err
