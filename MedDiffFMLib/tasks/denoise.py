"""Zero-shot CT denoising with DiffPIR (paper, section 3.4) on the input's own grid.

The noisy image y (in [-1, 1]) is modelled as x0 + sigma_n z. Sampling starts at the step whose noise
level sigma_bar_t equals sigma_n, from x_start = sqrt(abar) y, and after every network evaluation the
clean-image estimate x0 gets the closed-form data step
    x0_hat = (y + rho_t x0) / (1 + rho_t),   rho_t = lambda sigma_n^2 / sigma_bar_t^2,
except at the last step, which returns the network's x0.

Choices:
- Grid: the input's own voxels (no resampling; the model is told the spacing). A measured trial lost more
  to a 1 mm resampling round trip than the denoiser gained (../shared/NOTES-DENOISING.md beside the repository).
- Window: by default the model's own training window for the body region (`cfg.windows[region]`), because
  the prior was learned on that HU-to-[-1, 1] mapping; another window feeds the network contrasts it never
  saw. The paper's [-160, 240] HU is the right choice for a model trained with that window and can be set
  (`window=(-160, 240)`); a window different from the model's is logged as a warning. The lower edge of an
  automatic window moves down by one noise std, so noisy fat is not clipped (FAT_MARGIN_NOISE_STDS).
- Noise: sigma_n comes from `noise.estimate_noise` (a per-voxel map) unless given; the data step uses
  the local value (rho varies in space), t_start the map's median.
- Voxels outside the window (bone, air) keep their input value; within a margin inside the window edges
  the output blends smoothly from denoised to input, so nothing is clipped away. Windows that hold no voxel
  of the window are not evaluated (air around the body, and the lungs in a soft-tissue pass); see
  `sampling` for what that changes (well under 0.1 dB).
- Soft-tissue pass: a wide region window (chest, 1800 HU) squeezes soft-tissue contrast and its noise into
  a small part of [-1, 1], where the prior resolves it poorly. When the model's window is more than twice
  as wide as SOFT_TISSUE_WINDOW_HU, a second pass denoises in that window (the paper's [-160, 240] HU) and
  replaces the first inside it, with the same edge blend: lungs come from the wide pass, mediastinum and
  chest wall from the narrow one. On the bundled low-dose chest crop this gave 26.3 dB against 24.1 dB
  for the wide pass alone (PSNR in [-160, 240] HU; noisy input 22.1 dB), at twice the cost.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import diffusion
from ..conditioning import VolumeCondition
from ..errors import InputError
from ..io import Volume
from ..metrics import DENOISING_WINDOW_HU
from ..noise import NoiseEstimate, estimate_noise
from ..orientation import in_patient_axes
from ..preprocess import as_window, unit_to_hu, window_to_unit
from ..sampling import SlidingWindowSampler
from ..validation import check_ct, check_mask
from . import common

log = logging.getLogger(__name__)

#: DiffPIR regularisation weight lambda (paper: 10).
DEFAULT_LAMBDA = 10.0
#: DiffPIR noise mixing zeta of the re-noising step (the paper does not state it). Measured with the
#: closed-form Gaussian prior (Testing/test_tasks_zero_shot.py): zeta > 0 makes each run a posterior
#: *sample*, whose error approaches twice that of the posterior mean, so one run is deterministic (0);
#: several seeds need fresh noise to spread, and their mean approaches the posterior mean again. Their spread is
#: no calibrated posterior std: with that prior it was 2-3x smaller than the posterior's at the automatic step
#: count (0.027 against 0.089 at sigma_n 0.1, 3 steps), nearer it with more steps (0.076 at 10).
DEFAULT_ZETA = 0.0
DEFAULT_SEEDS_ZETA = 0.3
#: Network evaluations when none are given: one per STEP_SPACING timesteps of t_start, at least MIN_NFE, so a
#: noisier image gets more steps. Measured with the registered default model on held-out tuning slices that the
#: benchmark does not report (chest / abdomen / limb, PSNR in [-160, 240] HU; 4 scored slices inside 20):
#: - I0 = 1e5 (t_start 74-120): NFE 3 gave 33.10 / 26.94 / 27.70 dB, NFE 5 33.15 / 27.00 / 27.81.
#: - I0 = 2.5e4 (t_start 154-240): NFE 3 gave 28.95 / 23.51 / 24.45 dB, NFE 4 29.15 / 23.69 / 24.59,
#:   NFE 6 29.33 / 23.71 / 24.65, NFE 10 29.32 / 23.66 / 24.68.
#: Earlier, with thin blocks and a less trained model, NFE 1 / 3 / 5 / 10 gave 27.37 / 27.47 / 27.44 / 27.41 dB.
STEP_SPACING = 30
MIN_NFE = 3
#: Window overlap. Same held-out slices, 8,537-step model, NFE 3 (chest / abdomen / limb): overlap 0.5 gave
#: 31.59 / 26.21 / 27.59 dB, 0.25 gave 31.61 / 26.20 / 27.57 dB with 3x fewer windows on large volumes, and
#: 0 gave 31.02 / 25.98 / 27.45 dB. Other tasks keep 0.5 (not measured for them).
DEFAULT_OVERLAP = 0.25
#: Below this estimated noise std (HU) an image is treated as noise-free.
MIN_NOISE_HU = 0.5
#: Above this given noise std (HU: the step from air to water) no CT detail survives: a wrong unit, not a CT.
MAX_NOISE_HU = 1000.0
#: Second pass for soft tissue (the paper's denoising window) when the region window is much wider.
SOFT_TISSUE_WINDOW_HU = DENOISING_WINDOW_HU
SOFT_TISSUE_PASS_RATIO = 2.0
#: The lower edge of an automatic window (the model's, the soft-tissue pass's) moves down by this many noise stds.
#: Why: fat (about -100 HU) lies just above the lower edge of the soft-tissue windows (-120 HU for the abdomen);
#: noise pushed many of its voxels below the edge, where they were clipped (biased) or left undenoised by the
#: edge blend. Measured on held-out abdomen tuning slices (PSNR dB): window [-120, 240] 26.51, [-160, 240]
#: 26.94, [-200, 240] 26.96 at I0 = 1e5 (noise 41 HU); 22.95 / 23.70 / 23.69 at 2.5e4 (82 HU). Moving the edge
#: from -160 to -200 HU changed chest soft tissue and limb by +0.04 / +0.07 dB. An explicit window is used as given.
FAT_MARGIN_NOISE_STDS = 1.0
#: A voxel more than this many noise stds outside a pass's window is structure, not noise: it keeps its input
#: value (`common.window_weight`).
KEEP_BEYOND_NOISE_STDS = 3.0


@dataclass
class DenoiseResult:
    denoised: Volume                 # HU, on the input grid
    uncertainty: Optional[Volume]    # per-voxel std (HU) over seeds, when seeds > 1
    noise_hu: float                  # overall noise level (HU) that set t_start: median of the map
    noise_estimate: Optional[NoiseEstimate]  # None when the user gave the noise level; profile along head-foot
    window: Tuple[float, float]
    t_start: int
    steps: List[int]
    soft_tissue_window: Optional[Tuple[float, float]] = None  # the second pass's window, when it ran
    # Per pass: (windows evaluated, windows in the grid sampled: the whole image's, or with a mask the box's).
    windows: List[Tuple[int, int]] = field(default_factory=list)


def automatic_nfe(t_start: int) -> int:
    """Network evaluations for a start at `t_start` when the caller gives none (see STEP_SPACING)."""
    return max(MIN_NFE, math.ceil(t_start / STEP_SPACING))


def diffpir(sampler: SlidingWindowSampler, y: torch.Tensor, sigma: Union[float, torch.Tensor],
            lam: float = DEFAULT_LAMBDA, zeta: float = DEFAULT_ZETA, nfe: Optional[int] = None, seed: int = 0,
            progress: Optional[Callable[[int, int], None]] = None,
            windows: Optional[Sequence[int]] = None,
            noise_level: Optional[float] = None) -> Tuple[torch.Tensor, List[int]]:
    """DiffPIR denoising of y (1, 1, d, h, w) in [-1, 1] units with noise std `sigma` (scalar or a map
    broadcastable to y, same units) in `nfe` steps (None: `automatic_nfe`), evaluating only `windows` (None: all;
    the voxels they do not cover take y as their x0). `noise_level` (same units) sets t_start (None: the median
    of `sigma`). Returns (x0, the timesteps used)."""
    schedule = sampler.schedule
    sigma_map = torch.as_tensor(sigma, dtype=torch.float32).to(sampler.device)
    if noise_level is None:
        noise_level = float(sigma_map.median()) if sigma_map.ndim else float(sigma_map)
    sigma_overall = float(noise_level)
    if sigma_overall <= 0:
        raise InputError(f"the noise level must be > 0, got {sigma_overall}")
    steps = _planned_steps(sampler, sigma_overall, nfe)
    t_start = steps[0]
    y = y.to(sampler.device, torch.float32)

    def data_step(x0: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        if t_prev < 0:  # no data step at the last iteration
            return x0
        rho = lam * sigma_map ** 2 / float(schedule.sigma_bar(t)) ** 2
        return x0 + (y - x0) / (1 + rho)  # = (y + rho x0) / (1 + rho), without inf / inf for a huge rho

    x_start = float(schedule.abar(t_start).sqrt()) * y
    x0 = sampler.run(x_start, steps, seed, x0_transform=data_step, zeta=zeta, progress=progress, windows=windows,
                     fallback=y)
    return x0, steps


@in_patient_axes
def denoise(volume: Volume, model: torch.nn.Module, nfe: Optional[int] = None,
            noise_level: Optional[float] = None, window: Optional[Sequence[float]] = None,
            lam: float = DEFAULT_LAMBDA, zeta: Optional[float] = None, seed: int = 0, seeds: int = 1,
            region: Optional[str] = None, anatomy_labels: Optional[Volume] = None,
            soft_tissue_pass: Optional[bool] = None, mask: Optional[Volume] = None,
            device: Union[str, torch.device] = "auto", overlap: float = DEFAULT_OVERLAP,
            window_batch: Optional[int] = None, precision: str = "auto",
            progress: Optional[Callable[[int, int], None]] = None, window_size: Optional[int] = None) -> DenoiseResult:
    """Denoise a CT (HU) with the diffusion prior; see the module docstring for the method and choices.

    `nfe` None: `automatic_nfe` for each pass (more steps for noisier images).
    `noise_level`: noise std in HU (None: a per-voxel map estimated from the image). `window`: (lo, hi) HU
    (None: the model's window for the region). `seeds` > 1 runs seeds seed..seed+seeds-1 and returns their
    mean, with the per-voxel standard deviation as `uncertainty`. `zeta` None: DEFAULT_ZETA for one seed,
    DEFAULT_SEEDS_ZETA for several. `region` None guesses it from the image. `soft_tissue_pass` None:
    when the window is the model's and much wider than soft tissue (chest), soft tissue gets a second pass
    in SOFT_TISSUE_WINDOW_HU (see the module docstring); True/False forces it on/off. `mask`: a label map on the
    image grid; only its nonzero voxels are denoised (the rest keep the input, and only a box around it, one
    window wider on every side, is sampled), e.g. a quick look at a region on the CPU. The noise, the anatomy and
    the start of the steps still come from the whole image, so inside the mask the result is the unmasked one up
    to the window tiling. `window_size`: the sliding window's edge in voxels (None: the model's training patch;
    see `common.check_window_size`).
    """
    seed = common.check_seed(seed)
    check_ct(volume)
    if mask is not None:
        check_mask(mask, volume)
    seeds = common.check_count(seeds, "the number of seeds")
    if nfe is not None:
        nfe = common.check_count(nfe, "the number of network evaluations (nfe)")
    if zeta is None:
        zeta = DEFAULT_ZETA if seeds == 1 else DEFAULT_SEEDS_ZETA
    elif seeds > 1 and zeta == 0:
        log.warning("zeta 0 makes every seed give the same result; the uncertainty map will be zero")
    if lam <= 0 or not 0.0 <= zeta <= 1.0:
        raise InputError(f"need lambda > 0 and 0 <= zeta <= 1, got lambda={lam}, zeta={zeta}")
    device = common.task_device(model, device)
    common.check_base(model, "denoising")
    cfg = common.model_config(model)
    window_size = common.check_window_size(cfg, window_size)
    region = common.resolve_region(volume, region, cfg)
    model_window = common.model_window(cfg, region)
    chosen = model_window if window is None else as_window(window)
    if tuple(chosen) != model_window:
        log.warning("denoising window %s HU differs from the window the model was trained with for %s "
                    "(%s HU); the prior may fit worse", chosen, region, model_window)
    inside = None if mask is None else np.asarray(mask.array) != 0
    # With a mask only a box around it is sampled, with a window of context on every side (unit spacing: the
    # margin is in voxels), so the per-step work follows the region, not the whole CT.
    box = (tuple(slice(0, n) for n in volume.shape) if inside is None
           else common.mask_box(inside, (1.0, 1.0, 1.0), window_size, window_size))
    work = volume if inside is None else volume.crop(box)

    estimate = None
    if noise_level is None:
        common.check_setup_memory(volume.shape, common.NOISE_ESTIMATE_EXTRA_COPIES)
        estimate = estimate_noise(volume)
        log.info("%s", estimate.describe())
        if estimate.sigma_hu < MIN_NOISE_HU:
            raise InputError(f"the image looks noise-free (estimated noise {estimate.sigma_hu:.2f} HU); there is "
                             "nothing to denoise. To denoise anyway, give the noise level (--noise-level HU)")
        # The whole CT's median sets t_start, so a masked denoise starts where the unmasked one does.
        noise_hu = float(np.median(estimate.sigma_map_hu))
        log.info("noise level %.1f HU sets where DiffPIR starts (the median of the per-voxel map, which the data "
                 "steps use voxel by voxel)", noise_hu)
        sigma_hu_map = estimate.sigma_map_hu[box]
    else:
        if not 0 < noise_level <= MAX_NOISE_HU:
            raise InputError(f"the noise level must be > 0 and at most {MAX_NOISE_HU:g} HU (a noise std in HU), got "
                             f"{noise_level:g}")
        noise_hu = float(noise_level)
        sigma_hu_map = np.float32(noise_hu)
    # Automatic windows, and the soft-tissue pass, make room below for noisy fat (see FAT_MARGIN_NOISE_STDS).
    fat_margin = FAT_MARGIN_NOISE_STDS * noise_hu
    first = (chosen[0] - fat_margin, chosen[1]) if window is None else tuple(chosen)
    soft = (SOFT_TISSUE_WINDOW_HU[0] - fat_margin, SOFT_TISSUE_WINDOW_HU[1])
    # The second pass replaces the first wherever it applies: it must add a narrower window, not swap the first's.
    nested = first[0] <= soft[0] and soft[1] <= first[1] and soft != first
    if soft_tissue_pass is None:  # automatic: a chest-wide model window that holds the soft-tissue one
        soft_tissue_pass = (window is None and nested
                            and _width(chosen) > SOFT_TISSUE_PASS_RATIO * _width(SOFT_TISSUE_WINDOW_HU))
    elif soft_tissue_pass and not nested:
        raise InputError(f"the soft-tissue pass [{soft[0]:g}, {soft[1]:g}] HU is not inside the first pass's window "
                         f"[{first[0]:g}, {first[1]:g}] HU, so it would replace that pass wherever it applies; use it "
                         f"only with a window from at most {soft[0]:g} (-160 HU less one noise std) up to at least "
                         f"{soft[1]:g} HU, or turn it off")
    windows = [first] + ([soft] if soft_tissue_pass else [])

    labels = common.anatomy_for(volume, cfg, anatomy_labels)[box]  # the whole CT's: the body decides the classes
    cond = VolumeCondition(cfg, work.shape, work.spacing_zyx, region, labels, offset_zyx=[s.start for s in box],
                           full_shape_zyx=volume.shape)
    sampler = common.make_sampler(model, work.shape, work.spacing_zyx, region, None, device, overlap=overlap,
                                  window_batch=window_batch, precision=precision, cond=cond,
                                  window_size=window_size)
    # Each pass denoises inside its window; narrower windows are applied last, so they win where they apply.
    output = work.array.astype(np.float32)
    std_hu = np.zeros(work.shape, np.float64) if seeds > 1 else None
    steps: List[int] = []
    pass_windows: List[Tuple[int, int]] = []
    # Passes can take different numbers of steps (automatic NFE): plan them all, so progress counts over all passes.
    plans = [_planned_steps(sampler, noise_hu * 2.0 / _width(w), nfe) for w in windows]
    if seeds > 1 and all(len(plan) == 1 for plan in plans):
        log.warning("one step draws no noise, so every seed gives the same result and the uncertainty map will be "
                    "zero; use --nfe 2 or more for an uncertainty map")
    total, done = seeds * sum(len(plan) for plan in plans), 0
    if inside is not None:
        log.info("denoising only inside the mask: %d voxels (%.1f %% of the image); the rest keeps its values",
                 int(inside.sum()), 100.0 * inside.mean())
        inside = inside[box]

    keep_beyond_hu = KEEP_BEYOND_NOISE_STDS * sigma_hu_map

    def pass_weight(pass_window: Tuple[float, float]) -> np.ndarray:
        weight = common.window_weight(work.array, pass_window, keep_beyond_hu)
        return weight if inside is None else weight * inside

    # A later pass's window lies inside the first's, so the first evaluates the most windows: a compiled network's
    # one batch shape is balanced over them.
    first_weight = pass_weight(windows[0])
    first_set = sampler.active_windows(first_weight > 0)
    if inside is not None and not first_set:
        raise InputError(f"the mask holds no voxel inside the denoising window [{windows[0][0]:g}, "
                         f"{windows[0][1]:g}] HU: only voxels outside it (such as air or bone), which keep their "
                         "values anyway; draw it over the tissue to denoise, or widen the window")
    sampler.balance_batch(len(first_set))
    for index, (pass_window, plan) in enumerate(zip(windows, plans)):
        def pass_progress(step: int, n: int, done: int = done) -> None:
            if progress is not None:
                progress(done + step, total)

        if index == 0:  # made above; not held through the later passes
            weight, evaluated = first_weight, first_set
            del first_weight
        else:
            weight = pass_weight(pass_window)
            evaluated = sampler.active_windows(weight > 0)
        pass_windows.append((len(evaluated), sampler.num_windows))
        log.info("[%g, %g] HU pass: %d of %d windows hold voxels to denoise", *pass_window, len(evaluated),
                 sampler.num_windows)
        mean_hu, pass_std, pass_steps = _denoise_pass(sampler, work, pass_window, sigma_hu_map, noise_hu, lam,
                                                      zeta, len(plan), seed, seeds, pass_progress, evaluated)
        done += seeds * len(plan)
        output = output + weight * (mean_hu - output)
        if std_hu is not None:  # in the blend band between passes an upper bound: std(sum) <= sum of stds
            std_hu = std_hu + weight * (pass_std - std_hu)
        steps = steps or pass_steps
        log.info("DiffPIR in [%g, %g] HU: noise %.1f HU = %.4f in [-1, 1], t_start %d, %d steps, lambda %g, "
                 "zeta %g", *pass_window, noise_hu, noise_hu * 2.0 / _width(pass_window), pass_steps[0],
                 len(pass_steps), lam, zeta)
    if work is not volume:  # back into the whole CT
        output, boxed = volume.array.astype(np.float32), output
        output[box] = boxed
        if std_hu is not None:
            std_hu, boxed = np.zeros(volume.shape, np.float32), std_hu
            std_hu[box] = boxed
    # Removing noise never widens the range of values: a wide automatic window (a high noise level moves its lower
    # edge down) must not put voxels below the input's air.
    common.clip_to_input_range(output, volume.array)
    uncertainty = None if std_hu is None else volume.with_array(std_hu.astype(np.float32))
    return DenoiseResult(volume.with_array(output.astype(np.float32, copy=False)), uncertainty, noise_hu, estimate,
                         tuple(chosen), steps[0], steps, SOFT_TISSUE_WINDOW_HU if soft_tissue_pass else None,
                         pass_windows)


def _planned_steps(sampler: SlidingWindowSampler, sigma_unit: float, nfe: Optional[int]) -> List[int]:
    """The timesteps `diffpir` takes for noise std `sigma_unit` ([-1, 1] units) and `nfe` (None: automatic)."""
    t_start = sampler.schedule.t_for_sigma(sigma_unit)
    return diffusion.timesteps(automatic_nfe(t_start) if nfe is None else nfe, t_start)


def _width(window: Sequence[float]) -> float:
    return float(window[1]) - float(window[0])


def _denoise_pass(sampler: SlidingWindowSampler, volume: Volume, window: Tuple[float, float], sigma_hu_map,
                  noise_hu: float, lam: float, zeta: float, nfe: int, seed: int, seeds: int,
                  progress: Callable[[int, int], None],
                  windows: List[int]) -> Tuple[np.ndarray, Optional[np.ndarray], List[int]]:
    """DiffPIR in one HU window over `seeds` seeds, evaluating `windows`, starting at the level of `noise_hu`:
    (mean in HU, std in HU or None, the steps used)."""
    to_unit = 2.0 / _width(window)
    sigma = torch.as_tensor(np.ascontiguousarray(sigma_hu_map) * to_unit, dtype=torch.float32)
    if sigma.ndim:
        sigma = sigma[None, None]
    y = torch.from_numpy(window_to_unit(volume.array.astype(np.float32), window))[None, None]
    if seeds == 1:
        x0, steps = diffpir(sampler, y, sigma, lam=lam, zeta=zeta, nfe=nfe, seed=seed, progress=progress,
                            windows=windows, noise_level=noise_hu * to_unit)
        return unit_to_hu(x0[0, 0].cpu().numpy(), window), None, steps
    # Welford's running mean and sum of squared deviations over the seeds.
    mean = torch.zeros(y.shape, dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    steps: List[int] = []
    for k in range(seeds):
        def seed_progress(step: int, n: int, k: int = k) -> None:
            progress(k * n + step, seeds * n)

        x0, steps = diffpir(sampler, y, sigma, lam=lam, zeta=zeta, nfe=nfe, seed=seed + k, progress=seed_progress,
                            windows=windows, noise_level=noise_hu * to_unit)
        x0 = x0.double().cpu()
        delta = x0 - mean
        mean += delta / (k + 1)
        m2 += delta * (x0 - mean)
    std = np.sqrt(m2[0, 0].numpy() / (seeds - 1)) / to_unit
    return unit_to_hu(mean[0, 0].numpy(), window), std, steps


