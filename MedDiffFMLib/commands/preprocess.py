"""CLI `preprocess`: resample a CT, map its region window to [-1, 1], and write anatomy + a PNG preview."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import _common

NAME = "preprocess"
#: float32 copies of the new grid alive at once: the resampled CT, ITK's output before it, the window to [-1, 1],
#: the anatomy labels and their working arrays.
PREPROCESS_COPIES = 6
HELP = ("Resample a CT (default 1 mm isotropic), clip it to its body region's HU window mapped to [-1, 1] "
        "(what the model sees), and write the anatomy label map, an optional resampled mask, a JSON "
        "sidecar and a PNG preview next to OUTPUT.")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..anatomy import SOURCES
    from ..preprocess import REGIONS

    parser.add_argument("input", type=Path, help="CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="windowed image to write (.nii.gz, .nrrd or .mha); the other files go next to it")
    parser.add_argument("--spacing", type=_common.positive_float, nargs="+", default=[1.0], metavar="MM",
                        help="target spacing in mm: one value (isotropic) or three (x y z: right-left, front-back, "
                        "head-foot, whatever order the file stores its axes in)")
    parser.add_argument("--region", choices=("auto",) + tuple(REGIONS), default="auto",
                        help="body region (sets the HU window); auto guesses it from the image")
    parser.add_argument("--mask", type=Path, help="label map on the input grid, resampled alongside (nearest)")
    parser.add_argument("--anatomy", choices=("auto",) + tuple(SOURCES),
                        help="anatomy source; auto uses TotalSegmentator when installed, else threshold "
                             "(default: user with --anatomy-labels, else threshold)")
    parser.add_argument("--anatomy-labels", type=Path,
                        help="your own anatomy label map on the input grid (implies --anatomy user)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    from ..anatomy import get_anatomy
    from ..errors import InputError
    from ..io import atomic_path, read_mask, read_volume, sibling_path, write_preview, write_volumes
    from ..orientation import AxisOrder
    from ..preprocess import as_window, guess_region, resample, resampled_size, window_to_unit
    from ..tasks.common import check_setup_memory
    from ..validation import MIN_AXIS_VOXELS, check_ct

    if len(args.spacing) not in (1, 3):
        raise InputError(f"--spacing takes one value or three (x y z), got {len(args.spacing)}")
    anatomy = args.anatomy or ("user" if args.anatomy_labels is not None else "threshold")
    if (anatomy == "user") != (args.anatomy_labels is not None) and anatomy != "auto":
        raise InputError("--anatomy user needs --anatomy-labels" if anatomy == "user" else
                         f"--anatomy {anatomy} and --anatomy-labels are two anatomy sources; give one")
    spacing = tuple(args.spacing) * 3 if len(args.spacing) == 1 else tuple(args.spacing)
    inputs = [p for p in (args.input, args.mask, args.anatomy_labels) if p is not None]
    _common.check_outputs(args, inputs, volumes=[args.output])  # first: the names below derive from a file name
    outputs = {
        "image": args.output,
        "anatomy": sibling_path(args.output, "_anatomy"),
        "sidecar": sibling_path(args.output, "", ".json"),
        "preview": sibling_path(args.output, "_preview", ".png"),
    }
    if args.mask is not None:
        outputs["mask"] = sibling_path(args.output, "_mask")
    # Refuse every unsafe output before writing any, so a failed run leaves nothing half-done.
    _common.check_outputs(args, inputs, volumes=[outputs["image"], outputs["anatomy"], outputs.get("mask")],
                          others=[outputs["sidecar"], outputs["preview"]],
                          derived=[path for name, path in outputs.items() if name != "image"])

    with _common.reader_warnings(log_them=True) as warnings:  # the sidecar records them too
        vol = read_volume(args.input)
    _common.check_output_grids(vol, outputs["image"], outputs["anatomy"], outputs.get("mask"))
    warnings += check_ct(vol)
    mask = read_mask(args.mask, like=vol) if args.mask is not None else None
    user_labels = (read_mask(args.anatomy_labels, like=vol, what="anatomy label map")
                   if args.anatomy_labels is not None else None)
    if args.region == "auto":
        region, reason = guess_region(vol)
        log.info("region %s guessed: %s (override with --region)", region, reason)
    else:
        region, reason = args.region, "set by the user"

    # --spacing is in patient axes, as everywhere; a sagittal or coronal series stores its axes in another order.
    order = AxisOrder.of(vol.direction)
    spacing_stored = order.inverse().spacing(spacing)
    size = resampled_size(vol, spacing_stored)
    size_text = " x ".join(str(int(n)) for n in order.spacing(size))
    check_setup_memory(tuple(reversed(size)), PREPROCESS_COPIES,
                       f"resampling to {' x '.join(f'{v:g}' for v in spacing)} mm ({size_text} voxels)")
    resampled = resample(vol, spacing_stored)
    if min(resampled.shape) < MIN_AXIS_VOXELS:  # nothing could train on or be denoised on that grid
        raise InputError(f"--spacing {' '.join(f'{v:g}' for v in spacing)} mm leaves a grid of {size_text} voxels "
                         f"(x y z); at least {MIN_AXIS_VOXELS} are needed along every axis: choose a finer spacing")
    if user_labels is not None:
        labels, source = get_anatomy(resampled, "user", resample(user_labels, spacing_stored, is_mask=True))
    else:
        labels, source = get_anatomy(resampled, anatomy)
    window = as_window(region)
    unit = resampled.with_array(window_to_unit(resampled.array, window).astype("float32"))

    volumes = [(unit, outputs["image"]), (resampled.with_array(labels), outputs["anatomy"])]
    if mask is not None:
        volumes.append((resample(mask, spacing_stored, is_mask=True), outputs["mask"]))
    write_volumes(volumes, overwrite=args.overwrite, inputs=inputs)
    sidecar = {
        "input": str(args.input), "region": region, "region_reason": reason, "window_hu": list(window),
        "spacing_mm": list(resampled.spacing), "anatomy_source": source,
        "original_grid": {"size_xyz": list(reversed(vol.shape)), "spacing_mm": list(vol.spacing),
                          "origin_mm": list(vol.origin), "direction": list(vol.direction)},
        "warnings": warnings,
    }
    with atomic_path(outputs["sidecar"]) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2))
    write_preview(unit, outputs["preview"], window=(-1.0, 1.0), labels=labels,
                  title=f"{args.input.name}: {region} window {window[0]:g}..{window[1]:g} HU -> [-1, 1]",
                  overwrite=args.overwrite, inputs=inputs)
    print(f"region: {region} ({reason})")
    for path in outputs.values():
        print(f"wrote {path}")
    return 0
