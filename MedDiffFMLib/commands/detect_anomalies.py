"""CLI `detect-anomalies`: zero-shot anomaly map, mask and image score of a CT."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import _common

NAME = "detect-anomalies"
HELP = ("Zero-shot anomaly detection: noise the CT to step t, reconstruct a healthy image in one step and "
        "map |input - reconstruction| (HU) inside the body or a given mask; writes the map, optionally a "
        "thresholded mask, and prints the image-level score.")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tasks.anomaly import DEFAULT_SMOOTHING_MM, DEFAULT_T, THRESHOLD_STDS

    parser.add_argument("input", type=Path, help="CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="anomaly map in HU (float volume)")
    _common.add_model_arguments(parser)
    parser.add_argument("--mask", type=Path, help="region to search (label map on the CT grid; default: body)")
    parser.add_argument("--mask-output", type=Path, help="thresholded anomaly mask (label map)")
    parser.add_argument("--threshold", type=float,
                        help=f"threshold on the map in HU (default: mean + {THRESHOLD_STDS:g} std inside the region)")
    parser.add_argument("--t", type=int, default=DEFAULT_T, help="noising step (the paper: 950)")
    parser.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING_MM, help="map smoothing sigma (mm)")
    parser.add_argument("--reconstruction", type=Path, help="also write the healthy reconstruction (HU)")
    parser.add_argument("--anatomy-labels", type=Path, help="anatomy label map on the CT grid (default: computed)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import read_mask, read_volume, write_volumes
    from ..tasks.anomaly import detect_anomalies

    _common.check_outputs(args, [args.input, args.mask, args.anatomy_labels],
                          volumes=[args.output, args.mask_output, args.reconstruction])
    volume = read_volume(args.input)
    _common.check_output_grids(volume, args.output, args.mask_output, args.reconstruction)
    mask = read_mask(args.mask, like=volume) if args.mask else None
    labels = read_mask(args.anatomy_labels, like=volume, what="anatomy label map") if args.anatomy_labels else None
    model = _common.model_from_args(args)
    progress = _common.progress_reporter(args.progress)
    progress(0, 1)
    result = detect_anomalies(volume, model, mask=mask, t=args.t, seed=args.seed,
                              smoothing_sigma_mm=args.smoothing, threshold=args.threshold,
                              region=_common.region_option(args), anatomy_labels=labels,
                              **_common.sampler_options(args))
    progress(1, 1)
    inputs = [args.input]
    outputs = [(result.anomaly_map, args.output), (result.anomaly_mask, args.mask_output),
               (result.reconstruction, args.reconstruction)]
    write_volumes([(vol, path) for vol, path in outputs if path], overwrite=args.overwrite, inputs=inputs)
    # Six significant digits: a threshold given as 1e-4 must not print as 0, which the command refuses.
    summary = {"score_hu": float(f"{result.score:.6g}"), "threshold_hu": float(f"{result.threshold:.6g}"),
               "anomalous_voxels": int(result.anomaly_mask.array.sum())}
    log.info("anomaly map written to %s", args.output)
    log.info("image score %g HU (the map's highest value); threshold %g HU; %d voxels (%.2f mL) above it",
             summary["score_hu"], summary["threshold_hu"], summary["anomalous_voxels"],
             summary["anomalous_voxels"] * float(np.prod(volume.spacing)) / 1000.0)
    print(json.dumps(summary), flush=True)
    return 0
