"""Zero-shot tasks: DiffPIR and anomaly detection against a closed-form prior, and every task end to end
with the tiny network on a real CT crop through the command line."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from analytic_prior import AnalyticGaussian
from conftest import ABDOMEN_SMALL_NII, CHEST_NRRD
from MedDiffFMLib import cli
from MedDiffFMLib.conditioning import VolumeCondition
from MedDiffFMLib.errors import InputError, ResourceError
from MedDiffFMLib.io import Volume, read_volume, write_volume
from MedDiffFMLib.preprocess import unit_to_hu
from MedDiffFMLib.sampling import SlidingWindowSampler, window_grid
from MedDiffFMLib.tasks import common
from MedDiffFMLib.tasks.anomaly import detect_anomalies
from MedDiffFMLib.tasks.denoise import MAX_NOISE_HU, denoise, diffpir
from MedDiffFMLib.tasks.synthesis import synthesize

SHAPE = (24, 20, 18)
WINDOW = (-120.0, 240.0)  # the tiny preset's abdomen window


# --- DiffPIR with the analytic prior ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian_problem():
    """x0 ~ N(mu, 0.2^2) per voxel, y = x0 + 0.15 n, and a sliding-window sampler of the exact prior."""
    prior = AnalyticGaussian(std=0.2)
    g = torch.Generator().manual_seed(7)
    x0 = prior.mean_volume(SHAPE) + 0.2 * torch.randn((1, 1) + SHAPE, generator=g)
    y = x0 + 0.15 * torch.randn((1, 1) + SHAPE, generator=g)
    sampler = SlidingWindowSampler(prior, VolumeCondition(prior.cfg, SHAPE, (1, 1, 1), "abdomen"),
                                   prior.schedule, 16)
    return prior, x0, y, sampler


def mse(a, b):
    return float(((a - b) ** 2).mean())


def test_diffpir_one_step_is_the_posterior_mean(gaussian_problem):
    """Starting at sigma_bar = sigma_n from sqrt(abar) y, one optimal x0 prediction is E[x0 | y]."""
    prior, x0, y, sampler = gaussian_problem
    out, steps = diffpir(sampler, y, 0.15, nfe=1, seed=99)
    assert abs(steps[0] - 87) <= 1  # sigma_bar(87) ~ 0.15
    posterior_mse = 0.2 ** 2 * 0.15 ** 2 / (0.2 ** 2 + 0.15 ** 2)
    assert mse(out, x0) == pytest.approx(posterior_mse, rel=0.05)
    # Voxel by voxel: the start sqrt(abar) y holds y at the level sigma_bar(t_start), and the prior's x0 of it is
    # the posterior mean for that level, with no data step after it.
    mu, level = prior.mean_volume(SHAPE), float(prior.schedule.sigma_bar(steps[0])) ** 2
    torch.testing.assert_close(out, (mu + 0.2 ** 2 / (0.2 ** 2 + level) * (y - mu)).clamp(-1, 1), atol=1e-4, rtol=0)


def test_diffpir_reduces_error(gaussian_problem):
    _, x0, y, sampler = gaussian_problem
    noisy_mse = mse(y, x0)
    out, steps = diffpir(sampler, y, 0.15, nfe=10, lam=10, seed=99)
    assert len(steps) == 10
    assert mse(out, x0) < 0.8 * noisy_mse
    # Several stochastic runs (zeta > 0) spread, and their mean beats a single run.
    runs = [diffpir(sampler, y, 0.15, nfe=10, zeta=0.3, seed=200 + k)[0] for k in range(3)]
    assert float(torch.stack(runs).std(0).mean()) > 0.02
    assert mse(sum(runs) / 3, x0) < min(mse(r, x0) for r in runs)


def test_diffpir_takes_more_steps_for_more_noise(gaussian_problem):
    """Without an NFE, one step per STEP_SPACING timesteps of the start (at least MIN_NFE)."""
    from MedDiffFMLib.tasks.denoise import MIN_NFE, STEP_SPACING, automatic_nfe

    _, x0, y, sampler = gaussian_problem
    assert automatic_nfe(10) == MIN_NFE and automatic_nfe(STEP_SPACING * 6 - 1) == 6
    _, low = diffpir(sampler, y, 0.15, seed=99)
    _, high = diffpir(sampler, x0 + 0.45 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)),
                      0.45, seed=99)
    assert len(low) == automatic_nfe(low[0]) == MIN_NFE
    assert high[0] > 2 * STEP_SPACING * MIN_NFE and len(high) == automatic_nfe(high[0]) > MIN_NFE


def test_denoise_api_on_phantom_keeps_out_of_window_voxels(gaussian_problem):
    prior, x0, y, _ = gaussian_problem
    clean_hu = unit_to_hu(x0[0, 0].numpy(), WINDOW)
    noisy_hu = unit_to_hu(y[0, 0].numpy(), WINDOW)
    noisy_hu[:, :3] = -1000.0  # air outside the window: must come back unchanged
    noisy_hu[:, -3:] = 1200.0  # bone
    volume = Volume(noisy_hu.astype(np.float32), (0.8, 0.8, 2.0), (5.0, -3.0, 1.0))
    before = volume.array.copy()
    # The analytic prior is defined in [-1, 1] units of WINDOW, so give it exactly (automatic windows widen).
    result = denoise(volume, prior, noise_level=0.15 * 180.0, window=WINDOW, region="abdomen", seed=3, window_batch=3)
    assert np.array_equal(volume.array, before)  # input untouched
    out = result.denoised
    assert out.same_grid(volume) and out.array.dtype == np.float32
    assert np.array_equal(out.array[:, :3], noisy_hu[:, :3]) and np.array_equal(out.array[:, -3:], noisy_hu[:, -3:])
    inner = (slice(None), slice(6, -6))
    assert mse(out.array[inner], clean_hu[inner]) < 0.8 * mse(noisy_hu[inner], clean_hu[inner])
    assert result.window == WINDOW and result.uncertainty is None


def test_denoise_skips_windows_outside_its_window_and_gives_the_same_result(monkeypatch):
    """Windows wholly in air are not evaluated; with a pointwise prior the result is the all-window one."""
    prior = AnalyticGaussian(std=0.2)
    shape = (16, 48, 40)
    rng = np.random.default_rng(2)
    hu = (40.0 + 30.0 * rng.standard_normal(shape)).astype(np.float32)
    hu[:, 20:] = -1000.0  # air around the body: more than half the in-plane grid
    volume = Volume(hu, (0.8, 0.8, 2.0))
    calls = []
    exact = prior.forward
    prior.forward = lambda x, t, cond, region: (calls.append(len(x)), exact(x, t, cond, region))[1]
    settings = dict(noise_level=30.0, window=WINDOW, region="abdomen", nfe=3, seed=0)
    skipped = denoise(volume, prior, **settings).denoised.array
    evaluated = sum(calls)
    calls.clear()
    monkeypatch.setattr(SlidingWindowSampler, "active_windows", lambda self, needed: list(range(self.num_windows)))
    everything = denoise(volume, prior, **settings).denoised.array
    assert evaluated < 0.6 * sum(calls)
    assert np.array_equal(skipped[:, 22:], hu[:, 22:])
    np.testing.assert_allclose(skipped, everything, atol=1e-3)


def test_compiled_denoise_batches_are_balanced_over_its_larger_pass(monkeypatch):
    """A compiled network gets one batch shape. Denoising's two passes evaluate different sets of windows: the
    shape is balanced over the larger set, the wide pass's (balanced over the narrow pass's, the wide pass would take
    more, smaller calls). The result is that of the plain batches."""
    from MedDiffFMLib.tasks import common

    prior = AnalyticGaussian(std=0.2)
    shape = (16, 48, 40)
    hu = (40.0 + 30.0 * np.random.default_rng(2).standard_normal(shape)).astype(np.float32)
    hu[:, 24:] = -700.0  # lung: only in the wide pass's window, so the soft-tissue pass evaluates fewer windows
    volume = Volume(hu, (0.8, 0.8, 2.0))
    calls = []
    exact = prior.forward
    prior.forward = lambda x, t, cond, region: (calls.append(len(x)), exact(x, t, cond, region))[1]
    settings = dict(noise_level=30.0, window=(-1000.0, 400.0), soft_tissue_pass=True, region="chest", nfe=2,
                    window_batch=16)
    plain = denoise(volume, prior, **settings)
    monkeypatch.setattr(common, "is_compiled", lambda model: True)
    calls.clear()
    fixed = denoise(volume, prior, **settings)
    (wide, grid), (soft, _) = fixed.windows
    assert soft < wide == grid
    batch = math.ceil(wide / math.ceil(wide / 16))
    assert set(calls) == {batch}  # one shape
    per_step = [math.ceil(n / batch) * batch for n in (wide, soft)]
    assert sum(calls) == 2 * sum(per_step)  # nfe 2 per pass
    np.testing.assert_allclose(fixed.denoised.array, plain.denoised.array, atol=1e-4)


def test_window_size_changes_the_tiling_not_the_answer():
    """A larger sliding window (the --window-size option) tiles the grid with fewer, larger windows; with a
    pointwise prior whose mean depends on the global position the result is the same. A size the network
    cannot halve at every level is refused before any work."""
    prior = AnalyticGaussian(std=0.2)  # tiny preset: 16^3 training patch, 3 levels
    rng = np.random.default_rng(5)
    hu = (40.0 + 30.0 * rng.standard_normal((20, 40, 36))).astype(np.float32)
    hu[:, :2] = -1000.0  # a strip of air, as around a body
    volume = Volume(hu, (0.8, 0.8, 2.0))
    before = volume.array.copy()
    calls = []
    exact = prior.forward
    prior.forward = lambda x, t, cond, region: (calls.append(tuple(x.shape[-3:])), exact(x, t, cond, region))[1]
    settings = dict(noise_level=30.0, window=WINDOW, region="abdomen", nfe=3, seed=0, overlap=0.25)
    patch = denoise(volume, prior, **settings)
    assert set(calls) == {(16, 16, 16)}
    calls.clear()
    larger = denoise(volume, prior, window_size=24, **settings)
    assert set(calls) == {(24, 24, 24)}
    assert larger.windows[0][1] == len(window_grid(volume.shape, 24, 0.25)) < patch.windows[0][1]
    np.testing.assert_allclose(larger.denoised.array, patch.denoised.array, atol=1e-3)
    for bad in (18, 2, 0, 24.0, True):
        with pytest.raises(InputError, match="window size must be a whole multiple of 4"):
            denoise(volume, prior, window_size=bad, **settings)
    assert np.array_equal(volume.array, before)


def test_memory_estimate_and_check_follow_the_window(monkeypatch, caplog):
    """The estimate counts the window's network memory and pads short axes to it; the check before sampling
    uses the window asked for, and its message says a smaller window would fit."""
    from MedDiffFMLib.config import preset

    cfg, shape = preset("default"), (300, 512, 512)
    small, large = (common.estimate_memory(cfg, shape, 8, w)[1] for w in (32, 48))
    assert common.estimate_memory(cfg, shape, 8)[1] == small and large > (48 / 32) ** 3 * small
    assert common.estimate_memory(cfg, (20, 20, 20), 1, 48)[0] == 16 * 4 * 48 ** 3
    prior = AnalyticGaussian(std=0.2)  # tiny preset: 16^3 patch
    grid = (24, 24, 24)
    fits = sum(common.estimate_memory(prior.cfg, grid, 2))
    monkeypatch.setattr(common, "available_memory", lambda device: 2 * fits)
    assert common.make_sampler(prior, grid, (1, 1, 1), "abdomen", None, torch.device("cpu"), window_batch=2).window == 16
    with pytest.raises(ResourceError, match="a smaller window \\(--window-size; the default is the model's 16\\)"):
        common.make_sampler(prior, grid, (1, 1, 1), "abdomen", None, torch.device("cpu"), window_batch=2,
                            window_size=40)
    monkeypatch.setattr(common, "available_memory", lambda device: None)
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib"):
        common.make_sampler(prior, grid, (1, 1, 1), "abdomen", None, torch.device("cpu"), window_size=32)
    assert "window is larger than the grid" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib"):
        common.make_sampler(prior, (12, 24, 24), (1, 1, 1), "abdomen", None, torch.device("cpu"), window_size=20)
    assert "window is larger" not in caplog.text  # along z the model's own 16^3 window is mirrored too
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib"):
        common.make_sampler(prior, grid, (1, 1, 1), "abdomen", None, torch.device("cpu"), window_size=8)
    assert "smaller than the model's 16^3 training patch" in caplog.text


def test_a_masked_denoise_samples_a_box_of_at_least_one_window():
    """With a mask, the sampled box holds at least one window of the size asked for (the voxels outside the
    mask keep their input either way)."""
    prior = AnalyticGaussian(std=0.2)
    rng = np.random.default_rng(6)
    hu = (40.0 + 30.0 * rng.standard_normal((24, 48, 44))).astype(np.float32)
    hu[:, :2] = -1000.0
    volume = Volume(hu, (0.8, 0.8, 2.0))
    inside = np.zeros(volume.shape, np.uint8)
    inside[10:13, 20:24, 20:23] = 1
    settings = dict(noise_level=30.0, window=WINDOW, region="abdomen", nfe=2, seed=0, mask=volume.with_array(inside),
                    overlap=0.25)
    for size in (16, 24):  # the box: the mask grown by one window on every side, clamped to the volume
        box = [(max(0, lo - size), min(n, hi + size)) for lo, hi, n in zip((10, 20, 20), (13, 24, 23), volume.shape)]
        shape = [hi - lo for lo, hi in box]
        assert denoise(volume, prior, window_size=size, **settings).windows[0][1] == len(window_grid(shape, size, 0.25))


def test_denoise_inside_a_mask_only(monkeypatch):
    """A mask limits denoising to its voxels: the rest keeps the input exactly, only a box around it is sampled
    (not at the corner of the grid, so its global positions must be offset right), and inside it the result is
    the unmasked one (pointwise prior whose mean depends on the position). Bad masks are refused."""
    prior = AnalyticGaussian(std=0.2)
    shape = (16, 48, 40)
    rng = np.random.default_rng(4)
    hu = (40.0 + 30.0 * rng.standard_normal(shape)).astype(np.float32)
    hu[:, :, -2:] = -1000.0  # air, so the volume reads as CT
    volume = Volume(hu, (0.8, 0.8, 2.0))
    inside = np.zeros(shape, bool)
    inside[3:12, 33:43, 22:32] = True
    mask = volume.with_array(inside.astype(np.uint8))
    calls = []
    exact = prior.forward
    prior.forward = lambda x, t, cond, region: (calls.append(len(x)), exact(x, t, cond, region))[1]
    settings = dict(noise_level=30.0, window=WINDOW, region="abdomen", nfe=3, seed=0)
    masked = denoise(volume, prior, mask=mask, **settings)
    evaluated = sum(calls)
    calls.clear()
    unmasked = denoise(volume, prior, **settings)
    whole = unmasked.denoised.array
    assert evaluated < 0.5 * sum(calls) and masked.windows[0][1] < unmasked.windows[0][1]  # a smaller grid
    out = masked.denoised.array
    assert np.array_equal(out[~inside], hu[~inside])
    np.testing.assert_allclose(out[inside], whole[inside], atol=1e-3)
    assert np.abs(out[inside] - hu[inside]).mean() > 5.0
    # With the noise estimated, the whole image's level sets the start, as without a mask, even where the box
    # around the mask is quieter than most of the image.
    louder = hu.copy()
    louder[:, :30] += rng.normal(0.0, 60.0, louder[:, :30].shape).astype(np.float32)
    louder = volume.with_array(louder)
    estimated = dict(settings, noise_level=None, nfe=1)
    start = denoise(louder, prior, **estimated).t_start
    assert denoise(louder, prior, mask=mask, **estimated).t_start == start
    assert start > denoise(volume, prior, **estimated).t_start  # the louder part does set it
    # Two passes and two seeds: both passes stay inside the mask, and so does the spread over the seeds.
    two = denoise(volume, prior, mask=mask, soft_tissue_pass=True, seeds=2, **dict(settings, window=(-1000.0, 400.0)))
    assert len(two.windows) == 2 and all(0 < n < total for n, total in two.windows)
    assert np.array_equal(two.denoised.array[~inside], hu[~inside])
    assert not two.uncertainty.array[~inside].any() and two.uncertainty.array[inside].mean() > 0
    air = np.zeros(shape, np.uint8)
    air[:, :, -2:] = 1
    with pytest.raises(InputError, match="no voxel inside the denoising window"):
        denoise(volume, prior, mask=volume.with_array(air), **settings)
    with pytest.raises(InputError, match="empty"):
        denoise(volume, prior, mask=volume.with_array(np.zeros(shape, np.uint8)), **settings)
    with pytest.raises(InputError, match="grid"):
        denoise(volume, prior, mask=Volume(inside.astype(np.uint8), (1.0, 0.8, 2.0)), **settings)


def test_several_seeds_give_their_mean_and_sample_std(gaussian_problem):
    """seeds=3 is the mean of the three single-seed runs, and its uncertainty their sample std (n - 1), in HU."""
    prior, _, y, _ = gaussian_problem
    volume = Volume(unit_to_hu(y[0, 0].numpy(), WINDOW).astype(np.float32))
    settings = dict(noise_level=27.0, window=WINDOW, region="abdomen", nfe=3, zeta=0.3)
    three = denoise(volume, prior, seeds=3, seed=4, **settings)
    runs = np.stack([denoise(volume, prior, seed=4 + k, **settings).denoised.array for k in range(3)])
    np.testing.assert_allclose(three.denoised.array, runs.mean(0), atol=1e-3)
    np.testing.assert_allclose(three.uncertainty.array, runs.std(0, ddof=1), atol=1e-3)
    assert three.uncertainty.array.mean() > 1.0  # zeta 0.3 spreads them by HU, not by rounding


def test_automatic_window_makes_room_for_noisy_fat(gaussian_problem):
    """Voxels a little below the model's window (noisy fat) are denoised with the automatic window, which
    reaches one noise std lower, and left as they are with the same window given explicitly."""
    from MedDiffFMLib.tasks.denoise import FAT_MARGIN_NOISE_STDS

    prior = gaussian_problem[0]
    noise = 30.0
    rng = np.random.default_rng(0)
    hu = (40.0 + noise * rng.standard_normal(SHAPE)).astype(np.float32)
    hu[:, :, :9] = WINDOW[0] - 0.5 * FAT_MARGIN_NOISE_STDS * noise  # "fat": below the window, within the margin
    hu[:, :, -2:] = -1000.0  # air, so the volume reads as CT
    volume = Volume(hu)
    fat = (slice(None), slice(None), slice(2, 6))
    automatic = denoise(volume, prior, noise_level=noise, region="abdomen", seed=0).denoised.array
    explicit = denoise(volume, prior, noise_level=noise, window=WINDOW, region="abdomen", seed=0).denoised.array
    assert np.array_equal(explicit[fat], hu[fat])
    assert np.abs(automatic[fat] - hu[fat]).mean() > 1.0


def test_denoise_keeps_structures_one_voxel_wide_outside_its_window(gaussian_problem, caplog):
    """A calcification or gas bubble one voxel wide, smoothed, lies inside the window; the result never leaves the
    window, so it must not replace them (a 600 HU voxel came out at 229 HU)."""
    prior, x0, y, _ = gaussian_problem
    noisy_hu = unit_to_hu(y[0, 0].numpy(), WINDOW).astype(np.float32)
    clean_hu = unit_to_hu(x0[0, 0].numpy(), WINDOW)
    # 330 HU: more than 3 noise stds above the window's 240 HU, though less than the other tasks' 100 HU
    planted = {(12, 10, 9): 1000.0, (8, 6, 12): 600.0, (15, 13, 5): -900.0, (5, 4, 4): 330.0}
    for index, value in planted.items():
        noisy_hu[index] = value
    volume = Volume(noisy_hu)
    with caplog.at_level(logging.INFO):
        out = denoise(volume, prior, noise_level=27.0, window=WINDOW, region="abdomen", seed=3, overlap=0.99).denoised
    assert all(out.array[index] == value for index, value in planted.items())
    tissue = np.ones(SHAPE, bool)
    tissue[tuple(np.transpose(list(planted)))] = False
    assert mse(out.array[tissue], clean_hu[tissue]) < 0.8 * mse(noisy_hu[tissue], clean_hu[tissue])  # still denoised
    # whole voxels between windows: the overlap used, and the one asked for
    assert "(overlap 0.94, the nearest in whole voxels to 0.99)" in caplog.text


def test_denoise_soft_tissue_pass_only_inside_a_wider_window(gaussian_problem, caplog):
    prior, _, y, _ = gaussian_problem
    volume = Volume(unit_to_hu(y[0, 0].numpy(), WINDOW).astype(np.float32))
    settings = dict(noise_level=27.0, region="abdomen", seed=3, nfe=1, soft_tissue_pass=True)
    # a narrower window would be replaced wherever the soft-tissue pass applies: refused, not silently dropped
    with pytest.raises(InputError, match="the soft-tissue pass .* is not inside the first pass's window"):
        denoise(volume, prior, window=(-100.0, 100.0), **settings)
    with pytest.raises(InputError, match="not inside"):  # the abdomen's own window is narrower too
        denoise(volume, prior, **settings)
    with caplog.at_level(logging.INFO):  # a given window is used as given; the soft-tissue pass makes room for fat
        denoise(volume, prior, window=(-1000.0, 400.0), **settings)
        denoise(volume, prior, window=(-187.0, 400.0), **settings)  # the same lower edge is inside too
    assert "DiffPIR in [-1000, 400] HU" in caplog.text and "DiffPIR in [-187, 240] HU" in caplog.text
    # Automatic: a wide model window that does not hold the soft-tissue one gets no second pass, and no error.
    narrow_top = AnalyticGaussian(std=0.2, cfg=dataclasses.replace(prior.cfg, windows={**prior.cfg.windows,
                                                                                        "chest": (-1350.0, 150.0)}))
    alone = denoise(volume, narrow_top, noise_level=27.0, region="chest", seed=3, nfe=1)
    assert alone.soft_tissue_window is None and len(alone.windows) == 1


def test_denoise_with_a_huge_lambda_keeps_the_prior_estimate(gaussian_problem):
    """rho overflows float32 at lambda 1e39: the data step must still give x0, not inf / inf."""
    prior, _, y, _ = gaussian_problem
    volume = Volume(unit_to_hu(y[0, 0].numpy(), WINDOW).astype(np.float32))
    out = denoise(volume, prior, noise_level=27.0, window=WINDOW, region="abdomen", seed=3, lam=1e39).denoised
    assert np.isfinite(out.array).all()
    # The limit of ever larger lambdas: the prior's estimate (rho = 1e28 still fits float32).
    limit = denoise(volume, prior, noise_level=27.0, window=WINDOW, region="abdomen", seed=3, lam=1e30).denoised
    np.testing.assert_allclose(out.array, limit.array, atol=1e-3)
    assert not np.allclose(out.array, volume.array, atol=1.0)


def test_the_data_step_weighs_the_prior_estimate_by_rho_at_the_current_level(gaussian_problem, monkeypatch):
    """DiffPIR's proximal step (y + rho x0) / (1 + rho), rho = lambda sigma^2 / sigma_bar(t)^2 at the step's own t,
    and none at the last step."""
    prior, _, _, sampler = gaussian_problem
    given = {}

    def run(x_init, steps, seed, x0_transform, **kwargs):
        given["data_step"] = x0_transform
        return x_init

    monkeypatch.setattr(sampler, "run", run)
    y = torch.full((1, 1) + SHAPE, 0.5)
    diffpir(sampler, y, 0.1, lam=10.0, nfe=3, seed=0)
    x0 = torch.zeros_like(y)
    rho = 10.0 * 0.1 ** 2 / float(prior.schedule.sigma_bar(60)) ** 2
    torch.testing.assert_close(given["data_step"](x0, 60, 30), torch.full_like(y, 0.5 / (1 + rho)))
    assert given["data_step"](x0, 60, -1) is x0


def test_denoise_refuses_bad_settings(gaussian_problem):
    prior = gaussian_problem[0]
    flat = np.full(SHAPE, 40.0, np.float32)
    flat[:, :3] = -1000.0
    healthy = Volume(flat)  # soft tissue without any noise
    with pytest.raises(InputError, match="noise-free"):
        denoise(healthy, prior, region="abdomen")
    with pytest.raises(InputError, match="noise level"):
        denoise(healthy, prior, region="abdomen", noise_level=-5)
    with pytest.raises(InputError, match="region"):
        denoise(healthy, prior, region="pelvis", noise_level=10)


# --- anomaly detection with the analytic prior --------------------------------------------------------
def smooth_phantom():
    """Smooth tissue (the prior's mean) with an air border, and a copy with a +100 HU spherical lesion."""
    prior = AnalyticGaussian(std=0.02)
    hu = unit_to_hu(prior.mean_volume(SHAPE)[0, 0].numpy(), WINDOW).astype(np.float32)
    body = np.zeros(SHAPE, bool)
    body[2:-2, 2:-2, 2:-2] = True
    hu[~body] = -1000.0
    z, yy, xx = np.indices(SHAPE)
    lesion = (z - 12) ** 2 + (yy - 9) ** 2 + (xx - 8) ** 2 <= 9
    with_lesion = hu.copy()
    with_lesion[lesion] += 100.0
    spacing = (1.0, 1.0, 1.0)
    return prior, Volume(hu, spacing), Volume(with_lesion, spacing), lesion, Volume(body.astype(np.uint8), spacing)


def test_anomaly_map_highlights_inserted_lesion():
    prior, healthy, sick, lesion, body = smooth_phantom()
    result = detect_anomalies(sick, prior, mask=body, region="abdomen", seed=1, smoothing_sigma_mm=1.0)
    amap = result.anomaly_map.array
    assert result.anomaly_map.same_grid(sick) and np.all(amap[body.array == 0] == 0)
    outside = (body.array > 0) & ~lesion
    assert amap[lesion].mean() > 5 * amap[outside].mean()
    found = result.anomaly_mask.array > 0
    dice = 2 * np.count_nonzero(found & lesion) / (np.count_nonzero(found) + np.count_nonzero(lesion))
    assert dice > 0.5
    # The reconstruction is the healthy mean, and the healthy image scores lower.
    healthy_score = detect_anomalies(healthy, prior, mask=body, region="abdomen", seed=1).score
    assert result.score > 2 * healthy_score
    inside = body.array > 0
    assert np.abs(result.reconstruction.array[inside & ~lesion] - healthy.array[inside & ~lesion]).mean() < 5.0


def test_anomaly_map_threshold_and_score_follow_their_rules():
    """With a prior so narrow that its reconstruction is its mean, and no smoothing, the map is |CT - mean| in HU
    in the region (0 outside), the automatic threshold mean + 3 std of the map there, the score its highest value
    there."""
    prior, _, sick, _, body = smooth_phantom()
    prior.std = 1e-4
    noisy = sick.array + np.random.default_rng(0).normal(0.0, 10.0, SHAPE).astype(np.float32)
    noisy[body.array == 0] = -1000.0
    result = detect_anomalies(sick.with_array(noisy), prior, mask=body, region="abdomen", seed=1,
                              smoothing_sigma_mm=0.0)
    inside = body.array > 0
    mean_hu = unit_to_hu(prior.mean_volume(SHAPE)[0, 0].numpy(), WINDOW)
    expected = np.where(inside, np.abs(np.clip(noisy, *WINDOW) - mean_hu), 0.0)
    np.testing.assert_allclose(result.anomaly_map.array, expected, atol=0.05)
    values = result.anomaly_map.array[inside]
    assert result.threshold == pytest.approx(float(values.mean() + 3 * values.std()), rel=1e-5)
    assert result.score == pytest.approx(float(values.max()), rel=1e-5)
    np.testing.assert_array_equal(result.anomaly_mask.array, (expected > result.threshold) & inside)


def test_a_reconstruction_below_air_is_held_at_air_and_marks_no_lung():
    """The chest window reaches 400 HU below air. A prior whose mean lies there (every voxel at -1400 HU) must give a
    reconstruction no lower than the input's air, so lung (-850 HU) differs from it by 150 HU, not by 550."""
    prior = AnalyticGaussian(std=1e-4, mean_fn=lambda coords: torch.full_like(coords[:, :1], -1.0))
    lung = np.full(SHAPE, -850.0, np.float32)
    lung[:, :, :3] = -1000.0  # air beside the body: the input's lowest value
    result = detect_anomalies(Volume(lung), prior, mask=Volume(np.ones(SHAPE, np.uint8)), region="chest", seed=1,
                              smoothing_sigma_mm=0.0)
    np.testing.assert_allclose(result.reconstruction.array, -1000.0, atol=0.01)
    np.testing.assert_allclose(result.anomaly_map.array, np.where(lung > -1000.0, 150.0, 0.0), atol=0.05)


def test_smoothing_inside_the_region_keeps_a_constant_and_follows_the_spacing():
    from MedDiffFMLib.tasks.anomaly import smooth_inside

    inside = np.zeros((20, 20, 20), bool)
    inside[2:18, 2:18, 2:18] = True
    constant = smooth_inside(np.full(inside.shape, 7.0), inside, (1.0, 1.0, 1.0), 2.0)
    np.testing.assert_allclose(constant[inside], 7.0, rtol=1e-4)  # the border is not diluted by the outside
    assert not constant[~inside].any()
    spike = np.zeros(inside.shape)
    spike[10, 10, 10] = 1.0
    smoothed = smooth_inside(spike, np.ones_like(inside), (4.0, 1.0, 1.0), 2.0)  # 4 mm slices, 1 mm pixels
    assert smoothed[11, 10, 10] < 0.5 * smoothed[10, 10, 11]  # one slice is 4 mm away, one pixel 1 mm


def test_anomaly_detection_evaluates_only_the_windows_in_its_region(monkeypatch):
    """A small search region: only the windows holding part of it are evaluated, and the map is the all-window
    one (one step: every region voxel keeps all its windows, which the window-dependent term would show);
    outside those windows the reconstruction is the masked input (air)."""
    prior = AnalyticGaussian(std=0.02)
    shape = (16, 48, 40)
    hu = unit_to_hu(prior.mean_volume(shape)[0, 0].numpy(), WINDOW).astype(np.float32)
    region = np.zeros(shape, np.uint8)
    region[2:14, 4:14, 5:15] = 1
    hu[:, 40:] = -1000.0  # air, so the volume reads as CT
    volume, mask = Volume(hu), Volume(region)
    calls = []
    exact, c = prior.forward, prior.coord_channel

    def window_dependent(x, t, cond, region):
        calls.append(len(x))
        return exact(x, t, cond, region) + 0.05 * cond[:, c:c + 1].mean(dim=(2, 3, 4), keepdim=True)

    prior.forward = window_dependent
    skipped = detect_anomalies(volume, prior, mask=mask, region="abdomen", seed=1)
    evaluated = sum(calls)
    calls.clear()
    monkeypatch.setattr(SlidingWindowSampler, "active_windows", lambda self, needed: list(range(self.num_windows)))
    everything = detect_anomalies(volume, prior, mask=mask, region="abdomen", seed=1)
    assert evaluated < 0.5 * sum(calls)
    np.testing.assert_allclose(skipped.anomaly_map.array, everything.anomaly_map.array, atol=1e-3)
    assert skipped.score == pytest.approx(everything.score, abs=1e-3)
    assert np.all(skipped.reconstruction.array[:, 30:, 30:] == WINDOW[0])


def test_anomaly_threshold_override_and_bad_mask(caplog):
    prior, _, sick, _, body = smooth_phantom()
    high = detect_anomalies(sick, prior, mask=body, region="abdomen", threshold=1e6)
    assert high.threshold == 1e6 and high.anomaly_mask.array.sum() == 0
    for meaningless in (0.0, -3.0):  # the map is never negative: every voxel would be "anomalous"
        with pytest.raises(InputError, match="threshold must be above 0 HU"):
            detect_anomalies(sick, prior, mask=body, region="abdomen", threshold=meaningless)
    # A region of a few voxels is its own reference: the automatic threshold is refused as meaningless.
    few = np.zeros(body.shape, np.uint8)
    few[10, 10, 10:12] = 1
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib"):
        detect_anomalies(sick, prior, mask=body.with_array(few), region="abdomen")
    assert "only 2 voxels, too few for an automatic threshold" in caplog.text
    wrong_grid = Volume(body.array, (2.0, 1.0, 1.0))
    with pytest.raises(InputError, match="not on the grid"):
        detect_anomalies(sick, prior, mask=wrong_grid, region="abdomen")


# --- the tiny network end to end on real CT -----------------------------------------------------------
@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory):
    """A 32x32x20 (x, y, z) crop of the small abdomen CT (3 mm voxels), keeping its geometry."""
    image = sitk.ReadImage(str(ABDOMEN_SMALL_NII))[45:77, 0:32, 5:25]
    path = tmp_path_factory.mktemp("ct") / "crop.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_model():
    """The registered test model (tiny preset, briefly trained): an untrained MONAI UNet predicts eps = 0
    (zero-initialised output layer), which would hide conditioning mistakes."""
    return "tiny"


def run_cli(*args):
    return cli.main([str(a) for a in args])


def assert_same_geometry(path, reference):
    out, ref = read_volume(path), read_volume(reference)
    assert out.same_grid(ref), out.grid_differences(ref)
    assert np.all(np.isfinite(out.array))
    return out, ref


def test_denoise_cli_end_to_end(ct_crop, tiny_model, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out, std, png = tmp_path / "den.nii.gz", tmp_path / "den_std.nii.gz", tmp_path / "preview.png"
    code = run_cli("denoise", ct_crop, "-o", out, "--model", tiny_model, "--nfe", 2, "--seeds", 2,
                   "--progress", "machine", "--device", "cpu", "--preview", png, "--window-batch", 8)
    assert code == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("MEDDIFFFM_PROGRESS")]
    assert lines[-1] == "MEDDIFFFM_PROGRESS 4 4"
    assert "(overlap 0.25)" in caplog.text  # denoising's own default overlap when --overlap is not given
    den, ref = assert_same_geometry(out, ct_crop)
    from scipy import ndimage

    lo, hi = WINDOW
    # Voxels whose whole in-plane neighbourhood lies outside the window keep their input value exactly.
    box = (1, 9, 9)
    far_outside = (ndimage.maximum_filter(ref.array, box) < lo) | (ndimage.minimum_filter(ref.array, box) > hi)
    assert far_outside.any() and np.array_equal(den.array[far_outside], ref.array[far_outside])
    spread, _ = assert_same_geometry(std, ct_crop)
    assert spread.array.min() >= 0 and spread.array.max() > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --mask: only the labelled voxels change.
    ct = read_volume(ct_crop)
    inside = np.zeros(ct.shape, np.uint8)
    inside[5:15, 8:24, 8:24] = 1
    mask_path, masked = tmp_path / "mask.nii.gz", tmp_path / "masked.nii.gz"
    write_volume(ct.with_array(inside), mask_path)
    assert run_cli("denoise", ct_crop, "-o", masked, "--model", tiny_model, "--nfe", 2, "--mask", mask_path,
                   "--device", "cpu", "--window-batch", 8) == 0
    result = read_volume(masked).array
    assert np.array_equal(result[inside == 0], ct.array[inside == 0]) and not np.array_equal(result, ct.array)
    # Never onto the input, never over an existing file.
    assert run_cli("denoise", ct_crop, "-o", ct_crop, "--model", tiny_model) == 2
    assert run_cli("denoise", ct_crop, "-o", out, "--model", tiny_model) == 2
    assert "already exists" in capsys.readouterr().err


def test_window_size_option_reaches_every_sampling_command(ct_crop, tiny_model, tmp_path, capsys, caplog):
    """--window-size from the command line: the windows are that size, and a size the network cannot halve
    evenly is refused with a message and no output."""
    out = tmp_path / "lesion.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    ct = read_volume(ct_crop)
    inside = np.zeros(ct.shape, np.uint8)
    inside[8:12, 12:18, 12:18] = 1
    write_volume(ct.with_array(inside), mask)
    base = ("--model", tiny_model)  # the fine-tuned tasks use their registered tiny ControlNets by default
    commands = {
        "synthesize": ("synthesize", "--size", 24, 24, 20, "--region", "abdomen", "--nfe", 2, *base),
        "denoise": ("denoise", ct_crop, "--noise-level", 20, "--nfe", 2, *base),
        "inpaint": ("inpaint", ct_crop, "--mask", mask, "--resample", 1, "--nfe", 2, *base),
        "detect-anomalies": ("detect-anomalies", ct_crop, *base),
        "generate-lesion": ("generate-lesion", ct_crop, "--mask", mask, "--region", "chest", "--nfe", 2),
        "super-resolve": ("super-resolve", ct_crop, "--factor", 2, "--region", "chest", "--nfe", 1),
    }
    for name, command in commands.items():
        target = tmp_path / f"{name}.nii.gz"
        with caplog.at_level(logging.INFO, logger="MedDiffFMLib"):
            assert run_cli(*command, "-o", target, "--device", "cpu", "--window-size", 24,
                           "--progress", "none") == 0, name
        assert "windows of 24^3 voxels" in caplog.text, name
        caplog.clear()
    assert run_cli("synthesize", "--size", 24, 24, 20, "--region", "abdomen", "-o", out, "--model", tiny_model,
                   "--nfe", 2, "--device", "cpu", "--window-size", 18) == 2
    assert "window size must be a whole multiple of 4" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_network_denoises_like_the_plain_one(ct_crop, tiny_model, tmp_path):
    """--compile changes only the speed: same seed, same result up to float rounding of the fused kernels."""
    from torch._dynamo.utils import counters

    counters.clear()
    outputs = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / f"den{len(flags)}.nii.gz"
        assert run_cli("denoise", ct_crop, "-o", out, "--model", tiny_model, "--nfe", 2, "--device", "cpu",
                       "--window-batch", 5, "--progress", "none", *flags) == 0
        outputs[flags] = read_volume(out).array
    plain, compiled = outputs[()], outputs[("--compile",)]
    changed = np.abs(plain - read_volume(ct_crop).array).max()
    assert changed > 1.0  # the denoise did something the comparison can see
    np.testing.assert_allclose(compiled, plain, atol=0.01)
    assert counters["stats"]["unique_graphs"] == 1  # compiled, and once: 18 windows in batches of 5, last padded


def test_compile_without_a_compiler_is_refused_before_any_work(ct_crop, tiny_model, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    out = tmp_path / "den.nii.gz"
    assert run_cli("denoise", ct_crop, "-o", out, "--model", tiny_model, "--device", "cpu", "--compile") == 2
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err
    assert not out.exists()


def test_detect_anomalies_cli_end_to_end(ct_crop, tiny_model, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out, mask = tmp_path / "map.nii.gz", tmp_path / "mask.nrrd"
    code = run_cli("detect-anomalies", ct_crop, "-o", out, "--mask-output", mask, "--model", tiny_model,
                   "--device", "cpu", "--progress", "none", "--region", "abdomen", "--overlap", 0.4)
    assert code == 0
    captured = capsys.readouterr()
    assert "(overlap 0.38, the nearest in whole voxels to 0.4)" in caplog.text  # 16^3 windows, 10 voxels apart
    summary = json.loads(captured.out.strip().splitlines()[-1])
    amap, _ = assert_same_geometry(out, ct_crop)
    labels, _ = assert_same_geometry(mask, ct_crop)
    assert amap.array.min() >= 0 and summary["score_hu"] > 0
    assert set(np.unique(labels.array)) <= {0, 1}
    assert summary["anomalous_voxels"] == int(labels.array.sum())
    assert summary["score_hu"] == pytest.approx(float(amap.array.max()), rel=1e-5)  # the image score: the map's peak
    volume_ml = summary["anomalous_voxels"] * float(np.prod(amap.spacing)) / 1000
    assert (f"image score {summary['score_hu']:g} HU (the map's highest value); threshold "
            f"{summary['threshold_hu']:g} HU; {summary['anomalous_voxels']} voxels ({volume_ml:.2f} mL) above it"
            in caplog.text)


def test_detect_anomalies_logs_a_small_threshold_as_given(ct_crop, tiny_model, tmp_path, capsys, caplog):
    """The summary line rounded the threshold to whole HU: --threshold 0.0004 was logged as 'threshold 0 HU', a value
    the command refuses, beside the JSON's 0.0004."""
    caplog.set_level(logging.INFO)
    assert run_cli("detect-anomalies", ct_crop, "-o", tmp_path / "map.nii.gz", "--model", tiny_model, "--device",
                   "cpu", "--progress", "none", "--region", "abdomen", "--threshold", "0.0004") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threshold_hu"] == 0.0004
    assert "; threshold 0.0004 HU; " in caplog.text


def test_synthesize_cli_end_to_end(ct_crop, tiny_model, tmp_path):
    out = tmp_path / "synth.nii.gz"
    assert run_cli("synthesize", "--reference", ct_crop, "-o", out, "--model", tiny_model, "--nfe", 3,
                   "--device", "cpu", "--progress", "none", "--region", "abdomen") == 0
    synth, _ = assert_same_geometry(out, ct_crop)
    lo, hi = WINDOW
    assert synth.array.min() >= lo - 1e-3 and synth.array.max() <= hi + 1e-3
    sized = tmp_path / "sized.nrrd"
    assert run_cli("synthesize", "--size", 20, 17, 9, "--spacing", 1.5, 1.5, 3, "-o", sized, "--model",
                   tiny_model, "--nfe", 2, "--device", "cpu", "--progress", "none", "--region", "chest") == 0
    vol = read_volume(sized)
    assert vol.shape == (9, 17, 20) and vol.spacing == pytest.approx((1.5, 1.5, 3.0))
    assert vol.array.min() >= -1024.0  # air as a scanner stores it, not the chest window's -1400 HU edge
    assert run_cli("synthesize", "-o", tmp_path / "x.nii.gz", "--model", tiny_model, "--size", 20, 20, 20) == 2
    # a grid every input CT would be refused for (100 mm slices under 1 mm pixels) is refused as a request too
    assert run_cli("synthesize", "--size", 20, 20, 20, "--spacing", 1, 1, 100, "-o", tmp_path / "flat.nii.gz",
                   "--model", tiny_model, "--region", "chest") == 2
    labels = Volume(np.ones((20, 20, 20), np.uint8), (1.0, 1.0, 100.0))  # the same grid from a label map
    write_volume(labels, tmp_path / "flat_labels.nii.gz")
    assert run_cli("synthesize", "--anatomy", tmp_path / "flat_labels.nii.gz", "-o", tmp_path / "flat.nii.gz",
                   "--model", tiny_model, "--region", "chest") == 2
    assert not (tmp_path / "flat.nii.gz").exists()


def test_more_evaluations_than_timesteps_use_each_once_and_say_so(caplog):
    from MedDiffFMLib.diffusion import Schedule

    with caplog.at_level(logging.WARNING):
        assert common.sampling_steps(15, Schedule.cosine(10)) == list(range(9, -1, -1))
    assert "15 network evaluations asked for, but the model has 10 timesteps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(common.sampling_steps(10, Schedule.cosine(10))) == 10
    assert not caplog.records


def test_synthesize_from_anatomy_map(ct_crop, tiny_model, tmp_path):
    """An anatomy label map gives the grid and conditions the network (same seed, different result)."""
    from MedDiffFMLib.anatomy import threshold_anatomy
    from MedDiffFMLib.io import write_volume

    ct = read_volume(ct_crop)
    labels_path = write_volume(ct.with_array(threshold_anatomy(ct)), tmp_path / "anatomy.nrrd")
    with_anatomy, without = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    common_args = ["--model", tiny_model, "--nfe", 2, "--device", "cpu", "--progress", "none", "--region", "abdomen"]
    assert run_cli("synthesize", "--anatomy", labels_path, "-o", with_anatomy, *common_args) == 0
    assert run_cli("synthesize", "--size", 32, 32, 20, "--spacing", *ct.spacing, "-o", without, *common_args) == 0
    synth, _ = assert_same_geometry(with_anatomy, ct_crop)
    assert not np.allclose(synth.array, read_volume(without).array)


def test_tiny_model_denoises_real_ct(ct_crop, tiny_model):
    """30 HU of added noise on the real crop: the estimate sees it, and the (barely trained) tiny model
    still brings the error against the original down inside the window."""
    from MedDiffFMLib.checkpoints import load_model

    model, _, _ = load_model(tiny_model)
    clean = read_volume(ct_crop)
    noisy = clean.with_array(clean.array + np.random.default_rng(0).normal(0, 30, clean.shape).astype(np.float32))
    result = denoise(noisy, model, nfe=2, region="abdomen", window_batch=8, seed=1)
    assert 28.0 < result.noise_hu < 40.0 and result.noise_estimate is not None
    assert result.t_start > 50 and result.steps[-1] == 0
    inside = (clean.array > WINDOW[0] + 20) & (clean.array < WINDOW[1] - 20)
    rmse = lambda image: float(np.sqrt(((image - clean.array)[inside] ** 2).mean()))  # noqa: E731
    assert rmse(result.denoised.array) < 0.85 * rmse(noisy.array)


def test_tasks_are_seeded(ct_crop, tiny_model):
    from MedDiffFMLib.checkpoints import load_model

    model, _, _ = load_model(tiny_model)
    volume = read_volume(ct_crop)
    runs = [synthesize(model, "abdomen", size_xyz=(18, 16, 16), spacing_xyz=(1, 1, 1), nfe=2, seed=s).array
            for s in (4, 4, 5)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    maps = [detect_anomalies(volume, model, region="abdomen", seed=s).anomaly_map.array for s in (1, 1, 2)]
    assert np.array_equal(maps[0], maps[1]) and not np.array_equal(maps[0], maps[2])


def test_memory_check_refuses_what_cannot_fit(monkeypatch):
    from MedDiffFMLib.config import preset

    monkeypatch.setattr(common, "available_memory", lambda device: 2 ** 30)
    with pytest.raises(ResourceError, match="window batch"):
        common.check_memory(preset("paper"), (200, 512, 512), 8, torch.device("cpu"))
    common.check_memory(preset("tiny"), (20, 32, 32), 4, torch.device("cpu"))
    # A window batch beyond the grid's windows is never filled, so it is not budgeted: a small crop still runs.
    prior = AnalyticGaussian()
    sampler = common.make_sampler(prior, (16, 32, 32), (1.0, 1.0, 1.0), "abdomen", None, torch.device("cpu"),
                                  overlap=0.5, window_batch=10 ** 7)
    assert sampler.batch_size == sampler.num_windows == 9


def test_default_window_batch_is_small_on_cpu_and_fits_the_gpu(monkeypatch):
    from MedDiffFMLib.config import preset

    cfg, shape, gpu = preset("default"), (300, 512, 512), torch.device("cuda")
    assert common.default_window_batch(cfg, shape, torch.device("cpu")) == common.CPU_WINDOW_BATCH
    volume_bytes, per_window = common.estimate_memory(cfg, shape, 1)
    monkeypatch.setattr(common, "available_memory", lambda device: 2 ** 40)
    assert common.default_window_batch(cfg, shape, gpu) == common.GPU_WINDOW_BATCH
    # Room for the volume and 40 windows in half the free memory: the largest power of two that fits is 32.
    monkeypatch.setattr(common, "available_memory", lambda device: 2 * (volume_bytes + 40 * per_window))
    assert common.default_window_batch(cfg, shape, gpu) == 32
    monkeypatch.setattr(common, "available_memory", lambda device: volume_bytes)
    assert common.default_window_batch(cfg, shape, gpu) == 1  # and check_memory then explains what to do
    # The whole-volume condition stack is a GPU-only choice, sized from the same free-memory reading.
    assert common.volume_condition_budget(torch.device("cpu")) == 0
    monkeypatch.setattr(common, "available_memory", lambda device: 3 * 2 ** 30)
    assert common.volume_condition_budget(gpu) == 2 ** 30


def test_sampler_on_a_sub_box_uses_whole_volume_positions(gaussian_problem):
    """A condition for a box of a larger volume (as lesion inpainting uses): with a position-dependent
    pointwise model, the box's noise estimate equals the whole volume's estimate cut to the box."""
    prior, _, y, whole = gaussian_problem
    box = (slice(4, 21), slice(2, 19), slice(1, 17))
    box_shape = tuple(s.stop - s.start for s in box)
    cond = VolumeCondition(prior.cfg, box_shape, (1, 1, 1), "abdomen", offset_zyx=[s.start for s in box],
                           full_shape_zyx=SHAPE)
    sampler = common.make_sampler(prior, box_shape, (1, 1, 1), "abdomen", None, torch.device("cpu"), cond=cond)
    torch.testing.assert_close(sampler.eps(y[(0, 0) + box][None, None], 300), whole.eps(y, 300)[(0, 0) + box][None, None],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        common.make_sampler(prior, SHAPE, (1, 1, 1), "abdomen", None, torch.device("cpu"), cond=cond)


def test_chest_soft_tissue_pass_overrides_the_wide_pass_inside_its_window(tiny_model):
    """Chest: the model's 1800 HU window gets a second pass in [-160, 240] HU that wins inside that window
    (with the edge blend); lungs keep the wide pass. Checked against the two single passes run separately."""
    from MedDiffFMLib.checkpoints import load_model
    from MedDiffFMLib.tasks.common import window_weight
    from MedDiffFMLib.tasks.denoise import KEEP_BEYOND_NOISE_STDS, SOFT_TISSUE_WINDOW_HU

    model, _, _ = load_model(tiny_model)
    clean = Volume.from_sitk(read_volume(CHEST_NRRD).to_sitk()[188:220, 232:264, 20:30], dtype=np.float32)
    noise = np.random.default_rng(0).normal(0, 40, clean.shape).astype(np.float32)
    crop = clean.with_array(clean.array + noise)  # lung and mediastinum
    settings = dict(noise_level=40.0, nfe=2, region="chest", seed=1, window_batch=8)
    both = denoise(crop, model, **settings)
    # Automatic NFE: the narrow pass starts at a higher timestep than the wide one, so it takes more steps, and
    # progress still counts steadily up to one total over both passes.
    calls = []
    automatic = denoise(crop, model, **{**settings, "nfe": None}, progress=lambda i, n: calls.append((i, n)))
    assert len({n for _, n in calls}) == 1 and [i for i, _ in calls] == list(range(1, calls[-1][1] + 1))
    assert calls[-1][1] > 2 * len(automatic.steps)  # wide pass's steps (reported) + more for the narrow one
    wide = denoise(crop, model, soft_tissue_pass=False, **settings).denoised.array
    # Automatic windows reach one noise std lower (FAT_MARGIN_NOISE_STDS = 1); given explicitly: one pass.
    soft_window = (SOFT_TISSUE_WINDOW_HU[0] - 40.0, SOFT_TISSUE_WINDOW_HU[1])
    soft = denoise(crop, model, window=soft_window, **settings).denoised.array
    assert both.soft_tissue_window == SOFT_TISSUE_WINDOW_HU and both.window == (-1400, 400)
    w = window_weight(crop.array, soft_window, KEEP_BEYOND_NOISE_STDS * 40.0)
    assert 0.05 < (w == 1).mean() < 0.95  # the crop really has both lung and soft tissue
    # Single passes: wide = x + w_wide (m_wide - x), soft = x + w (m_soft - x); combined = wide + w (m_soft - wide).
    expected = wide + (soft - crop.array) - w * (wide - crop.array)
    assert np.allclose(both.denoised.array, expected, atol=1e-2)
    assert not np.allclose(both.denoised.array, wide, atol=1.0)


def test_denoising_never_leaves_the_inputs_range_of_values(gaussian_problem):
    """The highest noise level moves the automatic window's lower edge far below the input's darkest voxels (here
    -500 HU); the result must still not hold values below them (or above its brightest voxel)."""
    prior = gaussian_problem[0]
    rng = np.random.default_rng(1)
    hu = (40.0 + 30.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    hu[:, :, -2:] = -500.0
    result = denoise(Volume(hu), prior, noise_level=MAX_NOISE_HU, region="abdomen", seed=0)
    assert hu.min() <= result.denoised.array.min() and result.denoised.array.max() <= hu.max()


def test_anomaly_search_warns_when_the_body_mask_leaves_out_tissue(chest_nodule_crop, caplog):
    """A crop around a lung nodule: the lungs reach the crop's edges, so the body mask does not enclose them and
    they are not searched (a nodule in them would not be either); the user is told to give the region. A whole scan
    gets no such warning."""
    from MedDiffFMLib.checkpoints import load_model

    model = load_model("tiny")[0]
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib"):
        detect_anomalies(read_volume(ABDOMEN_SMALL_NII), model, region="abdomen", window_batch=8)
        assert "leaves out" not in caplog.text
        result = detect_anomalies(chest_nodule_crop[0], model, region="chest", window_batch=8)
    assert "the search region (the body: the voxels the anatomy map labels) leaves out" in caplog.text
    assert result.region_mask.array.mean() < 0.85  # what the warning is about


@pytest.mark.parametrize("task", ["denoise", "detect-anomalies", "inpaint", "super-resolve"])
def test_every_task_tells_the_network_the_voxel_spacing_in_z_y_x(task, chest_nodule_crop, tiny_base, monkeypatch):
    """On the 5 x 0.57 x 0.57 mm chest crop, the spacing channels hold log2 of (z, y, x) spacing: the CT's, or for
    super-resolution the thin grid's."""
    from MedDiffFMLib.finetune import ControlledNet
    from MedDiffFMLib.tasks.inpaint import inpaint
    from MedDiffFMLib.tasks.super_resolution import super_resolve

    image, nodule = chest_nodule_crop
    seen = []
    forward = tiny_base.forward
    monkeypatch.setattr(tiny_base, "forward", lambda x, t, cond, region, **kwargs: (
        seen.append(cond[:, -3:].amin(dim=(0, 2, 3, 4))), forward(x, t, cond, region, **kwargs))[1])
    spacing = image.spacing_zyx
    if task == "denoise":
        denoise(image, tiny_base, noise_level=20.0, nfe=1, region="chest")
    elif task == "detect-anomalies":
        detect_anomalies(image, tiny_base, region="chest", mask=image.with_array(np.ones(image.shape, np.uint8)))
    elif task == "inpaint":
        inpaint(image, nodule, tiny_base, nfe=1, resample=1, region="chest")
    else:
        super_resolve(image, ControlledNet(tiny_base, "super-resolution").eval(), factor=5, nfe=1, region="chest")
        spacing = (spacing[0] / 5,) + tuple(spacing[1:])
    assert seen and all(torch.equal(s, seen[0]) for s in seen)
    torch.testing.assert_close(seen[0], torch.log2(torch.tensor(spacing, dtype=torch.float32)))
