"""Low-dose CT simulation in the projection domain (parallel beam, Poisson counts, filtered back-projection).

Each axial slice is turned into attenuation, projected (scikit-image `radon`), given Poisson photon
noise for `photons` incident photons per detector bin and view, and reconstructed with a ramp-filtered
back-projection. FBP of even a noiseless sinogram blurs and rings a little, so the simulated image
is the *original* slice plus only the reconstructed noise, `FBP(noisy sinogram) - FBP(clean sinogram)`
(one FBP of the sinogram difference, FBP being linear). The clean reference for metrics is therefore
the original image itself, and the added noise has real CT's texture: spatially correlated, stronger
behind dense structures and along highly attenuating ray paths.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np

from .errors import InputError
from .io import Volume

#: Linear attenuation of water in 1/mm at a typical effective CT energy (~70 keV).
MU_WATER_PER_MM = 0.0192

Progress = Optional[Callable[[int, int], None]]


def simulate_low_dose(ct: Union[Volume, np.ndarray], photons: float = 1e5, seed: int = 0,
                      pixel_size_mm: Optional[float] = None, n_angles: Optional[int] = None,
                      progress: Progress = None) -> Union[Volume, np.ndarray]:
    """Low-dose version of a CT in HU, slice by slice along axis 0 (axial for zyx volumes).

    ct: a `Volume` (its in-plane spacing gives the pixel size) or a 2D/3D HU array with
        `pixel_size_mm` given. The result has the input's type, shape and geometry; the input is
        not modified.
    photons: incident photons per detector bin and view (I0); fewer photons = more noise.
    n_angles: views over 180 degrees; default one per pixel of the slice's longer side.
    seed: the same seed gives the same noise.
    """
    if isinstance(ct, Volume):
        spacing_x, spacing_y = ct.spacing[0], ct.spacing[1]
        if pixel_size_mm is None:
            if abs(spacing_x - spacing_y) > 1e-3 * max(spacing_x, spacing_y):
                raise InputError(f"in-plane pixels are not square ({spacing_x} x {spacing_y} mm); resample "
                                 "the CT to square pixels or pass pixel_size_mm explicitly.")
            pixel_size_mm = spacing_x
        return ct.with_array(simulate_low_dose(ct.array, photons, seed, pixel_size_mm, n_angles, progress))

    hu = np.asarray(ct)
    if hu.ndim not in (2, 3):
        raise InputError(f"simulate_low_dose needs a 2D slice or a 3D (z, y, x) volume, got {hu.ndim} dimensions.")
    if pixel_size_mm is None or not pixel_size_mm > 0:
        raise InputError("simulate_low_dose: give pixel_size_mm > 0 for a plain array (or pass a Volume).")
    if not photons > 0:
        raise InputError(f"photons must be > 0, got {photons}.")
    slices = hu[None] if hu.ndim == 2 else hu
    rng = np.random.default_rng(seed)
    noisy = np.empty(slices.shape, dtype=np.float32)
    for index, hu_slice in enumerate(slices):
        noise = _reconstructed_noise_hu(hu_slice.astype(np.float64), photons, pixel_size_mm, n_angles, rng)
        noisy[index] = hu_slice + noise
        if progress is not None:
            progress(index + 1, len(slices))
    return noisy[0] if hu.ndim == 2 else noisy


def _reconstructed_noise_hu(hu_slice: np.ndarray, photons: float, pixel_size_mm: float,
                            n_angles: Optional[int], rng: np.random.Generator) -> np.ndarray:
    from skimage.transform import iradon, radon

    height, width = hu_slice.shape
    side = max(height, width)
    # Attenuation per pixel (a line integral in pixel steps is then dimensionless). Below -1000 HU
    # (air, scanner padding like -3024) there is nothing to attenuate.
    mu_per_pixel = np.clip(MU_WATER_PER_MM * pixel_size_mm * (1.0 + hu_slice / 1000.0), 0.0, None)
    # Square the slice with air around it; radon(circle=False) then pads to the circumscribed
    # circle, so no corner of the object is cut off.
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((side, side))
    square[top:top + height, left:left + width] = mu_per_pixel
    theta = np.linspace(0.0, 180.0, n_angles or side, endpoint=False)
    line_integrals = radon(square, theta=theta, circle=False)
    counts = rng.poisson(photons * np.exp(-line_integrals))
    noisy_integrals = -np.log(np.maximum(counts, 1) / photons)
    noise_square = iradon(noisy_integrals - line_integrals, theta=theta, output_size=side,
                          filter_name="ramp", circle=False)
    noise_mu = noise_square[top:top + height, left:left + width]
    return noise_mu / (MU_WATER_PER_MM * pixel_size_mm) * 1000.0
