"""Options and plumbing shared by the model-running subcommands (not a subcommand itself)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from ..config import PRECISIONS

log = logging.getLogger(__name__)

PROGRESS_MODES = ("tqdm", "machine", "none")
#: Prefix of the progress lines the Slicer module parses (`--progress machine`).
PROGRESS_PREFIX = "MEDDIFFFM_PROGRESS"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds an option's default to its help, unless the default is None (nothing to show) or the help already
    says what the default is (e.g. "default: estimated from the image")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (steps, seeds, threads, window batch): refused while
    parsing, with usage."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def overlap_fraction(text: str) -> float:
    """argparse type of the sliding windows' overlap, a fraction in [0, 1): refused while parsing, before a whole CT
    is read and set up."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type of sizes that must be above 0 (mm, pixels of blur): refused while parsing, before any work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of counts that may be 0 (e.g. data-loading workers)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type of --seed: a whole number in 0..MAX_SEED (see `tasks.common.check_seed`)."""
    from ..validation import MAX_SEED

    value = _whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, nfe: Optional[int] = None) -> None:
    """--model, --seed, --nfe, --device, --precision, --progress, --overlap, --window-batch, --window-size,
    --region, --threads, --compile, --overwrite."""
    parser.add_argument("--model", default="default",
                        help="registered model name or path to a .safetensors model file")
    parser.add_argument("--seed", type=seed, default=0,
                        help="random seed: the same seed gives the same result on the same machine with the same "
                        "--threads and --window-batch (float rounding differs otherwise)")
    if nfe is not None:
        parser.add_argument("--nfe", type=positive_int, default=nfe, help="number of network evaluations (steps)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the network runs (auto: a CUDA GPU when present, else the CPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="network precision on GPU (auto: bf16 where supported)")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="tqdm",
                        help=f"progress display; 'machine' prints '{PROGRESS_PREFIX} <step> <total>' lines")
    parser.add_argument("--overlap", type=overlap_fraction, default=None,
                        help="overlap of neighbouring windows (0..<1; default: the task's, 0.25 for denoise, else "
                        "0.5). Denoising at 0.125 evaluates 1.4x fewer windows for 0.04-0.07 dB less PSNR "
                        "(benchmarks/README.md): with --compile, NFE 100 on a 512 x 512 x 300 CT took 57 s on an H100")
    parser.add_argument("--window-batch", type=positive_int, default=None,
                        help="windows per network call (default: 4 on the CPU, up to 256 on a GPU as memory allows)")
    parser.add_argument("--window-size", type=positive_int, default=None,
                        help="edge of the cubic sliding window in voxels, a multiple of 4 for the default model "
                        "(default: the model's training patch: 32 for 'default', 16 for the tiny models); "
                        "--overlap is a fraction of it")
    parser.add_argument("--region", default="auto",
                        help="body region: auto (guessed from the image), head_neck, chest, abdomen, other")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads for the network (default: PyTorch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the network (torch.compile) at its first call: on an H100 about 25 s on the "
                        "first run (later runs load the kernels from torch's on-disk cache), then each step about "
                        "1.6x faster, so it pays for long runs (from about 50 steps on a whole CT); no gain on the CPU")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def sampler_options(args: argparse.Namespace) -> dict:
    """Keyword arguments every task takes from the shared options."""
    from ..tasks.common import choose_device

    options = dict(device=choose_device(args.device), window_batch=args.window_batch, precision=args.precision,
                   window_size=args.window_size)
    if args.overlap is not None:  # else each task's own default
        options["overlap"] = args.overlap
    return options


def region_option(args: argparse.Namespace) -> Optional[str]:
    return None if args.region == "auto" else args.region


def model_from_args(args: argparse.Namespace):
    """The model of --model on the device of --device (after applying --threads)."""
    import torch

    from ..tasks.common import choose_device, load_task_model as load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load(args.model, choose_device(args.device), compile=args.compile)


def progress_reporter(mode: str) -> Callable[[int, int], None]:
    """A (step, total) callback: a tqdm bar on stderr, machine-readable lines on stdout, or nothing."""
    if mode == "none":
        return lambda step, total: None
    if mode == "machine":
        def report(step: int, total: int) -> None:
            print(f"{PROGRESS_PREFIX} {step} {total}", flush=True)
        return report
    from tqdm import tqdm

    bar = {}

    def update(step: int, total: int) -> None:
        if "bar" not in bar or bar["bar"].total != total:
            # Created at the first report, so steps already done are its `initial`: its rate counts from here.
            bar["bar"] = tqdm(total=total, initial=step, file=sys.stderr, unit="step")
        bar["bar"].n = step
        bar["bar"].refresh()
        if step >= total:
            bar["bar"].close()
    return update


def training_progress(mode: str) -> Optional[Callable[[int, int], None]]:
    """The progress callback of a training command; None keeps training's own bar, which also shows the loss."""
    return None if mode == "tqdm" else progress_reporter(mode)


@contextlib.contextmanager
def reader_warnings(log_them: bool) -> Iterator[List[str]]:
    """Collect the warnings that reading a CT logs (e.g. gantry tilt, uneven DICOM slices) for a report. With
    `log_them` False they are not logged as well (the report shows each once), unless reading fails: there is no
    report then, so they are logged as they came. Messages below warnings are logged as ever."""
    reader_log = logging.getLogger("MedDiffFMLib.io")
    collected: List[str] = []

    def collect(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        collected.append(record.getMessage())
        return log_them

    reader_log.addFilter(collect)
    failed = True
    try:
        yield collected
        failed = False
    finally:
        reader_log.removeFilter(collect)
        if failed and not log_them:
            for message in collected:
                reader_log.warning(message)


#: Said wherever a folder is refused as an output.
SERIES_OUTPUTS = ("a folder takes a DICOM series only as -o of denoise, inpaint, generate-lesion or super-resolve "
                  "(their CT) with a DICOM series input")


def ct_output_help(what: str) -> str:
    """The -o help of a command whose result is a CT, which may go to a DICOM series (see `series_output`)."""
    return (f"{what}: a .nii.gz, .nii, .nrrd or .mha file; with a DICOM series input also a new or empty folder "
            "(a name without a suffix), which takes it as a new DICOM series of the input's study")


def folder_refusal(out: Path, why: str) -> Exception:
    """The error for an output that names a folder (see io.names_a_folder) where a file is needed."""
    from ..errors import InputError

    if out.is_dir():
        return InputError(f"output {out} is a folder; give a file name such as {out / 'result.nii.gz'} ({why})")
    return InputError(f"output {out} has no file suffix; give a file name such as {out}.nii.gz ({why})")


def series_output(args: argparse.Namespace, derivation: str, keeps_grid: bool = True):
    """The io.DerivedSeries that -o takes when it names a folder (the CT result as a new DICOM series of the
    input's study; `derivation` ends its description; `keeps_grid`: the result is on the input's grid), else None
    (a file). A folder is refused unless the input is a DICOM series."""
    from ..errors import InputError
    from ..io import OUTPUT_SUFFIXES, VOLUME_SUFFIXES, DerivedSeries, check_input_found, is_dicom_input, names_a_folder

    if not names_a_folder(args.output):
        name = args.output.name
        if is_dicom_input(args.input) and not name.lower().endswith(VOLUME_SUFFIXES):  # e.g. -o "CT 2.0 denoised"
            raise InputError(f"cannot write {name}: a DICOM series goes into a folder whose name has no dot (e.g. "
                             f"{name.replace('.', '_')}) or into an existing empty folder; a file needs one of "
                             f"{', '.join(OUTPUT_SUFFIXES)}")
        return None
    if not is_dicom_input(check_input_found(args.input)):  # a mistyped input is no fault of -o
        raise folder_refusal(args.output, f"{SERIES_OUTPUTS}; {args.input} is not one")
    return DerivedSeries(args.input, derivation, keeps_grid)


def check_outputs(args: argparse.Namespace, inputs, volumes=(), others=(), derived=(), series=None) -> None:
    """Refuse bad output paths before any computation (not after minutes of sampling). `derived`: those of the
    outputs whose names this command made from -o (their messages say so). `series`: the DICOM series -o takes
    (see `series_output`), None where -o is a file."""
    from ..errors import InputError
    from ..io import check_output_suffix, is_dicom_file, names_a_folder
    from ..validation import check_output_path

    inputs = [Path(p) for p in inputs if p is not None]
    # One DICOM file stands for its whole series: nothing is written beside it, as into a series folder given itself.
    series_folders = {p.parent.resolve() for p in inputs if p.is_file() and is_dicom_file(p)}
    series_path = args.output if series is not None else None  # -o, where it takes a DICOM series
    outputs = [out for out in list(volumes) + list(others) if out is not None]
    seen = set()
    for out in outputs:
        key = os.path.realpath(out)
        if key in seen:  # one output would silently replace another, or fail after the whole run
            raise InputError(f"{out} is given for two different outputs; give each output its own file")
        seen.add(key)
        for folder in series_folders:
            if folder == Path(key) or folder in Path(key).parents:
                raise InputError(f"output {out} is {'' if folder == Path(key) else 'inside '}the folder of the input "
                                 f"DICOM series {folder}; choose another folder")
        is_series = out == series_path
        if out in volumes and out not in derived and not is_series and names_a_folder(out):
            raise folder_refusal(out, SERIES_OUTPUTS)
        check_output_path(out, inputs=inputs, overwrite=args.overwrite, series=is_series,
                          named_after=args.output if out in derived else None)
    for out in volumes:
        if out is not None and out != series_path:
            check_output_suffix(out)


def check_output_grids(volume, *paths) -> None:
    """Refuse, before the job, outputs that cannot hold the grid of `volume` (see io.check_output_grid)."""
    from ..io import check_output_grid

    for path in paths:
        if path is not None:
            check_output_grid(volume, path)


def check_run_folder(args: argparse.Namespace) -> None:
    """Refuse a bad run folder before the (slow) data preparation: a file, an unwritable place, a folder another
    training runs in, or one that holds a run while --resume was not given (the new run would overwrite it)."""
    from ..runlock import check_run_lock
    from ..torchrun_env import torchrun_place
    from ..training import check_new_run
    from ..validation import check_output_folder

    check_output_folder(args.out)
    if torchrun_place().rank == 0:  # only the first process: the others may find it holding this run's lock already
        check_run_lock(args.out)
    check_new_run(args.out, args.resume, resume_option="--resume")


def training_result(record: dict, model_file: Path, kind: str) -> int:
    """Log how a training command ended. Non-zero when a stop request ended it before --steps, so that
    `train ... && next-step` does not go on with an unfinished model."""
    if record.get("stopped"):
        log.warning("stopped at step %d with a checkpoint; continue with the same command and --resume",
                    record["step"])
        return 130
    log.info("finished at step %d (%.2f h); %s: %s", record["step"], record["wall_hours"], kind, model_file)
    return 0


def half_export(args: argparse.Namespace) -> Optional[bool]:
    """TrainSettings.half_export of --[no-]fp32-export: None when neither is given (a resumed run's own; new: fp16)."""
    return None if args.fp32_export is None else not args.fp32_export


def check_training_region(args: argparse.Namespace, regions, *specs) -> None:
    """Refuse a training --region the model has no class for, or given with a split name (whose CTs have theirs)."""
    from ..errors import InputError

    if args.region is None:
        return
    if args.region not in regions:
        raise InputError(f"unknown body region {args.region!r}; this model knows {', '.join(regions)}")
    named = [spec[0] for spec in specs if is_split(spec)]
    if named:
        raise InputError(f"--region sets the body region of your own CT files; the {named[0]!r} split brings the "
                         "regions of the shared data's manifest")


def user_cases(spec, region: Optional[str]) -> list:
    """The CTCases of a --data / --val-data value that names no split: a folder, or CT files (a DICOM series folder
    among them), each with the body region `region` (None: guessed)."""
    from ..dataset import as_cases, with_region

    return with_region(as_cases(spec[0] if len(spec) == 1 and Path(spec[0]).is_dir() else list(spec)), region)


def is_split(spec) -> bool:
    """Whether a --data / --val-data value names a split of the shared CT data."""
    return bool(spec) and len(spec) == 1 and spec[0] in ("train", "validation")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the training commands: validation data, data root, run folder, cache, resume, and the
    optimisation loop (steps, batch, learning rate, seed, validation and checkpoint intervals, threads)."""
    from ..dataset import shared_data_root

    parser.add_argument("--val-data", nargs="*",
                        help="validation CTs (default: the 'validation' split when --data is 'train')")
    parser.add_argument("--data-root", type=Path,
                        default=shared_data_root(),
                        help="folder of the shared CT data (for the split names; default: $MEDDIFFFM_CT_DATA, "
                        "else ../shared/data/ct beside the repository)")
    parser.add_argument("--region", type=lambda text: None if text == "auto" else text,
                        help="body region of every CT file of --data and --val-data, e.g. chest (default: auto, each "
                        "one's guess from its image, logged); not with the split names 'train' and 'validation', "
                        "whose CTs have the regions of the shared data's manifest")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, EMA model)")
    parser.add_argument("--cache-dir", type=Path,
                        help="preprocessed-volume cache (default: <out>/../cache); finetune --task lesion keeps its "
                        "few cases in memory and uses none")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.json if present")
    parser.add_argument("--steps", type=positive_int, default=1000,
                        help="total optimizer steps (including resumed ones)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="patches per micro-batch per process")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float,
                        help="Adam learning rate (default: 1e-4 for a new run; on --resume the checkpoint's, unless "
                        "given: give a lower one to anneal a run)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of patch sampling, timesteps and noise")
    parser.add_argument("--validate-every", type=positive_int, default=200, help="steps between validations")
    parser.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="data-loading worker processes")
    parser.add_argument("--fp32-export", action=argparse.BooleanOptionalAction, default=None,
                        help="store exported EMA weights as fp32, or with --no-fp32-export as fp16 (default: fp16 for "
                        "a new run, on --resume the run's own choice)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="network arithmetic while training (auto: bf16 autocast on a GPU, fp32 on the CPU; bf16 "
                        "forces it, on the CPU too; default: auto, or on --resume the run's own)")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="tqdm",
                        help=f"progress display; 'machine' prints '{PROGRESS_PREFIX} <step> <total>' lines, 'none' "
                        "keeps a background run's log to its messages")
