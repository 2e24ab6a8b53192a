"""CT patch dataset: fixed split, preprocessing cache, reproducible items that match the preprocessing."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import ABDOMEN_SMALL_NII, CT_DATA, LIMB_MASK_NII, LIMB_NII, THREE_SLICE_DICOM
from MedDiffFMLib.conditioning import anatomy_spec, condition_channels
from MedDiffFMLib.config import preset
from MedDiffFMLib.dataset import (SHARED_CASES, VALIDATION_SUBJECTS, CTCase, CTPatchDataset, case_spacings,
                                  split_cases)
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.io import read_mask, read_volume
from MedDiffFMLib.orientation import AxisOrder
from MedDiffFMLib.preprocess import resample, window_to_unit

SPACINGS = ((3.0, 3.0, 3.0), (1.0, 2.0, 2.0))


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(preset("tiny"), train_spacings=SPACINGS)


@pytest.fixture(scope="module")
def cases():
    return [CTCase(str(ABDOMEN_SMALL_NII), region="abdomen"), CTCase(str(LIMB_NII), region="other")]


@pytest.fixture(scope="module")
def data(cfg, cases, tmp_path_factory):
    return CTPatchDataset(cases, cfg, tmp_path_factory.mktemp("cache"), seed=3)


def test_split_keeps_subjects_apart_and_holds_the_named_validation_cases():
    train, val = split_cases(CT_DATA, "train"), split_cases(CT_DATA, "validation")
    assert not {c.subject for c in train} & {c.subject for c in val}
    val_files = {c.path for c in val}
    for case_id in ("pyradiomics_lung1", "ibsi_sts_002", "ts_example_ct_sm", "ts_example_ct"):
        assert str(CT_DATA / SHARED_CASES[case_id][0]) in val_files
    assert {c.subject for c in val} == set(VALIDATION_SUBJECTS)
    assert len(train) + len(val) == len(SHARED_CASES)
    with pytest.raises(InputError, match="unknown data split"):
        split_cases(CT_DATA, "test")


def test_slice_spacing_is_never_refined_more_than_twice():
    grids = case_spacings((5.0, 0.7, 0.7), ((1.0, 1.0, 1.0), (3.0, 0.9, 0.9), (5.0, 0.7, 0.7), (2.0, 1.0, 1.0)))
    assert grids == [(2.5, 1.0, 1.0), (3.0, 0.9, 0.9), (5.0, 0.7, 0.7)]  # 1 mm and 2 mm both clamp to 2.5


def test_cache_holds_the_windowed_resampled_volume(data, cfg):
    """Known answer: the cached image is window_to_unit(resample(CT in patient axis order)) at the clamped grid
    (float16). This CT is stored with x and y reversed, as the tasks do not see it."""
    vol = read_volume(ABDOMEN_SMALL_NII)  # 3 mm slices: the 1 mm grid is clamped to 1.5 mm
    order = AxisOrder.of(vol.direction)
    assert order.flip == (True, True, False)
    assert len(data.entries[0]) == 2
    entry = data._load(data.entries[0][1])
    assert entry["spacing_zyx"] == (1.5, 2.0, 2.0)
    expected = window_to_unit(resample(order.volume(vol), (2.0, 2.0, 1.5)).array, cfg.windows["abdomen"])
    np.testing.assert_allclose(entry["image"].astype(np.float32), expected, atol=1e-3)
    assert entry["labels"].shape == expected.shape and set(np.unique(entry["labels"])) <= {0, 1, 2, 3, 4}


def test_cache_is_reused_and_keyed_by_settings(data, cfg, cases):
    files = sorted(data.cache_dir.glob("*.npz"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = CTPatchDataset(cases, cfg, data.cache_dir, seed=3)
    assert sorted(data.cache_dir.glob("*.npz")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    for i in (0, 5, 11):
        assert torch.equal(again[i]["cond"], data[i]["cond"]) and torch.equal(again[i]["image"], data[i]["image"])
    windows = dict(cfg.windows, other=(-200.0, 300.0))
    CTPatchDataset(cases[1:], dataclasses.replace(cfg, windows=windows), data.cache_dir)
    assert len(list(data.cache_dir.glob("*.npz"))) == len(files) + 2  # new window -> new entries


def test_items_are_network_inputs(data, cfg):
    p = cfg.patch_size
    spec = anatomy_spec(cfg)
    grids = [data._load(path)["spacing_zyx"] for entries in data.entries for path in entries]
    modes = Counter()
    for i in range(120):
        item = data[i]
        modes[item["mode"]] += 1
        assert item["image"].shape == (1, p, p, p) and item["cond"].shape == (condition_channels(cfg), p, p, p)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert int(item["region"]) in (cfg.region_index("abdomen"), cfg.region_index("other"))
        # Spacing channels: log2 of a plausible effective spacing (resized modes are coarser than the grid).
        spacing = 2 ** item["cond"][-3:, 0, 0, 0]
        assert bool((item["cond"][-3:] == item["cond"][-3:, :1, :1, :1]).all())
        if item["mode"] == "crop":
            assert any(np.allclose(spacing.numpy(), grid, rtol=1e-5) for grid in grids)
        anatomy = item["cond"][:spec.num_channels]
        assert bool(((anatomy == 0) | (anatomy == 1)).all()) and float(anatomy.sum(0).max()) <= 1
    # Mode mix follows the weights 0.2 / 0.3 / 0.5 (binomial tolerance for 120 draws).
    for mode, weight in (("whole", 0.2), ("crop2x", 0.3), ("crop", 0.5)):
        assert abs(modes[mode] / 120 - weight) < 4 * math.sqrt(weight * (1 - weight) / 120), modes


def test_anatomy_dropout_and_seeds(data, cfg, cases):
    dropped = CTPatchDataset(cases, cfg, data.cache_dir, seed=3, anatomy_dropout=1.0)
    spec = anatomy_spec(cfg)
    item, same = dropped[4], data[4]
    assert float(item["cond"][:spec.num_channels].abs().sum()) == 0
    assert torch.equal(item["cond"][spec.num_channels:], same["cond"][spec.num_channels:])
    other_seed = CTPatchDataset(cases, cfg, data.cache_dir, seed=4)
    assert not torch.equal(other_seed[4]["image"], same["image"])


def test_bad_inputs_are_refused(cfg, cases, tmp_path):
    with pytest.raises(InputError, match="unknown patch mode\\(s\\) tiles"):
        CTPatchDataset(cases, cfg, tmp_path, mode_weights={"tiles": 1.0})
    with pytest.raises(InputError, match="no CT volumes, cache entries .* or DICOM series found in"):
        CTPatchDataset(str(tmp_path), cfg, tmp_path)
    from MedDiffFMLib.dataset import as_cases  # the folder of one DICOM series is one case (it was "no CT volumes")
    assert [case.path for case in as_cases(str(THREE_SLICE_DICOM))] == [str(THREE_SLICE_DICOM)]
    with pytest.raises(InputError, match="not found"):
        CTPatchDataset([str(tmp_path / "absent.nii.gz")], cfg, tmp_path)
    with pytest.raises(InputError, match="unknown body region 'knee'"):
        CTPatchDataset([CTCase(str(LIMB_NII), region="knee")], cfg, tmp_path)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.float32)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(InputError, match="slice.nii.gz: the image is 2D"):  # not a raw error from its header
        CTPatchDataset([CTCase(str(tmp_path / "slice.nii.gz"), region="abdomen")], cfg, tmp_path / "cache")


def test_user_masks_replace_threshold_anatomy(cfg, tmp_path):
    user = dataclasses.replace(cfg, anatomy={"source": "user", "encoding": "onehot", "num_classes": 1},
                               train_spacings=((3.0, 3.0, 3.0),))
    data = CTPatchDataset([str(LIMB_NII)], user, tmp_path, masks=[str(LIMB_MASK_NII)])
    assert data.regions == ["other"]  # guessed from the image: a limb
    mask = read_mask(LIMB_MASK_NII, like=read_volume(LIMB_NII))
    expected = resample(mask, (3.0, 3.0, 3.0), is_mask=True).array
    np.testing.assert_array_equal(data._load(data.entries[0][0])["labels"], expected)
    assert data[0]["cond"].shape[0] == condition_channels(user)


def test_training_anatomy_comes_from_the_models_own_source(cfg, tmp_path, monkeypatch):
    """A model conditioned on TotalSegmentator or user anatomy must not be trained on threshold classes: inference
    computes its own source again, and the two conditions would differ."""
    import MedDiffFMLib.anatomy as anatomy
    from MedDiffFMLib.errors import ResourceError
    from MedDiffFMLib.finetune import LesionPatches

    one_grid = dict(train_spacings=((3.0, 3.0, 3.0),))
    totalseg = dataclasses.replace(cfg, anatomy={"source": "totalsegmentator", "encoding": "binary",
                                                 "num_classes": 118}, **one_grid)
    case = CTCase(str(LIMB_NII), region="other")
    monkeypatch.setattr(anatomy, "totalsegmentator_problem", lambda: "TotalSegmentator is not installed.")
    with pytest.raises(ResourceError, match=r"CT_image.nii.gz: the model is conditioned on totalsegmentator anatomy\. "
                                            "TotalSegmentator is not installed"):
        CTPatchDataset([case], totalseg, tmp_path / "a")
    with pytest.raises(ResourceError, match="conditioned on totalsegmentator anatomy"):
        LesionPatches([(str(LIMB_NII), str(LIMB_MASK_NII), "other")], totalseg)

    def fake_totalsegmentator(vol):  # a known answer: labels 1..3 from the HU, 0 outside
        return np.digitize(vol.array, [-500, 0, 100]).astype(np.uint8)

    monkeypatch.setattr(anatomy, "totalsegmentator_anatomy", fake_totalsegmentator)
    data = CTPatchDataset([case], totalseg, tmp_path / "b")
    order = AxisOrder.of(read_volume(LIMB_NII).direction)
    expected = fake_totalsegmentator(resample(order.volume(read_volume(LIMB_NII)), (3.0, 3.0, 3.0)))
    np.testing.assert_array_equal(data._load(data.entries[0][0])["labels"], expected)

    user = dataclasses.replace(cfg, anatomy={"source": "user", "encoding": "onehot", "num_classes": 1}, **one_grid)
    with pytest.raises(InputError, match="CT_image.nii.gz: the model is conditioned on anatomy label maps from the "
                                         "user, and this CT has none"):
        CTPatchDataset([case], user, tmp_path / "c")


def test_a_cache_entry_of_another_training_grid_is_refused(data, cfg):
    entry = data.entries[1][0]  # the limb at 3 mm
    elsewhere = dataclasses.replace(cfg, train_spacings=((2.0, 2.0, 2.0),))
    with pytest.raises(InputError, match=r"cache entry on a grid of \[3.0, 3.0, 3.0\] mm \(z, y, x\), none of this "
                                         r"model's training grids \[\[2.0, 2.0, 2.0\]\]"):
        CTPatchDataset([str(entry)], elsewhere, entry.parent)
    thicker = dataclasses.replace(cfg, train_spacings=((1.0, 3.0, 3.0),))  # slices raised for a thick CT: accepted
    assert CTPatchDataset([str(entry)], thicker, entry.parent).regions == ["other"]


def test_cache_entries_of_version_4_serve_threshold_models_only(data, cfg, tmp_path):
    """Version 5 changed only the anatomy of models conditioned on another source: a threshold model's older entries
    (e.g. a GPU bundle) stay usable; a TotalSegmentator model's would hold threshold labels, and are refused."""
    import json

    with np.load(data.entries[1][0]) as entry:
        arrays = {key: entry[key] for key in entry.files}
    params = json.loads(str(arrays["params"]))
    arrays["params"] = np.asarray(json.dumps(dict(params, version=4)))
    old = tmp_path / "old-entry.npz"
    np.savez_compressed(old, **arrays)
    assert CTPatchDataset([str(old)], cfg, tmp_path).regions == ["other"]
    totalseg = dataclasses.replace(cfg, anatomy={"source": "totalsegmentator", "encoding": "binary",
                                                 "num_classes": 118})
    arrays["params"] = np.asarray(json.dumps(dict(params, version=4, anatomy=anatomy_spec(totalseg).to_dict())))
    np.savez_compressed(old, **arrays)
    with pytest.raises(InputError, match=r"cache entry of another preprocessing version or region \(4, 'other'\)"):
        CTPatchDataset([str(old)], totalseg, tmp_path)


def test_distributed_sampler_ranks_draw_different_patches(data):
    """Items are a function of the index alone, so disjoint sampler indices are all a rank needs."""
    from torch.utils.data import DistributedSampler

    firsts = [next(iter(DistributedSampler(data, num_replicas=2, rank=r, seed=0))) for r in (0, 1)]
    assert firsts[0] != firsts[1]
    assert not torch.equal(data[firsts[0]]["image"], data[firsts[1]]["image"])


def test_cache_entries_train_without_the_raw_scans(cfg, tmp_path):
    """A folder of cache entries gives the same patches as the CT it came from, and refuses foreign entries."""
    one_grid = dataclasses.replace(cfg, train_spacings=((3.0, 3.0, 3.0),))
    from_ct = CTPatchDataset([CTCase(str(LIMB_NII), region="other")], one_grid, tmp_path / "cache", seed=5)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (entry,) = from_ct.entries[0]
    (shipped / entry.name).write_bytes(entry.read_bytes())
    from_entries = CTPatchDataset(str(shipped), one_grid, tmp_path / "unused", seed=5)
    assert from_entries.regions == ["other"] and not (tmp_path / "unused").exists()
    for i in (0, 3, 8):
        assert torch.equal(from_entries[i]["image"], from_ct[i]["image"])
        assert torch.equal(from_entries[i]["cond"], from_ct[i]["cond"])
    other_window = dataclasses.replace(one_grid, windows=dict(one_grid.windows, other=(-200.0, 300.0)))
    with pytest.raises(InputError, match="another model configuration"):
        CTPatchDataset(str(shipped), other_window, tmp_path)
    np.savez(shipped / "foreign.npz", image=np.zeros(3))
    with pytest.raises(InputError, match="foreign.npz is not a MedDiffFM preprocessed-cache entry"):
        CTPatchDataset(str(shipped), one_grid, tmp_path)


def test_a_damaged_cache_entry_is_rebuilt_or_named(cfg, tmp_path, caplog):
    """A truncated entry used to fail the first training step that drew it, on every rerun, with a traceback."""
    one_grid = dataclasses.replace(cfg, train_spacings=((3.0, 3.0, 3.0),))
    case = [CTCase(str(LIMB_NII), region="other")]
    (entry,) = CTPatchDataset(case, one_grid, tmp_path / "cache", seed=5).entries[0]
    whole = entry.read_bytes()
    entry.write_bytes(whole[:len(whole) // 2])
    again = CTPatchDataset(case, one_grid, tmp_path / "cache", seed=5)
    assert "is damaged; preprocessing" in caplog.text and entry.read_bytes() == whole  # rebuilt, the same
    assert again[0]["image"].shape[-1] == one_grid.patch_size
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    middle = len(whole) // 3  # inside the image array: its checksum fails, the archive still opens
    flipped = whole[:middle] + bytes(b ^ 0xFF for b in whole[middle:middle + 64]) + whole[middle + 64:]
    (shipped / entry.name).write_bytes(flipped)  # given as training data: there is no CT to rebuild it from
    with pytest.raises(InputError, match="the cache entry is damaged"):
        CTPatchDataset(str(shipped), one_grid, tmp_path / "unused")


def test_a_training_file_that_is_not_ct_is_named(cfg, tmp_path):
    cases = [CTCase(str(ABDOMEN_SMALL_NII), region="abdomen"), CTCase(str(LIMB_MASK_NII), region="other")]
    with pytest.raises(InputError, match=r"CT_mask\.nii\.gz: the intensities .* do not look like CT"):
        CTPatchDataset(cases, cfg, tmp_path / "cache", seed=0)  # every case is read (and cached) up front
