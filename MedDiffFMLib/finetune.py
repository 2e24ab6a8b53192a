"""ControlNet fine-tuning: a trainable copy of the pre-trained encoder steers the frozen base model.

`ControlledNet` wraps a pre-trained `MedDiffNet`: MONAI's `ControlNet` is built with the base UNet's
architecture, its shared weights are copied from the base UNet, and its residual outputs go through
zero-initialised convolutions, so before any training the controlled model predicts exactly what the
base model predicts. Only the ControlNet trains; the base stays frozen.

Fine-tuning reuses `training.train` (a ControlledNet builder and a ControlNet-only export); a ControlNet
model file holds only the ControlNet weights and names its base model by name (or absolute path) and by the
SHA-256 of its weights; `find_base` tries the name first, then any installed model with that SHA-256.

The control signal is one extra volume at full patch resolution (the upsampled thick-slice CT for
super-resolution, the lesion mask for lesion generation). It travels as the last channel of the condition
(`ControlledCondition` for sampling), so the sliding-window sampler windows it with everything else and
a `ControlledNet` is called exactly like a `MedDiffNet`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import checkpoints
from .anatomy import encode_anatomy
from .checkpoints import (available_models, check_architecture, controlnet_task_in, load_model, read_model_info,
                          resolve_model, save_model, training_state_record)
from .conditioning import VolumeCondition, anatomy_spec, assemble, condition_channels
from .config import ModelConfig
from .dataset import case_name, case_spacings, split_cases, training_anatomy
from .errors import CheckpointError, InputError
from .io import read_mask, read_volume
from .network import MedDiffNet, check_loaded, uncompiled, unet_kwargs, use_onednn_on_cpu
from .orientation import AxisOrder
from .position import global_coords
from .preprocess import guess_region, resample, window_to_unit
from .training import is_controlnet_run, train
from .validation import check_ct

log = logging.getLogger(__name__)

#: Fine-tuning tasks and what their control volume holds.
TASKS = {
    "super-resolution": "the thick-slice CT, slice-averaged and upsampled to the thin grid, in [-1, 1]",
    "lesion": "the lesion mask (1 inside, 0 outside)",
}


class ControlledNet(nn.Module):
    """eps = net(x_t, t, cond + [control], region): the frozen base model plus ControlNet residuals."""

    def __init__(self, base: MedDiffNet, task: str, slice_factor: Optional[int] = None):
        super().__init__()
        from monai.networks.nets import ControlNet  # heavy import, only when a model is built
        from monai.networks.utils import copy_model_state

        if task not in TASKS:
            raise ValueError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}")
        self.task = task
        self.slice_factor = slice_factor  # super-resolution: thin slices per thick slice it was trained on
        self.cfg = base.cfg
        self.base = base
        # A single embedding level keeps the control volume at the patch resolution (MONAI's default
        # embedding assumes a condition 8x larger than a latent image).
        self.controlnet = use_onednn_on_cpu(ControlNet(conditioning_embedding_in_channels=1,
                                                       conditioning_embedding_num_channels=(self.cfg.channels[0],),
                                                       **unet_kwargs(self.cfg)))
        monai_log = logging.getLogger("monai.networks.utils")
        level = monai_log.level
        monai_log.setLevel(logging.WARNING)  # its "'dst' model updated: 85 of 103 variables" tells a user nothing
        try:
            copy_model_state(self.controlnet, base.unet)
        finally:
            monai_log.setLevel(level)
        self.base.requires_grad_(False)
        self.base.eval()

    def train(self, mode: bool = True) -> "ControlledNet":
        """Only the ControlNet switches mode: the frozen base always runs as at inference."""
        self.training = mode
        self.controlnet.train(mode)
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """`cond` is the base model's condition with the control volume appended as its last channel
        (what `ControlledCondition` windows give), so a ControlledNet drops in wherever a MedDiffNet runs."""
        expected = condition_channels(self.cfg) + 1
        if cond.shape[1] != expected:
            raise ValueError(f"a ControlledNet needs {expected} condition channels (the model's {expected - 1} "
                             f"plus the control volume), got {cond.shape[1]}")
        base_cond, control = cond[:, :-1], cond[:, -1:]
        x = torch.cat([x_t, base_cond.to(x_t.dtype)], dim=1)
        down, mid = self.controlnet(x, t, controlnet_cond=control.to(x_t.dtype), class_labels=region)
        return self.base(x_t, t, base_cond, region, down_residuals=down, mid_residual=mid)


class ControlledCondition(VolumeCondition):
    """A `VolumeCondition` whose windows carry a control volume (on the sampled grid) as one extra, last channel."""

    def __init__(self, cfg: ModelConfig, control: np.ndarray, spacing_zyx: Sequence[float], region: str,
                 anatomy_labels: Optional[np.ndarray] = None, offset_zyx: Sequence[int] = (0, 0, 0),
                 full_shape_zyx: Optional[Sequence[int]] = None):
        super().__init__(cfg, control.shape, spacing_zyx, region, anatomy_labels, offset_zyx, full_shape_zyx)
        self.control = torch.as_tensor(np.asarray(control, dtype=np.float32))
        self.num_channels += 1

    def window(self, start: Sequence[int], size: Sequence[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = super().window(start, size, out)  # sized by num_channels; fills every channel but the last
        out[-1].copy_(self.control[tuple(slice(a, a + s) for a, s in zip(start, size))])
        return out


def is_controlnet(model: nn.Module) -> bool:
    """Whether `model` is a `ControlledNet`, compiled (torch.compile) or not."""
    return isinstance(uncompiled(model), ControlledNet)


#: The commands that run each kind of model, named when a model of another kind is refused (None: a base model).
USED_BY = {"super-resolution": "super-resolve", "lesion": "generate-lesion and inpaint",
           None: "synthesize, denoise, detect-anomalies and inpaint"}


def check_task(model: nn.Module, task: str) -> None:
    """Refuse a model that is not a ControlNet fine-tuned for `task`, naming the registered one of that task."""
    check_loaded(model)
    found = getattr(model, "task", None) if is_controlnet(model) else None
    if found != task:
        what = f"a {found} ControlNet" if found else "a base model, not a ControlNet"
        raise InputError(f"this task needs a ControlNet fine-tuned for {task}, such as the registered `{task}` (the "
                         f"task's default) or one of yours (`finetune --task {task}`); the given model is {what} "
                         f"(for {USED_BY[found]})")


# -- model files -------------------------------------------------------------------------------------
#: `kind` recorded in a ControlNet's JSON description (base models have none).
CONTROLNET_KIND = "controlnet"
_PREFIX = "controlnet."


def base_record(base_name_or_path: str) -> dict:
    """How a ControlNet names its base model: the model name given, or the absolute path of a file (so that it is
    found from any working folder), and the SHA-256 of its weights."""
    weights = resolve_model(base_name_or_path)
    name = str(base_name_or_path)
    if name not in available_models():
        name = os.path.abspath(weights)  # links kept: the description lies beside the link, not its target
    return {"name": name, "sha256": read_model_info(weights)["sha256"]}


def save_controlled(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, path, task: str, base: dict,
                    info: Optional[dict] = None, half: bool = True) -> Path:
    """Write only the ControlNet weights of a `ControlledNet` state dict, with its task and base model record,
    in the model file format of `checkpoints.save_model`; returns the weights path."""
    tensors = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    if not tensors:
        raise ValueError("the state dict holds no ControlNet weights (keys starting with 'controlnet.')")
    record = dict(info or {})
    record.update(kind=CONTROLNET_KIND, task=task, base_model=base)
    return save_model(tensors, cfg, path, record, half=half)


def load_controlled(weights: Path, info: dict, device="cpu") -> Tuple[ControlledNet, ModelConfig, dict]:
    """(ControlledNet in eval mode, ModelConfig, info) for a ControlNet model file (see `checkpoints.load_model`).

    The base model is the one recorded by name; if that is missing or differs, any installed model whose
    weights have the recorded SHA-256 is used instead.
    """
    base_model = info.get("base_model")
    if not (isinstance(base_model, dict) and isinstance(base_model.get("name"), str)
            and isinstance(base_model.get("sha256"), str)) or info.get("task") not in TASKS \
            or not isinstance(info.get("training_data") or {}, dict):
        raise CheckpointError(f"{weights.name} is a ControlNet whose description lacks its base model (name and "
                              f"SHA-256) or names an unknown task ({info.get('task')!r}; known: {', '.join(TASKS)}); "
                              "re-download or re-export the model")
    base, cfg, _ = load_model(find_base(base_model, weights.name))
    model = ControlledNet(base, info["task"], (info.get("training_data") or {}).get("slice_factor"))
    tensors = checkpoints.load_model_tensors(weights, info)
    check_architecture(model.controlnet.state_dict(), tensors, weights.name)
    model.controlnet.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return model.to(device).eval(), cfg, info


def find_base(base: dict, name: str) -> Path:
    """Weights path of the installed model whose SHA-256 is `base["sha256"]` (the recorded name first)."""
    candidates = [base["name"]] + [m for m in available_models() if m != base["name"]]
    for candidate in candidates:
        try:
            weights = resolve_model(candidate)
            found = read_model_info(weights)
        except CheckpointError:
            continue
        if found["sha256"] == base["sha256"]:
            if controlnet_task_in(found) is not None:  # never a base, also when a description names it (or itself)
                raise CheckpointError(f"{name} names {weights.name} as its base model, but that is a ControlNet "
                                      f"({controlnet_task_in(found)}); re-download or re-export the ControlNet")
            return weights
    raise CheckpointError(
        f"{name} is a ControlNet for the base model {base['name']!r} (weights SHA-256 {base['sha256'][:12]}...), "
        "which is not installed (or was retrained since): install that base model, or fine-tune a new "
        "ControlNet on the current one (`finetune --base ...`)")


# -- training pairs ----------------------------------------------------------------------------------
def check_training_factor(factor: int, cfg: ModelConfig) -> int:
    """The slice factor a super-resolution ControlNet of `cfg` can be fine-tuned for, or an InputError."""
    from .tasks.super_resolution import check_factor  # the tasks package imports this module

    factor = check_factor(factor)
    size = cfg.patch_size
    if factor > size // 2:  # the control would hold one averaged slice, a condition sampling never meets
        raise InputError(f"a slice factor of {factor} leaves the {size}^3 training patch fewer than 2 thick "
                         f"slices; fine-tune this model for factors up to {size // 2}")
    return int(factor)


class SuperResolutionPairs(torch.utils.data.Dataset):
    """Thin-slice patches of a `dataset.CTPatchDataset` with their control channel: the same patch averaged
    over groups of `factor` slices and interpolated back onto its grid (the degradation super-resolution undoes)."""

    def __init__(self, patches, factor: int = 5):
        self.patches = patches
        self.factor = check_training_factor(factor, patches.cfg)

    def __len__(self) -> int:
        return len(self.patches)

    def summary(self) -> dict:
        return {**self.patches.summary(), "task": "super-resolution", "slice_factor": self.factor}

    def __getitem__(self, index: int) -> dict:
        from .tasks.super_resolution import degrade  # the tasks package imports this module

        item = dict(self.patches[index])
        item["cond"] = torch.cat([item["cond"], degrade(item["image"], self.factor)])
        return item


#: Lesion voxels kept per case as candidate patch centres.
MAX_LESION_CENTRES = 20000
#: Lesion label maps next to the shared CT data's images (image file name -> mask file name).
LESION_MASK_FILES = {"lung1_image.nrrd": "lung1_label.nrrd", "CT_image.nii.gz": "CT_mask.nii.gz"}


def lesion_cases(data_root, split: str) -> list:
    """(CT path, lesion mask path, region) of the shared-data `split` cases that have a lesion mask."""
    cases = []
    for case in split_cases(data_root, split):
        path = Path(case.path)
        if path.name in LESION_MASK_FILES:
            cases.append((str(path), str(path.with_name(LESION_MASK_FILES[path.name])), case.region))
    if not cases:
        raise InputError(f"no {split} case under {data_root} has a lesion mask")
    return cases


#: Share of lesion fine-tuning patches centred on (near) a lesion.
DEFAULT_LESION_PROBABILITY = 0.8


class LesionPatches(torch.utils.data.Dataset):
    """Patches of CTs with lesion masks; the lesion mask of the patch is the control channel.

    Each case is resampled once to the model's first training grid (`dataset.case_spacings`). With
    probability `lesion_probability` a patch is centred on a random lesion voxel (shifted by up to a quarter
    patch), otherwise placed anywhere. Item `i` is drawn from `numpy.random.default_rng([seed, i])`.
    """

    def __init__(self, cases, cfg: ModelConfig, seed: int = 0, lesion_probability: float = DEFAULT_LESION_PROBABILITY,
                 anatomy_dropout: Optional[float] = None, length: int = 1_000_000):
        if not 0.0 <= lesion_probability <= 1.0:
            raise InputError(f"the lesion-centred patch probability must be in [0, 1], got {lesion_probability}")
        if not cases:
            raise InputError("no lesion training cases given")
        self.cfg = cfg
        self.seed = int(seed)
        self.length = int(length)
        self.lesion_probability = float(lesion_probability)
        self.anatomy_dropout = cfg.anatomy_dropout if anatomy_dropout is None else float(anatomy_dropout)
        self.cases = [(str(c), str(m), r) for c, m, r in cases]
        self.entries = [self._prepare(*case) for case in self.cases]

    def __len__(self) -> int:
        return self.length

    def summary(self) -> dict:
        regions = [self.cfg.regions[entry["region"]] for entry in self.entries]
        return {"task": "lesion", "cases": [case_name(c) for c, _, _ in self.cases],
                "regions": {region: regions.count(region) for region in sorted(set(regions))},
                "lesion_probability": self.lesion_probability, "anatomy_dropout": self.anatomy_dropout}

    def _prepare(self, ct_path: str, mask_path: str, region: Optional[str]) -> dict:
        vol = read_volume(ct_path)
        check_ct(vol)
        mask = read_mask(mask_path, like=vol)
        order = AxisOrder.of(vol.direction)  # patient axis order, as the tasks see a CT (see `orientation`)
        vol, mask = order.volume(vol), order.volume(mask)
        if region is None:
            region, reason = guess_region(vol)
            log.info("%s: body region %s (%s)", ct_path, region, reason)
        grid_zyx = case_spacings(vol.spacing_zyx, self.cfg.train_spacings)[0]
        image = resample(vol, tuple(reversed(grid_zyx)))
        lesion = resample(mask, tuple(reversed(grid_zyx)), is_mask=True).array > 0
        if min(image.shape) < self.cfg.patch_size:
            raise InputError(f"{ct_path} is {image.shape} voxels at {grid_zyx} mm, smaller than the "
                             f"{self.cfg.patch_size}^3 patch; use larger lesion cases")
        if not lesion.any():
            raise InputError(f"lesion mask {mask_path} is empty after resampling to {grid_zyx} mm")
        if lesion.all():  # the tasks refuse such a mask too: nothing around the lesion to learn it against
            raise InputError(f"lesion mask {mask_path} covers the whole CT; give masks of the lesions only")
        centres = np.argwhere(lesion)
        centres = centres[::max(1, len(centres) // MAX_LESION_CENTRES)]  # an even subset bounds the memory
        return {"image": window_to_unit(image.array, self.cfg.windows[region]).astype(np.float16),
                "labels": training_anatomy(image, anatomy_spec(self.cfg), ct_path), "lesion": lesion,
                "centres": centres, "spacing_zyx": grid_zyx, "region": self.cfg.region_index(region)}

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        entry = self.entries[int(rng.integers(len(self.entries)))]
        size = self.cfg.patch_size
        shape = np.array(entry["image"].shape)
        if rng.random() < self.lesion_probability:
            centre = entry["centres"][rng.integers(len(entry["centres"]))]
            centre = centre + rng.integers(-(size // 4), size // 4 + 1, size=3)
            start = np.clip(centre - size // 2, 0, shape - size)
        else:
            start = np.array([rng.integers(0, n - size + 1) for n in shape])
        box = tuple(slice(int(a), int(a) + size) for a in start)
        spec = anatomy_spec(self.cfg)
        if rng.random() < self.anatomy_dropout:
            anatomy = torch.zeros((spec.num_channels, size, size, size))
        else:
            anatomy = torch.from_numpy(encode_anatomy(entry["labels"][box], spec))
        coords = global_coords(shape, start, start + size, (size,) * 3)
        cond = assemble(self.cfg, anatomy, coords, entry["spacing_zyx"])
        control = torch.from_numpy(entry["lesion"][box].astype(np.float32))[None]
        image = torch.from_numpy(entry["image"][box].astype(np.float32))[None]
        return {"image": image, "cond": torch.cat([cond, control]),
                "region": torch.tensor(entry["region"]), "mode": "crop"}


# -- fine-tuning -------------------------------------------------------------------------------------
def check_finetune_start(base: str, task: str, out_dir, resume: bool,
                         factor: Optional[int] = None) -> Tuple[dict, dict]:
    """Refuse, before any data is prepared (it reads descriptions and the run's JSON only), a base that is a
    ControlNet, or a resume of a pre-training run or of a fine-tuning run of another task, base or slice factor.
    Returns what the run records of itself (its task, its base's SHA-256 and, for super-resolution, its slice
    factor) and the record of the state a resume starts from ({} for a new run), e.g. its `training_data`."""
    if task not in TASKS:
        raise InputError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}")
    found = controlnet_task_in(read_model_info(resolve_model(base)))
    if found is not None:
        raise InputError(f"{base} is already a ControlNet model (fine-tuned for {found}); fine-tune on a base "
                         "model such as `default`")
    run = {"task": task, "base_sha256": base_record(base)["sha256"]}
    if factor is not None:
        run["slice_factor"] = factor
    return run, _check_resumed_run(Path(out_dir), base, run) if resume else {}


def _check_resumed_run(out_dir: Path, base: str, run: dict) -> dict:
    """Refuse to resume the run in `out_dir` unless it fine-tuned what `run` describes; returns its state's record."""
    record = training_state_record(out_dir)
    if not record:
        return record  # no run yet (a run without a readable state was refused by training_state_record)
    recorded = record.get("settings")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("extra"), dict):
        raise CheckpointError(f"the training state in {out_dir} lacks its settings; it was not written by this "
                              "version of MedDiffFM's finetune; start a new run in another folder")
    if not is_controlnet_run(record):
        raise InputError(f"{out_dir} holds a pre-training run, not a fine-tuning run; fine-tune into a new folder")
    earlier = recorded["extra"].get("finetune", run)  # recorded before runs named their task: as asked
    # A run recorded before the slice factor was stored is compared on what it recorded.
    same_otherwise = all(earlier[key] == value for key, value in run.items() if key != "base_sha256" and key in earlier)
    if earlier.get("base_sha256") != run["base_sha256"] and same_otherwise:
        raise InputError(f"{out_dir} fine-tunes another base than {base}: the run began on weights with SHA-256 "
                         f"{str(earlier.get('base_sha256'))[:12]}..., {base} has {run['base_sha256'][:12]}... "
                         "(another model, or this one retrained since). A ControlNet fits only the exact base it "
                         "was trained on: resume with --base set to that model, or fine-tune into a new folder")
    if earlier != {key: value for key, value in run.items() if key in earlier}:
        raise InputError(f"{out_dir} holds a fine-tuning run of another task, base model or slice factor "
                         f"({_run_description(earlier)}); resume it with the same --task, --base and --factor, or "
                         "fine-tune into a new folder")
    return record


def _run_description(run: dict) -> str:
    """'task super-resolution, base SHA-256 95c8d2ea0271..., slice factor 4' for a message."""
    parts = [f"task {run.get('task')}", f"base SHA-256 {str(run.get('base_sha256'))[:12]}..."]
    if "slice_factor" in run:
        parts.append(f"slice factor {run['slice_factor']}")
    return ", ".join(parts)


def finetune(base: str, task: str, data, out_dir, settings, val_data=None, resume: bool = False,
             progress=None) -> dict:
    """Train a ControlNet for `task` on the frozen model `base` (name or path) with `training.train`.

    `data`/`val_data` yield the base condition with the control volume as the last channel
    (`SuperResolutionPairs`, `LesionPatches`). The run folder's `ema.safetensors` (+ .json) is a ControlNet
    model file that `checkpoints.load_model` loads together with its base.
    """
    factor = data.factor if isinstance(data, SuperResolutionPairs) else None
    # Recorded with the training state, so --resume cannot continue another task's, base's or slice factor's run.
    run, _ = check_finetune_start(base, task, out_dir, resume, factor)
    base_model, cfg, _ = load_model(base)
    record = base_record(base)
    if Path(str(base)).name.startswith("ema") and (Path(str(base)).parent / "last.json").exists():
        log.warning("the base %s is a training run's EMA model, which the run's next checkpoint replaces, and a "
                    "ControlNet fits only the exact base it was trained on: copy the base elsewhere (or register it) "
                    "and fine-tune on the copy", base)
    settings = dataclasses.replace(settings, extra={**settings.extra, "finetune": run})

    def build(_cfg: ModelConfig) -> ControlledNet:
        return ControlledNet(copy.deepcopy(base_model), task)

    def export(state_dict, cfg_: ModelConfig, path, info, half: bool = True) -> Path:
        return save_controlled(state_dict, cfg_, path, task, record, info, half)

    return train(cfg, data, out_dir, settings, val_data=val_data, resume=resume, progress=progress,
                 build_model=build, export_model=export)
