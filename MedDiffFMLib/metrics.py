"""Image-quality and anomaly-detection metrics (pure numpy/scipy).

Image quality follows the conventions the denoising literature (and the MedDiff-FM paper) reports:
PSNR and SSIM of HU images clipped to a display window, with the window width as data range.
SSIM uses Wang et al.'s Gaussian weighting (sigma 1.5, 11 taps), i.e. scikit-image's
`structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)`.

Anomaly metrics take a score map (higher = more anomalous) and a binary lesion mask of the
same shape. Threshold sweeps are exact: every distinct score is a threshold.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError
from .preprocess import as_window

#: The paper's denoising window: its PSNR/SSIM are computed in it, and it is the window of soft tissue.
DENOISING_WINDOW_HU = (-160.0, 240.0)

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # 11-tap window for sigma 1.5, as Wang et al. 2004
#: Smallest image edge SSIM filters: the Gaussian window's taps.
SSIM_MIN_PIXELS = 2 * int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5) + 1
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{what}: shapes differ ({a.shape} vs {b.shape}); pass arrays on the same grid.")


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; `inf` for identical images."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    _same_shape(x, ref, "psnr")
    mse = np.mean((x - ref) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float, mode: str = "2d") -> float:
    """Mean structural similarity.

    mode "2d": SSIM of each slice along axis 0 (axial for zyx volumes), averaged over slices;
    a 2D input is one slice. mode "3d": one SSIM with a 3D Gaussian window (needs >= 11 slices).
    """
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    _same_shape(x, ref, "ssim")
    if mode not in ("2d", "3d"):
        raise InputError(f"ssim: mode must be '2d' or '3d', got {mode!r}.")
    if mode == "2d" and x.ndim == 2:
        x, ref = x[None], ref[None]
    if x.ndim != 3:
        raise InputError(f"ssim: expected a 2D slice or a 3D volume, got {x.ndim} dimensions.")
    sigma = (0.0, _SSIM_SIGMA, _SSIM_SIGMA) if mode == "2d" else _SSIM_SIGMA
    smallest = min(x.shape[1:]) if mode == "2d" else min(x.shape)
    if smallest < SSIM_MIN_PIXELS:
        raise InputError(f"ssim: images must be at least {SSIM_MIN_PIXELS} pixels along each filtered axis "
                         f"(shape {x.shape}, mode {mode}).")

    def smooth(a):
        return ndimage.gaussian_filter(a, sigma=sigma, truncate=_SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_r = smooth(x), smooth(ref)
    var_x = smooth(x * x) - mu_x ** 2
    var_r = smooth(ref * ref) - mu_r ** 2
    cov = smooth(x * ref) - mu_x * mu_r
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_r ** 2 + c1) * (var_x + var_r + c2))
    # Border pixels see a reflected window; leave them out, as scikit-image does.
    pad = SSIM_MIN_PIXELS // 2
    inner = (slice(None),) if mode == "2d" else (slice(pad, -pad),)
    inner += (slice(pad, -pad), slice(pad, -pad))
    return float(ssim_map[inner].mean())


def hu_window_metrics(pred_hu: np.ndarray, clean_hu: np.ndarray,
                      window: Tuple[float, float] = DENOISING_WINDOW_HU) -> Dict[str, float]:
    """PSNR and (per-slice 2D) SSIM after clipping both images to the HU `window`."""
    lo, hi = as_window(window)
    pred = np.clip(np.asarray(pred_hu, dtype=np.float64), lo, hi)
    clean = np.clip(np.asarray(clean_hu, dtype=np.float64), lo, hi)
    return {"psnr": psnr(pred, clean, hi - lo), "ssim": ssim(pred, clean, hi - lo)}


# ---------------------------------------------------------------- anomaly detection

def _scores_and_labels(scores, labels, what: str) -> Tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    _same_shape(scores, labels, what)
    if not np.isfinite(scores).all():
        raise InputError(f"{what}: scores contain NaN or inf; fix the score map first.")
    return scores, labels.astype(bool)


def _auroc(scores: np.ndarray, positive: np.ndarray, what: str) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"{what}: needs both positive and negative samples "
                         f"(got {n_pos} positive, {n_neg} negative).")
    ranks = _average_ranks(scores.ravel())
    u = ranks[positive.ravel()].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Tied values share the mean of the ranks they span (1-based ranks).
    starts = np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], values.size] - 1
    mean_rank = (first + last) / 2.0 + 1.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def pixel_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Voxel-wise AUROC of a score map against a lesion mask of the same shape."""
    scores, labels = _scores_and_labels(scores, labels, "pixel_auroc")
    return _auroc(scores, labels, "pixel_auroc")


def image_auroc(scores, labels) -> float:
    """AUROC over images: one score per image (e.g. the max of its score map) and one 0/1 label."""
    scores, labels = _scores_and_labels(np.ravel(scores), np.ravel(labels), "image_auroc")
    return _auroc(scores, labels, "image_auroc")


def anomaly_image_score(values: np.ndarray) -> float:
    """One anomaly score for an image: the highest value of its map in the region searched, as image-level anomaly
    scores usually are (BMAD). `detect-anomalies` reports it, and the harness ranks cases by it (and slices by the
    same maximum). A high percentile would resist a hot voxel better, but cannot see a lesion smaller than the share
    it leaves out: a lung nodule is under 0.01 % of a chest CT."""
    values = np.ravel(values)
    if values.size == 0 or not np.isfinite(values).all():
        raise InputError("an image score needs at least one voxel, and finite values")
    return float(values.max())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _same_shape(a, b, "dice")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def _descending_sweep(scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort order (high score first), the index closing each group of tied scores, and those scores."""
    flat = scores.ravel()
    order = np.argsort(-flat, kind="mergesort")
    sorted_scores = flat[order]
    group_end = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    return order, group_end, sorted_scores[group_end]


def best_dice(scores: np.ndarray, labels: np.ndarray) -> Tuple[float, float]:
    """Highest Dice of `scores >= threshold` with the mask over all thresholds: (dice, threshold)."""
    scores, labels = _scores_and_labels(scores, labels, "best_dice")
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise InputError("best_dice: the lesion mask is empty; Dice is undefined without a lesion.")
    order, group_end, thresholds = _descending_sweep(scores)
    true_pos = np.cumsum(labels.ravel()[order])[group_end]
    predicted = group_end + 1
    dices = 2.0 * true_pos / (predicted + n_pos)
    best = int(np.argmax(dices))
    return float(dices[best]), float(thresholds[best])


def check_max_fpr(max_fpr: float) -> float:
    """PRO's integration limit: a false-positive rate in (0, 1]."""
    if not 0.0 < max_fpr <= 1.0:
        raise InputError(f"max_fpr must be a false-positive rate in (0, 1], got {max_fpr}")
    return max_fpr


def pro_score(scores: np.ndarray, labels: np.ndarray, max_fpr: float = 0.3,
              searched: Optional[np.ndarray] = None) -> float:
    """Normalised area under the per-region-overlap curve up to `max_fpr` (MVTec AD's AUPRO).

    Regions are the connected components of the mask (face connectivity over all axes). At each
    threshold, PRO is the mean over regions of the fraction of the region above threshold; the
    curve PRO(FPR) is integrated from FPR 0 to `max_fpr` and divided by `max_fpr` (1 = perfect).
    `searched` (same shape): only these voxels are scored, lesion and healthy alike (None: all).
    """
    scores, labels = _scores_and_labels(scores, labels, "pro_score")
    check_max_fpr(max_fpr)
    regions, n_regions = ndimage.label(labels)
    if searched is not None:
        # A region is a whole lesion (as in MVTec AUPRO), clipped to the searched voxels: a lesion the search
        # region cuts in two stays one region, and one wholly outside it is not scored.
        _same_shape(scores, searched, "pro_score")
        searched = np.asarray(searched, dtype=bool)
        scores, labels = scores[searched], labels[searched]
        kept, regions = np.unique(regions[searched], return_inverse=True)
        regions = regions.reshape(-1) + int(kept[0] != 0)  # renumbered 1.. with 0 for background
        n_regions = int(np.count_nonzero(kept))
    n_neg = labels.size - int(labels.sum())
    if n_regions == 0 or n_neg == 0:
        raise InputError("pro_score: needs at least one lesion voxel and one healthy voxel.")
    # Each lesion voxel adds 1/(region size * number of regions) to PRO when it passes the threshold,
    # so the cumulative sum over voxels sorted by score is the PRO curve.
    sizes = np.bincount(regions.ravel())
    weight = np.zeros(regions.size, dtype=np.float64)
    lesion = regions.ravel() > 0
    weight[lesion] = 1.0 / (sizes[regions.ravel()[lesion]] * n_regions)
    order, group_end, _ = _descending_sweep(scores)
    pro = np.r_[0.0, np.cumsum(weight[order])[group_end]]
    fpr = np.r_[0.0, np.cumsum(~lesion[order])[group_end] / n_neg]
    # Cut the curve at max_fpr, interpolating along the segment that crosses it.
    cut = int(np.searchsorted(fpr, max_fpr, side="left"))  # first point with fpr >= max_fpr
    step = (max_fpr - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
    pro_at_max = pro[cut - 1] + step * (pro[cut] - pro[cut - 1])
    fpr = np.r_[fpr[:cut], max_fpr]
    pro = np.r_[pro[:cut], pro_at_max]
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2.0))
    return area / max_fpr
