"""CLI `evaluate`: denoising (simulated low dose) and anomaly-detection benchmarks with tables and figures."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import List

from .. import evaluate as harness
from ..errors import InputError, ResourceError
from ..validation import MIN_AXIS_VOXELS, check_output_folder
from ._common import HelpFormatter, non_negative_int, overlap_fraction, positive_float, positive_int, seed

NAME = "evaluate"
HELP = ("Benchmark denoising on simulated low-dose CT against Gaussian/NLM/BM3D, or score anomaly maps "
        "against lesion masks; writes a Markdown table, a CSV and PNG figures.")

log = logging.getLogger(__name__)

#: In `evaluate anomaly --masks`, the word that stands for a case without a lesion.
HEALTHY = "healthy"


def _crop_size(text: str) -> int:
    """--crop: 0 (the whole slice) or an edge SSIM can filter, refused before any CT is read or denoised."""
    from ..metrics import SSIM_MIN_PIXELS

    value = non_negative_int(text)
    if 0 < value < SSIM_MIN_PIXELS:
        raise argparse.ArgumentTypeError(f"must be 0 (the whole slice) or at least {SSIM_MIN_PIXELS} pixels "
                                         f"(SSIM's window), got {value}")
    return value


def _pro_limit(text: str) -> float:
    from ..metrics import check_max_fpr

    try:
        return check_max_fpr(positive_float(text))
    except InputError:
        raise argparse.ArgumentTypeError(f"must be a false-positive rate in (0, 1], got {text}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    formatter = HelpFormatter

    den = sub.add_parser("denoise", formatter_class=formatter,
                         help="simulate low dose on clean CTs and compare denoisers")
    den.add_argument("inputs", nargs="+", type=Path,
                     help="clean CTs: NIfTI/NRRD/MHA files, folders of them, or DICOM series folders")
    den.add_argument("--out", type=Path, required=True, help="folder for the CSV, Markdown and PNG files")
    den.add_argument("--photons", type=float, nargs="+", default=[1e5, 2.5e4],
                     help="incident photons per detector bin and view, one per dose level")
    den.add_argument("--slices", type=positive_int, default=8,
                     help="contiguous axial slices from the middle of each CT that are scored")
    den.add_argument("--context-slices", type=int, default=12,
                     help="more slices on each side (where the CT has them) that every method denoises but that "
                     "are not scored: a 3D denoiser then sees the neighbours it would see in a whole scan")
    den.add_argument("--crop", type=_crop_size, default=0,
                     help="centred in-plane crop size in pixels (0 = whole slice)")
    den.add_argument("--methods", nargs="*", default=list(harness.CLASSICAL_METHODS),
                     choices=harness.CLASSICAL_METHODS,
                     help="classical methods to run; give the option with no method to run none (only the low-dose "
                     "input and the --model rows, e.g. to score a new model against an earlier table)")
    den.add_argument("--gaussian-sigma", type=positive_float, default=1.0, help="Gaussian smoothing sigma in pixels")
    den.add_argument("--sigma", choices=("oracle", "estimate"), default="oracle",
                     help="give NLM, BM3D and MedDiffFM the simulation's true noise std, or let them estimate it")
    den.add_argument("--model", action="append",
                     help="also run MedDiffFM denoising with this model name or file (repeat to compare models, "
                     "e.g. the registered one against a new checkpoint)")
    den.add_argument("--nfe", type=positive_int,
                     help="MedDiffFM network evaluations (unset: the denoising task's default)")
    den.add_argument("--model-window", type=float, nargs=2, action="append", metavar=("LO", "HI"),
                     help="HU window MedDiffFM denoises in (repeat to compare several; default: the model's "
                     "window for the body region)")
    den.add_argument("--overlap", type=overlap_fraction,
                     help="overlap of MedDiffFM's sliding windows (unset: the denoising task's default)")
    den.add_argument("--window-size", type=positive_int,
                     help="MedDiffFM's sliding window edge in voxels (unset: the model's training patch)")
    den.add_argument("--device", default="auto", help="MedDiffFM device: auto, cpu or cuda")
    den.add_argument("--seed", type=seed, default=0, help="seed of the noise simulation and of MedDiffFM")
    den.add_argument("--overwrite", action="store_true", help="replace an earlier report's files in --out")
    den.set_defaults(_benchmark=_run_denoise, _parser=den)  # cli.main: an unknown option shows this usage

    ano = sub.add_parser("anomaly", formatter_class=formatter,
                         help="score anomaly maps against lesion masks (AUROC, Dice, PRO)")
    ano.add_argument("--scores", type=Path, nargs="+", required=True, help="anomaly score volumes")
    ano.add_argument("--masks", type=Path, nargs="+", required=True,
                     help=f"lesion masks, one per score volume, on the same grid; the word {HEALTHY} for a case "
                     "without a lesion (it adds healthy slices, and a case to rank by image score)")
    ano.add_argument("--images", type=Path, nargs="*", default=[], help="the CTs, for the figures (optional)")
    ano.add_argument("--regions", type=Path, nargs="*", default=[],
                     help="the regions searched (the --mask given to detect-anomalies), one per score volume: "
                     "only their voxels are scored (default: every voxel)")
    ano.add_argument("--out", type=Path, required=True, help="folder for the CSV, Markdown and PNG files")
    ano.add_argument("--max-fpr", type=_pro_limit, default=0.3, help="PRO integration limit (a false-positive rate)")
    ano.add_argument("--overwrite", action="store_true", help="replace an earlier report's files in --out")
    ano.set_defaults(_benchmark=_run_anomaly, _parser=ano)


def run(args: argparse.Namespace) -> int:
    return args._benchmark(args)


def _run_denoise(args: argparse.Namespace) -> int:
    repeated = sorted({dose for dose in args.photons if args.photons.count(dose) > 1})
    if repeated:
        raise InputError(f"--photons lists {', '.join(f'{dose:g}' for dose in repeated)} more than once; give each "
                         "dose level once (the table has one row per case, dose and method)")
    check_output_folder(args.out)
    cases = harness.load_cases(args.inputs, args.slices, args.crop or None, args.context_slices)
    _refuse_earlier_report(args.out, harness.report_files("denoise", [case.name for case in cases]), args.overwrite)
    methods = harness.classical_methods(args.methods, args.gaussian_sigma)
    windows = [tuple(w) for w in args.model_window] if args.model_window else [None]
    models = args.model or []
    thin = [case for case in cases if case.volume.shape[0] < MIN_AXIS_VOXELS]
    if models and thin:  # a model denoises whole blocks, which must hold one of its windows' minimum
        raise InputError(f"case {thin[0].name}: its block is {thin[0].volume.shape[0]} slices thick (--slices "
                         f"{args.slices} scored, up to --context-slices {args.context_slices} on each side), and "
                         f"MedDiffFM needs at least {MIN_AXIS_VOXELS}: raise --slices or --context-slices")
    try:
        for model, label in zip(models, _model_labels(models)):
            for window in windows:
                name = label if window is None else f"{label} [{window[0]:g}, {window[1]:g}]"
                options = {} if window is None else {"window": window}
                if args.overlap is not None:
                    options["overlap"] = args.overlap
                methods[name] = harness.meddifffm_method(model, nfe=args.nfe, seed=args.seed, device=args.device,
                                                         window_size=args.window_size, **options)
    except ResourceError as exc:
        log.warning("MedDiffFM left out of the comparison: %s", exc)
    report = harness.evaluate_denoising(cases, methods, photons=args.photons, seed=args.seed,
                                        oracle_sigma=args.sigma == "oracle")
    for path in harness.write_denoise_report(report, args.out):
        log.info("wrote %s", path)
    print(harness.denoise_summary_markdown(harness.mean_over_cases(report.rows)))
    return 0


def _refuse_earlier_report(out: Path, files: List[str], overwrite: bool) -> None:
    """Refuse, before any work, to replace files of an earlier report in `out` unless --overwrite."""
    earlier = [name for name in files if (out / name).exists()]
    if earlier and not overwrite:
        raise InputError(f"{out} already holds {', '.join(earlier)} (an earlier report); give --overwrite to replace "
                         "them, or another --out")


def _model_labels(models: List[str]) -> List[str]:
    """The models' names in tables: "MedDiffFM" for one; for several, a registered name as is and a file by its
    parent folder and stem, or as given where two files would share that short name (each needs its own row)."""
    if len(models) == 1:
        return ["MedDiffFM"]
    files = [_model_file(model) for model in models]  # a name and a path can be the same model
    twice = sorted({model for model, file in zip(models, files) if files.count(file) > 1})
    if twice:
        raise InputError(f"a --model is given twice ({', '.join(twice)} name the same file); give each model once")
    short = [_short_label(model) for model in models]
    labels = [name if short.count(name) == 1 else model for name, model in zip(short, models)]
    return [f"MedDiffFM {label}" for label in labels]


def _model_file(model: str) -> str:
    from ..checkpoints import resolve_model
    from ..errors import CheckpointError

    try:
        return os.path.realpath(resolve_model(model))
    except CheckpointError:  # loading it will say what is wrong
        return model


def _short_label(model: str) -> str:
    path = Path(model)
    if path.suffix != ".safetensors":
        return model
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def _run_anomaly(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import read_mask, read_volume

    check_output_folder(args.out)
    if len(args.masks) != len(args.scores) or any(extra and len(extra) != len(args.scores)
                                                  for extra in (args.images, args.regions)):
        raise InputError(f"give one mask (and, if any, one image and one region) per score volume: "
                         f"{len(args.scores)} scores, {len(args.masks)} masks, {len(args.images)} images, "
                         f"{len(args.regions)} regions.")
    names = harness.case_names(args.scores)
    _refuse_earlier_report(args.out, harness.report_files("anomaly", names), args.overwrite)
    cases = []
    for index, (name, score_path, mask_path) in enumerate(zip(names, args.scores, args.masks)):
        try:
            scores = read_volume(score_path)
            if not np.isfinite(scores.array).all():
                raise InputError("the score volume holds NaN or infinite values; fix the score map first")
            mask = None if str(mask_path) == HEALTHY else read_mask(mask_path, like=scores)
            image = read_volume(args.images[index]) if args.images else None
            searched = read_mask(args.regions[index], like=scores) if args.regions else None
            differences = [] if image is None else image.grid_differences(scores, names=("image", "scores"))
            if differences:
                raise InputError(f"the image {args.images[index]} is not on the score volume's grid: "
                                 + "; ".join(differences))
        except InputError as exc:  # among many files, say which case
            raise InputError(f"case {name} ({score_path}): {exc}") from None
        # Image-level AUROC and the figure go over axial slices, whatever axis the files store first.
        scores, mask, image, searched = (None if v is None else harness.axial_first(v, like=scores)
                                         for v in (scores, mask, image, searched))
        cases.append(harness.AnomalyCase(name, scores.array, None if mask is None else mask.array,
                                         None if image is None else image.array,
                                         None if searched is None else searched.array))
    rows = harness.evaluate_anomaly(cases, max_fpr=args.max_fpr)
    for path in harness.write_anomaly_report(rows, cases, args.out, max_fpr=args.max_fpr):
        log.info("wrote %s", path)
    print(harness.markdown_table(rows, harness.ANOMALY_COLUMNS))
    return 0
