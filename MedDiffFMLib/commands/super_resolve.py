"""CLI `super-resolve`: thick-slice CT -> thin slices with a super-resolution ControlNet (DiffPIR)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import _common

NAME = "super-resolve"
HELP = ("Restore thin slices from a thick-slice CT: the output grid has FACTOR times more slices (z spacing / "
        "FACTOR); each group of FACTOR output slices averages to the input slice (DiffPIR data consistency). "
        "Needs a model fine-tuned with `finetune --task super-resolution`.")

#: The registered super-resolution ControlNet used when --model is not given.
DEFAULT_MODEL = "super-resolution"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tasks.super_resolution import DEFAULT_ZETA

    parser.add_argument("input", type=Path, help="thick-slice CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help=_common.ct_output_help("thin-slice CT"))
    _common.add_model_arguments(parser, nfe=100)
    parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--factor", type=int, default=5, help="thin slices per thick slice (paper: 5 mm -> 1 mm)")
    parser.add_argument("--sigma-n", type=float, default=1.0,
                        help="assumed noise of the thick slices in [-1, 1] units (paper: 1.0); smaller keeps "
                        "the slice averages closer to the input")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="DiffPIR prior weight (paper: 1)")
    parser.add_argument("--zeta", type=float, default=DEFAULT_ZETA, help="DiffPIR share of fresh noise (0..1)")
    parser.add_argument("--no-projection", action="store_true",
                        help="skip the final projection that makes each group of thin slices average exactly "
                        "to its thick slice (gives the paper's plain DiffPIR result)")


def run(args: argparse.Namespace) -> int:
    from ..io import read_volume, write_volume
    from ..orientation import AxisOrder
    from ..tasks.super_resolution import super_resolve

    series = _common.series_output(args, "super-resolved", keeps_grid=False)
    _common.check_outputs(args, [args.input], volumes=[args.output], series=series)
    volume = read_volume(args.input)
    _common.check_output_grids(volume, args.output)
    model = _common.model_from_args(args)
    result = super_resolve(volume, model, factor=args.factor, nfe=args.nfe, lam=args.lam, sigma_n=args.sigma_n,
                           zeta=args.zeta, region=_common.region_option(args), seed=args.seed,
                           project=not args.no_projection, progress=_common.progress_reporter(args.progress),
                           **_common.sampler_options(args))
    write_volume(result, args.output, overwrite=args.overwrite, inputs=[args.input], series=series)
    thin_axis = AxisOrder.of(result.direction).source[2]  # the head-foot axis, however the CT is stored
    log.info("%d thin slices of %.3g mm written to %s", result.shape[2 - thin_axis], result.spacing[thin_axis],
             args.output)
    return 0
