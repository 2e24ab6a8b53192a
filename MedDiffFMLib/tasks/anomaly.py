"""Zero-shot anomaly detection (paper, section 3.4): noise the image heavily, predict a healthy x0 in one
step, and map |input - reconstruction|.

Procedure: the image (in the model's region window, [-1, 1]) is restricted to a region of interest (a user
mask, default the body from the anatomy map); outside it is set to -1 (the window's bottom, air in every
region window). It is noised to step t (750 by default; the paper's is 950) with seeded noise, x0 is predicted
once by the sliding-window sampler (windows averaged; windows holding no voxel of the region are not
evaluated, which leaves the map unchanged, and the reconstruction of the voxels no evaluated window holds is
the masked input: the window's bottom), and the anomaly map is |input - x0| in HU, Gaussian-smoothed and zero
outside the region.

Threshold rule (user-overridable): mean + 3 standard deviations of the map inside the region.
Image-level score: `metrics.anomaly_image_score`, the highest value of the (smoothed) map inside the region (HU).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .. import diffusion, metrics
from ..errors import InputError
from ..io import Volume
from ..orientation import in_patient_axes
from ..preprocess import unit_to_hu, window_to_unit
from ..smoothing import gaussian_filter
from ..validation import check_ct, check_mask
from . import common

log = logging.getLogger(__name__)

#: Noising step: small steps do not corrupt lesions enough to be "healed". The paper's 950 leaves the bundled model's
#: one-step estimate near its prior, which fills vessels in the lung with lung; 750 scored better on every measure of
#: both validation lesions (benchmarks/README.md, session 25).
DEFAULT_T = 750
#: Gaussian smoothing of the anomaly map (mm).
DEFAULT_SMOOTHING_MM = 2.0
#: Threshold = mean + THRESHOLD_STDS * std of the map inside the region, unless given.
THRESHOLD_STDS = 3.0
#: Below this many voxels in the search region, mean + THRESHOLD_STDS std of the region itself cannot single out
#: anomalous voxels (a lesion is most of such a region; one voxel is its own mean): a warning asks for --threshold.
MIN_THRESHOLD_REGION_VOXELS = 100


@dataclass
class AnomalyResult:
    anomaly_map: Volume      # float32 HU, 0 outside the region
    anomaly_mask: Volume     # uint8, 1 where the map exceeds the threshold
    score: float             # image-level anomaly score (HU)
    threshold: float         # HU
    reconstruction: Volume   # the model's healthy estimate, HU (the window's bottom far outside the region)
    region_mask: Volume      # uint8 region the detection was restricted to


#: Share of the image that may be denser than air yet outside the body mask before a warning: on whole scans the
#: table and clothing make 3-5 %; on crops whose edges cut through the lungs or the body, 30-38 %.
LEFT_OUT_TISSUE_WARNING = 0.15
#: Denser than air (with its noise): lung parenchyma (about -850 HU) counts.
DENSER_THAN_AIR_HU = -900.0


def _warn_if_tissue_left_out(volume: Volume, inside: np.ndarray) -> None:
    """Say so when the default search region (the body mask) leaves out much tissue: in a crop, lungs (and a nodule
    in them) that reach the crop's edge are not enclosed by the body, so they are never searched."""
    left_out = np.count_nonzero(~inside & (volume.array > DENSER_THAN_AIR_HU)) / inside.size
    if left_out > LEFT_OUT_TISSUE_WARNING:
        log.warning("the search region (the body: the voxels the anatomy map labels) leaves out %.0f %% of the image "
                    "although it is denser than air: in a crop, lungs or tissue that reach its edge are not enclosed "
                    "by the body and are not searched. Give the region to search as a mask (--mask; in Slicer, a "
                    "segment)", 100 * left_out)


@in_patient_axes
def detect_anomalies(volume: Volume, model: torch.nn.Module, mask: Optional[Volume] = None, t: int = DEFAULT_T,
                     seed: int = 0, smoothing_sigma_mm: float = DEFAULT_SMOOTHING_MM,
                     threshold: Optional[float] = None, region: Optional[str] = None,
                     anatomy_labels: Optional[Volume] = None, device: Union[str, torch.device] = "auto",
                     overlap: float = 0.5, window_batch: Optional[int] = None,
                     precision: str = "auto", window_size: Optional[int] = None) -> AnomalyResult:
    """Anomaly map, thresholded mask and image score for a CT (HU); see the module docstring.

    `mask`: label map on the image grid (nonzero = search here); None: the body from the anatomy map.
    `threshold`: HU on the smoothed map (None: mean + 3 std inside the region).
    """
    seed = common.check_seed(seed)
    check_ct(volume)
    common.check_base(model, "anomaly detection")
    cfg = common.model_config(model)
    common.check_window_size(cfg, window_size)
    if not 0 <= t < cfg.num_train_timesteps:
        raise InputError(f"noising step t must be in 0..{cfg.num_train_timesteps - 1}, got {t}")
    if smoothing_sigma_mm < 0:
        raise InputError(f"smoothing must be >= 0 mm, got {smoothing_sigma_mm}")
    if threshold is not None and not threshold > 0:  # the map is an absolute difference: <= 0 marks every voxel
        raise InputError(f"the threshold must be above 0 HU (the anomaly map is never negative), got {threshold:g}")
    device = common.task_device(model, device)
    region = common.resolve_region(volume, region, cfg)
    labels = common.anatomy_for(volume, cfg, anatomy_labels)
    if mask is not None:
        check_mask(mask, volume)
        inside = np.asarray(mask.array) > 0
    else:
        inside = labels > 0
        if not inside.any():
            raise InputError("no body found in the image (nothing above -500 HU); give a mask (--mask)")
        _warn_if_tissue_left_out(volume, inside)
    window = common.model_window(cfg, region)
    sampler = common.make_sampler(model, volume.shape, volume.spacing_zyx, region, labels, device,
                                  overlap=overlap, window_batch=window_batch, precision=precision,
                                  window_size=window_size)

    x = window_to_unit(volume.array.astype(np.float32), window)
    x[~inside] = -1.0
    x = torch.from_numpy(x)[None, None]
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=generator)
    x_t = diffusion.q_sample(sampler.schedule, x, t, noise)
    x0 = sampler.predict_x0(x_t, t, sampler.active_windows(inside), fallback=x).cpu()

    # The healthy reconstruction holds no value its input could not: the chest window reaches 400 HU below air, and
    # a model that undershoots there would mark every lung voxel by the gap.
    reconstruction = common.clip_to_input_range(unit_to_hu(x0[0, 0].numpy(), window).astype(np.float32),
                                                volume.array)
    difference = np.abs(unit_to_hu(x[0, 0].numpy(), window) - reconstruction)
    anomaly = smooth_inside(difference, inside, volume.spacing_zyx, smoothing_sigma_mm)
    values = anomaly[inside]
    if threshold is None:
        threshold = float(values.mean() + THRESHOLD_STDS * values.std())
        if values.size < MIN_THRESHOLD_REGION_VOXELS:
            log.warning("the search region has only %d voxels, too few for an automatic threshold (mean + %g std "
                        "of the region itself); give one (--threshold HU), or search a larger region",
                        values.size, THRESHOLD_STDS)
    score = metrics.anomaly_image_score(values)
    region_mask = volume.with_array(inside.astype(np.uint8))
    return AnomalyResult(
        anomaly_map=volume.with_array(anomaly.astype(np.float32)),
        anomaly_mask=volume.with_array(((anomaly > threshold) & inside).astype(np.uint8)),
        score=score, threshold=float(threshold),
        reconstruction=volume.with_array(reconstruction),
        region_mask=region_mask)


def smooth_inside(values: np.ndarray, inside: np.ndarray, spacing_zyx, sigma_mm: float) -> np.ndarray:
    """Gaussian smoothing (sigma in mm) normalised by the smoothed region, so the region's border is not
    diluted by the zeros outside; zero outside the region."""
    weights = inside.astype(np.float32)
    if sigma_mm > 0:
        sigma = [sigma_mm / s for s in spacing_zyx]
        num = gaussian_filter(values * weights, sigma=sigma)
        den = gaussian_filter(weights, sigma=sigma)
        values = num / np.maximum(den, 1e-6)
    return np.where(inside, values, 0.0)
