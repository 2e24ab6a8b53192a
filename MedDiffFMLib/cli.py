"""Command line entry point. Subcommands are discovered from `MedDiffFMLib.commands`."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import pkgutil
import re
import signal
import sys
import threading
from typing import List, Optional

from . import __version__, commands
from .commands._common import HelpFormatter
from .errors import Cancelled, InputError, MedDiffFMError, is_out_of_memory
from .torchrun_env import torchrun_place

log = logging.getLogger("MedDiffFMLib")


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


class _Parser(argparse.ArgumentParser):
    """argparse takes "-1e3" and "-inf" for options: its pattern of negative numbers has no exponent (before Python
    3.13) and no infinity. Widened here, so that `--window -1e3 240` parses and `--window -inf 240` gets the message
    about non-finite numbers; subcommands' parsers are of the same class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|inf|infinity|nan)$",
                                                   re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m MedDiffFMLib",
        description="MedDiffFM: 3D CT diffusion foundation model (synthesis, denoising, anomaly "
        "detection, super-resolution, lesion generation and inpainting).",
    )
    parser.add_argument("--version", action="version", version=f"MedDiffFMLib {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="TASK")
    sub.required = True
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        _add_verbose(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """-v after the task name too (and after a benchmark's), where users put it. SUPPRESS keeps one given before
    the task: a subcommand's own default would reset it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                _add_verbose(choice)


def _option_names(parser: argparse.ArgumentParser) -> dict:
    """dest -> option string of every option of `parser` and its subcommands (e.g. lam -> --lambda)."""
    names = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                names.update(_option_names(choice))
        elif action.option_strings:
            names.setdefault(action.dest, action.option_strings[-1])
    return names


def _non_finite_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The first option given a NaN or infinite number (argparse's float() accepts 'nan' and 'inf')."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            items = item if isinstance(item, (list, tuple)) else [item]  # append + nargs: lists of lists
            if any(isinstance(x, float) and not math.isfinite(x) for x in items):
                return _option_names(parser).get(name, name)
    return None


def _process_rank() -> int:
    """0 alone or in torchrun's first process; a malformed torchrun environment counts as 0 here, and training
    refuses it with its own message."""
    try:
        return torchrun_place().rank
    except InputError:
        return 0


def _what_a_cancel_leaves(args: argparse.Namespace) -> str:
    """A task writes nothing; a training run (a second Ctrl-C skips the stop at a checkpoint) keeps its last one."""
    out = getattr(args, "out", None)
    if args.command not in ("train", "finetune") or out is None:
        return "no output was written"
    try:
        step = json.loads((out / "last.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no checkpoint was written to {out}"
    return f"{out} keeps its checkpoint of step {step}; continue with the same command and --resume"


def _cancel_on_sigterm(signum, frame):
    """`kill PID` cancels a job as Ctrl-C does (no output written, exit code 130). Training installs its own
    handler for the duration of the loop (stop after the step, with a checkpoint)."""
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the task's own parser: its usage line shows the options it does take
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    bad = _non_finite_option(parser, args)
    if bad:
        print(f"error: {bad} must be a finite number (not NaN or infinite)", file=sys.stderr)
        return 2
    # A path or name the console's code page cannot show (Windows: cp1252 when redirected) must not end a finished job.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    level = logging.DEBUG if args.verbose else logging.INFO
    if _process_rank() > 0:  # under torchrun every process runs the command: only the first one reports progress
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    # Signal handlers can only be set from the main thread; main() may also run in another (scripts, tests).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, _cancel_on_sigterm)
    try:
        return int(args._run(args) or 0)
    except (Cancelled, KeyboardInterrupt):
        print(f"error: cancelled; {_what_a_cancel_leaves(args)}", file=sys.stderr)
        return 130
    except MedDiffFMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError, OSError) as exc:  # torch reports allocation failures as RuntimeErrors
        if isinstance(exc, OSError) and not is_out_of_memory(exc):  # the file system refused a path
            where = exc.filename2 or exc.filename  # os.replace(temporary, output): the output is the 2nd
            print(f"error: {exc.strerror or exc}" + (f": {where}" if where else ""), file=sys.stderr)
            return 2
        if not is_out_of_memory(exc):
            raise
        log.debug("out of memory", exc_info=True)
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        command = " ".join(filter(None, (args.command, getattr(args, "benchmark", None))))
        hint = OUT_OF_MEMORY_HINTS.get(command, OUT_OF_MEMORY_HINTS["sampling"])
        print(f"error: out of memory ({detail}). Try {hint}, or close other programs", file=sys.stderr)
        return 2
    finally:
        if main_thread:  # main() may be called from Python: leave the handler as it was
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_TRAINING_HINT = "a smaller --batch-size (--resume continues the run from its last checkpoint)"
#: What to change when a command runs out of memory (the model-running commands share the sampling hint).
OUT_OF_MEMORY_HINTS = {
    "sampling": "a smaller window batch (--window-batch 1) or a CT cropped to the region of interest",
    "train": _TRAINING_HINT,
    "finetune": _TRAINING_HINT,
    "evaluate denoise": "fewer or smaller CTs (--crop, --slices)",
    "evaluate anomaly": "fewer or smaller score volumes (crops around the lesions)",
    "preprocess": "a CT cropped to the region of interest",
    "info": "a CT cropped to the region of interest",
    "models": "a machine with more free memory",
}
