"""Anatomy label maps on real CT (checked against TotalSegmentator and GTV masks), encoding, sources."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import (ABDOMEN_NII, ABDOMEN_SMALL_NII, ABDOMEN_TOTALSEG_NII, CHEST_NRRD, LIMB_MASK_NII,
                      LIMB_NII)
from MedDiffFMLib.anatomy import (TEMPORARY_ROOT_ENV, TOTALSEG_BODY_LABEL, AnatomySpec, decode_anatomy,
                                  encode_anatomy, get_anatomy, threshold_anatomy, totalsegmentator_anatomy,
                                  totalsegmentator_problem)
from MedDiffFMLib.errors import InputError, ResourceError
from MedDiffFMLib.io import Volume, read_mask, read_volume

AIR, FAT, SOFT, BONE = 1, 2, 3, 4
TOTALSEG_LUNG_LOBES = [10, 11, 12, 13, 14]  # labels_total.json


@pytest.fixture(scope="module")
def chest():
    vol = read_volume(CHEST_NRRD)
    return vol, threshold_anatomy(vol)


def test_chest_anatomy_is_plausible(chest):
    vol, labels = chest
    assert labels.dtype == np.uint8 and labels.shape == vol.shape
    body = labels > 0
    lung_fraction = np.count_nonzero(labels == AIR) / np.count_nonzero(body)
    assert 0.15 < lung_fraction < 0.45  # 24 cm of chest: lungs are a large part of the body
    voxel_ml = np.prod(vol.spacing) / 1000
    assert np.count_nonzero(labels == BONE) * voxel_ml > 100  # spine, ribs, sternum
    # Outside the body is air (and the table): nearly all of it below -900 HU.
    assert np.mean(vol.array[~body] < -900) > 0.9
    # Lungs are holes inside the body in every axial slice that has lung.
    assert np.count_nonzero(labels[20] == AIR) > 0.1 * np.count_nonzero(body[20])


def test_threshold_anatomy_does_not_depend_on_the_array_type():
    """The CT is smoothed in float32 whatever it is stored in: a float64 array filtered straight into float32 rounds
    differently, and voxels at a class limit (here soft tissue at -30 HU) changed class."""
    rng = np.random.default_rng(0)
    hu = np.full((20, 48, 48), -1000.0)
    hu[:, 8:40, 8:40] = -30.0 + rng.uniform(-1e-3, 1e-3, (20, 32, 32))
    as_float64 = Volume(hu, (1.0, 1.0, 1.0))
    as_float32 = Volume(hu.astype(np.float32), (1.0, 1.0, 1.0))
    assert np.array_equal(threshold_anatomy(as_float64), threshold_anatomy(as_float32))
    integer = np.round(hu).astype(np.int16)
    assert np.array_equal(threshold_anatomy(Volume(integer, (1.0, 1.0, 1.0))),
                          threshold_anatomy(Volume(integer.astype(np.float32), (1.0, 1.0, 1.0))))


def test_threshold_anatomy_agrees_with_totalsegmentator_on_abdomen():
    vol = read_volume(ABDOMEN_NII)
    labels = threshold_anatomy(vol)
    reference = read_mask(ABDOMEN_TOTALSEG_NII, like=vol).array
    # Every organ TotalSegmentator found lies inside our body mask.
    assert np.mean(labels[reference > 0] > 0) > 0.995
    lungs = np.isin(reference, TOTALSEG_LUNG_LOBES)
    assert np.mean(labels[lungs] == AIR) > 0.95


def test_tumour_of_limb_is_soft_tissue_inside_the_body():
    vol = read_volume(LIMB_NII)
    labels = threshold_anatomy(vol)
    gtv = read_mask(LIMB_MASK_NII, like=vol).array > 0
    assert np.all(labels[gtv] > 0)
    assert np.mean(labels[gtv] == SOFT) > 0.95


@pytest.mark.parametrize("encoding, num_classes, channels", [
    ("onehot", 4, 4), ("binary", 4, 3), ("onehot", TOTALSEG_BODY_LABEL, 118), ("binary", TOTALSEG_BODY_LABEL, 7),
])
def test_encoding_round_trip(chest, encoding, num_classes, channels):
    spec = AnatomySpec(source="threshold", encoding=encoding, num_classes=num_classes)
    assert spec.num_channels == channels
    labels = chest[1][20:24, ::16, ::16]
    if num_classes > 4:  # exercise every label value, not only the threshold classes
        labels = (np.arange(labels.size).reshape(labels.shape) % (num_classes + 1)).astype(np.uint8)
    encoded = encode_anatomy(labels, spec)
    assert encoded.dtype == np.float32 and encoded.shape == (channels,) + labels.shape
    assert set(np.unique(encoded)) <= {0.0, 1.0}
    assert not encoded[:, labels == 0].any()  # outside the body encodes as all zeros
    np.testing.assert_array_equal(decode_anatomy(encoded, spec), labels)
    assert AnatomySpec.from_dict(spec.to_dict()) == spec


def test_encoding_refuses_labels_the_model_does_not_know():
    with pytest.raises(InputError, match="0..4"):
        encode_anatomy(np.full((2, 2, 2), 7, np.uint8), AnatomySpec())
    with pytest.raises(InputError, match="encoding"):
        AnatomySpec(encoding="rgb")


def test_missing_totalsegmentator_says_what_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = totalsegmentator_problem()
    assert "TotalSegmentator package" in problem and "weights" in problem and "TOTALSEG_HOME_DIR" in problem
    vol = read_volume(ABDOMEN_SMALL_NII)
    with pytest.raises(ResourceError, match="totalseg_download_weights"):
        totalsegmentator_anatomy(vol)
    with caplog.at_level(logging.INFO):
        labels, source = get_anatomy(vol, source="auto")
    assert source == "threshold" and "threshold anatomy instead" in caplog.text
    np.testing.assert_array_equal(labels, threshold_anatomy(vol))


def test_totalsegmentator_subprocess_and_body_class(tmp_path, monkeypatch):
    """A stand-in TotalSegmentator command (copies the stored reference output) exercises the real call."""
    reference_seg = ABDOMEN_SMALL_NII.parent / "example_seg.nii.gz"
    fake = tmp_path / "bin" / "TotalSegmentator"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                    f"args = sys.argv[1:]\nshutil.copy({str(reference_seg)!r}, args[args.index('-o') + 1])\n")
    fake.chmod(0o755)
    for n in range(291, 296):
        (tmp_path / "home" / "nnunet" / "results" / f"Dataset{n}_total").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    assert totalsegmentator_problem() is None
    vol = read_volume(ABDOMEN_SMALL_NII)
    labels, source = get_anatomy(vol, source="auto")
    organs = read_mask(reference_seg, like=vol).array
    assert source == "totalsegmentator"
    np.testing.assert_array_equal(labels[organs > 0], organs[organs > 0])
    body_only = labels == TOTALSEG_BODY_LABEL
    assert body_only.any() and not np.any(organs[body_only])
    assert np.all(labels[threshold_anatomy(vol) == 0] != TOTALSEG_BODY_LABEL)
    # A sheared grid cannot go to TotalSegmentator as NIfTI: `auto` says so and uses the threshold anatomy,
    # an explicit request is refused (not a message about a temporary file the user never named).
    tilt = np.deg2rad(15)
    sheared = Volume(vol.array, vol.spacing, vol.origin, (1.0, 0, 0, 0, 1.0, float(np.sin(tilt)), 0, 0, float(np.cos(tilt))))
    labels, source = get_anatomy(sheared, source="auto")
    assert source == "threshold"
    with pytest.raises(InputError, match="TotalSegmentator cannot run on this CT: its axes are not perpendicular"):
        totalsegmentator_anatomy(sheared)


#: A stand-in TotalSegmentator whose behaviour STUB_MODE picks; it leaves a file in its temporary folder.
_STUB = """#!{python}
import os, signal, sys, tempfile, time
mode = os.environ["STUB_MODE"]
args = sys.argv[1:]
source, target = args[args.index("-i") + 1], args[args.index("-o") + 1]
open(os.path.join(tempfile.gettempdir(), "nnunet_tmp_copy"), "w").write("a copy of the CT")
log = open(os.environ["STUB_LOG"], "a")
log.write("temporary folder " + tempfile.gettempdir() + "\\n"); log.flush()
signal.signal(signal.SIGTERM, lambda *a: (log.write("asked to stop\\n"), sys.exit(1)))
sys.stdout.buffer.write(b"progress \\xe2\\x96\\x8f \\x9d\\n")  # a tqdm bar, then a byte that is not UTF-8
sys.stdout.flush()
if mode == "hang":
    time.sleep(600)
if mode == "error":
    print("ERROR: the licence of this task is missing")
    sys.exit(1)
if mode == "nothing":
    sys.exit(0)
import numpy as np  # only now: on a loaded machine these imports took seconds, which the "hang" timeout counts
import SimpleITK as sitk
image = sitk.ReadImage(source)
labels = np.zeros(sitk.GetArrayFromImage(image).shape, np.int16)
if mode == "organ":
    labels[:, 40:60, 40:60] = 5
if mode == "high":
    labels[:, 40:60, 40:60] = 200
if mode == "short":
    labels = labels[:, 1:]
seg = sitk.GetImageFromArray(labels)
seg.SetSpacing(image.GetSpacing()); seg.SetDirection(image.GetDirection())
seg.SetOrigin(image.GetOrigin() if mode != "shifted" else tuple(o + 2.0 for o in image.GetOrigin()))
sitk.WriteImage(seg, target)
"""


@pytest.fixture
def stub_totalsegmentator(tmp_path, monkeypatch):
    """The stub as the TotalSegmentator command, with weight folders; returns the temporary root the call sees."""
    fake = tmp_path / "bin" / "TotalSegmentator"
    fake.parent.mkdir()
    fake.write_text(_STUB.format(python=sys.executable))
    fake.chmod(0o755)
    for n in range(291, 296):
        (tmp_path / "weights" / f"Dataset{n}_total").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))  # TotalSegmentator's own override
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "stub.log"))
    return temporary


def log_lines(temporary):
    return (temporary.parent / "stub.log").read_text().splitlines()


def test_totalsegmentator_results_are_checked_as_its_own(stub_totalsegmentator, monkeypatch):
    """No organ is a valid result (body only); a result off the grid or outside the task's labels is
    TotalSegmentator's fault, said so; logs in any encoding are read; its temporary files go with ours."""
    vol = read_volume(ABDOMEN_SMALL_NII)
    body = threshold_anatomy(vol) > 0
    monkeypatch.setenv("STUB_MODE", "organ")
    labels = totalsegmentator_anatomy(vol)
    assert np.all(labels[:, 40:60, 40:60] == 5)
    monkeypatch.setenv("STUB_MODE", "empty")
    labels = totalsegmentator_anatomy(vol)
    assert np.array_equal(labels == TOTALSEG_BODY_LABEL, body) and set(np.unique(labels)) == {0, TOTALSEG_BODY_LABEL}
    for mode, message in (("high", "labels span 0..200, not 0..117"), ("short", "size"), ("shifted", "origin"),
                          ("error", "exit 1.*ERROR: the licence of this task is missing"),
                          ("nothing", "exited without writing a segmentation")):
        monkeypatch.setenv("STUB_MODE", mode)
        with pytest.raises(ResourceError, match=message):
            totalsegmentator_anatomy(vol)
    assert list(stub_totalsegmentator.iterdir()) == []
    used = {line.split(" ", 2)[2] for line in log_lines(stub_totalsegmentator)}
    assert len(used) == 7 and all(os.path.dirname(folder) == str(stub_totalsegmentator) for folder in used), used


def test_totalsegmentator_found_in_this_pythons_scripts_and_stopped_on_timeout(stub_totalsegmentator, monkeypatch):
    import sysconfig

    scripts = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(stub_totalsegmentator))  # not on PATH: a virtual environment not activated
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: scripts if name == "scripts" else None)
    assert totalsegmentator_problem() is None
    monkeypatch.setenv("STUB_MODE", "hang")
    job = stub_totalsegmentator.parent / "job"  # a job may name the folder for the copies of the CT
    job.mkdir()
    monkeypatch.setenv(TEMPORARY_ROOT_ENV, str(job))
    start = time.monotonic()
    with pytest.raises(ResourceError, match="did not finish within 10 s; it was stopped"):
        totalsegmentator_anatomy(read_volume(ABDOMEN_SMALL_NII), timeout_s=10)
    assert time.monotonic() - start < 30
    assert list(stub_totalsegmentator.iterdir()) == [] and list(job.iterdir()) == []
    assert os.path.dirname(log_lines(stub_totalsegmentator)[0].split(" ", 2)[2]) == str(job)
    assert (stub_totalsegmentator.parent / "stub.log").read_text().endswith("asked to stop\n")  # a chance to clean up


def test_a_second_cancel_while_totalsegmentator_stops_still_kills_it():
    from MedDiffFMLib import anatomy

    class Process:
        calls = []

        def terminate(self):
            self.calls.append("terminate")

        def wait(self, timeout=None):
            if timeout is not None:  # the grace period, cut short by a second Ctrl-C
                raise KeyboardInterrupt
            self.calls.append("reaped")

        def poll(self):
            return None if "kill" not in self.calls else -9

        def kill(self):
            self.calls.append("kill")

    with pytest.raises(KeyboardInterrupt):
        anatomy._stop(Process())
    assert Process.calls == ["terminate", "kill", "reaped"]


def test_user_labels_must_match_the_image():
    vol = read_volume(LIMB_NII)
    gtv = read_mask(LIMB_MASK_NII, like=vol)
    labels, source = get_anatomy(vol, source="user", user_labels=gtv)
    assert source == "user" and np.array_equal(labels, gtv.array)
    with pytest.raises(InputError, match="not on the grid"):
        get_anatomy(vol, source="user", user_labels=gtv.array[:-1])
    with pytest.raises(InputError, match="needs a label map"):
        get_anatomy(vol, source="user")


def test_threshold_anatomy_is_robust_to_low_dose_noise():
    """60 HU of added noise (a strongly reduced dose) barely changes the classes."""
    vol = read_volume(LIMB_NII)
    clean = threshold_anatomy(vol)
    noise = np.random.default_rng(0).normal(0.0, 60.0, vol.shape).astype(np.float32)
    noisy = threshold_anatomy(vol.with_array(vol.array + noise))
    assert np.mean((noisy > 0) == (clean > 0)) > 0.995
    assert np.mean(noisy == clean) > 0.95


def test_in_plane_morphology_matches_scipy():
    """The body mask's opening and per-slice hole filling (faster, hand-written) against scipy's, on random masks
    whose parts touch the image border."""
    from scipy import ndimage

    from MedDiffFMLib.anatomy import _dilate_in_plane, _erode_in_plane, _fill_holes_in_plane

    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.random((4, 23, 31)), (0, 1.5, 1.5))
    for density in (0.3, 0.6, 0.85):
        mask = field < np.quantile(field, density)
        assert mask[:, [0, -1]].any() and not mask.all()
        np.testing.assert_array_equal(_erode_in_plane(mask, 2),
                                      ndimage.binary_erosion(mask, in_plane, iterations=2))
        np.testing.assert_array_equal(_dilate_in_plane(mask, 2),
                                      ndimage.binary_dilation(mask, in_plane, iterations=2))
        np.testing.assert_array_equal(_fill_holes_in_plane(mask), ndimage.binary_fill_holes(mask, in_plane))
