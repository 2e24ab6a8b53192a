"""Pre-training loop: epsilon prediction with L1 loss, EMA, gradient accumulation, DDP and exact resume.

One command scales from CPU to N GPUs:
    python -m MedDiffFMLib train --preset default --data train --out runs/default
    torchrun --standalone --nproc_per_node=4 -m MedDiffFMLib train --preset default --data train --out runs/default

Reproducibility: the data item for (step, micro-batch, rank, sample) has a fixed index (see
`dataset.CTPatchDataset`), and the timesteps/noise of a step come from a generator seeded with (seed, rank, step),
so no random state needs checkpointing on any rank. Resuming therefore gives the same weights as an
uninterrupted run with the same seed, on one process or many (bit-identical on CPU).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .checkpoints import (check_architecture, load_model, load_training_state, model_intact, save_model,
                          save_training_state, training_state_record)
from .config import PRECISIONS, ModelConfig
from .diffusion import Schedule, q_sample, training_timesteps
from .errors import CheckpointError, InputError, TrainingDiverged
from .network import MedDiffNet, check_compiler, controlnet_task, parameter_count
from .noise_texture import training_noise
from .runlock import run_lock
from .torchrun_env import torchrun_place

log = logging.getLogger(__name__)

#: Validation loss is reported per noise range: [0, 100), [100, 250), [250, 500), [500, 1000) for the usual 1000
#: timesteps, in proportion for a schedule of another length (`validation_buckets`).
VALIDATION_BUCKETS = ((0, 100), (100, 250), (250, 500), (500, 1000))
VALIDATION_SEED = 1234


#: Adam's learning rate of a new run (a resumed run keeps its checkpoint's unless another is given).
DEFAULT_LR = 1e-4
#: Settings that a resumed run keeps from its checkpoint unless given (None there), with a new run's value.
RUN_OWN_SETTINGS = {"correlated_noise_fraction": 0.0, "precision": "auto", "low_noise_fraction": 0.5,
                    "low_noise_max_t": 250, "half_export": True}


@dataclass
class TrainSettings:
    """How to train (the model itself is the ModelConfig); recorded in checkpoints and model files."""

    steps: int = 1000  # total optimizer steps, resumed ones included
    batch_size: int = 2
    grad_accum: int = 1
    lr: Optional[float] = None  # None: DEFAULT_LR for a new run, the checkpoint's rate on resume
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # Extra weight on the low-noise range the restoration tasks start from (synthesis still sees all t); None: the
    # resumed run's own (a new run: RUN_OWN_SETTINGS).
    low_noise_fraction: Optional[float] = None
    low_noise_max_t: Optional[int] = None
    # Share of the low-t noise (noise_texture) with the in-plane texture of CT noise instead of white; None: the
    # resumed run's own share (a new run: 0).
    correlated_noise_fraction: Optional[float] = None
    seed: int = 0
    validate_every: int = 200
    validation_patches: int = 8
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0
    num_workers: int = 0
    channels_last: bool = False
    compile: bool = False
    # Network arithmetic: "auto" is bf16 autocast on a GPU and fp32 on the CPU (CPUs without bf16 units run it
    # slower than fp32); "fp32" or "bf16" forces it, e.g. to compare the two on the denoising table. None: the
    # resumed run's own (a new run: auto).
    precision: Optional[str] = None
    half_export: Optional[bool] = None  # fp16 weights in the exported EMA model files (None: the run's own; new: yes)
    # Free-form facts stored with the run (e.g. the fine-tuning task), not used by the loop itself.
    extra: Dict[str, object] = field(default_factory=dict)

    def check(self, cfg: Optional[ModelConfig] = None) -> None:
        """Refuse settings that would crash the loop later or train nothing while reporting success (with `cfg`,
        also those that do not fit the model's diffusion schedule)."""
        counts = dict(batch_size=self.batch_size, grad_accum=self.grad_accum, validate_every=self.validate_every,
                      checkpoint_every=self.checkpoint_every, validation_patches=self.validation_patches)
        problems = [f"{name} must be at least 1, got {value}" for name, value in counts.items() if value < 1]
        if self.steps < 0 or self.num_workers < 0:
            problems.append(f"steps and num_workers cannot be negative, got {self.steps} and {self.num_workers}")
        if (self.lr is not None and not 0 < self.lr < float("inf")) or not self.checkpoint_minutes > 0:
            problems.append(f"the learning rate and checkpoint minutes must be finite and > 0, got {self.lr} and "
                            f"{self.checkpoint_minutes}")
        top_t = cfg.num_train_timesteps if cfg is not None else float("inf")
        if self.low_noise_fraction is not None and not 0.0 <= self.low_noise_fraction <= 1.0:
            problems.append(f"the low-noise fraction must be in [0, 1], got {self.low_noise_fraction}")
        # Its top timestep matters only where some timesteps are drawn below it (fine-tuning draws none).
        max_t = self.low_noise_max_t
        if self.low_noise_fraction != 0 and max_t is not None and not 1 <= max_t <= top_t:
            problems.append(f"the low-noise max t must be in [1, {top_t}] (the model's timesteps), got "
                            f"{self.low_noise_max_t}")
        if self.correlated_noise_fraction is not None and not 0.0 <= self.correlated_noise_fraction <= 1.0:
            problems.append(f"the correlated-noise fraction must be in [0, 1], got {self.correlated_noise_fraction}")
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"the precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if problems:
            raise InputError("bad training settings: " + "; ".join(problems))
        if self.compile:  # on the device `train` will take (the process's GPU, else the CPU)
            check_compiler(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Rank:
    rank: int = 0
    world: int = 1
    local: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Rank:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); otherwise one process."""
    rank, world, local = torchrun_place()
    if world <= 1:
        return Rank()
    owns = not dist.is_initialized()
    if owns:
        # Windows builds of PyTorch have no NCCL: GPUs there share gradients through gloo.
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Rank(rank, world, local, owns)


def _device(rank: Rank) -> torch.device:
    return torch.device(f"cuda:{rank.local}") if torch.cuda.is_available() else torch.device("cpu")


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _batches(data, start_step: int, settings: TrainSettings, rank: Rank) -> Iterator[dict]:
    """Micro-batches from `start_step` on; item index = fixed function of (step, micro, rank, sample)."""
    b, accum = settings.batch_size, settings.grad_accum

    def index_batches():
        step = start_step
        while True:
            for micro in range(accum):
                first = ((step * accum + micro) * rank.world + rank.rank) * b
                yield list(range(first, first + b))
            step += 1

    loader = torch.utils.data.DataLoader(data, batch_sampler=index_batches(), num_workers=settings.num_workers,
                                         persistent_workers=settings.num_workers > 0)
    return iter(loader)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, updates: int) -> None:
        decay = min(self.decay, (1 + updates) / (10 + updates))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1 - decay)
            else:
                self.shadow[k].copy_(v)


def validation_batch(val_data, n: int) -> dict:
    """The fixed validation patches: items 0..n-1 of a dataset (seeded, so always the same patches)."""
    return torch.utils.data.default_collate([val_data[i] for i in range(n)])


def with_run_own(settings: TrainSettings, saved: dict) -> TrainSettings:
    """`settings` with each RUN_OWN_SETTINGS field not given (None) taken from a resumed run's `saved` settings, or
    its new-run value."""
    return replace(settings, **{name: saved.get(name, new_run) for name, new_run in RUN_OWN_SETTINGS.items()
                                if getattr(settings, name) is None})


def validation_buckets(num_timesteps: int) -> List[Tuple[int, int]]:
    """VALIDATION_BUCKETS scaled to a schedule of `num_timesteps` steps; on a very short schedule, buckets that
    would be empty or repeat the one before are left out."""
    buckets: List[Tuple[int, int]] = []
    for lo, hi in VALIDATION_BUCKETS:
        lo, hi = lo * num_timesteps // 1000, hi * num_timesteps // 1000
        if hi > lo and (not buckets or lo >= buckets[-1][1]):
            buckets.append((lo, hi))
    return buckets


@torch.no_grad()
def validation_losses(model: torch.nn.Module, schedule: Schedule, batch: dict,
                      device: torch.device) -> Dict[str, float]:
    """L1 epsilon loss per noise range, at fixed timesteps and noise (comparable across runs and steps)."""
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    x0 = batch["image"].to(device)
    n = x0.shape[0]
    losses = {}
    for lo, hi in validation_buckets(schedule.T):
        t = torch.from_numpy(np.linspace(lo, hi - 1, n).round().astype(np.int64))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = q_sample(schedule, x0, t, noise)
        eps = model(x_t, t.to(device), batch["cond"].to(device), batch["region"].to(device))
        losses[f"t{lo}-{hi}"] = float((eps.float() - noise).abs().mean())
    losses["mean"] = float(np.mean(list(losses.values())))
    return losses


#: The models a run exports besides its states; a new run would replace them. (Its loss logs are no reason to
#: refuse: a run killed before its first checkpoint leaves one, and a rerun starts afresh.)
RUN_FILES = ("ema.safetensors", "ema.json", "ema-best.safetensors", "ema-best.json")


def check_new_run(out_dir: Path, resume: bool, resume_option: str = "resume=True") -> None:
    """Refuse to start a new run in a folder that holds one, or a run's model without its training state (a run
    cleaned up to save space, a copied model): the new run would overwrite those files. `resume_option` is how the
    caller resumes (the commands: --resume)."""
    out_dir = Path(out_dir)
    if (out_dir / "last.json").exists():
        if not resume:
            raise InputError(f"{out_dir} already holds a training run; continue it with {resume_option} or train "
                             "into a new folder")
        return
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found:
        raise InputError(f"{out_dir} holds {', '.join(found)} of an earlier run but no training state to "
                         f"{'resume' if resume else 'keep'}; a new run would overwrite them. Train into a new folder "
                         "(or move those files away)")


def train(cfg: ModelConfig, data, out_dir, settings: TrainSettings, val_data=None, resume: bool = False,
          init_from: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None,
          build_model: Callable[[ModelConfig], torch.nn.Module] = MedDiffNet,
          export_model: Callable[..., Path] = save_model) -> dict:
    """Train `cfg` on `data` (a CTPatchDataset) into `out_dir`; returns the final record.

    `resume` continues from `out_dir/last.json` when present (and starts fresh otherwise); `init_from` starts
    a new run from the weights of an existing model (name or path). `build_model(cfg)` and
    `export_model(state_dict, cfg, path, info, half=...)` let fine-tuning reuse the loop (e.g. a ControlNet
    on a frozen base: only parameters that require gradients are optimised).
    """
    settings.check(cfg)
    out_dir = Path(out_dir)
    rank = setup_distributed()
    # One run at a time in a folder; under torchrun the first process holds the lock for all of the run's processes.
    with run_lock(out_dir) if rank.main else contextlib.nullcontext():
        check_new_run(out_dir, resume)  # under the lock: a run that ends meanwhile is resumed, not overwritten
        return _train(cfg, data, out_dir, settings, rank, val_data, resume, init_from, progress, build_model,
                      export_model)


def _train(cfg: ModelConfig, data, out_dir: Path, settings: TrainSettings, rank: Rank, val_data, resume: bool,
           init_from: Optional[str], progress, build_model, export_model) -> dict:
    device = _device(rank)
    torch.manual_seed(settings.seed)  # identical initial weights on every rank and every run
    model = build_model(cfg).to(device)
    if init_from:
        model.load_state_dict(_init_weights(init_from, model))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr or DEFAULT_LR)
    ema = EMA(model, settings.ema_decay)
    gen = torch.Generator()  # reseeded at every step (_step_seed)
    start, wall_before, best, val, saved, trained_on = 0, 0.0, float("inf"), {}, {}, _training_data(data)
    if resume:
        restored = _restore(out_dir, cfg, model, ema, optimizer, rank, settings, data)
        if restored is not None:
            start, wall_before, best, val, saved, trained_on = restored
    # Recorded as trained: the optimizer's rate, and the run's own value of each setting not given.
    settings = replace(with_run_own(settings, saved), lr=optimizer.param_groups[0]["lr"])
    settings.check(cfg)  # the run's own values too: a new run's low-noise range may not fit a short schedule
    if start and rank.main:
        # A kill between replacing an exported model's two files leaves them disagreeing. Both were written from
        # the state restored here (`ema-best` too: it is written only with the state whose EMA is the best).
        damaged = [name for name in ("ema", "ema-best")
                   if any((out_dir / f"{name}{suffix}").exists() for suffix in (".json", ".safetensors"))
                   and not model_intact(out_dir / name)]
        if damaged:
            log.warning("exported model(s) %s in %s damaged; exporting them again from step %d",
                        ", ".join(damaged), out_dir, start)
            _export(out_dir, cfg, settings, ema, start, wall_before, trained_on, val, device, damaged, export_model)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    net = model
    if rank.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model,
                                                        device_ids=[rank.local] if device.type == "cuda" else None)
    # Patches have one fixed shape: static compilation (dynamic shapes failed to lower for the 3D UNet).
    forward = torch.compile(net, dynamic=False) if settings.compile else net
    schedule = Schedule.from_name(cfg.schedule, cfg.num_train_timesteps)
    # The network under bf16 autocast where chosen (see TrainSettings.precision); the schedule maths stays fp32.
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    val_batch = None
    if val_data is not None and rank.main:
        val_batch = validation_batch(val_data, settings.validation_patches)
    if rank.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start < settings.steps:  # else _restore warned that there is nothing to train
            log.info("training %s (%.2fM parameters) on %s x%d from step %d to %d", cfg.name,
                     parameter_count(model) / 1e6, device, rank.world, start, settings.steps)
    logger = _LossLog(out_dir, start) if rank.main else None
    batches = _batches(data, start, settings, rank)
    bar = _progress_bar(start, settings.steps, rank.main and progress is None)
    started, last_save = time.monotonic(), time.monotonic()
    step = start
    stopping = False
    stop = _StopRequest()
    try:
        for step in range(start + 1, settings.steps + 1):
            gen.manual_seed(_step_seed(settings.seed, rank.rank, step))
            loss_sum, grad_norm = _optimizer_step(net, forward, model, optimizer, batches, schedule, gen, settings,
                                                  device, autocast)
            ema.update(model, step)
            if progress is not None and rank.main:
                progress(step, settings.steps)
            loss_value, stopping = _agree_over_ranks(loss_sum, stop.requested, rank, device)
            # Every rank sees the same mean loss and (DDP averages gradients) the same gradient norm: all stop here,
            # before a checkpoint could keep the broken weights.
            if not (np.isfinite(loss_value) and np.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"the loss became {loss_value:g} (gradient norm {grad_norm:g}) at step {step}: training diverged "
                    f"(is the learning rate {settings.lr:g} too high?). Nothing of this step was saved; resume from "
                    "the last checkpoint with a lower --lr")
            if rank.main:
                logger.add(step, loss_value, grad_norm)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
            wall = wall_before + time.monotonic() - started
            improved = False
            if val_batch is not None and (step % settings.validate_every == 0 or step == settings.steps):
                val = validation_losses(_ema_model(cfg, ema, device, build_model), schedule, val_batch, device)
                logger.add_validation(step, val)
                log.info("step %d validation (EMA) %s", step, " ".join(f"{k}={v:.4f}" for k, v in val.items()))
                improved = val["mean"] < best
                best = val["mean"] if improved else best
            # A better validation is saved at once: `ema-best` must be the very EMA that was validated.
            due = (improved or step % settings.checkpoint_every == 0 or step == settings.steps or stopping
                   or time.monotonic() - last_save > 60 * settings.checkpoint_minutes)
            if rank.main and due:
                _save(out_dir, cfg, settings, model, ema, optimizer, step, wall, best, trained_on, val, device,
                      improved, export_model, processes=rank.world)
                logger.flush(plot=True)
                last_save = time.monotonic()
            if stopping:
                log.info("stop requested: checkpoint written at step %d; resume with --resume", step)
                break
    finally:
        stop.release()
        bar.close()
    record = {"step": step, "loss": logger.recent_mean() if rank.main else None, "validation": val,
              "wall_hours": (wall_before + time.monotonic() - started) / 3600,
              "stopped": stopping and step < settings.steps}
    if rank.owns_group:
        dist.barrier()
        dist.destroy_process_group()
    record.update(model=model, ema=ema.shadow)
    return record


def _optimizer_step(net, forward, model, optimizer, batches, schedule: Schedule, gen: torch.Generator,
                    settings: TrainSettings, device: torch.device, autocast):
    """One optimizer step over `grad_accum` micro-batches; returns (loss, gradient norm before clipping)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(settings.grad_accum):
        batch = next(batches)
        x0 = batch["image"].to(device)
        cond, region = batch["cond"].to(device), batch["region"].to(device)
        t = training_timesteps(x0.shape[0], schedule.T, gen, settings.low_noise_fraction, settings.low_noise_max_t)
        noise = training_noise(x0.shape, t, schedule.T, gen, settings.correlated_noise_fraction).to(device)
        x_t = q_sample(schedule, x0, t, noise)
        if settings.channels_last:
            x_t = x_t.to(memory_format=torch.channels_last_3d)
            cond = cond.to(memory_format=torch.channels_last_3d)
        # DDP: all-reduce gradients only on the last micro-batch.
        last = micro == settings.grad_accum - 1 or not hasattr(net, "no_sync")
        with (contextlib.nullcontext() if last else net.no_sync()), autocast():
            eps = forward(x_t, t.to(device), cond, region)
            loss = (eps.float() - noise).abs().mean() / settings.grad_accum
        loss.backward()
        loss_sum += float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
    optimizer.step()
    return loss_sum, grad_norm


def refuse_controlnet_start(init_from: str, controlnet_task_name: Optional[str]) -> None:
    """Pre-training starts from a base model, not from a ControlNet (`controlnet_task_name` is its task)."""
    if controlnet_task_name is not None:
        raise InputError(f"--init-from {init_from} is a ControlNet fine-tuned for {controlnet_task_name}; "
                         "pre-training starts from a base model such as `default`")


def _init_weights(init_from: str, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    source, _, _ = load_model(init_from)
    refuse_controlnet_start(init_from, controlnet_task(source))
    weights = source.state_dict()
    check_architecture(model.state_dict(), weights, f"--init-from {init_from}")
    return weights


def _ema_model(cfg: ModelConfig, ema: EMA, device: torch.device, build_model=MedDiffNet) -> torch.nn.Module:
    model = build_model(cfg).to(device)
    model.load_state_dict(ema.shadow)
    return model.eval()


def _agree_over_ranks(loss: float, stop: bool, rank: Rank, device: torch.device):
    """Mean loss over ranks, and whether any rank was asked to stop (all ranks stop at the same step)."""
    if rank.world == 1:
        return loss, stop
    tensor = torch.tensor([loss, float(stop)], device=device)
    dist.all_reduce(tensor)
    return float(tensor[0]) / rank.world, bool(tensor[1] > 0)


class _StopRequest:
    """SIGTERM/SIGINT end training after the current step, with a checkpoint, instead of losing the work
    since the last one. Only the main thread can install signal handlers; elsewhere this does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def release(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


# -- checkpoint state ----------------------------------------------------------------------------------
def _save(out_dir: Path, cfg: ModelConfig, settings: TrainSettings, model, ema: EMA, optimizer,
          step: int, wall: float, best: float, trained_on: dict, val: dict, device: torch.device, improved: bool,
          export_model=save_model, processes: int = 1) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    opt = optimizer.state_dict()
    optimizer_scalars = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                optimizer_scalars.setdefault(str(index), {})[key] = value
    scalars = {"config": cfg.to_dict(), "settings": asdict(settings), "wall_seconds": wall, "best_validation": best,
               "validation": val, "training_data": trained_on, "processes": processes,
               "optimizer": {"param_groups": opt["param_groups"], "scalars": optimizer_scalars}}
    save_training_state(out_dir, step, tensors, scalars)
    _export(out_dir, cfg, settings, ema, step, wall, trained_on, val, device,
            ("ema", "ema-best") if improved else ("ema",), export_model)


def _export(out_dir: Path, cfg: ModelConfig, settings: TrainSettings, ema: EMA, step: int, wall: float,
            trained_on: dict, val: dict, device: torch.device, names, export_model=save_model) -> None:
    """Write the EMA weights as the model files `names` (`ema`, and `ema-best` when validation improved)."""
    info = {"steps": step, "wall_hours": round(wall / 3600, 4), "device": _device_name(device),
            "validation_loss": val, "training_data": trained_on,
            "settings": asdict(settings), "weights_kind": "ema"}
    for name in names:
        export_model(ema.shadow, cfg, out_dir / name, info, half=settings.half_export)


_STATE_KEYS = ("step", "config", "settings", "optimizer", "wall_seconds", "best_validation")


def _as_saved(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))  # as a training state holds it: tuples become lists in JSON


def _refuse_other_config(out_dir: Path, saved: dict, cfg: ModelConfig) -> None:
    """Refuse to resume the run in `out_dir`, whose configuration is `saved`, as one of `cfg`, unless they agree."""
    if saved != _as_saved(cfg):
        raise CheckpointError(f"{out_dir} holds a run of another model configuration "
                              f"({_config_difference(saved, cfg)}); resume with the same preset/config (or "
                              "--init-from model) or train into a new folder")


def _config_difference(saved: dict, cfg: ModelConfig) -> str:
    """How a run's configuration differs from `cfg`: by name, or (same name, edited) by the fields that differ."""
    asked = _as_saved(cfg)
    if saved.get("name") != asked.get("name"):
        return f"{saved.get('name')!r}, not {asked.get('name')!r}"
    fields = sorted(k for k in set(saved) | set(asked) if saved.get(k) != asked.get(k))
    return f"its {', '.join(fields)} {'differs' if len(fields) == 1 else 'differ'}"


def check_resume_config(out_dir, cfg: ModelConfig) -> dict:
    """Refuse, before any data is prepared, to resume a ControlNet fine-tuning run or a run of another model
    configuration (reads JSON only).
    Returns the newest readable state's record ({} when there is no run yet), e.g. its `training_data`; a run
    without a readable state is refused by training_state_record."""
    record = training_state_record(out_dir)  # the state train() resumes from, also when last.json is damaged
    if "config" not in record:
        return {}  # no run yet, or a state that records no config: train() says what is wrong
    if is_controlnet_run(record):
        raise _other_kind_of_run(out_dir)
    _refuse_other_config(Path(out_dir), record["config"], cfg)
    return record


def is_controlnet_run(record: dict) -> bool:
    """Whether a training state's record (its JSON) is of a ControlNet fine-tuning run: the run records its
    fine-tuning in its settings, or (recorded before it did) its training data name their task."""
    settings = record.get("settings")
    extra = settings.get("extra") if isinstance(settings, dict) else None
    data = record.get("training_data")
    return (isinstance(extra, dict) and "finetune" in extra) or (isinstance(data, dict) and "task" in data)


def _other_kind_of_run(out_dir) -> CheckpointError:
    return CheckpointError(f"{out_dir} holds a run of another kind of model (a pre-training run and a ControlNet "
                           "fine-tuning run cannot continue each other); train into a new folder")


def _restore(out_dir: Path, cfg: ModelConfig, model, ema: EMA, optimizer, rank: Rank,
             settings: TrainSettings, data):
    loaded = load_training_state(out_dir)
    if loaded is None:
        if rank.main:
            log.info("no training state in %s; starting a new run", out_dir)
        return None
    tensors, record = loaded
    missing = [key for key in _STATE_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"the training state in {out_dir} lacks {', '.join(missing)}; it was not written by "
                              "this version of MedDiffFM's train; start a new run in another folder")
    _refuse_other_config(out_dir, record["config"], cfg)
    _check_state_tensors(out_dir, record["step"], tensors, model, ema, optimizer)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    trained_on, training_on = record.get("training_data") or {}, _training_data(data)
    before, now = trained_on.get("cases"), training_on.get("cases")
    both_known = before is not None and now is not None
    left_out, added = _case_changes(before, now) if both_known else ([], [])
    same_cts = both_known and not (left_out or added)
    if rank.main:
        # These fix which patches each step trains on: a resume under others continues on another stream.
        changed = [f"--{name.replace('_', '-')} {record['settings'][name]} -> {getattr(settings, name)}"
                   for name in ("seed", "batch_size", "grad_accum")
                   if name in record.get("settings", {}) and record["settings"][name] != getattr(settings, name)]
        if record.get("processes", rank.world) != rank.world:  # each process draws its own patches (torchrun)
            changed.append(f"processes {record['processes']} -> {rank.world}")
        if left_out or added:
            changed.append(f"training CTs: {len(left_out)} left out{_some(left_out)}, {len(added)} added{_some(added)}")
        regions_before, regions_now = trained_on.get("regions"), training_on.get("regions")
        if same_cts and regions_before is not None and regions_now is not None and regions_before != regions_now:
            changed.append(f"CTs per body region {_counts(regions_before)} -> {_counts(regions_now)} (--region)")
        mix_before, mix_now = trained_on.get("mode_weights"), training_on.get("mode_weights")
        if mix_before and mix_now and _normalised(mix_before) != _normalised(mix_now):
            changed.append(f"patch mix {_mix(mix_before)} -> {_mix(mix_now)}")
        share_before, share_now = trained_on.get("lesion_probability"), training_on.get("lesion_probability")
        if None not in (share_before, share_now) and share_before != share_now:  # lesion fine-tuning's patch mix
            changed.append(f"--lesion-probability {share_before:g} -> {share_now:g}")
        if changed:
            log.warning("resuming with other settings than the run was trained with (%s): the patches from here on "
                        "differ from a run that kept them; pass the old values to continue the same stream",
                        ", ".join(changed))
    if rank.main and record["step"] >= settings.steps:
        log.warning("the run is already at step %d, at or past --steps %d: nothing to train; raise --steps to "
                    "continue it", record["step"], settings.steps)
    ema.shadow = {k[len("ema."):]: v.to(next(model.parameters()).device)
                  for k, v in tensors.items() if k.startswith("ema.")}
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in record["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer"]["param_groups"]})
    # A learning rate asked for now wins over the checkpoint's, so a resumed run can be annealed; none keeps it.
    saved_lr = optimizer.param_groups[0]["lr"]
    if settings.lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr
        if rank.main and saved_lr != settings.lr:
            log.info("learning rate %g (the checkpoint trained at %g)", settings.lr, saved_lr)
    if rank.main:
        log.info("resumed %s at step %d", out_dir, record["step"])
    return (record["step"], record["wall_seconds"], record["best_validation"], record.get("validation", {}),
            record.get("settings", {}), _run_data(trained_on, training_on, record["step"], bool(left_out or added)))


def _training_data(data) -> dict:
    """What a run records of its data: the dataset's summary ({} for a dataset without one)."""
    return getattr(data, "summary", lambda: {})()


def _case_changes(before: List[str], now: List[str]) -> Tuple[List[str], List[str]]:
    """(left out, added): the training CTs a run recorded that are not given now, and those given now that it did not
    record. A record of an older version may name a CT without its folder: by file name (pre-training), or after an
    empty folder ('/ct.nii.gz') or '..' (lesion fine-tuning, of a CT in the working folder or above it); such a name
    matches a CT given now of that file name, in any folder."""
    left_out, added = Counter(before) - Counter(now), Counter(now) - Counter(before)
    # Names after a subject first: a bare file name would take any CT of that name, maybe the one a subject's names.
    for old in sorted(left_out.elements(), key=lambda name: ":" not in name.rpartition("/")[2]):
        folder, slash, name = old.rpartition("/")
        if slash and folder not in ("", ".."):  # it names its folder, as this version's record does
            continue
        same = next((case for case in added.elements() if name in _file_name_forms(case)), None)
        if same is not None:
            left_out[old] -= 1
            added[same] -= 1
    return sorted(left_out.elements()), sorted(added.elements())


def _file_name_forms(case: str) -> Set[str]:
    """The names an older version may have recorded for `case` ('[subject:]folder/name': `dataset.case_name` after
    the subject): its file name, and after the subject 'STS_002:CT_image.nii.gz'. A subject (an id of the shared data)
    holds no colon, a folder's name may: the subject ends at the first one."""
    head, _, name = case.rpartition("/")
    subject, colon, _ = head.partition(":")
    return {name, f"{subject}:{name}"} if colon else {name}


def _run_data(trained_on: dict, training_on: dict, step: int, cts_changed: bool) -> dict:
    """What a resumed run records of its data: the data given now (`training_on`) from step `since_step`, and the CTs
    of each stretch of steps before that (`earlier_cases`) once they changed at a resume, so that the model's
    description names all the CTs it learnt from, not only the last ones."""
    history = {key: trained_on[key] for key in ("since_step", "earlier_cases") if key in trained_on}
    if cts_changed:
        stretch = {"steps": [trained_on.get("since_step", 1), step], "cases": trained_on["cases"]}
        history = {"since_step": step + 1, "earlier_cases": trained_on.get("earlier_cases", []) + [stretch]}
    return {**training_on, **history}


def _counts(counts: Dict[str, int]) -> str:
    """'chest 2, other 1' for a log line."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _normalised(weights: Dict[str, float]) -> Dict[str, float]:
    """A patch mix as the dataset draws with it, to 12 digits: a state before 2026-11-28 recorded its mix rounded to
    4 decimals, which the resumed dataset normalised again (0.7143 of 1.0001)."""
    total = sum(weights.values())
    return {mode: round(weight / total, 12) for mode, weight in weights.items() if weight}


def _mix(weights: Dict[str, float]) -> str:
    """'whole 0.2, crop2x 0.3, crop 0.5' for a log line."""
    return ", ".join(f"{mode} {weight:.3g}" for mode, weight in weights.items())


def _some(names: List[str], shown: int = 3) -> str:
    """' (a, b, c and 4 more)' for a log line; '' for none."""
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f" ({', '.join(names[:shown])}{more})"


def _check_state_tensors(out_dir: Path, step: int, tensors: Dict[str, torch.Tensor], model, ema: EMA,
                         optimizer) -> None:
    """Refuse a training state whose model, EMA or optimizer tensors do not fit the run's model, before any of them
    is loaded (a wrong shape would fail later inside the EMA or Adam, with a traceback)."""
    part = {prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            for prefix in ("model.", "ema.", "optim.")}
    expected = model.state_dict()
    if any(k.startswith("controlnet.") for k in part["model."]) != any(k.startswith("controlnet.") for k in expected):
        raise _other_kind_of_run(out_dir)
    where = f"the training state of step {step} in {out_dir}"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    wrong = []
    for key, value in part["optim."].items():  # "<parameter index>.<name>", e.g. 3.exp_avg
        index = int(key.split(".")[0])
        shape = tuple(params[index].shape) if index < len(params) else "no such parameter"
        if value.dim() > 0 and tuple(value.shape) != shape:  # 0-dim: Adam's step count
            wrong.append(f"{key} {tuple(value.shape)} vs {shape}")
    try:
        check_architecture(expected, part["model."], where)
        check_architecture(ema.shadow, part["ema."], where + " (EMA)")
        if wrong:
            raise CheckpointError(f"{where} (optimizer): {len(wrong)} wrong shape (e.g. {wrong[0]})")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. The state is damaged or from another version: move it (and last.json) "
                              "away to resume from an older state, or train into a new folder") from None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# -- loss log ----------------------------------------------------------------------------------------
#: Windows refuses to replace a file another program holds open: the loss log then waits for a later update. Elsewhere
#: a refusal is a real permission problem, and stops the run.
FILES_HELD_BY_OTHER_PROGRAMS = os.name == "nt"


class _LossLog:
    """loss.csv (every step), validation.csv and loss_curve.png in the run folder (rank 0 only)."""

    def __init__(self, out_dir: Path, start: int):
        self.loss_path, self.val_path = out_dir / "loss.csv", out_dir / "validation.csv"
        self.held = set()  # files another program held open at the last update (warned about once)
        # On resume, drop rows past the restored step (written after the last checkpoint).
        self.rows = [r for r in _read_csv(self.loss_path) if int(r["step"]) <= start]
        self.val_rows = [r for r in _read_csv(self.val_path) if int(r["step"]) <= start]
        self.pending = False
        self.started = time.time()

    def add(self, step: int, loss: float, grad_norm: float) -> None:
        self.rows.append({"step": step, "loss": f"{loss:.6f}", "grad_norm": f"{grad_norm:.4f}",
                          "time": f"{time.time():.1f}"})
        self.pending = True
        if step % 50 == 0:
            self.flush(plot=False)

    def add_validation(self, step: int, losses: Dict[str, float]) -> None:
        self.val_rows.append({"step": step, **{k: f"{v:.6f}" for k, v in losses.items()}})
        self.flush(plot=True)

    def recent_mean(self, n: int = 10) -> float:
        return float(np.mean([float(r["loss"]) for r in self.rows[-n:]])) if self.rows else float("nan")

    def flush(self, plot: bool) -> None:
        from .io import write_csv

        for rows, path in ((self.rows, self.loss_path), (self.val_rows, self.val_path)):
            if rows:
                self._update(path, lambda rows=rows, path=path: write_csv(rows, list(rows[-1]), path))
        if plot and self.rows:
            path = self.loss_path.parent / "loss_curve.png"
            self._update(path, lambda: _plot(path, self.rows, self.val_rows))

    def _update(self, path: Path, write: Callable[[], object]) -> None:
        try:
            write()
        except PermissionError:
            if not FILES_HELD_BY_OTHER_PROGRAMS:
                raise
            if path not in self.held:  # e.g. a CSV open in a spreadsheet
                log.warning("could not update %s: another program holds it open; training goes on, and a later "
                            "update writes it", path)
            self.held.add(path)
        else:
            self.held.discard(path)


def _read_csv(path: Path) -> List[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _plot(path: Path, rows: List[dict], val_rows: List[dict]) -> None:
    from .io import png_figure

    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    window = max(1, min(100, len(loss) // 10))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    with png_figure(path, 100, figsize=(7, 4)) as (fig, ax):
        ax.plot(steps, loss, color="0.8", lw=0.5, label="training loss")
        ax.plot(steps[window - 1:], smooth, color="C0", label=f"mean of {window} steps")
        for i, key in enumerate(k for k in (val_rows[0] if val_rows else {}) if k.startswith("t")):
            ax.plot([int(r["step"]) for r in val_rows], [float(r[key]) for r in val_rows], "o-", ms=3,
                    color=f"C{i + 1}", label=f"validation {key} (EMA)")
        ax.set_xlabel("step")
        ax.set_ylabel("L1 loss on epsilon")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
