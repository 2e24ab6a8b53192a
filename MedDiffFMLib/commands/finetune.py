"""CLI `finetune`: train a ControlNet on a frozen base model for super-resolution or lesion generation."""
from __future__ import annotations

import argparse
import logging

from . import _common

NAME = "finetune"
HELP = ("Fine-tune a base model with a ControlNet (the base stays frozen) for super-resolution (control: the "
        "slice-averaged patch) or lesion generation/inpainting (control: the lesion mask). Resumable "
        "(--resume); multi-GPU: torchrun --standalone --nproc_per_node=N -m MedDiffFMLib finetune ...")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..finetune import TASKS

    parser.add_argument("--task", choices=sorted(TASKS), required=True,
                        help="what the ControlNet learns to condition on")
    parser.add_argument("--base", required=True, help="base model: registered name or .safetensors path")
    parser.add_argument("--data", nargs="+", default=["train"],
                        help="'train' or 'validation' (split of the shared CT data), or CT files (a folder "
                        "too for super-resolution)")
    parser.add_argument("--masks", nargs="+", help="lesion masks, one per --data CT file (lesion task)")
    parser.add_argument("--val-masks", nargs="+", help="lesion masks of --val-data (lesion task)")
    _common.add_run_arguments(parser)
    parser.add_argument("--factor", type=int, default=5, help="super-resolution: thin slices per thick slice")
    parser.add_argument("--lesion-probability", type=float,
                        help="lesion: share of patches centred on (near) a lesion (default 0.8; a resumed run keeps "
                             "its own)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import read_model_info, resolve_model
    from ..config import ModelConfig
    from ..finetune import DEFAULT_LESION_PROBABILITY, check_finetune_start, check_training_factor, finetune
    from ..training import TrainSettings

    _common.check_run_folder(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dict(read_model_info(resolve_model(args.base))["config"])
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                             seed=args.seed, validate_every=args.validate_every,
                             checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
                             half_export=_common.half_export(args), low_noise_fraction=0.0, precision=args.precision)
    settings.check(cfg)  # before the (slow) data preparation
    factor = check_training_factor(args.factor, cfg) if args.task == "super-resolution" else None
    _, resumed = check_finetune_start(args.base, args.task, args.out, args.resume, factor)
    if args.task == "lesion" and args.lesion_probability is None:  # as train's patch mix: the run's own, if any
        trained_on = resumed.get("training_data") or {}
        args.lesion_probability = trained_on.get("lesion_probability", DEFAULT_LESION_PROBABILITY)
    val_spec = args.val_data if args.val_data is not None else (["validation"] if args.data == ["train"] else [])
    _common.check_training_region(args, cfg.regions, args.data, val_spec)
    _check_masks(args, val_spec)  # before the (slow) data preparation
    if args.task == "super-resolution":
        data = _super_resolution_data(args, args.data, cfg, args.seed, None)
        val = _super_resolution_data(args, val_spec, cfg, args.seed + 1, 0.0) if val_spec else None
    else:
        data = _lesion_data(args, args.data, args.masks, cfg, args.seed, None)
        val = _lesion_data(args, val_spec, args.val_masks, cfg, args.seed + 1, 0.0) if val_spec else None
    record = finetune(args.base, args.task, data, args.out, settings, val_data=val, resume=args.resume,
                      progress=_common.training_progress(args.progress))
    return _common.training_result(record, args.out / "ema.safetensors", "ControlNet model")


def _super_resolution_data(args, spec, cfg, seed: int, anatomy_dropout):
    from ..dataset import CTPatchDataset, split_cases
    from ..finetune import SuperResolutionPairs

    if _common.is_split(spec):
        files = split_cases(args.data_root, spec[0])
    else:
        files = _common.user_cases(spec, args.region)
    # Patch level only: super-resolution runs on the native thin grid, never on a resized whole volume.
    patches = CTPatchDataset(files, cfg, args.cache_dir or args.out.parent / "cache", seed=seed,
                             mode_weights={"crop": 1.0}, anatomy_dropout=anatomy_dropout)
    return SuperResolutionPairs(patches, args.factor)


def _check_masks(args, val_spec) -> None:
    """Refuse lesion masks that do not pair up with their CT files, or that would be ignored."""
    from ..errors import InputError

    if args.task != "lesion":
        if args.masks or args.val_masks:
            raise InputError(f"--masks / --val-masks are lesion masks; the {args.task} task takes none")
        return
    for spec, masks, flags in ((args.data, args.masks, "--data / --masks"),
                               (val_spec, args.val_masks, "--val-data / --val-masks")):
        if _common.is_split(spec) or not spec:
            if masks:
                what = f"the {spec[0]!r} split brings its own masks" if spec else "there is no --val-data"
                raise InputError(f"{flags}: masks go with CT files; {what}")
        elif not masks or len(masks) != len(spec):
            raise InputError(f"the lesion task needs one mask per CT file: {len(spec)} CT files, "
                             f"{len(masks or [])} masks ({flags})")


def _lesion_data(args, spec, masks, cfg, seed: int, anatomy_dropout):
    from ..finetune import LesionPatches, lesion_cases

    if _common.is_split(spec):
        cases = lesion_cases(args.data_root, spec[0])
    else:
        cases = [(ct, mask, args.region) for ct, mask in zip(spec, masks)]
    return LesionPatches(cases, cfg, seed=seed, lesion_probability=args.lesion_probability,
                         anatomy_dropout=anatomy_dropout)
