"""Lesion inpainting (paper, section 3.5): RePaint (Lugmayr et al. 2022) on the sliding-window sampler.

Only the box around the mask (plus a margin) is sampled. After every reverse step the known image,
noised to the new level, replaces the state outside the mask on the whole box before the next windowing:
    x_{t-1} = mask * x_{t-1}^unknown + (1 - mask) * q_sample(x0_known, t-1).
RePaint's resampling harmonises the two parts: every `jump_length` steps the state is noised forward
again by `jump_length` steps and denoised anew, `resample` times in all. The final paste is done in HU,
so every voxel outside the mask is returned exactly as given.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Union

import numpy as np
import torch

from ..diffusion import Schedule, q_sample, reverse_step
from ..errors import InputError
from ..finetune import is_controlnet
from ..io import Volume
from ..network import check_loaded
from ..orientation import in_patient_axes
from ..preprocess import unit_to_hu
from .common import check_count, check_seed, clip_to_input_range, sampling_steps
from .lesion import DEFAULT_MARGIN_MM, prepare_box

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int, int], None]]

#: RePaint's defaults: jump back 10 steps, pass every jumped segment 10 times.
DEFAULT_JUMP_LENGTH = 10
DEFAULT_RESAMPLE = 10


def repaint_path(n: int, jump_length: int, resample: int) -> List[int]:
    """Indices into `steps + [clean]` visited by RePaint, starting at 0 (x at steps[0]) and ending at n.

    A step to a higher index is a reverse (denoising) step; to a lower index, forward noising. Jumps
    happen every `jump_length` steps, counted from the clean end as RePaint does, `resample - 1` times each.
    """
    if jump_length < 1 or resample < 1:
        raise InputError(f"RePaint needs jump_length >= 1 and resample >= 1, got {jump_length} and {resample}")
    remaining = {n - 1 - r: resample - 1 for r in range(0, n - jump_length, jump_length)}
    path, i = [0], 0
    while i < n:
        i += 1
        path.append(i)
        if remaining.get(i, 0) > 0:
            remaining[i] -= 1
            for _ in range(jump_length):
                i -= 1
                path.append(i)
    return path


def renoise(schedule: Schedule, x_s: torch.Tensor, s: int, t: int, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion from level s to a noisier level t > s: q(x_t | x_s)."""
    ratio = schedule.abar(t) / schedule.abar(s)
    return float(ratio.sqrt()) * x_s + float((1 - ratio).sqrt()) * noise


@in_patient_axes
def inpaint(volume: Volume, mask: Volume, model: torch.nn.Module, nfe: int = 100,
            jump_length: int = DEFAULT_JUMP_LENGTH, resample: int = DEFAULT_RESAMPLE,
            margin_mm: float = DEFAULT_MARGIN_MM, region: Optional[str] = None, seed: int = 0,
            device: Union[str, torch.device] = "auto", overlap: float = 0.5, window_batch: Optional[int] = None,
            precision: str = "auto", progress: Progress = None, window_size: Optional[int] = None) -> Volume:
    """A copy of `volume` with the voxels inside `mask` (> 0) synthesised to fit their surroundings.

    `model` is a lesion `ControlledNet` (the mask is its control: a lesion grows there) or a base model
    (the region is filled with plausible normal tissue). RePaint's jumps re-run most steps, so the network
    runs about resample * nfe times per window (`repaint_path` gives the exact sequence).
    """
    seed = check_seed(seed)
    nfe = check_count(nfe, "the number of network evaluations (nfe)")
    jump_length, resample = check_count(jump_length, "jump_length"), check_count(resample, "resample")
    check_loaded(model)
    if is_controlnet(model) and model.task != "lesion":
        raise InputError(f"inpainting runs a base model (normal tissue fills the mask, e.g. `default`) or a lesion "
                         f"ControlNet (a lesion grows there); the given model is a {model.task} ControlNet")
    job = prepare_box(volume, mask, model, region, margin_mm, device, overlap, window_batch, precision,
                      window_size=window_size)
    sampler, schedule = job.sampler, job.sampler.schedule
    unknown = torch.from_numpy(job.inside)[None, None].to(job.known.device)
    steps = sampling_steps(nfe, schedule)
    levels = steps + [-1]
    path = repaint_path(len(steps), jump_length, resample)
    if resample > 1 and len(steps) <= jump_length:
        log.warning("RePaint jumps back %d steps, more than the %d steps taken allow: with these settings it never "
                    "resamples, so resample %d changes nothing; use more steps (nfe) than jump_length, or a smaller "
                    "jump_length", jump_length, len(steps), resample)
    total = sum(1 for a, b in zip(path, path[1:]) if b > a)
    generator = torch.Generator().manual_seed(int(seed))

    def randn() -> torch.Tensor:
        return torch.randn(job.known.shape, generator=generator).to(job.known.device)

    x = randn()
    done = 0
    for a, b in zip(path, path[1:]):
        if b < a:  # RePaint jump: back to the noisier level
            x = renoise(schedule, x, levels[a], levels[b], randn())
            continue
        t, t_prev = levels[a], levels[b]
        x0 = sampler.predict_x0(x, t)
        x = reverse_step(schedule, x, t, t_prev, x0, eta=1.0, noise=randn() if t_prev >= 0 else None)
        known = q_sample(schedule, job.known, t_prev, randn()) if t_prev >= 0 else job.known
        x = torch.where(unknown, x, known)
        done += 1
        if progress is not None:
            progress(done, total)

    generated = clip_to_input_range(unit_to_hu(x[0, 0].cpu().numpy(), job.window), volume.array, job.box)
    out = volume.array.astype(np.float32, copy=True)
    out[job.box] = np.where(job.inside, generated, out[job.box])
    return volume.with_array(out)
