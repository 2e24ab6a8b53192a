"""The benchmark scripts run end to end at toy sizes (their numbers are measured elsewhere, not asserted)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LIMB_NII

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def denoise_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # spawned children import the script by name too
    import denoise_speed

    yield denoise_speed
    sys.modules.pop("denoise_speed", None)


def test_denoise_speed_prints_one_row_per_configuration(denoise_speed, capsys):
    # The whole limb slice (with the air around it, so it passes the CT check), 8 slices.
    argv = ["--input", str(LIMB_NII), "--preset", "tiny", "--size", "198", "202", "8", "--nfe", "1",
            "--window-batch", "8", "--memory-format", "contiguous", "channels_last", "--device", "cpu"]
    assert denoise_speed.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2
    assert {row.split("|")[5].strip() for row in rows} == {"contiguous", "channels_last"}
    assert all(float(row.split("|")[8]) > 0 for row in rows)  # seconds
    assert all(row.split("|")[12].strip() == "20.0" for row in rows)  # the default --noise-level
    evaluated, grid = (int(n) for n in rows[0].split("|")[7].split(" of "))
    assert 0 < evaluated < grid  # the windows wholly in the air around the limb are skipped


def test_denoise_speed_reads_a_saved_input_and_projects_more_steps(denoise_speed, capsys, tmp_path):
    saved = tmp_path / "limb.npz"
    assert denoise_speed.main(["--input", str(LIMB_NII), "--save-input", str(saved)]) == 0
    ct = denoise_speed.read_input(LIMB_NII)
    again = denoise_speed.read_input(saved)
    assert (again.array == ct.array).all() and again.spacing == ct.spacing and again.direction == ct.direction
    argv = ["--input", str(saved), "--preset", "tiny", "--size", "198", "202", "8", "--nfe", "1", "3",
            "--window-batch", "8", "--device", "cpu", "--project", "100", "1000", "--estimate-noise"]
    assert denoise_speed.main(argv) == 0
    out = capsys.readouterr().out
    measured = {int(line.split("|")[2]): line for line in out.splitlines() if line.startswith(("| 1 |", "| 3 |"))}
    assert set(measured) == {1, 3}  # steps actually taken
    seconds, setup, per_step = (float(c) for c in measured[3].split("|")[8:11])
    # One stamp per step; a burst of load on the set-up alone may shift the split (a 2x margin was measured).
    assert 0 <= setup < seconds and seconds / 3 / 4 < per_step < seconds / 3 * 2
    assert measured[3].split("|")[12].strip().endswith("estimated")  # a user's set-up, not --noise-level's
    projection = out.split("Projected")[1].splitlines()
    assert any("needs a run of >= 2 steps" in line for line in projection)  # the 1-step run has no step time
    (projected,) = [line for line in projection if line.startswith("| 8 |") and "needs" not in line]
    cells = [float(c) for c in projected.strip("|").split("|")[3:7]]
    assert cells[1] == pytest.approx(per_step, abs=1e-3)
    # Printed to the unit, from a per-step time printed to 1e-3 s: 1000 of its roundings add 0.5 s.
    assert cells[2] == pytest.approx(setup + 100 * per_step, abs=1) and cells[3] == pytest.approx(
        setup + 1000 * per_step, abs=1.01)


def test_network_speed_prints_rates_and_flops_per_channel_variant(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import network_speed

    rows = {}
    for window in ("0", "24"):
        argv = ["--preset", "tiny", "--channels", "preset", "4,16,16", "--options", "eager", "channels_last",
                "--batch", "2", "--iters", "1", "--device", "cpu", "--windows", "100", "--window-size", window]
        assert network_speed.main(argv) == 0
        lines = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        rows[window] = [[cell.strip() for cell in line] for line in lines[1:]]  # the header row first
    assert [(row[0], row[1], row[4]) for row in rows["0"]] == [
        ("8,16,16", "16", "eager"), ("8,16,16", "16", "channels_last"),
        ("4,16,16", "16", "eager"), ("4,16,16", "16", "channels_last")]
    flops = {(row[0], row[1]): float(row[3]) for row in rows["0"] + rows["24"]}
    assert flops["4,16,16", "16"] < flops["8,16,16", "16"]  # fewer full-resolution channels, fewer FLOPs
    assert flops["8,16,16", "24"] > 3 * flops["8,16,16", "16"]  # (24 / 16)^3 = 3.4x the voxels
    assert {row[1] for row in rows["24"]} == {"24"}
    for row in rows["0"] + rows["24"]:
        window = int(row[1])
        # Mvoxel/s is the window rate (printed to the unit) times the window's voxels, printed to 0.01: the two
        # roundings add up; s/step the given window count over the rate.
        voxels = window ** 3 / 1e6
        assert float(row[6]) == pytest.approx(float(row[5]) * voxels, rel=0.01, abs=0.5 * voxels + 0.006)
        # The rate is printed to the unit, so the true rate lies within 0.5 of it, and 100 / rate within the bounds
        # below; s/step adds its own rounding to 0.01 (the two add up: pytest.approx takes the larger, not the sum).
        rate = float(row[5])
        assert 100 / (rate + 0.5) - 0.0051 <= float(row[8]) <= 100 / (rate - 0.5) + 0.0051
    with pytest.raises(SystemExit):
        network_speed.main(["--options", "fast"])
    sys.modules.pop("network_speed", None)


def test_super_resolution_quality_scores_interpolation_and_each_model(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import super_resolution_quality as benchmark

    try:
        thin = benchmark.read_volume(LIMB_NII).crop((slice(0, 10), slice(0, 32), slice(0, 32)))
        thick = benchmark.thick_from_thin(thin, 5)  # asserts that the thin grid comes back from it
        assert thick.shape == (2, 32, 32) and thick.spacing[2] == pytest.approx(5 * thin.spacing[2])
        argv = ["--model", "tiny-super-resolution", "--nfe", "1", "--cases", "STS_002 (limb, 3.27 mm)"]
        assert benchmark.main(argv) == 0
    finally:
        sys.modules.pop("super_resolution_quality", None)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| STS_002")]
    assert [row.split("|")[2].strip() for row in rows] == ["linear interpolation",
                                                           "MedDiffFM `tiny-super-resolution`"]
    assert all(0 < float(row.split("|")[3].split("/")[0]) < 60 for row in rows)  # PSNR in dB


def test_lesion_quality_scores_the_real_lesion_and_each_model(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import lesion_quality as benchmark

    try:
        dot = np.zeros((3, 9, 9), bool)
        dot[1, 4, 4] = True
        assert benchmark.shell(dot).sum() == 7 * 7 - 1 and not benchmark.shell(dot)[[0, 2]].any()  # in-plane ring
        image = np.where(dot, 50.0, -800.0)
        assert benchmark.lesion_scores(image, image, dot) == {"mean": 50.0, "w1": 0.0, "contrast": 850.0}
        argv = ["--model", "tiny-lesion", "--nfe", "1", "--resample", "1", "--seeds", "1",
                "--cases", "STS_002 (sarcoma, limb)"]
        assert benchmark.main(argv) == 0
    finally:
        sys.modules.pop("lesion_quality", None)
    rows = [line.split("|")[2:6] for line in capsys.readouterr().out.splitlines() if line.startswith("| STS_002")]
    assert [row[0].strip() for row in rows] == ["the real lesion", "`tiny-lesion`"]
    assert rows[0][2].strip() == "0" and float(rows[1][2]) > 0  # W1: the real lesion against itself is 0


def test_epsilon_probe_gives_one_error_per_case_range_noise_and_model(monkeypatch, capsys, tmp_path):
    from conftest import ABDOMEN_SMALL_NII
    from MedDiffFMLib.dataset import CTCase

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import epsilon_probe as benchmark

    try:
        monkeypatch.setattr(benchmark, "split_cases", lambda root, split: [CTCase(str(ABDOMEN_SMALL_NII), "abdomen")])
        from MedDiffFMLib.checkpoints import resolve_model

        argv = ["--model", "tiny", "--model", str(resolve_model("tiny")), "--t-range", "5", "20", "--patches", "2", "--bf16",
                "--cache-dir", str(tmp_path)]
        assert benchmark.main(argv) == 0
    finally:
        sys.modules.pop("epsilon_probe", None)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [("5-20", "white"), ("5-20", "CT-textured")]
    for row in rows:
        fp32, bf16, again_fp32, again_bf16 = (float(cell) for cell in row[3:])
        assert fp32 == again_fp32 and bf16 == again_bf16 and 0 < fp32 < 2  # the same noise for every model
        assert abs(bf16 - fp32) < 0.05 * fp32  # bf16 rounds, it does not change the prediction


def test_denoise_probe_splits_the_error_into_bias_and_the_rest(monkeypatch, capsys):
    from conftest import ABDOMEN_SMALL_NII

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import denoise_probe as benchmark

    try:
        monkeypatch.setattr(benchmark, "validation_paths", lambda root: [str(ABDOMEN_SMALL_NII)])
        assert benchmark.main(["--model", "tiny", "--white", "--mirror"]) == 0
    finally:
        sys.modules.pop("denoise_probe", None)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("example_ct_sm")]
    values = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split("; "))
    assert set(values) == {"PSNR", "bias HU", "rms HU", "PSNR without bias", "PSNR with white noise",
                           "PSNR of the mirror ensemble"}
    assert float(values["PSNR without bias"]) >= float(values["PSNR"]) - 0.01  # removing the mean error helps


def test_anomaly_quality_adds_healthy_crops_apart_from_the_lesion(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import anomaly_quality as benchmark

    try:
        grid = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
        image = np.full((4, 8, 12), -1000.0)
        image[:, :, 8:] = -800.0  # lung on the right, like the lesion's own box
        lesion = np.zeros(image.shape, np.uint8)
        lesion[0, 1, 9] = 1
        crops = benchmark.healthy_crops(benchmark.Volume(image, **grid), benchmark.Volume(lesion, **grid),
                                        (2, 4, 4), count=4)
        # Boxes on a grid of their size: the lesion's is left out, and the other three lung boxes come first.
        assert [index for index, _ in crops] == [0, 1, 2, 3] and all(c.shape == (2, 4, 4) for _, c in crops)
        assert [crop.origin for _, crop in crops[:3]] == [(8.0, 4.0, 0.0), (8.0, 0.0, 2.0), (8.0, 4.0, 2.0)]
        assert all((crop.array == -800).all() for _, crop in crops[:3]) and (crops[3][1].array == -1000).all()
        assert benchmark.main(["--out", str(tmp_path), "--healthy-crops", "2"]) == 0
    finally:
        sys.modules.pop("anomaly_quality", None)
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| case")}
    assert set(rows) == {"pyradiomics_lung1", "pyradiomics_lung1_healthy0", "pyradiomics_lung1_healthy1",
                         "ibsi_sts_002", "ts_example_ct_sm", "all 5 cases (3 healthy)"}
    assert rows["ts_example_ct_sm"][0].strip() == "n/a" and 0 <= float(rows["all 5 cases (3 healthy)"][-2]) <= 1


def test_synthetic_nodules_fill_their_sphere_and_keep_the_lung_texture(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import synthetic_nodules as benchmark

    try:
        # A sphere's voxel shares add up to its volume, on fine and on thick slices alike.
        share = benchmark.sphere_fraction((15, 15, 15), (1.0, 1.0, 1.0), (7.0, 7.0, 7.0), 5.0)
        assert share.sum() == pytest.approx(4 / 3 * np.pi * 125, rel=0.02)
        assert share[7, 7, 7] == 1 and share[0, 0, 0] == 0
        thick = benchmark.sphere_fraction((3, 9, 9), (5.0, 1.0, 1.0), (5.0, 4.0, 4.0), 2.0)
        assert thick.sum() * 5 == pytest.approx(4 / 3 * np.pi * 8, rel=0.05) and not thick[[0, 2]].any()

        grid = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
        lung = -850 + 30 * np.random.default_rng(0).standard_normal((12, 12, 12))
        box = benchmark.Volume(lung, **grid)
        inside = np.ones(lung.shape, bool)
        nodule, mask = benchmark.insert_nodule(box, inside, np.random.default_rng(1), 6.0, -20.0)
        raised = nodule.array - lung
        gap = -20 - np.median(lung)
        assert raised.max() == pytest.approx(gap, rel=1e-4)
        assert mask.sum() == pytest.approx(4 / 3 * np.pi * 27, rel=0.2)
        centre = np.round(np.argwhere(mask).mean(axis=0))  # a voxel's centre: the mask is symmetric about it
        assert np.allclose(raised / gap, benchmark.sphere_fraction(box.shape, box.spacing_zyx, centre, 3.0),
                           atol=1e-4)  # the lung's own values are kept, raised by the share inside the sphere
        assert not (mask & (raised < gap / 2)).any() and (raised[~mask] < gap / 2 + 1e-3).all()
        again, _ = benchmark.insert_nodule(box, inside, np.random.default_rng(1), 6.0, -20.0)
        assert np.array_equal(again.array, nodule.array)
        assert benchmark.insert_nodule(box, inside, np.random.default_rng(1), 12.0, -20.0) is None  # no room
        half = inside.copy()
        half[:, :, 6:] = False  # e.g. air outside the body
        for seed in range(5):
            _, mask = benchmark.insert_nodule(box, half, np.random.default_rng(seed), 4.0, -20.0)
            assert mask.any() and not mask[:, :, 5:].any()

        # Lung is below -500 HU inside the body: the air around it is not.
        chest = np.full((3, 80, 80), -1000.0)
        chest[:, 10:70, 10:70] = 40.0
        chest[:, 25:55, 25:55] = -850.0
        assert np.array_equal(benchmark.lung_mask(benchmark.Volume(chest, **grid)), chest == -850)

        lesion = np.zeros((2, 4, 8), bool)
        lesion[0, 0, 0] = True
        lung = np.ones(lesion.shape, bool)
        lung[:, :, 6:] = False
        boxes = benchmark.lung_boxes(lung, lesion, (2, 2, 2), min_lung=0.5)
        assert [tuple(s.start for s in b) for b in boxes] == [(0, 0, 2), (0, 0, 4), (0, 2, 0), (0, 2, 2), (0, 2, 4)]

        assert benchmark.main(["--out", str(tmp_path), "--min-lung", "0.7", "--nodules", "1"]) == 0
    finally:
        sys.modules.pop("synthetic_nodules", None)
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| case")}
    nodules = [name for name in rows if "_nodule" in name]
    assert nodules and all(name.split("_nodule")[0] in rows for name in nodules)
    assert all(float(rows[name][0]) > 0.8 for name in nodules)  # the reference detector finds inserted nodules
    (last,) = [name for name in rows if name.startswith("all ")]
    assert 0 <= float(rows[last][-2]) <= 1
