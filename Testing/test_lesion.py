"""Lesion generation: the box around the mask, its place in the whole volume, and the pasted result."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from MedDiffFMLib.config import preset
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.finetune import ControlledCondition, ControlledNet
from MedDiffFMLib.tasks.common import anatomy_for, mask_box
from MedDiffFMLib.tasks.lesion import generate_lesion, paste_weights, prepare_box, surrounding_anatomy

CHEST_WINDOW = (-1400.0, 400.0)
FAST = dict(nfe=3, margin_mm=2.0, region="chest", overlap=0.0, window_batch=8)


@pytest.fixture(scope="module")
def lesion_model(tiny_base):
    return ControlledNet(tiny_base, "lesion").eval()


def test_mask_box_adds_the_margin_in_mm_and_grows_to_a_window():
    mask = np.zeros((20, 60, 60), bool)
    mask[10:12, 30:34, 5:9] = True
    box = mask_box(mask, (5.0, 0.5, 0.5), margin_mm=2.0, min_size=16)
    assert box[0] == slice(3, 19)               # z: voxels 9..12 (1 voxel margin), grown to 16, centred
    assert box[1] == slice(24, 40)              # y: 30..34 +- 4 voxels = 26..38, grown to 16
    assert box[2] == slice(0, 16)               # x: 1..13 grown to 16, kept inside the volume
    big = mask_box(mask, (5.0, 0.5, 0.5), margin_mm=10.0, min_size=16)
    assert big[1] == slice(10, 54) and big[0] == slice(3, 19)
    small = np.zeros((10, 10, 10), bool)
    small[4, 4, 4] = True
    assert mask_box(small, (1.0, 1.0, 1.0), 0.0, 16) == (slice(0, 10),) * 3  # volume smaller than a window
    with pytest.raises(InputError):
        mask_box(mask, (1.0, 1.0, 1.0), -1.0, 16)


def test_box_keeps_its_place_in_the_whole_volume(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    job = prepare_box(image, nodule, lesion_model, "chest", 2.0, "cpu", 0.0, 8, "fp32")
    cond = job.sampler.cond
    assert isinstance(cond, ControlledCondition)
    assert cond.offset == tuple(s.start for s in job.box) and cond.full_shape == image.shape
    assert np.array_equal(cond.control.numpy() > 0, nodule.array[job.box] > 0)
    # The global coordinates of the box's first voxel are those of that voxel in the whole crop.
    coords = cond.window((0, 0, 0), (1, 1, 1))[4:7, 0, 0, 0]  # after the 4 anatomy channels: z, y, x
    expected = [-1 + 2 * s.start / (n - 1) for s, n in zip(job.box, image.shape)]
    assert np.allclose(coords.numpy(), expected, atol=1e-6)


def test_generated_box_is_pasted_into_a_copy(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    before = image.array.copy()
    out = generate_lesion(image, nodule, lesion_model, seed=1, **FAST)
    box = prepare_box(image, nodule, lesion_model, "chest", 2.0, "cpu", 0.0, 8, "fp32").box
    outside = np.ones(image.shape, bool)
    outside[box] = False
    assert out.same_grid(image)
    assert np.array_equal(out.array[outside], image.array[outside])
    assert np.abs(out.array[box] - image.array[box]).mean() > 20.0
    assert out.array[box].min() >= CHEST_WINDOW[0] - 1e-3 and out.array[box].max() <= CHEST_WINDOW[1] + 1e-3
    assert np.array_equal(image.array, before)


def test_a_lesion_controlnet_reads_soft_tissue_in_its_mask(chest_nodule_crop, lesion_model):
    """Its training lesions read as soft tissue in the anatomy condition (computed from CTs that held them), so the
    mask does too, whatever the CT shows there (a base model's mask: the next test)."""
    image, nodule = chest_nodule_crop
    job = prepare_box(image, nodule, lesion_model, "chest", 2.0, "cpu", 0.0, 8, "fp32")
    computed = anatomy_for(image, preset("tiny"))[job.box]
    assert (computed[job.inside] != 3).mean() > 0.3  # the nodule reads partly as fat and lung
    labels = job.sampler.cond.labels
    assert (labels[job.inside] == 3).all()
    assert np.array_equal(labels[~job.inside], computed[~job.inside])


def test_a_base_model_fills_the_mask_after_its_surroundings(chest_nodule_crop, tiny_base):
    """Computed from the CT, the nodule's own tissue classes would bring the nodule back: a base model takes the
    mask's anatomy from the nearest voxel outside it, in mm."""
    labels = np.full((3, 1, 5), 2)
    labels[0] = 4  # bone one slice (5 mm) below
    labels[1, 0, [0, 4]] = 1  # lung two voxels (1 mm) away in-plane
    inside = np.zeros(labels.shape, bool)
    inside[1, 0, 1:4] = True
    assert surrounding_anatomy(labels, inside, (5.0, 0.5, 0.5))[1, 0, 2] == 1  # nearest in mm, not in voxels
    assert surrounding_anatomy(labels, inside, (1.0, 1.0, 1.0))[1, 0, 2] != 1
    assert np.array_equal(surrounding_anatomy(labels, np.ones_like(inside), (1.0, 1.0, 1.0)), labels)
    image, nodule = chest_nodule_crop
    job = prepare_box(image, nodule, tiny_base, "chest", 2.0, "cpu", 0.0, 8, "fp32")
    computed = anatomy_for(image, preset("tiny"))[job.box]
    filled = job.sampler.cond.labels
    assert np.array_equal(filled[~job.inside], computed[~job.inside])
    assert (computed[job.inside] == 1).mean() < 0.2 and (filled[job.inside] == 1).mean() > 0.5  # lung around it


def test_a_larger_window_samples_a_larger_box_but_regenerates_the_same_one(chest_nodule_crop, lesion_model):
    """--window-size grows the sampled box to hold one window (more context), but the region generate-lesion
    rewrites is the box at the training patch, whatever the window."""
    image = chest_nodule_crop[0]
    blob = np.zeros(image.shape, np.uint8)
    blob[5:8, 20:26, 20:26] = 1  # 6 voxels and 2 x 4 of margin in-plane: a 16^3 window holds it
    blob = image.with_array(blob)
    plain = prepare_box(image, blob, lesion_model, "chest", 2.0, "cpu", 0.0, 8, "fp32")
    job = prepare_box(image, blob, lesion_model, "chest", 2.0, "cpu", 0.0, 8, "fp32", window_size=32)
    assert job.core == plain.core == plain.box
    assert [s.stop - s.start for s in plain.box] == [12, 16, 16]  # z: the whole 12-slice crop
    assert [s.stop - s.start for s in job.box] == [12, 32, 32]
    assert all(b.start <= c.start and c.stop <= b.stop for b, c in zip(job.box, job.core))
    assert job.sampler.window == 32 and job.known.shape[-3:] == job.inside.shape
    smaller = prepare_box(image, blob, lesion_model, "chest", 2.0, "cpu", 0.0, 8, "fp32", window_size=8)
    assert smaller.box == smaller.core == plain.core and smaller.sampler.window == 8  # never less than the patch
    out = generate_lesion(image, blob, lesion_model, seed=1, window_size=32, **FAST)
    outside = np.ones(image.shape, bool)
    outside[job.core] = False
    assert np.array_equal(out.array[outside], image.array[outside])
    assert np.abs(out.array[job.core] - image.array[job.core]).mean() > 20.0


def test_around_the_lesion_voxels_outside_the_window_keep_their_values(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    fast = dict(FAST, region="abdomen")  # window [-120, 240] HU: the lung around the nodule lies below it
    out = generate_lesion(image, nodule, lesion_model, seed=1, **fast)
    box = prepare_box(image, nodule, lesion_model, "abdomen", 2.0, "cpu", 0.0, 8, "fp32").box
    lesion = nodule.array[box] > 0
    # Judged with the in-plane neighbours: the blend looks at a lightly smoothed input.
    lung = (ndimage.maximum_filter(image.array, size=(1, 5, 5)) < -300)[box] & ~lesion
    assert lung.mean() > 0.2
    np.testing.assert_array_equal(out.array[box][lung], image.array[box][lung])
    assert (out.array[box][lesion] != image.array[box][lesion]).all()


def test_paste_weights_blend_only_towards_faces_inside_the_volume():
    box = (slice(0, 10), slice(5, 25), slice(2, 12))
    w = paste_weights(box, (10, 40, 12), (1.0, 0.5, 1.0), width_mm=2.0)
    assert w.shape == (10, 20, 10)
    assert np.all(w[:, 0, 5] == w[0, 0, 5])           # z spans the whole volume: no ramp along z
    assert w[5, 0, 5] == pytest.approx(0.5 / 4)        # y face inside the volume: 4-voxel ramp, first centre
    assert w[5, 10, 5] == 1.0 and w[5, 10, -1] == 1.0  # interior, and the x face on the volume border
    assert w[5, 10, 0] == pytest.approx(0.25)          # x face inside the volume: 2-voxel ramp


def test_pasted_box_has_no_seam_and_keeps_the_lesion(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    out = generate_lesion(image, nodule, lesion_model, seed=1, **dict(FAST, margin_mm=6.0))
    box = prepare_box(image, nodule, lesion_model, "chest", 6.0, "cpu", 0.0, 8, "fp32").box
    change = np.abs(out.array - image.array)[box]
    inner_face = [i for i, (s, n) in enumerate(zip(box, image.shape)) if s.stop < n][0]
    face = np.take(change, -1, axis=inner_face)        # the box layer next to untouched voxels
    assert face.mean() < 0.5 * change.mean()
    assert (change[nodule.array[box] > 0] > 0).all()   # the lesion itself is fully generated


def test_deterministic_by_seed(chest_nodule_crop, lesion_model):
    image, nodule = chest_nodule_crop
    a = generate_lesion(image, nodule, lesion_model, seed=3, **FAST)
    b = generate_lesion(image, nodule, lesion_model, seed=3, **FAST)
    c = generate_lesion(image, nodule, lesion_model, seed=4, **FAST)
    assert np.array_equal(a.array, b.array) and not np.array_equal(a.array, c.array)


def test_wrong_model_and_empty_mask_are_refused(chest_nodule_crop, lesion_model, tiny_base):
    image, nodule = chest_nodule_crop
    with pytest.raises(InputError, match="lesion"):
        generate_lesion(image, nodule, tiny_base, **FAST)
    with pytest.raises(InputError, match="lesion"):
        generate_lesion(image, nodule, ControlledNet(tiny_base, "super-resolution"), **FAST)
    with pytest.raises(InputError, match="empty"):
        generate_lesion(image, nodule.with_array(np.zeros(image.shape, np.uint8)), lesion_model, **FAST)


def test_cli_with_the_registered_lesion_model(chest_nodule_crop, tmp_path, caplog):
    from MedDiffFMLib.cli import main
    from MedDiffFMLib.io import read_volume, write_volume

    caplog.set_level(logging.INFO, logger="MedDiffFMLib")
    image, nodule = chest_nodule_crop
    blob = np.zeros(image.shape, np.uint8)
    blob[5:8, 20:26, 20:26] = 1  # small: its box is one network window
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(image.with_array(blob), tmp_path / "lesion.nii.gz")
    code = main(["generate-lesion", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "lesion.nii.gz"),
                 "-o", str(tmp_path / "out.nii.gz"), "--nfe", "2", "--margin-mm", "2", "--region", "chest",
                 "--overlap", "0", "--device", "cpu", "--progress", "none"])  # default --model: `lesion`
    assert code == 0
    assert "is a test model" not in caplog.text
    # The 32^3 training patch, not the 3 x 6 x 6-voxel mask, sets the box: all 12 slices of 5 mm, 32 x 0.57 mm.
    assert "generating a box of 60 x 18 x 18 mm (z, y, x) anew" in caplog.text  # z: the whole 12-slice crop
    out = read_volume(tmp_path / "out.nii.gz")
    assert out.same_grid(image) and not np.array_equal(out.array[blob > 0], image.array[blob > 0])
