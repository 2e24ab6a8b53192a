"""CLI `info`: geometry, HU range, body-region guess and anatomy class volumes of a CT."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

import numpy as np

from . import _common

NAME = "info"
HELP = ("Describe a CT (file or DICOM folder): geometry, HU range, input checks, guessed body region with "
        "its reason, and the volumes of the threshold-anatomy classes.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("--mask", type=Path, help="label map on the same grid: its labels and volumes are listed")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..io import read_volume

    # e.g. gantry tilt, uneven DICOM slices: the report lists them, once
    with _common.reader_warnings(log_them=False) as read_warnings:
        vol = read_volume(args.input)
    try:
        report = describe(vol, args.input, args.mask)
    except InputError:  # what was read still shows why the volume is refused (2D, too thin, not HU): print it
        report = geometry(vol, args.input)
        report["warnings"] = read_warnings
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        raise
    report["warnings"] = read_warnings + report["warnings"]
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def geometry(vol, path: Path) -> Dict[str, Any]:
    """The grid and intensities of a volume as read, before any check."""
    size_xyz = list(reversed(vol.shape))
    # Over finite voxels only: JSON has no NaN or infinity (a volume of them is refused, after this report).
    finite = vol.array[np.isfinite(vol.array)]
    return {
        "input": str(path),
        "size_xyz": size_xyz,
        "spacing_mm": list(vol.spacing),
        "origin_mm": list(vol.origin),
        "direction": list(vol.direction),
        "extent_mm": [round(n * s, 2) for n, s in zip(size_xyz, vol.spacing)],
        "non_finite_voxels": int(vol.array.size - finite.size),
        "hu_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "hu_percentiles_1_50_99": [float(v) for v in np.percentile(finite, [1, 50, 99])] if finite.size else None,
    }


def describe(vol, path: Path, mask_path: "Path | None" = None) -> Dict[str, Any]:
    """Everything `info` reports about the CT `vol` read from `path`, as plain JSON-ready values."""
    from ..anatomy import THRESHOLD_CLASSES, class_volumes_ml, threshold_anatomy
    from ..io import read_mask
    from ..preprocess import guess_region
    from ..validation import check_ct

    warnings = check_ct(vol, log_warnings=False)  # the report lists them
    region, reason = guess_region(vol)
    report = geometry(vol, path)
    report.update({
        "warnings": warnings,
        "region": region,
        "region_reason": reason,
        "anatomy_ml": class_volumes_ml(threshold_anatomy(vol), vol.spacing, THRESHOLD_CLASSES),
    })
    if mask_path is not None:
        mask = read_mask(mask_path, like=vol)
        report["mask"] = {"path": str(mask_path), "label_ml": class_volumes_ml(mask.array, mask.spacing)}
    return report


def format_report(report: Dict[str, Any]) -> str:
    def numbers(values) -> str:
        return " x ".join(f"{v:g}" for v in values)

    lines = [
        f"input:      {report['input']}",
        f"size:       {numbers(report['size_xyz'])} voxels (x, y, z)",
        f"spacing:    {numbers(round(v, 4) for v in report['spacing_mm'])} mm",
        f"extent:     {numbers(report['extent_mm'])} mm",
        f"origin:     ({', '.join(f'{v:.2f}' for v in report['origin_mm'])}) mm (LPS)",
        f"direction:  ({', '.join(f'{round(v, 3) + 0.0:.3f}' for v in report['direction'])})",  # no "-0.000"
    ]
    if report["hu_range"] is None:
        lines.append("HU range:   none (no finite voxel)")
    else:
        lines.append(f"HU range:   {report['hu_range'][0]:g} .. {report['hu_range'][1]:g} "
                     f"(1/50/99 %: {', '.join(f'{v:g}' for v in report['hu_percentiles_1_50_99'])})")
    if report["non_finite_voxels"]:
        lines.append(f"non-finite: {report['non_finite_voxels']} voxels (NaN or infinity)")
    if "region" in report:  # absent when the input checks refused the volume (the geometry alone is shown)
        lines += [f"region:     {report['region']} ({report['region_reason']})",
                  "anatomy:    " + ", ".join(f"{k} {v:g} ml" for k, v in report["anatomy_ml"].items())
                  + " (threshold anatomy)"]
    if "mask" in report:
        lines.append("mask:       " + ", ".join(f"label {k}: {v:g} ml" for k, v in report["mask"]["label_ml"].items()))
    lines += [f"warning:    {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
