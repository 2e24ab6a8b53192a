"""Reliability (issue G): bad inputs, faults and determinism across the CLI and the library.

Only the gaps left by the other test files are tested here. Where each item of issue G is tested:

| item | test |
|---|---|
| 2D, 4D, NaN/inf, MR-like or normalised, extremely anisotropic image | test_cli_data::test_each_bad_image_gives_its_error_and_exit_code_2 (info, preprocess); test_io::test_nifti_nan_and_inf_are_not_hidden; here: test_every_model_task_refuses_bad_images (each model task, input unchanged) |
| empty mask; mask of another size / origin | test_cli_data::test_bad_masks_give_their_errors; test_inpaint::test_empty_mask_wrong_grid_and_wrong_model_are_refused; test_lesion::test_wrong_model_and_empty_mask_are_refused; test_io::test_read_mask_refuses_other_grid_and_fractions; test_slicer_logic::test_empty_or_unknown_segment_is_refused, test_bad_mask_fails_before_running_and_leaves_nothing |
| mask of another spacing / direction | here: test_mask_tasks_refuse_empty_and_off_grid_masks |
| mask touching the border | test_inpaint::test_mask_at_the_border_and_several_components; here: test_lesion_and_anomaly_masks_touching_the_border |
| volume too large for the free memory (estimated before running) | test_tasks_zero_shot::test_memory_check_refuses_what_cannot_fit (estimate only); here: test_too_large_is_refused_before_sampling_through_the_task_api, test_every_task_cli_checks_memory_before_sampling |
| unreadable / truncated / wrong-architecture checkpoint | test_checkpoints::test_missing_damaged_and_wrong_files, test_wrong_architecture_is_named, test_pickle_renamed_safetensors_is_refused_without_unpickling; here: test_damaged_model_files_through_the_cli |
| checkpoint anatomy does not match the anatomy given | test_anatomy::test_encoding_refuses_labels_the_model_does_not_know (encoder); here: test_damaged_model_files_through_the_cli (config encoding vs weights), test_label_map_with_more_classes_than_the_model_knows, test_totalsegmentator_model_without_totalsegmentator |
| missing TotalSegmentator weights | test_anatomy::test_missing_totalsegmentator_says_what_and_falls_back; here: test_totalsegmentator_model_without_totalsegmentator (task level) |
| output path not writable | here: test_unwritable_output_is_refused_before_the_model_loads |
| output path equal to input path | test_io::test_write_volume_refuses_existing_and_input_paths; test_cli_data::test_preprocess_never_writes_onto_its_input; here: test_every_task_refuses_to_write_onto_its_inputs |
| killed midway: no partial output | test_io::test_atomic_path_leaves_nothing_on_failure; here: test_write_failing_halfway_leaves_nothing_and_says_why; test_slicer_logic::test_cancel_kills_the_process_tree_and_leaves_no_output, test_logic_failure_leaves_the_scene_unchanged; test_sampling::test_progress_and_cancel; here: test_killed_denoise_leaves_no_output_file (real process, SIGKILL) |
| training killed mid-checkpoint resumes from the last complete one | test_checkpoints::test_training_state_survives_a_kill_mid_write; test_training::test_resume_gives_the_uninterrupted_result, test_sigterm_stops_after_the_step_with_a_checkpoint; test_finetune::test_resumed_finetuning_equals_an_uninterrupted_run |
| CUDA out of memory: retried with a smaller window batch, then reported | test_sampling::test_out_of_memory_halves_window_batch |
| same seed -> bit-identical, other seed -> different (CPU) | library: test_sampling::test_seeded_and_reproducible; test_tasks_zero_shot::test_tasks_are_seeded (synthesize, detect-anomalies); test_super_resolution::test_deterministic_by_seed_and_input_untouched; test_lesion::test_deterministic_by_seed; test_inpaint::test_deterministic_by_seed; denoise had none: here test_cli_is_deterministic_by_seed for all six tasks through the CLI |
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from MedDiffFMLib.anatomy import threshold_anatomy
from MedDiffFMLib.checkpoints import load_model, resolve_model
from MedDiffFMLib.cli import main
from MedDiffFMLib.commands import _common
from MedDiffFMLib.config import preset
from MedDiffFMLib.errors import InputError, ResourceError
from MedDiffFMLib.io import Volume, read_volume, write_volume
from MedDiffFMLib.network import MedDiffNet
from MedDiffFMLib.tasks import common
from MedDiffFMLib.tasks.anomaly import detect_anomalies
from MedDiffFMLib.tasks.denoise import denoise
from MedDiffFMLib.tasks.lesion import generate_lesion

SHARED = ["--device", "cpu", "--progress", "none", "--region", "chest"]


def task_arguments(task, ct, mask, out, seed=0):
    """CLI arguments running `task` on the files given, with the fastest settings of the tiny models."""
    args = {
        "denoise": ["denoise", ct, "--model", "tiny", "--nfe", "2", "--noise-level", "20"],
        "synthesize": ["synthesize", "--reference", ct, "--model", "tiny", "--nfe", "2"],
        "detect-anomalies": ["detect-anomalies", ct, "--model", "tiny"],
        "super-resolve": ["super-resolve", ct, "--model", "tiny-super-resolution", "--nfe", "2", "--factor", "2"],
        "generate-lesion": ["generate-lesion", ct, "--mask", mask, "--model", "tiny-lesion", "--nfe", "2"],
        "inpaint": ["inpaint", ct, "--mask", mask, "--model", "tiny-lesion", "--nfe", "2", "--jump-length", "1",
                    "--resample", "1"],
    }[task]
    return [str(a) for a in args] + ["-o", str(out), "--seed", str(seed)] + SHARED


TASKS = ("denoise", "synthesize", "detect-anomalies", "super-resolve", "generate-lesion", "inpaint")
MASK_TASKS = ("detect-anomalies", "generate-lesion", "inpaint")


@pytest.fixture(scope="module")
def files(chest_nodule_crop, tmp_path_factory):
    """The real 48 x 48 x 12 chest crop and its nodule mask as files, with their bytes to check later."""
    folder = tmp_path_factory.mktemp("inputs")
    image, nodule = chest_nodule_crop
    ct, mask = write_volume(image, folder / "ct.nii.gz"), write_volume(nodule, folder / "nodule.nii.gz")
    return ct, mask, {p: p.read_bytes() for p in (ct, mask)}


def assert_inputs_unchanged(files):
    for path, content in files[2].items():
        assert path.read_bytes() == content, f"{path} was modified"


def run_cli(args, capsys):
    """(exit code, the CLI's `error: ...` line) of an in-process CLI run.

    Only that line is kept: log records may go to a stream captured by an earlier test (logging is set up
    once per process), which adds noise to stderr.
    """
    code = main(args)
    err = capsys.readouterr().err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("error: ")) or err


# --- bad images and masks ------------------------------------------------------------------------------

def bad_images(image: Volume, folder):
    """Each bad image made from the real crop, with the phrase its error must contain.

    All but the anisotropic one keep the crop's 3D grid, so the nodule mask still fits them.
    """
    cases = {}

    def save(name, img, phrase):
        sitk.WriteImage(img, str(folder / name))
        cases[folder / name] = phrase

    save("slice.nii.gz", image.to_sitk()[:, :, 5], "is 2D")
    save("series4d.nii.gz", sitk.JoinSeries([image.to_sitk(), image.to_sitk()]), "is 4D")
    broken = image.array.copy()
    broken[6, 20, 20:23] = np.nan
    broken[2, 3, 4] = np.inf
    save("nan.nii.gz", image.with_array(broken).to_sitk(), "4 NaN or infinite")
    normalised = (image.array - image.array.min()) / np.ptp(image.array)
    save("normalised.nii.gz", image.with_array(normalised.astype(np.float32)).to_sitk(), "do not look like CT")
    save("mr_like.nii.gz", image.with_array((normalised * 3000).astype(np.float32)).to_sitk(), "do not look like CT")
    flat = image.to_sitk()
    flat.SetSpacing((0.1, 0.1, 5.0))
    save("anisotropic.nii.gz", flat, "extremely anisotropic")
    return cases


def mask_on_grid_of(image_path, nodule: Volume, folder):
    """The nodule mask on the grid of a 3D bad image (a mask that fits is not what should fail)."""
    image = sitk.ReadImage(str(image_path))
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        return None
    mask = Volume(nodule.array, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return write_volume(mask, folder / f"mask_for_{image_path.name}", overwrite=True)


def test_a_path_the_console_cannot_show_does_not_end_the_command(tmp_path):
    """Windows writes a redirected stdout in its ANSI code page: a file name outside it ended `info` (and `models`,
    `preprocess`) with a UnicodeEncodeError after the work was done."""
    folder = tmp_path / "\u0141\u00f3d\u017a"
    folder.mkdir()
    shutil.copy(REPO / "Resources" / "SampleData" / "chest_ct_crop_lowdose.nii.gz", folder / "ct.nii.gz")
    done = subprocess.run([sys.executable, "-m", "MedDiffFMLib", "info", str(folder / "ct.nii.gz")], cwd=REPO,
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"\\u0141\\xf3d\\u017a" in done.stdout


@pytest.mark.parametrize("task", TASKS)
def test_every_model_task_refuses_bad_images(task, files, chest_nodule_crop, tmp_path, capsys):
    cases = bad_images(chest_nodule_crop[0], tmp_path)
    before = {p: p.read_bytes() for p in cases}
    out = tmp_path / "out" / "result.nii.gz"
    for path, phrase in cases.items():
        mask = mask_on_grid_of(path, chest_nodule_crop[1], tmp_path) or files[1]
        code, err = run_cli(task_arguments(task, path, mask, out), capsys)
        if task == "super-resolve" and path.name == "anisotropic.nii.gz":  # judged on its thin grid (factor 2)
            phrase = "a grid 25 times finer along one axis than another"
        assert code == 2 and err.startswith("error: ") and phrase in err, (path.name, err)
        assert not out.parent.exists() or not any(out.parent.iterdir())
    assert {p: p.read_bytes() for p in cases} == before
    assert_inputs_unchanged(files)


def off_grid_masks(image: Volume, nodule: Volume, folder):
    empty = write_volume(image.with_array(np.zeros(image.shape, np.uint8)), folder / "empty.nii.gz")
    spacing = Volume(nodule.array, (0.6, 0.6, 5.0), nodule.origin, nodule.direction)
    flipped = Volume(nodule.array, nodule.spacing, nodule.origin, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return {empty: "is empty",
            write_volume(spacing, folder / "spacing.nii.gz"): "not on the grid of the image: spacing",
            write_volume(flipped, folder / "direction.nii.gz"): "not on the grid of the image: direction"}


@pytest.mark.parametrize("task", MASK_TASKS)
def test_mask_tasks_refuse_empty_and_off_grid_masks(task, files, chest_nodule_crop, tmp_path, capsys):
    out = tmp_path / "result.nii.gz"
    for mask, phrase in off_grid_masks(*chest_nodule_crop, tmp_path).items():
        args = task_arguments(task, files[0], mask, out)
        if task == "detect-anomalies":
            args += ["--mask", str(mask)]
        code, err = run_cli(args, capsys)
        assert code == 2 and phrase in err and ("Resample it onto the image" in err or "draw or select" in err), err
        assert not out.exists()
    assert_inputs_unchanged(files)


def test_lesion_and_anomaly_masks_touching_the_border(chest_nodule_crop):
    image, _ = chest_nodule_crop
    corner = np.zeros(image.shape, np.uint8)
    corner[:3, :6, :6] = 1  # touches three faces of the volume
    mask = image.with_array(corner)
    before = image.array.copy()
    lesion_model = load_model("tiny-lesion")[0]
    out = generate_lesion(image, mask, lesion_model, nfe=2, region="chest", seed=1)
    assert out.same_grid(image) and np.isfinite(out.array).all()
    assert not np.array_equal(out.array[:3, :6, :6], image.array[:3, :6, :6])
    assert np.array_equal(out.array[:, 30:, 30:], image.array[:, 30:, 30:])  # far from the box: untouched
    result = detect_anomalies(image, load_model("tiny")[0], mask=mask, region="chest", seed=1)
    scores = result.anomaly_map.array
    assert np.isfinite(scores).all() and (scores[corner > 0] > 0).all() and (scores[corner == 0] == 0).all()
    assert np.array_equal(image.array, before)


# --- memory ----------------------------------------------------------------------------------------------

def test_too_large_is_refused_before_sampling_through_the_task_api(chest_nodule_crop, monkeypatch):
    image, _ = chest_nodule_crop
    before = image.array.copy()
    monkeypatch.setattr(common, "available_memory", lambda device: 2 ** 20)
    steps = []
    with pytest.raises(ResourceError, match=r"needs about .* GiB but only 0.0 GiB is free on cpu; try a smaller "
                                            r"window batch \(--window-batch 1\), or a smaller volume"):
        denoise(image, load_model("tiny")[0], nfe=2, noise_level=20, region="chest",
                progress=lambda step, total: steps.append(step))
    assert steps == [] and np.array_equal(image.array, before)
    # With enough memory the same call runs: the refusal came from the estimate, not the data.
    monkeypatch.setattr(common, "available_memory", lambda device: 2 ** 40)
    denoise(image, load_model("tiny")[0], nfe=2, noise_level=20, region="chest",
            progress=lambda step, total: steps.append(step))
    assert steps


def test_a_masked_denoise_checks_the_whole_ct_set_up_before_starting_it(chest_nodule_crop, monkeypatch):
    """A mask makes the sampled box small, but the noise estimate and anatomy still cover the whole CT."""
    image, nodule = chest_nodule_crop
    set_up_bytes = common.NOISE_ESTIMATE_EXTRA_COPIES * 4 * image.array.size
    monkeypatch.setattr(common, "available_memory", lambda device: set_up_bytes // 2)
    monkeypatch.setattr("MedDiffFMLib.tasks.denoise.estimate_noise", lambda *a: pytest.fail("set-up started"))
    with pytest.raises(ResourceError, match=r"the set-up of this CT \(noise estimate, anatomy\) needs about"):
        denoise(image, load_model("tiny")[0], nfe=2, region="chest", mask=nodule)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_cli_checks_memory_before_sampling(task, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "available_memory", lambda device: 2 ** 20)
    out = tmp_path / "result.nii.gz"
    code, err = run_cli(task_arguments(task, files[0], files[1], out), capsys)
    # Super-resolution's thin grid (twice the slices) is refused first; the others' sampling.
    hint = "super-resolution by 2" if task == "super-resolve" else "--window-batch 1"
    assert code == 2 and "GiB is free on cpu" in err and hint in err, err
    assert list(tmp_path.iterdir()) == []
    assert_inputs_unchanged(files)


def test_absurd_synthesis_size_gets_the_memory_message_not_an_allocation_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "available_memory", lambda device: 64 * 2 ** 30)
    out = tmp_path / "synthetic.nii.gz"
    args = ["synthesize", "-o", str(out), "--size", "5000", "5000", "5000", "--model", "tiny", "--nfe", "2"]
    code, err = run_cli(args + SHARED, capsys)  # 500 GB for one float32 copy: numpy could not even allocate it
    assert code == 2 and "this job needs about" in err and "64.0 GiB is free on cpu" in err, err
    assert list(tmp_path.iterdir()) == []
    # Nor may the check list the windows first: 1e5^3 voxels has 2e12 of them, which took every byte of memory.
    import MedDiffFMLib.sampling as sampling

    for module in (sampling, common):  # where it lives, and the name common imported before
        monkeypatch.setattr(module, "window_grid", lambda *a: pytest.fail("the windows were listed before the check"),
                            raising=False)
    args[args.index("--size") + 1:args.index("--size") + 4] = ["100000"] * 3
    code, err = run_cli(args + SHARED, capsys)
    assert code == 2 and "this job needs about" in err, err


@pytest.mark.parametrize("failure, is_memory", [
    (MemoryError("Unable to allocate 1.20 TiB for an array with shape (300, 512, 512, 8000)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 9000000000000 bytes"), True),
    (RuntimeError("a bug in the sampler"), False)])
def test_memory_exhausted_after_the_estimate_is_a_clear_error(failure, is_memory, files, tmp_path, monkeypatch,
                                                               capsys):
    """An allocation failure the memory estimate did not foresee (e.g. in the set-up) gives a message, not a
    traceback; any other error still propagates."""
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(common, "anatomy_for", fail)
    out = tmp_path / "result.nii.gz"
    args = task_arguments("denoise", files[0], files[1], out)
    if not is_memory:
        with pytest.raises(RuntimeError, match="a bug"):
            main(args)
    else:
        code, err = run_cli(args, capsys)
        assert code == 2 and "error: out of memory (" in err and "--window-batch 1" in err, err
        assert str(failure).splitlines()[0][:60] in err
    assert list(tmp_path.iterdir()) == []
    assert_inputs_unchanged(files)


def test_allocation_failures_are_told_from_other_errors(tmp_path, monkeypatch, chest_nodule_crop):
    from MedDiffFMLib.errors import is_out_of_memory

    for text in ("CUDA out of memory. Tried to allocate 2.00 GiB", "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
                 "itk::ExceptionObject: Failed to allocate memory for image."):
        assert is_out_of_memory(RuntimeError(text)), text
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
    # Writing: memory running out is not reported as a full disk.
    monkeypatch.setattr(sitk, "WriteImage", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("itk::ExceptionObject: Failed to allocate memory for image.")))
    with pytest.raises(RuntimeError, match="Failed to allocate memory"):
        write_volume(chest_nodule_crop[0], tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_training_out_of_memory_gets_a_training_hint(files, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("MedDiffFMLib.training.train", fail)
    code, err = run_cli(["train", "--preset", "tiny", "--data", str(files[0]), "--out", str(tmp_path / "run"),
                         "--steps", "1"], capsys)
    assert code == 2 and "out of memory (CUDA out of memory." in err and "a smaller --batch-size" in err, err
    assert "--window-batch" not in err


def test_a_benchmark_out_of_memory_gets_its_own_hint(chest_nodule_crop, tmp_path, monkeypatch, capsys):
    image, nodule = chest_nodule_crop
    write_volume(image, tmp_path / "scores.nii.gz")
    write_volume(nodule, tmp_path / "lesion.nii.gz")
    monkeypatch.setattr("MedDiffFMLib.evaluate.evaluate_anomaly", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    code, err = run_cli(["evaluate", "anomaly", "--scores", str(tmp_path / "scores.nii.gz"), "--masks",
                         str(tmp_path / "lesion.nii.gz"), "--out", str(tmp_path / "report")], capsys)
    assert code == 2 and "out of memory (MemoryError). Try fewer or smaller score volumes" in err, err


def test_python_callers_get_clear_errors_for_arrays_and_devices(chest_nodule_crop):
    import torch

    image, nodule = chest_nodule_crop
    model = common.load_task_model("tiny", torch.device("cpu"))
    with pytest.raises(InputError, match="the image must be a MedDiffFMLib.io.Volume, got ndarray"):
        denoise(image.array, model)
    with pytest.raises(InputError, match="the image must be a MedDiffFMLib.io.Volume, got Image"):
        detect_anomalies(image.to_sitk(), model)
    with pytest.raises(InputError, match="mask must be a MedDiffFMLib.io.Volume, got ndarray"):
        detect_anomalies(image, model, mask=nodule.array)
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        denoise(image, model, device="tpu")
    with pytest.raises(InputError, match=r"got str; load it first: model, cfg, info = .*load_model\('tiny'\)"):
        denoise(image, "tiny")
    with pytest.raises(InputError, match="got tuple; pass the model itself"):
        generate_lesion(image, nodule, load_model("tiny-lesion"))
    for seed in (None, 1.5):
        with pytest.raises(InputError, match="seed must be a whole number"):
            detect_anomalies(image, model, seed=seed)
        with pytest.raises(InputError, match="seed must be a whole number"):
            generate_lesion(image, nodule, common.load_task_model("tiny-lesion", torch.device("cpu")), seed=seed)
    for seed in (-1, 2 ** 64 - 1):  # torch would take both, as the same seed
        with pytest.raises(InputError, match=r"seed must be in 0\.\.9223372036854775807"):
            denoise(image, model, seed=seed)
    assert common.choose_device(torch.device("cpu")) == torch.device("cpu")
    auto = denoise(image, model, device="auto", nfe=1, noise_level=20.0)  # "auto": where the model is
    assert auto.denoised.same_grid(image)
    elsewhere = common.load_task_model("tiny", torch.device("cpu")).to("meta")  # a model on another device
    with pytest.raises(InputError, match="the model is on meta but the task was asked to run on cpu"):
        denoise(image, elsewhere, device="cpu")
    import inspect

    from MedDiffFMLib.tasks.inpaint import inpaint
    from MedDiffFMLib.tasks.super_resolution import super_resolve
    from MedDiffFMLib.tasks.synthesis import synthesize

    for task in (denoise, detect_anomalies, generate_lesion, inpaint, super_resolve, synthesize):
        # Unless told otherwise a task runs where its model is: a model loaded on a GPU must not be refused.
        assert inspect.signature(task).parameters["device"].default == "auto", task.__name__
    # A network without weights (an analytic prior) is nowhere: `auto` runs it on the CPU, also beside a GPU.
    from analytic_prior import AnalyticGaussian

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        assert common.task_device(AnalyticGaussian(std=0.2), "auto") == torch.device("cpu")
    for counts in (dict(nfe=2.5), dict(nfe=0), dict(seeds=0), dict(seeds=1.0)):  # refused as settings, first
        with pytest.raises(InputError, match=r"must be a whole number >= 1, got"):
            denoise(image, model, **counts)
    with pytest.raises(InputError, match=r"the number of network evaluations \(nfe\) must be a whole number"):
        synthesize(model, region="chest", size_xyz=(16, 16, 16), nfe=0)
    with pytest.raises(InputError, match=r"the number of network evaluations \(nfe\) must be a whole number"):
        generate_lesion(image, nodule, common.load_task_model("tiny-lesion", torch.device("cpu")), nfe=-1)


# --- models ----------------------------------------------------------------------------------------------

def copy_model(name, folder):
    weights = resolve_model(name)
    shutil.copy(weights, folder / "m.safetensors")
    shutil.copy(weights.with_suffix(".json"), folder / "m.json")
    return folder / "m.safetensors"


def test_damaged_model_files_through_the_cli(files, tmp_path, capsys):
    out = tmp_path / "result.nii.gz"
    model = copy_model("tiny", tmp_path)
    good = model.read_bytes()
    info = json.loads((tmp_path / "m.json").read_text())

    def run_with_model():
        args = task_arguments("denoise", files[0], None, out)
        args[args.index("tiny")] = str(model)
        return run_cli(args, capsys)

    model.write_bytes(b"")
    code, err = run_with_model()
    assert code == 2 and "holds 0 bytes where its description records" in err and "truncated" in err
    model.write_bytes(good[: len(good) // 3])
    code, err = run_with_model()
    assert code == 2 and f"holds {len(good) // 3} bytes" in err and "truncated or was replaced" in err
    model.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # the same size, one bit flipped
    code, err = run_with_model()
    assert code == 2 and "is damaged or was replaced" in err
    model.write_bytes(good[: len(good) // 3])
    # Past the size and checksum: the reader meets the cut.
    info["sha256"], info["size"] = hashlib.sha256(model.read_bytes()).hexdigest(), len(good) // 3
    (tmp_path / "m.json").write_text(json.dumps(info))
    code, err = run_with_model()
    assert code == 2 and "truncated or corrupt" in err
    # A description whose config was edited (anatomy encoding binary: 3 channels; the weights' is onehot: 4).
    model.write_bytes(good)
    info["sha256"], info["size"] = hashlib.sha256(good).hexdigest(), len(good)
    info["config"]["anatomy"]["encoding"] = "binary"
    (tmp_path / "m.json").write_text(json.dumps(info))
    code, err = run_with_model()
    assert code == 2 and "config that differs from the one stored in the weights file" in err
    (tmp_path / "m.json").unlink()
    code, err = run_with_model()
    assert code == 2 and "model description" in err and "not found" in err
    assert not out.exists()
    assert_inputs_unchanged(files)


def test_label_map_with_more_classes_than_the_model_knows(files, chest_nodule_crop, tmp_path, capsys):
    """TotalSegmentator labels (up to 118) given to a model trained on threshold anatomy (0..4)."""
    image, _ = chest_nodule_crop
    organs = np.zeros(image.shape, np.uint8)
    organs[:, 24:, :] = 118
    organs[:, :24, :10] = 10
    labels = write_volume(image.with_array(organs), tmp_path / "totalseg.nii.gz")
    out = tmp_path / "result.nii.gz"
    phrase = "labels up to 118, but this model was trained on threshold anatomy with labels 0..4"
    for task, option in [("denoise", "--anatomy-labels"), ("detect-anomalies", "--anatomy-labels")]:
        code, err = run_cli(task_arguments(task, files[0], None, out) + [option, str(labels)], capsys)
        assert code == 2 and phrase in err and "preprocess --anatomy threshold" in err, err
    code, err = run_cli(["synthesize", "--anatomy", str(labels), "--model", "tiny", "--nfe", "2", "-o", str(out)]
                        + SHARED, capsys)
    assert code == 2 and phrase in err
    assert not out.exists()
    # Within the classes, a map that is not the CT's own thresholds is refused too (a lesion mask given by mistake
    # read as lung); the thresholds' own map passes.
    with pytest.raises(InputError, match=r"matches them in only 36.9 % of the voxels: it is another kind of map"):
        denoise(image, load_model("tiny")[0], nfe=2, noise_level=20, region="chest",
                anatomy_labels=image.with_array(np.minimum(organs, 4)))
    steps = []
    denoise(image, load_model("tiny")[0], nfe=2, noise_level=20, region="chest",
            anatomy_labels=image.with_array(threshold_anatomy(image)), progress=lambda s, n: steps.append(s))
    assert steps


def test_totalsegmentator_model_without_totalsegmentator(chest_nodule_crop, tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, anatomy=dict(cfg.anatomy, source="totalsegmentator", encoding="binary",
                                                num_classes=118))
    model = MedDiffNet(cfg).eval()
    with pytest.raises(ResourceError, match="trained on totalsegmentator anatomy.*totalseg_download_weights"):
        denoise(chest_nodule_crop[0], model, nfe=2, noise_level=20, region="chest")


# --- outputs ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_loading(monkeypatch):
    """Output checks must come before the (slow) model load: loading fails the test."""
    def refuse(args):
        raise AssertionError("the model was loaded before the output path was checked")
    monkeypatch.setattr(_common, "model_from_args", refuse)


@pytest.mark.parametrize("task", TASKS)
def test_unwritable_output_is_refused_before_the_model_loads(task, files, tmp_path, capsys, no_model_loading):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for out, phrase in [(a_file / "sub" / "out.nii.gz", "file.txt is a file, not a folder"),
                        ("/proc/meddifffm-test/out.nii.gz", "the folder /proc is not writable")]:
        code, err = run_cli(task_arguments(task, files[0], files[1], out), capsys)
        assert code == 2 and phrase in err and "choose another output folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert_inputs_unchanged(files)
    with pytest.raises(InputError, match="is a file, not a folder"):
        write_volume(read_volume(files[0]), a_file / "out.nii.gz")


@pytest.mark.parametrize("task", TASKS)
def test_every_task_refuses_to_write_onto_its_inputs(task, files, capsys, no_model_loading):
    inputs = [files[0], files[1]] if task in ("generate-lesion", "inpaint") else [files[0]]
    for target in inputs:
        code, err = run_cli(task_arguments(task, files[0], files[1], target) + ["--overwrite"], capsys)
        assert code == 2 and f"output {target} is an input file; choose another output path" in err, err
    assert_inputs_unchanged(files)


def test_one_file_named_for_two_outputs_is_refused_before_the_model_loads(files, tmp_path, capsys,
                                                                          no_model_loading):
    out = tmp_path / "result.nii.gz"
    for task, extra in [("denoise", ["--preview", out]), ("denoise", ["--seeds", "2", "--uncertainty", out]),
                        ("detect-anomalies", ["--mask-output", out]),
                        ("detect-anomalies", ["--mask-output", tmp_path / "." / "result.nii.gz"])]:
        code, err = run_cli(task_arguments(task, files[0], files[1], out) + [str(a) for a in extra], capsys)
        assert code == 2 and "is given for two different outputs" in err, err
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_folder_is_named_as_such(files, tmp_path, capsys, no_model_loading):
    code, err = run_cli(task_arguments("denoise", files[0], files[1], tmp_path), capsys)
    assert code == 2 and f"output {tmp_path} is a folder; give a file name such as" in err, err


def test_an_output_named_after_o_is_named_as_such(files, tmp_path, capsys, no_model_loading):
    """The files a command names from -o (preprocess's sidecar and mask, denoise's spread over seeds) were refused
    as if the user had typed their names ("give a file name such as p.json/result.nii.gz")."""
    out = tmp_path / "p.nii.gz"
    (tmp_path / "p.json").mkdir()
    code, err = run_cli(["preprocess", str(files[0]), "-o", str(out)], capsys)
    assert code == 2 and f"{tmp_path / 'p.json'} (written beside -o {out}, named after it) is a folder; choose " \
        "another -o" in err, err
    mask = tmp_path / "q_mask.nii.gz"  # preprocess -o q.nii.gz writes the mask it resamples to q_mask.nii.gz
    mask.write_bytes(files[1].read_bytes())
    code, err = run_cli(["preprocess", str(files[0]), "--mask", str(mask), "-o", str(tmp_path / "q.nii.gz"),
                         "--overwrite"], capsys)
    assert code == 2 and f"{mask} (written beside -o {tmp_path / 'q.nii.gz'}, named after it) is an input file; " \
        "choose another -o" in err, err
    assert mask.read_bytes() == files[1].read_bytes()
    (tmp_path / "d_std.nii.gz").write_bytes(b"an earlier result")
    code, err = run_cli(task_arguments("denoise", files[0], files[1], tmp_path / "d.nii.gz") + ["--seeds", "2"], capsys)
    assert code == 2 and f"{tmp_path / 'd_std.nii.gz'} (written beside -o {tmp_path / 'd.nii.gz'}, named after it) " \
        "already exists; choose another -o or allow overwriting (--overwrite)" in err, err
    assert_inputs_unchanged(files)


def test_options_that_would_be_ignored_or_cannot_work_are_refused(files, tmp_path, capsys, no_model_loading):
    out = tmp_path / "result.nii.gz"
    cases = [
        (task_arguments("denoise", files[0], files[1], out) + ["--uncertainty", str(tmp_path / "std.nii.gz")],
         "--uncertainty is the standard deviation over seeds: add --seeds 2 or more"),
        (task_arguments("synthesize", files[0], files[1], out) + ["--size", "16", "16", "16"],
         "--size/--spacing would be ignored"),
    ]
    for args, phrase in cases:
        code, err = run_cli(args, capsys)
        assert code == 2 and phrase in err, err
    for task in ("denoise", "inpaint"):
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit code 2
            main(task_arguments(task, files[0], files[1], out) + ["--nfe", "0"])
        assert exit_info.value.code == 2 and "--nfe: must be at least 1, got 0" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_info:
            main(task_arguments(task, files[0], files[1], out) + ["--seed", "-1"])
        assert (exit_info.value.code == 2
                and "--seed: must be in 0..9223372036854775807, got -1" in capsys.readouterr().err)
        for option in ("--window-batch", "--threads"):
            with pytest.raises(SystemExit) as exit_info:
                main(task_arguments(task, files[0], files[1], out) + [option, "0"])
            assert exit_info.value.code == 2 and f"{option}: must be at least 1, got 0" in capsys.readouterr().err
        for overlap in ("1", "-0.1", "nan"):  # refused before a whole CT is read and set up
            with pytest.raises(SystemExit) as exit_info:
                main(task_arguments(task, files[0], files[1], out) + ["--overlap", overlap])
            assert (exit_info.value.code == 2
                    and f"--overlap: must be a fraction in [0, 1), got {overlap}" in capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "denoise", str(files[0]), "--out", str(tmp_path / "e"), "--overlap", "1.5"])
    assert exit_info.value.code == 2 and "--overlap: must be a fraction in [0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", "--data", str(files[0]), "--out", str(tmp_path / "run"), "--num-workers",
              "-1"])
    assert exit_info.value.code == 2 and "--num-workers: must be 0 or more, got -1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_output_folder_that_is_a_file_is_refused(files, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for args in (["evaluate", "denoise", str(files[0]), "--out", str(a_file), "--methods", "gaussian"],
                 ["evaluate", "anomaly", "--scores", str(files[0]), "--masks", str(files[1]), "--out", str(a_file)],
                 ["train", "--preset", "tiny", "--data", str(files[0]), "--out", str(a_file), "--steps", "1"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and "notes.txt is a file; --out needs a folder" in err, err
    assert a_file.read_text() == "not a folder"


def test_a_controlnet_given_where_the_base_model_runs_is_refused(files, tmp_path, capsys):
    for task in ("denoise", "synthesize", "detect-anomalies"):
        args = task_arguments(task, files[0], files[1], tmp_path / "out.nii.gz")
        args[args.index("--model") + 1] = "tiny-lesion"
        code, err = run_cli(args, capsys)
        assert code == 2 and "runs the base model; the given model is a ControlNet fine-tuned for lesion" in err
    assert list(tmp_path.iterdir()) == []


# --- faults ----------------------------------------------------------------------------------------------

def test_write_failing_halfway_leaves_nothing_and_says_why(files, tmp_path, monkeypatch):
    """A disk that fills up while the result is written: a clean error, no partial or temporary file."""
    def write_half_then_fail(image, name, *args, **kwargs):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("ITK ERROR: NiftiImageIO: could not write: No space left on device")
    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(InputError, match="No space left on device.*check the free disk space"):
        write_volume(read_volume(files[0]), tmp_path / "result.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_killed_denoise_leaves_no_output_file(files, tmp_path):
    """A real run, killed (SIGKILL) once it reports progress: no output and no temporary file."""
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    args = task_arguments("denoise", files[0], None, out_dir / "denoised.nii.gz")
    args[args.index("--progress") + 1] = "machine"
    args += ["--seeds", "500", "--threads", "1"]  # far more steps than run before the kill
    process = subprocess.Popen([sys.executable, "-m", "MedDiffFMLib"] + args, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith(_common.PROGRESS_PREFIX + " 1 "), first
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert list(out_dir.iterdir()) == []
    assert_inputs_unchanged(files)


# --- determinism -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_cli_is_deterministic_by_seed(task, files, tmp_path, capsys):
    # Single-seed denoising adds no fresh noise by default (zeta 0), so its seed only matters with zeta > 0.
    extra = ["--zeta", "0.3"] if task == "denoise" else []
    arrays = []
    for run, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"run{run}.nii.gz"
        args = task_arguments(task, files[0], files[1], out, seed=seed) + extra
        assert main(args) == 0, capsys.readouterr().err
        arrays.append(read_volume(out).array)
    assert np.array_equal(arrays[0], arrays[1]), "same seed, different output"
    assert not np.array_equal(arrays[0], arrays[2]), "different seed, same output"
    assert_inputs_unchanged(files)


# --- outputs: names, all or none, what a file cannot keep -------------------------------------------------

@pytest.mark.parametrize("name", ["X.NII.GZ", "V.MHA", "c.NRRD", "x.nii.nii.gz", "ct.hdr.nii.gz", "b.NII"])
def test_output_names_itk_would_mishandle_are_written_and_read_back(files, tmp_path, name):
    """ITK picks writers by a case-sensitive suffix and rewrites names with a second image suffix: the file it
    wrote used to differ from the one renamed into place, after the whole job."""
    image = read_volume(files[0])
    write_volume(image, tmp_path / name)
    back = read_volume(tmp_path / name)
    assert back.same_grid(image) and np.array_equal(back.array, image.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_a_mixed_case_nifti_name_is_refused_before_the_job(files, tmp_path, capsys):
    code, err = run_cli(task_arguments("denoise", files[0], None, tmp_path / "out.Nii.gz"), capsys)
    assert code == 2 and "ITK reads NIfTI files only with a suffix in one case" in err
    assert list(tmp_path.iterdir()) == []


def test_several_outputs_are_written_all_or_none(files, tmp_path, monkeypatch, capsys):
    """detect-anomalies writes a map and a mask: a failure on the second leaves neither."""
    calls = []

    def write_then_fail(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("No space left on device")
        original(image, path, *args, **kwargs)
    original = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", write_then_fail)
    args = task_arguments("detect-anomalies", files[0], None, tmp_path / "map.nii.gz")
    code, err = run_cli(args + ["--mask-output", str(tmp_path / "mask.nii.gz")], capsys)
    assert code == 2 and "No space left on device" in err and "no partial file is left" in err
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_a_sheared_grid_is_not_written_as_nifti(files, tmp_path, monkeypatch, capsys):
    """NIfTI cannot store axes that are not perpendicular; ITK would straighten them and move the voxels."""
    image = read_volume(files[0])
    tilt = np.deg2rad(15)
    sheared = Volume(image.array, image.spacing, image.origin,
                     (1.0, 0.0, 0.0, 0.0, 1.0, float(np.sin(tilt)), 0.0, 0.0, float(np.cos(tilt))))
    with pytest.raises(InputError, match="axes are not perpendicular .* write .nrrd or .mha instead"):
        write_volume(sheared, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []
    back = read_volume(write_volume(sheared, tmp_path / "out.nrrd"))
    np.testing.assert_allclose(back.direction, sheared.direction, atol=1e-9)
    # Through the CLI it is refused before the job, not after it.
    args = task_arguments("denoise", tmp_path / "out.nrrd", None, tmp_path / "denoised.nii.gz")
    calls = []
    monkeypatch.setattr(_common, "model_from_args", lambda *a, **k: calls.append(1))
    code, err = run_cli(args, capsys)
    assert code == 2 and "axes are not perpendicular" in err and calls == []
    # ... also where an anatomy label map alone gives synthesis its grid.
    labels = write_volume(Volume((image.array > 0).astype(np.uint8), image.spacing, image.origin, sheared.direction),
                          tmp_path / "labels.nrrd")
    code, err = run_cli(["synthesize", "--anatomy", str(labels), "--model", "tiny", "--region", "chest", "-o",
                         str(tmp_path / "synthetic.nii.gz")], capsys)
    assert code == 2 and "axes are not perpendicular" in err and calls == []


def test_a_nifti_cut_short_by_a_full_disk_is_not_renamed_into_place(files, tmp_path, monkeypatch, capsys):
    """ITK's NIfTI writer only prints a warning when the disk fills up: the file would be renamed into place with
    exit code 0. The written file is checked before it replaces anything."""
    original = sitk.WriteImage

    def short_write(image, path, *args, **kwargs):
        original(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(sitk, "WriteImage", short_write)
    code, err = run_cli(task_arguments("denoise", files[0], None, tmp_path / "out.nii.gz"), capsys)
    assert code == 2 and "out.nii.gz was written incomplete" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", [("--noise-level", "nan"), ("--lambda", "inf"), ("--window", "nan")])
def test_numbers_that_are_not_finite_are_refused(files, tmp_path, capsys, option, value):
    args = task_arguments("denoise", files[0], None, tmp_path / "out.nii.gz")
    extra = [option, value, "100"] if option == "--window" else [option, value]
    code, err = run_cli(args + extra, capsys)
    assert code == 2 and f"{option} must be a finite number" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-5", "1e6"])
def test_a_noise_level_that_no_ct_has_is_refused(files, tmp_path, capsys, value):
    code, err = run_cli(task_arguments("denoise", files[0], None, tmp_path / "out.nii.gz") + ["--noise-level", value],
                        capsys)
    assert code == 2 and "the noise level must be > 0 and at most 1000 HU (a noise std in HU)" in err
    assert list(tmp_path.iterdir()) == []


def test_a_preview_must_be_a_png(files, tmp_path, capsys):
    args = task_arguments("denoise", files[0], None, tmp_path / "out.nii.gz")
    code, err = run_cli(args + ["--preview", str(tmp_path / "preview.nii")], capsys)
    assert code == 2 and "give a name ending in .png" in err and list(tmp_path.iterdir()) == []


def test_sigterm_cancels_a_job_like_ctrl_c(files, tmp_path):
    """`kill PID` (what job schedulers and process managers send) ends a task with no output and exit code 130."""
    out = tmp_path / "out.nii.gz"
    args = task_arguments("synthesize", files[0], None, out)
    args[args.index("--nfe") + 1] = "1000"
    args[args.index("--progress") + 1] = "machine"
    job = subprocess.Popen([sys.executable, "-m", "MedDiffFMLib", *args], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    for line in job.stdout:  # the job is sampling once it reports progress
        if line.startswith(_common.PROGRESS_PREFIX):
            job.send_signal(signal.SIGTERM)
            break
    rest = job.stdout.read()
    assert job.wait(timeout=600) == 130 and "error: cancelled; no output was written" in rest
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_no_output_goes_into_the_series_folder_of_one_dicom_file_given(tmp_path, capsys):
    """One .dcm file stands for its whole series, as its folder does: the output may not land beside it."""
    from conftest import THREE_SLICE_DICOM

    series = tmp_path / "series"
    shutil.copytree(THREE_SLICE_DICOM, series)
    one_file = sorted(series.iterdir())[0]
    before = sorted(p.name for p in series.iterdir())
    args = task_arguments("denoise", one_file, None, series / "denoised.nii.gz")
    code, err = run_cli(args, capsys)
    assert code == 2 and "is inside the folder of the input DICOM series" in err
    assert sorted(p.name for p in series.iterdir()) == before
    # ... but the folder above it is not the series': a .dcm in the working folder does not block results/.
    args = task_arguments("denoise", one_file, None, tmp_path / "results" / "denoised.nii.gz")
    code, err = run_cli(args, capsys)
    assert "inside the folder" not in err


def test_a_name_too_long_is_refused_before_the_job_even_in_a_new_folder(files, tmp_path, capsys):
    """The folder does not exist yet, so the file system cannot be asked: the name's length is checked itself."""
    out = tmp_path / "new" / ("b" * 300 + ".nii.gz")
    code, err = run_cli(task_arguments("denoise", files[0], None, out), capsys)
    assert code == 2 and "is longer than the 255 bytes a file system allows" in err
    assert list(tmp_path.iterdir()) == []


def test_a_long_name_in_multibyte_characters_is_written(files, tmp_path):
    """The temporary name keeps at most 64 bytes of the name, also when its characters take 4 bytes each."""
    name = "\U0001F600" * 60 + ".nrrd"  # 245 bytes: a legal name
    write_volume(read_volume(files[0]), tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_out_of_memory_from_the_operating_system_gets_the_hint(monkeypatch, capsys):
    """ENOMEM arrives as an OSError ("Cannot allocate memory"): the out-of-memory hint, not a path message."""
    from MedDiffFMLib.commands import info

    def no_memory(args):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(info, "run", no_memory)  # the parser takes each command's run when it is built
    assert main(["info", "x.nii.gz"]) == 2
    assert "error: out of memory (" in capsys.readouterr().err


def test_the_anomaly_summary_prints_a_small_threshold_as_given(files, tmp_path, capsys):
    """A threshold of 1e-4 HU printed as 0 would be a value the command itself refuses."""
    args = task_arguments("detect-anomalies", files[0], files[1], tmp_path / "map.nii.gz") + ["--threshold", "1e-4"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["threshold_hu"] == 1e-4 and summary["score_hu"] > 0
