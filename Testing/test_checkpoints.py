"""Model files: round trip, clear errors for every kind of bad file, never unpickled; registry; train state."""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from MedDiffFMLib import checkpoints
from MedDiffFMLib import registry as registry_module
from MedDiffFMLib.checkpoints import (load_model, load_training_state, read_model_info, resolve_model, save_model,
                                      save_training_state, sha256_file)
from MedDiffFMLib.config import preset
from MedDiffFMLib.errors import CheckpointError, InputError
from MedDiffFMLib.network import MedDiffNet


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny")
    return cfg, MedDiffNet(cfg).state_dict()


def _rewrite_weights(base, data: bytes):
    """Replace the weights file and record its new hash, so the loader gets past the SHA check."""
    weights = base.with_name(base.name + ".safetensors")
    weights.write_bytes(data)
    sidecar = base.with_name(base.name + ".json")
    info = json.loads(sidecar.read_text())
    info["sha256"] = sha256_file(weights)
    info["size"] = len(data)
    sidecar.write_text(json.dumps(info))
    return weights


def _edit_description(base, **changes):
    sidecar = base.with_name(base.name + ".json")
    info = json.loads(sidecar.read_text())
    info.update(changes)
    sidecar.write_text(json.dumps(info))


def test_round_trip_fp32_and_fp16(tiny, tmp_path):
    cfg, state = tiny
    save_model(state, cfg, tmp_path / "m32", {"steps": 7}, half=False)
    model, cfg2, info = load_model(tmp_path / "m32.safetensors")
    assert cfg2 == cfg and info["steps"] == 7 and info["sha256"] == sha256_file(tmp_path / "m32.safetensors")
    assert info["patch_size"] == cfg.patch_size and info["anatomy"] == cfg.anatomy and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    # The weights get the same permissions as their description (shared run folders: readable by the group).
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "m32.safetensors") == mode(tmp_path / "m32.json")
    save_model(state, cfg, tmp_path / "m16", {}, half=True)
    model16, _, info16 = load_model(tmp_path / "m16")  # the name without suffix works too
    assert info16["dtype"] == "float16"
    for key, value in model16.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].half().float())


def test_missing_damaged_and_wrong_files(tiny, tmp_path):
    cfg, state = tiny
    base = tmp_path / "m"
    save_model(state, cfg, base, {}, half=False)
    good = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.safetensors")
    (tmp_path / "m.safetensors").write_bytes(good[:-100] + b"x" * 100)  # same size, changed bytes
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(base)
    _rewrite_weights(base, good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(base)
    _rewrite_weights(base, bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(base)
    _rewrite_weights(base, good)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(base)
    (tmp_path / "m.json").write_text("[1, 2]")  # valid JSON, but not an object
    with pytest.raises(CheckpointError, match="m.json is not a MedDiffFM model description.*not a JSON object"):
        load_model(base)


def test_a_description_must_let_the_weights_be_checked(tiny, tmp_path):
    """Without a SHA-256 the loader could not tell damaged or swapped weights: such a description is refused."""
    cfg, state = tiny
    save_model(state, cfg, tmp_path / "m", {}, half=False)
    info = json.loads((tmp_path / "m.json").read_text())
    for sha, message in ((None, "records no valid SHA-256 of its weights \\(None\\)"),
                         ("abc", "records no valid SHA-256"), (..., "m.json lacks sha256")):
        changed = {k: v for k, v in info.items() if k != "sha256"} if sha is ... else dict(info, sha256=sha)
        (tmp_path / "m.json").write_text(json.dumps(changed))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "m")
    assert checkpoints.model_intact(tmp_path / "m") is False
    (tmp_path / "m.json").write_text(json.dumps(info))
    assert checkpoints.model_intact(tmp_path / "m") is True


def test_a_model_of_another_format_version_is_named_as_such(tiny, tmp_path):
    """It used to be called no MedDiffFM model description at all."""
    cfg, state = tiny
    save_model(state, cfg, tmp_path / "m", {})
    _edit_description(tmp_path / "m", format="meddifffm-model-2")
    with pytest.raises(CheckpointError, match="a model of format 'meddifffm-model-2', which this version of "
                                              "MedDiffFM cannot read \\(it reads 'meddifffm-model-1'\\); use the"):
        load_model(tmp_path / "m.safetensors")


def test_integer_weights_are_refused_even_with_a_matching_hash(tiny, tmp_path):
    cfg, state = tiny
    save_model({k: (v * 100).to(torch.int8) for k, v in state.items()}, cfg, tmp_path / "m", {}, half=False)
    with pytest.raises(CheckpointError, match="do not fit the architecture.*wrong type \\(e.g. .* torch.int8 vs "
                                              "torch.float32"):
        load_model(tmp_path / "m")


def test_paths_that_are_not_model_files_get_their_own_message(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only .safetensors models .* .pt files can hold pickled code"):
        resolve_model(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="is a folder; give the model file in it .*ema.safetensors"):
        resolve_model(tmp_path)
    state = checkpoints.save_training_state(tmp_path / "run", 410, {"model.w": torch.zeros(2)}, {})
    with pytest.raises(CheckpointError, match=r"state-00000410.safetensors is a training run's state .*not a model; "
                                              r"use the model the run exports, .*run/ema.safetensors"):
        load_model(state.parent / "state-00000410.safetensors")


def test_a_registered_name_wins_over_a_file_of_that_name_in_the_working_folder(tmp_path, monkeypatch):
    """A `default.json` training config next to the user's data must not hide the registered `default` model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps(preset("tiny").to_dict()))
    assert resolve_model("tiny") == checkpoints.RESOURCES / next(
        m["file"] for m in checkpoints.registry() if m["name"] == "tiny")
    assert resolve_model("./tiny").resolve() == tmp_path / "tiny.safetensors"  # asked for as a path: that file
    (tmp_path / "tiny").mkdir()  # e.g. a run folder (`train --out tiny`)
    assert resolve_model("tiny").name == "meddifffm-tiny.safetensors"
    with pytest.raises(CheckpointError, match="is a folder"):
        resolve_model("./tiny")


def test_a_model_in_the_user_cache_wins_over_a_folder_of_that_name(tiny, tmp_path, monkeypatch):
    cfg, state = tiny
    monkeypatch.setenv("MEDDIFFFM_HOME", str(tmp_path / "home"))
    save_model(state, cfg, tmp_path / "home" / "mine", {}, half=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # e.g. the run folder the model was trained in
    assert resolve_model("mine") == tmp_path / "home" / "mine.safetensors"
    with pytest.raises(CheckpointError, match="is a folder"):
        resolve_model("./mine")


def test_wrong_architecture_is_named(tiny, tmp_path):
    cfg, state = tiny
    wider = dataclasses.replace(cfg, channels=(8, 16, 32), num_head_channels=(0, 0, 32))
    save_model(state, wider, tmp_path / "m", {}, half=False)
    with pytest.raises(CheckpointError, match="do not fit the architecture.*wrong shape"):
        load_model(tmp_path / "m")
    fewer = {k: v for k, v in state.items() if not k.startswith("unet.out")}
    save_model(fewer, cfg, tmp_path / "n", {}, half=False)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "n")


class _Tripwire:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_renamed_safetensors_is_refused_without_unpickling(tiny, tmp_path):
    cfg, state = tiny
    save_model(state, cfg, tmp_path / "m", {}, half=False)
    tripwire = tmp_path / "unpickled"
    _rewrite_weights(tmp_path / "m", pickle.dumps({"weights": _Tripwire(tripwire)}))
    with pytest.raises(CheckpointError, match="never loads pickled"):
        load_model(tmp_path / "m")
    assert not tripwire.exists()


def test_registry_resolves_the_shipped_tiny_model(monkeypatch, tmp_path):
    entry = next(m for m in checkpoints.registry() if m["name"] == "tiny")
    path = resolve_model("tiny")
    assert path == checkpoints.RESOURCES / entry["file"] and sha256_file(path) == entry["sha256"]
    assert path.stat().st_size == entry["size"] == read_model_info(path)["size"]
    model, cfg, _ = load_model("tiny")
    assert cfg.name == "tiny" and sum(p.numel() for p in model.parameters()) > 0
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((checkpoints.RESOURCES / "Models.schema.json").read_text())
    jsonschema.validate(json.loads(checkpoints.BUNDLED_REGISTRY.read_text()), schema)
    # Unknown names list what is available; the user cache folder is searched after Resources.
    monkeypatch.setenv("MEDDIFFFM_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="unknown model 'nope'; available: tiny"):
        resolve_model("nope")
    save_model(model.state_dict(), cfg, tmp_path / "mine", {})
    assert resolve_model("mine") == tmp_path / "mine.safetensors" and "mine" in checkpoints.available_models()


def test_tasks_warn_when_they_run_a_test_model(caplog):
    from MedDiffFMLib.tasks.common import load_task_model as load_for_task

    assert {m["name"] for m in checkpoints.registry() if m.get("test_only")} == {
        "tiny", "tiny-lesion", "tiny-super-resolution"}
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib"):
        load_for_task("default", torch.device("cpu"))
        assert "test model" not in caplog.text
        load_for_task("tiny-lesion", torch.device("cpu"))
        load_for_task(str(resolve_model("tiny")), torch.device("cpu"))  # by its file's path too
    assert "model tiny-lesion is a test model (Resources/Models.json)" in caplog.text
    assert "meddifffm-tiny.safetensors is a test model" in caplog.text


def test_a_model_given_by_links_is_read_by_the_links_names(tmp_path):
    """A download cache (e.g. Hugging Face's) keeps a model's two files as links named after it, to blobs named by
    their hashes: the description is the link beside the weights' link, not a file beside the blob."""
    from MedDiffFMLib.finetune import base_record
    from MedDiffFMLib.tasks.common import load_task_model as load_for_task

    shipped = resolve_model("tiny")
    (tmp_path / "blobs").mkdir()
    shutil.copyfile(shipped, tmp_path / "blobs" / "b1")
    shutil.copyfile(shipped.with_suffix(".json"), tmp_path / "blobs" / "b2")
    link = tmp_path / "snapshot" / "model.safetensors"
    link.parent.mkdir()
    try:
        link.symlink_to(tmp_path / "blobs" / "b1")
        link.with_suffix(".json").symlink_to(tmp_path / "blobs" / "b2")
    except OSError:  # Windows without the right to make links
        pytest.skip("this system makes no symbolic links")
    assert isinstance(load_for_task(str(link), torch.device("cpu")), MedDiffNet)
    assert base_record(str(link))["name"] == str(link)  # a ControlNet on it finds its base by the link again


def test_fine_tuned_tasks_default_to_controlnets_on_the_bundled_base():
    """generate-lesion, inpaint and super-resolve run, by default, a registered ControlNet for their task that is
    no test model and sits on the bundled `default` base (a retrained base would orphan it)."""
    from MedDiffFMLib.commands import generate_lesion, inpaint, super_resolve

    entries = {m["name"]: m for m in checkpoints.registry()}
    for command, task in ((generate_lesion, "lesion"), (inpaint, "lesion"), (super_resolve, "super-resolution")):
        assert not entries[command.DEFAULT_MODEL].get("test_only"), command.NAME
        model, _, info = load_model(command.DEFAULT_MODEL)
        assert info["task"] == task and model.task == task
        assert info["base_model"]["sha256"] == entries["default"]["sha256"], command.NAME


def test_denoise_defaults_to_the_base_model_trained_on_ct_textured_noise():
    """`denoise` runs, by default, a registered base model (no test model, no ControlNet) of the `default` preset
    whose training gave part of its noise the texture of CT noise; the other zero-shot tasks keep `default`."""
    from MedDiffFMLib.cli import build_parser
    from MedDiffFMLib.commands import denoise

    entries = {m["name"]: m for m in checkpoints.registry()}
    assert not entries[denoise.DEFAULT_MODEL].get("test_only")
    model, cfg, info = load_model(denoise.DEFAULT_MODEL)
    assert "task" not in info and cfg.name == "default"
    assert info["settings"]["correlated_noise_fraction"] > 0
    parser = build_parser()
    assert parser.parse_args(["denoise", "ct.nii.gz", "-o", "out.nii.gz"]).model == denoise.DEFAULT_MODEL
    for task in (["detect-anomalies", "ct.nii.gz", "-o", "out.nii.gz"], ["synthesize", "-o", "out.nii.gz"]):
        assert parser.parse_args(task).model == "default"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="lists a process's mapped files on Linux only")
def test_a_restored_state_keeps_no_mapping_of_its_file(tmp_path):
    """Windows can neither delete nor replace a mapped file: a resumed run, whose optimiser holds the restored
    tensors, failed two checkpoints later when the state it had restored from was pruned."""
    save_training_state(tmp_path, 3, {"model.w": torch.arange(6.0)}, {})
    restored, _ = load_training_state(tmp_path)
    assert torch.equal(restored["model.w"], torch.arange(6.0))
    assert "state-00000003.safetensors" not in Path("/proc/self/maps").read_text()


def test_training_state_survives_a_kill_mid_write(tmp_path):
    tensors = {"model.w": torch.arange(6.0), "rng.train": torch.zeros(4, dtype=torch.uint8)}
    save_training_state(tmp_path, 3, tensors, {"wall_seconds": 1.5})
    # A run killed while writing step 6: partial files exist, but last.json was never moved on.
    (tmp_path / "state-00000006.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "state-00000006.json").write_text('{"step": 6, "sha')
    restored, record = load_training_state(tmp_path)
    assert record["step"] == 3 and record["wall_seconds"] == 1.5
    state_file, record_file = tmp_path / "state-00000003.safetensors", tmp_path / "state-00000003.json"
    assert state_file.stat().st_mode & 0o777 == record_file.stat().st_mode & 0o777
    assert torch.equal(restored["model.w"], tensors["model.w"])
    for step in (9, 12, 15):  # older states are pruned, the newest two kept
        save_training_state(tmp_path, step, tensors, {})
    assert sorted(p.name for p in tmp_path.glob("state-*.json")) == ["state-00000012.json", "state-00000015.json"]
    assert load_training_state(tmp_path)[1]["step"] == 15
    # A damaged newest state: the older one kept next to it takes over (one interval lost, not the run).
    (tmp_path / "state-00000015.safetensors").write_bytes(b"garbage")
    restored, record = load_training_state(tmp_path)
    assert record["step"] == 12 and torch.equal(restored["model.w"], tensors["model.w"])
    assert (tmp_path / "damaged-state-00000015.safetensors").exists()  # kept aside, out of the pruning
    save_training_state(tmp_path, 13, tensors, {})  # the resumed run's next checkpoint keeps the good one
    assert sorted(p.name for p in tmp_path.glob("state-*.json")) == ["state-00000012.json", "state-00000013.json"]
    save_training_state(tmp_path, 15, tensors, {})
    (tmp_path / "state-00000015.safetensors").write_bytes(b"garbage")
    (tmp_path / "last.json").write_text("{broken")
    assert load_training_state(tmp_path)[1]["step"] == 13
    (tmp_path / "state-00000013.json").write_text("[]")
    with pytest.raises(CheckpointError, match="the training state is unreadable"):
        load_training_state(tmp_path)
    assert load_training_state(tmp_path / "empty") is None


def test_a_missing_model_file_and_a_replaced_registered_model_are_named(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"model file m/nothere.safetensors not found$"):
        resolve_model("m/nothere.safetensors")  # it was "model description m/nothere.json not found"
    with pytest.raises(CheckpointError, match=r"model file m/ema.safetenosrs \(nor m/ema.safetenosrs.safetensors\) not "
                                              r"found$"):
        resolve_model("m/ema.safetenosrs")  # a typing slip is named as typed, not only with a suffix added
    with pytest.raises(CheckpointError, match="not found; registered models are named without a suffix: tiny"):
        resolve_model("tiny.safetensors")
    cfg, state = tiny
    other = save_model(state, cfg, tmp_path / "other", {}, half=False)
    entry = next(m for m in checkpoints.registry() if m["name"] == "tiny")
    checkpoints._check_registered("tiny", entry, checkpoints.RESOURCES / entry["file"])  # the shipped one passes
    with pytest.raises(CheckpointError, match="installed files of model 'tiny' .* are not the registered model"):
        checkpoints._check_registered("tiny", entry, other)
    registry_file = tmp_path / "Models.json"
    registry_file.write_text(json.dumps({"models": [{"name": "x", "file": "x.safetensors"}, {"file": "y"}]}))
    with pytest.raises(CheckpointError, match="is damaged \\(an entry without a name or file"):
        checkpoints.read_registry(registry_file)


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', '{"state": 3}'])
def test_training_state_and_registry_that_are_not_json_objects(tmp_path, content):
    (tmp_path / "last.json").write_text(content)
    with pytest.raises(CheckpointError, match="the training state is unreadable"):
        load_training_state(tmp_path)
    registry_file = tmp_path / "Models.json"
    registry_file.write_text(content)
    with pytest.raises(CheckpointError, match="the model registry .* is damaged"):
        checkpoints.read_registry(registry_file)


def test_a_truncated_file_is_named_as_such_before_hashing(tiny, tmp_path):
    cfg, state = tiny
    base = tmp_path / "m"
    weights = save_model(state, cfg, base, {}, half=False)
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download: the description is the old one
    with pytest.raises(CheckpointError, match=f"holds 1000 bytes where its description records {full}.*truncated"):
        load_model(base)


def test_a_description_whose_config_differs_from_the_weights_file_is_refused(tiny, tmp_path):
    """The hash covers only the weights file: a hand-edited config beside it would change every result silently."""
    cfg, state = tiny
    base = tmp_path / "m"
    save_model(state, cfg, base, {}, half=False)
    config = read_model_info(base)["config"]
    _edit_description(base, config=dict(config, windows=dict(config["windows"], chest=[-1000, 1000])))
    with pytest.raises(CheckpointError, match="config that differs from the one stored in the weights file"):
        load_model(base)


def test_non_finite_weights_are_refused_at_loading(tiny, tmp_path):
    cfg, state = tiny
    broken = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in broken.items() if v.is_floating_point() and v.numel() > 1)
    broken[key].view(-1)[0] = float("inf")
    save_model(broken, cfg, tmp_path / "m", {}, half=False)
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights \\(e.g. {key}\\)"):
        load_model(tmp_path / "m")


def test_weights_beyond_fp16_are_saved_in_fp32(tiny, tmp_path, caplog):
    cfg, state = tiny
    big = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in big.items() if v.is_floating_point() and v.numel() > 1)
    big[key].view(-1)[0] = 1e6  # fp16 ends at 65504
    with caplog.at_level(logging.WARNING):
        save_model(big, cfg, tmp_path / "m", {}, half=True)
    assert "beyond the fp16 range" in caplog.text
    model, _, info = load_model(tmp_path / "m")
    assert info["dtype"] == "float32" and model.state_dict()[key].view(-1)[0] == 1e6


def test_a_training_record_cannot_replace_what_save_model_writes(tiny, tmp_path):
    cfg, state = tiny
    with pytest.raises(ValueError, match="may not set format, sha256"):
        save_model(state, cfg, tmp_path / "m", {"sha256": "0" * 64, "format": "x"})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("field, value, named", [
    ("norm_num_groups", 0, "norm_num_groups 0"),
    ("attention_levels", [True, True, True], "every attention level needs num_head_channels"),
    ("num_head_channels", [0, 0, 12], "num_head_channels must divide"),
    ("anatomy", {}, "anatomy {}"),
    ("windows", [[-150, 250]], "windows"),
    ("channels", [8.0, 16, 16], "channels"),
    ("channels", [8, 16, 2 ** 20], "channels"),  # would allocate terabytes while building the network
    ("pe_frequencies", 10 ** 6, "pe_frequencies"),
    ("schedule", "bogus", "schedule 'bogus'"),
    ("num_train_timesteps", "1000", "num_train_timesteps '1000'"),
    ("num_train_timesteps", 10 ** 12, "num_train_timesteps"),
    ("num_train_timesteps", 0, "num_train_timesteps 0"),
    ("num_head_channels", [0, 0, -16], "num_head_channels"),
])
def test_an_unusable_config_is_named_before_the_network_is_built(tiny, tmp_path, field, value, named):
    """A description edited by hand (its config only, as the hash does not cover it) fails with the field named."""
    cfg, state = tiny
    base = tmp_path / "m"
    weights = save_model(state, cfg, base, {}, half=False)
    config = dict(read_model_info(base)["config"], **{field: value})
    from safetensors.torch import load_file, save_file
    save_file(load_file(str(weights)), str(weights), metadata={"format": checkpoints.FORMAT,
                                                             "config": json.dumps(config)})
    _edit_description(base, config=config, sha256=sha256_file(weights), size=weights.stat().st_size)
    with pytest.raises(CheckpointError, match="the model config is unusable.*" + named.replace("[", "\\[")):
        load_model(base)


def test_registering_a_damaged_model_or_into_a_damaged_registry_changes_nothing(tiny, tmp_path, caplog):
    cfg, state = tiny
    registry_path = checkpoints.user_registry()  # the default: the user's registry
    save_model(state, cfg, tmp_path / "good", {}, half=False)
    checkpoints.register_model(tmp_path / "good", "mine", "a test model")
    installed = registry_path.parent / "Models" / "meddifffm-mine.safetensors"
    assert resolve_model("mine") == installed
    before = (installed.read_bytes(), registry_path.read_text())
    bad = save_model(state, cfg, tmp_path / "bad", {}, half=False)
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1  # one flipped bit, the recorded hash left as it was
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoints.register_model(bad, "mine", "replaced")
    assert (installed.read_bytes(), registry_path.read_text()) == before
    assert checkpoints.model_intact(installed)
    # A pickle file is refused as such (before: "model file model.pt.safetensors not found").
    (tmp_path / "model.pt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only .safetensors models .* .pt files can hold pickled code"):
        checkpoints.register_model(tmp_path / "model.pt", "mine", "a pickle")
    assert (installed.read_bytes(), registry_path.read_text()) == before
    # A damaged registry is named, with what to do, before any file is copied.
    registry_path.write_text('{"models": [{"name": "mine"}]}')
    with pytest.raises(CheckpointError, match=f"the model registry {registry_path} is damaged .* repair it, or delete"):
        checkpoints.register_model(tmp_path / "good", "other", "a second model")
    assert not (registry_path.parent / "Models" / "meddifffm-other.safetensors").exists()
    # The shipped models stay usable meanwhile, and the damage is named once.
    with caplog.at_level(logging.WARNING):
        assert resolve_model("tiny") == checkpoints.RESOURCES / "Models" / "meddifffm-tiny.safetensors"
        assert "mine" not in checkpoints.available_models() and "default" in checkpoints.available_models()
    assert caplog.text.count(f"the model registry {registry_path} is damaged") == 1
    assert "Your models are left out until then; the shipped ones are listed" in caplog.text
    # Its files gone, a registered model says where they were and how to put them back.
    registry_path.write_text(json.dumps({"models": [dict(name="gone", file="Models/meddifffm-gone.safetensors")]}))
    with pytest.raises(CheckpointError, match="'gone' is registered but not installed: its file Models/meddifffm-gone"
                       ".safetensors is missing from .*register the model again \\(models FILE --register gone"):
        resolve_model("gone")


def test_a_user_registry_that_cannot_be_read_leaves_the_shipped_models_usable(caplog):
    """As a damaged one does (README: the shipped models still run); here a folder has the registry's name, as
    another user's unreadable file would be."""
    registry_path = checkpoints.user_registry()
    registry_path.mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert resolve_model("tiny") == checkpoints.RESOURCES / "Models" / "meddifffm-tiny.safetensors"
    assert f"the model registry {registry_path} cannot be read" in caplog.text
    with pytest.raises(CheckpointError, match="cannot be read .*repair it, or delete it"):
        checkpoints.register_model(resolve_model("tiny"), "mine", "a copy of tiny")
    assert not (registry_path.parent / "Models").exists()


@pytest.mark.parametrize("change", [{"training": "300 steps"}, {"description": None}, {"sha256": 5}, {"size": True}])
def test_a_user_registry_entry_of_the_wrong_types_is_named_as_damage(change, caplog, capsys):
    """The listing and the lookups of that name used to fail with a traceback (AttributeError, TypeError)."""
    from MedDiffFMLib.commands.models import listing

    checkpoints.register_model(resolve_model("tiny"), "mine", "a copy of tiny")
    registry_path = checkpoints.user_registry()
    entries = json.loads(registry_path.read_text())["models"]
    registry_path.write_text(json.dumps({"models": [dict(entries[0], **change)]}))
    with caplog.at_level(logging.WARNING):
        assert "tiny" in [row["name"] for row in listing()] and "mine" not in checkpoints.available_models()
    assert f"model mine: {next(iter(change))} of the wrong type (Models.schema.json)" in caplog.text


def test_the_registry_checks_the_types_of_its_schema():
    schema = json.loads((checkpoints.RESOURCES / "Models.schema.json").read_text())
    json_types = {"string": str, "integer": int, "boolean": bool, "object": dict, "null": type(None)}
    for key, spec in schema["properties"]["models"]["items"]["properties"].items():
        kinds = tuple(json_types[kind] for kind in ([spec["type"]] if isinstance(spec["type"], str) else spec["type"]))
        assert registry_module.ENTRY_TYPES[key] in (kinds, kinds[0]), key
    assert set(registry_module.ENTRY_TYPES) == set(schema["properties"]["models"]["items"]["properties"])


def test_a_model_replaced_while_it_is_registered_replaces_nothing(tiny, tmp_path, monkeypatch):
    """A run's ema.safetensors is exported anew at each checkpoint: a copy taken after the check is not installed."""
    cfg, state = tiny
    checkpoints.register_model(resolve_model("tiny"), "mine", "a copy of tiny")
    installed = checkpoints.user_registry().parent / "Models"
    before = {path.name: path.read_bytes() for path in installed.iterdir()}
    save_model(state, cfg, tmp_path / "ema", {"steps": 1})
    checked = checkpoints.load_model

    def exported_after_the_check(path):
        loaded = checked(path)
        save_model({k: v + 1 for k, v in state.items()}, cfg, tmp_path / "ema", {"steps": 2})
        return loaded

    monkeypatch.setattr(checkpoints, "load_model", exported_after_the_check)
    with pytest.raises(CheckpointError, match="ema.safetensors changed while it was registered .* nothing was"):
        checkpoints.register_model(tmp_path / "ema.safetensors", "mine", "replaced")
    assert {path.name: path.read_bytes() for path in installed.iterdir()} == before


def test_the_user_registry_cannot_take_a_shipped_name_and_never_hides_one(tmp_path, caplog, monkeypatch):
    tiny_file = resolve_model("tiny")
    with pytest.raises(InputError, match="default is the name of a model shipped with MedDiffFM"):
        checkpoints.register_model(tiny_file, "default", "mine")
    assert not checkpoints.user_registry().exists()
    # An update may ship a name the user registered before: the shipped model is used, and a warning says so.
    checkpoints.register_model(tiny_file, "mine", "a copy of tiny")
    registry_path = checkpoints.user_registry()
    entries = json.loads(registry_path.read_text())["models"]
    registry_path.write_text(json.dumps({"models": entries + [dict(entries[0], name="default")]}))
    with caplog.at_level(logging.WARNING):
        names = [entry["name"] for entry in checkpoints.registry()]
        checkpoints.registry()
    assert names.count("default") == 1 and names[-1] == "mine"
    assert resolve_model("default") == checkpoints.RESOURCES / "Models" / "meddifffm-default.safetensors"
    assert caplog.text.count("the model default registered in") == 1  # once, though every lookup reads the registry
    assert "register yours again under another name" in caplog.text
    # The user's files live apart from a bundled model's download, which the user cache holds too.
    assert resolve_model("mine").parent == checkpoints.user_registry().parent / "Models"
    assert not (checkpoints.cache_dir() / "Models").exists()
    # A bundled model is never read from the user's folder, where a file of its name may lie.
    shipped = json.loads(checkpoints.BUNDLED_REGISTRY.read_text())
    shipped["models"].append(dict(entries[0], name="shipped-later"))  # file: Models/meddifffm-mine.safetensors
    (tmp_path / "Models.json").write_text(json.dumps(shipped))
    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "BUNDLED_REGISTRY", tmp_path / "Models.json")
        with pytest.raises(CheckpointError, match="'shipped-later' is registered but not installed"):
            resolve_model("shipped-later")
    # An entry written on Windows (by an earlier version) resolves everywhere.
    registry_path.write_text(json.dumps({"models": [dict(entries[0], file="Models\\meddifffm-mine.safetensors")]}))
    assert resolve_model("mine") == checkpoints.user_registry().parent / "Models" / "meddifffm-mine.safetensors"


@pytest.mark.parametrize("name", ["mine.safetensors", "v1.json", "mine.PT"])
def test_a_name_that_model_would_read_as_a_file_is_not_registered(name):
    """Such a name could never be run by name, and `mine.safetensors` would share the files of `mine`."""
    with pytest.raises(InputError, match=f"may not end in a file suffix .*--model reads '{name}' as a file"):
        checkpoints.register_model(resolve_model("tiny"), name, "a copy of tiny")
    assert not checkpoints.user_registry().parent.exists()


def test_an_empty_model_name_is_refused_with_the_choices():
    with pytest.raises(CheckpointError, match="no model named; available: .*default"):
        resolve_model("")


def test_head_counts_at_levels_without_attention_are_ignored_as_monai_does(tmp_path):
    """Such configs (MONAI-style, one head count per level) loaded before the config checks: they still do."""
    cfg = dataclasses.replace(preset("tiny"), num_head_channels=(8, 16, 16))
    save_model(MedDiffNet(cfg).state_dict(), cfg, tmp_path / "m", {}, half=False)
    assert load_model(tmp_path / "m")[1].num_head_channels == (8, 16, 16)


def test_the_models_command_lists_describes_verifies_and_registers(tmp_path, monkeypatch, capsys):
    from MedDiffFMLib.cli import main

    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == [entry["name"] for entry in checkpoints.registry()]
    assert rows["default"]["kind"] == "base" and rows["lesion"]["kind"] == "lesion ControlNet"
    assert all(row["installed"] for row in rows.values())
    assert main(["models", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, _, info = load_model("tiny")
    assert report["verified"] and report["sha256"] == info["sha256"]
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    # The description says what a model was trained on, and a ControlNet's task settings.
    for name, data in (("super-resolution", "data       18 CTs (abdomen 1, chest 2, head_neck 1, other 14), slice "
                                            "factor 5\n"),
                       ("lesion", "data       14 CTs, 0.8 of the patches centred on a lesion\n")):
        assert main(["models", name]) == 0
        assert data in capsys.readouterr().out, name
    # A damaged copy is refused, whatever its description says.
    weights = checkpoints.resolve_model("tiny")
    for suffix in (".safetensors", ".json"):
        shutil.copy(weights.with_suffix(suffix), tmp_path / f"copy{suffix}")
    damaged = bytearray((tmp_path / "copy.safetensors").read_bytes())
    damaged[-100] ^= 0xFF
    (tmp_path / "copy.safetensors").write_bytes(bytes(damaged))
    assert main(["models", str(tmp_path / "copy.safetensors")]) == 2
    assert "SHA-256" in capsys.readouterr().err
    # Registering installs a verified copy under the name, in the user's registry, which the tasks read too.
    home = checkpoints.user_registry().parent  # in the user cache folder, apart from downloaded bundled models
    assert home.parent == checkpoints.cache_dir()
    assert main(["models", str(weights), "--register", "mine", "--description", "a test model"]) == 0
    assert f"registered mine: {home / 'Models' / 'meddifffm-mine.safetensors'}" in capsys.readouterr().out
    assert [entry["name"] for entry in checkpoints.read_registry(home / "Models.json")] == ["mine"]
    assert checkpoints.sha256_file(home / "Models" / "meddifffm-mine.safetensors") == info["sha256"]
    assert resolve_model("mine") == home / "Models" / "meddifffm-mine.safetensors"
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert (rows["mine"]["registry"], rows["mine"]["kind"], rows["tiny"]["registry"]) == ("user", "base", "bundled")
    assert main(["models", str(weights), "--register", "other"]) == 2
    assert "--register NAME needs the model file to install (MODEL) and --description TEXT" in capsys.readouterr().err
    for name in ("a/b", "../outside", "", "my model", ".hidden"):  # --model would take it for a path, or not at all
        assert main(["models", str(weights), "--register", name, "--description", "x"]) == 2, name
        assert "a model name is letters, digits" in capsys.readouterr().err
    assert main(["models", str(weights), "--register", "default", "--description", "x"]) == 2
    assert "default is the name of a model shipped with MedDiffFM" in capsys.readouterr().err
    assert main(["models", str(weights), "--register", "mine", "--description", "again"]) == 2
    assert "a model named mine is registered already; give another name, or --overwrite" in capsys.readouterr().err
    for extra in (["--overwrite"], ["--bundled"]):  # nothing to overwrite or bundle without --register
        assert main(["models", str(weights)] + extra) == 2
        assert "--description, --overwrite and --bundled go with --register NAME" in capsys.readouterr().err
    assert main(["models", str(weights), "--register", "mine", "--description", "again", "--overwrite"]) == 0
    assert [entry["description"] for entry in checkpoints.read_registry(home / "Models.json")] == ["again"]
    assert sorted(p.name for p in (home / "Models").iterdir()) == ["meddifffm-mine.json", "meddifffm-mine.safetensors"]
    # --bundled writes the extension's own registry (a copy here), for a release.
    bundled = tmp_path / "Resources" / "Models.json"
    bundled.parent.mkdir()
    bundled.write_text(json.dumps({"models": []}))
    monkeypatch.setattr(registry_module, "BUNDLED_REGISTRY", bundled)
    monkeypatch.setattr(checkpoints, "BUNDLED_REGISTRY", bundled)
    assert main(["models", str(weights), "--register", "shipped", "--description", "x", "--bundled"]) == 0
    assert [entry["name"] for entry in checkpoints.read_registry(bundled)] == ["shipped"]
    assert [entry["name"] for entry in checkpoints.read_registry(home / "Models.json")] == ["mine"]
    shipped = tmp_path / "Resources" / "Models" / "meddifffm-shipped.safetensors"
    assert checkpoints.sha256_file(shipped) == info["sha256"]


@pytest.mark.parametrize("record", [{"validation_loss": "not measured"}, {"validation_loss": {"mean": "n/a"}},
                                    {"base_model": "tiny"}])
def test_the_models_command_describes_a_model_whose_training_record_has_other_types(record, tmp_path, capsys):
    """The record beside the config is free-form (the hash covers the weights only); it used to end in a traceback."""
    from MedDiffFMLib.cli import main

    shipped = resolve_model("tiny")
    shutil.copyfile(shipped, tmp_path / "mine.safetensors")
    shutil.copyfile(shipped.with_suffix(".json"), tmp_path / "mine.json")
    _edit_description(tmp_path / "mine", **record)
    assert main(["models", str(tmp_path / "mine.safetensors")]) == 0
    assert "trained    300 steps" in capsys.readouterr().out


def test_replacing_a_registered_base_names_the_controlnets_it_orphans(tiny, tmp_path, caplog):
    """A ControlNet loads only on a base with the weights it was fine-tuned on (`finetune.find_base`): replacing the
    only such base under its name leaves it without one, and says so; while another model has them, nothing is lost."""
    from MedDiffFMLib.cli import main

    cfg, state = tiny
    base = save_model(state, cfg, tmp_path / "base", {}, half=False)  # weights no shipped model has
    lesion = checkpoints.resolve_model("tiny-lesion")
    for suffix in (".safetensors", ".json"):
        shutil.copy(lesion.with_suffix(suffix), tmp_path / f"lesion{suffix}")
    recorded = read_model_info(lesion)["base_model"]
    _edit_description(tmp_path / "lesion", base_model=dict(recorded, name="mine", sha256=sha256_file(base)))
    for name, source in (("mine", base), ("mine-lesion", tmp_path / "lesion.safetensors"),
                         ("tiny-copy", checkpoints.resolve_model("tiny"))):
        assert main(["models", str(source), "--register", name, "--description", "x"]) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["models", str(base), "--register", "mine", "--description", "y", "--overwrite"]) == 0
        assert "ControlNet" not in caplog.text  # the same weights: no harm
        assert main(["models", str(checkpoints.resolve_model("default")), "--register", "tiny-copy", "--description",
                     "y", "--overwrite"]) == 0
        assert "ControlNet" not in caplog.text  # tiny-lesion's base is still there: `tiny`
        assert main(["models", str(checkpoints.resolve_model("default")), "--register", "mine", "--description", "y",
                     "--overwrite"]) == 0
    assert ("the ControlNet(s) mine-lesion were fine-tuned on the mine just replaced and load only on it"
            in caplog.text)


def test_the_model_listing_marks_a_damaged_description_and_lists_the_rest(monkeypatch):
    from MedDiffFMLib.commands.models import listing

    real = checkpoints.read_model_info

    def damaged_lesion(path):
        if "meddifffm-lesion" in str(path):
            raise CheckpointError("its description is unreadable")
        return real(path)

    monkeypatch.setattr(checkpoints, "read_model_info", damaged_lesion)
    kinds = {row["name"]: row["kind"] for row in listing()}
    assert kinds["lesion"] == "damaged" and kinds["default"] == "base" and len(kinds) == len(checkpoints.registry())
