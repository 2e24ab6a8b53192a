"""Evaluation harness on small real CT crops: tables, figures, classical baselines, anomaly metrics, CLI."""
from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import pytest

from conftest import CHEST_NODULE_NRRD, CHEST_NRRD, LIMB_NII, THREE_SLICE_DICOM
from MedDiffFMLib import baselines
from MedDiffFMLib import evaluate as harness
from MedDiffFMLib.cli import main
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.io import read_mask, read_volume
from MedDiffFMLib.lowdose import simulate_low_dose

PHOTONS = (1e5, 2.5e4)


@pytest.fixture(scope="module")
def cases():
    """Two real CTs (chest, limb), 2 central slices each, 96x96 in-plane centre crops."""
    return [("chest", harness.central_block(read_volume(CHEST_NRRD), 2, 96)),
            ("limb", harness.central_block(read_volume(LIMB_NII), 2, 96))]


@pytest.fixture(scope="module")
def report(cases):
    return harness.evaluate_denoising(cases, harness.classical_methods(), photons=PHOTONS, seed=0)


def test_table_lists_every_case_dose_and_method(report):
    methods = [harness.INPUT_METHOD, "Gaussian 1 px", "NLM", "BM3D"]
    seen = {(r["case"], r["photons"], r["method"]) for r in report.rows}
    assert seen == {(c, d, m) for c in ("chest", "limb") for d in PHOTONS for m in methods}
    assert len(report.rows) == len(seen)
    assert all(r["seconds"] >= 0 and np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for r in report.rows)
    assert any(r["seconds"] > 0 for r in report.rows if r["method"] == "BM3D")


def test_denoisers_beat_the_noisy_input(report):
    psnr = {(r["case"], r["photons"], r["method"]): r["psnr"] for r in report.rows}
    for case in ("chest", "limb"):
        noisy_high, noisy_low = (psnr[(case, d, harness.INPUT_METHOD)] for d in PHOTONS)
        assert noisy_low < noisy_high - 3.0  # a quarter of the dose: clearly noisier
        for method in ("NLM", "BM3D"):
            for dose in PHOTONS:
                assert psnr[(case, dose, method)] > psnr[(case, dose, harness.INPUT_METHOD)] + 1.0
        # BM3D is the strongest classical method at the lowest dose.
        assert psnr[(case, PHOTONS[1], "BM3D")] >= psnr[(case, PHOTONS[1], "NLM")]


def test_report_files(report, tmp_path):
    written = harness.write_denoise_report(report, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["denoise_results.csv", "denoise_results.md", "denoise_chest.png", "denoise_limb.png"])
    with open(tmp_path / "denoise_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert set(harness.DENOISE_COLUMNS) <= set(rows[0])
    assert len(rows) == len(report.rows) + 2 * 4  # plus mean-over-cases rows per dose and method
    text = (tmp_path / "denoise_results.md").read_text()
    for method in (harness.INPUT_METHOD, "Gaussian 1 px", "NLM", "BM3D", "I0 = 100000", "I0 = 25000", "seconds"):
        assert method in text
    for png in ("denoise_chest.png", "denoise_limb.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*"))


def test_crop_keeps_physical_positions(cases):
    full = read_volume(CHEST_NRRD)
    block = harness.central_block(full, 2, 96)
    assert block.shape == (2, 96, 96)
    z0, y0, x0 = (full.shape[0] - 2) // 2, (full.shape[1] - 96) // 2, (full.shape[2] - 96) // 2
    np.testing.assert_array_equal(block.array, full.array[z0:z0 + 2, y0:y0 + 96, x0:x0 + 96])
    expected = full.to_sitk().TransformIndexToPhysicalPoint((x0, y0, z0))
    np.testing.assert_allclose(block.origin, expected, atol=1e-6)
    assert harness.central_block(full, 500).shape == full.shape  # more slices than exist: all of them


def test_context_slices_are_given_but_not_scored(caplog):
    full = read_volume(CHEST_NRRD)
    case = harness.central_case("chest", full, 2, 48, context=3)
    assert case.volume.shape == (8, 48, 48)
    np.testing.assert_array_equal(case.volume.array[case.scored], harness.central_block(full, 2, 48).array)
    # Near the ends of a CT the context is cut short, and the scored slices stay the middle ones.
    short = harness.central_block(full, 6, 48)
    edge = harness.central_case("edge", short, 2, None, context=5)
    assert edge.volume.shape[0] == 6
    np.testing.assert_array_equal(edge.volume.array[edge.scored], short.array[2:4])
    with pytest.raises(InputError):
        harness.central_case("bad", full, 2, context=-1)
    caplog.clear()
    few = harness.central_case("few", short, 10, None)
    assert few.volume.array[few.scored].shape[0] == 6
    assert "few has 6 axial slices, fewer than the 10 asked for: all of them are scored" in caplog.text

    # A method that wrecks the context slices and returns the scored ones untouched scores as the input.
    def wreck_context(noisy, sigma):
        out = np.full(noisy.shape, 3000.0, np.float32)
        out[case.scored] = noisy.array[case.scored]
        return noisy.with_array(out)

    report = harness.evaluate_denoising([case], {"context only": wreck_context}, photons=(1e5,))
    psnr = {r["method"]: r["psnr"] for r in report.rows}
    assert psnr["context only"] == psnr[harness.INPUT_METHOD]
    assert report.examples["chest"][1e5]["clean"].shape == (48, 48)


def test_inputs_and_case_names():
    assert harness.collect_ct_paths([THREE_SLICE_DICOM]) == [THREE_SLICE_DICOM]  # a DICOM series folder
    folder = harness.collect_ct_paths([LIMB_NII.parent])  # a folder of volume files: each of them
    assert folder == sorted(LIMB_NII.parent.glob("*.nii.gz")) and LIMB_NII in folder
    paths = [Path("a/STS_001/CT_image.nii.gz"), Path("a/STS_002/CT_image.nii.gz"), Path("b/lung1.nrrd")]
    assert harness.case_names(paths) == ["STS_001_CT_image", "STS_002_CT_image", "lung1"]
    with pytest.raises(InputError):
        harness.case_names([Path("a/x/CT.nii"), Path("b/x/CT.nii.gz")])
    # a file in the working directory is named after that folder too, not "_CT"
    assert harness.case_names([Path("CT.nii"), Path("b/CT.nii")]) == [f"{Path.cwd().name}_CT", "b_CT"]


def test_case_names_come_from_the_folders_given_not_from_link_targets(tmp_path):
    for folder, store in (("a", "store1"), ("b", "store2")):
        (tmp_path / store).mkdir()
        (tmp_path / store / "CT.nii").touch()
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "CT.nii").symlink_to(tmp_path / store / "CT.nii")
    assert harness.case_names([tmp_path / "a" / "CT.nii", tmp_path / "b" / "CT.nii"]) == ["a_CT", "b_CT"]


def test_baselines_keep_grid_and_input(cases):
    clean = cases[0][1]
    noisy = simulate_low_dose(clean, photons=2.5e4, seed=1)
    before = noisy.array.copy()
    smoothed = baselines.gaussian(noisy, 1.0)
    assert smoothed.same_grid(noisy) and smoothed.array.min() < -500  # Gaussian keeps the full HU range
    for out in (baselines.nlm(noisy, 50.0), baselines.bm3d_denoise(noisy)):
        assert out.same_grid(noisy) and out.array.dtype == np.float32
        assert out.array.min() >= -160 and out.array.max() <= 240  # denoised in the working window
    np.testing.assert_array_equal(noisy.array, before)
    # Without a noise level they estimate it (noise.estimate_noise): close to the truth, so close results.
    true_std = harness.noise_std_in_window(noisy, clean, (-160, 240))
    blind, oracle = baselines.nlm(noisy), baselines.nlm(noisy, true_std)
    assert np.abs(blind.array - oracle.array).mean() < 0.1 * true_std
    with pytest.raises(InputError):
        baselines.nlm(noisy, sigma_hu=0.0)
    with pytest.raises(InputError):
        baselines.bm3d_denoise(noisy, 20.0, window=(240, -160))


def test_anomaly_evaluation_on_real_nodule(tmp_path):
    image = read_volume(CHEST_NRRD)
    mask = read_mask(CHEST_NODULE_NRRD, like=image).array > 0
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    # 3 slices above and below the nodule as healthy crops, in-plane box around it.
    zs = slice(max(z[0] - 3, 0), z[-1] + 4)
    ys, xs = (slice(max(a.min() - 20, 0), a.max() + 20) for a in np.nonzero(mask)[1:])
    mask, ct = mask[zs, ys, xs], image.array[zs, ys, xs]
    rng = np.random.default_rng(0)
    perfect = harness.AnomalyCase("perfect", mask.astype(np.float32), mask, ct)
    noisy_scores = mask + rng.normal(0, 0.5, mask.shape)
    imperfect = harness.AnomalyCase("noisy", noisy_scores, mask)
    rows = harness.evaluate_anomaly([perfect, imperfect])
    assert [r["case"] for r in rows] == ["perfect", "noisy", "all 2 cases"]
    best = rows[0]
    assert best["pixel_auroc"] == 1.0 and best["best_dice"] == 1.0 and best["pro"] == pytest.approx(1.0)
    assert best["image_auroc"] == 1.0 and best["lesion_slices"] == len(z) and best["healthy_slices"] > 0
    assert 0.8 < rows[1]["pixel_auroc"] < 1.0 and rows[1]["best_dice"] < 1.0 and rows[1]["pro"] < 1.0
    assert rows[2]["pixel_auroc"] == pytest.approx((rows[0]["pixel_auroc"] + rows[1]["pixel_auroc"]) / 2)
    written = harness.write_anomaly_report(rows, [perfect, imperfect], tmp_path)
    assert {p.name for p in written} == {"anomaly_results.csv", "anomaly_results.md",
                                         "anomaly_perfect.png", "anomaly_noisy.png"}
    assert "pixel_auroc" in (tmp_path / "anomaly_results.md").read_text()
    with pytest.raises(InputError):
        harness.evaluate_anomaly([harness.AnomalyCase("empty", noisy_scores, np.zeros_like(mask))])


def test_cli_denoise_and_errors(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["evaluate", "denoise", str(LIMB_NII), "--slices", "2", "--crop", "64", "--photons", "5e4",
                 "--methods", "gaussian", "nlm", "--out", str(out)])
    assert code == 0
    assert "| NLM |" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"denoise_results.csv", "denoise_results.md", "denoise_CT_image.png"}
    # The same report again is refused before any denoising: it would replace all three files.
    figure = (out / "denoise_CT_image.png").read_bytes()
    assert main(["evaluate", "denoise", str(LIMB_NII), "--slices", "2", "--crop", "64", "--methods", "gaussian",
                 "--out", str(out)]) == 2
    assert ("already holds denoise_results.csv, denoise_results.md, denoise_CT_image.png (an earlier report); give "
            "--overwrite to replace them, or another --out") in capsys.readouterr().err
    assert (out / "denoise_CT_image.png").read_bytes() == figure
    assert main(["evaluate", "denoise", str(tmp_path / "missing.nii.gz"), "--out", str(out)]) == 2
    assert main(["evaluate", "anomaly", "--scores", str(LIMB_NII), str(LIMB_NII), "--masks", str(LIMB_NII),
                 "--out", str(out)]) == 2
    assert "one mask" in capsys.readouterr().err
    # one row per case, dose and method: a dose given twice would be averaged as if it were two cases
    assert main(["evaluate", "denoise", str(LIMB_NII), "--photons", "1e5", "100000", "--out", str(out)]) == 2
    assert "--photons lists 100000 more than once" in capsys.readouterr().err
    # A model denoises whole blocks: one thinner than its minimum is refused by what sets it, before any work.
    assert main(["evaluate", "denoise", str(LIMB_NII), "--slices", "2", "--context-slices", "2", "--model", "tiny",
                 "--out", str(tmp_path / "thin")]) == 2
    assert ("case CT_image: its block is 6 slices thick (--slices 2 scored, up to --context-slices 2 on each side), "
            "and MedDiffFM needs at least 8: raise --slices or --context-slices") in capsys.readouterr().err


def test_errors_name_the_case_they_come_from(tmp_path, capsys):
    """With a folder of CTs, "the image has 25 NaN voxels" alone does not say which file to fix."""
    limb = sitk.ReadImage(str(LIMB_NII))
    broken = sitk.GetArrayFromImage(limb).astype(np.float32)
    broken[5, 5, 5] = np.nan
    bad = sitk.GetImageFromArray(broken)
    bad.CopyInformation(limb)
    sitk.WriteImage(bad, str(tmp_path / "broken.nii.gz"))
    assert main(["evaluate", "denoise", str(LIMB_NII), str(tmp_path / "broken.nii.gz"), "--methods", "gaussian",
                 "--out", str(tmp_path / "out")]) == 2
    assert f"error: {tmp_path / 'broken.nii.gz'}: the image has 1 NaN" in capsys.readouterr().err
    mask = sitk.Image(limb.GetSize(), sitk.sitkUInt8) + 1  # a "lesion" everywhere: no healthy voxel to rank
    mask.CopyInformation(limb)
    sitk.WriteImage(mask, str(tmp_path / "all.nii.gz"))
    assert main(["evaluate", "anomaly", "--scores", str(LIMB_NII), "--masks", str(tmp_path / "all.nii.gz"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "error: case CT_image" in capsys.readouterr().err


def test_meddifffm_plugs_in(tmp_path):
    """The real denoising task runs as a harness method (random tiny model: wiring, not quality)."""
    import torch

    from MedDiffFMLib.checkpoints import save_model
    from MedDiffFMLib.config import preset
    from MedDiffFMLib.errors import CheckpointError
    from MedDiffFMLib.network import MedDiffNet

    torch.manual_seed(0)
    cfg = preset("tiny")
    weights = save_model(MedDiffNet(cfg).state_dict(), cfg, tmp_path / "tiny")
    method = harness.meddifffm_method(str(weights), nfe=2, region="chest", device="cpu")
    chest = harness.central_block(read_volume(CHEST_NRRD), 8, 40)
    report = harness.evaluate_denoising([("chest", chest)], {"MedDiffFM": method}, photons=(5e4,))
    row = report.rows[-1]
    assert row["method"] == "MedDiffFM" and row["seconds"] > 0 and np.isfinite(row["psnr"])
    with pytest.raises(CheckpointError):
        harness.meddifffm_method(str(tmp_path / "missing.safetensors"))


def test_cli_compares_several_models(tmp_path, capsys):
    """`--model` repeated: each model gets its own column, named so the table tells them apart."""
    import torch

    from MedDiffFMLib.checkpoints import save_model
    from MedDiffFMLib.config import preset
    from MedDiffFMLib.network import MedDiffNet

    torch.manual_seed(1)
    candidate = save_model(MedDiffNet(preset("tiny")).state_dict(), preset("tiny"), tmp_path / "run" / "ema")
    out = tmp_path / "out"
    assert main(["evaluate", "denoise", str(CHEST_NRRD), "--slices", "8", "--crop", "40", "--photons", "5e4",
                 "--methods", "gaussian", "--model", "tiny", "--model", str(candidate), "--nfe", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    with open(out / "denoise_results.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert {"MedDiffFM tiny", "MedDiffFM run/ema"} <= set(rows)
    # Different weights give different images, so the two columns must differ.
    assert rows["MedDiffFM tiny"]["psnr"] != rows["MedDiffFM run/ema"]["psnr"]
    assert "MedDiffFM run/ema" in capsys.readouterr().out


def test_cli_passes_the_window_options_to_meddifffm(tmp_path, monkeypatch):
    """--overlap and --window-size reach MedDiffFM's denoising (e.g. to score a cheaper tiling); unset, the task's
    own defaults apply."""
    from MedDiffFMLib import evaluate as harness

    given = []

    def recording(model, **options):
        given.append(options)
        return lambda vol, sigma: vol

    monkeypatch.setattr(harness, "meddifffm_method", recording)
    common = ["evaluate", "denoise", str(CHEST_NRRD), "--slices", "2", "--context-slices", "3", "--crop", "32",
              "--photons", "5e4", "--methods", "--model", "tiny", "--device", "cpu"]
    assert main(common + ["--overlap", "0.125", "--window-size", "24", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    assert given[0]["overlap"] == 0.125 and given[0]["window_size"] == 24
    assert "overlap" not in given[1] and given[1]["window_size"] is None


def test_models_that_would_share_a_short_name_keep_their_own_rows():
    from MedDiffFMLib.commands.evaluate import _model_labels

    assert _model_labels(["a/run/ema.safetensors"]) == ["MedDiffFM"]
    assert _model_labels(["tiny", "a/run/ema.safetensors", "b/run/ema.safetensors"]) == [
        "MedDiffFM tiny", "MedDiffFM a/run/ema.safetensors", "MedDiffFM b/run/ema.safetensors"]
    with pytest.raises(InputError, match="a --model is given twice \\(tiny name the same file\\)"):
        _model_labels(["tiny", "tiny"])
    from MedDiffFMLib.checkpoints import resolve_model

    with pytest.raises(InputError, match="given twice"):  # a registered name and its file are one model
        _model_labels(["tiny", str(resolve_model("tiny"))])


def test_cli_anomaly_on_files(tmp_path, capsys, caplog):
    from MedDiffFMLib.io import write_volume

    image = read_volume(CHEST_NRRD)
    mask = read_mask(CHEST_NODULE_NRRD, like=image)
    z = np.flatnonzero(mask.array.any(axis=(1, 2)))
    box = (slice(z[0] - 3, z[-1] + 4), slice(300, 420), slice(160, 280))
    assert mask.array[box].sum() == mask.array.sum()  # the whole nodule is in the box
    ct, lesion = image.crop(box), mask.crop(box)
    scores = lesion.with_array((lesion.array > 0) + np.random.default_rng(0).normal(0, 0.3, lesion.shape))
    paths = [write_volume(v, tmp_path / f"{n}.nii.gz") for v, n in ((ct, "ct"), (lesion, "m"), (scores, "s"))]
    out = tmp_path / "out"
    assert main(["evaluate", "anomaly", "--scores", str(paths[2]), "--masks", str(paths[1]),
                 "--images", str(paths[0]), "--out", str(out)]) == 0
    assert "| s |" in capsys.readouterr().out
    with open(out / "anomaly_results.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["pixel_auroc"]) > 0.95 and float(row["image_auroc"]) == 1.0
    assert (out / "anomaly_s.png").exists()
    # An earlier report is replaced only on --overwrite, refused before any file is read.
    table = (out / "anomaly_results.csv").read_bytes()
    renamed = paths[2].with_name("t.nii.gz")
    paths[2].rename(renamed)
    assert main(["evaluate", "anomaly", "--scores", str(renamed), "--masks", str(paths[1]), "--out", str(out)]) == 2
    assert (f"{out} already holds anomaly_results.csv, anomaly_results.md (an earlier report); give --overwrite"
            in capsys.readouterr().err)
    assert (out / "anomaly_results.csv").read_bytes() == table
    # A rerun with another case into the same folder names the first run's figure, which its table no longer lists.
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "anomaly", "--scores", str(renamed), "--masks", str(paths[1]), "--out", str(out),
                     "--overwrite"]) == 0
    assert "figures that this run did not make" in caplog.text and "anomaly_s.png" in caplog.text
    assert "anomaly_t.png" not in caplog.text and (out / "anomaly_s.png").exists()
    # Scores that hold NaN are refused as such, by case and file (before: "best_dice: scores contain NaN").
    nan_scores = scores.with_array(np.where(lesion.array > 0, np.nan, scores.array))
    nan_path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(nan_scores.to_sitk(), str(nan_path))  # write_volume refuses NaN, as results must not hold it
    assert main(["evaluate", "anomaly", "--scores", str(nan_path), "--masks", str(paths[1]),
                 "--out", str(tmp_path / "nan_out")]) == 2
    assert (f"case nan ({nan_path}): the score volume holds NaN or infinite values; fix the score map first"
            in capsys.readouterr().err)
    # the CT of the figure must lie on the scores' grid, not just have their shape
    moved = write_volume(dataclasses.replace(ct, origin=tuple(o + 5 for o in ct.origin)), tmp_path / "moved.nii.gz")
    assert main(["evaluate", "anomaly", "--scores", str(renamed), "--masks", str(paths[1]), "--images", str(moved),
                 "--out", str(out), "--overwrite"]) == 2
    assert "is not on the score volume's grid: origin" in capsys.readouterr().err


def _nodule_crop():
    image = read_volume(CHEST_NRRD)
    mask = read_mask(CHEST_NODULE_NRRD, like=image).array > 0
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    box = (slice(z[0] - 3, z[-1] + 4), slice(300, 420), slice(160, 280))
    return mask[box]


def test_anomaly_scores_only_the_searched_region(caplog):
    """A detect-anomalies map is 0 outside its search region; scored there, those voxels are easy negatives that
    raise AUROC and PRO. With the region given, every metric equals the one computed on its voxels alone."""
    from MedDiffFMLib import metrics

    mask = _nodule_crop()
    zs, ys, xs = np.nonzero(mask)
    searched = np.zeros(mask.shape, bool)  # a box around the nodule, half the crop's width
    searched[:, max(ys.min() - 12, 0):ys.max() + 13, max(xs.min() - 12, 0):xs.max() + 13] = True
    rng = np.random.default_rng(1)
    scores = np.where(searched, mask + rng.normal(0, 0.8, mask.shape), 0.0)
    with caplog.at_level(logging.WARNING):
        plain = harness.evaluate_anomaly([harness.AnomalyCase("plain", scores, mask)])[0]
    assert "exactly 0, as outside the search region" in caplog.text
    limited = harness.evaluate_anomaly([harness.AnomalyCase("limited", scores, mask, searched=searched)])[0]
    box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(searched))
    assert limited["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(scores[box], mask[box]))
    assert limited["pro"] == pytest.approx(metrics.pro_score(scores[box], mask[box]))
    assert limited["best_dice"] == pytest.approx(metrics.best_dice(scores[box], mask[box])[0])
    assert plain["pixel_auroc"] > limited["pixel_auroc"] + 0.005 and plain["pro"] > limited["pro"] + 0.01
    unread = np.where(searched, scores, np.nan)  # what lies outside the region is never read
    assert harness.evaluate_anomaly([harness.AnomalyCase("nan", unread, mask, searched=searched)])[0] == \
        dict(limited, case="nan")
    with pytest.raises(InputError, match="no lesion voxel lies inside the search region"):
        harness.evaluate_anomaly([harness.AnomalyCase("apart", scores, mask, searched=~searched)])
    # Slices the region does not reach are left out of the slice-level AUROC.
    thin = searched.copy()
    thin[: zs.min() - 1] = thin[zs.max() + 2:] = False
    row = harness.evaluate_anomaly([harness.AnomalyCase("thin", scores, mask, searched=thin)])[0]
    assert (row["lesion_slices"], row["healthy_slices"]) == (len(set(zs)), 2)


def test_cli_anomaly_takes_the_search_regions(tmp_path, capsys):
    from MedDiffFMLib.io import Volume, write_volume

    mask = _nodule_crop()
    searched = np.zeros(mask.shape, np.uint8)
    searched[:, 10:110, 10:110] = 1
    scores = np.where(searched > 0, mask + np.random.default_rng(2).normal(0, 0.8, mask.shape), 0.0)
    grid = dict(spacing=(0.7, 0.7, 5.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    paths = [write_volume(Volume(array, **grid), tmp_path / f"{name}.nii.gz")
             for array, name in ((scores.astype(np.float32), "s"), (mask.astype(np.uint8), "m"), (searched, "r"))]
    out = tmp_path / "out"
    assert main(["evaluate", "anomaly", "--scores", str(paths[0]), "--masks", str(paths[1]), "--regions",
                 str(paths[2]), "--out", str(out)]) == 0
    with open(out / "anomaly_results.csv") as handle:
        row = next(csv.DictReader(handle))
    expected = harness.evaluate_anomaly([harness.AnomalyCase("s", scores, mask, searched=searched)])[0]
    assert float(row["pixel_auroc"]) == pytest.approx(expected["pixel_auroc"], abs=1e-4)
    assert main(["evaluate", "anomaly", "--scores", str(paths[0]), "--masks", str(paths[1]), "--regions",
                 str(paths[2]), str(paths[2]), "--out", str(out)]) == 2
    assert "one region) per score volume" in capsys.readouterr().err


def test_healthy_cases_add_healthy_slices_and_a_case_ranking(tmp_path):
    """A healthy case (mask None) has no voxel metrics; its slices join the pooled slice AUROC as healthy ones, and
    the last row ranks lesion cases against healthy ones by each case's image score (detect-anomalies' score)."""
    from MedDiffFMLib import metrics

    mask = _nodule_crop()
    lesion = harness.AnomalyCase("nodule", mask.astype(np.float32), mask)
    hot_slice = np.full(mask.shape, 0.1)
    hot_slice[2, 5, 5] = 2.0  # one voxel of one healthy slice scores above every lesion slice
    rows = harness.evaluate_anomaly([lesion, harness.AnomalyCase("calm", np.full(mask.shape, 0.5), None),
                                     harness.AnomalyCase("hot", hot_slice, None)])
    nodule, calm, hot, pooled = rows
    assert nodule["pixel_auroc"] == 1.0 and nodule["case_score"] == 1.0
    assert calm["case_score"] == 0.5 and hot["case_score"] == 2.0
    assert all(np.isnan(row[key]) for row in (calm, hot)
               for key in ("pixel_auroc", "image_auroc", "best_dice", "best_dice_threshold", "pro"))
    assert (calm["lesion_slices"], calm["healthy_slices"]) == (0, len(mask))
    assert pooled["case"] == "all 3 cases (2 healthy)" and pooled["pixel_auroc"] == 1.0
    assert pooled["pro"] == pytest.approx(1.0)
    healthy_slices = nodule["healthy_slices"] + 2 * len(mask)
    assert pooled["healthy_slices"] == healthy_slices and pooled["lesion_slices"] == nodule["lesion_slices"]
    assert pooled["image_auroc"] == pytest.approx(1 - 1 / healthy_slices)  # only the hot slice outranks them
    assert pooled["case_auroc"] == 0.5  # above "calm", below "hot"
    assert "case_auroc" not in nodule and "case_score" not in pooled
    assert metrics.anomaly_image_score(hot_slice) == hot["case_score"]
    # A healthy case's search region limits its slices and its score like a lesion case's.
    searched = np.zeros(mask.shape, bool)
    searched[3:5, 20:40, 20:40] = True
    limited = harness.evaluate_anomaly([lesion, harness.AnomalyCase("hot", hot_slice, None, searched=searched)])[1]
    assert (limited["healthy_slices"], limited["case_score"]) == (2, 0.1)
    written = harness.write_anomaly_report(rows, [lesion], tmp_path)
    assert "| all 3 cases (2 healthy) |" in (tmp_path / "anomaly_results.md").read_text()
    figure = harness.write_anomaly_report(rows, [harness.AnomalyCase("hot", hot_slice, None)], tmp_path / "h")[-1]
    assert figure.name == "anomaly_hot.png" and figure.stat().st_size > 0 and written
    # An empty mask is a mistake until said otherwise, and a table of healthy cases alone has nothing to detect.
    with pytest.raises(InputError, match="scored as healthy only when said so"):
        harness.evaluate_anomaly([lesion, harness.AnomalyCase("empty", hot_slice, np.zeros_like(mask))])
    with pytest.raises(InputError, match="no case has a lesion"):
        harness.evaluate_anomaly([harness.AnomalyCase("calm", hot_slice, None)])


def test_cli_anomaly_takes_healthy_cases(tmp_path, capsys):
    from MedDiffFMLib.io import Volume, write_volume

    mask = _nodule_crop()
    grid = dict(spacing=(0.7, 0.7, 5.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    calm = np.random.default_rng(3).normal(0, 0.1, mask.shape).astype(np.float32)
    paths = [write_volume(Volume(array, **grid), tmp_path / f"{name}.nii.gz")
             for array, name in ((mask.astype(np.float32), "s"), (mask.astype(np.uint8), "m"), (calm, "calm"))]
    out = tmp_path / "out"
    assert main(["evaluate", "anomaly", "--scores", str(paths[0]), str(paths[2]), "--masks", str(paths[1]),
                 "healthy", "--out", str(out)]) == 0
    assert "| all 2 cases (1 healthy) |" in capsys.readouterr().out
    with open(out / "anomaly_results.csv") as handle:
        lesion, healthy, pooled = csv.DictReader(handle)
    assert healthy["case"] == "calm" and healthy["pixel_auroc"] == "nan" and healthy["lesion_slices"] == "0"
    assert float(healthy["case_score"]) == pytest.approx(calm.max(), rel=1e-5)
    assert float(pooled["case_auroc"]) == 1.0 and pooled["case_score"] == "" and lesion["case_auroc"] == ""
    assert {p.name for p in out.glob("*.png")} == {"anomaly_s.png", "anomaly_calm.png"}


def test_a_healthy_case_is_shown_and_refused_within_its_search_region(monkeypatch, tmp_path):
    """A healthy case's figure showed the hottest slice of the whole map, outside the region that gave its score; an
    empty region of a healthy case was refused as 'needs at least one voxel, and finite values'; and NaN scores
    (API) were refused without the case's name."""
    import contextlib

    import matplotlib.pyplot as plt

    shape = (6, 10, 10)
    mask = np.zeros(shape, bool)
    mask[4, 5, 5] = True
    scores = np.full(shape, 0.1)
    scores[0, 0, 0], scores[4, 5, 5] = 5.0, 1.0  # the hottest voxel lies outside the region searched
    searched = np.zeros(shape, bool)
    searched[3:, 2:8, 2:8] = True
    healthy = harness.AnomalyCase("calm", scores, None, searched=searched)
    assert harness.evaluate_anomaly([harness.AnomalyCase("les", scores, mask, searched=searched),
                                     healthy])[1]["case_score"] == 1.0
    titles = []

    @contextlib.contextmanager
    def figure(path, dpi, **options):
        fig, axes = plt.subplots(**options)
        yield fig, axes
        titles.append(fig._suptitle.get_text())
        plt.close(fig)

    monkeypatch.setattr(harness, "png_figure", figure)
    harness._anomaly_figure(healthy, tmp_path / "calm.png")
    assert titles == ["calm: slice 4 (healthy case: the slice scoring highest)"]
    lesion = harness.AnomalyCase("les", scores, mask)
    with pytest.raises(InputError, match="case calm: the search region is empty"):
        harness.evaluate_anomaly([lesion, dataclasses.replace(healthy, searched=np.zeros(shape, bool))])
    scores_nan = scores.copy()
    scores_nan[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="^case nan: "):
        harness.evaluate_anomaly([harness.AnomalyCase("nan", scores_nan, mask)])
