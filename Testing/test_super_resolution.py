"""Super-resolution: slice operators, thin-grid geometry, DiffPIR data consistency on real thick-slice CT."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ABDOMEN_SMALL_NII
from scipy import ndimage

from MedDiffFMLib.cli import main
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.finetune import ControlledNet
from MedDiffFMLib.io import Volume, read_volume, write_volume
from MedDiffFMLib.sampling import SlidingWindowSampler
from MedDiffFMLib.validation import check_ct
from MedDiffFMLib.tasks.super_resolution import (average_slices, interpolate_slices, project_in_range, repeat_slices,
                                                 super_resolve, thin_geometry)

CHEST_WINDOW = (-1400.0, 400.0)


@pytest.fixture(scope="module")
def sr_model(tiny_base):
    return ControlledNet(tiny_base, "super-resolution").eval()


@pytest.fixture(scope="module")
def thick(chest_nodule_crop):
    """A real 5 mm chest CT: 8 slices of 16 x 16 voxels through the lung nodule."""
    image = chest_nodule_crop[0].to_sitk()[16:32, 16:32, 2:10]
    return Volume.from_sitk(image, dtype=np.float32)


def test_average_and_repeat_are_left_inverse_and_adjoint_like():
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.normal(size=(4, 3, 2)))
    assert torch.allclose(average_slices(repeat_slices(y, 5, 20), 5), y)
    x = torch.from_numpy(rng.normal(size=(20, 3, 2)))
    # <H x, y> = <x, H^T y> / factor: repeat is factor times the true adjoint of the mean.
    assert torch.isclose((average_slices(x, 5) * y).sum(), (x * repeat_slices(y, 5, 20)).sum() / 5)
    # A short last group is averaged over the slices it has.
    ragged = torch.arange(7.0).reshape(7, 1, 1)
    assert average_slices(ragged, 3).flatten().tolist() == [1.0, 4.0, 6.0]


def test_interpolation_hits_the_thick_values_at_the_slice_centres():
    thick = torch.tensor([0.0, 10.0, 40.0]).reshape(3, 1, 1)
    thin = interpolate_slices(thick, 5, 15).flatten()
    assert thin[[2, 7, 12]].tolist() == [0.0, 10.0, 40.0]  # centres of the groups of 5
    assert thin[:3].tolist() == [0.0, 0.0, 0.0] and thin[12:].tolist() == [40.0] * 3  # held at the ends
    assert thin[9].item() == pytest.approx(22.0)  # linear in between


def test_thin_grid_geometry_centres_each_thick_slice_on_its_thin_slices():
    # An oblique grid so that the slice axis is not the world z axis.
    angle = np.deg2rad(25)
    direction = (1.0, 0.0, 0.0, 0.0, np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle))
    volume = Volume(np.zeros((4, 3, 3), np.float32), (0.7, 0.8, 5.0), (10.0, -20.0, 30.0), direction)
    spacing, origin = thin_geometry(volume, 5)
    assert spacing == pytest.approx((0.7, 0.8, 1.0))
    thick_image = volume.to_sitk()
    thin_image = Volume(np.zeros((20, 3, 3), np.float32), spacing, origin, direction).to_sitk()
    for k in range(4):
        centre = np.array(thick_image.TransformIndexToPhysicalPoint((1, 1, k)))
        thin = [thin_image.TransformContinuousIndexToPhysicalPoint((1, 1, 5 * k + j)) for j in range(5)]
        assert np.allclose(np.mean(thin, axis=0), centre, atol=1e-9)


def test_result_averages_back_to_the_input_and_has_the_thin_geometry(thick, sr_model):
    out = super_resolve(thick, sr_model, factor=5, nfe=3, sigma_n=0.0, region="chest", seed=3)
    assert out.shape == (40, 16, 16)
    spacing, origin = thin_geometry(thick, 5)
    assert out.spacing == pytest.approx(spacing) and out.spacing[2] == pytest.approx(1.0)
    assert out.origin == pytest.approx(origin)
    assert out.direction == thick.direction
    # Data consistency: every group of 5 thin slices averages to its thick slice (within the model window).
    averaged = average_slices(torch.from_numpy(out.array), 5).numpy()
    assert np.abs(averaged - np.clip(thick.array, *CHEST_WINDOW)).max() < 0.5
    # ...while the thin slices are not just copies of the thick ones.
    assert np.abs(out.array - np.repeat(np.clip(thick.array, *CHEST_WINDOW), 5, axis=0)).mean() > 10


def test_voxels_outside_the_model_window_keep_the_input_range(sr_model):
    """Abdomen window [-120, 240] HU on a real abdomen crop that reaches out into the air beside the body."""
    window = (-120.0, 240.0)
    thick = Volume.from_sitk(sitk.ReadImage(str(ABDOMEN_SMALL_NII))[49:73, 0:24, 10:18], dtype=np.float32)
    out = super_resolve(thick, sr_model, factor=2, nfe=2, region="abdomen", seed=3)
    averaged = average_slices(torch.from_numpy(out.array.astype(np.float64)), 2).numpy()
    # Every group of thin slices averages to its thick voxel in HU: in the window, outside it and at its edges.
    assert (thick.array < window[0] - 200).mean() > 0.1 and (thick.array > window[1]).sum() > 0
    np.testing.assert_allclose(averaged, thick.array, atol=0.05)
    assert out.array.min() < -900 and out.array.max() > window[1] + 50  # air and bone are not clipped
    # Well inside the window (neighbours included: the blend looks at a lightly smoothed input) the thin
    # slices are the model's, not the interpolated input.
    size = (3, 7, 7)
    inside = ((ndimage.minimum_filter(thick.array, size=size) > window[0] + 50)
              & (ndimage.maximum_filter(thick.array, size=size) < window[1] - 50))
    interpolated = interpolate_slices(torch.from_numpy(thick.array), 2, out.shape[0]).numpy()
    assert np.abs(out.array - interpolated)[np.repeat(inside, 2, axis=0)].mean() > 5


def test_windows_wholly_outside_the_model_window_are_not_evaluated(sr_model, monkeypatch):
    """A real abdomen crop with air beside it: the windows wholly in air are skipped, and the result is the one
    every window gives (the air there comes back clipped to the window's edge either way)."""
    crop = Volume.from_sitk(sitk.ReadImage(str(ABDOMEN_SMALL_NII))[40:88, 0:40, 10:18], dtype=np.float32)
    hu = crop.array.copy()
    hu[:, :, 26:] = -1000.0
    thick = crop.with_array(hu)
    calls = []
    forward = sr_model.forward
    monkeypatch.setattr(sr_model, "forward", lambda *args: (calls.append(len(args[0])), forward(*args))[1])
    skipped = super_resolve(thick, sr_model, factor=2, nfe=3, region="abdomen", seed=3).array
    evaluated = sum(calls)
    calls.clear()
    monkeypatch.setattr(SlidingWindowSampler, "active_windows", lambda self, needed: list(range(self.num_windows)))
    everything = super_resolve(thick, sr_model, factor=2, nfe=3, region="abdomen", seed=3).array
    assert evaluated < 0.9 * sum(calls)
    np.testing.assert_allclose(skipped, everything, atol=0.05)  # HU


def test_default_noise_level_trades_consistency_for_the_prior(thick, sr_model):
    exact = super_resolve(thick, sr_model, factor=2, nfe=3, sigma_n=0.0, region="chest", seed=3, project=False)
    loose = super_resolve(thick, sr_model, factor=2, nfe=3, region="chest", seed=3, project=False)
    error = [np.abs(average_slices(torch.from_numpy(v.array), 2).numpy() - np.clip(thick.array, *CHEST_WINDOW))
             .mean() for v in (exact, loose)]
    assert error[0] < 0.5 < error[1]


def test_final_projection_makes_the_paper_setting_data_consistent(thick, sr_model):
    """With the paper's sigma_n = 1 the plain result drifts (test above); the default final projection
    restores exact slice averages and keeps the within-group detail of the sampled result."""
    plain = super_resolve(thick, sr_model, factor=2, nfe=3, region="chest", seed=3, project=False)
    projected = super_resolve(thick, sr_model, factor=2, nfe=3, region="chest", seed=3)
    averaged = average_slices(torch.from_numpy(projected.array), 2).numpy()
    assert np.abs(averaged - np.clip(thick.array, *CHEST_WINDOW)).max() < 0.5
    assert plain.array.min() < thick.array.min() <= projected.array.min()  # nothing below the input's air
    # Projection shifts each group by a constant: differences between thin slices of a group stay, except in the
    # groups where a value reached the input's lowest.
    detail = lambda v: v.array[0::2] - v.array[1::2]  # noqa: E731
    unclipped = np.minimum(projected.array[0::2], projected.array[1::2]) > thick.array.min()
    assert unclipped.mean() > 0.5
    assert np.allclose(detail(projected)[unclipped], detail(plain)[unclipped], atol=1e-2)


def test_projection_in_range_is_the_nearest_consistent_volume():
    rng = np.random.default_rng(0)
    thin = torch.from_numpy(rng.normal(0, 400, (9, 4, 4)).astype(np.float32))  # 9 slices: a short last group
    thick = torch.from_numpy(rng.uniform(-900, 900, (3, 4, 4)).astype(np.float32))
    lo, hi = -1000.0, 1000.0
    out = project_in_range(thin, thick, 4, lo, hi)
    assert torch.allclose(average_slices(out, 4), thick, atol=1e-3) and lo <= out.min() and out.max() <= hi
    # Nearer to the input than other consistent, in-range volumes: the plain shift clipped and re-shifted ...
    other = project_in_range(thin + torch.from_numpy(rng.normal(0, 50, thin.shape).astype(np.float32)), thick, 4,
                             lo, hi)
    assert (out - thin).norm() < (other - thin).norm()
    # A floor per group (air, or the thick voxel itself where that is lower, e.g. padding) holds too.
    floors = torch.clamp(thick, max=-300.0)
    floored = project_in_range(thin, thick, 4, floors, hi)
    assert torch.allclose(average_slices(floored, 4), thick, atol=1e-3)
    assert (floored >= repeat_slices(floors, 4, 9)).all() and floored.min() < -300.0  # where the thick is lower
    # ... and where the shift needs no clipping it is the plain projection x + H^T(y - H x).
    plain = thin + repeat_slices(thick - average_slices(thin, 4), 4, 9)
    wide = project_in_range(thin, thick, 4, -1e5, 1e5)
    assert torch.allclose(wide, plain, atol=1e-2)


def test_deterministic_by_seed_and_input_untouched(thick, sr_model):
    before = thick.array.copy()
    a = super_resolve(thick, sr_model, factor=2, nfe=2, region="chest", seed=7)
    b = super_resolve(thick, sr_model, factor=2, nfe=2, region="chest", seed=7)
    c = super_resolve(thick, sr_model, factor=2, nfe=2, region="chest", seed=8)
    assert np.array_equal(a.array, b.array)
    assert not np.array_equal(a.array, c.array)
    assert np.array_equal(thick.array, before)


@pytest.mark.parametrize("factor", [1, 0, 2.5, "3", True, float("nan")])
def test_bad_factor_is_refused(thick, sr_model, factor):
    with pytest.raises(InputError, match="factor must be a whole number >= 2"):
        super_resolve(thick, sr_model, factor=factor, nfe=1, region="chest")


def test_a_step_count_that_is_no_count_is_refused(thick, sr_model):
    with pytest.raises(InputError, match=r"nfe\) must be a whole number >= 1, got 2.5"):
        super_resolve(thick, sr_model, nfe=2.5, region="chest")


def test_thick_slices_far_coarser_than_the_pixels_are_what_it_is_for(thick, sr_model):
    """0.45 mm pixels and 10 mm slices (ratio 22) is beyond what a CT grid may be, but not the thin grid it makes."""
    thick10 = Volume(thick.array, (0.45, 0.45, 10.0), thick.origin, thick.direction)
    with pytest.raises(InputError, match="extremely anisotropic"):  # other tasks refuse it
        check_ct(thick10)
    out = super_resolve(thick10, sr_model, factor=10.0, nfe=1, region="chest")  # 10.0: a whole number
    assert out.shape == (80, 16, 16) and out.spacing == pytest.approx((0.45, 0.45, 1.0))
    with pytest.raises(InputError, match=r"factor 2 makes slices 20 mm apart, on pixels of 0.45 x 0.45 mm: a grid 44 "
                                         r"times finer .* choose a factor nearer 89"):  # the thin grid is judged
        super_resolve(Volume(thick.array, (0.45, 0.45, 40.0), thick.origin, thick.direction), sr_model, factor=2,
                      nfe=1, region="chest")
    with pytest.raises(InputError, match=r"factor 1000 makes slices 0.01 mm apart, .* nearer 22"):  # and both ways
        super_resolve(thick10, sr_model, factor=1000, nfe=1, region="chest")
    with pytest.raises(InputError, match="thick sagittal or coronal slices"):  # said first, not its anisotropy
        super_resolve(Volume(thick.array, (5.0, 0.5, 0.5), thick.origin, thick.direction), sr_model, factor=5,
                      nfe=1, region="chest")


def test_a_factor_too_large_for_memory_is_refused_before_any_work(thick, sr_model, monkeypatch):
    from MedDiffFMLib.errors import ResourceError

    monkeypatch.setattr("MedDiffFMLib.tasks.common.available_memory", lambda device: 2 ** 20)  # 1 MiB free
    with pytest.raises(ResourceError, match=r"super-resolution by 50 \(400 thin slices of 0.1 mm\) needs about "
                                            r".* GiB .*give a smaller factor \(--factor\)"):
        super_resolve(thick, sr_model, factor=50, nfe=1, region="chest")


def test_volume_too_thin_and_wrong_model_are_refused(thick, sr_model):
    with pytest.raises(InputError):
        super_resolve(Volume(thick.array[:1], thick.spacing, thick.origin, thick.direction), sr_model, nfe=1)
    lesion_model = ControlledNet(sr_model.base, "lesion")
    with pytest.raises(InputError, match="super-resolution"):
        super_resolve(thick, lesion_model, nfe=1, region="chest")
    with pytest.raises(InputError, match="super-resolution"):
        super_resolve(thick, sr_model.base, nfe=1, region="chest")


def test_cli_with_the_registered_model_writes_the_thin_volume(thick, tmp_path):
    write_volume(thick, tmp_path / "thick.nii.gz")
    code = main(["super-resolve", str(tmp_path / "thick.nii.gz"), "-o", str(tmp_path / "thin.nii.gz"),
                 "--factor", "5", "--nfe", "1", "--region", "chest", "--sigma-n", "0", "--device", "cpu",
                 "--progress", "none"])  # default --model: the registered `super-resolution` ControlNet
    assert code == 0
    thin = read_volume(tmp_path / "thin.nii.gz")
    assert thin.shape == (40, 16, 16) and thin.spacing[2] == pytest.approx(1.0)
    assert np.abs(average_slices(torch.from_numpy(thin.array), 5).numpy()
                  - np.clip(thick.array, *CHEST_WINDOW)).max() < 0.5
    assert sitk.ReadImage(str(tmp_path / "thin.nii.gz")).GetDirection() == pytest.approx(thick.direction)


def test_a_factor_other_than_the_trained_one_is_warned_about(thick, caplog):
    from MedDiffFMLib.checkpoints import load_model

    model, _, _ = load_model("tiny-super-resolution")
    assert model.slice_factor == 5  # read from the model file's training record
    super_resolve(thick, model, factor=5, nfe=1, region="chest")
    assert "fine-tuned to make" not in caplog.text
    super_resolve(thick, model, factor=2, nfe=1, region="chest")
    assert "fine-tuned to make 5 thin slices per thick slice; factor 2 is outside" in caplog.text


def test_slices_already_thinner_than_the_in_plane_voxels_are_warned_about(thick, sr_model, caplog):
    """A CT whose slices are closer than its in-plane voxels holds nothing thick to resolve along z."""
    super_resolve(thick, sr_model, factor=5, nfe=1, region="chest")  # 0.57 mm pixels, 5 mm slices
    assert "already thinner than the in-plane voxels" not in caplog.text
    coarse = Volume(thick.array, (3.27, 3.27, 0.98), thick.origin, thick.direction)
    thin = super_resolve(coarse, sr_model, factor=5, nfe=1, region="chest")
    assert "the slices (0.98 mm apart) are already thinner than the in-plane voxels (3.27 x 3.27 mm)" in caplog.text
    assert thin.spacing[2] == pytest.approx(0.98 / 5)
