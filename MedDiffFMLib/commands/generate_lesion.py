"""CLI `generate-lesion`: synthesise the CT around a lesion mask with a lesion ControlNet."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import _common

NAME = "generate-lesion"
HELP = ("Synthesise a lesion where the mask is: the box around the mask (plus --margin-mm, and at least the "
        "model's training patch along every axis the CT allows: 32 voxels for `lesion`, i.e. 160 mm along 5 mm "
        "slices) is generated anew by a lesion ControlNet and pasted into a copy of the CT. To keep the "
        "surroundings unchanged, use `inpaint`.")

#: The registered lesion ControlNet used when --model is not given.
DEFAULT_MODEL = "lesion"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tasks.lesion import DEFAULT_MARGIN_MM

    parser.add_argument("input", type=Path, help="CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("--mask", type=Path, required=True, help="lesion mask (label map > 0) on the CT grid")
    parser.add_argument("-o", "--output", type=Path, required=True, help=_common.ct_output_help("CT with the lesion"))
    _common.add_model_arguments(parser, nfe=100)
    parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--margin-mm", type=float, default=DEFAULT_MARGIN_MM,
                        help="context generated around the mask's bounding box (mm)")


def run(args: argparse.Namespace) -> int:
    from ..io import read_mask, read_volume, write_volume
    from ..tasks.lesion import generate_lesion

    series = _common.series_output(args, "lesion generated")
    _common.check_outputs(args, [args.input, args.mask], volumes=[args.output], series=series)
    volume = read_volume(args.input)
    _common.check_output_grids(volume, args.output)
    mask = read_mask(args.mask, like=volume)
    model = _common.model_from_args(args)
    result = generate_lesion(volume, mask, model, nfe=args.nfe, margin_mm=args.margin_mm,
                             region=_common.region_option(args), seed=args.seed,
                             progress=_common.progress_reporter(args.progress), **_common.sampler_options(args))
    write_volume(result, args.output, overwrite=args.overwrite, inputs=[args.input, args.mask], series=series)
    log.info("CT with generated lesion written to %s", args.output)
    return 0
