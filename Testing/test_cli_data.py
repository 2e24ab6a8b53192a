"""CLI `info` and `preprocess` on real CT, and every bad input of issue A item 6 (made from real CT)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import (ABDOMEN_DICOM, ABDOMEN_NII, CHEST_NODULE_NRRD, CHEST_NRRD, CT_DATA, HEAD_TILTED_DICOM,
                      LIMB_MASK_NII, LIMB_NII, REPO, THREE_SLICE_DICOM, grid_centre, oblique_dicom_series)
from MedDiffFMLib.cli import main
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.io import Volume, read_volume, write_volume
from MedDiffFMLib.preprocess import resample, unit_to_hu
from MedDiffFMLib.validation import check_ct


def test_every_task_has_help_without_empty_or_repeated_defaults(capsys):
    from MedDiffFMLib.cli import build_parser

    commands = dict(build_parser()._subparsers._group_actions[0].choices)
    assert {"denoise", "detect-anomalies", "synthesize", "super-resolve", "generate-lesion", "inpaint",
            "train", "finetune", "evaluate", "preprocess", "info"} <= set(commands)
    for name, parser in commands["evaluate"]._subparsers._group_actions[0].choices.items():
        commands[f"evaluate {name}"] = parser
    for name, parser in commands.items():
        with pytest.raises(SystemExit) as stop:
            main(name.split() + ["--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert text.startswith("usage: python -m MedDiffFMLib " + name) and "(default: None)" not in text, name
        formatter = parser._get_formatter()
        for action in parser._actions:  # a help that states its default is not given a second one
            assert len(re.findall(r"\(default[ :]", formatter._get_help_string(action))) <= 1, action.option_strings
    assert "(default: 10.0)" in " ".join(commands["denoise"].format_help().split())  # plain defaults still shown
    # ... and a help that states its own default keeps it ("tiny, default or paper (default: default, or ...)")
    assert "paper (default: default, or the configuration of the --init-from model)" in " ".join(
        commands["train"].format_help().split())


@pytest.fixture(scope="module")
def limb():
    return read_volume(LIMB_NII)


def make_bad_inputs(limb, folder):
    """Each bad input from a real CT, with the phrase its error message must contain."""
    image = limb.to_sitk()
    cases = {}

    def save(name, img, phrase):
        sitk.WriteImage(img, str(folder / name))
        cases[name] = phrase

    save("slice2d.nii.gz", image[:, :, 30], "is 2D")
    save("one_slice3d.nii.gz", image[:, :, 30:31], "is 2D")
    save("series4d.nii.gz", sitk.JoinSeries([image, image]), "is 4D")
    nan = limb.array.copy()
    nan[30, 100, 100:110] = np.nan
    save("nan.nii.gz", limb.with_array(nan).to_sitk(), "10 NaN or infinite")
    mr_like = (limb.array - limb.array.min()) * 1.5  # 0..3600, no air: an MR-like range
    save("mr_like.nii.gz", limb.with_array(mr_like).to_sitk(), "do not look like CT")
    unit = (limb.array - limb.array.min()) / np.ptp(limb.array)
    save("normalised.nii.gz", limb.with_array(unit.astype(np.float32)).to_sitk(), "do not look like CT")
    # DICOM padding outside the field of view, cropped: not "no voxel below -50 HU", which would be untrue.
    save("padding.nii.gz", limb.with_array(np.full(limb.shape, -3024, np.int16)).to_sitk(),
         "the image is uniform (every voxel is -3024)")
    air = np.full(limb.shape, -1000, np.int16)
    air[::2] = -990
    save("air.nii.gz", limb.with_array(air).to_sitk(), "air without the soft tissue or bone of a body")
    thick = limb.to_sitk()
    thick.SetSpacing((0.2, 0.2, 5.0))
    save("anisotropic.nii.gz", thick, "extremely anisotropic")
    (folder / "garbage.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    cases["garbage.nrrd"] = "cannot read"
    return cases


@pytest.mark.parametrize("path", [
    CHEST_NRRD, ABDOMEN_NII, LIMB_NII, HEAD_TILTED_DICOM, ABDOMEN_DICOM,
    CT_DATA / "totalsegmentator" / "aorta_ct_cropped" / "ct_cropped.nii.gz",
], ids=lambda p: p.parent.name)
def test_real_cts_pass_the_input_checks(path):
    """No false alarms: every real 3D CT of the test data is accepted (at most with warnings)."""
    warnings = check_ct(read_volume(path))
    assert all("anisotropic" in w for w in warnings)


def test_each_bad_image_gives_its_error_and_exit_code_2(limb, tmp_path, capsys):
    for name, phrase in make_bad_inputs(limb, tmp_path).items():
        assert main(["info", str(tmp_path / name)]) == 2, name
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and phrase in err, (name, err)
        if name in ("nan.nii.gz", "mr_like.nii.gz", "normalised.nii.gz", "anisotropic.nii.gz"):
            # read, then refused: what was read is shown with the error
            assert out.startswith(f"input:      {tmp_path / name}") and "spacing:" in out, (name, out)
        out = tmp_path / f"out_{name.split('.')[0]}.nii.gz"
        assert main(["preprocess", str(tmp_path / name), "-o", str(out)]) == 2, name
        assert phrase in capsys.readouterr().err
        assert not out.exists()


def test_bad_masks_give_their_errors(limb, tmp_path, capsys):
    empty = tmp_path / "empty.nii.gz"
    write_volume(limb.with_array(np.zeros(limb.shape, np.uint8)), empty)
    for mask, phrase in [(empty, "is empty"), (CHEST_NODULE_NRRD, "not on the grid of the image: size")]:
        assert main(["info", str(LIMB_NII), "--mask", str(mask)]) == 2
        assert phrase in capsys.readouterr().err
        assert main(["preprocess", str(LIMB_NII), "--mask", str(mask), "-o", str(tmp_path / "o.nii.gz")]) == 2
        assert phrase in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [empty]  # nothing written


def test_info_json_on_real_case(capsys):
    assert main(["info", str(LIMB_NII), "--mask", str(LIMB_MASK_NII), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size_xyz"] == [198, 202, 59]
    assert report["hu_range"] == [-1000.0, 1397.0]
    assert report["region"] == "other" and report["region_reason"]
    assert report["mask"]["label_ml"]["1"] == pytest.approx(365.3, rel=0.01)
    assert set(report["anatomy_ml"]) == {"air/lung", "fat", "soft tissue", "bone"}


def test_info_states_each_warning_once(capsys, caplog, tmp_path):
    assert main(["info", str(CHEST_NRRD)]) == 0
    printed = capsys.readouterr()
    assert (printed.out + printed.err + caplog.text).count("is anisotropic (ratio 8.8)") == 1
    # The reader's warnings too, and in the JSON report (they were only logged).
    assert main(["info", "--json", str(HEAD_TILTED_DICOM)]) == 0
    printed = capsys.readouterr()
    warnings = json.loads(printed.out)["warnings"]
    assert any("sheared (gantry tilt" in w for w in warnings) and any("resampled onto 37" in w for w in warnings)
    assert "gantry tilt" not in printed.err + caplog.text
    # Messages below warnings still come as ever (which series of a folder was read, for one).
    folder = tmp_path / "two"
    folder.mkdir()
    for source in (ABDOMEN_DICOM, THREE_SLICE_DICOM):
        for f in sorted(source.iterdir())[:10]:
            (folder / f"{source.name}-{f.name}").write_bytes(f.read_bytes())
    caplog.clear()
    caplog.set_level("INFO", logger="MedDiffFMLib.io")
    assert main(["info", str(folder)]) == 0  # 10 abdomen slices, 3 of the other series
    assert "holds 2 DICOM series; reading the largest" in caplog.text


def test_preprocess_writes_window_anatomy_mask_sidecar_preview(limb, tmp_path, capsys):
    out = tmp_path / "limb.nii.gz"
    args = ["preprocess", str(LIMB_NII), "-o", str(out), "--spacing", "2", "--mask", str(LIMB_MASK_NII)]
    assert main(args) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["limb.json", "limb.nii.gz", "limb_anatomy.nii.gz", "limb_mask.nii.gz", "limb_preview.png"]
    image = read_volume(out)
    assert image.spacing == (2.0, 2.0, 2.0) and image.direction == pytest.approx(limb.direction)
    np.testing.assert_allclose(grid_centre(image), grid_centre(limb), atol=1e-3)  # resampling keeps the field of view
    assert image.array.min() >= -1 and image.array.max() <= 1
    sidecar = json.loads((tmp_path / "limb.json").read_text())
    assert sidecar["region"] == "other" and sidecar["window_hu"] == [-150.0, 250.0]
    assert sidecar["original_grid"]["size_xyz"] == [198, 202, 59]
    # The written image is the resampled CT clipped to the window: the inverse map recovers it.
    expected = np.clip(resample(limb, (2.0, 2.0, 2.0)).array, -150, 250)
    np.testing.assert_allclose(unit_to_hu(image.array, sidecar["window_hu"]), expected, atol=0.05)
    anatomy = read_volume(tmp_path / "limb_anatomy.nii.gz")
    assert anatomy.same_grid(image) and set(np.unique(anatomy.array)) == {0, 1, 2, 3, 4}
    mask = read_volume(tmp_path / "limb_mask.nii.gz")
    assert mask.array.sum() * 8 / 1000 == pytest.approx(365.3, rel=0.05)
    assert (tmp_path / "limb_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Existing outputs are kept unless --overwrite; a user region overrides the guess.
    before = out.read_bytes()
    assert main(args + ["--region", "chest"]) == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(args + ["--region", "chest", "--overwrite"]) == 0
    sidecar = json.loads((tmp_path / "limb.json").read_text())
    assert sidecar["region"] == "chest" and sidecar["window_hu"] == [-1400.0, 400.0]


def test_preprocess_records_the_readers_warnings_in_its_sidecar(tmp_path, caplog):
    out = tmp_path / "head.nii.gz"
    assert main(["preprocess", str(HEAD_TILTED_DICOM), "-o", str(out), "--spacing", "4"]) == 0
    recorded = json.loads((tmp_path / "head.json").read_text())["warnings"]
    assert any("sheared (gantry tilt" in w for w in recorded) and any("resampled onto 37" in w for w in recorded)
    assert "sheared (gantry tilt" in caplog.text  # and logged as they come


def test_preprocess_into_a_folder_is_refused_like_every_task(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path)):  # its extra outputs are named after the file: there was none (a traceback)
        assert main(["preprocess", str(LIMB_NII), "-o", out]) == 2
        assert "is a folder; give a file name such as" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_preprocess_refuses_a_spacing_that_leaves_almost_no_voxels(tmp_path, capsys):
    out = tmp_path / "coarse.nii.gz"
    assert main(["preprocess", str(LIMB_NII), "-o", str(out), "--spacing", "100"]) == 2
    assert "leaves a grid of 2 x 2 x 2 voxels (x y z); at least 8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # ... or one so fine that the new grid could not fit in memory (the system used to kill the process).
    assert main(["preprocess", str(LIMB_NII), "-o", str(out), "--spacing", "0.001"]) == 2
    assert "error: resampling to 0.001 x 0.001 x 0.001 mm (" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_preprocess_never_writes_onto_its_input(tmp_path, capsys):
    source = tmp_path / "ct.nii.gz"
    source.write_bytes(LIMB_NII.read_bytes())
    assert main(["preprocess", str(source), "-o", str(source), "--overwrite"]) == 2
    assert "is an input" in capsys.readouterr().err
    assert source.read_bytes() == LIMB_NII.read_bytes()


def test_an_unknown_option_is_refused_with_the_tasks_own_usage(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["detect-anomalies", str(LIMB_NII), "-o", "a.nrrd", "--nfe", "3"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith("usage: python -m MedDiffFMLib detect-anomalies")
    assert "python -m MedDiffFMLib detect-anomalies: error: unrecognized arguments: --nfe 3" in err
    with pytest.raises(SystemExit):  # the benchmarks of `evaluate` too
        main(["evaluate", "denoise", str(LIMB_NII), "--out", "x", "--bogus"])
    assert capsys.readouterr().err.startswith("usage: python -m MedDiffFMLib evaluate denoise")


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "denoise", "--crop", "5"], "argument --crop: must be 0 (the whole slice) or at least 11 pixels"),
    (["evaluate", "denoise", "--gaussian-sigma", "0"], "argument --gaussian-sigma: must be a number above 0"),
    (["evaluate", "anomaly", "--scores", "s.nii.gz", "--masks", "m.nii.gz", "--max-fpr", "2"],
     "argument --max-fpr: must be a false-positive rate in (0, 1]"),
    (["preprocess", "-o", "x.nii.gz", "--spacing", "1", "-2", "1"], "argument --spacing: must be a number above 0"),
], ids=["crop", "gaussian-sigma", "max-fpr", "spacing"])
def test_impossible_sizes_are_refused_while_parsing(argv, message, tmp_path, capsys):
    """Refused with the option's name before any file is read: the input here does not even exist."""
    missing = str(tmp_path / "missing.nii.gz")
    argv = argv[:2] + [missing] + argv[2:] if argv[0] == "evaluate" and argv[1] == "denoise" else (
        argv + ["--out", str(tmp_path / "out")] if argv[0] == "evaluate" else [argv[0], missing] + argv[1:])
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_negative_numbers_in_scientific_notation_are_values_not_options():
    from MedDiffFMLib.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["denoise", "ct.nii.gz", "-o", "out.nii.gz", "--window", "-1e3", "2.4e2"]).window == [
        -1000.0, 240.0]
    assert parser.parse_args(["evaluate", "denoise", "ct.nii.gz", "--out", "o", "--model-window", "-1E3", "-.5"]
                             ).model_window == [[-1000.0, -0.5]]


def test_a_negative_infinity_gets_the_message_about_non_finite_numbers(tmp_path, capsys):
    assert main(["denoise", str(LIMB_NII), "-o", str(tmp_path / "out.nii.gz"), "--window", "-inf", "240"]) == 2
    assert "--window must be a finite number" in capsys.readouterr().err


def test_info_json_is_strict_json_for_a_volume_of_nan(tmp_path, capsys):
    """JSON has no NaN: the report of a volume the checks refuse must still parse."""
    import json

    sitk.WriteImage(sitk.Image([12, 12, 12], sitk.sitkFloat32) * float("nan"), str(tmp_path / "nan.nii.gz"))
    assert main(["info", str(tmp_path / "nan.nii.gz"), "--json"]) == 2
    report = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert report["hu_range"] is None and report["non_finite_voxels"] == 12 ** 3


def test_python_m_entry_point_reports_bad_input(limb, tmp_path):
    sitk.WriteImage(limb.to_sitk()[:, :, 30], str(tmp_path / "slice.nii.gz"))
    done = subprocess.run([sys.executable, "-m", "MedDiffFMLib", "info", str(tmp_path / "slice.nii.gz")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert f"error: the image is 2D ({limb.shape[1]} x {limb.shape[2]} voxels)" in done.stderr


def test_a_2d_anatomy_map_given_alone_to_synthesize_is_named_as_the_anatomy(limb, tmp_path, capsys):
    sitk.WriteImage(sitk.Cast(limb.to_sitk()[:, :, 30] > 0, sitk.sitkUInt8), str(tmp_path / "labels2d.nii.gz"))
    assert main(["synthesize", "--anatomy", str(tmp_path / "labels2d.nii.gz"), "--region", "other", "--model", "tiny",
                 "-o", str(tmp_path / "out.nii.gz")]) == 2
    assert f"--anatomy {tmp_path / 'labels2d.nii.gz'}: the image is 2D" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()


def test_synthesize_without_a_grid_says_so_first(tmp_path, capsys, monkeypatch):
    """Given no grid, it asked for --region first (the grid's own message came only after, and after the model had
    loaded): what is missing altogether comes first, before the model is loaded."""
    import MedDiffFMLib.commands._common as common

    monkeypatch.setattr(common, "model_from_args", lambda args: pytest.fail("the model was loaded"))
    assert main(["synthesize", "-o", str(tmp_path / "out.nii.gz")]) == 2
    assert "error: give the output size and spacing (--size X Y Z --spacing X Y Z)" in capsys.readouterr().err
    assert main(["synthesize", "-o", str(tmp_path / "out.nii.gz"), "--size", "16", "16", "16"]) == 2
    assert "error: choose the body region (--region" in capsys.readouterr().err  # the grid given, the region next


def test_under_torchrun_only_the_first_process_logs(tmp_path):
    """torchrun runs the command once per process: the others would repeat every line; they report errors only."""
    def stderr(rank: str, world: str = "2") -> str:
        env = dict(os.environ, RANK=rank, WORLD_SIZE=world)
        done = subprocess.run([sys.executable, "-m", "MedDiffFMLib", "preprocess", str(LIMB_NII), "-o",
                               str(tmp_path / f"{rank}-{world}.nii.gz")],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0
        return done.stderr
    assert "INFO region other guessed" in stderr("0")
    assert stderr("1") == ""
    assert "region other guessed" in stderr("1", world="1")  # RANK alone (a scheduler's) is one process: it logs


def test_a_malformed_torchrun_environment_is_named(monkeypatch):
    from MedDiffFMLib.torchrun_env import Place, torchrun_place

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_place() == Place(1, 2, 1)
    monkeypatch.delenv("RANK")
    with pytest.raises(InputError, match="WORLD_SIZE='2' with RANK=None .* is not a torchrun launch"):
        torchrun_place()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="is not a torchrun launch"):
        torchrun_place()


def test_a_crop_in_soft_tissue_with_some_fat_is_ct(limb):
    """A tumour-region crop of the limb (-155..118 HU: soft tissue and a little fat, no air) is usable CT."""
    from MedDiffFMLib.validation import check_ct

    crop = Volume.from_sitk(limb.to_sitk()[80:120, 0:40, 0:10], dtype=np.float32)  # x, y, z
    assert -200 < crop.array.min() < -50
    check_ct(crop)


def test_a_label_map_on_another_grid_is_named_and_each_value_labelled(tmp_path, capsys):
    out = tmp_path / "d.nii.gz"
    assert main(["denoise", str(LIMB_NII), "-o", str(out), "--anatomy-labels", str(CHEST_NODULE_NRRD)]) == 2
    err = capsys.readouterr().err
    assert ("anatomy label map lung1_label.nrrd is not on the grid of the image: size (x,y,z): image (198, 202, 59), "
            "label map (512, 512, 48)") in err
    assert not out.exists()


def test_preprocess_takes_one_anatomy_source(tmp_path, capsys):
    out = tmp_path / "limb.nii.gz"
    base = ["preprocess", str(LIMB_NII), "-o", str(out), "--spacing", "4"]
    for extra, message in ((["--anatomy", "totalsegmentator", "--anatomy-labels", str(LIMB_MASK_NII)],
                            "--anatomy totalsegmentator and --anatomy-labels are two anatomy sources; give one"),
                           (["--anatomy", "user"], "--anatomy user needs --anatomy-labels")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(base + ["--anatomy-labels", str(LIMB_MASK_NII)]) == 0  # the labels alone mean --anatomy user
    assert json.loads((tmp_path / "limb.json").read_text())["anatomy_source"] == "user"


def test_label_maps_with_nan_or_huge_labels_are_refused_not_altered(limb, tmp_path, capsys, caplog):
    """ITK reads a float NIfTI's NaN as 0, and an int32 cast wraps 2^32 + 3 to 3: both used to pass silently."""
    labels = read_volume(LIMB_MASK_NII)
    nan = labels.array.astype(np.float32)
    nan[:, :, :50] = np.nan
    huge = labels.array.astype(np.int64) * (2 ** 32 + 3)
    for name, array, message in (("nan.nii.gz", nan, "holds NaN or infinite values"),
                                 ("huge.nii.gz", huge, "holds labels up to 4294967299; labels must be at most")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(labels.spacing), image.SetOrigin(labels.origin), image.SetDirection(labels.direction)
        sitk.WriteImage(image, str(tmp_path / name))
        assert main(["preprocess", str(LIMB_NII), "-o", str(tmp_path / "out.nii.gz"), "--spacing", "4",
                     "--anatomy-labels", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()
    # Beyond an anatomy map's block the model is told "no body": a warning. A drawn mask's block is only noted.
    anatomy = np.zeros(limb.shape, np.uint8)
    anatomy[:, 60:100] = 2
    write_volume(limb.with_array(anatomy).crop((slice(None), slice(60, 100), slice(None))), tmp_path / "cut.nii.gz")
    for option, warned in (("--anatomy-labels", True), ("--mask", False)):
        caplog.clear()
        assert main(["preprocess", str(LIMB_NII), "-o", str(tmp_path / "out.nii.gz"), "--spacing", "4", "--overwrite",
                     option, str(tmp_path / "cut.nii.gz")]) == 0
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "block" in r.getMessage()]
        assert bool(warnings) == warned and all("the model is told that there is no body" in w for w in warnings)


def test_synthesize_reads_anatomy_on_its_reference_as_every_task_does(tmp_path, capsys, monkeypatch):
    """Named by its file and refused before the model loads; a block of the reference grid is placed on it."""
    from MedDiffFMLib.commands import _common

    labels = read_volume(LIMB_MASK_NII)
    shifted = Volume(labels.array, labels.spacing, tuple(o + 2.0 for o in labels.origin), labels.direction)
    write_volume(shifted, tmp_path / "shifted.nii.gz")
    calls = []
    monkeypatch.setattr(_common, "model_from_args", lambda *a, **k: calls.append(1))
    assert main(["synthesize", "--reference", str(LIMB_NII), "--anatomy", str(tmp_path / "shifted.nii.gz"),
                 "--model", "tiny", "-o", str(tmp_path / "out.nii.gz")]) == 2
    assert "anatomy label map shifted.nii.gz is not on the grid of the image" in capsys.readouterr().err
    assert calls == []
    block = labels.crop((slice(0, labels.shape[0]), slice(10, 150), slice(10, 150)))
    write_volume(block, tmp_path / "block.nii.gz")
    monkeypatch.setattr(_common, "model_from_args", lambda *a, **k: (_ for _ in ()).throw(SystemExit(7)))
    with pytest.raises(SystemExit, match="7"):  # got as far as loading the model: the block was accepted
        main(["synthesize", "--reference", str(LIMB_NII), "--anatomy", str(tmp_path / "block.nii.gz"),
              "--model", "tiny", "-o", str(tmp_path / "out.nii.gz")])


def test_verbose_is_taken_before_or_after_the_task_name():
    from MedDiffFMLib.cli import build_parser

    parser = build_parser()
    for argv, verbose in ((["-v", "info", "ct.nii.gz"], True), (["info", "ct.nii.gz", "-v"], True),
                          (["denoise", "ct.nii.gz", "-o", "x.nii.gz", "--verbose"], True),
                          (["info", "ct.nii.gz"], False)):
        assert parser.parse_args(argv).verbose is verbose, argv


def test_every_out_of_memory_hint_names_options_of_its_own_command():
    """The hint after 'out of memory' must be something the user can type into that very command."""
    import argparse

    from MedDiffFMLib.cli import OUT_OF_MEMORY_HINTS, build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, choice in action.choices.items():
                    yield from commands(choice, prefix + (name,))
                return
        yield " ".join(prefix), parser

    checked = set()
    for command, parser in commands(build_parser()):
        key = command if command in OUT_OF_MEMORY_HINTS else "sampling"
        checked.add(key)
        options = {option for action in parser._actions for option in action.option_strings}
        for option in re.findall(r"--[a-z][a-z-]*", OUT_OF_MEMORY_HINTS[key]):
            assert option in options, f"{command}: its out-of-memory hint names {option}, which it does not have"
    assert checked == set(OUT_OF_MEMORY_HINTS)  # no hint for a command that does not exist


def test_a_sheared_grid_is_named_with_its_angle(limb):
    """A hardened affine registration can leave a volume's axes at other than right angles; the tasks work on its
    voxels as if they were not, so the user is told by how much (an oblique but perpendicular grid says nothing)."""
    from MedDiffFMLib.validation import shear_degrees

    tilt = np.radians(3.0)
    sheared = dataclasses.replace(limb, direction=(1.0, 0, 0, 0, 1.0, float(np.sin(tilt)), 0, 0, float(np.cos(tilt))))
    assert shear_degrees(sheared.direction) == pytest.approx(3.0)
    assert shear_degrees(np.diag([4.0, 1.0, 1.0]).ravel()) == 0.0  # axes not of unit length are not sheared
    stretched = np.array(sheared.direction).reshape(3, 3) * [1.0, 1.0, 5.0]
    assert shear_degrees(stretched.ravel()) == pytest.approx(3.0)
    assert any("two meet 3.0 degrees off a right angle" in w for w in check_ct(sheared, log_warnings=False))
    turn = np.radians(20.0)
    oblique = dataclasses.replace(limb, direction=(np.cos(turn), -np.sin(turn), 0, np.sin(turn), np.cos(turn), 0,
                                                   0, 0, 1.0))
    assert shear_degrees(oblique.direction) < 1e-6
    assert not any("perpendicular" in w for w in check_ct(oblique, log_warnings=False))


SHARED = ["--device", "cpu", "--progress", "none", "--region", "chest"]


def test_denoise_writes_a_dicom_series_of_the_input_study(chest_nodule_crop, tmp_path):
    from pydicom import dcmread

    source = oblique_dicom_series(chest_nodule_crop[0], tmp_path / "series",
                                  {"0010|0010": "Doe^Jane", "0008|103e": "Chest 5mm", "0020|0011": "2"})
    out = tmp_path / "denoised"
    assert main(["denoise", str(source / "004.dcm"), "-o", str(out), "--seeds", "2", "--model", "tiny", "--nfe", "2",
                 "--noise-level", "20"] + SHARED) == 0
    vol, result = read_volume(source), read_volume(out)
    assert result.grid_differences(vol, tol=1e-6) == [] and not np.array_equal(result.array, vol.array)
    first, written = dcmread(str(source / "001.dcm")), dcmread(str(sorted(out.iterdir())[0]))
    assert (str(written.PatientName), written.StudyInstanceUID) == ("Doe^Jane", first.StudyInstanceUID)
    assert (written.SeriesDescription, int(written.SeriesNumber)) == ("Chest 5mm MedDiffFM denoised", 1002)
    assert read_volume(tmp_path / "denoised_std.nii.gz").same_grid(vol)  # the spread over seeds: a file beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoised", "denoised_std.nii.gz", "series"]


def test_a_folder_output_is_refused_where_no_dicom_series_can_go(chest_nodule_crop, tmp_path, capsys, monkeypatch):
    from MedDiffFMLib.commands import _common

    def refuse(args):
        raise AssertionError("the model was loaded before the output was refused")

    monkeypatch.setattr(_common, "model_from_args", refuse)
    image, nodule = chest_nodule_crop
    source = oblique_dicom_series(image, tmp_path / "series")
    nifti = write_volume(image, tmp_path / "ct.nii.gz")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.dcm").write_bytes(b"an earlier series")
    only = "a folder takes a DICOM series only as -o of denoise, inpaint, generate-lesion or super-resolve"
    for argv, message in [
            (["denoise", nifti, "-o", tmp_path / "out"], f"output {tmp_path / 'out'} has no file suffix; give a file "
             f"name such as {tmp_path / 'out'}.nii.gz ({only} (their CT) with a DICOM series input; {nifti} is not "
             "one)"),
            (["denoise", nifti, "-o", tmp_path / "full"], f"output {tmp_path / 'full'} is a folder; give a file name "
             f"such as {tmp_path / 'full' / 'result.nii.gz'} ({only}"),
            (["detect-anomalies", source, "-o", tmp_path / "map"], f"has no file suffix; give a file name such as "
             f"{tmp_path / 'map'}.nii.gz ({only}"),
            (["denoise", source, "-o", tmp_path / "out", "--seeds", "2", "--uncertainty", tmp_path / "std"],
             f"output {tmp_path / 'std'} has no file suffix"),
            (["denoise", source, "-o", tmp_path / "full"], "is a folder that is not empty; a DICOM series is written "
             "into a new or empty folder"),
            (["denoise", source, "-o", source / "out"], f"output {source / 'out'} is inside the input folder"),
            (["denoise", source / "002.dcm", "-o", source], f"output {source} is the folder of the input DICOM series"),
            (["denoise", source / "002.dcm", "-o", source / "sub" / "out.nii.gz"],
             "is inside the folder of the input DICOM series"),
            (["denoise", source, "-o", tmp_path / "CT 2.0 denoised"], "cannot write CT 2.0 denoised: a DICOM series "
             "goes into a folder whose name has no dot (e.g. CT 2_0 denoised) or into an existing empty folder"),
            (["denoise", nifti, "-o", tmp_path / "CT 2.0 denoised"], "cannot write CT 2.0 denoised: use one of")]:
        assert main([str(a) for a in argv] + SHARED) == 2, argv
        assert message in " ".join(capsys.readouterr().err.split()), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "full", "series"]
    assert len(list(source.iterdir())) == 12
    # The CT results of the other commands may go to a DICOM series: accepted up to the model's loading.
    mask = write_volume(read_volume(source).with_array(nodule.array), tmp_path / "nodule.nii.gz")
    monkeypatch.setattr(_common, "model_from_args", lambda args: (_ for _ in ()).throw(SystemExit(7)))
    for argv in (["inpaint", "--mask", mask], ["generate-lesion", "--mask", mask], ["super-resolve"]):
        with pytest.raises(SystemExit, match="7"):
            main([str(a) for a in argv] + [str(source), "-o", str(tmp_path / "result")])


def test_a_missing_input_is_named_as_such_when_o_names_a_folder(tmp_path, capsys):
    """A mistyped DICOM folder was said to be no DICOM series, -o being told to take a file suffix instead."""
    missing = tmp_path / "seriez"
    assert main(["denoise", str(missing), "-o", str(tmp_path / "denoised"), "--model", "tiny"] + SHARED) == 2
    assert f"error: input not found: {missing}\n" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_the_std_file_beside_a_dicom_series_is_named_after_the_whole_folder_name(chest_nodule_crop, tmp_path):
    """A folder's dot is no suffix: `scan.v2` took `scan_std.nii.gz`, which a run into `scan.v1` shares (and with
    --overwrite, replaces)."""
    source = oblique_dicom_series(chest_nodule_crop[0], tmp_path / "series")
    (tmp_path / "scan.v2").mkdir()
    assert main(["denoise", str(source), "-o", str(tmp_path / "scan.v2"), "--seeds", "2", "--model", "tiny", "--nfe",
                 "2", "--noise-level", "20"] + SHARED) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.v2", "scan.v2_std.nii.gz", "series"]
