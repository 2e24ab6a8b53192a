"""Training on real CT patches: the loss falls, resume equals an uninterrupted run, DDP ranks agree."""
from __future__ import annotations

import dataclasses
import errno
import logging
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from conftest import ABDOMEN_SMALL_NII, CT_DATA, LIMB_MASK_NII, LIMB_NII, REPO
from MedDiffFMLib.checkpoints import load_model, load_training_state
from MedDiffFMLib.cli import main as cli_main
from MedDiffFMLib.config import preset
from MedDiffFMLib.dataset import CTCase, CTPatchDataset
from MedDiffFMLib.diffusion import Schedule
from MedDiffFMLib.errors import CheckpointError, InputError, TrainingDiverged
from MedDiffFMLib.io import read_mask, read_volume
from MedDiffFMLib.network import MedDiffNet
from MedDiffFMLib.preprocess import resample
from MedDiffFMLib.runlock import LOCK_FILE, check_run_lock
from MedDiffFMLib.training import (EMA, Rank, TrainSettings, _batches, _case_changes, setup_distributed, train,
                                   validation_batch, validation_losses)

CASES = [CTCase(str(ABDOMEN_SMALL_NII), region="abdomen"), CTCase(str(LIMB_NII), region="other")]


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(preset("tiny"), train_spacings=((3.0, 3.0, 3.0),))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cfg, cache):
    return CTPatchDataset(CASES, cfg, cache, seed=0)


def _quiet(**kwargs) -> TrainSettings:
    return TrainSettings(checkpoint_every=10 ** 6, checkpoint_minutes=10 ** 6, **kwargs)


def test_loss_falls_on_real_ct(cfg, data, cache, tmp_path):
    """40 steps: the L1 epsilon loss on fixed validation patches and timesteps drops well below its start."""
    val = validation_batch(CTPatchDataset(CASES, cfg, cache, seed=99, anatomy_dropout=0.0), 8)
    schedule = Schedule.cosine(cfg.num_train_timesteps)
    torch.manual_seed(0)  # train() builds its initial weights from the same seed
    before = validation_losses(MedDiffNet(cfg).eval(), schedule, val, torch.device("cpu"))["mean"]
    record = train(cfg, data, tmp_path, _quiet(steps=40, batch_size=2, lr=2e-3, seed=0))
    after = validation_losses(record["model"].eval(), schedule, val, torch.device("cpu"))["mean"]
    print(f"validation loss before {before:.3f}, after {after:.3f}")
    assert after < 0.75 * before, (before, after)
    assert (tmp_path / "loss.csv").read_text().count("\n") == 41 and (tmp_path / "loss_curve.png").stat().st_size > 0
    _, _, info = load_model(tmp_path / "ema")  # the exported EMA model loads and records its training
    assert info["steps"] == 40 and info["weights_kind"] == "ema"


def test_resume_gives_the_uninterrupted_result(cfg, data, tmp_path):
    settings = _quiet(steps=6, batch_size=2, grad_accum=2, seed=5, low_noise_fraction=0.9, low_noise_max_t=30)
    straight = train(cfg, data, tmp_path / "straight", settings)
    train(cfg, data, tmp_path / "split", dataclasses.replace(settings, steps=3))
    # Not given again, the timestep mix is the run's own (RUN_OWN_SETTINGS), not the new-run default.
    resumed = train(cfg, data, tmp_path / "split", dataclasses.replace(settings, low_noise_fraction=None,
                                                                       low_noise_max_t=None), resume=True)
    assert resumed["step"] == 6
    for key, value in straight["model"].state_dict().items():
        assert torch.equal(value, resumed["model"].state_dict()[key]), key
    for key, value in straight["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    rows = (tmp_path / "split" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 7)]


def test_resume_under_another_seed_warns(cfg, data, tmp_path, caplog):
    """The seed fixes the patches: `train --resume` with the seed left out (0) after `--seed 5` says so."""
    settings = _quiet(steps=2, batch_size=1, seed=5)
    train(cfg, data, tmp_path, settings)
    with caplog.at_level(logging.WARNING):
        train(cfg, data, tmp_path, dataclasses.replace(settings, steps=3, seed=0), resume=True)
    assert "--seed 5 -> 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(cfg, data, tmp_path, dataclasses.replace(settings, steps=4, seed=0), resume=True)
    assert "other settings" not in caplog.text  # the run now records seed 0
    # A run of 2 torchrun processes resumed in 1 (or the reverse) draws other patches too.
    state = tmp_path / (json.loads((tmp_path / "last.json").read_text())["state"] + ".json")
    assert json.loads(state.read_text())["processes"] == 1
    state.write_text(json.dumps(dict(json.loads(state.read_text()), processes=2)))
    with caplog.at_level(logging.WARNING):
        train(cfg, data, tmp_path, dataclasses.replace(settings, steps=5, seed=0), resume=True)
    assert "other settings than the run was trained with (processes 2 -> 1)" in caplog.text
    caplog.clear()
    # So does other training data (--data), e.g. one of the two CTs.
    with caplog.at_level(logging.WARNING):
        train(cfg, CTPatchDataset(CASES[:1], cfg, data.cache_dir), tmp_path, dataclasses.replace(settings, steps=6,
                                                                                              seed=0), resume=True)
    assert ("training CTs: 1 left out (STS_001/CT_image.nii.gz), 0 added" in caplog.text
            and "processes" not in caplog.text)


def test_resume_applies_a_new_learning_rate(cfg, data, tmp_path):
    """Annealing a run means resuming it at a lower rate: the rate asked for wins over the checkpoint's."""
    settings = _quiet(steps=3, batch_size=1, seed=5)
    train(cfg, data, tmp_path / "a", settings)
    start = {k: v.clone() for k, v in load_training_state(tmp_path / "a")[0].items() if k.startswith("model.")}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # A rate so small that an Adam step (about lr per weight) vanishes in float32: the weights stay as they were.
    frozen = train(cfg, data, tmp_path / "a", dataclasses.replace(settings, steps=4, lr=1e-30), resume=True)
    moved = train(cfg, data, tmp_path / "b", dataclasses.replace(settings, steps=4), resume=True)
    assert all(torch.equal(v, frozen["model"].state_dict()[k[len("model."):]]) for k, v in start.items())
    assert not all(torch.equal(v, moved["model"].state_dict()[k[len("model."):]]) for k, v in start.items())


def test_resume_without_a_learning_rate_keeps_the_checkpoints(cfg, data, tmp_path):
    """An annealed run resumed without --lr goes on at its annealed rate, not back at the default."""
    train(cfg, data, tmp_path, _quiet(steps=2, batch_size=1, lr=3e-5))
    record = train(cfg, data, tmp_path, _quiet(steps=3, batch_size=1), resume=True)
    _, state = load_training_state(tmp_path)
    assert state["optimizer"]["param_groups"][0]["lr"] == 3e-5 and record["step"] == 3
    assert json.loads((tmp_path / "ema.json").read_text())["settings"]["lr"] == 3e-5  # recorded as trained


def test_resume_repairs_an_export_left_half_replaced(cfg, data, tmp_path):
    """A kill between replacing ema.safetensors and ema.json leaves a pair that does not verify; a resume that
    has nothing left to train must not leave the run's model unloadable."""
    val = CTPatchDataset(CASES, cfg, data.cache_dir, seed=1, anatomy_dropout=0.0)
    settings = TrainSettings(steps=2, batch_size=1, validate_every=2, checkpoint_every=2)
    train(cfg, data, tmp_path, settings, val_data=val)
    losses = json.loads((tmp_path / "ema.json").read_text())["validation_loss"]
    for name in ("ema", "ema-best"):
        good = (tmp_path / f"{name}.safetensors").read_bytes()
        (tmp_path / f"{name}.safetensors").write_bytes(good[:-8] + b"12345678")
        with pytest.raises(CheckpointError, match="damaged or was replaced"):
            load_model(tmp_path / name)
    train(cfg, data, tmp_path, dataclasses.replace(settings, lr=None), resume=True)
    for name in ("ema", "ema-best"):
        _, _, info = load_model(tmp_path / name)
        assert info["steps"] == 2 and info["validation_loss"] == losses and info["settings"]["lr"] == 1e-4


@pytest.mark.parametrize("nccl", [True, False])
def test_gpus_share_gradients_through_gloo_where_pytorch_has_no_nccl(monkeypatch, nccl):
    """Windows builds of PyTorch have no NCCL: asking for it there failed the run at its start."""
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kwargs: joined.append(backend))
    assert setup_distributed().world == 2 and joined == ["nccl" if nccl else "gloo"]


def test_compiling_without_a_compiler_is_refused_before_training(cfg, data, tmp_path, monkeypatch):
    import shutil as shutil_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    with pytest.raises(InputError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        train(cfg, data, tmp_path, TrainSettings(steps=2, batch_size=1, compile=True))
    # The command refuses it before preparing the data (its cache entries).
    ct = tmp_path / "ct.nii.gz"
    shutil.copy(ABDOMEN_SMALL_NII, ct)
    assert cli_main(["train", "--preset", "tiny", "--data", str(ct), "--out", str(tmp_path / "run"), "--compile",
                     "--cache-dir", str(tmp_path / "cache")]) == 2
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_diverging_run_stops_with_its_last_finite_checkpoint(cfg, data, tmp_path):
    """A learning rate far too high turns the weights into NaN within a few steps: training must stop there, not
    finish and export a model whose every output is NaN."""
    with pytest.raises(TrainingDiverged, match="training diverged .*resume from the last checkpoint with a lower --lr"):
        train(cfg, data, tmp_path, TrainSettings(steps=50, batch_size=1, lr=1e4, checkpoint_every=1))
    tensors, record = load_training_state(tmp_path)
    assert 0 < record["step"] < 50 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    model, _, _ = load_model(tmp_path / "ema")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    check_run_lock(tmp_path)  # an error ends the run's hold on the folder too


def test_sigterm_stops_after_the_step_with_a_checkpoint(cfg, data, tmp_path):
    def kill_at_step_2(step, total):
        if step == 2:
            with pytest.raises(InputError, match="is in use by another training"):  # held until the run has stopped
                check_run_lock(tmp_path)
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` of a background run

    previous = signal.getsignal(signal.SIGTERM)
    record = train(cfg, data, tmp_path, _quiet(steps=50, batch_size=1), progress=kill_at_step_2)
    assert record["step"] == 2 and json.loads((tmp_path / "last.json").read_text())["step"] == 2
    assert record["stopped"]  # the CLI then exits non-zero, so `train ... && next` stops too
    assert signal.getsignal(signal.SIGTERM) is previous
    check_run_lock(tmp_path)


def _state_record(run) -> tuple:
    """(path, record) of the newest training state's JSON in a run folder."""
    path = run / (json.loads((run / "last.json").read_text())["state"] + ".json")
    return path, json.loads(path.read_text())


def test_a_resume_on_other_cts_of_the_same_file_name_names_them_and_the_model_records_all(cfg, cache, tmp_path,
                                                                                         caplog):
    """Every IBSI case is CT_image.nii.gz: a run on STS_002 and STS_008 resumed on STS_005 said nothing (a run record
    named its CTs by file name only), and the exported model named STS_005 alone as what it was trained on."""
    def sts(*numbers):
        return CTPatchDataset([CTCase(str(CT_DATA / "ibsi_sts" / f"STS_{n:03d}" / "CT_image.nii.gz"), region="other")
                               for n in numbers], cfg, cache)

    first, other = sts(2, 8), sts(5)
    run, old = tmp_path / "run", tmp_path / "old"
    train(cfg, first, run, _quiet(steps=2, batch_size=1))
    # A record of an older version: file names only. Resumed on the same CTs, that is no change.
    path, record = _state_record(run)
    record["training_data"]["cases"] = ["CT_image.nii.gz", "CT_image.nii.gz"]
    path.write_text(json.dumps(record))
    shutil.copytree(run, old)
    with caplog.at_level(logging.WARNING):
        train(cfg, first, run, _quiet(steps=3, batch_size=1), resume=True)
    assert "other settings" not in caplog.text
    caplog.clear()
    # Resumed on one CT of that name instead of two, the count shows (it said "0 left out, 0 added").
    with caplog.at_level(logging.WARNING):
        train(cfg, other, old, _quiet(steps=3, batch_size=1), resume=True)
    assert "training CTs: 1 left out (CT_image.nii.gz), 0 added" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(cfg, other, run, _quiet(steps=4, batch_size=1), resume=True)
    assert ("training CTs: 2 left out (STS_002/CT_image.nii.gz, STS_008/CT_image.nii.gz), 1 added "
            "(STS_005/CT_image.nii.gz)") in caplog.text
    trained_on = load_model(run / "ema")[2]["training_data"]
    assert trained_on["cases"] == ["STS_005/CT_image.nii.gz"] and trained_on["since_step"] == 4
    assert trained_on["earlier_cases"] == [{"steps": [1, 3], "cases": ["STS_002/CT_image.nii.gz",
                                                                       "STS_008/CT_image.nii.gz"]}]
    # Resumed on the same CTs again, the run keeps what it trained on before.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(cfg, other, run, _quiet(steps=5, batch_size=1), resume=True)
    assert "other settings" not in caplog.text
    assert load_model(run / "ema")[2]["training_data"] == trained_on == _state_record(run)[1]["training_data"]


@pytest.mark.parametrize("before, now, changes", [
    # No change: an older lesion fine-tune named a CT in the working folder "/ct.nii.gz" (one above it
    # "../ct.nii.gz"), an older pre-training by file name after its subject; a folder's name may hold a colon.
    (["/ct.nii.gz", "../up.nii.gz", "cases/b.nii.gz"], ["work/ct.nii.gz", "home/up.nii.gz", "cases/b.nii.gz"],
     ([], [])),
    (["ct.nii.gz", "STS_002:CT_image.nii.gz"], ["a:b/ct.nii.gz", "STS_002:c:d/CT_image.nii.gz"], ([], [])),
    # Changes: another file, another subject, a named folder, one CT fewer.
    (["/ct.nii.gz"], ["work/other.nii.gz"], (["/ct.nii.gz"], ["work/other.nii.gz"])),
    (["STS_002:CT_image.nii.gz"], ["STS_005:STS_005/CT_image.nii.gz"],
     (["STS_002:CT_image.nii.gz"], ["STS_005:STS_005/CT_image.nii.gz"])),
    (["cases/ct.nii.gz"], ["other/ct.nii.gz"], (["cases/ct.nii.gz"], ["other/ct.nii.gz"])),
    (["/ct.nii.gz", "/ct.nii.gz"], ["work/ct.nii.gz"], (["/ct.nii.gz"], [])),
    # A record of a subject's CT and of one of the same file name without a subject, in either order.
    (["CT_image.nii.gz", "STS_002:CT_image.nii.gz"], ["STS_002:STS_002/CT_image.nii.gz", "mine/CT_image.nii.gz"],
     ([], [])),
    (["STS_002:CT_image.nii.gz", "CT_image.nii.gz"], ["STS_002:STS_002/CT_image.nii.gz", "mine/CT_image.nii.gz"],
     ([], [])),
])
def test_an_older_record_of_file_names_matches_the_same_cts_and_not_others(before, now, changes):
    """A lesion fine-tune of an older version resumed on a CT in the working folder warned of a change that did not
    happen, and so did a pre-training record resumed on a CT in a folder whose name holds a colon."""
    assert _case_changes(before, now) == changes


def _lock_holder(run):
    """A process that holds the run lock of `run` until killed, once it has said so."""
    code = ("import sys, time\nfrom MedDiffFMLib.runlock import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_run_folder_in_use_by_another_training_is_refused_before_anything_changes(cfg, data, cache, tmp_path,
                                                                                      capsys):
    """Two `train --out runs/x --resume` side by side both finished, and the folder kept the second's model only."""
    run = tmp_path / "run"
    train(cfg, data, run, _quiet(steps=1, batch_size=1))
    holder = _lock_holder(run)
    try:
        files = {path.name: path.read_bytes() for path in run.iterdir()}
        with pytest.raises(InputError, match=rf"{re.escape(str(run))} is in use by another training \(process "
                                             rf"{holder.pid} on {re.escape(socket.gethostname())}\).*\(kill "
                                             rf"{holder.pid}: it writes a checkpoint first\) and resume"):
            train(cfg, data, run, _quiet(steps=2, batch_size=1), resume=True)
        assert {path.name: path.read_bytes() for path in run.iterdir()} == files
        # The command refuses before it prepares any data.
        config = tmp_path / "tiny.json"
        config.write_text(json.dumps(cfg.to_dict()))
        assert cli_main(["train", "--config", str(config), "--data", str(ABDOMEN_SMALL_NII), "--cache-dir",
                         str(tmp_path / "new-cache"), "--out", str(run), "--steps", "2", "--resume",
                         "--progress", "none"]) == 2
        assert f"is in use by another training (process {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "new-cache").exists() and {p.name: p.read_bytes() for p in run.iterdir()} == files
    finally:
        holder.kill()  # SIGKILL: nothing of its own runs, and its lock ends with it
        holder.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # its note stays, and means nothing now
    held = []
    train(cfg, data, run, _quiet(steps=3, batch_size=1), resume=True,
          progress=lambda step, total: held.append(json.loads((run / LOCK_FILE).read_text())))
    assert held == [{"pid": os.getpid(), "host": socket.gethostname()}] * 2
    check_run_lock(run)  # let go at the end


def test_a_file_system_without_locks_trains_with_a_warning(cfg, data, tmp_path, monkeypatch, caplog):
    """Some network shares refuse every lock (ENOLCK): refusing all training there would be worse than a warning."""
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        record = train(cfg, data, tmp_path, _quiet(steps=1, batch_size=1))
    assert record["step"] == 1 and "this file system offers no locks" in caplog.text


def test_bad_settings_and_an_existing_run_are_refused_before_training(cfg, data, tmp_path):
    for bad in (dict(batch_size=0), dict(grad_accum=0), dict(lr=0.0), dict(checkpoint_every=0),
                dict(low_noise_fraction=2.0), dict(correlated_noise_fraction=-0.5), dict(precision="fp16")):
        with pytest.raises(InputError, match="bad training settings"):
            train(cfg, data, tmp_path / "bad", dataclasses.replace(_quiet(steps=2), **bad))
    assert not (tmp_path / "bad").exists()
    record = train(cfg, data, tmp_path / "run", _quiet(steps=1, batch_size=1))
    assert not record["stopped"]
    files = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()}
    with pytest.raises(InputError, match="already holds a training run; continue it with resume=True"):
        train(cfg, data, tmp_path / "run", _quiet(steps=2, batch_size=1))
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()} == files
    # A finished model kept without its states (cleaned up, or copied in) is not overwritten either.
    for name in list(files):
        if name.startswith(("state-", "last.json")):
            (tmp_path / "run" / name).unlink()
    kept = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()}
    for resume in (False, True):
        with pytest.raises(InputError, match=r"holds ema.safetensors, ema.json.* of an earlier run but no training "
                                             r"state .* a new run would overwrite them"):
            train(cfg, data, tmp_path / "run", _quiet(steps=2, batch_size=1), resume=resume)
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()} == kept
    # A run killed before its first checkpoint leaves only its loss log: rerunning it (with --resume, as the
    # background script does) starts afresh.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "loss.csv").write_text("step,loss,grad_norm\n1,0.5,1.0\n")
    assert train(cfg, data, tmp_path / "killed", _quiet(steps=1, batch_size=1), resume=True)["step"] == 1


def test_an_existing_run_is_refused_in_words_that_fit_the_command_and_the_api(cfg, tmp_path, capsys):
    """The command named the API's resume=True beside --resume; each now names its own."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.json").write_text("{}")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(cfg.to_dict()))
    assert cli_main(["train", "--config", str(config), "--data", str(ABDOMEN_SMALL_NII), "--out", str(run),
                     "--steps", "2", "--progress", "none"]) == 2
    with pytest.raises(InputError) as refused:
        train(cfg, None, run, _quiet(steps=2))  # refused before it reads any data
    for said, option, other in ((capsys.readouterr().err, "--resume", "resume=True"),
                                (str(refused.value), "resume=True", "--resume")):
        assert f"{run} already holds a training run; continue it with {option} or train" in said
        assert other not in said


@pytest.mark.parametrize("part", ["model.", "ema.", "optim."])
def test_a_state_tensor_of_the_wrong_shape_is_named_on_resume(cfg, data, tmp_path, part):
    """A hand-edited state or one of another version: it failed inside the EMA or Adam with a traceback, or (a model
    tensor) was called a run of another kind."""
    from MedDiffFMLib.checkpoints import save_training_state

    train(cfg, data, tmp_path / "run", _quiet(steps=2, batch_size=1))
    tensors, record = load_training_state(tmp_path / "run")
    key = next(k for k, v in tensors.items() if k.startswith(part) and v.dim() > 1)
    tensors[key] = torch.zeros(3, 3)
    scalars = {k: v for k, v in record.items() if k not in ("format", "step", "sha256")}
    save_training_state(tmp_path / "run", record["step"], tensors, scalars)
    with pytest.raises(CheckpointError, match="the training state of step 2 in .* wrong shape .*\\(3, 3\\).* The "
                                              "state is damaged or from another version"):
        train(cfg, data, tmp_path / "run", _quiet(steps=3, batch_size=1), resume=True)


def test_init_from_loads_a_model_and_refuses_another_architecture(cfg, data, tmp_path):
    record = train(cfg, data, tmp_path / "a", _quiet(steps=0), init_from="tiny")
    shipped, _, _ = load_model("tiny")
    with pytest.raises(InputError, match="--init-from tiny-lesion is a ControlNet fine-tuned for lesion"):
        train(cfg, data, tmp_path / "c", _quiet(steps=0), init_from="tiny-lesion")
    assert all(torch.equal(v, record["model"].state_dict()[k]) for k, v in shipped.state_dict().items())
    wider = dataclasses.replace(cfg, channels=(8, 16, 32), num_head_channels=(0, 0, 32))
    with pytest.raises(CheckpointError, match="init-from tiny.*do not fit"):
        train(wider, data, tmp_path / "b", _quiet(steps=0), init_from="tiny")


def _ddp_worker(rank: int, world: int, port: int, cfg, cache, out_dir, steps: int, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    data = CTPatchDataset(CASES, cfg, cache, seed=0)
    record = train(cfg, data, out_dir, _quiet(steps=steps, batch_size=1, lr=1e-3, seed=0), resume=resume)
    torch.save({k: v.clone() for k, v in record["model"].state_dict().items()},
               out_dir.parent / f"{out_dir.name}-rank{rank}.pt")


def _ddp_run(cfg, cache, out_dir, steps: int, resume: bool = False) -> list:
    """Train on two CPU processes (gloo); the weights each rank ended with."""
    for attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_ddp_worker, args=(2, port, cfg, cache, out_dir, steps, resume), nprocs=2, join=True)
            break
        except mp.ProcessRaisedException as exc:
            # The free port is let go before the first process listens on it: another process may take it first.
            # That fails before anything is written; anything else is the test's failure.
            if "EADDRINUSE" not in str(exc) or attempt == 2:
                raise
    return [torch.load(out_dir.parent / f"{out_dir.name}-rank{rank}.pt") for rank in (0, 1)]  # this test's own files


def test_ddp_two_cpu_processes_end_with_identical_weights_and_resume_exactly(cfg, data, cache, tmp_path):
    rank0, rank1 = _ddp_run(cfg, cache, tmp_path / "run", steps=4)
    torch.manual_seed(0)
    initial = MedDiffNet(cfg).state_dict()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # and they did train
    assert (tmp_path / "run" / "last.json").exists()
    check_run_lock(tmp_path / "run")
    # Stopped after 2 steps and resumed, both ranks continue their own streams: the same weights as straight on.
    _ddp_run(cfg, cache, tmp_path / "split", steps=2)
    resumed, _ = _ddp_run(cfg, cache, tmp_path / "split", steps=4, resume=True)
    assert all(torch.equal(rank0[k], resumed[k]) for k in rank0)


def test_ema_follows_its_closed_form_with_warm_up():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema, expected = EMA(model, decay=0.2), 0.0
    for updates, weight in enumerate([1.0, 2.0, 3.0, 4.0]):  # the warm-up ends at the third
        with torch.no_grad():
            model.weight.fill_(weight)
        ema.update(model, updates)
        decay = min(0.2, (1 + updates) / (10 + updates))  # warm-up: the first updates move it most
        expected = decay * expected + (1 - decay) * weight
        assert float(ema.shadow["weight"]) == pytest.approx(expected)


def test_each_ddp_rank_and_micro_batch_draws_its_own_items():
    """Ranks of one step and steps of one rank never draw the same patch index; a resumed run continues the
    sequence (the DDP test above checks only that ranks end with identical weights, whatever data they saw)."""
    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 10 ** 6

        def __getitem__(self, index):
            return index

    def micro_batches(rank: int, start_step: int, count: int):
        batches = _batches(Indices(), start_step, TrainSettings(batch_size=2, grad_accum=2), Rank(rank, world=2))
        return [next(batches).tolist() for _ in range(count)]

    drawn = {rank: micro_batches(rank, 0, 6) for rank in (0, 1)}  # 3 steps of 2 micro-batches of 2
    flat = [i for batches in drawn.values() for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 24
    assert drawn[0][:2] == [[0, 1], [4, 5]] and drawn[1][:2] == [[2, 3], [6, 7]]  # step 0
    assert micro_batches(1, 1, 2) == drawn[1][2:4]  # resumed at step 1


def test_cli_region_of_the_training_cts(cfg, cache, tmp_path, capsys, caplog):
    """The abdomen crop is guessed `abdomen`; --region sets another, recorded with the run, and a resume without it
    (back to the guess) says the stream changes."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(cfg.to_dict()))
    args = ["train", "--config", str(config), "--data", str(ABDOMEN_SMALL_NII), "--cache-dir", str(cache),
            "--out", str(tmp_path / "run"), "--batch-size", "1", "--progress", "none", "--mode-weights", "crop=1"]
    assert cli_main(args + ["--steps", "1", "--region", "other"]) == 0
    assert load_model(tmp_path / "run" / "ema")[2]["training_data"]["regions"] == {"other": 1}
    with caplog.at_level(logging.WARNING):
        assert cli_main(args + ["--steps", "2", "--resume", "--region", "auto"]) == 0  # auto: the guess
    assert "CTs per body region other 1 -> abdomen 1 (--region)" in caplog.text
    assert load_model(tmp_path / "run" / "ema")[2]["training_data"]["regions"] == {"abdomen": 1}
    # A state of an older version recorded its mix rounded (1:1:5 as 0.1429, 0.1429, 0.7143, which sum to 1.0001);
    # resumed on that mix, it is not a change.
    state = tmp_path / "run" / (json.loads((tmp_path / "run" / "last.json").read_text())["state"] + ".json")
    record = json.loads(state.read_text())
    record["training_data"]["mode_weights"] = {"whole": 0.1429, "crop2x": 0.1429, "crop": 0.7143}
    state.write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli_main(args[:-2] + ["--steps", "3", "--resume"]) == 0
    assert "other settings" not in caplog.text
    assert load_model(tmp_path / "run" / "ema")[2]["training_data"]["mode_weights"] == {
        "whole": 0.1429 / 1.0001, "crop2x": 0.1429 / 1.0001, "crop": 0.7143 / 1.0001}
    # Another CT added: the counts per region change with it, and the warning names the CTs, not --region.
    crop = tmp_path / "crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(ABDOMEN_SMALL_NII))[:40, :40, :20], str(crop))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli_main(args[:5] + [str(crop)] + args[5:-2] + ["--steps", "4", "--resume", "--region", "other"]) == 0
    assert (f"training CTs: 0 left out, 1 added ({tmp_path.name}/crop.nii.gz)" in caplog.text
            and "(--region)" not in caplog.text)
    capsys.readouterr()
    entry = next(cache.glob("*.npz"))
    for data, message in ((["train"], "--region sets the body region of your own CT files; the 'train' split"),
                          ([str(entry)], "is a cache entry, which holds its body region already")):
        assert cli_main(args[:4] + data + args[5:] + ["--steps", "1", "--region", "chest", "--out",
                                                      str(tmp_path / "other")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "other").exists()


def test_cli_trains_and_resumes(cfg, cache, tmp_path, capsys, caplog):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(cfg.to_dict()))
    args = ["train", "--config", str(config), "--data", str(ABDOMEN_SMALL_NII), "--cache-dir", str(cache),
            "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "1"]
    assert cli_main(args + ["--progress", "machine", "--correlated-noise", "0.5", "--precision", "fp32",
                            "--low-noise-fraction", "0.1", "--low-noise-max-t", "40", "--mode-weights", "crop2x=1,crop=2",
                            "--fp32-export"]) == 0
    out, err = capsys.readouterr()
    _, _, info = load_model(tmp_path / "run" / "ema")
    assert info["settings"]["correlated_noise_fraction"] == 0.5  # the model records its training noise
    assert info["settings"]["precision"] == "fp32"  # and its arithmetic
    assert re.findall(r"MEDDIFFFM_PROGRESS (\d+) (\d+)", out) == [("1", "2"), ("2", "2")]
    assert "step/s" not in err and "s/step" not in err  # and no bar beside the lines
    # A state of an older version records no training data: the patch mix comes from the exported model.
    state = tmp_path / "run" / (json.loads((tmp_path / "run" / "last.json").read_text())["state"] + ".json")
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "training_data"}))
    # A background run's log keeps its messages only: --progress none draws no bar.
    assert cli_main(args[:-4] + ["--steps", "3", "--batch-size", "1", "--resume", "--progress", "none"]) == 0
    out, err = capsys.readouterr()
    assert "MEDDIFFFM_PROGRESS" not in out and "step/s" not in err and "s/step" not in err
    assert json.loads((tmp_path / "run" / "last.json").read_text())["step"] == 3
    # Resumed without --correlated-noise, --precision, the low-noise options, --mode-weights or --fp32-export, the run
    # kept its own share of textured noise, arithmetic, timestep mix, patch mix and export precision.
    resumed = load_model(tmp_path / "run" / "ema")[2]
    assert resumed["settings"]["correlated_noise_fraction"] == 0.5 and resumed["settings"]["precision"] == "fp32"
    assert (resumed["settings"]["low_noise_fraction"], resumed["settings"]["low_noise_max_t"]) == (0.1, 40)
    assert resumed["settings"]["half_export"] is False
    # The mix is recorded exactly: a rounded one (0.3333 / 0.6667) would draw other patches from here on.
    assert info["training_data"]["mode_weights"] == {"whole": 0.0, "crop2x": 1 / 3, "crop": 2 / 3}
    assert resumed["training_data"]["mode_weights"] == info["training_data"]["mode_weights"]
    # --no-fp32-export takes a run back to fp16 model files.
    assert cli_main(args[:-4] + ["--steps", "4", "--resume", "--progress", "none", "--no-fp32-export"]) == 0
    assert load_model(tmp_path / "run" / "ema")[2]["settings"]["half_export"] is True
    with safe_open(str(tmp_path / "run" / "ema.safetensors"), "pt") as stored:
        assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"F16"}
    # A damaged last.json: the run resumes from the newest state kept, and keeps that state's patch mix.
    (tmp_path / "run" / "last.json").write_text("garbage")
    resume = args[:-4] + ["--resume", "--progress", "none"]  # batch 2, as the run went on at step 4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli_main(resume + ["--steps", "5"]) == 0
    assert "newer training state unreadable (last.json" in caplog.text and "other settings" not in caplog.text
    assert load_model(tmp_path / "run" / "ema")[2]["training_data"]["mode_weights"] == {
        "whole": 0.0, "crop2x": 1 / 3, "crop": 2 / 3}
    # A damaged newest state: the run resumes from the older one and takes that one's mix (before, the mix came from
    # the newest state's readable JSON, here edited to another).
    newest = tmp_path / "run" / json.loads((tmp_path / "run" / "last.json").read_text())["state"]
    record = json.loads(newest.with_suffix(".json").read_text())
    record["training_data"]["mode_weights"] = {"whole": 0.0, "crop2x": 0.0, "crop": 1.0}
    newest.with_suffix(".json").write_text(json.dumps(record))
    damaged = bytearray(newest.with_suffix(".safetensors").read_bytes())
    damaged[-1] ^= 1
    newest.with_suffix(".safetensors").write_bytes(bytes(damaged))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli_main(resume + ["--steps", "6"]) == 0
    assert "resuming from state-00000004" in caplog.text and "other settings" not in caplog.text
    assert load_model(tmp_path / "run" / "ema")[2]["training_data"]["mode_weights"]["crop"] == 2 / 3
    # Another mix given on resuming is taken, and the warning says the patches differ from here on.
    with caplog.at_level(logging.WARNING):
        assert cli_main(resume + ["--steps", "7", "--mode-weights", "crop=1"]) == 0
    assert "(patch mix whole 0, crop2x 0.333, crop 0.667 -> whole 0, crop2x 0, crop 1)" in caplog.text


def test_cli_trains_a_user_anatomy_model_on_the_label_maps_given(cfg, tmp_path, capsys):
    """A model conditioned on the user's anatomy is trained on label maps paired with the CTs; another model, whose
    anatomy the tasks compute from the CT, refuses them."""
    user = dataclasses.replace(cfg, anatomy={"source": "user", "encoding": "onehot", "num_classes": 1})
    configs = {}
    for name, model_cfg in (("user", user), ("threshold", cfg)):
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(json.dumps(model_cfg.to_dict()))
    cache = tmp_path / "cache"
    args = ["--data", str(LIMB_NII), "--cache-dir", str(cache), "--out", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "1", "--progress", "none"]
    refused = {
        (): "give every training CT its label map (the train command's --anatomy-labels and --val-anatomy-labels",
        ("--anatomy-labels", str(LIMB_MASK_NII), str(LIMB_MASK_NII)):
            "--anatomy-labels gives one label map per CT file of --data, in the same order: got 2 label maps for",
        ("--anatomy-labels", str(LIMB_MASK_NII), "--val-anatomy-labels", str(LIMB_MASK_NII)):
            "--val-anatomy-labels needs --val-data",
        ("--anatomy-labels", str(LIMB_MASK_NII), "--val-data", str(LIMB_NII)):
            "the model is conditioned on anatomy label maps from the user, and this CT has none",
    }
    folder = tmp_path / "cts"
    folder.mkdir()
    shutil.copy(LIMB_NII, folder)
    for data, message in ((folder, "is a folder without a DICOM series: with --anatomy-labels, list the CT files"),
                          (tmp_path / "entry.npz", "is a cache entry, which holds its anatomy labels already")):
        args_here = ["--data", str(data)] + args[2:] + ["--anatomy-labels", str(LIMB_MASK_NII)]
        assert cli_main(["train", "--config", str(configs["user"])] + args_here) == 2
        assert message in capsys.readouterr().err
    for extra, message in refused.items():
        assert cli_main(["train", "--config", str(configs["user"])] + args + list(extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not list(cache.glob("*.npz"))  # refused before any preparation
    assert cli_main(["train", "--config", str(configs["threshold"])] + args
                    + ["--anatomy-labels", str(LIMB_MASK_NII)]) == 2
    assert "an anatomy label map was given, but the model is conditioned on threshold anatomy" in capsys.readouterr().err

    labels = ["--anatomy-labels", str(LIMB_MASK_NII), "--val-data", str(LIMB_NII),
              "--val-anatomy-labels", str(LIMB_MASK_NII)]
    assert cli_main(["train", "--config", str(configs["user"])] + args + labels) == 0
    # The cached labels are the label map on the training grid, not threshold classes.
    mask = read_mask(LIMB_MASK_NII, like=read_volume(LIMB_NII))
    expected = resample(mask, (3.0, 3.0, 3.0), is_mask=True).array
    [entry] = cache.glob("*.npz")
    with np.load(entry) as stored:
        np.testing.assert_array_equal(stored["labels"], expected)
    assert load_model(tmp_path / "run" / "ema")[1].anatomy["source"] == "user"


def test_a_hard_cancel_of_training_says_which_checkpoint_stays(cfg, cache, tmp_path, capsys, monkeypatch):
    """A second Ctrl-C skips the stop at a checkpoint: the message said "no output was written" even when the run
    folder held checkpoints to resume from."""
    import MedDiffFMLib.training as training

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(cfg.to_dict()))
    args = ["train", "--config", str(config), "--data", str(ABDOMEN_SMALL_NII), "--cache-dir", str(cache),
            "--out", str(tmp_path / "run"), "--batch-size", "1", "--progress", "none"]
    assert cli_main(args + ["--steps", "2"]) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_optimizer_step", interrupted)
    assert cli_main(args + ["--steps", "4", "--resume"]) == 130
    assert (f"error: cancelled; {tmp_path / 'run'} keeps its checkpoint of step 2; continue with the same command "
            "and --resume") in capsys.readouterr().err
    assert cli_main(args[:-8] + ["--out", str(tmp_path / "new"), "--batch-size", "1", "--steps", "4"]) == 130
    assert f"error: cancelled; no checkpoint was written to {tmp_path / 'new'}" in capsys.readouterr().err


def test_a_resume_under_another_configuration_says_how_it_differs(cfg):
    from MedDiffFMLib.training import _config_difference

    saved = json.loads(json.dumps(cfg.to_dict()))
    assert _config_difference(saved, preset("default")) == "'tiny', not 'default'"
    edited = dict(saved, patch_size=32)  # the same name, one field changed
    assert _config_difference(edited, cfg) == "its patch_size differs"


def test_cli_refuses_conflicting_or_unusable_settings_before_preparing_data(cfg, tmp_path, capsys):
    """Each of these used to fail late (after minutes of preprocessing) or with a traceback; none may touch the
    cache or the run folder."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    train_args = ["train", "--data", str(ABDOMEN_SMALL_NII), "--cache-dir", str(cache), "--out", str(run),
                  "--steps", "1", "--batch-size", "1"]
    bad_config = tmp_path / "list.json"
    bad_config.write_text("[1, 2]")
    short_config = tmp_path / "short.json"  # 100 timesteps: a new run's low-noise max t of 250 does not fit
    short_config.write_text(json.dumps(dataclasses.replace(cfg, num_train_timesteps=100).to_dict()))
    from MedDiffFMLib.checkpoints import resolve_model

    damaged = tmp_path / "damaged.safetensors"  # a flipped bit in the weights; its description intact
    weights = bytearray(resolve_model("tiny").read_bytes())
    weights[-1] ^= 1
    damaged.write_bytes(bytes(weights))
    damaged.with_suffix(".json").write_bytes(resolve_model("tiny").with_suffix(".json").read_bytes())
    for extra, message in (
            (["--init-from", str(damaged)], "SHA-256"),
            (["--preset", "tiny", "--init-from", "default"], "--init-from default is a 'default' model, but --preset "
                                                             "tiny asks for another"),
            (["--config", str(tmp_path / "absent.json")], "cannot read --config"),
            (["--config", str(bad_config)], "is not a usable model configuration"),
            (["--preset", "tiny", "--low-noise-max-t", "5000"], "low-noise max t must be in \\[1, 1000\\]"),
            (["--config", str(short_config)], "low-noise max t must be in \\[1, 100\\] .*got 250"),
            (["--preset", "tiny", "--mode-weights", "whole=nan"], "patch mode weights must be finite"),
            (["--preset", "tiny", "--mode-weights", "foo=1"], "unknown patch mode\\(s\\) foo; the modes are whole"),
            (["--init-from", "tiny-lesion"], "--init-from tiny-lesion is a ControlNet fine-tuned for lesion"),
            (["--preset", "tiny", "--lr", "inf"], "--lr must be a finite number")):
        assert cli_main(train_args + extra) == 2
        assert re.search(message, capsys.readouterr().err), extra
    assert not cache.exists() and not run.exists()
    # A resume under another preset is refused before any data is prepared too.
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(cfg.to_dict()))
    assert cli_main(train_args + ["--config", str(config)]) == 0
    entries = sorted(cache.iterdir())
    assert cli_main(train_args + ["--preset", "default", "--resume"]) == 2
    assert "holds a run of another model configuration ('tiny', not 'default')" in capsys.readouterr().err
    assert sorted(cache.iterdir()) == entries  # no `default` entries were made


def test_cli_refuses_a_resume_it_cannot_do_before_preparing_data(tmp_path, capsys):
    """A run without a readable state, and a ControlNet's run, used to be refused only after the data were prepared
    (minutes for a whole training set)."""
    from MedDiffFMLib.checkpoints import save_training_state

    cache, run = tmp_path / "cache", tmp_path / "run"
    train_args = ["train", "--preset", "tiny", "--data", str(ABDOMEN_SMALL_NII), "--cache-dir", str(cache), "--out",
                  str(run), "--steps", "1", "--batch-size", "1", "--resume"]
    finetuning = {"config": preset("tiny").to_dict(), "settings": {"extra": {"finetune": {"task": "lesion"}}}}
    save_training_state(run, 4, {"model.controlnet.w": torch.zeros(1)}, finetuning)
    assert cli_main(train_args) == 2
    assert "holds a run of another kind of model" in capsys.readouterr().err
    (run / "state-00000004.safetensors").unlink()  # e.g. deleted to save space
    assert cli_main(train_args) == 2
    assert re.search("cannot resume from .*run: the training state is unreadable \\(state-00000004: .*No such file",
                     capsys.readouterr().err)
    assert not cache.exists() and sorted(path.name for path in run.iterdir()) == ["last.json", "state-00000004.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="train() takes the GPU, where auto is bf16")
def test_precision_auto_is_fp32_on_the_cpu_and_bf16_is_autocast(cfg, data, tmp_path):
    """The GPU runs train under bf16 autocast by default; `precision` lets one compare it with fp32 anywhere."""
    runs = {p: train(cfg, data, tmp_path / p, _quiet(steps=2, batch_size=1, seed=3, precision=p))
            for p in ("auto", "fp32", "bf16")}
    weights = {p: torch.cat([v.flatten() for v in r["model"].state_dict().values() if v.is_floating_point()])
               for p, r in runs.items()}
    assert torch.equal(weights["auto"], weights["fp32"])
    assert not torch.equal(weights["bf16"], weights["fp32"])
    assert torch.allclose(weights["bf16"], weights["fp32"], atol=0.05)  # the same step, rounded otherwise


def test_the_best_model_is_the_validated_ema_with_its_own_validation(cfg, data, cache, tmp_path, monkeypatch):
    """Validations (every 2 steps) and checkpoints (every 3) rarely meet: a better validation is saved at once, so
    `ema-best` holds the very weights it was scored on, recorded with that score, even when later ones score worse."""
    scores = iter([0.5, 0.9])  # step 2 is the best, step 4 worse
    monkeypatch.setattr("MedDiffFMLib.training.validation_losses", lambda *a, **k: {"mean": next(scores)})
    val = CTPatchDataset(CASES, cfg, cache, seed=99, anatomy_dropout=0.0)
    settings = TrainSettings(steps=4, batch_size=1, seed=2, validate_every=2, checkpoint_every=3,
                             checkpoint_minutes=10 ** 6, validation_patches=2, half_export=False)
    train(cfg, data, tmp_path, settings, val_data=val)
    model, _, info = load_model(tmp_path / "ema-best")
    assert info["steps"] == 2 and info["validation_loss"] == {"mean": 0.5}
    two_steps = train(cfg, data, tmp_path / "two", dataclasses.replace(settings, steps=2))  # the EMA of step 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, two_steps["ema"][key]), key
    assert load_model(tmp_path / "ema")[2]["steps"] == 4


def test_a_schedule_of_another_length_is_validated_in_proportion(cfg, data, cache, tmp_path):
    from MedDiffFMLib.errors import InputError
    from MedDiffFMLib.training import validation_buckets

    assert validation_buckets(1000) == [(0, 100), (100, 250), (250, 500), (500, 1000)]
    assert validation_buckets(5) == [(0, 1), (1, 2), (2, 5)]  # none empty, none repeated
    short = dataclasses.replace(cfg, num_train_timesteps=100)
    val = CTPatchDataset(CASES, short, cache, seed=99, anatomy_dropout=0.0)
    with pytest.raises(InputError, match=r"low-noise max t must be in \[1, 100\] \(the model's timesteps\), got 250"):
        train(short, data, tmp_path / "a", _quiet(steps=1, batch_size=1))  # a new run's 250 does not fit
    record = train(short, data, tmp_path / "b", _quiet(steps=2, batch_size=1, low_noise_max_t=50, validate_every=1,
                                                       validation_patches=2), val_data=val)
    assert set(record["validation"]) == {"t0-10", "t10-25", "t25-50", "t50-100", "mean"}


def test_validation_builds_no_autograd_graph(data):
    """Scored under no_grad: a graph per validation batch would hold the activations of every bucket."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x_t, t, cond, region):
            seen.append(torch.is_grad_enabled())
            return torch.zeros_like(x_t)

    validation_losses(Probe(), Schedule.cosine(1000), validation_batch(data, 2), torch.device("cpu"))
    assert len(seen) == 4 and not any(seen)
