"""CT-textured training noise: unit variance, the ramp-shaped in-plane spectrum of filtered back-projection,
independent slices, seeded, and close to the simulated low-dose noise."""
from __future__ import annotations

from unittest import mock

import numpy as np
import torch

from MedDiffFMLib.lowdose import simulate_low_dose
from MedDiffFMLib import noise_texture as texture
from MedDiffFMLib.noise_texture import MAX_T_FRACTION, fbp_like_noise, training_noise


#: Radial frequency bands (cycles per voxel) of the spectrum checks.
BANDS = [0.0, 0.04, 0.1, 0.2, 0.35, 0.5, 0.71]


def _radial_power(noise: np.ndarray, edges) -> np.ndarray:
    """Mean in-plane power per radial frequency band (cycles per voxel), relative to the mean power."""
    power = np.abs(np.fft.fft2(noise, axes=(-2, -1))) ** 2
    power = power.reshape(-1, *power.shape[-2:]).mean(0)
    rows, columns = power.shape
    radial = np.hypot(np.fft.fftfreq(rows)[:, None], np.fft.fftfreq(columns)[None, :])
    return np.array([power[(radial >= lo) & (radial < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])]) \
        / power.mean()


def test_fbp_like_noise_has_unit_variance_a_ramp_spectrum_and_independent_slices():
    noise = fbp_like_noise((64, 1, 6, 64, 64), torch.Generator().manual_seed(0)).numpy()
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.02
    bands = _radial_power(noise, BANDS)
    # White noise would be flat (1 in every band); a ramp rises from near zero, and the apodisation brings it down.
    assert bands[0] < 0.45 * bands.max() and bands[0] < bands[1] < bands[2], bands
    assert bands[-1] < 0.5 * bands.max(), bands
    slice_lag = (noise[:, :, 1:] * noise[:, :, :-1]).mean() / noise.var()
    assert abs(slice_lag) < 0.02
    again = fbp_like_noise((64, 1, 6, 64, 64), torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(noise, again)


def test_the_texture_family_holds_simulated_low_dose_ct_noise():
    """The noise of `lowdose` (ramp FBP of Poisson counts) lies within the family's spectra band by band, and one
    member matches it closely, much more closely than white noise does."""
    phantom = np.full((4, 96, 96), -1000.0)
    yy, xx = np.mgrid[:96, :96]
    phantom[:, (yy - 48) ** 2 + (xx - 48) ** 2 < 40 ** 2] = 40.0
    measured = _radial_power((simulate_low_dose(phantom, photons=1e5, seed=0, pixel_size_mm=1.0) - phantom)
                             [:, 20:76, 20:76], BANDS)
    members = []
    for cutoff in np.linspace(*texture.CUTOFF_RANGE, 5):
        with mock.patch.object(texture, "CUTOFF_RANGE", (cutoff, cutoff)):
            noise = fbp_like_noise((64, 1, 2, 56, 56), torch.Generator().manual_seed(1)).numpy()
        members.append(_radial_power(noise, BANDS))
    members = np.array(members)
    assert np.all(members.min(0) - 0.1 < measured) and np.all(measured < members.max(0) + 0.1), (members, measured)
    closest = np.abs(members - measured).max(1).min()
    assert closest < 0.25 and np.abs(1 - measured).max() > 2 * closest, (closest, measured)


def test_training_noise_is_white_without_a_fraction_and_above_max_t():
    shape = (6, 1, 4, 64, 64)
    max_t = round(MAX_T_FRACTION * 1000)
    t = torch.tensor([0, 50, max_t - 1, max_t, 700, 999])
    reference = torch.Generator().manual_seed(3)
    white = torch.randn(shape, generator=reference)
    # Fraction 0 draws exactly what white noise alone draws, so runs without the option are unchanged, later draws too.
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(training_noise(shape, t, 1000, generator, 0.0), white)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=reference))
    mixed = training_noise(shape, t, 1000, torch.Generator().manual_seed(3), 1.0)
    assert torch.equal(mixed[3:], white[3:])  # the higher timesteps stay white
    # ... also in a shorter schedule: the limit is a share of its timesteps
    assert torch.equal(training_noise(shape, t // 4, 250, torch.Generator().manual_seed(3), 1.0)[3:], white[3:])
    for noise, flat in ((mixed[:3], False), (white[:3], True)):  # below the limit: the texture, without low frequencies
        bands = _radial_power(noise.numpy(), BANDS)
        assert (bands[0] > 0.8 * bands.max()) == flat, bands
