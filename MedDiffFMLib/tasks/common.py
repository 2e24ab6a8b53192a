"""Plumbing shared by the inference tasks: device, model, region, anatomy, sampler, memory check.

Tasks take a loaded model: any torch module with a `cfg` (`ModelConfig`) attribute that is called as
`model(x_t, t, cond, region) -> eps` (a `MedDiffNet`, or a wrapper that adds a ControlNet).
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import PRECISIONS, ModelConfig
from ..conditioning import VolumeCondition, condition_channels
from ..diffusion import Schedule, timesteps
from ..errors import InputError, ResourceError
from ..io import Volume
from ..network import check_compiler, check_loaded, controlnet_task, uncompiled
from ..sampling import SlidingWindowSampler, window_count, window_stride
from ..smoothing import gaussian_filter
from ..validation import MAX_SEED

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def choose_device(name: Union[str, torch.device] = "auto") -> torch.device:
    """`auto`: CUDA when available, else CPU; also `cpu`, `cuda`, `cuda:1` or a torch.device. Asking for
    CUDA without a usable GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use --device cpu "
                         "(slower) or install a CUDA build of PyTorch")
    return device


def task_device(model: torch.nn.Module, name: Union[str, torch.device] = "auto") -> torch.device:
    """Where a task runs: `auto` is where the model is; any other device must be the model's, since a task
    never moves the caller's model (load it with `checkpoints.load_model(name, device)`)."""
    check_loaded(model)
    weight = next(itertools.chain(model.parameters(), model.buffers()), None)
    if weight is None:  # a network without weights (e.g. an analytic prior) runs anywhere: `auto` on the CPU
        return choose_device("cpu" if name == "auto" else name)
    here = weight.device
    if name == "auto":
        return here
    device = choose_device(name)
    if device.type != here.type or (device.index is not None and device.index != here.index):
        raise InputError(f"the model is on {here} but the task was asked to run on {device}; load the model "
                         f"there (checkpoints.load_model(name, '{device}')) or pass device='auto'")
    return here


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """Network precision: bf16 autocast on GPUs that support it (`auto`/`bf16`), else float32 (None)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type != "cuda":
        return None
    if not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise InputError("this GPU does not support bfloat16; use precision fp32")
        return None
    return torch.bfloat16


def load_task_model(name_or_path: str, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """Load a registered model name or a model file, in eval mode on `device`.

    `compile`: wrap the network in torch.compile. On an H100 the first network call then compiles for about
    25 s (one batch shape: the sampler pads the last batch of a compiled network; a later run finds the kernels in
    torch's on-disk cache, and its whole set-up took 10 s) and every step after it runs about 1.6x faster, so it
    pays for long runs (from about 50 steps on a 512 x 512 x 300 CT); on the CPU it gained nothing
    (benchmarks/README.md, sessions 9, 10 and 14). A window batch halved after running out of GPU
    memory is a new shape and compiles again.
    """
    from ..checkpoints import load_model as load_checkpoint, resolve_model
    from ..network import parameter_count
    from ..registry import RESOURCES, registry

    # Resolved once (a registered name's files are checked on the way), but links are not followed: a model's
    # description lies beside the name it was given by, not beside the file a link points at (a download cache's blob).
    weights = resolve_model(name_or_path)
    model, cfg, info = load_checkpoint(weights, device)
    log.info("model %s: preset %s, %.2fM parameters, %s training steps, on %s", name_or_path, cfg.name,
             parameter_count(model) / 1e6, info.get("steps", "unknown"), device)
    if any(entry.get("test_only") and (RESOURCES / entry["file"]).resolve() == weights.resolve()
           for entry in registry()):
        log.warning("model %s is a test model (Resources/Models.json): it proves the code path end to end, and its "
                    "output is not clinically meaningful", name_or_path)
    model = model.eval()
    if compile:
        check_compiler(device)
        log.info("the network is compiled at its first call (torch.compile)")
        model = torch.compile(model, dynamic=False)
    return model


def is_compiled(model: torch.nn.Module) -> bool:
    return uncompiled(model) is not model


def check_seed(seed) -> int:
    """The seed as an int. None, a fraction or a seed outside 0..MAX_SEED is refused: every stochastic task must
    be reproducible."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be a whole number (the same seed gives the same result), got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be in 0..{MAX_SEED}, got {seed}")
    return int(seed)


def check_count(value, name: str, least: int = 1) -> int:
    """A whole-number setting (steps, repetitions) as an int; refused unless >= `least`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InputError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def check_base(model: torch.nn.Module, task: str) -> None:
    """Refuse a ControlNet where `task` runs the base model (it would fail mid-run on its extra channels)."""
    check_loaded(model)
    task_of_controlnet = controlnet_task(model)
    if task_of_controlnet is not None:
        raise InputError(f"{task} runs the base model; the given model is a ControlNet fine-tuned for "
                         f"{task_of_controlnet}. Give a base model such as `default`")


def model_config(model: torch.nn.Module) -> ModelConfig:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise InputError("the model has no MedDiffFM configuration (cfg); load it with "
                         "MedDiffFMLib.checkpoints.load_model")
    return cfg


def schedule_for(cfg: ModelConfig) -> Schedule:
    return Schedule.from_name(cfg.schedule, cfg.num_train_timesteps)


def sampling_steps(nfe: int, schedule: Schedule) -> list:
    """The timesteps of a sampling run from pure noise; an `nfe` above the model's timesteps uses each one once, and
    says so."""
    if nfe > schedule.T:
        log.warning("%d network evaluations asked for, but the model has %d timesteps: each is used once (%d "
                    "evaluations)", nfe, schedule.T, schedule.T)
    return timesteps(nfe, schedule.T - 1)


def resolve_region(vol: Optional[Volume], region: Optional[str], cfg: ModelConfig) -> str:
    """The body region to condition on: the user's choice, or guessed from `vol` (logged with its reason)."""
    if region in (None, "auto"):
        if vol is None:
            raise InputError(f"no body region given and no image to guess it from; choose one of "
                             f"{', '.join(cfg.regions)}")
        from ..preprocess import REGION_UNKNOWN, guess_region

        region, reason = guess_region(vol)
        (log.warning if reason == REGION_UNKNOWN else log.info)("body region %s guessed: %s", region, reason)
    if region not in cfg.regions:
        raise InputError(f"unknown body region {region!r}; this model knows {', '.join(cfg.regions)}")
    return region


#: Share of voxels where a label map given to a threshold-anatomy model must equal the CT's own thresholds.
MIN_THRESHOLD_AGREEMENT = 0.99


def anatomy_for(vol: Volume, cfg: ModelConfig, user_labels: Optional[Volume] = None,
                from_image: bool = True) -> np.ndarray:
    """Anatomy label map on `vol`'s grid from the source the model was trained with (or the user's map).

    A user's map is checked against the model's classes here, before any sampling, not window by window. For a CT
    (`from_image`) a model with threshold anatomy takes only a map of its own thresholds (MIN_THRESHOLD_AGREEMENT):
    anything else could only differ from what it learned (a lesion mask given by mistake passed for lung). Synthesis
    on an empty grid (`from_image` False) takes any map of its classes: there the map says what to draw.
    """
    from ..anatomy import get_anatomy, threshold_anatomy
    from ..conditioning import anatomy_spec

    spec = anatomy_spec(cfg)
    source = "user" if user_labels is not None else spec.source
    if source not in ("user", "totalsegmentator"):  # TotalSegmentator runs in its own process
        check_setup_memory(vol.shape, ANATOMY_EXTRA_COPIES)
    try:
        labels, used = get_anatomy(vol, source=source, user_labels=user_labels)
    except ResourceError as exc:  # say why TotalSegmentator is needed at all
        raise ResourceError(f"this model was trained on {spec.source} anatomy. {exc}") from None
    if used == "user" and labels.max() > spec.num_classes:
        raise InputError(
            f"the anatomy label map has labels up to {labels.max()}, but this model was trained on "
            f"{spec.source} anatomy with labels 0..{spec.num_classes}; give a label map made the same way "
            f"(python -m MedDiffFMLib preprocess --anatomy {spec.source}) or leave it out to have it computed")
    if used == "user" and from_image and spec.source == "threshold":
        check_setup_memory(vol.shape, ANATOMY_EXTRA_COPIES)
        agreement = float(np.mean(labels == threshold_anatomy(vol)))
        if agreement < MIN_THRESHOLD_AGREEMENT:
            shown = math.floor(agreement * 1000) / 10  # rounded down: 98.96 % must not read as the 99 % it lacks
            raise InputError(
                f"this model's anatomy is HU thresholds of the CT itself (0 outside the body, 1 air/lung, 2 fat, "
                f"3 soft tissue, 4 bone), and the label map given matches them in only {shown:g} % of the voxels: "
                "it is another kind of map (a lesion or organ mask?). Leave it out; the model computes its anatomy")
    log.info("anatomy condition: %s labels", used)
    return labels


def model_window(cfg: ModelConfig, region: str) -> Tuple[float, float]:
    """The (lo, hi) HU window the model was trained with for `region`."""
    return tuple(float(v) for v in cfg.windows[region])


#: Width of the blend from a result made in a window back to the input, as a fraction of the window width.
EDGE_BLEND_FRACTION = 0.05

#: Normal-dose CT noise is about 10-40 HU: a voxel this far outside a window holds structure (bone, contrast, gas).
STRUCTURE_BEYOND_WINDOW_HU = 100.0


def window_weight(original: np.ndarray, window: Sequence[float],
                  keep_beyond_hu: Union[float, np.ndarray] = STRUCTURE_BEYOND_WINDOW_HU) -> np.ndarray:
    """Weight of a result made in `window` (denoised, super-resolved): 1 inside, 0 outside, linear over
    a margin inside the window edges. Decided on a lightly smoothed original, so noise does not make it
    flicker; but a voxel whose own value lies more than `keep_beyond_hu` (a number or a per-voxel map) outside
    the window keeps its input, whatever its neighbours: smoothing puts a calcification or a gas bubble one voxel
    wide inside the window, and the result, which never leaves the window, would replace it (600 HU -> 229)."""
    lo, hi = window
    margin = np.float32(EDGE_BLEND_FRACTION * (hi - lo))
    smoothed = gaussian_filter(original, sigma=(0.0, 1.0, 1.0), output=np.float32)
    # In place from here: a whole CT is 300 MB per float32 copy.
    above_lo = smoothed - np.float32(lo)
    inside = np.minimum(above_lo, np.subtract(np.float32(hi), smoothed, out=smoothed), out=above_lo)
    # The voxel's own distance inside the widened window: the allowance, plus half the window's width less the
    # distance from its centre (negative beyond the allowance). Into the smoothed copy's memory, no longer needed.
    own = np.subtract(original, np.float32((lo + hi) / 2), out=smoothed, dtype=np.float32)
    np.abs(own, out=own)
    np.subtract(np.float32((hi - lo) / 2), own, out=own)
    own += np.asarray(keep_beyond_hu, np.float32)
    np.minimum(inside, own, out=inside)
    inside /= margin
    return np.clip(inside, 0.0, 1.0, out=inside)


#: The lowest value a CT scanner stores for air (-1000 HU plus noise): results never go below it unless the input does.
CT_AIR_HU = -1024.0


def input_floor(original: np.ndarray) -> float:
    """The lowest value a result may hold where its input holds more: air as a scanner stores it, or the input's
    lowest value if that is higher. Not the input's minimum itself: padding outside the field of view (-2048 or
    -3024 HU) would let lung come out below air again."""
    return max(float(original.min()), CT_AIR_HU)


def clip_to_input_range(values: np.ndarray, whole: np.ndarray,
                        box: Optional[Tuple[slice, ...]] = None) -> np.ndarray:
    """`values` (on `whole[box]`, the input CT or a box of it) clipped in place: not below `input_floor(whole)` (or
    below the voxel's own input value, where that is lower), not above the input's highest. A task's result then
    holds no value its input could not: the model's window can reach below air (-1400 HU for the chest), and an
    untrained or strained model goes there."""
    original = whole if box is None else whole[box]
    np.maximum(values, np.minimum(original, input_floor(whole)), out=values)
    return np.minimum(values, whole.max(), out=values)


def mask_box(mask: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float,
             min_size: int) -> Tuple[slice, slice, slice]:
    """Bounding box of `mask` > 0 grown by `margin_mm` on every side, then (centred) to at least
    `min_size` voxels per axis, clamped to the volume."""
    if not (isinstance(margin_mm, (int, float, np.number)) and math.isfinite(margin_mm) and margin_mm >= 0):
        raise InputError(f"the margin around the mask must be a number of mm >= 0, got {margin_mm!r}")
    box = []
    for axis, (n, spacing) in enumerate(zip(mask.shape, spacing_zyx)):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        grow = int(math.ceil(margin_mm / spacing))
        lo, hi = max(0, int(present[0]) - grow), min(n, int(present[-1]) + 1 + grow)
        target = min(min_size, n)
        if hi - lo < target:
            lo = min(max(0, lo - (target - (hi - lo)) // 2), n - target)
            hi = lo + target
        box.append(slice(lo, hi))
    return tuple(box)


def make_sampler(model: torch.nn.Module, shape_zyx: Sequence[int], spacing_zyx: Sequence[float], region: str,
                 anatomy_labels: Optional[np.ndarray], device: torch.device, overlap: float = 0.5,
                 window_batch: Optional[int] = None, precision: str = "auto",
                 cond: Optional[VolumeCondition] = None, window_size: Optional[int] = None) -> SlidingWindowSampler:
    """A sliding-window sampler over a grid, after a memory check.

    `cond` replaces the condition built from the other arguments (e.g. a sub-box of a larger volume, or a
    condition carrying a ControlNet's control volume, see `finetune.ControlledCondition`). `window_batch`
    None picks `default_window_batch`; `window_size` None is the model's training patch (see
    `check_window_size`).
    """
    cfg = model_config(model)
    window_size = check_window_size(cfg, window_size)
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"window overlap must be in [0, 1), got {overlap}")
    if window_batch is None:
        window_batch = default_window_batch(cfg, shape_zyx, device, window_size)
    if window_batch < 1:
        raise InputError(f"window batch size must be >= 1, got {window_batch}")
    # No network call holds more windows than the grid has (padded batches included), so none is budgeted.
    window_batch = min(window_batch, window_count(shape_zyx, window_size, overlap))
    check_memory(cfg, shape_zyx, window_batch, device, window_size)
    if any(cfg.patch_size <= int(n) < window_size for n in shape_zyx):
        log.warning("the %d^3 window is larger than the grid %s along an axis the model's %d^3 window fits: it is "
                    "filled by mirroring, which costs time and gains nothing", window_size,
                    tuple(int(n) for n in shape_zyx), cfg.patch_size)
    elif window_size < cfg.patch_size:
        log.warning("the %d^3 window is smaller than the model's %d^3 training patch: more, smaller network calls "
                    "per step (slower), each with less context than the model was trained with", window_size,
                    cfg.patch_size)
    if cond is None:
        cond = VolumeCondition(cfg, shape_zyx, spacing_zyx, region, anatomy_labels)
    elif tuple(cond.shape) != tuple(int(n) for n in shape_zyx):
        raise ValueError(f"the condition's grid {cond.shape} differs from the sampled grid {tuple(shape_zyx)}")
    # A compiled network sees one batch shape only, so the last, shorter batch is padded instead of compiled again.
    sampler = SlidingWindowSampler(model, cond, schedule_for(cfg), window_size, overlap=overlap,
                                   batch_size=window_batch, device=device,
                                   autocast_dtype=autocast_dtype(device, precision),
                                   volume_condition_bytes=volume_condition_budget(device),
                                   fixed_batch=is_compiled(model))
    used = 1.0 - window_stride(window_size, overlap) / window_size  # whole voxels between window starts
    log.info("%d windows of %d^3 voxels per step (overlap %.2f%s)", sampler.num_windows, window_size, used,
             "" if abs(used - overlap) < 0.005 else f", the nearest in whole voxels to {overlap:g}")
    return sampler


def check_window_size(cfg: ModelConfig, window_size: Optional[int]) -> int:
    """The sliding window's edge in voxels: the model's training patch when None.

    The network is convolutional and its position input is global, so it runs on any window whose edge
    halves evenly at every level. The overlap is a fraction of the window: a larger window at a smaller
    fraction (48 at 0.1667 overlaps by 8 voxels, as 32 at 0.25 does) puts fewer voxels through the network per
    step, and fewer windows to slice out and average back (9 % faster a compiled step on an H100, slower on the
    CPU); the prior was trained on the patch size, and quality measured at other sizes is in
    benchmarks/README.md.
    """
    if window_size is None:
        return cfg.patch_size
    factor = 2 ** (len(cfg.channels) - 1)
    if isinstance(window_size, bool) or not isinstance(window_size, (int, np.integer)) or window_size < factor \
            or window_size % factor:
        raise InputError(f"window size must be a whole multiple of {factor} voxels for this model (one halving "
                         f"per level; its training patch is {cfg.patch_size}), got {window_size!r}")
    return int(window_size)


#: Windows per network call when none is given. The CPU gains nothing from more. On a GPU, 256 ran 17 %
#: faster per step than 64 (512 x 512 x 300 CT on an H200, benchmarks/README.md); it is halved until the
#: memory estimate fits in half of the free GPU memory.
CPU_WINDOW_BATCH = 4
GPU_WINDOW_BATCH = 256


def default_window_batch(cfg: ModelConfig, shape_zyx: Sequence[int], device: torch.device,
                         window_size: Optional[int] = None) -> int:
    """The window batch for `device` when the caller gives none (see GPU_WINDOW_BATCH)."""
    if device.type != "cuda":
        return CPU_WINDOW_BATCH
    free = available_memory(device)
    volume_bytes, per_window = estimate_memory(cfg, shape_zyx, 1, window_size)
    batch = GPU_WINDOW_BATCH
    while batch > 1 and free is not None and volume_bytes + batch * per_window > free / 2:
        batch //= 2
    return batch


#: On a GPU the whole-volume condition stack may take this share of the free memory: rebuilding every
#: window's condition on the CPU at every step starves the GPU (a 512 x 512 x 300 CT has ~17,000 windows per
#: step). On the CPU the network dominates, so windows are rebuilt there instead, to save memory.
VOLUME_CONDITION_SHARE = 1 / 3


def volume_condition_budget(device: torch.device) -> int:
    """Bytes the sampler's whole-volume condition may take on `device` (0: never build it)."""
    free = available_memory(device) if device.type == "cuda" else None
    return int(free * VOLUME_CONDITION_SHARE) if free else 0


def estimate_memory(cfg: ModelConfig, shape_zyx: Sequence[int], window_batch: int,
                    window_size: Optional[int] = None) -> Tuple[int, int]:
    """Rough peak bytes (volume-sized arrays, network per window batch) of a sliding-window task with windows
    of `window_size`^3 voxels (None: the training patch).

    Volume: about 16 float32 copies (state, averaging buffers, input, noise, outputs, numpy HU arrays).
    Network (no gradients): the skip activations of every level plus a few working maps at the finest
    level, for input and condition channels too, plus the attention matrices, all float32, per window.
    """
    w = check_window_size(cfg, window_size)
    voxels = int(np.prod([max(int(n), w) for n in shape_zyx]))
    volume_bytes = 16 * 4 * voxels
    per_window = (1 + condition_channels(cfg)) * w ** 3 * 4 * 2
    for level, (channels, attention, head_channels) in enumerate(
            zip(cfg.channels, cfg.attention_levels, cfg.num_head_channels)):
        side = w // 2 ** level
        per_window += (cfg.num_res_blocks + 2) * channels * side ** 3 * 4
        if attention:
            heads = max(1, channels // max(1, head_channels))
            per_window += heads * side ** 6 * 4
    per_window += 6 * cfg.channels[0] * w ** 3 * 4
    return volume_bytes, per_window * window_batch


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on `device` (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


#: Peak CPU memory of the whole CT's set-up beyond the CT itself (already loaded), in float32 copies of the CT,
#: measured with tracemalloc (session 9): the noise estimate 6.3, threshold anatomy 5.1 (rounded up here).
NOISE_ESTIMATE_EXTRA_COPIES = 7
ANATOMY_EXTRA_COPIES = 6


def check_setup_memory(shape_zyx: Sequence[int], copies: int,
                       work: str = "the set-up of this CT (noise estimate, anatomy)",
                       remedy: str = "crop the CT to the region of interest") -> None:
    """Refuse `work` on a grid of `shape_zyx` (`copies` float32 copies of it) when it would clearly exhaust the CPU
    memory, before it starts. A task that samples only a box (a mask's) is checked for the box by `check_memory`;
    its set-up still covers the whole CT."""
    free = available_memory(torch.device("cpu"))
    needed = copies * 4 * int(np.prod([int(n) for n in shape_zyx]))
    if free is not None and needed > free:
        gib = 2.0 ** 30
        raise ResourceError(
            f"{work} needs about {needed / gib:.1f} GiB but only {free / gib:.1f} GiB is free on cpu; {remedy}, or "
            "close other programs")


def check_memory(cfg: ModelConfig, shape_zyx: Sequence[int], window_batch: int, device: torch.device,
                 window_size: Optional[int] = None) -> None:
    """Refuse a job whose estimated memory clearly exceeds what is free, saying what to change."""
    volume_bytes, network_bytes = estimate_memory(cfg, shape_zyx, window_batch, window_size)
    free = available_memory(device)
    gib = 2.0 ** 30
    log.info("memory estimate: %.2f GiB volume arrays + %.2f GiB network (window batch %d)",
             volume_bytes / gib, network_bytes / gib, window_batch)
    if free is None:
        return
    needed = network_bytes + volume_bytes
    if needed > free:
        hints = []
        if window_size is not None and window_size > cfg.patch_size:  # first: it sets both terms of the estimate
            hints.append(f"a smaller window (--window-size; the default is the model's {cfg.patch_size})")
        if window_batch > 1:
            hints.append("a smaller window batch (--window-batch 1)")
        hints.append("a smaller volume (crop to the region of interest)")
        if device.type == "cuda":
            hints.append("the CPU (--device cpu), which has more memory but is slower")
        raise ResourceError(
            f"this job needs about {needed / gib:.3g} GiB but only {free / gib:.1f} GiB is free on "
            f"{device.type}; try " + ", or ".join(hints))
