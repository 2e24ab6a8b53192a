"""CT and mask I/O on the real cases: geometry round trips, DICOM series choice, atomic safe writing."""
from __future__ import annotations

import locale
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import (ABDOMEN_DICOM, ABDOMEN_SMALL_NII, CHEST_NODULE_NRRD, CHEST_NRRD, HEAD_TILTED_DICOM, LIMB_MASK_NII,
                      LIMB_NII, THREE_SLICE_DICOM, oblique_dicom_series)
from MedDiffFMLib.errors import CheckpointError, InputError
from MedDiffFMLib.io import Volume, atomic_path, check_output_suffix, read_mask, read_volume, write_volume


def assert_same_volume(a: Volume, b: Volume, atol: float = 1e-5):
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)
    np.testing.assert_array_equal(a.array, b.array)


@pytest.mark.parametrize("source, suffix", [
    (ABDOMEN_SMALL_NII, ".nrrd"), (LIMB_NII, ".nii.gz"), (LIMB_NII, ".mha"),
    (HEAD_TILTED_DICOM, ".nii.gz"),
])
def test_geometry_round_trip_on_real_cases(source, suffix, tmp_path):
    original = read_volume(source)
    # NIfTI keeps geometry in float32: allow its rounding, nothing more.
    atol = 1e-6 if suffix in (".nrrd", ".mha") else 1e-4
    first = read_volume(write_volume(original, tmp_path / f"a{suffix}"))
    assert_same_volume(original, first, atol=atol)
    second = read_volume(write_volume(first, tmp_path / f"b{suffix}"))
    assert_same_volume(first, second, atol=1e-6)


def test_read_volume_matches_manifest_and_simpleitk():
    vol = read_volume(CHEST_NRRD)
    assert vol.shape == (48, 512, 512) and vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, (0.5703125, 0.5703125, 5.0))
    assert vol.spacing_zyx == (5.0, 0.5703125, 0.5703125)
    assert (vol.array.min(), vol.array.max()) == (-1024.0, 3071.0)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST_NRRD))))


def test_gantry_tilted_head_series_with_uneven_slices_loads_with_warnings(caplog):
    """Its 28 slices lie 4 mm, then 7 mm apart (one 1.08 mm gap between), tilted by 18.5 deg: read with one spacing
    and no shear, slices were up to 26 mm (along the stack) and 48 mm (in-plane) from where they were scanned. It is
    resampled onto an orthogonal grid of even slices at the finest repeated gap (4 mm: 4.0025 fits the span)."""
    vol = read_volume(HEAD_TILTED_DICOM)
    assert vol.shape == (37, 512, 512)
    np.testing.assert_allclose(vol.spacing, (0.4882812, 0.4882812, 4.0025), atol=1e-4)
    axes = np.asarray(vol.direction).reshape(3, 3)
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-6)
    assert -1500.0 <= vol.array.min() and vol.array.max() <= 2121.0
    assert "slices offset in-plane by up to 48.2 mm" in caplog.text
    assert "resampled onto 37 even slices of 4.00 mm" in caplog.text


def dicom_series(folder, z_mm, hu, series_uid=None, names=None):
    """Slices of the real abdomen series moved to positions `z_mm` along their axis, each filled with one HU value."""
    from pydicom import dcmread

    sources = sorted(ABDOMEN_DICOM.iterdir())
    folder.mkdir(exist_ok=True)
    for index, (z, value) in enumerate(zip(z_mm, hu)):
        ds = dcmread(sources[index])
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], float(z)]
        stored = (value - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        ds.PixelData = np.full((ds.Rows, ds.Columns), stored, dtype=ds.pixel_array.dtype).tobytes()
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        ds.save_as(folder / (names[index] if names else f"slice{index:02d}.dcm"))
    return folder


def test_uneven_slices_are_resampled_to_where_they_were_scanned(tmp_path, caplog):
    """Each slice holds 10 HU per mm of its position: on the even grid every slice must read 10 x its own z."""
    z = [0.0, 3.0, 6.0, 12.0, 15.0, 21.0]  # mixed gaps of 3 and 6 mm (e.g. a slice missing)
    vol = read_volume(dicom_series(tmp_path / "uneven", z, [10 * v for v in z]))
    assert vol.shape[0] == 8 and vol.spacing[2] == pytest.approx(3.0)
    axis = np.asarray(vol.direction).reshape(3, 3)[:, 2]
    slice_z = vol.origin[2] + np.arange(8) * vol.spacing[2] * axis[2]
    np.testing.assert_allclose(vol.array[:, 100, 100], 10 * slice_z, atol=1e-3)
    assert "resampled onto 8 even slices of 3.00 mm" in caplog.text
    even = read_volume(dicom_series(tmp_path / "even", [0.0, 3.0, 6.0, 9.0], [0.0, 30.0, 60.0, 90.0]))
    assert even.shape[0] == 4 and even.spacing[2] == pytest.approx(3.0)  # an even series is read as it is
    caplog.clear()  # positions rounded to 0.01 mm (0.62 and 0.63 mm gaps for 0.625 mm slices) are even too
    rounded = read_volume(dicom_series(tmp_path / "rounded", [0.0, 0.62, 1.25, 1.88, 2.5], [0.0] * 5))
    assert rounded.shape[0] == 5 and "uneven" not in caplog.text
    caplog.clear()  # 4 mm slices, then 7 mm, then 4 mm again, with a short gap at each change: about 4 mm slices
    z = np.cumsum([0.0, 4, 4, 4, 4, 1.1, 7, 7, 7, 7, 1.1, 4, 4, 4, 4])
    changes = read_volume(dicom_series(tmp_path / "changes", z, [10 * v for v in z]))
    assert changes.shape[0] == 17 and 3.8 < changes.spacing[2] < 4.2  # not 58 slices of 1.09 mm
    # Positions with float32 noise and one slice missing: the grid keeps the 5 mm slices where they were scanned
    # (the noise used to add a slice, and every slice became a blend of two).
    z = np.float32(-175.3) + np.float32(5.0) * np.delete(np.arange(12), 6).astype(np.float32)
    hu = [100.0 * (k % 2) for k in np.delete(np.arange(12), 6)]
    missing = read_volume(dicom_series(tmp_path / "missing", [float(v) for v in z], hu))
    assert missing.shape[0] == 12 and missing.spacing[2] == pytest.approx(5.0, abs=1e-3)
    np.testing.assert_allclose(np.delete(missing.array[:, 100, 100], 6), hu, atol=1e-3)  # scanned slices kept
    with pytest.raises(InputError, match="lie within 2% of the typical 3.00 mm gap of each other"):
        read_volume(dicom_series(tmp_path / "near", [0.0, 3.0, 3.01, 6.0, 9.0], [0.0] * 5))  # 0.01 mm apart
    # Thin slices stored to two decimals (gaps of 0.62 and 0.63 mm) are one group, a fifth of the gaps or more: kept.
    z = [0.0, 5.0, 10.0, 15.0, 20.0] + [round(20.0 + 0.625 * k, 2) for k in range(1, 8)]
    thin = read_volume(dicom_series(tmp_path / "thin", z, [10 * v for v in z]))
    assert thin.spacing[2] == pytest.approx(0.625, abs=0.01)
    # A short gap where the thickness changes (0.45 mm here) is no repeated slice.
    z = [0.0, 5.0, 10.0, 15.0, 15.45, 17.95, 20.45, 22.95]
    read_volume(dicom_series(tmp_path / "change", z, [10 * v for v in z]))


@pytest.mark.parametrize("tilt_deg, z_mm, y_shift", [(20.0, [0.0, 3.0, 6.0, 9.0, 12.0], 0.0),
                                                      (-15.0, [0.0, 2.0, 4.0, 8.0, 10.0], 0.0),
                                                      (0.0, [0.0, 3.0, 6.0, 9.0, 12.0], 0.5)])
def test_a_tilted_series_is_read_onto_an_orthogonal_grid_where_it_was_scanned(tmp_path, caplog, tilt_deg, z_mm,
                                                                               y_shift):
    """Gantry tilt: slices in tilted planes stacked along z, or axial slices whose positions move in y (y_shift mm
    per mm of z): the stack is sheared. Every pixel holds the sum of its world y and z (mm); on the grid read, every
    voxel that a slice covers must hold its own world y + z."""
    from pydicom import dcmread

    source = dcmread(sorted(ABDOMEN_DICOM.iterdir())[0])
    angle = np.deg2rad(tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(angle), np.sin(angle)])
    spacing = 2.0
    folder = tmp_path / "tilted"
    folder.mkdir()
    for index, z in enumerate(z_mm):
        ds = dcmread(sorted(ABDOMEN_DICOM.iterdir())[index])
        corner = np.array([-40.0, -30.0 + y_shift * z, z])
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = [float(v) for v in corner]
        ds.Rows = ds.Columns = 40
        ds.PixelSpacing = [spacing, spacing]
        j, i = np.mgrid[0:40, 0:40]  # j: row index (along col), i: column index (along row)
        world = corner + i[..., None] * spacing * row + j[..., None] * spacing * col
        hu = np.round(world[..., 1] + world[..., 2])
        ds.PixelData = ((hu - float(source.RescaleIntercept)) / float(source.RescaleSlope)).astype(np.int16).tobytes()
        ds.save_as(folder / f"s{index}.dcm")
    vol = read_volume(folder)
    assert "is sheared (gantry tilt" in caplog.text
    axes = np.asarray(vol.direction).reshape(3, 3)
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-6)  # an orthogonal grid
    k, j, i = np.mgrid[0:vol.shape[0], 0:vol.shape[1], 0:vol.shape[2]]
    world = np.asarray(vol.origin) + np.stack([i, j, k], -1) * np.asarray(vol.spacing) @ axes.T
    from scipy import ndimage

    # Voxels outside every scanned slice hold the lowest value; those beside them blend the two.
    covered = ndimage.binary_erosion(vol.array > vol.array.min(), iterations=1)
    assert covered.mean() > 0.5
    np.testing.assert_allclose(vol.array[covered], (world[..., 1] + world[..., 2])[covered], atol=0.6)


def test_a_series_whose_orientation_turns_midway_is_refused(tmp_path):
    from pydicom import dcmread

    folder = dicom_series(tmp_path / "turned", [0.0, 3.0, 6.0, 9.0], [0.0] * 4)
    ds = dcmread(folder / "slice03.dcm")
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9848, 0.1736]  # 10 deg of tilt on the last slice
    ds.save_as(folder / "slice03.dcm")
    with pytest.raises(InputError, match="are not all oriented alike \\(e.g. slice03.dcm differs from slice00.dcm"):
        read_volume(folder)


def test_an_oblique_series_with_positions_rounded_to_a_hundredth_is_read_as_it_is(tmp_path, caplog):
    """Positions stored to 0.01 mm along an oblique slice axis wobble in-plane by that much: that is no gantry tilt
    (it was taken for one, and every slice resampled)."""
    from pydicom import dcmread

    row = np.array([0.9659258, 0.258819, 0.0])
    col = np.array([-0.2511, 0.9372, -0.2419])
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    folder = tmp_path / "oblique"
    folder.mkdir()
    for index in range(12):
        ds = dcmread(sorted(ABDOMEN_DICOM.iterdir())[index])
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
        ds.ImagePositionPatient = [round(float(v), 2) for v in np.array([-120.0, -90.0, 30.0]) + index * 0.625 * normal]
        ds.PixelSpacing = [0.48828, 0.48828]
        ds.save_as(folder / f"s{index:02d}.dcm")
    vol = read_volume(folder)
    assert vol.shape[0] == 12 and "sheared" not in caplog.text and "uneven" not in caplog.text
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(sitk.ReadImage(
        sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))).astype(np.float32))


def test_series_with_shared_positions_or_two_equal_series_are_refused(tmp_path, caplog):
    twice = dicom_series(tmp_path / "twice", [0.0, 3.0, 6.0, 9.0], [0.0] * 4)
    dicom_series(twice, [3.0, 6.0], [50.0] * 2, names=["again0.dcm", "again1.dcm"],
                 series_uid=str(next(iter({read_uid(f) for f in twice.iterdir()}))))
    with pytest.raises(InputError, match="share positions .* or are out of order, e.g. at .* repeated or overlapping"):
        read_volume(twice)
    tie = dicom_series(tmp_path / "tie", [0.0, 3.0, 6.0], [0.0] * 3)
    dicom_series(tie, [0.0, 3.0, 6.0], [0.0] * 3, series_uid="1.2.3.4", names=["b0.dcm", "b1.dcm", "b2.dcm"])
    with pytest.raises(InputError, match="holds 2 DICOM series of 3 files each: .*Give one file of the series"):
        read_volume(tie)
    assert read_volume(tie / "b1.dcm").shape[0] == 3  # one file chooses its series


def read_uid(path):
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def non_image_object(path, sop_class="1.2.840.10008.5.1.4.1.1.88.33", modality="SR"):
    """A minimal DICOM object without an image (by default a report, Comprehensive SR Storage): what a study folder
    may hold beside its slices."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.SeriesInstanceUID = modality, generate_uid()
    dataset.save_as(path, enforce_file_format=True)


def test_a_damaged_slice_file_is_named(tmp_path, caplog):
    folder = dicom_series(tmp_path / "cut", [0.0, 3.0, 6.0, 9.0], [0.0] * 4)
    data = (folder / "slice03.dcm").read_bytes()
    (folder / "slice03.dcm").write_bytes(data[:len(data) // 3])
    non_image_object(folder / "report.dcm")  # no image, so no loss: not named
    assert read_volume(folder).shape[0] == 3
    assert "1 DICOM file(s) in" in caplog.text and "could not be read and were left out" in caplog.text
    assert "slice03.dcm" in caplog.text and "report.dcm" not in caplog.text
    # `info` lists the reader's warnings in its report; when reading then fails, they are still shown.
    from MedDiffFMLib.cli import main

    dicom_series(folder, [3.0], [0.0], series_uid=read_uid(folder / "slice00.dcm"), names=["again.dcm"])
    caplog.clear()
    assert main(["info", str(folder)]) == 2
    assert "slice03.dcm" in caplog.text


def test_a_series_mixing_image_sizes_is_refused_by_name(tmp_path):
    from pydicom import dcmread

    folder = dicom_series(tmp_path / "mixed", [0.0, 3.0, 6.0, 9.0], [0.0] * 4)
    ds = dcmread(folder / "slice03.dcm")
    ds.Rows, ds.Columns = 64, 48
    ds.PixelData = np.zeros((64, 48), dtype=np.int16).tobytes()
    ds.save_as(folder / "slice03.dcm")
    with pytest.raises(InputError, match=r"differ in size \(512x512 in 3 file\(s\) .*; 64x48 in 1 file\(s\) "
                                         r"\(slice03.dcm\)\): the series mixes images"):
        read_volume(folder)


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path):
    for source in (HEAD_TILTED_DICOM, THREE_SLICE_DICOM):
        for f in source.iterdir():
            shutil.copy(f, tmp_path / f"{source.parent.name}_{f.name}")
    assert read_volume(tmp_path).shape == (37, 512, 512)  # the 28-file head series, on even slices
    # One file of a series reads that whole series, even when it is the smaller one.
    one_file = sorted(tmp_path.glob("dcmqi*"))[0]
    assert read_volume(one_file).shape == (3, 512, 512)


def test_dicom_seg_given_as_the_ct_is_named_as_such(tmp_path):
    seg = THREE_SLICE_DICOM.parent / "liver.dcm"  # a real DICOM SEG (dcmqi's example), which GDCM reads as 4D
    shutil.copy(seg, tmp_path / seg.name)
    for given in (seg, tmp_path):  # the file itself, and a folder that holds only it
        with pytest.raises(InputError, match=r"liver.dcm is a segmentation \(DICOM SEG\), not a CT image"):
            read_volume(given)


def test_a_dicom_object_without_pixels_given_as_the_ct_is_named_as_such(tmp_path):
    """An RTSTRUCT has no image for GDCM to read at all (before: a traceback, or 'no DICOM series')."""
    non_image_object(tmp_path / "contours.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")  # RT Structure Set
    for given in (tmp_path / "contours.dcm", tmp_path):
        with pytest.raises(InputError, match=r"contours.dcm is a structure set \(RTSTRUCT\), not a CT image"):
            read_volume(given)


@pytest.fixture
def jpeg2000_series(tmp_path):
    """The real 3-slice CT series re-encoded as lossless JPEG 2000."""
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless

    for f in sorted(THREE_SLICE_DICOM.iterdir()):
        ds = dcmread(f)
        ds.compress(JPEG2000Lossless)
        ds.save_as(tmp_path / f.name)
    assert dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID == JPEG2000Lossless
    return tmp_path


def test_jpeg2000_dicom_series_decodes_to_the_same_hu(jpeg2000_series):
    assert_same_volume(read_volume(jpeg2000_series), read_volume(THREE_SLICE_DICOM), atol=1e-4)


def test_pydicom_fallback_when_simpleitk_cannot_decode(jpeg2000_series, monkeypatch):
    expected = read_volume(THREE_SLICE_DICOM)

    def no_decoder(self):
        raise RuntimeError("GDCM: unsupported transfer syntax")

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", no_decoder)
    assert_same_volume(read_volume(jpeg2000_series), expected, atol=1e-4)
    # Without a pydicom decoder plugin either, the message names the packages to install.
    from pydicom.dataset import Dataset

    def no_plugin(self):
        raise RuntimeError("unable to decode the pixel data: no decoding plugins are installed")

    monkeypatch.setattr(Dataset, "pixel_array", property(no_plugin))
    with pytest.raises(InputError, match="pylibjpeg-openjpeg"):
        read_volume(jpeg2000_series)


def test_folder_without_dicom_and_unreadable_file_are_input_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match="cannot read"):
        read_volume(broken)
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "missing.nrrd")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkFloat32], ids=["int16", "float32"])
def test_truncated_or_corrupt_nifti_is_refused(suffix, pixel, tmp_path):
    """ITK fills the voxels missing from a cut NIfTI with 0 without a word; such files must be refused."""
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(ABDOMEN_SMALL_NII)), pixel), str(whole))
    data = whole.read_bytes()
    damaged = tmp_path / f"damaged{suffix}"
    for size in (len(data) // 2, len(data) - 1, 200):  # half, one byte short, inside the header
        damaged.write_bytes(data[:size])
        with pytest.raises(InputError, match=r"damaged\.nii.* is truncated or corrupt"):
            read_volume(damaged)
    if suffix == ".nii.gz":  # a changed byte keeps the size: only the gzip CRC can tell (.nii has none)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(InputError, match="truncated or corrupt"):
            read_volume(damaged)


def test_truncated_nifti_mask_is_refused(tmp_path):
    cut = tmp_path / "mask.nii.gz"
    cut.write_bytes(LIMB_MASK_NII.read_bytes()[:-8])  # without the gzip trailer (CRC and length)
    with pytest.raises(InputError, match="mask.nii.gz: the NIfTI file is truncated or corrupt"):
        read_mask(cut, like=read_volume(LIMB_NII))


def test_read_mask_on_the_image_grid():
    image = read_volume(LIMB_NII)
    mask = read_mask(LIMB_MASK_NII, like=image)
    assert mask.array.dtype == np.uint8 and set(np.unique(mask.array)) == {0, 1}
    gtv_ml = mask.array.sum() * np.prod(mask.spacing) / 1000
    assert gtv_ml == pytest.approx(365.3, rel=0.01)  # MANIFEST.md


def test_a_mask_read_for_a_one_slice_image_names_the_image_first():
    """The 2D image is what to fix; its mask cannot be on a 3D grid that the image does not have."""
    limb = read_volume(LIMB_NII)
    one_slice = Volume(limb.array[:1], limb.spacing, limb.origin, limb.direction)
    with pytest.raises(InputError, match="the image is 2D"):
        read_mask(LIMB_MASK_NII, like=one_slice)  # the mask's 3D grid does not match it either


def test_read_mask_refuses_other_grid_and_fractions(tmp_path):
    with pytest.raises(InputError, match="not on the grid.*size"):
        read_mask(CHEST_NODULE_NRRD, like=read_volume(LIMB_NII))
    limb = read_volume(LIMB_NII)
    shifted = read_mask(LIMB_MASK_NII, like=limb)
    shifted.origin = (shifted.origin[0] + 2.0,) + shifted.origin[1:]
    write_volume(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(InputError, match="origin"):
        read_mask(tmp_path / "shifted.nii.gz", like=limb)
    fractional = limb.with_array(np.full(limb.shape, 0.5, np.float32))
    write_volume(fractional, tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        read_mask(tmp_path / "soft.nii.gz", like=limb)


def test_write_volume_refuses_existing_and_input_paths(tmp_path):
    vol = read_volume(LIMB_NII)
    out = write_volume(vol, tmp_path / "out.nrrd")
    before = out.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_volume(vol.with_array(vol.array + 1), out)
    assert out.read_bytes() == before
    write_volume(vol.with_array(vol.array + 1), out, overwrite=True)
    assert read_volume(out).array[0, 0, 0] == vol.array[0, 0, 0] + 1
    with pytest.raises(InputError, match="is an input"):
        write_volume(vol, out, overwrite=True, inputs=[out])
    with pytest.raises(InputError, match="inside the input folder"):
        write_volume(vol, HEAD_TILTED_DICOM / "x.nii.gz", inputs=[HEAD_TILTED_DICOM])


@pytest.mark.parametrize("name", ["out.mhd", "out.nhdr"])
def test_two_file_formats_are_read_but_not_written(name, tmp_path):
    """A .mhd/.nhdr header names a separate data file, which the atomic rename would leave behind."""
    vol = read_volume(ABDOMEN_SMALL_NII)
    with pytest.raises(InputError, match=r"\.nrrd or \.mha"):
        write_volume(vol, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    sitk.WriteImage(vol.to_sitk(), str(tmp_path / name))  # written by other tools: still an input
    assert_same_volume(read_volume(tmp_path / name), vol)
    with pytest.raises(InputError, match=r"\.nrrd or \.mha"):
        check_output_suffix(name.upper())
    with pytest.raises(InputError, match="use one of .nii, .nii.gz, .nrrd, .mha$"):
        check_output_suffix("out.png")


@pytest.mark.parametrize("name, problem", [("ct:1.nii.gz", "holds ':'"), ("ct?.nii.gz", "holds '?'"),
                                           ("result.nii.gz.", "ends in a dot"), ("NUL.nii.gz", "a device name"),
                                           ("com1.nrrd", "a device name")])
def test_output_names_windows_cannot_hold_are_refused_there_before_the_work(tmp_path, monkeypatch, name, problem):
    """A ':' writes into a hidden stream of the file, a device name writes nowhere, a trailing dot is dropped."""
    from MedDiffFMLib import validation

    validation.check_output_path(tmp_path / name)  # elsewhere these are plain file names
    monkeypatch.setattr(validation, "WINDOWS_FILE_NAMES", True)
    with pytest.raises(InputError, match=f"output .*{re.escape(name)}: the name .*{problem}.*; choose another output path"):
        validation.check_output_path(tmp_path / name)
    validation.check_output_path(tmp_path / "ct_1.nii.gz")
    validation.check_output_path(tmp_path / "console.nii.gz")  # only the device names themselves


class _AsciiOnlyITK:
    """SimpleITK as it behaves on Windows with a code page other than UTF-8: a path outside ASCII is not found."""

    @staticmethod
    def _check(path):
        if not str(path).isascii():
            raise RuntimeError(f'The file "{path}" does not exist.')

    def __getattr__(self, name):
        return getattr(sitk, name)

    def ReadImage(self, path, *args, **kwargs):
        self._check(path)
        return sitk.ReadImage(path, *args, **kwargs)

    def WriteImage(self, image, path, *args, **kwargs):
        self._check(path)
        return sitk.WriteImage(image, path, *args, **kwargs)

    class ImageSeriesReader(sitk.ImageSeriesReader):
        @staticmethod
        def GetGDCMSeriesIDs(folder, *args):
            return sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder, *args) if str(folder).isascii() else ()

        @staticmethod
        def GetGDCMSeriesFileNames(folder, *args, **kwargs):
            _AsciiOnlyITK._check(folder)
            return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, *args, **kwargs)

    class ImageFileReader(sitk.ImageFileReader):
        def SetFileName(self, name):
            _AsciiOnlyITK._check(name)
            return super().SetFileName(name)


def test_paths_outside_ascii_reach_simpleitk_by_their_short_names_on_windows(tmp_path, monkeypatch):
    """On Windows ITK reads paths in the ANSI code page: "C:\\Users\\Łucja\\ct.nii.gz" is "not found". The short
    (8.3) names Windows keeps are ASCII; a volume without them gets a clear refusal instead of ITK's message."""
    from MedDiffFMLib import io as io_module

    folder = tmp_path / "Łódź"
    (folder / "dicom Sättiger").mkdir(parents=True)
    shutil.copy(LIMB_NII, folder / "ct.nii.gz")
    for name in sorted(THREE_SLICE_DICOM.iterdir()):
        shutil.copy(name, folder / "dicom Sättiger" / name.name)
    short_names = [True]

    def short_name(path):
        """Each name outside ASCII gets an ASCII alias beside it, as Windows' 8.3 names do (the extension cut to three
        letters, in capitals)."""
        if not short_names:
            return None
        real = short = Path(Path(path).anchor)
        for part in Path(path).parts[1:]:
            if part.isascii():
                short = short / part
            else:
                extension = part.rsplit(".", 1)[1][:3].upper() if "." in part else ""
                alias = real / f"SHORT~{abs(hash(part)) % 10 ** 6}{'.' * bool(extension)}{extension}"
                if not alias.exists():
                    alias.symlink_to(real / part)
                short = short / alias.name
            real = real / part
        return str(short)

    def listed():
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("SHORT~"))

    monkeypatch.setattr(io_module, "sitk", _AsciiOnlyITK())
    monkeypatch.setattr(io_module, "ITK_NEEDS_ASCII_PATHS", True)
    monkeypatch.setattr(io_module, "_short_name", short_name)

    limb, dicom = read_volume(LIMB_NII), read_volume(THREE_SLICE_DICOM)
    assert_same_volume(read_volume(folder / "ct.nii.gz"), limb)
    assert_same_volume(read_volume(folder / "dicom Sättiger"), dicom)
    assert_same_volume(read_volume(folder / "dicom Sättiger" / sorted(THREE_SLICE_DICOM.iterdir())[1].name), dicom)
    written = write_volume(limb, folder / "wynik_żółw.nii.gz")  # results may take any name: written under an ASCII one
    assert written == folder / "wynik_żółw.nii.gz" and listed() == ["ct.nii.gz", "dicom Sättiger", "wynik_żółw.nii.gz"]
    with pytest.raises(InputError, match="cannot open .*wynik_żółw.nii.gz .*its file name holds characters outside "
                                         "ASCII.*Rename the file"):  # its short name, WYNIK_~1.GZ, hides the format
        read_volume(written)
    assert_same_volume(read_volume(written.rename(folder / "wynik.nii.gz")), limb, atol=1e-4)
    nrrd = write_volume(limb, folder / "wynik_żółw.nrrd")  # its reader is named, so its short name will do
    assert_same_volume(read_volume(nrrd), limb)
    nrrd.unlink()

    short_names.clear()  # a volume that keeps no short names
    for source in (folder / "ct.nii.gz", folder / "dicom Sättiger"):
        with pytest.raises(InputError, match="cannot open .*Łódź.* its path holds characters outside ASCII.*plain "
                                             "ASCII"):
            read_volume(source)
    with pytest.raises(InputError, match="cannot open .*Łódź"):
        write_volume(limb, folder / "again.nii.gz")
    assert listed() == ["ct.nii.gz", "dicom Sättiger", "wynik.nii.gz"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "result.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"partial")
            raise RuntimeError("simulated crash")
    assert list(tmp_path.iterdir()) == []


def test_a_file_held_open_elsewhere_is_replaced_once_released(tmp_path, monkeypatch, caplog):
    """Windows refuses to replace a file another program holds open (a CSV in a spreadsheet) for as long as it does:
    the rename is retried (there), and a training run's loss log that cannot be updated says so once and goes on."""
    from MedDiffFMLib import io as io_module, training
    from MedDiffFMLib.training import _LossLog

    held = {}  # file name -> refusals left
    replace = os.replace

    def refuse_while_held(source, target):
        name = os.path.basename(target)
        if held.get(name, 0) > 0:
            held[name] -= 1
            raise PermissionError(13, "The process cannot access the file", str(source), None, str(target))
        replace(source, target)

    monkeypatch.setattr(io_module.os, "replace", refuse_while_held)
    monkeypatch.setattr(io_module, "REPLACE_RETRY_S", 5.0)
    held["result.csv"] = 2
    with atomic_path(tmp_path / "result.csv") as tmp:
        tmp.write_text("step\n")
    assert held["result.csv"] == 0 and (tmp_path / "result.csv").read_text() == "step\n"

    monkeypatch.setattr(io_module, "REPLACE_RETRY_S", 0.0)  # held for longer than any retry
    monkeypatch.setattr(training, "FILES_HELD_BY_OTHER_PROGRAMS", True)
    log = _LossLog(tmp_path, 0)
    log.add(1, 0.5, 1.0)
    log.add_validation(1, {"t0-100": 0.25})
    held["loss.csv"] = 2
    log.flush(plot=False)
    log.flush(plot=False)
    assert caplog.text.count("could not update") == 1 and str(tmp_path / "loss.csv") in caplog.text
    assert (tmp_path / "validation.csv").exists()  # the other files are written all the same
    log.flush(plot=False)  # released: the next update writes it
    assert (tmp_path / "loss.csv").read_text(encoding="utf-8").splitlines()[1].startswith("1,0.5")
    held["loss.csv"] = 1  # held again later: said again
    log.flush(plot=False)
    assert caplog.text.count("could not update") == 2
    # Elsewhere the refusal is a real permission problem: it stops the run.
    monkeypatch.setattr(training, "FILES_HELD_BY_OTHER_PROGRAMS", False)
    held["loss.csv"] = 1
    with pytest.raises(PermissionError):
        log.flush(plot=False)


def test_text_files_are_written_and_read_as_utf8_whatever_the_locale(tmp_path):
    """Windows' default text encoding is the ANSI code page (cp1252), which cannot hold every case name."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from MedDiffFMLib.io import write_csv; "
            "from MedDiffFMLib.evaluate import write_text; from MedDiffFMLib.training import _read_csv; "
            "out = Path(sys.argv[1]); write_csv([{'case': '\u0141\u00f3d\u017a_01'}], ['case'], out / 'r.csv'); "
            "write_text('\u60a3\u8005', out / 'r.md'); print(_read_csv(out / 'r.csv')[0]['case'])")
    done = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-W", "error::EncodingWarning", "-c", code,
                           str(tmp_path)], capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "\u0141\u00f3d\u017a_01"
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "\u60a3\u8005"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """SIGKILL skips every clean-up: the next write of the same file removes what such a writer left, and only that."""
    vol = read_volume(ABDOMEN_SMALL_NII)
    stale, running = tmp_path / ".tmp-0123abcd-result.nii.gz", tmp_path / ".tmp-4567ef01-result.nii.gz"
    others = [tmp_path / ".tmp-89abcdef-other.nii.gz", tmp_path / ".tmp-0123abcd-ab-result.nii.gz",
              tmp_path / ".tmp-0123abcd-result.nrrd"]
    for path in [stale, running] + others:
        path.write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    for path in [stale] + others:
        os.utime(path, (hours_ago, hours_ago))
    write_volume(vol, tmp_path / "result.nii.gz")
    assert not stale.exists()
    assert running.exists() and all(path.exists() for path in others)  # another file's, or a write in progress
    assert_same_volume(read_volume(tmp_path / "result.nii.gz"), vol)


def test_a_figure_is_written_whole_or_not_at_all_and_always_closed(tmp_path):
    import matplotlib.pyplot as plt

    from MedDiffFMLib.io import png_figure

    with pytest.raises(RuntimeError, match="drawing failed"):
        with png_figure(tmp_path / "broken.png", 50, figsize=(2, 2)) as (fig, ax):
            ax.plot([0, 1], [0, 1])
            raise RuntimeError("drawing failed")
    assert list(tmp_path.iterdir()) == [] and plt.get_fignums() == []
    with png_figure(tmp_path / "ok.png", 50, nrows=1, ncols=2, figsize=(2, 1)) as (fig, axes):
        assert len(axes) == 2
    assert (tmp_path / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plt.get_fignums() == []


def test_volume_helpers_keep_geometry():
    vol = read_volume(LIMB_NII)
    other = vol.with_array(np.zeros(vol.shape, np.uint8))
    assert other.same_grid(vol) and other.array.dtype == np.uint8
    with pytest.raises(ValueError):
        vol.with_array(np.zeros((2, 2, 2)))
    assert_same_volume(Volume.from_sitk(vol.to_sitk()), vol, atol=0)


def test_nifti_nan_and_inf_are_not_hidden(tmp_path):
    """ITK's NIfTI reader turns NaN/inf into 0; read_volume restores them so check_ct can refuse them."""
    vol = read_volume(LIMB_NII)
    broken = vol.array.copy()
    broken[30, 100, 100:103] = np.nan
    broken[5, 7, 9] = -np.inf
    path = tmp_path / "broken.nii.gz"
    sitk.WriteImage(vol.with_array(broken).to_sitk(), str(path))
    back = read_volume(path).array
    np.testing.assert_array_equal(np.isnan(back), np.isnan(broken))
    assert back[5, 7, 9] == -np.inf
    np.testing.assert_array_equal(back[np.isfinite(broken)], broken[np.isfinite(broken)])


def test_a_result_with_nan_is_not_written(tmp_path):
    """Readers show NaN as 0 HU: a result with NaN (broken or diverged weights) must fail, not look like a blank CT."""
    vol = read_volume(LIMB_NII)
    broken = vol.array.astype(np.float32)
    broken[3, 4, 5] = np.nan
    with pytest.raises(CheckpointError, match="1 of .* voxels that are NaN or infinite"):
        write_volume(vol.with_array(broken), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []
    write_volume(vol.with_array(np.nan_to_num(broken)), tmp_path / "out.nii.gz")


def test_mask_cropped_to_its_extent_is_placed_on_the_image_grid(tmp_path):
    """3D Slicer saves .seg.nrrd cropped to the segment extent: same grid, smaller block."""
    image = read_volume(LIMB_NII)
    full = read_mask(LIMB_MASK_NII, like=image)
    z, y, x = (np.flatnonzero(full.array.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    cropped = full.to_sitk()[x[0]:x[-1] + 1, y[0]:y[-1] + 1, z[0]:z[-1] + 1]  # keeps physical origin
    sitk.WriteImage(cropped, str(tmp_path / "gtv.seg.nrrd"))
    placed = read_mask(tmp_path / "gtv.seg.nrrd", like=image)
    assert placed.same_grid(image)
    np.testing.assert_array_equal(placed.array, full.array)
    # Half a voxel off is not the same grid: refused, never interpolated.
    cropped.SetOrigin(np.add(cropped.GetOrigin(), (0.5 * image.spacing[0], 0, 0)))
    sitk.WriteImage(cropped, str(tmp_path / "shifted.seg.nrrd"))
    with pytest.raises(InputError, match="not on the grid"):
        read_mask(tmp_path / "shifted.seg.nrrd", like=image)
    two_layers = sitk.Compose(full.to_sitk(), full.to_sitk())
    sitk.WriteImage(two_layers, str(tmp_path / "layers.seg.nrrd"))
    with pytest.raises(InputError, match="2 layers"):
        read_mask(tmp_path / "layers.seg.nrrd", like=image)


def test_a_volume_with_incomplete_or_impossible_geometry_is_refused_where_it_is_made():
    voxels = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(InputError, match="3 spacing and 3 origin values .* got 2, 3 and 9"):
        Volume(voxels, spacing=(1.0, 1.0))
    with pytest.raises(InputError, match="got 3, 3 and 4"):
        Volume(voxels, direction=(1.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match="spacing must be > 0 mm"):
        Volume(voxels, spacing=(1.0, 0.0, 1.0))


def test_crop_keeps_every_voxel_at_its_physical_point():
    """Known answer: SimpleITK's region of interest, on an oblique, anisotropic grid."""
    import math

    turn = math.radians(25)
    direction = (math.cos(turn), -math.sin(turn), 0, math.sin(turn), math.cos(turn), 0, 0, 0, 1)
    vol = Volume(np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10), (0.7, 0.9, 2.5), (-12.3, 45.6, -78.9),
                 direction)
    crop = vol.crop((slice(2, 6), slice(1, 8), slice(3, 9)))
    reference = Volume.from_sitk(sitk.RegionOfInterest(vol.to_sitk(), (6, 7, 4), (3, 1, 2)))
    assert crop.same_grid(reference, 1e-9) and np.array_equal(crop.array, reference.array)
    assert np.array_equal(vol.crop([slice(2, 6), slice(1, 8), slice(3, 9)]).array, crop.array)  # any sequence
    for bad in ((slice(0, 8, 2), slice(None), slice(None)), (slice(4, 4), slice(None), slice(None))):
        with pytest.raises(InputError, match="contiguous, non-empty"):
            vol.crop(bad)
    with pytest.raises(InputError, match="three slices"):
        vol.crop((slice(0, 2), 3, slice(None)))


def test_a_sheared_nifti_says_what_is_wrong_with_it(tmp_path):
    """Not "supported formats: NIfTI ...": the file is a NIfTI, but its axes are not perpendicular."""
    import nibabel

    affine = np.eye(4)
    affine[1, 2] = 0.3  # y grows with the slice index: a sheared (tilted) grid
    nibabel.save(nibabel.Nifti1Image(np.full((10, 10, 10), -1000, np.int16), affine), str(tmp_path / "tilt.nii.gz"))
    with pytest.raises(InputError, match="axes are not perpendicular .* tilt correction"):
        read_volume(tmp_path / "tilt.nii.gz")


@pytest.fixture
def small_nifti():
    """A 24 x 20 x 10 crop of the real limb CT as a nibabel image (qform and sform both set, in agreement)."""
    import nibabel

    image = nibabel.load(str(LIMB_NII))
    data = np.asarray(image.dataobj)[40:64, 40:60, 10:20].astype(np.int16)
    crop = nibabel.Nifti1Image(data, image.affine)
    crop.set_qform(image.affine, code=1)
    crop.set_sform(image.affine, code=1)
    return crop


def test_a_nifti_header_that_places_voxels_two_ways_is_refused(small_nifti, tmp_path):
    import nibabel

    read_volume(nibabel.save(small_nifti, tmp_path / "fine.nii.gz") or tmp_path / "fine.nii.gz")
    moved = small_nifti.affine.copy()
    moved[:3, 3] += (10, 20, 30)
    small_nifti.set_sform(moved, code=2)  # e.g. an aligned sform beside the scanner qform
    nibabel.save(small_nifti, tmp_path / "two.nii.gz")
    with pytest.raises(InputError, match=r"two geometries \(qform and sform\) that place voxels up to 37.4 mm apart.*"
                                         r"reads the qform"):
        read_volume(tmp_path / "two.nii.gz")
    only_sform = nibabel.Nifti1Image(small_nifti.get_fdata().astype(np.int16), None)
    only_sform.set_sform(small_nifti.affine, code=1)
    only_sform.header["pixdim"][1:4] = 1.0  # the sform says ~1 x 1 x 3.3 mm voxels, pixdim says 1 mm
    nibabel.save(only_sform, tmp_path / "sform.nii.gz")
    if not np.allclose(only_sform.header.get_zooms(), 1.0):  # nibabel keeps pixdim in step with a set sform
        pytest.skip("nibabel rewrote pixdim from the sform")
    with pytest.raises(InputError, match="cannot be read as stored: ITK places voxels up to"):
        read_volume(tmp_path / "sform.nii.gz")


def test_a_zero_voxel_size_and_a_misnamed_compression_are_named(small_nifti, tmp_path):
    import gzip

    import nibabel

    small_nifti.set_sform(None, code=0)
    small_nifti.header["pixdim"][3] = 0.0  # nibabel and ITK would both read it as 1 mm
    raw = small_nifti.header.binaryblock + b"\0" * 4 + np.asarray(small_nifti.dataobj).tobytes(order="F")
    (tmp_path / "zero.nii").write_bytes(raw)
    with pytest.raises(InputError, match=r"voxel size \(pixdim .*, 0\)\) is 0 along an axis"):
        read_volume(tmp_path / "zero.nii")
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.int16) - 1000, np.eye(4)), tmp_path / "plain.nii")
    (tmp_path / "plain.nii.gz").write_bytes((tmp_path / "plain.nii").read_bytes())
    with pytest.raises(InputError, match="its name says gzip-compressed, but the file is an uncompressed NIfTI; "
                                         "rename it to plain.nii$"):
        read_volume(tmp_path / "plain.nii.gz")
    (tmp_path / "packed.nii").write_bytes(gzip.compress((tmp_path / "plain.nii").read_bytes()))
    with pytest.raises(InputError, match="its name says uncompressed, but the file is gzip-compressed; rename it to "
                                         "packed.nii.gz$"):
        read_volume(tmp_path / "packed.nii")


def test_nan_in_a_float_nifti_of_one_volume_in_4d_is_seen(small_nifti, tmp_path):
    import nibabel

    from MedDiffFMLib.validation import check_ct

    data = small_nifti.get_fdata().astype(np.float32)[..., None]  # x, y, z, 1
    data[3, 4, 5, 0] = np.nan
    nibabel.save(nibabel.Nifti1Image(data, small_nifti.affine), tmp_path / "nan4d.nii.gz")
    vol = read_volume(tmp_path / "nan4d.nii.gz")  # ITK drops the singleton and reads NaN as 0
    assert np.isnan(vol.array[5, 4, 3])
    with pytest.raises(InputError, match="1 NaN or infinite voxels"):
        check_ct(vol)


def test_mask_messages_name_the_mask_and_show_the_digits_that_differ(tmp_path):
    import nibabel

    ct = read_volume(LIMB_NII)
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6, 2), np.uint8), np.eye(4)), tmp_path / "two.nii.gz")
    with pytest.raises(InputError, match=r"mask two.nii.gz has 4 dimensions \(size \(2, 6, 5, 4\)\); give a 3D label"):
        read_mask(tmp_path / "two.nii.gz", like=ct)
    shifted = Volume(np.zeros(ct.shape, np.uint8), ct.spacing, np.add(ct.origin, (0.002, 0, 0)), ct.direction)
    write_volume(shifted, tmp_path / "off.nrrd")
    with pytest.raises(InputError) as refused:
        read_mask(tmp_path / "off.nrrd", like=ct)
    image, mask = re.search(r"origin \(x,y,z\) mm: image (\(.*?\)), label map (\(.*?\))", str(refused.value)).groups()
    assert image != mask  # at 4 significant digits both read the same


def test_a_nrrd_without_voxel_size_is_warned_about(tmp_path, caplog):
    data = np.full((6, 8, 10), -1000, np.int16)
    header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 10 8 6\nendian: little\nencoding: raw\n\n"
    (tmp_path / "bare.nrrd").write_bytes(header.encode() + data.tobytes())
    assert read_volume(tmp_path / "bare.nrrd").spacing == (1.0, 1.0, 1.0)
    assert "bare.nrrd stores no voxel spacing" in caplog.text
    caplog.clear()
    read_volume(CHEST_NRRD)  # 'space directions'
    assert "stores no voxel spacing" not in caplog.text


def test_slightly_oblique_nifti_written_here_reads_back():
    """SimpleITK writes a qform beside the sform; for an LPS-stored CT the qform's float32 quaternion is only good to
    about 0.1 deg, which the header check must not take for two geometries (it refused most small obliquities)."""
    import tempfile

    from scipy.spatial.transform import Rotation

    array = np.full((4, 8, 600), -1000, np.int16)  # a 42 cm extent at 0.7 mm, where the qform is 0.3-0.6 mm off
    with tempfile.TemporaryDirectory() as folder:
        for tilt in np.arange(-5.0, 5.01, 1.0):
            for yaw in np.arange(-3.0, 3.01, 1.5):
                direction = Rotation.from_euler("xy", [tilt, yaw], degrees=True).as_matrix().ravel()
                vol = Volume(array, (0.7, 0.7, 2.5), (200.3, -150.7, -800.2), direction)
                back = read_volume(write_volume(vol, f"{folder}/oblique.nii.gz", overwrite=True))
                np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)
                np.testing.assert_allclose(back.origin, vol.origin, atol=1e-3)


def read_slices(folder):
    """pydicom datasets of the files in a folder (headers only), in name order."""
    from pydicom import dcmread

    return [dcmread(str(name), stop_before_pixels=True) for name in sorted(Path(folder).iterdir())]


@pytest.fixture
def chest_series(chest_nodule_crop, tmp_path):
    """The real 48 x 48 x 12 chest crop as an oblique DICOM series of a named patient (read back as a Volume)."""
    tags = {"0010|0010": "M\u00fcller^J\u00fcrgen", "0008|0005": "ISO_IR 192", "0010|0020": "P-0042",
            "0008|0050": "ACC-17", "0020|0011": "3", "0008|103e": "Thorax 5.0 B31f", "0008|0020": "20240131",
            "0018|0050": "7.5",  # slices thicker than their 5 mm spacing: an overlapping reconstruction
            "0028|1050": "-600\\40", "0028|1051": "1500\\400", "0028|1055": "LUNG\\MEDIASTINUM"}
    folder = oblique_dicom_series(chest_nodule_crop[0], tmp_path / "series", tags)
    return folder, read_volume(folder)


def test_a_result_written_as_a_dicom_series_joins_the_study_on_the_same_grid(chest_series, tmp_path):
    from MedDiffFMLib.io import DerivedSeries, write_series

    source, vol = chest_series
    result = vol.with_array(vol.array + np.linspace(-0.45, 0.45, vol.array.size, dtype=np.float32).reshape(vol.shape))
    process_locale = locale.setlocale(locale.LC_ALL)
    out = write_series(result, tmp_path / "out", DerivedSeries(source, "denoised"))
    assert locale.setlocale(locale.LC_ALL) == process_locale  # GDCM had left the C locale: text files read as ASCII
    back = read_volume(out)
    assert back.grid_differences(vol, tol=1e-6) == []
    assert np.abs(np.asarray(vol.direction) - np.eye(3).ravel()).max() > 0.3  # oblique
    np.testing.assert_array_equal(back.array, np.rint(result.array))  # int16 HU, rounded only
    before, after = read_slices(source), read_slices(out)
    assert len(after) == 12 and sorted(p.name for p in tmp_path.iterdir()) == ["out", "series"]  # no temporary left
    for ds in after:
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate",
                        "FrameOfReferenceUID", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
            assert ds.get(keyword) == before[0].get(keyword), keyword
        assert ds.SeriesDescription == "Thorax 5.0 B31f MedDiffFM denoised" and ds.Modality == "CT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and int(ds.SeriesNumber) == 1003
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
        assert float(ds.SliceThickness) == 7.5  # the input's: the result keeps its grid
        assert ds.PatientPosition == ""  # a CT image must hold it: empty, as the input has none
        # No tag gives another slice spacing than the positions do (ITK wrote a 2D image's 1 mm there).
        assert float(ds.get("SpacingBetweenSlices", vol.spacing[2])) == pytest.approx(vol.spacing[2])
    assert str(after[0].PatientName) == "M\u00fcller^J\u00fcrgen"
    assert len({ds.SeriesInstanceUID for ds in after}) == 1
    assert after[0].SeriesInstanceUID != before[0].SeriesInstanceUID
    uids = {ds.SOPInstanceUID for ds in after}
    assert len(uids) == 12 and not uids & {ds.SOPInstanceUID for ds in before}
    again = read_slices(write_series(result, tmp_path / "again", DerivedSeries(source / "001.dcm", "resampled",
                                                                               keeps_grid=False)))
    assert again[0].SeriesInstanceUID != after[0].SeriesInstanceUID  # each result a series of its own
    assert float(again[0].SliceThickness) == pytest.approx(vol.spacing[2])  # on a new grid: as thick as its spacing


def test_a_dicom_series_output_is_refused_unless_new_or_empty_and_outside_the_input(chest_series, tmp_path):
    from MedDiffFMLib.io import DerivedSeries, write_series

    source, vol = chest_series
    series = DerivedSeries(source, "denoised")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("kept")
    for folder, message in [(tmp_path / "full", "is a folder that is not empty; a DICOM series is written into a new"),
                            (source, "is an input folder"), (source / "sub", "is inside the input folder"),
                            (tmp_path / "notes", "is a file; a DICOM series")]:
        (tmp_path / "notes").write_text("a file without a suffix")
        with pytest.raises(InputError, match=message):
            write_series(vol, folder, series)
    with pytest.raises(InputError, match="is inside the input folder"):  # a file given stands for its series
        write_series(vol, source / "sub", DerivedSeries(source / "001.dcm", "denoised"))
    with pytest.raises(InputError, match="its source .* is not a DICOM series"):
        write_series(vol, tmp_path / "out", DerivedSeries(write_volume(vol, tmp_path / "ct.nrrd"), "denoised"))
    with pytest.raises(InputError, match="a folder takes a DICOM series, which needs the input series"):
        write_volume(vol, tmp_path / "out")
    flipped = Volume(vol.array, vol.spacing, vol.origin,
                     (np.asarray(vol.direction).reshape(3, 3) @ np.diag([1.0, 1.0, -1.0])).ravel())
    with pytest.raises(InputError, match="left-handed grid"):
        write_series(flipped, tmp_path / "out", series)
    (tmp_path / "empty").mkdir()
    assert_same_volume(read_volume(write_series(vol, tmp_path / "empty", series)), vol, atol=1e-6)
    assert len(list(source.iterdir())) == 12 and (tmp_path / "full" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd", "empty", "full", "notes", "series"]


def test_a_dicom_series_that_fails_midway_leaves_nothing(chest_series, tmp_path, monkeypatch):
    from MedDiffFMLib.io import DerivedSeries, write_volumes

    source, vol = chest_series
    written = []

    def fail_at_the_fifth_slice(writer, image):
        written.append(writer.GetFileName())
        if len(written) == 5:
            raise RuntimeError("No space left on device")
        return original(writer, image)

    original = sitk.ImageFileWriter.Execute
    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", fail_at_the_fifth_slice)
    with pytest.raises(InputError, match="No space left on device.*no partial file is left"):
        write_volumes([(vol, tmp_path / "std.nrrd"), (vol, tmp_path / "out")], series=DerivedSeries(source, "x"))
    assert len(written) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["series"]
    monkeypatch.undo()
    stale = tmp_path / ".tmp-0123abcd-out"  # what a killed writer left; removed by the next write of "out"
    stale.mkdir()
    (stale / "0001.dcm").write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    write_volumes([(vol, tmp_path / "out"), (vol, tmp_path / "out2")], series=DerivedSeries(source, "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "series"]
    # Two folders of one call are two series (they shared one Series Instance UID).
    assert read_slices(tmp_path / "out")[0].SeriesInstanceUID != read_slices(tmp_path / "out2")[0].SeriesInstanceUID


def test_a_dicom_series_keeps_the_backslashes_of_the_input_text(chest_nodule_crop, tmp_path):
    """A backslash separates values in DICOM text: a description typed with one reads as two values, which were
    written back as a Python list ("['Thorax', 'Lung']")."""
    from MedDiffFMLib.io import DerivedSeries, write_series

    source = oblique_dicom_series(chest_nodule_crop[0], tmp_path / "series",
                                  {"0008|103e": "Thorax\\Lung", "0008|1030": "CT\\Chest"})
    out = write_series(read_volume(source), tmp_path / "out", DerivedSeries(source, "denoised"))
    written = read_slices(out)[0]
    assert list(written.StudyDescription) == ["CT", "Chest"]
    assert list(written.SeriesDescription) == ["Thorax", "Lung MedDiffFM denoised"]


def test_a_dicom_series_holds_what_a_ct_image_must_as_the_real_input_series_do(tmp_path):
    """GDCM wrote today's date for the real de-identified head series' empty study date and time, as if the result
    were of another study; KVP and other type 2 tags of a CT image, the third Image Type value and the input's
    Laterality (present but empty: unknown) were missing; and Rescale Type US called the HU values unspecified."""
    from MedDiffFMLib.io import DerivedSeries, write_series

    vol = Volume(np.full((2, 3, 4), -3024.0, dtype=np.float32), (0.5, 0.5, 5.0), (0.0, 0.0, 0.0),
                 tuple(np.eye(3).ravel()))
    for name, folder in [("head", HEAD_TILTED_DICOM), ("abdomen", ABDOMEN_DICOM)]:
        source = read_slices(folder)[0]
        written = read_slices(write_series(vol, tmp_path / name, DerivedSeries(folder, "denoised")))[0]
        for keyword in ("StudyDate", "StudyTime", "KVP", "PositionReferenceIndicator", "BodyPartExamined",
                        "Laterality"):
            assert written.get(keyword) == source.get(keyword), (name, keyword)  # absent stays absent
        for keyword in ("Manufacturer", "AcquisitionNumber", "PatientBirthDate", "PatientSex"):
            assert keyword in written, (name, keyword)  # type 2: present, even empty (the head has neither)
        assert list(written.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and written.RescaleType == "HU"
        assert name != "head" or written.StudyDate == ""  # the cases: the head's empty study date and time,
        assert name != "abdomen" or written.Laterality == ""  # the abdomen's empty Laterality
