"""CLI `models`: the registered models, one model described and verified, or a trained model registered."""
from __future__ import annotations

import argparse
import json
import logging
import textwrap
from typing import Any, Dict, List

NAME = "models"
HELP = ("List the registered models (name, kind, preset, training steps, installed or not, bundled or yours); with "
        "a name or .safetensors file, describe that model and verify its weights against their SHA-256; with "
        "--register, install a trained model under a name the tasks' --model takes.")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a registered name or a .safetensors model file to describe")
    parser.add_argument("--register", metavar="NAME",
                        help="copy MODEL into your own models ($MEDDIFFFM_HOME/user, default "
                        "~/.cache/meddifffm/user) as Models/meddifffm-NAME and list it in the Models.json there, "
                        "which extension updates leave alone; the copy is verified first")
    parser.add_argument("--description", help="one line for the registry; required with --register")
    parser.add_argument("--overwrite", action="store_true", help="with --register: replace a model of that name")
    parser.add_argument("--bundled", action="store_true",
                        help="with --register, for developers: install into the extension's Resources/Models.json, "
                        "the models shipped with it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.register is not None:
        if not args.model or not args.description:
            raise InputError("--register NAME needs the model file to install (MODEL) and --description TEXT")
        return _register(args)
    if args.description or args.overwrite or args.bundled:
        raise InputError("--description, --overwrite and --bundled go with --register NAME")
    report: Any = describe(args.model) if args.model else listing()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format_description(report) if args.model else _format_listing(report))
    return 0


def listing() -> List[Dict[str, Any]]:
    """One row per registered model: its registry entry, its kind (from its own description when installed), and
    whether it ships with MedDiffFM or the user registered it."""
    from ..checkpoints import controlnet_task_in, read_model_info, resolve_model
    from ..errors import CheckpointError
    from ..registry import installed_files, registry

    rows = []
    for entry in registry():
        kind, weights = None, None
        try:  # found and read where the tasks find it (Resources, then the user cache)
            weights = resolve_model(entry["name"])
            task = controlnet_task_in(read_model_info(weights))
            kind = "base" if task is None else f"{task} ControlNet"
        except CheckpointError:  # not installed; or its file is there but unreadable: this row says so
            if installed_files(entry):
                kind = "damaged"
        rows.append({"name": entry["name"], "kind": kind, "preset": entry.get("preset"),
                     "steps": (entry.get("training") or {}).get("steps"), "installed": kind is not None,
                     "registry": entry["registry"],
                     "file": None if weights is None else str(weights), "description": entry.get("description", "")})
    return rows


def describe(name_or_path: str) -> Dict[str, Any]:
    """A model's description, after loading it whole: SHA-256, size, config and weights are checked."""
    from ..checkpoints import controlnet_task_in, load_model, resolve_model
    from ..network import parameter_count

    weights = resolve_model(name_or_path)
    model, cfg, info = load_model(weights)
    task = controlnet_task_in(info)
    training = {key: info.get(key) for key in ("steps", "wall_hours", "device", "validation_loss")}
    settings = info.get("settings") or {}
    return {
        "model": str(name_or_path), "file": str(weights), "verified": True, "sha256": info.get("sha256"),
        "size_bytes": info.get("size"), "kind": "base" if task is None else f"{task} ControlNet",
        "base": info.get("base_model"), "parameters": parameter_count(model),
        "config": {key: getattr(cfg, key) for key in ("name", "patch_size", "channels", "attention_levels",
                                                       "num_train_timesteps", "schedule", "anatomy", "regions",
                                                       "windows", "train_spacings")},
        "training": training,
        "settings": {key: settings.get(key) for key in ("batch_size", "lr", "low_noise_fraction", "low_noise_max_t",
                                                         "correlated_noise_fraction", "precision") if key in settings},
        "training_data": info.get("training_data"),
    }


def _register(args: argparse.Namespace) -> int:
    from .. import checkpoints
    from ..errors import InputError
    from ..registry import BUNDLED_REGISTRY, read_registry, user_registry

    target = BUNDLED_REGISTRY if args.bundled else user_registry()
    existing = next((entry for entry in read_registry(target) if entry["name"] == args.register), None)
    if existing is not None and not args.overwrite:
        raise InputError(f"a model named {args.register} is registered already; give another name, or --overwrite to "
                         "replace it (the tasks that default to it would then run the new one)")
    replaced = existing.get("sha256") if existing is not None else None
    entry = checkpoints.register_model(args.model, args.register, args.description, registry_path=target)
    dependents = _orphaned_controlnets(replaced) if replaced and entry["sha256"] != replaced else []
    if dependents:
        log.warning("the ControlNet(s) %s were fine-tuned on the %s just replaced and load only on it: fine-tune them "
                    "again on the new one (finetune --base %s), or keep the old base registered under another name",
                    ", ".join(dependents), args.register, args.register)
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        print(f"registered {entry['name']}: {target.parent / entry['file']} (SHA-256 {entry['sha256'][:12]}..., "
              f"{entry['size'] / 2 ** 20:.1f} MiB); the tasks take it as --model {entry['name']}")
    return 0


def _orphaned_controlnets(base_sha256: str) -> List[str]:
    """Names of the models that are ControlNets fine-tuned on the base with these weights and that now find no base
    (`finetune.find_base`: a ControlNet loads only on the exact weights it was trained on, under any name)."""
    from .. import checkpoints
    from ..errors import CheckpointError
    from ..finetune import find_base

    found = []
    for name in checkpoints.available_models():
        try:
            recorded = checkpoints.read_model_info(checkpoints.resolve_model(name)).get("base_model")
        except CheckpointError:
            continue
        if isinstance(recorded, dict) and recorded.get("sha256") == base_sha256:
            try:
                find_base(recorded, name)
            except CheckpointError:
                found.append(name)
    return found


def _format_listing(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "no model is registered (Resources/Models.json and your Models.json list none)"
    lines = [f"{'name':<24} {'kind':<28} {'preset':<8} {'steps':>7}  {'registry':<8} description"]
    for row in rows:
        kind = row["kind"] if row["installed"] else "(not installed)"
        steps = "" if row["steps"] is None else str(row["steps"])
        description = textwrap.shorten(row["description"], 60, placeholder=" ...")
        lines.append(f"{row['name']:<24} {kind:<28} {str(row['preset']):<8} {steps:>7}  {row['registry']:<8} "
                     f"{description}")
    return "\n".join(lines)


def _training_data(data: Any) -> str:
    """What a model was trained on, in a line: its CTs by body region, and what its task adds (a super-resolution
    ControlNet's slice factor, a lesion ControlNet's share of patches on a lesion); '' without a record. Values of
    another type than this version writes are left out (the record is free-form)."""
    if not isinstance(data, dict):
        return ""
    parts = []
    cases, regions = data.get("cases"), data.get("regions")
    if isinstance(cases, list):
        by_region = (" (" + ", ".join(f"{region} {count}" for region, count in regions.items()) + ")"
                     if isinstance(regions, dict) and regions else "")
        parts.append(f"{len(cases)} CTs{by_region}")
    if isinstance(data.get("slice_factor"), int):
        parts.append(f"slice factor {data['slice_factor']}")
    if isinstance(data.get("lesion_probability"), (int, float)):
        parts.append(f"{data['lesion_probability']:g} of the patches centred on a lesion")
    return ", ".join(parts)


def _format_description(report: Dict[str, Any]) -> str:
    cfg, training = report["config"], report["training"]
    # The training record is free-form (its hash covers the weights only): a value of another type is left out.
    losses = training.get("validation_loss")
    validation = losses.get("mean") if isinstance(losses, dict) else None
    lines = [
        f"model      {report['model']}: {report['kind']}, {report['parameters'] / 1e6:.2f}M parameters",
        f"file       {report['file']} ({report['size_bytes']} bytes, SHA-256 {report['sha256']}: verified)",
        f"network    preset {cfg['name']}, {cfg['patch_size']}^3 patches, channels {list(cfg['channels'])}, "
        f"{cfg['num_train_timesteps']} {cfg['schedule']} timesteps, {cfg['anatomy'].get('source')} anatomy",
        "windows    " + ", ".join(f"{region} [{lo:g}, {hi:g}] HU" for region, (lo, hi) in cfg["windows"].items()),
        f"trained    {training.get('steps')} steps, {training.get('wall_hours')} h on {training.get('device')}"
        + (f", validation L1 {validation:.4f}" if isinstance(validation, (int, float)) else ""),
    ]
    data = _training_data(report.get("training_data"))
    if data:
        lines.append(f"data       {data}")
    if isinstance(report["base"], dict):
        base = report["base"]
        lines.append(f"base       {base.get('name')} (SHA-256 {str(base.get('sha256'))[:12]}...)")
    if report["settings"]:
        lines.append("settings   " + ", ".join(f"{key} {value}" for key, value in report["settings"].items()))
    return "\n".join(lines)
