"""CLI `train`: pre-train a MedDiffFM model on CT volumes (CPU, one GPU, or N GPUs with torchrun)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import _common

NAME = "train"
HELP = ("Pre-train the diffusion model on CT volumes with multi-level patches. Resumable (--resume); "
        "multi-GPU: torchrun --standalone --nproc_per_node=N -m MedDiffFMLib train ...")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training import RUN_OWN_SETTINGS

    parser.add_argument("--preset", help="model preset: tiny, default or paper (default: default, or the "
                        "configuration of the --init-from model)")
    parser.add_argument("--config", type=Path, help="JSON ModelConfig (overrides --preset)")
    parser.add_argument("--data", nargs="+", default=["train"],
                        help="'train' or 'validation' (split of the shared CT data), a folder, or CT files")
    parser.add_argument("--anatomy-labels", nargs="+", metavar="LABELS",
                        help="for a model whose anatomy source is 'user': your own anatomy label map (a file) for "
                        "each --data CT file or DICOM series folder, in the same order and on its grid")
    parser.add_argument("--val-anatomy-labels", nargs="+", metavar="LABELS",
                        help="the same for each --val-data CT file")
    _common.add_run_arguments(parser)
    parser.add_argument("--init-from", help="start from the weights of this model (name or .safetensors path)")
    parser.add_argument("--mode-weights",
                        help="mix of patch modes, e.g. whole=0.2,crop2x=0.3,crop=0.5 (default: a resumed run's own, "
                        "else that one)")
    parser.add_argument("--low-noise-fraction", type=float,
                        help="share of timesteps drawn from t < --low-noise-max-t (default: a resumed run's own, "
                        f"else {RUN_OWN_SETTINGS['low_noise_fraction']:g})")
    parser.add_argument("--low-noise-max-t", type=int,
                        help="upper end of the low-noise timesteps (default: a resumed run's own, else "
                        f"{RUN_OWN_SETTINGS['low_noise_max_t']})")
    parser.add_argument("--correlated-noise", type=float, metavar="FRACTION",
                        help="share of the noise in the lowest 30 %% of the timesteps given the in-plane texture of "
                             "CT noise (ramp-filtered, like filtered back-projection) instead of white: teaches the "
                             "prior the noise that denoising meets (default: a resumed run's own share, else 0)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0, help="also checkpoint after this long")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..dataset import CACHE_SUFFIX, CTCase, CTPatchDataset, split_cases
    from ..io import holds_dicom_files
    from ..errors import InputError
    from ..training import TrainSettings, check_resume_config, train, with_run_own

    _common.check_run_folder(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _model_config(args)

    def cases(spec, labels, option: str, data_option: str):
        if labels is not None:  # paired one to one, so only with CTs listed one by one
            if len(labels) != len(spec) or any(item in ("train", "validation") for item in spec):
                raise InputError(f"{option} gives one label map per CT file of {data_option}, in the same order: "
                                 f"got {len(labels)} label maps for {' '.join(spec)}")
            for item in map(Path, spec):
                if item.name.lower().endswith(CACHE_SUFFIX):
                    raise InputError(f"{item} is a cache entry, which holds its anatomy labels already: give its CT "
                                     f"file to pair with a label map, or train on cache entries without {option}")
                if item.is_dir() and not holds_dicom_files(item):
                    raise InputError(f"{item} is a folder without a DICOM series: with {option}, list the CT files "
                                     "one by one, each beside its label map")
            return [CTCase(str(item), region=args.region, mask=str(label)) for item, label in zip(spec, labels)]
        if _common.is_split(spec):
            return split_cases(args.data_root, spec[0])
        return _common.user_cases(spec, args.region)

    val_spec = args.val_data if args.val_data is not None else (["validation"] if args.data == ["train"] else [])
    _common.check_training_region(args, cfg.regions, args.data, val_spec)
    if args.val_anatomy_labels is not None and not val_spec:
        raise InputError("--val-anatomy-labels needs --val-data: the CT files they belong to")
    cache = args.cache_dir or args.out.parent / "cache"
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, seed=args.seed,
        low_noise_fraction=args.low_noise_fraction, low_noise_max_t=args.low_noise_max_t,
        correlated_noise_fraction=args.correlated_noise,
        validate_every=args.validate_every, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, num_workers=args.num_workers,
        channels_last=args.channels_last, compile=args.compile, half_export=_common.half_export(args),
        precision=args.precision)
    # Everything that can be refused is refused before the (slow) data preparation, with the values train() will
    # use: a resumed run's own, else a new run's.
    saved = check_resume_config(args.out, cfg) if args.resume else {}
    with_run_own(settings, saved.get("settings") or {}).check(cfg)
    # Like those settings, a resumed run keeps its own patch mix unless another is given (a state of an older
    # version records it only in the exported model's description).
    trained_on = saved.get("training_data") or (_exported_training_data(args.out) if saved else {})
    mode_weights = (_mode_weights(args.mode_weights) if args.mode_weights is not None
                    else trained_on.get("mode_weights"))  # None: the dataset's default
    train_cases = cases(args.data, args.anatomy_labels, "--anatomy-labels", "--data")
    val_cases = cases(val_spec, args.val_anatomy_labels, "--val-anatomy-labels", "--val-data") if val_spec else None
    # Validation first: its few CTs fail faster (e.g. one without its label map) than the training set is prepared.
    val = CTPatchDataset(val_cases, cfg, cache, seed=args.seed + 1, anatomy_dropout=0.0) if val_spec else None
    data = CTPatchDataset(train_cases, cfg, cache, seed=args.seed, mode_weights=mode_weights)
    record = train(cfg, data, args.out, settings, val_data=val, resume=args.resume, init_from=args.init_from,
                   progress=_common.training_progress(args.progress))
    return _common.training_result(record, args.out / "ema.safetensors", "EMA model")


def _exported_training_data(out: Path) -> dict:
    """The training data recorded in a run's exported EMA model ({} when it cannot be read)."""
    from ..checkpoints import read_model_info
    from ..errors import CheckpointError

    try:
        return read_model_info(out / "ema.json").get("training_data") or {}
    except CheckpointError:
        return {}


def _model_config(args: argparse.Namespace):
    """The ModelConfig of --config, else of the --init-from model, else of --preset (default: `default`)."""
    from ..config import ModelConfig, preset
    from ..errors import InputError

    if args.config:
        try:
            return ModelConfig.from_dict(json.loads(args.config.read_text(encoding="utf-8-sig")))
        except OSError as exc:
            raise InputError(f"cannot read --config {args.config} ({exc.strerror or exc})") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(f"--config {args.config} is not a usable model configuration ({exc})") from None
    if args.init_from:
        from ..checkpoints import controlnet_task_in, load_model, read_model_info, resolve_model
        from ..training import refuse_controlnet_start

        info = read_model_info(resolve_model(args.init_from))
        refuse_controlnet_start(args.init_from, controlnet_task_in(info))
        cfg = ModelConfig.from_dict(info["config"])
        if args.preset and args.preset != cfg.name:
            raise InputError(f"--init-from {args.init_from} is a {cfg.name!r} model, but --preset {args.preset} asks "
                             "for another: leave --preset out to train the model's own configuration")
        load_model(args.init_from)  # its weights checked too, before the data are prepared (minutes)
        log.info("--init-from: using the configuration of %s (%s)", args.init_from, cfg.name)
        return cfg
    try:
        return preset(args.preset or "default")
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _mode_weights(text: str) -> dict:
    from ..dataset import check_mode_weights
    from ..errors import InputError

    try:
        weights = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise InputError(f"--mode-weights must look like whole=0.2,crop2x=0.3,crop=0.5, got {text!r}") from None
    return check_mode_weights(weights)
