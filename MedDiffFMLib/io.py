"""Reading and writing CT volumes and label maps with their geometry (SimpleITK underneath).

Arrays are (z, y, x) as `SimpleITK.GetArrayFromImage` gives them; `spacing` and `origin` are (x, y, z)
in mm (LPS) and `direction` is the row-major 3x3 matrix as 9 floats, exactly as SimpleITK stores them.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import hashlib
import locale
import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import CheckpointError, InputError, is_out_of_memory
from .validation import check_dimensions, check_mask, check_output_path, format_pair, format_values

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Seconds os.replace is retried on Windows, where a file another program holds open (a CSV in a spreadsheet, weights
#: being hashed) cannot be replaced for a moment (PermissionError); elsewhere that error is final at once.
REPLACE_RETRY_S = 2.0 if os.name == "nt" else 0.0


def _ansi_code_page() -> Optional[int]:
    """The Windows process's ANSI code page (65001 = UTF-8); None elsewhere."""
    if os.name != "nt":
        return None
    import ctypes

    return int(ctypes.windll.kernel32.GetACP())


#: ITK opens files through the ANSI code page on Windows, so SimpleITK cannot find a path with a character outside
#: ASCII there (SimpleITK issues 795 and 1255: "the file ... does not exist", or a DICOM folder without series),
#: unless that code page is UTF-8: in 3D Slicer's processes, or with Windows' "Use Unicode UTF-8 for worldwide
#: language support". `itk_path` then passes the short (8.3) names Windows keeps.
ITK_NEEDS_ASCII_PATHS = os.name == "nt" and _ansi_code_page() != 65001

#: File name endings SimpleITK reads as a single volume.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Endings `write_volume` writes: single files only. A .nhdr/.mhd header names a separate data file, which
#: the write-to-a-temporary-name-then-rename of `atomic_path` cannot move along with it.
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

#: A temporary file of `atomic_path` untouched for this long was left by a writer that was killed (SIGKILL, a power
#: cut), which no clean-up code outlives; the next write of the same file removes it. Writes take seconds to minutes.
STALE_TEMPORARY_S = 3600.0

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Default tolerance (mm for spacing/origin, unitless for direction cosines) for "same grid".
#: NIfTI stores geometry as float32, so exact equality is too strict after a round trip.
GRID_TOLERANCE = 1e-3


@dataclass
class Volume:
    """A 3D image on a physical grid. `array` is (z, y, x); geometry tuples are SimpleITK's (x, y, z)."""

    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)
        # Checked here, where a script builds one, rather than deep inside SimpleITK or numpy later.
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError(f"a Volume needs 3 spacing and 3 origin values (x, y, z) and a 3 x 3 direction (9 "
                             f"values), got {len(self.spacing)}, {len(self.origin)} and {len(self.direction)}")
        if min(self.spacing) <= 0:
            raise InputError(f"voxel spacing must be > 0 mm along every axis, got {self.spacing}")

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        """Spacing in array axis order, for code that works on `array` directly."""
        return tuple(reversed(self.spacing))

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new Volume on the same grid holding `array` (must have the same shape)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {tuple(array.shape)} differs from the grid shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def crop(self, box: Sequence[slice]) -> "Volume":
        """The sub-volume `array[box]` (z, y, x slices, step 1), its origin moved so every voxel keeps its
        physical position."""
        box = tuple(box)
        if len(box) != 3 or not all(isinstance(s, slice) for s in box):
            raise InputError(f"a crop needs three slices (z, y, x), got {box!r}")
        starts = []
        for axis_slice, size in zip(reversed(box), reversed(self.shape)):
            start, stop, step = axis_slice.indices(size)
            if step != 1 or stop <= start:
                raise InputError(f"a crop needs contiguous, non-empty slices (step 1), got {box!r}")
            starts.append(start)
        array = self.array[box]
        direction = np.asarray(self.direction).reshape(3, 3)
        origin = np.asarray(self.origin) + direction @ (np.asarray(starts) * np.asarray(self.spacing))
        return Volume(array.copy(), self.spacing, tuple(float(o) for o in origin), self.direction)

    def to_sitk(self) -> sitk.Image:
        # SimpleITK has no boolean pixel type: boolean masks become 0/1 uint8.
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, dtype=None) -> "Volume":
        """Volume from a 3D scalar SimpleITK image; 2D, 4D and multi-component images are refused."""
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
                "vector image); MedDiffFM needs a single-channel (grey-value) CT volume")
        if image.GetDimension() != 3:  # thin 3D volumes are valid here; check_ct refuses them for tasks
            check_dimensions(tuple(reversed(image.GetSize())))
        array = sitk.GetArrayFromImage(image)
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        return cls(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def grid_differences(self, other: "Volume", tol: float = GRID_TOLERANCE,
                         names: Sequence[str] = ("this", "other")) -> List[str]:
        """Human-readable list of how the grids of `self` and `other` differ (empty if they match); `names` label
        the two values, e.g. ("image", "mask") gives "size (x,y,z): image (80, 80, 16), mask (512, 512, 48)". Every
        tuple is in (x, y, z), as `info` and the file's header give them."""
        def differ(what: str, mine: str, theirs: str) -> str:
            return f"{what}: {names[0]} {mine}, {names[1]} {theirs}"

        diffs = []
        if self.shape[-3:] != other.shape[-3:]:
            diffs.append(differ("size (x,y,z)", str(self.shape[-3:][::-1]), str(other.shape[-3:][::-1])))
        for name, label in (("spacing", "spacing (x,y,z) mm"), ("origin", "origin (x,y,z) mm"),
                            ("direction", "direction")):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(mine, theirs, rtol=0.0, atol=tol):
                diffs.append(differ(label, *format_pair(mine, theirs)))
        return diffs

    def same_grid(self, other: "Volume", tol: float = GRID_TOLERANCE) -> bool:
        return not self.grid_differences(other, tol)


def sibling_path(path: PathLike, tag: str, suffix: Optional[str] = None) -> Path:
    """`out/ct.nii.gz` + `_anatomy` -> `out/ct_anatomy.nii.gz` (`suffix` replaces the volume suffix)."""
    path = Path(path)
    name = path.name
    ending = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), path.suffix)
    stem = name[: len(name) - len(ending)]
    return path.with_name(stem + tag + (ending if suffix is None else suffix))


def check_input_found(path: PathLike) -> Path:
    """`path`, refused when nothing is there."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    return path


def read_volume(path: PathLike) -> Volume:
    """Read a CT as float32 HU: a NIfTI/NRRD/MHA file, a DICOM series folder or one file of a series.

    A folder with several DICOM series gives the series with the most files (logged; a tie is refused). A series
    with uneven slice gaps or gantry tilt is resampled onto an orthogonal grid of even slices (`_even_slices`).
    """
    path = check_input_found(path)
    float_voxels = None
    if path.is_dir():
        image = _read_dicom_folder(path, series_id=None)
    elif is_dicom_file(path):
        _refuse_non_image_object(path)  # before GDCM, which has no reader for objects without pixels
        uid = _dicom_tags(path, ("0020|000e",))["0020|000e"]
        image = _read_dicom_folder(path.parent, series_id=uid)
    else:
        image, float_voxels = _read_file(path)
    vol = Volume.from_sitk(image, dtype=np.float32)
    if float_voxels is not None:
        _restore_nonfinite(vol.array, float_voxels)
    return vol


def read_mask(path: PathLike, like: Volume, what: str = "mask") -> Volume:
    """Read a label map (integer labels, 0 = background) that must lie on the grid of `like`; `what` names it in
    messages ("mask", "anatomy label map").

    Nothing is resampled. A mask stored on a block of the image grid (3D Slicer saves segmentations
    cropped to their extent) is placed onto the full grid; any other grid is an error saying how it differs.
    """
    check_dimensions(like.array.shape)  # a 2D or 4D image is the first thing to fix, whatever the mask's grid
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir() or is_dicom_file(path):
        raise InputError(f"{what} {path.name}: give a label-map file (.nii.gz, .nrrd, .seg.nrrd, .mha); DICOM "
                         "masks (DICOM SEG) are not read, export them as a label map first")
    image, float_voxels = _read_file(path)
    if float_voxels is not None and not np.all(np.isfinite(float_voxels)):  # ITK would have read them as 0
        raise InputError(f"{what} {path.name} holds NaN or infinite values; a label map holds whole numbers "
                         "(0 = background, 1, 2, ... = labels)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {path.name} has {image.GetNumberOfComponentsPerPixel()} layers (overlapping segments); "
            "export a single label map (3D Slicer: Segmentations > Export to files / labelmap) and retry")
    if image.GetDimension() != 3:  # Volume.from_sitk's message would speak of the CT
        raise InputError(f"{what} {path.name} has {image.GetDimension()} dimensions (size "
                         f"{tuple(reversed(image.GetSize()))}); give a 3D label map on the grid of the CT")
    mask = Volume.from_sitk(image)
    placed = _place_on_grid(mask, like)
    if placed is not None:
        block = "x".join(str(n) for n in reversed(mask.shape))
        # Masks are often saved cropped to their extent. Beyond an anatomy map's block the model is told that there
        # is no body, which the map cannot tell apart from a cut: say so.
        if what != "mask":
            log.warning("%s %s covers a %s block of the image grid: beyond it the model is told that there is no "
                        "body; if the CT holds body there, give a map of the whole CT", what, path.name, block)
        else:
            log.info("%s %s covers a %s block of the image grid; placed on the full grid (zeros around)", what,
                     path.name, block)
        mask = placed
    check_mask(mask, like, name=f"{what} {path.name}")
    return mask.with_array(as_label_array(mask.array, name=path.name))


def _place_on_grid(block: Volume, like: Volume, tol: float = GRID_TOLERANCE) -> Optional[Volume]:
    """`block` padded onto the grid of `like` if it is an aligned sub-block of it, else None."""
    if block.shape == like.shape or block.array.ndim != 3:
        return None
    if not (np.allclose(block.spacing, like.spacing, atol=tol)
            and np.allclose(block.direction, like.direction, atol=tol)):
        return None
    # Physical offset of the block's first voxel, in voxels of `like` along its own axes (x, y, z).
    axes = np.asarray(like.direction).reshape(3, 3) * np.asarray(like.spacing)
    offset_xyz = np.linalg.solve(axes, np.subtract(block.origin, like.origin))
    start_xyz = np.round(offset_xyz).astype(int)
    if not np.allclose(offset_xyz, start_xyz, atol=tol):
        return None
    start = start_xyz[::-1]
    stop = start + np.asarray(block.shape)
    if np.any(start < 0) or np.any(stop > np.asarray(like.shape)):
        return None
    full = np.zeros(like.shape, dtype=block.array.dtype)
    full[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = block.array
    return like.with_array(full)


def as_label_array(array: np.ndarray, name: str = "mask") -> np.ndarray:
    """Labels as the smallest fitting integer dtype; refuse fractional or negative values."""
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(
                f"{name} holds non-integer values; a mask must be a label map (0 = background, "
                "1, 2, ... = labels). Threshold or round it first.")
    if array.size and array.min() < 0:
        raise InputError(f"{name} holds negative labels (min {array.min()}); labels must be >= 0")
    top = int(array.max()) if array.size else 0
    if top > np.iinfo(np.int32).max:
        raise InputError(f"{name} holds labels up to {top}; labels must be at most {np.iinfo(np.int32).max}")
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.int32
    return array.astype(dtype)


def write_volume(vol: Volume, path: PathLike, overwrite: bool = False,
                 inputs: Iterable[PathLike] = (), series: Optional["DerivedSeries"] = None) -> Path:
    """Write `vol` atomically to a NIfTI/NRRD/MHA file, or to a folder as the DICOM series `series`; returns the
    path written.

    Refuses an existing file unless `overwrite`, and always refuses any path listed in `inputs`.
    """
    return write_volumes([(vol, path)], overwrite=overwrite, inputs=inputs, series=series)[0]


def write_volumes(items: Sequence[Tuple[Volume, PathLike]], overwrite: bool = False,
                  inputs: Iterable[PathLike] = (), series: Optional["DerivedSeries"] = None) -> List[Path]:
    """Write the (volume, path) pairs of one job all or none: each is checked and written to a temporary file
    (or folder) first, and only when all are complete do they replace their targets (back to back). A path that
    names a folder (`names_a_folder`) takes its volume as the new DICOM series `series` (see `write_series`)."""
    inputs = list(inputs)
    paths = [Path(path) for _, path in items]
    for vol, path in zip((vol for vol, _ in items), paths):
        if names_a_folder(path):
            _check_series_output(path, series, inputs)
        else:
            check_output_suffix(path)
            check_output_path(path, inputs=inputs, overwrite=overwrite)
        _check_writable(vol, path)
    # Read before any writing: a source that cannot be read is no disk problem.
    tags = _series_tags(series) if any(map(names_a_folder, paths)) else {}
    try:
        with contextlib.ExitStack() as stack:
            for (vol, _), path in zip(items, paths):
                if names_a_folder(path):
                    folder = stack.enter_context(atomic_path(path, folder=True))
                    _write_series_slices(vol, folder, {**tags, "0020|000e": new_uid()})  # each a series of its own
                    continue
                tmp = stack.enter_context(atomic_path(path))
                sitk.WriteImage(vol.to_sitk(), itk_path(tmp), useCompression=True)
                if path.name.lower().endswith(NIFTI_SUFFIXES):
                    try:  # ITK's NIfTI writer only prints a warning when the disk fills up
                        _check_nifti_complete(tmp, voxels=False)
                    except InputError:
                        raise OSError(f"{path.name} was written incomplete") from None
    except (RuntimeError, OSError) as exc:  # disk full, quota, file system gone read-only while running
        if is_out_of_memory(exc):
            raise
        raise InputError(f"cannot write {', '.join(map(str, paths))} ({_first_line(exc)}); check the free disk "
                         f"space and that {paths[0].parent} is writable, then retry (no partial file is left)"
                         ) from None
    return paths


def names_a_folder(path: PathLike) -> bool:
    """Whether an output path names a folder (one that exists, or a name without a suffix), which takes a result as
    a DICOM series, rather than a file."""
    path = Path(path)
    return path.is_dir() or not path.suffix


def is_dicom_input(path: PathLike) -> bool:
    """Whether `read_volume` reads `path` as a DICOM series: a folder, or one DICOM file standing for its series."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and is_dicom_file(path))


#: DICOM tags (pydicom keyword: SimpleITK key) a result written as a DICOM series takes from the input series, so
#: that it joins the patient's study beside it, and opens in the input's display window (in HU, as the result's are).
INPUT_TAGS = {"PatientName": "0010|0010", "PatientID": "0010|0020", "PatientBirthDate": "0010|0030",
              "PatientSex": "0010|0040", "StudyInstanceUID": "0020|000d", "StudyDate": "0008|0020",
              "StudyTime": "0008|0030", "StudyID": "0020|0010", "StudyDescription": "0008|1030",
              "AccessionNumber": "0008|0050", "ReferringPhysicianName": "0008|0090",
              "FrameOfReferenceUID": "0020|0052", "PositionReferenceIndicator": "0020|1040",
              "PatientPosition": "0018|5100", "BodyPartExamined": "0018|0015", "Laterality": "0020|0060",
              "KVP": "0018|0060", "WindowCenter": "0028|1050", "WindowWidth": "0028|1051",
              "WindowCenterWidthExplanation": "0028|1055"}

#: Of INPUT_TAGS, those DICOM allows only with a value (UIDs; the window, where present): left out where the
#: input's is empty. The others are copied as the input holds them, an empty one empty (an empty Laterality says
#: unknown, an absent one an unpaired body part).
VALUE_REQUIRED_TAGS = ("0020|000d", "0020|0052", "0028|1050", "0028|1051", "0028|1055")

#: Tags a CT image must hold even without a value (DICOM type 2): patient, study, patient position, frame of
#: reference, equipment and acquisition. Written empty where the input has none; GDCM would put today's date as the
#: study's.
TYPE_2_TAGS = ("0010|0010", "0010|0020", "0010|0030", "0010|0040", "0008|0020", "0008|0030", "0020|0010",
               "0008|0050", "0008|0090", "0018|5100", "0020|1040", "0008|0070", "0018|0060", "0020|0012")

#: Added to the input's Series Number for a result's series (subtracted where that would pass the largest
#: number DICOM allows), so that the two do not share one.
SERIES_NUMBER_OFFSET = 1000

#: Longest series description (DICOM's LO value) and largest series number (IS value).
DESCRIPTION_MAX_CHARS = 64
SERIES_NUMBER_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class DerivedSeries:
    """A result to be written as a new DICOM series of the study of an input series. `source`: that series as
    `read_volume` took it (its folder, or one of its files); `derivation`: what was done ("denoised"), which ends the
    series description; `keeps_grid`: the result is on the input's grid, so its slices are as thick as the input's
    (which overlapping reconstructions make thicker than their spacing), else as thick as their spacing."""

    source: Path
    derivation: str
    keeps_grid: bool = True


def write_series(vol: Volume, folder: PathLike, series: DerivedSeries, inputs: Iterable[PathLike] = ()) -> Path:
    """Write `vol` as a new DICOM series of the study of `series.source` into `folder` (new, or empty), atomically:
    int16 HU slices along its third axis (rescale slope 1, intercept 0), each placed and oriented as the grid says,
    so that `read_volume(folder)` gives the same grid and the values rounded to whole HU. Patient and study tags
    come from the input series; the series and every slice get new UIDs."""
    return write_volume(vol, folder, inputs=inputs, series=series)


def new_uid() -> str:
    """A new DICOM UID derived from a random UUID (the 2.25 root needs no registered organisation)."""
    return f"2.25.{uuid.uuid4().int}"


def _check_series_output(folder: Path, series: Optional[DerivedSeries], inputs: Sequence[PathLike]) -> None:
    """Refuse a DICOM series output without a DICOM input series, or that is not a new or empty folder outside
    the input series' folder."""
    if series is None:
        raise InputError(f"cannot write {folder}: a folder takes a DICOM series, which needs the input series it "
                         "derives from (series=DerivedSeries(...)); or give a file name such as "
                         f"{folder.with_name(folder.name + '.nii.gz')}")
    source = Path(series.source)
    if not is_dicom_input(source):
        raise InputError(f"cannot write {folder} as a DICOM series: its source {source} is not a DICOM series")
    # Nothing is written into the input series' folder, given itself or by one of its files.
    check_output_path(folder, inputs=list(inputs) + [source if source.is_dir() else source.parent], series=True)


def _check_series_grid(vol: Volume, name: str) -> None:
    """Refuse a grid a DICOM series would read back otherwise: slices are stacked along the normal of their rows and
    columns, so a sheared or left-handed grid would come back on another one."""
    direction = np.asarray(vol.direction, dtype=float).reshape(3, 3)
    if not has_perpendicular_axes(vol) or np.linalg.det(direction) < 0:
        raise InputError(f"cannot write {name} as a DICOM series: the CT's slice axis is not the normal of its rows "
                         "and columns (a sheared or left-handed grid), so a DICOM series would place the slices "
                         "elsewhere; write a .nrrd or .mha file instead")


def _series_file(source: Path) -> str:
    """One file of the DICOM series `read_volume(source)` reads."""
    if source.is_dir():
        files_by_series, uid = _find_series(source, None)
        return files_by_series[uid][0]
    return str(source)


def _series_tags(series: DerivedSeries) -> Dict[str, str]:
    """The tags every slice of the new series holds: the input series' patient and study, and the new series'
    own (fresh UID, description naming the task, a number apart from the input's, derived CT)."""
    import pydicom  # decodes text in any character set; it is written back as UTF-8

    source = pydicom.dcmread(_series_file(Path(series.source)), stop_before_pixels=True)
    tags = {key: _dicom_text(source.get(keyword)) for keyword, key in INPUT_TAGS.items()
            if keyword in source and (key not in VALUE_REQUIRED_TAGS or _dicom_text(source.get(keyword)).strip())}
    for key in ("0020|000d", "0020|0052"):  # one study and one frame of reference for all slices, even if unnamed
        tags.setdefault(key, new_uid())
    for key in TYPE_2_TAGS:
        tags.setdefault(key, "")
    thickness = _dicom_text(source.get("SliceThickness")).strip()
    if series.keeps_grid and thickness:
        tags["0018|0050"] = thickness
    suffix = f"MedDiffFM {series.derivation}"
    described = _dicom_text(source.get("SeriesDescription"))[:DESCRIPTION_MAX_CHARS - len(suffix) - 1].strip()
    try:
        number = int(_dicom_text(source.get("SeriesNumber")).strip())
    except ValueError:  # none, or not a number
        number = 0
    number += SERIES_NUMBER_OFFSET if number + SERIES_NUMBER_OFFSET <= SERIES_NUMBER_MAX else -SERIES_NUMBER_OFFSET
    now = time.localtime()
    tags.update({
        "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL",  # a CT image's third value: a slice, not a localizer
        "0020|000e": new_uid(), "0020|0011": str(number),
        "0008|103e": f"{described} {suffix}".strip(),
        "0008|2111": f"{series.derivation} by MedDiffFM, a generative model: not as acquired",
        "0008|0021": time.strftime("%Y%m%d", now), "0008|0031": time.strftime("%H%M%S", now),
        "0008|0023": time.strftime("%Y%m%d", now), "0008|0033": time.strftime("%H%M%S", now),
        "0028|1052": "0", "0028|1053": "1", "0028|1054": "HU"})  # GDCM would say "US": unspecified units
    if not all(value.isascii() for value in tags.values()):
        tags["0008|0005"] = "ISO_IR 192"  # UTF-8
    return tags


def _dicom_text(value) -> str:
    """A value pydicom read, as the text of its element: values joined by backslashes (a description typed with a
    backslash reads as two values, which str() would write as a Python list), '' for none."""
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    return "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)


def _write_series_slices(vol: Volume, folder: Path, tags: Dict[str, str]) -> None:
    """`vol` as one int16 DICOM file per slice along its third axis in `folder`, each with `tags` and its own
    position, orientation, thickness and spacing, instance number and SOP instance UID."""
    rounded = np.rint(vol.array)
    clipped = int(np.count_nonzero((rounded < -32768) | (rounded > 32767)))
    if clipped:
        log.warning("%d voxels lie beyond the -32768..32767 HU that DICOM's 16-bit slices hold; they are clipped",
                    clipped)
    image = vol.with_array(np.clip(rounded, -32768, 32767).astype(np.int16)).to_sitk()
    d = vol.direction  # row-major: columns are the x (along a row), y and slice axes
    orientation = "\\".join(_decimal_string(d[i]) for i in (0, 3, 6, 1, 4, 7))
    thickness = _decimal_string(vol.spacing[2])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # else ITK makes its own series and study UIDs
    width = max(4, len(str(image.GetDepth())))
    for k in range(image.GetDepth()):
        plane = image[:, :, k:k + 1]  # 3D: as a 2D image, GDCM would give a CT Spacing Between Slices of 1 mm
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(_decimal_string(v) for v in position))
        plane.SetMetaData("0020|0037", orientation)
        if "0018|0050" not in tags:  # the input's, where the result keeps its grid
            plane.SetMetaData("0018|0050", thickness)
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", new_uid())
        writer.SetFileName(itk_path(folder / f"{k + 1:0{width}d}.dcm"))
        with locale_kept():
            writer.Execute(plane)


@contextlib.contextmanager
def locale_kept() -> Iterator[None]:
    """Restore the process's locale after the block. GDCM, writing a DICOM slice with decimal tags (its position),
    leaves the whole process in the C locale, after which Python reads and writes text files as ASCII by default."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _decimal_string(value: float) -> str:
    """`value` as a DICOM decimal string: as many significant digits as its 16 characters hold."""
    return next(text for text in (f"{value:.{digits}g}" for digits in range(15, 6, -1)) if len(text) <= 16)


def has_perpendicular_axes(vol: Volume) -> bool:
    """False for a sheared grid (e.g. a gantry tilt kept in the geometry), which NIfTI cannot store."""
    direction = np.asarray(vol.direction, dtype=float).reshape(3, 3)
    return bool(np.allclose(direction.T @ direction, np.eye(3), atol=1e-4))


def _check_writable(vol: Volume, path: Path) -> None:
    """Refuse what a file would not keep: NaN (readers show it as 0 HU) and, in NIfTI, a sheared grid."""
    if vol.array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(vol.array)))
        if bad:  # a result with NaN comes from broken or diverged weights
            raise CheckpointError(f"the result has {bad} of {vol.array.size} voxels that are NaN or infinite, so "
                                  f"{path} was not written: the model's weights are broken (e.g. a training run that "
                                  "diverged); use another model")
    check_output_grid(vol, path)


def check_output_grid(vol: Volume, path: PathLike) -> None:
    """Refuse a NIfTI output or a DICOM series for a grid it cannot store (known before a job runs: its outputs
    share the input's axes)."""
    name = Path(path).name
    if names_a_folder(path):
        _check_series_grid(vol, name)
    elif name.lower().endswith(NIFTI_SUFFIXES) and not has_perpendicular_axes(vol):
        # ITK would make the axes perpendicular and move the voxels by millimetres without an error.
        raise InputError(f"cannot write {name}: the CT's axes are not perpendicular (a sheared grid, e.g. "
                         "from a gantry tilt), which NIfTI cannot store; write .nrrd or .mha instead")


def check_output_suffix(path: PathLike) -> None:
    """Refuse an output name `write_volume` cannot write as one complete file."""
    name = Path(path).name
    if name.lower().endswith((".nhdr", ".mhd")):
        raise InputError(f"cannot write {name}: .nhdr/.mhd outputs are a header plus a separate data file; "
                         "use the single-file equivalent .nrrd or .mha instead")
    if not name.lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(f"cannot write {name}: use one of {', '.join(OUTPUT_SUFFIXES)}")
    if name.lower() in OUTPUT_SUFFIXES:
        raise InputError(f"cannot write {name}: give the file a name before its suffix, e.g. ct{name.lower()}")
    nifti = next((name[-len(suffix):] for suffix in NIFTI_SUFFIXES if name.lower().endswith(suffix)), None)
    if nifti is not None and nifti not in (nifti.lower(), nifti.upper()):
        raise InputError(f"cannot write {name}: ITK reads NIfTI files only with a suffix in one case "
                         f"({nifti.lower()} or {nifti.upper()})")


@contextlib.contextmanager
def atomic_path(final: PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `final` (same suffix); it replaces `final` only on success. `folder`: the
    temporary path is a new folder to fill, which takes the place of `final` (absent, or an empty folder)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same folder -> os.replace is atomic. The temp name ends in `final`'s suffix, in lower case, and has no other
    # dot: writers pick the format from it, and ITK's are case-sensitive (X.NII.GZ) and rewrite names with a second
    # image suffix (x.nii.nii.gz, ct.hdr.nii.gz), so the file written would not be the one renamed.
    name = final.name
    suffix = name[-7:] if name.lower().endswith(".nii.gz") else final.suffix
    # At most 64 characters of the name, in ASCII: the name itself may use all 255 bytes a file system allows, and
    # SimpleITK writes this file by a name that `itk_path` can pass on Windows.
    stem = "".join(c if c.isascii() else "_" for c in name[:len(name) - len(suffix)].replace(".", "_"))[:64]
    _remove_stale_temporaries(final.parent, f"-{stem}{suffix.lower()}")
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}-{stem}{suffix.lower()}"
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if folder and final.is_dir():
            final.rmdir()  # an empty folder (a full one is refused before); a folder is not renamed onto another
        _replace(tmp, final)
    finally:
        _remove_path(tmp)


def _remove_path(path: Path) -> None:
    """Remove a file, or a folder with what it holds; nothing if it is not there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _replace(source: Path, target: Path) -> None:
    deadline = time.monotonic() + REPLACE_RETRY_S
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def itk_path(path: PathLike, by_short_name: bool = False) -> str:
    """`path` as SimpleITK must be given it: unchanged, except where ITK_NEEDS_ASCII_PATHS and the path is not ASCII.
    There the folders take the short (8.3) names Windows keeps: a DICOM folder all of its path, a file the path of its
    folder, and its own short name only where the caller names the reader (`by_short_name`: NRRD, MetaImage), since a
    short name loses the extension (WYNIK_~1.GZ) that tells ITK a NIfTI. Files written go through ASCII temporary
    names. Refuses what cannot be passed, saying what to do instead."""
    text = str(path)
    if not ITK_NEEDS_ASCII_PATHS or text.isascii():
        return text
    target = Path(os.path.abspath(text))
    whole = target.is_dir() or (by_short_name and target.is_file())
    folder, names = (target, []) if whole else (target.parent, [target.name])
    while not folder.exists() and folder.parent != folder:  # a file to be written in folders not made yet
        names.insert(0, folder.name)
        folder = folder.parent
    short = _short_name(str(folder))
    short = None if short is None else os.path.join(short, *names)
    if short is None or not short.isascii():
        in_name = bool(names) and not names[-1].isascii()
        raise InputError(f"SimpleITK cannot open {text} on this Windows system: its "
                         f"{'file name' if in_name else 'path'} holds characters outside ASCII, and ITK reads paths "
                         "in the system's code page. "
                         + ("Rename the file with ASCII letters only" if in_name else
                            "Move or copy it to a folder whose path is plain ASCII (e.g. C:\\CT\\)")
                         + ", or turn on 'Use Unicode UTF-8 for worldwide language support' in Windows' region "
                         "settings")
    return short


def _short_name(path: str) -> Optional[str]:
    """Windows' short (8.3) name of an existing file or folder; None where it cannot tell (names may be off)."""
    import ctypes

    buffer = ctypes.create_unicode_buffer(32768)
    length = ctypes.windll.kernel32.GetShortPathNameW(path, buffer, len(buffer))
    return buffer.value if 0 < length < len(buffer) else None


def sha256_file(path: PathLike) -> str:
    """SHA-256 (hex) of a file's contents, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove_stale_temporaries(folder: Path, ending: str) -> None:
    """Remove `atomic_path`'s temporary files and folders for the same name (`ending`) untouched for
    STALE_TEMPORARY_S."""
    cutoff = time.time() - STALE_TEMPORARY_S
    for path in folder.glob(".tmp-" + "[0-9a-f]" * 8 + glob.escape(ending)):
        try:
            if path.stat().st_mtime < cutoff:
                _remove_path(path)
                log.info("removed %s, left by an earlier write that was killed", path)
        except OSError:  # removed meanwhile by another writer, or not ours to remove: leave it
            pass


def _read_file(path: Path) -> Tuple[sitk.Image, Optional[np.ndarray]]:
    """The image, and a float NIfTI's voxels as nibabel read them (see `_check_nifti_complete`), else None."""
    try:
        float_voxels = _check_nifti_complete(path) if path.name.lower().endswith(NIFTI_SUFFIXES) else None
        # ITK picks MetaImage and NRRD readers by a lower-case suffix only: name them for V.MHA, CT.NRRD.
        image_io = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO",
                    ".nhdr": "NrrdImageIO"}.get(path.suffix.lower(), "")
        image = sitk.ReadImage(itk_path(path, by_short_name=bool(image_io)), imageIO=image_io)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            _check_nifti_geometry(path, image)
        elif image_io == "NrrdImageIO" and not _nrrd_has_spacing(path):
            log.warning("%s stores no voxel spacing (NRRD 'space directions' or 'spacings'): it is read as 1 mm "
                        "voxels; give the CT with its true geometry, or every result is only as sized as that",
                        path.name)
        return image, float_voxels
    except (RuntimeError, OSError) as exc:  # OSError: nibabel opens a NIfTI first (e.g. no read permission)
        if is_out_of_memory(exc):
            raise
        if "orthonormal" in str(exc):
            raise InputError(f"cannot read {path}: its axes are not perpendicular (a sheared grid, e.g. a gantry-tilt "
                             "series converted without tilt correction), which ITK cannot represent; convert the "
                             "series again with tilt correction (e.g. dcm2niix), or resample it onto an orthogonal "
                             "grid") from None
        raise InputError(
            f"cannot read {path} as an image ({_first_line(exc)}). Supported: NIfTI (.nii, .nii.gz), "
            "NRRD (.nrrd), MetaImage (.mha/.mhd) files and DICOM series folders.") from None


def _check_nifti_complete(path: Path, voxels: bool = True) -> Optional[np.ndarray]:
    """Refuse a truncated or corrupt NIfTI: ITK's reader fills missing voxels with 0 and says nothing.

    The size of the (decompressed) file is compared with the header's promise; a .gz is decompressed to its end,
    where gzip checks its CRC. A 3D float NIfTI's voxels are returned, taken from that same decompression: ITK's
    reader turns NaN and inf into 0, and `_restore_nonfinite` puts them back from these. `voxels=False` only
    checks (a file just written), streaming the decompression.
    """
    import nibabel

    try:
        image = nibabel.load(str(path))  # reads the header only
        proxy = image.dataobj
        needed = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
        # Trailing singleton dimensions (a 4D file of one volume) are dropped by ITK too.
        is_float = (voxels and image.get_data_dtype().kind == "f" and len(image.shape) >= 3
                    and all(n == 1 for n in image.shape[3:]))
        raw = None  # a float .nii.gz's decompressed bytes
        if not path.name.lower().endswith(".gz"):
            found = path.stat().st_size
        elif is_float:
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
            found = len(raw)
        else:
            found = _gunzipped_size(path)
    except FileNotFoundError:  # nibabel derives names from the suffix and misses e.g. `ct.Nii.gz`: ITK decides
        return None
    except (nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError, EOFError,
            gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(_damaged_nifti_message(path, _first_line(exc))) from None
    if found < needed:
        raise InputError(_damaged_nifti_message(path, f"{found} bytes where its header promises {needed}"))
    if not is_float:
        return None
    whole = image if raw is None else type(image).from_bytes(raw)
    return np.asanyarray(whole.dataobj).reshape(image.shape[:3])


def _check_nifti_geometry(path: Path, image: sitk.Image) -> None:
    """Refuse a NIfTI whose header places the voxels in two ways: a qform and an sform that disagree (readers
    differ in which they take: ITK, used here and by 3D Slicer, often the qform; nibabel and FSL the sform), or a
    stored geometry that ITK reads otherwise (a zero or negative voxel size, an sform with pixdim that disagree).
    The result would be written with ITK's reading: misplaced for every tool that reads the header otherwise."""
    import nibabel

    if image.GetDimension() != 3:
        return  # 2D and 4D images are refused later, with their own message
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as stream:
            # As stored: nibabel.load() would make a zero pixdim 1. NIfTI-2 and other headers: ITK decides.
            header = nibabel.Nifti1Header.from_fileobj(stream, check=False)
        forms = {}
        if header["qform_code"] > 0:
            forms["qform"] = _qform_affine(header)
        if header["sform_code"] > 0:
            forms["sform"] = header.get_sform()
    except Exception:  # damage is `_check_nifti_complete`'s to report
        return
    stored_pixdim = header["pixdim"][1:4]
    size = np.asarray(image.GetSize())
    if "sform" not in forms and np.any(np.asarray(stored_pixdim) == 0):  # ITK and nibabel read a zero as 1 mm
        raise InputError(f"{path.name}: its NIfTI voxel size (pixdim {format_values(stored_pixdim)}) is 0 along an "
                         "axis; save the image again with its true voxel size")
    if not forms:
        return
    itk = _itk_affine_ras(image)
    # A qform holds its rotation as float32 quaternion parts: for an LPS-stored CT (about 180 deg in RAS) that is
    # only good to about 0.1 deg, 0.4-0.6 mm over a 36 cm field of view, where its sform (and ITK) is exact.
    diagonal = float(np.linalg.norm((size - 1) * np.asarray(image.GetSpacing())))
    tolerance = max(0.1 * min(image.GetSpacing()), QFORM_PRECISION * diagonal)
    if len(forms) == 2:
        apart = _voxel_displacement(forms["qform"], forms["sform"], size)
        if apart > tolerance:
            itk_reads = min(forms, key=lambda name: _voxel_displacement(itk, forms[name], size))
            raise InputError(
                f"{path.name}: its NIfTI header holds two geometries (qform and sform) that place voxels up to "
                f"{apart:.1f} mm apart. Tools differ in which they use (ITK, used here and by 3D Slicer, reads the "
                f"{itk_reads}), so a result could land in the wrong place. Make them agree where the file was made "
                "(convert the DICOM again), or set one from the other (nibabel: img.set_qform(img.get_sform()); "
                "FSL: fslorient -copysform2qform) and retry")
    stored = forms.get("sform", forms.get("qform"))
    off = _voxel_displacement(itk, stored, size)
    if off > tolerance:
        raise InputError(
            f"{path.name}: its NIfTI geometry cannot be read as stored: ITK places voxels up to {off:.1f} mm from "
            f"where the header's {'sform' if 'sform' in forms else 'qform'} puts them (e.g. a zero or negative voxel "
            "size in pixdim, or pixdim that disagree with the sform). Save the image again with a consistent "
            "header and retry")


#: How far apart, as a fraction of the image diagonal, a qform may place voxels from an exact geometry.
QFORM_PRECISION = 2e-3


def _qform_affine(header) -> np.ndarray:
    """The 4 x 4 voxel-to-RAS matrix of a NIfTI-1 qform, decoded as the NIfTI reference (and ITK, and so 3D Slicer)
    decodes it. A rotation of about 180 deg (an LPS-stored CT) leaves the quaternion's a near 0, which float32 b, c, d
    give only roughly: the reference then takes a = 0 where nibabel's decoding is off by up to a millimetre."""
    b, c, d = (float(header[key]) for key in ("quatern_b", "quatern_c", "quatern_d"))
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:
        norm = np.sqrt(b * b + c * c + d * d)
        a, b, c, d = 0.0, b / norm, c / norm, d / norm
    else:
        a = np.sqrt(a)
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    pixdim = np.asarray(header["pixdim"], dtype=float)
    zooms = np.where(pixdim[1:4] > 0, pixdim[1:4], 1.0)
    zooms[2] *= -1.0 if pixdim[0] < 0 else 1.0  # qfac
    affine = np.eye(4)
    affine[:3, :3] = rotation * zooms
    affine[:3, 3] = [float(header[key]) for key in ("qoffset_x", "qoffset_y", "qoffset_z")]
    return affine


def _itk_affine_ras(image: sitk.Image) -> np.ndarray:
    """The 4 x 4 voxel-to-RAS matrix of ITK's geometry (ITK's physical space is LPS)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _voxel_displacement(a: np.ndarray, b: np.ndarray, size) -> float:
    """Largest distance (mm) between where two voxel-to-world matrices put the corners of a grid of `size`."""
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    return float(np.linalg.norm((corners @ (a - b).T)[:, :3], axis=1).max())


def _nrrd_has_spacing(path: Path) -> bool:
    """Whether a NRRD header (the text up to its first blank line) gives the voxel size."""
    with open(path, "rb") as stream:
        header = stream.read(1 << 16).split(b"\n\n", 1)[0].decode("latin-1").lower()
    return any(field in header for field in ("space directions:", "spacings:"))


def _gunzipped_size(path: Path) -> int:
    """Decompressed size, streamed in blocks; gzip raises EOFError/BadGzipFile/zlib.error on damage."""
    size = 0
    with gzip.open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            size += len(block)
    return size


def _damaged_nifti_message(path: Path, detail: str) -> str:
    with open(path, "rb") as stream:
        start = stream.read(4)
    gzipped = start[:2] == b"\x1f\x8b"
    nifti = start in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # a NIfTI-1 header starts with its size, 348
    if gzipped != path.name.lower().endswith(".gz") and (gzipped or nifti):
        right = path.name[:-3] if not gzipped else path.name + ".gz"
        return (f"cannot read {path}: its name says {'gzip-compressed' if not gzipped else 'uncompressed'}, but the "
                f"file is {'gzip-compressed' if gzipped else 'an uncompressed NIfTI'}; rename it to {right}")
    return (f"cannot read {path}: the NIfTI file is truncated or corrupt ({detail}); copy or export it again "
            "from the original")


def _restore_nonfinite(array: np.ndarray, data: np.ndarray) -> None:
    """Put back into `array` the NaN/inf voxels of a float NIfTI's `data` (nibabel's) that ITK's NIfTI reader
    silently turns into 0, so checks can see them."""
    bad = ~np.isfinite(data)
    if bad.any():
        # nibabel indexes voxels (i, j, k) = (x, y, z); SimpleITK arrays are (z, y, x) of the same voxels.
        array[bad.T] = data.T[bad.T]


def is_dicom_file(path: Path) -> bool:
    """Whether a file is one DICOM slice (by its suffix, or by the DICM marker of a file without one)."""
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    if path.name.lower().endswith(VOLUME_SUFFIXES):
        return False
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def holds_dicom_files(folder: Path) -> bool:
    """Whether a folder directly holds DICOM files (as a series folder the readers take; sub-folders not searched)."""
    return any(p.is_file() and is_dicom_file(p) for p in folder.iterdir())


def _read_dicom_folder(folder: Path, series_id: Optional[str]) -> sitk.Image:
    files_by_series, series_id = _find_series(folder, series_id)
    _warn_unread_files(folder, files_by_series)
    files = files_by_series[series_id]
    _refuse_non_image_object(files[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # ITK's own warning about uneven slices is replaced by the clearer one of _warn_irregular_slices.
    show_itk_warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()
    except RuntimeError:
        image = _read_dicom_with_pydicom(files)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(show_itk_warnings)
    return _even_slices(folder, files, image)


def _find_series(folder: Path, series_id: Optional[str]) -> Tuple[Dict[str, Sequence[str]], str]:
    """The files of each DICOM series in `folder` (sorted along the slice normal), and the UID of the series to
    read: `series_id` if the folder holds it, else the largest."""
    itk_folder = itk_path(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_folder)
    if not series_ids:
        for name in sorted(folder.iterdir()):  # e.g. a folder of an RTSTRUCT only: say what it holds
            if name.is_file() and is_dicom_file(name):
                _refuse_non_image_object(name)
        raise InputError(
            f"no DICOM series found in folder {folder} (sub-folders are not searched). Give the folder that "
            "directly holds the DICOM files of the CT series, or a NIfTI/NRRD/MHA file.")
    files_by_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(itk_folder, uid)
                       for uid in series_ids}
    if series_id is None or series_id not in files_by_series:
        series_id = _largest_series(folder, files_by_series)
    return files_by_series, series_id


def _largest_series(folder: Path, files_by_series: dict) -> str:
    """The series with the most files; two or more equally large ones (e.g. two reconstruction kernels) are
    refused, listed, since picking one would be a guess."""
    most = max(len(files) for files in files_by_series.values())
    largest = [uid for uid, files in files_by_series.items() if len(files) == most]
    if len(largest) > 1:
        listed = "; ".join(f"{_series_description(files_by_series[uid][0])} ({Path(files_by_series[uid][0]).name} "
                           f"...)" for uid in largest)
        raise InputError(f"{folder} holds {len(largest)} DICOM series of {most} files each: {listed}. Give one file "
                         "of the series to read (it stands for its whole series), or a folder with that series only")
    if len(files_by_series) > 1:
        log.info("%s holds %d DICOM series; reading the largest (%d files, %s)", folder, len(files_by_series), most,
                 _series_description(files_by_series[largest[0]][0]))
    return largest[0]


def _may_hold_an_image(name: Path) -> bool:
    """False for a DICOM object of a class that is not an image (a DICOMDIR, a report, a segmentation), by its SOP
    class, which leads the file and survives a cut; True for an image, and for a file that names no class."""
    import pydicom

    try:
        dataset = pydicom.dcmread(str(name), stop_before_pixels=True)
        sop = dataset.file_meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID")
    except Exception:  # pydicom raises several types for a damaged file
        return True
    return not sop or "Image" in pydicom.uid.UID(str(sop)).name


def _dicom_tags(name: PathLike, keys: Sequence[str]) -> Dict[str, Optional[str]]:
    """The values of DICOM tags ("gggg|eeee") in a file's header, stripped; None for a tag it lacks. The pixels are
    not read."""
    header = sitk.ImageFileReader()
    header.SetFileName(itk_path(name))
    header.ReadImageInformation()
    return {key: header.GetMetaData(key).strip() if header.HasMetaDataKey(key) else None for key in keys}


def _series_description(name: str) -> str:
    """'series "<SeriesDescription>" (number <SeriesNumber>)', from what the file holds."""
    tags = {key: value or "" for key, value in _dicom_tags(name, ("0008|103e", "0020|0011", "0020|000e")).items()}
    words = [f'"{tags["0008|103e"]}"'] if tags["0008|103e"] else []
    words += [f"number {tags['0020|0011']}"] if tags["0020|0011"] else [f"UID {tags['0020|000e']}"]
    return "series " + " ".join(words)


def _warn_unread_files(folder: Path, files_by_series: dict) -> None:
    """Warn about image files that belong to no series GDCM could read: a damaged slice is left out silently.
    Files that hold no image (a DICOMDIR, a dose report) are no loss."""
    read = {Path(name).resolve() for files in files_by_series.values() for name in files}
    unread = []
    for name in sorted(folder.iterdir()):
        try:
            if name.is_file() and name.resolve() not in read and is_dicom_file(name) and _may_hold_an_image(name):
                unread.append(name.name)
        except OSError:  # unreadable: reported as unread too
            unread.append(name.name)
    if unread:
        log.warning("%d DICOM file(s) in %s could not be read and were left out (damaged or incomplete copies?): "
                    "%s%s", len(unread), folder, ", ".join(unread[:5]), " ..." if len(unread) > 5 else "")


# DICOM objects that hold no image of the patient; GDCM reads some of them (a SEG as a 4D stack of frames).
_NON_IMAGE_MODALITIES = {
    "SEG": "a segmentation (DICOM SEG)", "RTSTRUCT": "a structure set (RTSTRUCT)", "RTDOSE": "a dose grid (RTDOSE)",
    "RTPLAN": "a treatment plan (RTPLAN)", "SR": "a structured report (SR)", "PR": "a presentation state (PR)",
    "KO": "a key-object selection (KO)", "REG": "a registration (REG)"}


def _refuse_non_image_object(name: PathLike) -> None:
    """Refuse a DICOM file that is an object other than an image (by its Modality, 0008,0060), read with pydicom:
    GDCM reads a SEG as a 4D stack and has no reader at all for objects without pixel data (RTSTRUCT, SR)."""
    import pydicom

    try:
        modality = str(pydicom.dcmread(str(name), stop_before_pixels=True, specific_tags=["Modality"])
                       .get("Modality", "")).strip().upper()
    except Exception:  # pydicom raises several types for a damaged file: GDCM's reading reports it then
        return
    if modality in _NON_IMAGE_MODALITIES:
        raise InputError(
            f"{Path(name).name} is {_NON_IMAGE_MODALITIES[modality]}, not a CT image. Give the CT series itself "
            "(the folder of its slice files). A DICOM SEG is read as a mask only once exported as a label map "
            "(e.g. 3D Slicer with its QuantitativeReporting extension: load it, then export the segmentation "
            "to a .nii.gz or .seg.nrrd file).")


def _even_slices(folder: Path, files: Sequence[str], image: sitk.Image) -> sitk.Image:
    """The series `image` (slices stacked in `files` order with one spacing) with every slice where it was scanned.

    Read with one spacing along the slice normal, a series places a slice wrongly when its gaps are uneven (mixed
    slice thicknesses, a missing slice) or when the slices are offset in-plane from one another (gantry tilt: the
    stack is sheared). Such a series is resampled onto an orthogonal grid of even slices (about the finest gap the
    series repeats often, fitted to its span), each slice shifted in-plane to its scanned position and interpolated
    linearly between its neighbours. Voxels outside every scanned slice take the series' lowest value. Slices that
    share a position, or nearly (two acquisitions in one series), are refused.
    """
    if len(files) < 2 or image.GetDimension() != 3:
        return image
    positions, orientations = [], []
    for name in files:
        tags = _dicom_tags(name, ("0020|0032", "0020|0037"))  # image position and orientation (patient)
        if None in tags.values():
            return image
        positions.append([float(v) for v in tags["0020|0032"].split("\\")])
        orientations.append([float(v) for v in tags["0020|0037"].split("\\")])
    turned = np.abs(np.asarray(orientations) - orientations[0]).max(axis=1)
    if turned.max() > 1e-3:  # one stack holds one plane orientation; a turn mid-series cannot be read as one
        raise InputError(
            f"the slices of the DICOM series in {folder} are not all oriented alike (e.g. "
            f"{Path(files[int(turned.argmax())]).name} differs from {Path(files[0]).name}: a change of gantry tilt "
            "or a reformat within the series). Give a folder per orientation")
    axes = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: row, column and slice-normal directions
    spacing = np.asarray(image.GetSpacing())
    offsets = (np.asarray(positions) - positions[0]) @ axes  # each slice's offset from the first (mm, x y z)
    along, gaps = offsets[:, 2], np.diff(offsets[:, 2])
    typical = float(np.median(np.abs(gaps)))
    if np.abs(gaps).min() < SAME_SLICE_FRACTION * typical or not (np.all(gaps > 0) or np.all(gaps < 0)):
        order = np.sort(along + float(np.asarray(positions[0]) @ axes[:, 2]))
        close = order[1:][np.diff(order) < SAME_SLICE_FRACTION * typical]
        where = f", e.g. at {close[0]:.2f} mm along the slice axis" if close.size else ""
        raise InputError(
            f"slices of the DICOM series in {folder} share positions (or lie within {SAME_SLICE_FRACTION:.0%} of the "
            f"typical {typical:.2f} mm gap of each other) or are out of order{where}: the series holds repeated or "
            "overlapping acquisitions. Put the files of one acquisition into a folder of their own and give that "
            "folder")
    # Uneven: a slice lies off the even grid from the first slice to the last by a tenth of a gap or more (rounded
    # positions, e.g. 0.62 and 0.63 mm gaps for 0.625 mm slices, are even).
    even_grid = np.linspace(0.0, along[-1], len(along))
    uneven = np.abs(along - even_grid).max() > 0.1 * typical
    # Sheared: a slice lies off the first one in-plane by a tenth of a pixel or more (positions stored to 0.01 mm along
    # an oblique axis wobble by that much in-plane, and are not a tilt).
    sheared = np.abs(offsets[:, :2]).max() > 0.1 * spacing[:2].min()
    if not (sheared or uneven):
        return image
    stack = sitk.GetArrayFromImage(image).astype(np.float32)  # (slice, row index along y, column index along x)
    if sheared:
        from scipy import ndimage

        outside = float(stack.min())
        for k in range(len(stack)):  # voxel (y, x) of the grid through slice 0 lies at slice k's (y - dy, x - dx)
            shift = (offsets[k, 1] / spacing[1], offsets[k, 0] / spacing[0])
            stack[k] = ndimage.shift(stack[k], shift, order=1, mode="constant", cval=outside)
        log.warning("DICOM series is sheared (gantry tilt: slices offset in-plane by up to %.1f mm); it is resampled "
                    "onto an orthogonal grid, each slice at its scanned position", np.abs(offsets[:, :2]).max())
    sign = float(np.sign(gaps[0]))
    along = along * sign  # increasing from 0, whichever way the slices run along the axis
    # The grid runs from the first slice to the last in steps of about the finest gap the series repeats (one
    # transition gap between two slice thicknesses does not set it).
    count = len(along)
    if uneven:
        steps = along[-1] / _finest_repeated_gap(np.abs(gaps))
        # The span is a whole number of those gaps up to rounding (then each slice of that spacing stays where it
        # was scanned); else one step more, so that no gap of the grid is wider than the chosen one.
        count = int(round(steps) if abs(steps - round(steps)) < 0.25 else np.ceil(steps)) + 1
    step = float(along[-1] / (count - 1))
    target = np.arange(count) * step
    above = np.clip(np.searchsorted(along, target, side="right"), 1, len(along) - 1)
    below = above - 1
    weight = ((target - along[below]) / (along[above] - along[below])).astype(np.float32)[:, None, None]
    regular = sitk.GetImageFromArray(stack[below] + weight * (stack[above] - stack[below]))  # exact between equals
    axes[:, 2] *= sign
    regular.SetOrigin(tuple(float(v) for v in positions[0]))
    regular.SetDirection(tuple(axes.ravel()))
    regular.SetSpacing((float(spacing[0]), float(spacing[1]), step))
    if uneven:
        log.warning("DICOM slice gaps are uneven (%.2f..%.2f mm: mixed slice thicknesses, or a missing slice); the "
                    "series is resampled onto %d even slices of %.2f mm, each at its scanned position",
                    np.abs(gaps).min(), np.abs(gaps).max(), count, step)
    return regular


#: Two slices closer than this fraction of the series' typical gap are one position scanned twice (the short gap
#: where a series changes slice thickness is larger).
SAME_SLICE_FRACTION = 0.02


def _finest_repeated_gap(gaps: np.ndarray) -> float:
    """The typical value of the finest group of like slice gaps (within 1 %, or 0.02 mm for positions stored to two
    decimals) that makes up a fifth of the gaps or more, else the median gap: the short gaps where a series changes
    slice thickness, once or a few times, do not set the grid."""
    for gap in np.sort(gaps):
        alike = gaps[np.abs(gaps - gap) <= max(0.01 * gap, 0.02)]
        if len(alike) >= max(2, 0.2 * len(gaps)):
            return float(np.median(alike))
    return float(np.median(gaps))


def _read_dicom_with_pydicom(files: Sequence[str]) -> sitk.Image:
    """Fallback decoder for compressed transfer syntaxes (e.g. JPEG 2000) SimpleITK's GDCM cannot decode.

    Geometry comes from SimpleITK's header reading; pixels from pydicom with pylibjpeg plugins.
    """
    import pydicom

    slices = []
    for name in files:
        ds = pydicom.dcmread(name)
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises several types for a missing decoder plugin
            raise InputError(_decoder_message(name, exc)) from None
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
    sizes = {}
    for name, pixels in zip(files, slices):
        sizes.setdefault(pixels.shape, []).append(Path(name).name)
    if len(sizes) > 1:
        listed = "; ".join(f"{'x'.join(map(str, shape))} in {len(names)} file(s) ({', '.join(names[:3])}"
                           f"{' ...' if len(names) > 3 else ''})" for shape, names in sizes.items())
        raise InputError(f"the slices of the DICOM series in {Path(files[0]).parent} differ in size ({listed}): the "
                         "series mixes images, e.g. a localizer or a reformat. Give a folder holding only the CT "
                         "slices")
    # File order from GetGDCMSeriesFileNames is already sorted along the slice normal.
    image = sitk.GetImageFromArray(np.stack(slices))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    last = pydicom.dcmread(files[-1], stop_before_pixels=True)
    cosines = np.array([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    p0 = np.array([float(v) for v in first.ImagePositionPatient])
    p1 = np.array([float(v) for v in last.ImagePositionPatient])
    dz = float((p1 - p0) @ normal) / max(len(files) - 1, 1) or 1.0
    row, col = (float(v) for v in first.PixelSpacing)
    image.SetSpacing((col, row, abs(dz)))
    image.SetOrigin(tuple(p0))
    image.SetDirection(tuple(np.column_stack([cosines[:3], cosines[3:], normal * np.sign(dz)]).ravel()))
    return image


def _decoder_message(name: str, exc: Exception) -> str:
    return (f"cannot decode the pixel data of DICOM file {name} ({_first_line(exc)}). Compressed DICOM "
            "(JPEG 2000, JPEG-LS, JPEG lossless) needs decoder packages: pip install pydicom pylibjpeg "
            "pylibjpeg-openjpeg pylibjpeg-libjpeg (or python-gdcm), then retry.")


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def write_csv(rows: Sequence[Dict[str, object]], columns: Sequence[str], path: PathLike) -> Path:
    """`rows` as a CSV table of `columns` (keys of a row outside them are left out), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


@contextlib.contextmanager
def png_figure(path: PathLike, dpi: int, **subplots) -> Iterator[tuple]:
    """(figure, axes) of `matplotlib.pyplot.subplots(**subplots)` to draw on, drawn off-screen (no display is needed,
    in a job process either); written to `path` as a PNG, atomically, when the block ends without an error, and
    closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def write_preview(vol: Volume, path: PathLike, window: Tuple[float, float], labels: Optional[np.ndarray] = None,
                  title: str = "", overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """PNG of the three orthogonal mid slices (axial, coronal, sagittal) at true aspect ratio, in patient axis
    order whatever order the volume is stored in.

    `window` (lo, hi) sets the grey range; `labels` (z, y, x), if given, adds a row with them overlaid.
    """
    from .orientation import AxisOrder  # it builds on Volume

    path = Path(path)
    check_output_path(path, inputs=inputs, overwrite=overwrite)
    order = AxisOrder.of(vol.direction)
    vol = order.volume(vol)
    labels = None if labels is None else order.array(labels)
    sz, sy, sx = vol.spacing_zyx
    mid = [n // 2 for n in vol.shape]
    # (cut, aspect, origin): coronal/sagittal drawn with z up, i.e. superior at the top in LPS.
    views = [(lambda a: a[mid[0]], sy / sx, "upper"), (lambda a: a[:, mid[1]], sz / sx, "lower"),
             (lambda a: a[:, :, mid[2]], sz / sy, "lower")]
    rows = 1 if labels is None else 2
    with png_figure(path, 80, nrows=rows, ncols=3, figsize=(12, 4 * rows), squeeze=False) as (fig, axes):
        for col, (cut, aspect, origin) in enumerate(views):
            for row in range(rows):
                ax = axes[row][col]
                ax.imshow(cut(vol.array), cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, origin=origin)
                if row == 1:
                    shown = np.ma.masked_equal(cut(labels), 0)
                    ax.imshow(shown, cmap="tab10", vmin=0, vmax=10, alpha=0.45, aspect=aspect, origin=origin,
                              interpolation="nearest")
                ax.set_axis_off()
            axes[0][col].set_title(("axial", "coronal", "sagittal")[col])
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return path
