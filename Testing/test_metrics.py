"""Metrics against scikit-image and hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import CHEST_NRRD
from MedDiffFMLib import metrics
from MedDiffFMLib.errors import InputError


@pytest.fixture(scope="module")
def ct_pair():
    """Real chest CT (12 slices, 96x128 crop) clipped to the soft-tissue window, and a noisy copy."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST_NRRD)))[18:30, 200:296, 150:278].astype(np.float64)
    clean = np.clip(hu, -160, 240)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 30, clean.shape), -160, 240)
    return noisy, clean


def test_psnr_hand_value_and_skimage(ct_pair):
    ref = np.zeros((4, 4))
    assert metrics.psnr(ref + 10.0, ref, 400.0) == pytest.approx(10 * np.log10(400.0 ** 2 / 100.0))
    assert metrics.psnr(ref, ref, 400.0) == float("inf")
    noisy, clean = ct_pair
    assert metrics.psnr(noisy, clean, 400.0) == pytest.approx(
        peak_signal_noise_ratio(clean, noisy, data_range=400.0), rel=1e-10)


def test_ssim_matches_skimage_per_slice_and_3d(ct_pair):
    noisy, clean = ct_pair
    kw = dict(data_range=400.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    per_slice = np.mean([structural_similarity(n, c, **kw) for n, c in zip(noisy, clean)])
    assert metrics.ssim(noisy, clean, 400.0) == pytest.approx(per_slice, abs=1e-9)
    assert metrics.ssim(noisy[3], clean[3], 400.0) == pytest.approx(
        structural_similarity(noisy[3], clean[3], **kw), abs=1e-9)
    assert metrics.ssim(noisy, clean, 400.0, mode="3d") == pytest.approx(
        structural_similarity(noisy, clean, **kw), abs=1e-9)
    assert metrics.ssim(clean, clean, 400.0) == pytest.approx(1.0)
    assert 0.2 < metrics.ssim(noisy, clean, 400.0) < 0.95


def test_hu_window_metrics_clips_to_window(ct_pair):
    noisy, clean = ct_pair
    # Differences outside the window do not count: both are clipped to [-160, 240] first.
    shifted = clean.copy()
    shifted[clean <= -160] -= 500.0
    out = metrics.hu_window_metrics(shifted, clean)
    assert out["psnr"] == float("inf") and out["ssim"] == pytest.approx(1.0)
    out = metrics.hu_window_metrics(noisy, clean)
    assert out["psnr"] == pytest.approx(metrics.psnr(noisy, clean, 400.0))
    with pytest.raises(InputError):
        metrics.hu_window_metrics(noisy, clean, window=(240, -160))
    with pytest.raises(InputError):
        metrics.hu_window_metrics(noisy, clean[:-1])


def test_auroc_hand_values():
    labels = np.array([0, 0, 1, 1])
    assert metrics.image_auroc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.75)
    assert metrics.pixel_auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert metrics.pixel_auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert metrics.pixel_auroc(np.ones(4), labels) == 0.5  # ties count one half
    rng = np.random.default_rng(1)
    rand_labels = rng.random((40, 50, 10)) < 0.2
    assert metrics.pixel_auroc(rng.random((40, 50, 10)), rand_labels) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(InputError):
        metrics.pixel_auroc(np.ones(4), np.zeros(4))


def test_dice_and_best_dice_hand_values():
    a = np.array([1, 1, 0, 0], bool)
    assert metrics.dice(a, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)
    assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0
    # thresholds 0.9 / 0.8 / 0.7 / 0.1 give Dice 2/3, 1/2, 4/5, 2/3
    best, threshold = metrics.best_dice(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    assert best == pytest.approx(0.8) and threshold == pytest.approx(0.7)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    assert metrics.best_dice(mask * 2.0 + 0.5, mask) == (1.0, 2.5)


def test_pro_hand_value():
    # Region A (2 voxels), region B (4 voxels), 4 healthy voxels; curve points by hand:
    # (0, 0.5), (0, 0.75), (0.25, 0.75), (0.25, 1), (1, 1) -> area to 0.3 = 0.2375.
    labels = np.array([1, 1, 0, 0, 1, 1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.9, 0.5, 0.1, 0.8, 0.8, 0.2, 0.2, 0.1, 0.1])
    assert metrics.pro_score(scores, labels, max_fpr=0.3) == pytest.approx(0.2375 / 0.3)
    assert metrics.pro_score(labels * 1.0, labels) == pytest.approx(1.0)
    assert metrics.pro_score(1.0 - labels, labels) == pytest.approx(0.0)
    rng = np.random.default_rng(2)
    blobs = np.zeros((60, 60), bool)
    blobs[5:15, 5:15] = blobs[30:33, 40:50] = True
    assert metrics.pro_score(rng.random(blobs.shape), blobs, max_fpr=1.0) == pytest.approx(0.5, abs=0.05)


def test_pro_counts_a_lesion_cut_by_the_search_region_as_one_region():
    """A 10-voxel lesion whose 9th voxel lies outside the searched voxels stays one region of 9: with 8 of them
    detected at no false positive, PRO(FPR) runs from 8/9 at 0 to 1 at 1 (as two regions it would start at 1/2)."""
    labels = np.zeros((1, 1, 12), bool)
    labels[0, 0, 1:11] = True
    searched = np.ones_like(labels)
    searched[0, 0, 9] = False
    scores = np.zeros(labels.shape)
    scores[0, 0, 1:9] = 1.0
    at_limit = 8 / 9 + 0.3 * (1 / 9)
    assert metrics.pro_score(scores, labels, 0.3, searched=searched) == pytest.approx((8 / 9 + at_limit) / 2)
    with pytest.raises(InputError):  # the region must lie on the scores' grid
        metrics.pro_score(scores, labels, 0.3, searched=searched[..., :6])
