"""CLI `synthesize`: generate a CT of any size with the sliding-window sampler."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import _common

NAME = "synthesize"
HELP = ("Synthesise a CT volume from noise, conditioned on body region and optional anatomy. The grid comes "
        "from --reference (whose anatomy is also used), from --anatomy, or from --size and --spacing.")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tasks.synthesis import DEFAULT_NFE

    parser.add_argument("-o", "--output", type=Path, required=True, help="synthetic CT (.nii.gz, .nrrd, ...)")
    _common.add_model_arguments(parser, nfe=DEFAULT_NFE)
    parser.add_argument("--reference", type=Path, help="CT whose grid and anatomy the synthetic CT takes")
    parser.add_argument("--anatomy", type=Path, help="anatomy label map: the output takes its grid and anatomy")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="output size in voxels")
    parser.add_argument("--spacing", type=_common.positive_float, nargs=3, metavar=("X", "Y", "Z"),
                        help="output voxel spacing in mm (with --size; default 1 1 1)")
    parser.add_argument("--eta", type=float, default=1.0, help="1 = ancestral (DDPM) steps, 0 = DDIM")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..io import as_label_array, read_mask, read_volume, write_volume
    from ..tasks.synthesis import check_grid_given, synthesize

    spacing = args.spacing or (1.0, 1.0, 1.0)
    # First what is missing altogether: without a grid, the region's question below would come first and alone.
    check_grid_given(args.size, spacing, args.reference, args.anatomy)
    if args.reference is None and args.region == "auto":
        raise InputError("choose the body region (--region head_neck, chest, abdomen or other); it can only be "
                         "guessed from a --reference CT")
    if (args.reference or args.anatomy) and (args.size or args.spacing):
        raise InputError("--size/--spacing would be ignored: the grid comes from --reference or --anatomy; "
                         "give one or the other")
    _common.check_outputs(args, [args.reference, args.anatomy], volumes=[args.output])
    reference = read_volume(args.reference) if args.reference else None
    anatomy = None
    if args.anatomy and reference is not None:  # on the reference's grid, as every task reads a label map
        anatomy = read_mask(args.anatomy, like=reference, what="anatomy label map")
    elif args.anatomy:  # it defines the grid
        try:
            labels = read_volume(args.anatomy)
        except InputError as exc:  # its messages speak of a CT
            raise InputError(f"--anatomy {args.anatomy}: {exc}") from None
        anatomy = labels.with_array(as_label_array(labels.array, name=args.anatomy.name))
    grid = reference if reference is not None else anatomy  # the output's grid, when one is given
    if grid is not None:
        _common.check_output_grids(grid, args.output)
    model = _common.model_from_args(args)
    volume = synthesize(model, region=_common.region_option(args), size_xyz=args.size,
                        spacing_xyz=spacing, reference=reference, anatomy_labels=anatomy,
                        nfe=args.nfe, eta=args.eta, seed=args.seed,
                        progress=_common.progress_reporter(args.progress), **_common.sampler_options(args))
    write_volume(volume, args.output, overwrite=args.overwrite, inputs=[p for p in (args.reference, args.anatomy) if p])
    log.info("synthetic CT %s written to %s", "x".join(str(n) for n in reversed(volume.shape)), args.output)
    return 0
