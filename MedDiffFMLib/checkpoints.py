"""Model files without pickle: weights in safetensors, everything else in JSON, and a small registry.

A model `<name>` is two files: `<name>.safetensors` (weights, fp16 or fp32) and `<name>.json` (the
ModelConfig, anatomy encoding, patch size, windows, training record and the SHA-256 of the weights file).
`load_model` checks the hash before parsing anything and never unpickles.

Training state (model, EMA, optimizer moments) is saved the same way: tensors in a
safetensors file, scalars in JSON, then a tiny `last.json` pointer is replaced atomically, so a run killed
mid-write still resumes from the previous complete state.

Models are found by name in the registries (`registry`: the bundled Resources/Models.json, then the user's), then
as `<name>.safetensors` in the user cache folder ($MEDDIFFFM_HOME or ~/.cache/meddifffm).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from .config import ModelConfig
from .errors import CheckpointError, InputError
from .io import atomic_path, sha256_file
from .registry import BUNDLED_REGISTRY, RESOURCES, cache_dir, installed_files, read_registry, registry, user_registry

log = logging.getLogger(__name__)

FORMAT = "meddifffm-model-1"
STATE_FORMAT = "meddifffm-train-state-1"

PathLike = Union[str, "os.PathLike[str]"]
#: A model's two files; `--model` reads a name ending in one of them as a file.
MODEL_FILE_SUFFIXES = (".safetensors", ".json")
#: PyTorch's files, which may hold pickled code: refused, never loaded.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
#: The keys `save_model` writes into a model description; a training record cannot replace them.
RECORD_KEYS = ("format", "config", "patch_size", "anatomy", "windows", "dtype", "weights", "sha256", "size")


def _weights_and_sidecar(path: PathLike) -> Tuple[Path, Path]:
    """`x`, `x.safetensors` or `x.json` -> (x.safetensors, x.json)."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in MODEL_FILE_SUFFIXES else path
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


# -- models ------------------------------------------------------------------------------------------
def save_model(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, path: PathLike,
               info: Optional[dict] = None, half: bool = True) -> Path:
    """Write `<path>.safetensors` + `<path>.json` atomically; returns the weights path.

    `info` (training record: steps, wall hours, device, validation losses, data summary...) is stored in
    the JSON next to the config; `half` stores fp16 weights (loaded back as fp32).
    """
    from safetensors.torch import save

    weights, sidecar = _weights_and_sidecar(path)
    reserved = sorted(set(info or {}) & set(RECORD_KEYS))
    if reserved:
        raise ValueError(f"the training record may not set {', '.join(reserved)}: save_model writes them")
    def stored_as(dtype):
        return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                for k, v in state_dict.items()}

    dtype = torch.float16 if half else torch.float32
    tensors = stored_as(dtype)
    overflow = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
                and bool(torch.isfinite(state_dict[k]).all())]
    if overflow:  # fp16 ends at 65504: such weights would load as inf
        log.warning("weights beyond the fp16 range (e.g. %s): %s is saved in fp32", overflow[0], weights.name)
        dtype = torch.float32
        tensors = stored_as(dtype)
    config = cfg.to_dict()
    # Both files are complete before either replaces its predecessor, and the two replaces follow each other at
    # once (the description first): a kill can hardly leave a new description beside the old weights, and
    # `train --resume` repairs that case.
    with atomic_path(weights) as tmp_weights, atomic_path(sidecar) as tmp_sidecar:
        # Bytes written like any file (save_file would create it readable by its owner only).
        tmp_weights.write_bytes(save(tensors, metadata={"format": FORMAT, "config": json.dumps(config)}))
        record = {"format": FORMAT, "config": config, "patch_size": cfg.patch_size, "anatomy": cfg.anatomy,
                  "windows": {k: list(v) for k, v in cfg.windows.items()}, "dtype": str(dtype).replace("torch.", ""),
                  "weights": weights.name, "sha256": sha256_file(tmp_weights), "size": tmp_weights.stat().st_size}
        record.update(info or {})
        tmp_sidecar.write_text(json.dumps(record, indent=1))
    return weights


def model_intact(path: PathLike) -> bool:
    """Whether a model's weights and description exist and agree (SHA-256); nothing is loaded."""
    weights, _ = _weights_and_sidecar(path)
    try:
        return weights.exists() and sha256_file(weights) == read_model_info(weights)["sha256"]
    except (CheckpointError, OSError):
        return False


def read_model_info(path: PathLike) -> dict:
    """The JSON record of a model file (no weights loaded)."""
    weights, sidecar = _weights_and_sidecar(path)
    if not sidecar.exists():
        raise CheckpointError(f"model description {sidecar} not found; a MedDiffFM model is a .safetensors file "
                              "with a .json of the same name next to it")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model description {sidecar} is not valid JSON ({exc}); re-download or "
                              "re-export the model") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{sidecar} is not a MedDiffFM model description (its top level is not a "
                              "JSON object); re-download or re-export the model")
    if info.get("format") == STATE_FORMAT:
        raise CheckpointError(f"{weights} is a training run's state (weights, EMA and optimizer to resume from), not a "
                              f"model; use the model the run exports, {sidecar.parent / 'ema.safetensors'}")
    found = info.get("format")
    if isinstance(found, str) and found.startswith("meddifffm-model-") and found != FORMAT:
        raise CheckpointError(f"{sidecar} describes a model of format {found!r}, which this version of MedDiffFM "
                              f"cannot read (it reads {FORMAT!r}); use the MedDiffFM version that made the model")
    if found != FORMAT:
        raise CheckpointError(f"{sidecar} is not a MedDiffFM model description (format {found!r}, "
                              f"expected {FORMAT!r})")
    missing = [key for key in ("config", "sha256") if key not in info]
    if missing:
        raise CheckpointError(f"{sidecar} lacks {' and '.join(missing)}; re-download or re-export the model")
    sha = info["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        # Without it the weights could not be checked before loading.
        raise CheckpointError(f"{sidecar} records no valid SHA-256 of its weights ({sha!r}); re-download or "
                              "re-export the model")
    return info


def load_model(name_or_path: PathLike, device: Union[str, torch.device] = "cpu"):
    """(MedDiffNet in eval mode, ModelConfig, info) from a registered name or a file path
    (a `finetune.ControlledNet` for a ControlNet model file)."""
    from .network import MedDiffNet

    weights = resolve_model(name_or_path)
    info = read_model_info(weights)
    if controlnet_task_in(info) is not None:  # fine-tuned: a ControlNet file that names its frozen base model
        from .finetune import load_controlled

        return load_controlled(weights, info, device)
    tensors = load_model_tensors(weights, info)
    try:
        cfg = ModelConfig.from_dict(info["config"])
        model = MedDiffNet(cfg)
    except (TypeError, ValueError) as exc:  # InputError too (an unknown anatomy source)
        raise CheckpointError(f"{weights.name}: the model config is unusable ({exc}); re-download or re-export "
                              "the model") from None
    check_architecture(model.state_dict(), tensors, weights.name)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return model.to(device).eval(), cfg, info


def controlnet_task_in(info: dict) -> Optional[str]:
    """The task a model description's ControlNet was fine-tuned for, or None for a base model."""
    return info.get("task") if info.get("kind") == "controlnet" else None


def load_model_tensors(weights: Path, info: dict) -> Dict[str, torch.Tensor]:
    """The tensors of a model file, once they are the ones its description records (size, SHA-256), its
    description's config is the one the weights file carries, and every weight is finite."""
    size = info.get("size")
    if isinstance(size, int) and weights.exists() and weights.stat().st_size != size:
        raise CheckpointError(f"{weights.name} holds {weights.stat().st_size} bytes where its description records "
                              f"{size}: the file is truncated or was replaced; re-download or re-export the model")
    tensors, metadata = _load_verified(weights, info["sha256"])
    # The hash covers the weights file, which carries its own copy of the config; the description's copy is what
    # loading uses, so the two must agree.
    stored = metadata.get("config")
    try:
        differs = stored is not None and json.loads(stored) != info["config"]
    except ValueError:
        differs = True
    if differs:
        raise CheckpointError(f"the description of {weights.name} gives a config that differs from the one stored "
                              "in the weights file (edited by hand?); re-download or re-export the model")
    broken = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                  None)
    if broken is not None:
        raise CheckpointError(f"{weights.name} holds NaN or infinite weights (e.g. {broken}): training diverged "
                              "before it was saved; use an earlier checkpoint or retrain")
    return tensors


def _load_verified(weights: Path, expected_sha: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and metadata of `weights` once its SHA-256 is the recorded one. The file is read once, and the bytes
    hashed are the bytes parsed: no mapping of the file stays open (Windows can neither delete nor replace a mapped
    file, e.g. the training state a resumed run rotates out two checkpoints later), and it cannot change between
    check and load."""
    from safetensors.torch import load

    if not weights.exists():
        raise CheckpointError(f"model weights {weights} not found")
    data = weights.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha:
        raise CheckpointError(
            f"{weights.name} is damaged or was replaced: its SHA-256 {actual[:12]}... does not match the "
            f"recorded {str(expected_sha)[:12]}...; re-download or re-export the model")
    try:
        # The format: an 8-byte little-endian header length, then the JSON header, which holds the metadata.
        return load(data), json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own error types for truncated/garbage headers
        raise CheckpointError(f"{weights.name} is not a readable safetensors file ({exc}); the file is "
                              "truncated or corrupt (MedDiffFM never loads pickled .pt/.pth weights)") from None


def check_architecture(expected: Dict[str, torch.Tensor], found: Dict[str, torch.Tensor], name: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    # Integer weights where floats belong would load (cast to float) and run, giving noise.
    wrong_type = [f"{k} {found[k].dtype} vs {expected[k].dtype}" for k in sorted(set(expected) & set(found))
                  if found[k].is_floating_point() != expected[k].is_floating_point()]
    if missing or unexpected or wrong or wrong_type:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                             ("wrong type", wrong_type)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {items[0]})")
        raise CheckpointError(f"{name}: the weights do not fit the architecture in its config: "
                              + "; ".join(parts))


# -- registry ----------------------------------------------------------------------------------------
def available_models() -> List[str]:
    names = [m["name"] for m in registry()]
    if cache_dir().is_dir():
        names += sorted(p.stem for p in cache_dir().glob("*.safetensors") if p.stem not in names)
    return names


def resolve_model(name_or_path: PathLike) -> Path:
    """Weights path for a registered model name (`registry.installed_files`), a file path, or the
    name of a model in the user cache. A registered name wins over a file of that name in the working folder
    (e.g. a `default.json` preset config); a name, registered or in the cache, wins over a folder of that name."""
    text = str(name_or_path)
    if not text.strip():
        raise CheckpointError(f"no model named; available: {', '.join(available_models()) or 'none'} "
                              "(or give the path of a .safetensors file)")
    path = Path(text)
    _refuse_pickle(path)
    weights, sidecar = _weights_and_sidecar(text)
    is_path = any(sep in text for sep in (os.sep, os.altsep) if sep) or text.endswith(MODEL_FILE_SUFFIXES)
    entry = None if is_path else next((m for m in registry() if m["name"] == text), None)
    if entry is not None:
        installed = installed_files(entry)
        if installed:
            _check_registered(text, entry, installed[0])
            return installed[0]
        if entry.get("registry") == "user":
            where = (f"its file {entry['file']} is missing from {user_registry().parent}; register the model again "
                     f"(models FILE --register {text} --overwrite)")
        elif entry.get("url"):
            where = f"download it from {entry['url']} to {cache_dir() / entry['file']}"
        else:
            where = f"its file {entry['file']} is missing from {RESOURCES} and {cache_dir()}"
        raise CheckpointError(f"model {text!r} is registered but not installed: {where}")
    cached = None if is_path else cache_dir() / f"{text}.safetensors"
    in_cache = cached is not None and cached.exists()
    if path.is_dir() and not in_cache:  # e.g. a run folder (`train --out NAME`); a name, as above, wins over it
        raise CheckpointError(f"{text} is a folder; give the model file in it (a training run's is "
                              f"{path / 'ema.safetensors'})")
    if is_path and not weights.exists() and not sidecar.exists():
        registered = next((m["name"] for m in registry() if m["name"] == weights.stem and text == weights.name), None)
        hint = f"; registered models are named without a suffix: {registered}" if registered else ""
        given = "" if path in (weights, sidecar) else f"{path} (nor "
        raise CheckpointError(f"model file {given}{weights}{')' if given else ''} not found{hint}")
    if is_path or weights.exists() or sidecar.exists():
        return weights
    if in_cache:
        return cached
    raise CheckpointError(f"unknown model {text!r}; available: {', '.join(available_models()) or 'none'} "
                          f"(or give the path of a .safetensors file)")


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: MedDiffFM loads only .safetensors models with their .json description; "
                              f"{path.suffix} files can hold pickled code and are never loaded")


def _check_registered(name: str, entry: dict, weights: Path) -> None:
    """Refuse an installed file of a registered model that is not the one registered (its description records the
    weights' SHA-256, which loading verifies against the weights)."""
    recorded = read_model_info(weights).get("sha256")
    if entry.get("sha256") and recorded != entry["sha256"]:
        raise CheckpointError(f"the installed files of model {name!r} ({weights}) are not the registered model "
                              f"(SHA-256 {str(recorded)[:12]}..., registered {entry['sha256'][:12]}...); reinstall "
                              "them from the repository or the model's download")


def register_model(source: PathLike, name: str, description: str, licence: str = "Apache-2.0",
                   measured_times: Optional[dict] = None, registry_path: Optional[Path] = None) -> dict:
    """Copy a model (weights + JSON) to `Models/meddifffm-<name>.*` beside a registry (by default the user's,
    `registry.user_registry()`; the bundled one is `registry.BUNDLED_REGISTRY`) and add/replace its entry there;
    returns the entry. The copy is verified (SHA-256) before the registry changes."""
    import shutil

    registry_path = user_registry() if registry_path is None else Path(registry_path)
    # Resources/Models.schema.json's names: a file name of its own, which --model takes as a name, not a path.
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
        raise InputError(f"a model name is letters, digits, '.', '_' and '-' (not first a '.'), got {name!r}")
    suffix = Path(name).suffix
    if suffix in MODEL_FILE_SUFFIXES or suffix.lower() in PICKLE_SUFFIXES:  # --model would take it for a file
        raise InputError(f"a model name may not end in a file suffix ({suffix}): --model reads {name!r} as a file, "
                         "never as a registered name; give a name without it")
    if registry_path != BUNDLED_REGISTRY and any(m["name"] == name for m in read_registry(BUNDLED_REGISTRY)):
        raise InputError(f"{name} is the name of a model shipped with MedDiffFM (Resources/Models.json); give "
                         "yours another name")

    _refuse_pickle(Path(source))
    src_weights, src_sidecar = _weights_and_sidecar(source)
    _, _, info = load_model(src_weights)  # the whole check, before anything installed is replaced
    models = [m for m in read_registry(registry_path) if m["name"] != name]  # a damaged registry: before any copy
    folder = registry_path.parent / "Models"
    weights, sidecar = _weights_and_sidecar(folder / f"meddifffm-{name}")
    # The copies are checked before they replace anything: a training run may export a new model meanwhile.
    with atomic_path(weights) as tmp_weights, atomic_path(sidecar) as tmp_sidecar:
        shutil.copyfile(src_weights, tmp_weights)
        shutil.copyfile(src_sidecar, tmp_sidecar)
        if json.loads(tmp_sidecar.read_text()) != info or sha256_file(tmp_weights) != info["sha256"]:
            raise CheckpointError(f"{src_weights} changed while it was registered (a training run exporting its "
                                  "model?); nothing was installed: register it again")
    entry = {"name": name, "file": weights.relative_to(registry_path.parent).as_posix(), "url": None,
             "sha256": info["sha256"], "size": weights.stat().st_size, "description": description,
             "preset": info["config"]["name"], "licence": licence,
             "training": {k: info.get(k) for k in ("steps", "wall_hours", "device", "validation_loss")}}
    if measured_times:
        entry["measured_times"] = measured_times
    models.append(entry)
    with atomic_path(registry_path) as tmp:
        tmp.write_text(json.dumps({"models": models}, indent=1) + "\n")
    return entry


# -- training state ----------------------------------------------------------------------------------
def save_training_state(out_dir: PathLike, step: int, tensors: Dict[str, torch.Tensor], scalars: dict,
                        keep: int = 2) -> Path:
    """Write state-<step>.safetensors/.json, then point `last.json` at them; keep the newest `keep`."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    stem = f"state-{step:08d}"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(out_dir / f"{stem}.safetensors") as tmp:
        tmp.write_bytes(save(tensors, metadata={"format": STATE_FORMAT}))
    record = {"format": STATE_FORMAT, "step": step, "sha256": sha256_file(out_dir / f"{stem}.safetensors"),
              **scalars}
    with atomic_path(out_dir / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(record))
    with atomic_path(out_dir / "last.json") as tmp:  # the commit point: everything above is complete
        tmp.write_text(json.dumps({"state": stem, "step": step}))
    states = sorted(out_dir.glob("state-*.json"))
    for old in states[:-keep]:
        for path in (old, old.with_suffix(".safetensors")):
            path.unlink(missing_ok=True)
    return out_dir / f"{stem}.safetensors"


def _saved_states(out_dir: Path) -> Tuple[List[str], List[str]]:
    """The states a resume tries, newest first: the one `last.json` points at and the older ones kept beside it (every
    one kept, when the pointer is damaged); and what was wrong with the pointer."""
    kept = sorted((path.stem for path in out_dir.glob("state-*.json")), reverse=True)
    try:
        newest = json.loads((out_dir / "last.json").read_text())["state"]
        return [newest] + [stem for stem in kept if stem < newest], []  # never one written after the pointer
    except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: JSON that is not an object
        return kept, [f"last.json: {exc}"]


def training_state_record(out_dir: PathLike) -> dict:
    """The scalars (JSON) of the state a resume would start from, its tensors checked against their SHA-256 but not
    loaded; {} when there is no saved state. What a run needs to know before it prepares its data, e.g. the patch mix
    it trained on; a run none of whose states is readable is refused here, as `load_training_state` would."""
    out_dir = Path(out_dir)
    if not (out_dir / "last.json").exists():
        return {}
    kept, problems = _saved_states(out_dir)
    for stem in kept:
        try:
            record = json.loads((out_dir / f"{stem}.json").read_text())
            actual = sha256_file(out_dir / f"{stem}.safetensors")
            if actual == record["sha256"]:
                return record
            problems.append(f"{stem}: its SHA-256 {actual[:12]}... does not match the recorded "
                            f"{str(record['sha256'])[:12]}...")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # as load_training_state: that state is skipped
            problems.append(f"{stem}: {exc}")
    raise _unreadable_run(out_dir, problems)


def _unreadable_run(out_dir: Path, problems: List[str]) -> CheckpointError:
    return CheckpointError(f"cannot resume from {out_dir}: the training state is unreadable "
                           f"({'; '.join(problems)}); start a new run in another folder")


def load_training_state(out_dir: PathLike) -> Optional[Tuple[Dict[str, torch.Tensor], dict]]:
    """(tensors, scalars) of the newest readable state, or None when there is no saved state.

    That is the state `last.json` points at or, when it is damaged, the older one `save_training_state`
    keeps next to it: a damaged file then costs one checkpoint interval, not the run.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "last.json").exists():
        return None
    kept, problems = _saved_states(out_dir)
    unreadable = []
    for stem in kept:
        try:
            record = json.loads((out_dir / f"{stem}.json").read_text())
            tensors, _ = _load_verified(out_dir / f"{stem}.safetensors", record["sha256"])
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as exc:
            problems.append(f"{stem}: {exc}")
            unreadable.append(stem)
            continue
        if problems:
            log.warning("resuming from %s; newer training state unreadable (%s)", stem, "; ".join(problems))
        for bad in unreadable:  # renamed, so that pruning the oldest states cannot delete the good one instead
            for path in out_dir.glob(f"{bad}.*"):
                path.rename(path.with_name(f"damaged-{path.name}"))
        return tensors, record
    raise _unreadable_run(out_dir, problems)
