"""Input checks shared by every task: is this a usable 3D CT, a usable mask, a safe output path?

Hard problems raise `InputError` with what is wrong and what to do; softer ones come back as a list of
warning strings that callers log or show.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Sequence

import numpy as np

from .errors import InputError

if TYPE_CHECKING:  # io imports this module; only type names are needed here
    from .io import Volume

log = logging.getLogger(__name__)

#: Any CT region the model covers contains air (-1000 HU) or at least some fat (about -100 HU, noise around it);
#: images in other units (MR, or 0..1 / z-scored intensities) have no value this low.
CT_MIN_EXPECTED_HU = -50.0
#: Largest ratio of the coarsest to the finest voxel spacing accepted.
MAX_ANISOTROPY = 20.0
#: Spacing ratio above which results on the coarse axis are warned to be blurry.
WARN_ANISOTROPY = 6.0
#: Largest departure (degrees) of the angle between two voxel axes from a right angle before a warning: the grids
#: of scanners and resamplers are perpendicular to rounding; a hardened affine registration can shear them.
MAX_SHEAR_DEGREES = 0.5
#: Fewer voxels than this along an axis is too small for the network's patches.
MIN_AXIS_VOXELS = 8
#: Seeds are 0..MAX_SEED: torch generators take 64-bit seeds and map negative ones onto large ones (-1 would
#: repeat 2**64 - 1), and NumPy refuses negative seeds.
MAX_SEED = 2 ** 63 - 1


def check_dimensions(shape_zyx: Sequence[int]) -> None:
    """Refuse anything that is not a 3D volume with more than one voxel along each axis."""
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) == 2 or (len(shape) == 3 and min(shape) == 1):
        raise InputError(
            f"the image is 2D ({' x '.join(map(str, shape))} voxels); MedDiffFM works on 3D CT volumes. Give the whole "
            "series (DICOM folder) or a 3D NIfTI/NRRD file, not a single slice.")
    if len(shape) == 4:
        raise InputError(
            f"the image is 4D (size {shape}); MedDiffFM needs one 3D CT volume. Split the time/channel "
            "dimension and give one 3D volume.")
    if len(shape) != 3:
        raise InputError(f"the image has {len(shape)} dimensions (size {shape}); expected a 3D CT volume")


def check_volume_type(vol, name: str = "the image") -> None:
    """Refuse what is not a `Volume` (a numpy array or SimpleITK image passed from a script)."""
    from .io import Volume

    if not isinstance(vol, Volume):
        raise InputError(f"{name} must be a MedDiffFMLib.io.Volume, got {type(vol).__name__}: wrap an array as "
                         "Volume(array_zyx, spacing_xyz, origin_xyz, direction) or an image with "
                         "Volume.from_sitk(image)")


def check_ct(vol: "Volume", log_warnings: bool = True) -> List[str]:
    """Raise InputError if `vol` is not a usable 3D CT in HU; return warnings for usable-but-odd input.

    `log_warnings=False` leaves them to the caller (`info` prints them in its report, once)."""
    check_volume_type(vol)
    warnings = []
    check_dimensions(vol.array.shape)
    if min(vol.array.shape) < MIN_AXIS_VOXELS:
        raise InputError(
            f"the volume is too thin (size z,y,x = {vol.array.shape}); at least {MIN_AXIS_VOXELS} voxels "
            "are needed along every axis")
    array = vol.array
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InputError(
            f"the image has {bad} NaN or infinite voxels; replace them (e.g. with -1000 HU for air) "
            "before running MedDiffFM")
    from .orientation import AxisOrder  # which imports this module

    check_spacing(AxisOrder.of(vol.direction).spacing(vol.spacing), warnings)  # (x, y, z) in patient axes
    shear = shear_degrees(vol.direction)
    if shear > MAX_SHEAR_DEGREES:
        warnings.append(f"the volume's axes are not perpendicular: two meet {shear:.1f} degrees off a right angle (a "
                        "sheared grid, e.g. from a hardened affine transform). MedDiffFM works on the voxels as on a "
                        "perpendicular grid, so shapes are sheared by that angle as it sees them, and results keep "
                        "the input's grid; resample the CT onto a perpendicular grid for exact geometry")
    lo, hi = float(array.min()), float(array.max())
    if hi - lo < 1.0:
        raise InputError(f"the image is uniform (every voxel is {lo:.4g}): it holds no anatomy to work on (e.g. a "
                         "crop of the padding outside the scan's field of view, or an empty image)")
    if lo > CT_MIN_EXPECTED_HU:
        raise InputError(
            f"the intensities ({lo:.4g}..{hi:.4g}) do not look like CT in Hounsfield units: no voxel is "
            f"below {CT_MIN_EXPECTED_HU:.0f} HU, so it holds neither air (-1000 HU) nor fat (about -100 HU). MedDiffFM "
            "is for CT; MR or intensity-normalised images cannot be used. If this is CT stored without its rescale "
            "slope/intercept, convert it to HU first; if it is a crop inside solid tissue, crop a larger region "
            "that takes in some fat or air.")
    if hi - lo < 100.0:
        raise InputError(f"the intensities span only {lo:.4g}..{hi:.4g} HU: air without the soft tissue or bone of "
                         "a body, so there is nothing to work on (a crop outside the body?)")
    if lo < -4000.0 or hi > 40000.0:
        warnings.append(f"unusual intensity range {lo:.0f}..{hi:.0f} HU; values are clipped to the "
                        "region window anyway")
    if log_warnings:
        for message in warnings:
            log.warning(message)
    return warnings


def shear_degrees(direction: Sequence[float]) -> float:
    """How far (degrees) the least perpendicular pair of a direction matrix's unit axes (its columns) is from a
    right angle: 0 for every grid a scanner writes."""
    axes = np.asarray(direction, dtype=float).reshape(3, 3)
    axes = axes / np.linalg.norm(axes, axis=0)  # a Volume made in code may give axes that are not unit vectors
    cosines = np.abs((axes.T @ axes)[np.triu_indices(3, 1)])
    return float(np.degrees(np.arcsin(min(float(cosines.max()), 1.0))))


def check_spacing(spacing: Sequence[float], warnings: List[str]) -> None:
    """Refuse spacings no CT has (not positive, or anisotropic past MAX_ANISOTROPY); append milder concerns."""
    spacing = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"voxel spacing {format_values(spacing)} mm is invalid; every spacing must be > 0")
    ratio = float(spacing.max() / spacing.min())
    if ratio > MAX_ANISOTROPY:
        raise InputError(
            f"voxel spacing {format_values(spacing)} mm (right-left, front-back, head-foot) is extremely anisotropic "
            f"(ratio {ratio:.0f} > {MAX_ANISOTROPY:.0f}); this is not a usable 3D CT grid. For a CT file, check the "
            "slice spacing in its header.")
    if ratio > WARN_ANISOTROPY:
        warnings.append(f"voxel spacing {format_values(spacing)} mm (right-left, front-back, head-foot) is anisotropic "
                        f"(ratio {ratio:.1f}); detail along the coarse axis is limited")


def format_values(values: Sequence[float], digits: int = 4) -> str:
    """`(0.5703, 0.5703, 5)`: short numbers for messages."""
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"


def format_pair(a: Sequence[float], b: Sequence[float]) -> "tuple[str, str]":
    """Two value lists with as many digits as it takes to tell them apart (4 at least, 10 at most)."""
    for digits in range(4, 11):
        pair = format_values(a, digits), format_values(b, digits)
        if pair[0] != pair[1]:
            return pair
    return pair


def check_same_grid(mask: "Volume", vol: "Volume", name: str = "mask") -> None:
    """Refuse a label map whose grid (size, spacing, origin, direction) is not the image's."""
    diffs = vol.grid_differences(mask, names=("image", "label map"))
    if diffs:
        raise InputError(
            f"{name} is not on the grid of the image: " + "; ".join(diffs)
            + ". Resample it onto the image with nearest-neighbour interpolation (e.g. 3D Slicer "
            "'Resample Scalar/Vector/DWI Volume' or MedDiffFMLib.preprocess.resample_like) and retry.")


def check_mask(mask: "Volume", vol: "Volume", name: str = "mask") -> List[int]:
    """Check a label map against its image; return the sorted nonzero labels present.

    Refuses grid mismatch (size, spacing, origin, direction), non-integer or negative values and empty masks.
    """
    from .io import as_label_array

    check_volume_type(mask, name)
    check_dimensions(mask.array.shape)
    check_same_grid(mask, vol, name)
    labels = np.unique(as_label_array(mask.array, name=name))
    labels = [int(v) for v in labels if v != 0]
    if not labels:
        raise InputError(f"{name} is empty (no voxel above 0); draw or select a non-empty region")
    return labels


#: Longest file or folder name (bytes) on the common file systems (ext4, XFS, APFS, NTFS).
NAME_MAX_BYTES = 255


#: Windows refuses some characters in a file name, drops a trailing dot or space, and reads the reserved stems as
#: devices (a ':' even writes into a hidden stream): such an output is refused before the work, not when it is written.
WINDOWS_FILE_NAMES = os.name == "nt"
_WINDOWS_RESERVED_CHARACTERS = frozenset('<>:"|?*')
_WINDOWS_DEVICES = frozenset(["CON", "PRN", "AUX", "NUL"]
                             + [f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10)])


def _windows_name_problem(name: str) -> "str | None":
    reserved = sorted({c for c in name if c in _WINDOWS_RESERVED_CHARACTERS or ord(c) < 32})
    if reserved:
        return f"holds {' '.join(repr(c) for c in reserved)}, which Windows does not allow in a file name"
    if name != name.rstrip(". "):
        return "ends in a dot or a space, which Windows drops"
    if name.split(".")[0].upper() in _WINDOWS_DEVICES:
        return f"starts with {name.split('.')[0]!r}, a device name on Windows"
    return None


def check_output_path(out: "os.PathLike[str] | str", inputs: Iterable["os.PathLike[str] | str"] = (),
                      overwrite: bool = False, named_after: "os.PathLike[str] | str | None" = None,
                      series: bool = False) -> None:
    """Refuse writing onto an input, onto a folder, or onto an existing file unless `overwrite`. `named_after`: the
    output (-o) whose name `out` is derived from, which the messages then name, as the user never typed `out`.
    `series`: `out` is the folder of a DICOM series to be written, which must be new or empty (`overwrite` or not:
    a series is not replaced file by file)."""
    out = Path(out)
    what, rename = ((f"output {out}", "choose another output path") if named_after is None else
                    (f"{out} (written beside -o {named_after}, named after it)", "choose another -o"))
    too_long = [part for part in out.parts if len(part.encode()) > NAME_MAX_BYTES]
    if too_long:  # caught here even in a folder still to be made, not when the result is written
        raise InputError(f"{what}: the name {too_long[0][:40]}... is longer than the {NAME_MAX_BYTES} bytes a "
                         "file system allows; choose a shorter " + ("name" if named_after is None else "-o"))
    problem = _windows_name_problem(out.name) if WINDOWS_FILE_NAMES else None
    if problem:
        raise InputError(f"{what}: the name {problem}; {rename}")
    for source in inputs:
        source = Path(source)
        if out.resolve() == source.resolve() or (out.exists() and source.exists() and out.samefile(source)):
            raise InputError(f"{what} is an input {'folder' if source.is_dir() else 'file'}; {rename}")
        if source.is_dir() and source.resolve() in out.resolve().parents:
            raise InputError(f"output {out} is inside the input folder {source}; choose another folder")
    if series:
        _check_series_folder(out)
    elif out.is_dir():
        raise InputError(f"{what} is a folder; " + (f"give a file name such as {out / 'result.nii.gz'}"
                                                      if named_after is None else rename))
    elif out.exists() and not overwrite:
        raise InputError(f"{what} already exists; " + ("choose another name" if named_after is None else rename)
                         + " or allow overwriting (--overwrite)")
    _check_writable_folder(out.parent, name=out)


def _check_series_folder(out: Path) -> None:
    """Refuse a DICOM series output that names a file or a folder holding anything."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; a DICOM series is written into a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"output {out} is a folder that is not empty; a DICOM series is written into a new or "
                         "empty folder (never beside other files, --overwrite or not): choose another folder")


def check_output_folder(folder: "os.PathLike[str] | str") -> None:
    """Refuse an output folder (run, report) that names an existing file or cannot be made or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; --out needs a folder (new or existing)")
    _check_writable_folder(folder, name=folder)


def _check_writable_folder(folder: Path, name: Path) -> None:
    """Refuse output `name` when `folder` (where it goes) cannot be made or written, before any long
    computation.

    Probes with a real (unnamed, immediately removed) file: permission bits do not tell, since root may
    write anywhere except on read-only or virtual file systems.
    """
    folder = folder.resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {name}: {folder} is a file, not a folder; choose another output folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {name}: the folder {folder} is not writable ({exc.strerror}); choose "
                         "another output folder") from None
