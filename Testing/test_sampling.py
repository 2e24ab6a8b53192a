"""Sliding-window sampler: window placement, averaging, and sampling against a closed-form Gaussian prior."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analytic_prior import AnalyticGaussian
from MedDiffFMLib import diffusion
from MedDiffFMLib.conditioning import VolumeCondition
from MedDiffFMLib.errors import Cancelled, ResourceError
from MedDiffFMLib.sampling import (WINDOW_WEIGHT_FLOOR, SlidingWindowSampler, window_count, window_grid,
                                   window_starts, window_weights)

SHAPE = (24, 20, 18)
STD = 0.2


@pytest.fixture(scope="module")
def prior():
    return AnalyticGaussian(std=STD)


def make_sampler(model, window, shape=SHAPE, overlap=0.5, batch_size=4, fixed_batch=False):
    cond = VolumeCondition(model.cfg, shape, (1.0, 1.0, 1.0), "abdomen")
    return SlidingWindowSampler(model, cond, model.schedule, window, overlap=overlap, batch_size=batch_size,
                                fixed_batch=fixed_batch)


def sample(sampler, nfe, eta, seed=1):
    x_init = torch.randn((1, 1) + sampler.shape, generator=torch.Generator().manual_seed(seed))
    return sampler.run(x_init, diffusion.timesteps(nfe, 999), seed=seed + 100, eta=eta)


def exact_chain_std(schedule, std, steps, eta):
    """Std of the samples the discretised sampler should give for the Gaussian prior: every step is
    x_prev = k x_t + (terms in mu) + s z with the optimal denoiser, so Var_prev = k^2 Var_t + s^2."""
    var = 1.0
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        a_t = float(schedule.abar(t))
        # Optimal x0 for mu = 0: x0 = x_t sqrt(a) std^2 / (a std^2 + 1 - a); the update is linear in x_t.
        def step(x_t_value, noise_value):
            x_t = torch.full((1,), x_t_value)
            x0 = x_t * math.sqrt(a_t) * std ** 2 / (a_t * std ** 2 + 1 - a_t)
            return float(diffusion.reverse_step(schedule, x_t, t, t_prev, x0, eta=eta,
                                                noise=torch.full((1,), noise_value)))
        k = step(1.0, 0.0) - step(0.0, 0.0)
        s = step(0.0, 1.0) - step(0.0, 0.0) if t_prev >= 0 and eta > 0 else 0.0
        var = k ** 2 * var + s ** 2
    return math.sqrt(var)


@pytest.mark.parametrize("size", [8, 15, 16, 17, 33, 47])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_windows_cover_every_voxel(size, overlap):
    window = 16
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert all(s + window <= max(size, window) for s in starts)
    covered = np.zeros(size, int)
    for s in starts:
        covered[s:s + window] += 1
    assert covered.min() >= 1
    if size > window:
        assert starts[-1] == size - window  # flush with the end
        assert np.diff(starts).max() <= round(window * (1 - overlap))
    assert len(window_grid((size, 17, 9), window, overlap)) == len(starts) * len(window_starts(17, 16, overlap))
    assert window_count((size, 17, 9), window, overlap) == len(window_grid((size, 17, 9), window, overlap))


def test_noise_estimates_are_averaged_over_windows():
    """A model whose answer depends on the window (its mean z coordinate): each voxel must get the
    Gaussian-weighted mean over exactly the windows that contain it."""
    base = AnalyticGaussian()
    c = base.coord_channel

    def window_mean_z(x_t, t, cond, region):
        return cond[:, c:c + 1].mean(dim=(2, 3, 4), keepdim=True).expand_as(x_t)

    shape = (37, 17, 16)
    sampler = make_sampler(base, 16, shape=shape, overlap=0.5, batch_size=3)
    sampler.model_fn = window_mean_z
    eps = sampler.eps(torch.zeros((1, 1) + shape), 500)[0, 0]
    total, weight_sum = np.zeros(shape), np.zeros(shape)
    z = np.linspace(-1, 1, shape[0])
    weights = window_weights(16).numpy()
    assert weights[8, 8, 8] > 0.9 and weights[0, 0, 0] == pytest.approx(WINDOW_WEIGHT_FLOOR ** 3)
    for start in window_grid(shape, 16, 0.5):
        box = tuple(slice(a, a + 16) for a in start)
        total[box] += z[start[0]:start[0] + 16].mean() * weights
        weight_sum[box] += weights
    np.testing.assert_allclose(eps.numpy(), total / weight_sum, atol=1e-6)


def test_window_border_errors_do_not_print_a_grid():
    """A network that errs only in the outer 2-voxel shell of its window (as convolutions with zero
    padding do): a plain mean leaves up to 0.875 of it on window boundaries inside the volume (measured);
    the Gaussian weights must keep it below 0.03 away from the volume's own border."""
    base = AnalyticGaussian()

    def border_error(x_t, t, cond, region):
        error = torch.ones_like(x_t)
        error[..., 2:-2, 2:-2, 2:-2] = 0.0
        return error

    shape = (40, 40, 40)
    sampler = make_sampler(base, 16, shape=shape, overlap=0.5)
    sampler.model_fn = border_error
    eps = sampler.eps(torch.zeros((1, 1) + shape), 500)[0, 0]
    interior = eps[4:-4, 4:-4, 4:-4]
    assert float(interior.max()) < 0.03
    assert float(eps.max()) == pytest.approx(1.0)  # volume corners are seen only by a window's shell


def test_sliding_window_equals_full_volume(prior):
    """With a pointwise (position-dependent) model, window averaging must reproduce the one-window result."""
    x_t = torch.randn((1, 1) + SHAPE, generator=torch.Generator().manual_seed(0))
    windowed, full = make_sampler(prior, 16), make_sampler(prior, 24)
    assert windowed.num_windows == 8 and full.num_windows == 1
    torch.testing.assert_close(windowed.eps(x_t, 700), full.eps(x_t, 700), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample(windowed, 20, 1.0), sample(full, 20, 1.0), atol=1e-4, rtol=1e-4)


def test_fixed_batch_pads_the_last_batch_and_drops_its_copies(prior):
    """For a compiled network every call must have the full batch shape; the padding must not change eps."""
    x_t = torch.randn((1, 1) + SHAPE, generator=torch.Generator().manual_seed(0))
    plain, fixed = make_sampler(prior, 16, batch_size=3), make_sampler(prior, 16, batch_size=3, fixed_batch=True)
    sizes = {}
    for name, sampler in (("plain", plain), ("fixed", fixed)):
        def recording(x, t, cond, region, name=name):
            sizes.setdefault(name, []).append(x.shape[0])
            return prior(x, t, cond, region)
        sampler.model_fn = recording
    assert plain.num_windows == 8  # batches of 3, 3, 2
    torch.testing.assert_close(fixed.eps(x_t, 700), plain.eps(x_t, 700), atol=1e-6, rtol=1e-6)
    assert sizes == {"plain": [3, 3, 2], "fixed": [3, 3, 3]}
    # Evaluating a subset of the windows: the padded call still has the full shape.
    sizes.clear()
    fixed.eps(x_t, 700, windows=[6])
    assert sizes == {"fixed": [3]}
    # The batch is balanced over the first windows evaluated and never exceeds them (a GPU's 256 on a small box would
    # be mostly copies); later calls keep that one shape.
    for batch_size, first, expected in [(5, None, 4), (256, None, 8), (256, [1, 2, 5], 3), (2, [1, 2, 5], 2)]:
        sampler = make_sampler(prior, 16, batch_size=batch_size, fixed_batch=True)
        sampler.model_fn = lambda x, t, cond, region: (seen.append(x.shape[0]), prior(x, t, cond, region))[1]
        seen = []
        sampler.eps(x_t, 700, windows=first)
        assert sampler.batch_size == expected and set(seen) == {expected}
        sampler.eps(x_t, 700)
        assert set(seen) == {expected}


def test_ddpm_reproduces_gaussian_prior(prior):
    """Ancestral DDPM over all 1000 steps, sliding windows: samples have the prior's mean and std."""
    residual = sample(make_sampler(prior, 16), 1000, 1.0) - prior.mean_volume(SHAPE)
    assert abs(float(residual.mean())) < 0.01
    assert float(residual.std()) == pytest.approx(STD, rel=0.03)


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("window", [16, 24])
def test_strided_sampling_matches_exact_moments(prior, eta, window):
    """50 strided steps (ancestral and DDIM): mean mu and the std the discretised chain must give."""
    steps = diffusion.timesteps(50, 999)
    residual = sample(make_sampler(prior, window), 50, eta) - prior.mean_volume(SHAPE)
    expected = exact_chain_std(prior.schedule, STD, steps, eta)
    assert 0.15 < expected < 0.2  # strided sampling is under-dispersed, and the test must see it
    assert abs(float(residual.mean())) < 0.01
    assert float(residual.std()) == pytest.approx(expected, rel=0.03)


def test_volume_smaller_than_window_is_padded_and_cropped(prior):
    shape = (9, 20, 13)
    sampler = make_sampler(prior, 16, shape=shape)
    assert sampler.padded_shape == (16, 20, 16)
    x_t = torch.randn((1, 1) + shape, generator=torch.Generator().manual_seed(3))
    eps = sampler.eps(x_t, 300)
    assert eps.shape == (1, 1) + shape
    # The model is pointwise, so padding must not change the answer on the real voxels.
    expected = prior(x_t, torch.tensor([300]), VolumeCondition(prior.cfg, shape, (1, 1, 1), "abdomen")
                     .window((0, 0, 0), shape)[None], torch.tensor([2]))
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_seeded_and_reproducible(prior):
    sampler = make_sampler(prior, 16)
    a, b, c = sample(sampler, 10, 1.0, seed=5), sample(sampler, 10, 1.0, seed=5), sample(sampler, 10, 1.0, seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_progress_and_cancel(prior):
    sampler = make_sampler(prior, 16)
    seen = []
    sample_steps = diffusion.timesteps(7, 999)
    sampler.run(torch.zeros((1, 1) + SHAPE), sample_steps, seed=0, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 7) for i in range(1, 8)]

    def cancel(i, n):
        if i == 2:
            raise Cancelled("stop")
    with pytest.raises(Cancelled):
        sampler.run(torch.zeros((1, 1) + SHAPE), sample_steps, seed=0, progress=cancel)


def test_the_data_step_hook_is_called_with_each_step(prior):
    sampler = make_sampler(prior, 16)
    calls = []

    def x0_transform(x0, t, t_prev):
        calls.append((t, t_prev))
        return torch.zeros_like(x0)
    out = sampler.run(torch.randn((1, 1) + SHAPE), [20, 10, 0], seed=0, x0_transform=x0_transform)
    assert calls == [(20, 10), (10, 0), (0, -1)]
    assert torch.equal(out, torch.zeros_like(out))  # the last update returns the transformed x0


def test_out_of_memory_halves_window_batch(prior):
    calls = []

    def picky(x_t, t, cond, region):
        calls.append(x_t.shape[0])
        if x_t.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return prior(x_t, t, cond, region)

    x_t = torch.randn((1, 1) + SHAPE, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(prior, 16, batch_size=8)
    sampler.model_fn = picky
    torch.testing.assert_close(sampler.eps(x_t, 400), make_sampler(prior, 16).eps(x_t, 400))
    assert sampler.batch_size == 2 and calls[:2] == [8, 4]

    def never(x_t, t, cond, region):
        raise torch.cuda.OutOfMemoryError("simulated")
    sampler.model_fn = never
    with pytest.raises(ResourceError, match="window batch size 1"):
        sampler.eps(x_t, 400)


def test_short_axes_are_mirror_tiled():
    from MedDiffFMLib.sampling import mirror_pad

    x = torch.arange(5.0).reshape(1, 1, 5, 1, 1)
    padded = mirror_pad(x, (12, 3, 1))
    assert padded.shape == (1, 1, 12, 3, 1)
    # 7 voxels added, 3 before: the original sits in the middle, where a window is most reliable.
    assert padded[0, 0, :, 0, 0].tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]
    assert torch.equal(padded[0, 0, :, 2, 0], padded[0, 0, :, 0, 0])  # a single voxel repeats


def test_condition_is_the_same_however_it_is_stored(monkeypatch):
    """Per-window cache, whole-volume stack (the GPU path, forced here) and on-demand windows feed the
    network identical conditions, a short mirror-tiled axis and anatomy labels included."""
    from MedDiffFMLib import sampling

    base = AnalyticGaussian()
    shape = (26, 20, 10)  # x is shorter than the window
    labels = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    cond = VolumeCondition(base.cfg, shape, (1.0, 1.5, 2.0), "chest", anatomy_labels=labels)
    channels = cond.window((0, 0, 0), (1, 1, 1)).shape[0]
    mix = torch.randn(1, channels, 1, 1, 1, generator=torch.Generator().manual_seed(1))

    def eps_of_condition(x_t, t, c, region):
        return (c * mix).sum(dim=1, keepdim=True)

    def eps(cache_bytes, volume_budget):
        monkeypatch.setattr(sampling, "CONDITION_CACHE_BYTES", cache_bytes)
        sampler = SlidingWindowSampler(eps_of_condition, cond, base.schedule, 16, overlap=0.5, batch_size=3,
                                       volume_condition_bytes=volume_budget)
        stored = "windows" if sampler._cond_cache else "volume" if sampler._cond_volume is not None else "none"
        return stored, sampler.eps(torch.zeros((1, 1) + shape), 100)

    (a, windows), (b, volume), (c, on_demand) = eps(2 ** 40, 0), eps(0, 2 ** 40), eps(0, 0)
    assert (a, b, c) == ("windows", "volume", "none")
    assert float(windows.std()) > 0.1  # the condition really varies over the volume
    assert torch.equal(volume, windows) and torch.equal(on_demand, windows)


def test_active_windows_are_the_windows_whose_box_holds_a_needed_voxel(prior):
    """The per-axis reduction picks exactly the windows a box-by-box search picks: random sparse masks, a grid whose
    last windows sit flush with the end (uneven steps), and an axis shorter than the window (mirror padding)."""
    from MedDiffFMLib.sampling import mirror_pad

    rng = np.random.default_rng(3)
    partial = 0
    for shape in [(10, 48, 40), (37, 29, 53)]:
        sampler = make_sampler(prior, 16, shape=shape, overlap=0.3)

        def check(needed):
            padded = mirror_pad(torch.as_tensor(needed)[None, None], sampler.padded_shape)
            expected = [j for j, start in enumerate(sampler.starts) if bool(padded[sampler._box(start)].any())]
            assert sampler.active_windows(needed) == expected
            assert (expected == []) == (not needed.any())
            return expected

        for density in (0.0, 1e-4, 1e-3, 1e-2):
            expected = check(rng.random(shape) < density)
            partial += 0 < len(expected) < sampler.num_windows
        for axis in range(3):  # one voxel at every index along each axis: the boxes' first and last voxels
            for i in range(shape[axis]):
                needed = np.zeros(shape, bool)
                needed[tuple(i if a == axis else shape[a] // 3 for a in range(3))] = True
                check(needed)
    assert partial >= 3


def test_skipped_windows_leave_every_needed_voxel_its_full_window_average(prior):
    """Evaluating only the windows that hold a needed voxel: with a model whose answer depends on the window,
    every needed voxel gets exactly the all-window average (so no window that holds it was skipped), voxels no
    evaluated window holds get no estimate and the task's fallback as x0, and the model sees only those windows.
    The z axis is shorter than the window, so the mirror-padded grid is covered too."""
    c = prior.coord_channel

    def window_mean_z(x_t, t, cond, region):
        return cond[:, c:c + 1].mean(dim=(2, 3, 4), keepdim=True).expand_as(x_t) + 0.1 * x_t

    shape = (10, 48, 40)
    sampler = make_sampler(prior, 16, shape=shape, overlap=0.25)
    needed = np.zeros(shape, bool)
    needed[4:9, 3:10, 30:33] = True
    needed[9, 47, 0] = True  # a corner voxel, held only by the last windows along y
    windows = sampler.active_windows(needed)
    assert 0 < len(windows) < sampler.num_windows // 2
    assert sampler.active_windows(np.ones(shape, bool)) == list(range(sampler.num_windows))
    seen = []
    sampler.model_fn = lambda x, t, cond, region: (seen.append(len(x)), window_mean_z(x, t, cond, region))[1]
    x_t = torch.randn((1, 1) + shape, generator=torch.Generator().manual_seed(0))
    part = sampler.eps(x_t, 400, windows)[0, 0]
    assert sum(seen) == len(windows)
    full = sampler.eps(x_t, 400)[0, 0]
    torch.testing.assert_close(part[needed], full[needed], atol=1e-6, rtol=1e-6)
    covered = np.zeros(shape, bool)
    for j in windows:  # the grid's z axis is padded from 10 to 16 voxels, 3 before the volume
        z, y, x = sampler.starts[j]
        covered[:, y:y + 16, x:x + 16] = True
    assert not covered.all() and not part[~covered].any()
    fallback = torch.linspace(-1.5, 1.5, math.prod(shape)).reshape((1, 1) + shape)
    x0 = sampler.predict_x0(x_t, 400, windows, fallback)[0, 0]
    torch.testing.assert_close(x0[~covered], fallback[0, 0][~covered].clamp(-1, 1))
    torch.testing.assert_close(x0[needed], sampler.predict_x0(x_t, 400)[0, 0][needed])
    with pytest.raises(ValueError, match="fallback"):
        sampler.predict_x0(x_t, 400, windows)
    with pytest.raises(ValueError, match="shape"):
        sampler.active_windows(needed[1:])
