"""CLI `denoise`: zero-shot DiffPIR denoising of a CT on its own grid."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import _common

NAME = "denoise"
#: The base model fine-tuned on CT-textured noise (`train --correlated-noise`): it denoises simulated low-dose CT
#: better than `default` (benchmarks/README.md, session 17).
DEFAULT_MODEL = "denoise"
HELP = ("Denoise a (low-dose) CT with the diffusion prior (DiffPIR, zero-shot) on the input's own grid. "
        "The noise level is estimated locally from the image unless --noise-level is given; bone and air "
        "outside the window keep their input values.")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tasks.denoise import (DEFAULT_LAMBDA, DEFAULT_SEEDS_ZETA, DEFAULT_ZETA, MIN_NFE, SOFT_TISSUE_WINDOW_HU,
                                 STEP_SPACING)

    parser.add_argument("input", type=Path, help="CT: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help=_common.ct_output_help("denoised CT"))
    _common.add_model_arguments(parser)
    parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--nfe", type=_common.positive_int,
                        help=f"number of network evaluations (steps) per pass (default: one per {STEP_SPACING} "
                        f"timesteps of the start, at least {MIN_NFE}: more for noisier images)")
    parser.add_argument("--noise-level", type=float, help="noise std in HU (default: estimated from the image)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"),
                        help="HU window mapped to [-1, 1] (default: the model's window for the region, its lower "
                        "edge moved down by one noise std to make room for noisy fat; the paper used "
                        f"{SOFT_TISSUE_WINDOW_HU[0]:g} {SOFT_TISSUE_WINDOW_HU[1]:g})")
    parser.add_argument("--soft-tissue-pass", choices=("auto", "on", "off"), default="auto",
                        help=f"second pass in [{SOFT_TISSUE_WINDOW_HU[0]:g}, {SOFT_TISSUE_WINDOW_HU[1]:g}] HU for "
                        "soft tissue (its lower edge moved down by one "
                        "noise std, as the automatic window); auto: when the model's window is much wider "
                        "(chest) and --window is not given")
    parser.add_argument("--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA, help="DiffPIR lambda")
    parser.add_argument("--zeta", type=float,
                        help=f"DiffPIR noise mixing 0..1 (default {DEFAULT_ZETA:g} for one seed, "
                        f"{DEFAULT_SEEDS_ZETA:g} with --seeds > 1)")
    parser.add_argument("--seeds", type=_common.positive_int, default=1,
                        help="average this many runs (seeds seed..seed+N-1); N > 1 also writes the "
                        "per-voxel standard deviation: where the runs disagree, smaller than the true "
                        "uncertainty (2-3x at the automatic step count, in a test with a known answer)")
    parser.add_argument("--uncertainty", type=Path,
                        help="where to write the standard deviation over seeds (default: OUTPUT with _std)")
    parser.add_argument("--mask", type=Path,
                        help="denoise only inside this label map on the CT grid (default: everywhere); the rest "
                        "keeps its input values, e.g. a quick look at a region on the CPU")
    parser.add_argument("--anatomy-labels", type=Path, help="anatomy label map on the CT grid (default: computed)")
    parser.add_argument("--preview", type=Path, help="PNG figure: input / denoised / difference (middle slice)")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..io import read_mask, read_volume, sibling_path, write_volumes
    from ..orientation import AxisOrder
    from ..tasks.denoise import denoise

    uncertainty_path = args.uncertainty
    if uncertainty_path is not None and args.seeds < 2:
        raise InputError("--uncertainty is the standard deviation over seeds: add --seeds 2 or more")
    series = _common.series_output(args, "denoised")
    if args.seeds > 1 and uncertainty_path is None:  # beside a DICOM series: a NIfTI file after its whole name
        uncertainty_path = (args.output.with_name(f"{args.output.name}_std.nii.gz") if series else
                            sibling_path(args.output, "_std"))
    _common.check_outputs(args, [args.input, args.mask, args.anatomy_labels], volumes=[args.output, uncertainty_path],
                          others=[args.preview], derived=[] if args.uncertainty else [uncertainty_path],
                          series=series)
    if args.preview and args.preview.suffix.lower() != ".png":
        raise InputError(f"--preview {args.preview}: the preview is a PNG figure; give a name ending in .png")
    volume = read_volume(args.input)
    _common.check_output_grids(volume, args.output, uncertainty_path)
    mask = read_mask(args.mask, like=volume) if args.mask else None
    labels = read_mask(args.anatomy_labels, like=volume, what="anatomy label map") if args.anatomy_labels else None
    model = _common.model_from_args(args)
    result = denoise(volume, model, nfe=args.nfe, noise_level=args.noise_level, window=args.window,
                     soft_tissue_pass={"auto": None, "on": True, "off": False}[args.soft_tissue_pass],
                     lam=args.lam, zeta=args.zeta, seed=args.seed, seeds=args.seeds,
                     region=_common.region_option(args), anatomy_labels=labels, mask=mask,
                     progress=_common.progress_reporter(args.progress), **_common.sampler_options(args))
    inputs = [args.input]
    outputs = [(result.denoised, args.output)]
    if result.uncertainty is not None:
        outputs.append((result.uncertainty, uncertainty_path))
    write_volumes(outputs, overwrite=args.overwrite, inputs=inputs, series=series)
    log.info("denoised CT written to %s (noise %.1f HU; %d pass(es), each logged above with its window, t_start "
             "and steps)", args.output, result.noise_hu, len(result.windows))
    if result.uncertainty is not None:
        log.info("standard deviation over %d seeds written to %s", args.seeds, uncertainty_path)
    if args.preview:
        axial = AxisOrder.of(volume.direction).array  # the preview's slice is axial however the CT is stored
        write_preview(axial(volume.array), axial(result.denoised.array), result.window, result.noise_hu, args.preview)
        log.info("preview written to %s", args.preview)
    return 0


def write_preview(noisy, denoised, window, noise_hu: float, path: Path) -> None:
    """Middle axial slice: input, denoised (both in the window) and their difference, side by side.

    The difference is scaled to +-3 noise standard deviations, so removed noise and any removed structure
    are both visible."""
    from ..io import png_figure

    z = noisy.shape[0] // 2
    lo, hi = window
    half = 3.0 * noise_hu
    panels = [(noisy[z], "input", "gray", lo, hi), (denoised[z], "denoised", "gray", lo, hi),
              (noisy[z] - denoised[z], "input - denoised (HU)", "coolwarm", -half, half)]
    with png_figure(path, 100, nrows=1, ncols=3, figsize=(12, 4.4)) as (fig, axes):
        for ax, (image, title, cmap, vmin, vmax) in zip(axes, panels):
            shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(title)
            ax.axis("off")
            fig.colorbar(shown, ax=ax, fraction=0.046)
        fig.tight_layout()
