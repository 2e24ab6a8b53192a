"""Shared test fixtures: where the real CT data lives, and torch kept to one thread per worker."""
from __future__ import annotations

from pathlib import Path

import pytest

from MedDiffFMLib.dataset import shared_data_root

REPO = Path(__file__).resolve().parents[1]
CT_DATA = shared_data_root()

if not (CT_DATA / "MANIFEST.md").exists():
    raise RuntimeError(
        f"Real CT test data not found at {CT_DATA}. Set MEDDIFFFM_CT_DATA to the folder holding "
        "MANIFEST.md (../shared/data/ct next to the repository)."
    )

# Paths to cases used across the suite (see MANIFEST.md for their licences and geometry).
CHEST_NRRD = CT_DATA / "pyradiomics_lung1" / "lung1_image.nrrd"
CHEST_NODULE_NRRD = CT_DATA / "pyradiomics_lung1" / "lung1_label.nrrd"
ABDOMEN_SMALL_NII = CT_DATA / "totalsegmentator" / "example_ct_sm" / "example_ct_sm.nii.gz"
ABDOMEN_NII = CT_DATA / "totalsegmentator" / "example_ct" / "example_ct.nii.gz"
ABDOMEN_TOTALSEG_NII = CT_DATA / "totalsegmentator" / "example_ct" / "example_seg_fast_force_split.nii.gz"
LIMB_NII = CT_DATA / "ibsi_sts" / "STS_001" / "CT_image.nii.gz"
LIMB_MASK_NII = CT_DATA / "ibsi_sts" / "STS_001" / "CT_mask.nii.gz"
HEAD_TILTED_DICOM = CT_DATA / "dcm_qa_ct_ge_head" / "dicom"
ABDOMEN_DICOM = CT_DATA / "mirp_crlm" / "CRLM-CT-1004" / "image"
THREE_SLICE_DICOM = CT_DATA / "dcmqi_ct3slice" / "ct-3slice"


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_user_folder(tmp_path_factory, monkeypatch):
    """The user's model folder and registry ($MEDDIFFFM_HOME) hold only what the test puts there."""
    monkeypatch.setenv("MEDDIFFFM_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def chest_nodule_crop():
    """(CT, nodule mask) Volumes: a 12 x 48 x 48 (z, y, x) crop of the lung1 chest CT around its nodule,
    with the crop's own origin (real geometry, 0.57 x 0.57 x 5 mm)."""
    import SimpleITK as sitk

    from MedDiffFMLib.io import Volume

    box = (slice(194, 242), slice(336, 384), slice(27, 39))  # x, y, z (SimpleITK order)
    image = Volume.from_sitk(sitk.ReadImage(str(CHEST_NRRD))[box], dtype="float32")
    mask = Volume.from_sitk(sitk.ReadImage(str(CHEST_NODULE_NRRD))[box])
    return image, mask


@pytest.fixture(scope="session")
def tiny_base():
    """An untrained `tiny` MedDiffNet (seeded) whose zero-initialised layers (MONAI zeroes the output
    convolution) get small random weights, so its output and gradients are not trivially zero."""
    import torch

    from MedDiffFMLib.config import preset
    from MedDiffFMLib.network import MedDiffNet

    torch.manual_seed(0)
    model = MedDiffNet(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


def grid_centre(vol):
    """Physical centre (LPS mm) of a Volume's grid."""
    import numpy as np

    direction = np.asarray(vol.direction).reshape(3, 3)
    half = (np.array(list(reversed(vol.shape))) - 1) * np.asarray(vol.spacing) / 2.0
    return np.asarray(vol.origin) + direction @ half


def oblique_dicom_series(vol, folder, tags=None):
    """`vol` (rounded to int16 HU) turned onto an oblique grid and written with SimpleITK as a DICOM series into
    `folder`, its slices in reverse file order; `tags` ("gggg|eeee": value) are added to every slice."""
    import numpy as np
    import SimpleITK as sitk

    from MedDiffFMLib.io import locale_kept, new_uid

    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    turned = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    image = sitk.GetImageFromArray(np.rint(vol.array).astype(np.int16))
    image.SetSpacing(vol.spacing)
    image.SetOrigin((-120.5, 33.25, 410.0))
    image.SetDirection(tuple(turned.ravel()))
    folder.mkdir(parents=True)
    series = {"0020|000e": new_uid(), "0020|000d": new_uid(), "0008|0060": "CT", "0020|0052": new_uid(),
              "0020|0037": "\\".join(repr(float(v)) for v in turned.T.ravel()[:6]), **(tags or {})}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for key, value in series.items():
            plane.SetMetaData(key, value)
        plane.SetMetaData("0020|0032", "\\".join(repr(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", new_uid())
        writer.SetFileName(str(folder / f"{image.GetDepth() - k:03d}.dcm"))
        with locale_kept():  # GDCM would leave the tests that follow in the C locale
            writer.Execute(plane)
    return folder
