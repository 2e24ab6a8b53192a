"""Classical denoisers MedDiffFM is measured against: Gaussian smoothing, non-local means, BM3D.

All take and return HU `Volume`s and work slice by slice (axial), matching the per-slice low-dose
simulation. NLM and BM3D denoise the image clipped to a working HU window and scaled to [0, 1]
(by default the window the metrics score, the paper's [-160, 240] HU, where MedDiffFM's soft-tissue
denoising also works); HU outside the window comes back clipped, which the window metrics ignore.
`sigma_hu` is the noise standard deviation in HU: pass the true one ("oracle", known in a simulation) or None
to estimate it from the image (`noise.estimate_noise`).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError, ResourceError
from .io import Volume
from .metrics import DENOISING_WINDOW_HU
from .noise import estimate_noise
from .preprocess import as_window

Window = Tuple[float, float]


def gaussian(vol: Volume, sigma_px: float = 1.0) -> Volume:
    """In-plane Gaussian smoothing with `sigma_px` pixels (slices are not mixed)."""
    if not sigma_px > 0:
        raise InputError(f"gaussian: sigma_px must be > 0, got {sigma_px}.")
    smoothed = ndimage.gaussian_filter(vol.array.astype(np.float32), sigma=(0.0, sigma_px, sigma_px))
    return vol.with_array(smoothed)


def nlm(vol: Volume, sigma_hu: Optional[float] = None, window: Window = DENOISING_WINDOW_HU,
        h_factor: float = 0.8, patch_size: int = 5, patch_distance: int = 6) -> Volume:
    """scikit-image non-local means per slice; filter strength h = h_factor * sigma."""
    from skimage.restoration import denoise_nl_means

    def denoise(unit_slice: np.ndarray, sigma: float) -> np.ndarray:
        return denoise_nl_means(unit_slice, h=h_factor * sigma, sigma=sigma, patch_size=patch_size,
                                patch_distance=patch_distance, fast_mode=True)

    return _denoise_in_window(vol, sigma_hu, window, denoise)


def bm3d_denoise(vol: Volume, sigma_hu: Optional[float] = None, window: Window = DENOISING_WINDOW_HU) -> Volume:
    """BM3D (PyPI `bm3d`) per slice with a white-noise model of std `sigma_hu`."""
    try:
        import bm3d
    except ImportError:
        raise ResourceError("BM3D needs the `bm3d` package: pip install bm3d") from None

    def denoise(unit_slice: np.ndarray, sigma: float) -> np.ndarray:
        return np.asarray(bm3d.bm3d(unit_slice, sigma_psd=sigma))

    return _denoise_in_window(vol, sigma_hu, window, denoise)


def _denoise_in_window(vol: Volume, sigma_hu: Optional[float], window: Window,
                       denoise_slice: Callable[[np.ndarray, float], np.ndarray]) -> Volume:
    low, high = as_window(window)
    if sigma_hu is None:
        sigma_hu = estimate_noise(vol).sigma_hu
    if not sigma_hu > 0:
        raise InputError(f"noise std must be > 0 HU, got {sigma_hu}.")
    sigma_unit = sigma_hu / (high - low)
    unit = (np.clip(vol.array.astype(np.float64), low, high) - low) / (high - low)
    out = np.stack([denoise_slice(s, sigma_unit) for s in unit])
    return vol.with_array((np.clip(out, 0.0, 1.0) * (high - low) + low).astype(np.float32))
