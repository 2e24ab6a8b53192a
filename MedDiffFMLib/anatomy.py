"""Anatomy label maps (the fine-grained condition of the network) and their channel encoding.

Three sources:
- `threshold`: download-free, always works: body mask + air/lung, fat, soft tissue, bone from HU.
- `totalsegmentator`: the paper's 117 TotalSegmentator classes + a body class (118), used when the
  TotalSegmentator package and its weights are installed.
- `user`: a label map supplied by the user (e.g. exported from 3D Slicer), on the image grid.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from .errors import InputError, ResourceError
from .io import Volume, as_label_array, has_perpendicular_axes, read_volume, write_volume
from .orientation import AxisOrder
from .smoothing import gaussian_filter
from .validation import check_mask

log = logging.getLogger(__name__)

#: Threshold-anatomy classes (0 = outside the body).
THRESHOLD_CLASSES = {1: "air/lung", 2: "fat", 3: "soft tissue", 4: "bone"}
#: Body = smoothed HU above this, largest connected component, holes filled per axial slice.
BODY_HU = -500.0
#: Separate parts at least this fraction of the largest one also count as body (legs, arms).
BODY_PART_FRACTION = 0.1
#: Upper HU bounds of air/lung, fat and soft tissue on the smoothed image; bone is above the last.
TISSUE_UPPER_HU = (-300.0, -30.0, 250.0)
#: Gaussian smoothing (mm) before thresholding, so low-dose noise does not speckle the classes.
SMOOTHING_MM = 1.0

#: TotalSegmentator v2 `total` task: 117 classes; MedDiffFM adds the rest of the body as class 118.
TOTALSEG_CLASSES = 117
TOTALSEG_BODY_LABEL = TOTALSEG_CLASSES + 1

SOURCES = ("threshold", "totalsegmentator", "user")
ENCODINGS = ("onehot", "binary")


@dataclass
class AnatomySpec:
    """Which anatomy a model expects: its source, the number of classes K (labels 1..K) and the encoding.

    Channel values are in {0, 1} for both encodings: `onehot` has one channel per class 1..K;
    `binary` has ceil(log2(K + 1)) channels holding the bits of the label (least significant first).
    Label 0 (outside the body) is all zeros in both.
    """

    source: str = "threshold"
    encoding: str = "onehot"
    num_classes: int = len(THRESHOLD_CLASSES)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise InputError(f"unknown anatomy source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"unknown anatomy encoding {self.encoding!r}; choose one of {', '.join(ENCODINGS)}")
        if self.num_classes < 1:
            raise InputError(f"anatomy num_classes must be >= 1, got {self.num_classes}")

    @property
    def num_channels(self) -> int:
        if self.encoding == "onehot":
            return self.num_classes
        return max(1, math.ceil(math.log2(self.num_classes + 1)))

    def to_dict(self) -> Dict[str, Union[str, int]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Union[str, int]]) -> "AnatomySpec":
        return cls(source=str(data["source"]), encoding=str(data["encoding"]),
                   num_classes=int(data["num_classes"]))


def encode_anatomy(labels: np.ndarray, spec: AnatomySpec) -> np.ndarray:
    """Label map (z, y, x) -> float32 channels (C, z, y, x) as declared by `spec`."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > spec.num_classes):
        raise InputError(f"anatomy labels span {labels.min()}..{labels.max()} but the model expects "
                         f"0..{spec.num_classes} ({spec.source} anatomy)")
    if spec.encoding == "onehot":
        classes = np.arange(1, spec.num_classes + 1).reshape((-1,) + (1,) * labels.ndim)
        return (labels[None] == classes).astype(np.float32)
    bits = np.arange(spec.num_channels).reshape((-1,) + (1,) * labels.ndim)
    return ((labels.astype(np.int64)[None] >> bits) & 1).astype(np.float32)


def decode_anatomy(channels: np.ndarray, spec: AnatomySpec) -> np.ndarray:
    """Inverse of `encode_anatomy` (channels thresholded at 0.5): (C, z, y, x) -> uint labels (z, y, x)."""
    on = np.asarray(channels) > 0.5
    if spec.encoding == "onehot":
        labels = np.where(on.any(axis=0), on.argmax(axis=0) + 1, 0)
    else:
        weights = (1 << np.arange(on.shape[0])).reshape((-1,) + (1,) * (on.ndim - 1))
        labels = (on * weights).sum(axis=0)
    return labels.astype(np.uint8 if spec.num_classes < 256 else np.uint16)


def _smoothed_hu(vol: Volume) -> np.ndarray:
    sigma = [SMOOTHING_MM / s for s in vol.spacing_zyx]
    # Filtered in float32: a float64 CT filtered straight into float32 rounds differently at the class limits.
    return gaussian_filter(vol.array.astype(np.float32, copy=False), sigma=sigma, truncate=2.0)


def body_mask(vol: Volume, smoothed: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean (z, y, x) body mask: HU > -500 (smoothed), largest 3D parts, holes filled per axial slice (in
    patient axis order, however `vol` is stored)."""
    smoothed = _smoothed_hu(vol) if smoothed is None else smoothed
    order = AxisOrder.of(vol.direction)
    return order.inverse().array(_axial_body_mask(order.array(smoothed)))


def _axial_body_mask(smoothed: np.ndarray) -> np.ndarray:
    """`body_mask` of a smoothed CT whose array axis 0 is the head-foot axis."""
    from scipy import ndimage

    # An in-plane opening cuts thin bridges (table, cables, blankets) before picking the largest part.
    opened = _dilate_in_plane(_erode_in_plane(smoothed > BODY_HU, 2), 2)
    components, count = ndimage.label(opened)
    if count == 0:
        return np.zeros(opened.shape, bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    # The largest component, plus parts nearly as big (the other leg, raised arms); drops table and noise.
    body = (sizes >= BODY_PART_FRACTION * sizes.max())[components]
    # Holes per axial slice: lungs and bowel gas are enclosed in-plane, not in 3D (trachea, cropped ends).
    return _fill_holes_in_plane(body)


# Binary morphology with the in-plane cross (4-neighbourhood), outside the image counting as background: what
# ndimage.binary_opening / binary_fill_holes compute with that structure, 3-5x faster on a whole CT.
_IN_PLANE_SHIFTS = ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None)))


def _erode_in_plane(mask: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        eroded = mask.copy()
        for axis in (1, 2):
            for here, there in _IN_PLANE_SHIFTS:
                eroded[_along(axis, here)] &= mask[_along(axis, there)]
            eroded[_along(axis, 0)] = eroded[_along(axis, -1)] = False
        mask = eroded
    return mask


def _dilate_in_plane(mask: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        dilated = mask.copy()
        for axis in (1, 2):
            for here, there in _IN_PLANE_SHIFTS:
                dilated[_along(axis, here)] |= mask[_along(axis, there)]
        mask = dilated
    return mask


def _along(axis: int, index) -> tuple:
    return (slice(None),) * axis + (index,)


def _fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """`mask` plus the background parts of each axial slice that do not reach the slice's border."""
    from scipy import ndimage

    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = ndimage.label(~mask, structure=in_plane)
    keep = np.ones(count + 1, bool)
    keep[background[:, [0, -1], :]] = False
    keep[background[:, :, [0, -1]]] = False
    keep[0] = True  # label 0 is the mask itself
    return keep[background]


def threshold_anatomy(vol: Volume) -> np.ndarray:
    """uint8 label map (z, y, x): 0 outside body, 1 air/lung, 2 fat, 3 soft tissue, 4 bone."""
    smoothed = _smoothed_hu(vol)
    body = body_mask(vol, smoothed)
    # 1 + the number of class limits each voxel reaches (np.digitize's classes, ten times faster on a whole CT).
    labels = np.ones(smoothed.shape, np.uint8)
    for upper in TISSUE_UPPER_HU:
        labels += smoothed >= upper
    labels[~body] = 0
    return labels


def class_volumes_ml(labels: np.ndarray, spacing: Tuple[float, float, float],
                     names: Optional[Dict[int, str]] = None) -> Dict[str, float]:
    """Volume in ml of each nonzero label (keyed by name where `names` has one)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64))
    names = names or {}
    return {names.get(k, str(k)): round(float(counts[k]) * voxel_ml, 2)
            for k in range(1, counts.size) if counts[k]}


def _totalsegmentator_command() -> Optional[str]:
    """The TotalSegmentator command: on PATH, or among this Python's scripts (a virtual environment not activated)."""
    import sysconfig

    return shutil.which("TotalSegmentator") or shutil.which("TotalSegmentator", path=sysconfig.get_path("scripts"))


def _totalsegmentator_weights() -> Path:
    """Where TotalSegmentator looks for its weights: TOTALSEG_WEIGHTS_PATH if set, else its home's nnunet/results."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    return Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator")) / "nnunet" / "results"


def totalsegmentator_problem() -> Optional[str]:
    """None if TotalSegmentator and its `total` weights are installed, else what is missing and how to fix it."""
    results = _totalsegmentator_weights()
    # Weight folders of the `total` task: its five 1.5 mm part models (not the 3 mm --fast one, which the paper's
    # anatomy is not).
    patterns = [f"Dataset{n}_*" for n in range(291, 296)]
    missing = []
    if _totalsegmentator_command() is None:
        missing.append("the TotalSegmentator package (command 'TotalSegmentator' neither on PATH nor among this "
                       "Python's scripts)")
    absent = [p for p in patterns if not any(results.glob(p))]
    if absent:
        missing.append(f"its weights for the 'total' task ({', '.join(absent)} in {results})")
    if not missing:
        return None
    return ("TotalSegmentator anatomy is unavailable: missing " + " and ".join(missing) + ". To install: "
            "pip install TotalSegmentator; on a machine with internet run 'totalseg_download_weights -t total', "
            "copy its ~/.totalsegmentator folder to this machine and set TOTALSEG_HOME_DIR to that folder.")


#: TotalSegmentator reads NIfTI, which cannot hold a sheared grid.
SHEARED_FOR_TOTALSEGMENTATOR = ("TotalSegmentator cannot run on this CT: its axes are not perpendicular (a sheared "
                                "grid, e.g. from a gantry tilt), which its NIfTI input cannot store; resample the CT "
                                "onto an orthogonal grid first, or use the threshold anatomy.")
#: Environment variable naming the folder for TotalSegmentator's temporary files (copies of the CT); unset: the
#: system's temporary folder.
TEMPORARY_ROOT_ENV = "MEDDIFFFM_TEMPORARY_ROOT"
#: Seconds a cancelled TotalSegmentator gets to exit before it is killed.
STOP_GRACE_S = 10.0


def totalsegmentator_anatomy(vol: Volume, timeout_s: Optional[float] = None) -> np.ndarray:
    """TotalSegmentator `total` labels 1..117 plus body (118) on the grid of `vol`, as uint8 (z, y, x).

    Runs the TotalSegmentator command in a subprocess, whose temporary files go into this call's temporary folder;
    raises ResourceError when the package or its weights are missing, when it fails or runs past `timeout_s`, and
    when its segmentation is not a `total` label map on the CT's grid. No organ found is a valid result (body only).
    """
    problem = totalsegmentator_problem()
    if problem:
        raise ResourceError(problem)
    if not has_perpendicular_axes(vol):
        raise InputError(SHEARED_FOR_TOTALSEGMENTATOR)
    # A job may name where its temporary files go (the Slicer module: its job folder, removed even after a crash).
    with tempfile.TemporaryDirectory(prefix="meddifffm-totalseg-", dir=os.environ.get(TEMPORARY_ROOT_ENV)) as tmp:
        image_path, seg_path = Path(tmp) / "ct.nii.gz", Path(tmp) / "seg.nii.gz"
        write_volume(vol, image_path)
        command = [_totalsegmentator_command(), "-i", str(image_path), "-o", str(seg_path), "--ml"]
        log.info("running %s", " ".join(command))
        returncode, output = _run_to_end(command, tmp, timeout_s)
        if returncode != 0 or not seg_path.exists():
            what = f"exit {returncode}" if returncode != 0 else "it exited without writing a segmentation"
            raise ResourceError(f"TotalSegmentator failed ({what}): " + " | ".join(output.strip().splitlines()[-8:]))
        organs = _read_totalsegmentator_output(seg_path, vol)
    labels = organs.astype(np.uint8)
    labels[(labels == 0) & body_mask(vol)] = TOTALSEG_BODY_LABEL
    return labels


def _run_to_end(command, tmp: str, timeout_s: Optional[float]) -> Tuple[int, str]:
    """(exit code, stdout + stderr) of `command`, its temporary files under `tmp`. A cancel (Ctrl-C, `kill`) or the
    timeout stops it before returning or raising. It stays in this process's group, so a job killed as a group
    takes it along."""
    env = dict(os.environ, TMPDIR=tmp, TEMP=tmp, TMP=tmp)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise ResourceError(f"TotalSegmentator did not finish within {timeout_s:g} s; it was stopped") from None
    except BaseException:
        _stop(process)
        raise
    # Its logs may hold bytes of another encoding (progress bars): never fail on them.
    return process.returncode, output.decode("utf-8", errors="replace")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S, also when a second cancel interrupts the wait."""
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _read_totalsegmentator_output(path: Path, vol: Volume) -> np.ndarray:
    """TotalSegmentator's labels, refused (as its fault, not the user's) unless on the CT's grid with labels 0..117."""
    seg = read_volume(path)
    problems = vol.grid_differences(seg, names=("CT", "segmentation"))
    if not problems:
        values = seg.array
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            problems = ["it holds non-integer values"]
        elif values.size and (values.min() < 0 or values.max() > TOTALSEG_CLASSES):
            problems = [f"its labels span {values.min():g}..{values.max():g}, not 0..{TOTALSEG_CLASSES} of the "
                        "'total' task"]
    if problems:
        raise ResourceError("TotalSegmentator returned an unexpected segmentation (" + "; ".join(problems) + "); "
                            "check its version (v2, task 'total') or use the threshold anatomy")
    return seg.array.astype(np.uint8)


def get_anatomy(vol: Volume, source: str = "auto",
                user_labels: Union[Volume, np.ndarray, None] = None) -> Tuple[np.ndarray, str]:
    """Anatomy label map for `vol` and the source actually used.

    `auto`: the user's labels if given, else TotalSegmentator if installed, else threshold anatomy (logged).
    An explicit source never falls back: a model conditioned on one source needs exactly that source.
    """
    if source == "auto":
        if user_labels is not None:
            source = "user"
        else:
            problem = totalsegmentator_problem() or (
                None if has_perpendicular_axes(vol) else SHEARED_FOR_TOTALSEGMENTATOR)
            if problem:
                log.info("%s Using the download-free threshold anatomy instead.", problem)
                source = "threshold"
            else:
                source = "totalsegmentator"
    if source == "threshold":
        return threshold_anatomy(vol), source
    if source == "totalsegmentator":
        return totalsegmentator_anatomy(vol), source
    if source == "user":
        if user_labels is None:
            raise InputError("anatomy source 'user' needs a label map (user_labels / --anatomy-labels)")
        if isinstance(user_labels, np.ndarray):
            user_labels = vol.with_array(user_labels) if user_labels.shape == vol.shape else Volume(user_labels)
        check_mask(user_labels, vol, name="anatomy label map")
        return as_label_array(user_labels.array, name="anatomy label map"), source
    raise InputError(f"unknown anatomy source {source!r}; choose auto or one of {', '.join(SOURCES)}")
