"""CLI `inpaint`: fill a masked region of a CT with RePaint (draw a mask, then inpaint)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import _common

NAME = "inpaint"
HELP = ("Replace the voxels inside the mask with synthetic tissue that fits their surroundings (RePaint). "
        "With a lesion ControlNet (default) a lesion grows in the mask; with a base model, normal tissue. "
        "Voxels outside the mask are returned unchanged.")

#: The registered lesion ControlNet used when --model is not given.
DEFAULT_MODEL = "lesion"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tasks.inpaint import DEFAULT_JUMP_LENGTH, DEFAULT_RESAMPLE
    from ..tasks.lesion import DEFAULT_MARGIN_MM

    parser.add_argument("input", type=Path, help="CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("--mask", type=Path, required=True, help="region to inpaint (label map > 0) on the CT grid")
    parser.add_argument("-o", "--output", type=Path, required=True, help=_common.ct_output_help("inpainted CT"))
    _common.add_model_arguments(parser, nfe=100)
    parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--jump-length", type=_common.positive_int, default=DEFAULT_JUMP_LENGTH,
                        help="RePaint: steps jumped back when resampling")
    parser.add_argument("--resample", type=_common.positive_int, default=DEFAULT_RESAMPLE,
                        help="RePaint: passes over each jumped segment (1 = no resampling, fastest)")
    parser.add_argument("--margin-mm", type=float, default=DEFAULT_MARGIN_MM,
                        help="known context sampled around the mask's bounding box (mm)")


def run(args: argparse.Namespace) -> int:
    from ..io import read_mask, read_volume, write_volume
    from ..tasks.inpaint import inpaint

    series = _common.series_output(args, "inpainted")
    _common.check_outputs(args, [args.input, args.mask], volumes=[args.output], series=series)
    volume = read_volume(args.input)
    _common.check_output_grids(volume, args.output)
    mask = read_mask(args.mask, like=volume)
    model = _common.model_from_args(args)
    result = inpaint(volume, mask, model, nfe=args.nfe, jump_length=args.jump_length, resample=args.resample,
                     margin_mm=args.margin_mm, region=_common.region_option(args), seed=args.seed,
                     progress=_common.progress_reporter(args.progress), **_common.sampler_options(args))
    write_volume(result, args.output, overwrite=args.overwrite, inputs=[args.input, args.mask], series=series)
    log.info("inpainted CT written to %s", args.output)
    return 0
