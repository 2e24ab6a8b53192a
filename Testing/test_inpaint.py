"""Lesion inpainting (RePaint on the sliding-window sampler) on a real chest CT crop with its nodule mask."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedDiffFMLib.cli import main
from MedDiffFMLib.diffusion import Schedule
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.finetune import ControlledNet
from MedDiffFMLib.io import Volume, read_volume, write_volume
from MedDiffFMLib.sampling import SlidingWindowSampler
from MedDiffFMLib.tasks.inpaint import inpaint, renoise, repaint_path
from MedDiffFMLib.tasks.lesion import generate_lesion

FAST = dict(nfe=4, jump_length=2, resample=2, margin_mm=2.0, region="chest", overlap=0.0, window_batch=8)
#: The settings of FAST that generate_lesion takes too.
LESION = ("nfe", "margin_mm", "region", "overlap", "window_batch")
#: A small blob inside the lung crop: its box is one network window.
BLOB = (slice(5, 8), slice(20, 26), slice(20, 26))


@pytest.fixture(scope="module")
def lesion_model(tiny_base):
    return ControlledNet(tiny_base, "lesion").eval()


def with_mask(image: Volume, boxes) -> Volume:
    array = np.zeros(image.shape, np.uint8)
    for box in boxes:
        array[box] = 1
    return image.with_array(array)


def test_repaint_path_moves_one_level_at_a_time_with_the_right_number_of_jumps():
    n, jump, resample = 20, 5, 3
    path = repaint_path(n, jump, resample)
    assert path[0] == 0 and path[-1] == n
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    reverse = sum(1 for a, b in zip(path, path[1:]) if b > a)
    jump_points = len(range(0, n - jump, jump))
    assert reverse == n + (resample - 1) * jump * jump_points
    assert repaint_path(n, jump, 1) == list(range(n + 1))  # resample 1: plain reverse diffusion
    with pytest.raises(InputError):
        repaint_path(n, 0, 2)
    # Worked by hand from RePaint's schedule (jumps at t = 0, 2 of 6 steps counted from the clean end, i.e. after
    # the 3rd and 5th reverse steps here; each jumped segment is passed twice).
    assert repaint_path(6, 2, 2) == [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5, 6]


def test_a_jump_back_gives_the_forward_marginal_of_the_noisier_level():
    schedule = Schedule.cosine(1000)
    x = torch.ones(200_000)
    jumped = renoise(schedule, x, 100, 400, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    ratio = float(schedule.abar(400) / schedule.abar(100))
    assert float(jumped.mean()) == pytest.approx(math.sqrt(ratio), abs=5e-3)
    assert float(jumped.std()) == pytest.approx(math.sqrt(1 - ratio), rel=1e-2)


def test_the_network_sees_the_known_image_noised_to_the_level_it_is_asked_at(chest_nodule_crop, lesion_model,
                                                                            monkeypatch):
    """Outside the mask every network input is q_sample(known, t) at the t of that call, after reverse steps and
    after jumps alike: (x - sqrt(abar) known) / sqrt(1 - abar) is standard normal there."""
    import MedDiffFMLib.tasks.inpaint as inpainting

    image, nodule = chest_nodule_crop
    jobs, levels = [], []
    prepare, predict = inpainting.prepare_box, SlidingWindowSampler.predict_x0

    def keep_job(*args, **kwargs):
        jobs.append(prepare(*args, **kwargs))
        return jobs[-1]

    def check_input(sampler, x, t, *args, **kwargs):
        abar = float(sampler.schedule.abar(t))
        z = (x - math.sqrt(abar) * jobs[0].known) / math.sqrt(1 - abar)
        outside = ~torch.from_numpy(jobs[0].inside)[None, None]
        levels.append((t, float(z[outside].mean()), float(z[outside].std())))
        return predict(sampler, x, t, *args, **kwargs)

    monkeypatch.setattr(inpainting, "prepare_box", keep_job)
    monkeypatch.setattr(SlidingWindowSampler, "predict_x0", check_input)
    inpaint(image, nodule, lesion_model, seed=2, **dict(FAST, nfe=6))
    assert len(levels) == 10  # the reverse steps of repaint_path(6, 2, 2): 6, and 2 jumps of 2 passed again
    for t, mean, std in levels:
        assert abs(mean) < 0.1 and std == pytest.approx(1.0, abs=0.1), (t, mean, std)


def test_outside_the_mask_is_unchanged_exactly_and_inside_differs(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    before = image.array.copy()
    out = inpaint(image, nodule, lesion_model, seed=1, **FAST)
    inside = nodule.array > 0
    assert out.shape == image.shape and out.same_grid(image)
    assert np.array_equal(out.array[~inside], image.array[~inside])
    assert np.abs(out.array[inside] - image.array[inside]).mean() > 20.0
    assert np.array_equal(image.array, before)  # input untouched


def test_generated_values_stay_within_the_input_range(chest_nodule_crop, lesion_model):
    """The chest window reaches -1400 HU; an (untrained) model sampling lung there would put voxels below air."""
    image, _ = chest_nodule_crop
    mask = with_mask(image, [(slice(None), slice(8, 40), slice(8, 40))])
    out = inpaint(image, mask, lesion_model, seed=1, **FAST).array
    generate = generate_lesion(image, mask, lesion_model, seed=1, nfe=2).array
    for result in (out, generate):
        assert image.array.min() <= result.min() and result.max() <= image.array.max()
    # Padding outside the field of view (-3024 HU) in a corner does not lower the floor in the mask below air.
    padded = image.array.copy()
    padded[:, :4, :4] = -3024.0
    padded = image.with_array(padded)
    inside = mask.array > 0
    for result in (inpaint(padded, mask, lesion_model, seed=1, **FAST).array,
                   generate_lesion(padded, mask, lesion_model, seed=1, nfe=2).array):
        assert result[inside].min() >= -1024.0 and result[:, :4, :4].min() == -3024.0


def test_deterministic_by_seed(chest_nodule_crop, lesion_model):
    image, _ = chest_nodule_crop
    blob = with_mask(image, [BLOB])
    a = inpaint(image, blob, lesion_model, seed=4, **FAST)
    b = inpaint(image, blob, lesion_model, seed=4, **FAST)
    c = inpaint(image, blob, lesion_model, seed=5, **FAST)
    assert np.array_equal(a.array, b.array)
    assert not np.array_equal(a.array, c.array)


def test_mask_at_the_border_and_several_components(chest_nodule_crop, lesion_model):
    image, _ = chest_nodule_crop
    components = [(slice(0, 3), slice(0, 5), slice(0, 5)),       # touches three faces of the volume
                  (slice(7, 12), slice(9, 13), slice(10, 14))]   # a second, separate component
    mask = with_mask(image, components)
    out = inpaint(image, mask, lesion_model, seed=2, **FAST)
    inside = mask.array > 0
    assert np.array_equal(out.array[~inside], image.array[~inside])
    for box in components:
        assert not np.array_equal(out.array[box], image.array[box])


def test_base_model_inpaints_without_control(chest_nodule_crop, tiny_base):
    image, _ = chest_nodule_crop
    blob = with_mask(image, [BLOB])
    out = inpaint(image, blob, tiny_base, seed=1, **FAST)
    inside = blob.array > 0
    assert np.array_equal(out.array[~inside], image.array[~inside])
    assert not np.array_equal(out.array[inside], image.array[inside])


def test_empty_mask_wrong_grid_and_wrong_model_are_refused(chest_nodule_crop, lesion_model, tiny_base):
    image, nodule = chest_nodule_crop
    with pytest.raises(InputError, match="empty"):
        inpaint(image, image.with_array(np.zeros(image.shape, np.uint8)), lesion_model, **FAST)
    shifted = Volume(nodule.array, nodule.spacing, tuple(o + 3.0 for o in nodule.origin), nodule.direction)
    with pytest.raises(InputError, match="not on the grid"):
        inpaint(image, shifted, lesion_model, **FAST)
    smaller = Volume(nodule.array[:, :40], nodule.spacing, nodule.origin, nodule.direction)
    with pytest.raises(InputError, match="not on the grid"):
        inpaint(image, smaller, lesion_model, **FAST)
    with pytest.raises(InputError, match="runs a base model .* or a lesion ControlNet .*; the given model is a "
                                         "super-resolution ControlNet"):
        inpaint(image, nodule, ControlledNet(tiny_base, "super-resolution"), **FAST)


def test_a_mask_with_no_tissue_around_it_and_bad_settings_are_refused_before_any_work(chest_nodule_crop,
                                                                                       lesion_model, monkeypatch):
    image, nodule = chest_nodule_crop
    whole = image.with_array(np.ones(image.shape, np.uint8))
    for task in (inpaint, generate_lesion):
        with pytest.raises(InputError, match="mask covers every voxel of the box .* no tissue around it"):
            task(image, whole, lesion_model, **{k: v for k, v in FAST.items() if task is inpaint or k in LESION})
    # The box around the mask holds tissue to fit: a mask leaving one voxel outside it is no longer refused for that.
    nearly = np.ones(image.shape, np.uint8)
    nearly[0, 0, 0] = 0
    assert inpaint(image, image.with_array(nearly), lesion_model, **FAST).shape == image.shape

    def no_set_up(*args, **kwargs):
        raise AssertionError("the settings should have been refused first")

    monkeypatch.setattr("MedDiffFMLib.tasks.inpaint.prepare_box", no_set_up)
    for bad, message in ((dict(nfe=2.5), r"nfe\) must be a whole number >= 1, got 2.5"),
                         (dict(nfe=0), r"nfe\) must be a whole number >= 1, got 0"),
                         (dict(resample=0), "resample must be a whole number >= 1, got 0"),
                         (dict(jump_length=True), "jump_length must be a whole number >= 1, got True")):
        with pytest.raises(InputError, match=message):
            inpaint(image, nodule, lesion_model, **dict(FAST, **bad))


def test_margin_must_be_a_finite_number_of_mm(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    for margin in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InputError, match="the margin around the mask must be a number of mm >= 0"):
            inpaint(image, nodule, lesion_model, **dict(FAST, margin_mm=margin))


def test_settings_that_never_resample_are_warned_about(chest_nodule_crop, lesion_model, caplog):
    image, nodule = chest_nodule_crop
    inpaint(image, with_mask(image, [BLOB]), lesion_model, **dict(FAST, nfe=2, jump_length=2, resample=3))
    assert "with these settings it never resamples, so resample 3 changes nothing" in caplog.text
    caplog.clear()
    inpaint(image, with_mask(image, [BLOB]), lesion_model, **FAST)  # nfe 4 > jump 2: it resamples
    assert "never resamples" not in caplog.text


def test_cli_inpaint_with_an_empty_mask_fails_cleanly(chest_nodule_crop, tmp_path, capsys):
    image, _ = chest_nodule_crop
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(image.with_array(np.zeros(image.shape, np.uint8)), tmp_path / "empty.nii.gz")
    code = main(["inpaint", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "empty.nii.gz"),
                 "-o", str(tmp_path / "out.nii.gz"), "--progress", "none"])
    assert code == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()


def test_cli_inpaint_round_trip_keeps_known_voxels(chest_nodule_crop, tiny_base, tmp_path):
    from MedDiffFMLib.checkpoints import save_model

    image, nodule = chest_nodule_crop
    save_model(tiny_base.state_dict(), tiny_base.cfg, tmp_path / "base", half=False)
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(nodule, tmp_path / "mask.nii.gz")
    code = main(["inpaint", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "-o", str(tmp_path / "out.nrrd"), "--model", str(tmp_path / "base.safetensors"), "--nfe", "2",
                 "--jump-length", "1", "--resample", "1", "--region", "chest", "--device", "cpu",
                 "--progress", "none"])
    assert code == 0
    out, original = read_volume(tmp_path / "out.nrrd"), read_volume(tmp_path / "ct.nii.gz")
    inside = nodule.array > 0
    assert out.same_grid(original)
    assert np.array_equal(out.array[~inside], original.array[~inside])


@pytest.mark.parametrize("option", ["--resample", "--jump-length"])
def test_cli_refuses_repaint_counts_below_one_while_parsing(option, capsys):
    with pytest.raises(SystemExit):
        main(["inpaint", "ct.nii.gz", "--mask", "m.nii.gz", "-o", "out.nii.gz", option, "0"])
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err
