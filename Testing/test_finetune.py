"""ControlNet fine-tuning: weight copy, frozen base, exact equality at initialisation, training, model files."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch

from MedDiffFMLib import diffusion
from MedDiffFMLib.anatomy import threshold_anatomy
from MedDiffFMLib.checkpoints import load_model, save_model
from MedDiffFMLib.config import preset
from MedDiffFMLib.errors import CheckpointError, InputError
from MedDiffFMLib.finetune import (ControlledCondition, ControlledNet, LesionPatches, SuperResolutionPairs, base_record,
                                   check_task, finetune, is_controlnet)
from MedDiffFMLib.io import write_volume
from MedDiffFMLib.network import MedDiffNet, OneDNNConv3d
from MedDiffFMLib.preprocess import window_to_unit
from MedDiffFMLib.tasks.lesion import prepare_box
from MedDiffFMLib.tasks.super_resolution import degrade
from MedDiffFMLib.training import TrainSettings, train

#: ControlNet parts that have no counterpart in the UNet (the control encoder and the zero convolutions).
OWN_PARTS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


def real_batch(base_model, crop):
    """Noisy real-CT windows (2 timesteps) with their condition and the nodule mask as control."""
    image, mask = crop
    cfg = base_model.cfg
    unit = torch.from_numpy(window_to_unit(image.array, cfg.windows["chest"]))
    box = (slice(0, 12), slice(16, 32), slice(16, 32))
    cond = ControlledCondition(cfg, (mask.array > 0).astype(np.float32), image.spacing_zyx, "chest",
                               threshold_anatomy(image))
    window = cond.window((0, 16, 16), (12, 16, 16))
    x0 = unit[box][None, None].expand(2, 1, 12, 16, 16)
    x0 = torch.nn.functional.pad(x0, (0, 0, 0, 0, 0, 4), mode="replicate")  # z 12 -> 16 (network grid)
    window = torch.nn.functional.pad(window[None], (0, 0, 0, 0, 0, 4), mode="replicate").expand(2, -1, -1, -1, -1)
    t = torch.tensor([30, 700])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = diffusion.q_sample(diffusion.Schedule.cosine(), x0, t, noise)
    return x_t, t, window, torch.tensor([1, 1])


def test_controlnet_copies_every_shared_tensor_of_the_base(base):
    monai_log, records = logging.getLogger("monai.networks.utils"), []
    handler = logging.Handler()
    handler.emit = records.append
    monai_log.addHandler(handler)
    try:
        net = ControlledNet(base, "lesion")
    finally:
        monai_log.removeHandler(handler)
    assert not records  # MONAI's "'dst' model updated: 85 of 103 variables" means nothing to a user
    unet = base.unet.state_dict()
    copied, own = 0, []
    for key, value in net.controlnet.state_dict().items():
        if key in unet and unet[key].shape == value.shape:
            assert torch.equal(value, unet[key]), key
            copied += 1
        else:
            own.append(key)
    assert copied > 50
    assert own and all(key.startswith(OWN_PARTS) for key in own), own
    # The zero convolutions start at exactly zero.
    zero = [v for k, v in net.controlnet.state_dict().items() if k.startswith(OWN_PARTS[1:])]
    assert zero and all(not v.any() for v in zero)


def test_base_is_frozen_and_gets_no_gradient(base, chest_nodule_crop):
    net = ControlledNet(base, "lesion")
    net.train()
    assert not any(p.requires_grad for p in net.base.parameters())
    assert not net.base.training and net.controlnet.training
    x_t, t, cond, region = real_batch(base, chest_nodule_crop)
    net(x_t, t, cond, region).abs().mean().backward()
    assert all(p.grad is None for p in net.base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.controlnet.parameters())


def test_output_at_initialisation_equals_the_base_exactly(base, chest_nodule_crop):
    net = ControlledNet(base, "lesion").eval()
    x_t, t, cond, region = real_batch(base, chest_nodule_crop)
    with torch.no_grad():
        expected = base(x_t, t, cond[:, :-1], region)
        got = net(x_t, t, cond, region)
    assert torch.equal(got, expected)
    assert expected.abs().mean() > 0


def test_cpu_inference_takes_onednn_convolutions_with_the_same_results(base, chest_nodule_crop, monkeypatch):
    """Every 3D convolution of the base and of the ControlNet runs oneDNN's kernel in CPU inference (PyTorch's own
    choice for one small window is 2-4x slower), gives what nn.Conv3d gives, and leaves training as it was."""
    net = ControlledNet(base, "lesion").eval()
    convolutions = [layer for layer in net.modules() if isinstance(layer, torch.nn.Conv3d)]
    assert convolutions and all(type(layer) is OneDNNConv3d for layer in convolutions)
    calls = []
    onednn = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *args: calls.append(1) or onednn(*args))
    x_t, t, cond, region = (part[:1] for part in real_batch(base, chest_nodule_crop))  # one window
    with torch.no_grad():
        fast = net(x_t, t, cond, region)
    assert len(calls) == len(convolutions)
    for layer in convolutions:
        layer.__class__ = torch.nn.Conv3d
    try:
        with torch.no_grad():
            plain = net(x_t, t, cond, region)
    finally:
        for layer in convolutions:
            layer.__class__ = OneDNNConv3d
    torch.testing.assert_close(fast, plain, atol=5e-5, rtol=1e-4)  # 1e-5 seen here: kernels differ by CPU
    assert plain.abs().mean() > 1e-3
    calls.clear()
    net(x_t, t, cond, region).abs().mean().backward()  # training: PyTorch's own kernels, with gradients
    assert not calls and any(p.grad is not None for p in net.controlnet.parameters())


def test_a_compiled_controlnet_is_known_as_one(base, chest_nodule_crop):
    """torch.compile wraps a network in a module of another class: `--compile` refused every ControlNet task, and
    inpainting built the base model's condition (one channel short) for the lesion ControlNet."""
    compiled = torch.compile(ControlledNet(base, "lesion").eval(), dynamic=False)  # compiles at its first call only
    assert is_controlnet(compiled) and not is_controlnet(torch.compile(base))
    check_task(compiled, "lesion")
    with pytest.raises(InputError, match="the given model is a lesion ControlNet"):
        check_task(compiled, "super-resolution")
    image, mask = chest_nodule_crop
    job = prepare_box(image, mask, compiled, "chest", 0.0, "cpu", 0.5, None, "fp32")
    assert isinstance(job.sampler.cond, ControlledCondition)


def test_a_model_of_another_kind_is_refused_with_the_model_to_use(base):
    """The message named only `finetune --task ...`, as if a researcher had to train one: it names the registered
    ControlNet of the task, and what the given model is for."""
    for model, task, given in ((base, "super-resolution", "a base model, not a ControlNet (for synthesize, denoise"),
                               (ControlledNet(base, "lesion"), "super-resolution",
                                "a lesion ControlNet (for generate-lesion and inpaint)"),
                               (ControlledNet(base, "super-resolution"), "lesion",
                                "a super-resolution ControlNet (for super-resolve)")):
        with pytest.raises(InputError) as error:
            check_task(model, task)
        assert f"such as the registered `{task}` (the task's default)" in str(error.value)
        assert f"the given model is {given}" in str(error.value)


def test_condition_without_control_channel_is_refused(base, chest_nodule_crop):
    x_t, t, cond, region = real_batch(base, chest_nodule_crop)
    with pytest.raises(ValueError, match="condition channels"):
        ControlledNet(base, "lesion")(x_t, t, cond[:, :-1], region)


def test_super_resolution_pairs_append_the_degraded_patch():
    class Patches:
        cfg = preset("tiny")  # 16^3 patches

        def __getitem__(self, index):
            image = torch.linspace(-1, 1, 16 ** 3).reshape(1, 16, 16, 16)
            return {"image": image, "cond": torch.zeros(3, 16, 16, 16), "region": torch.tensor(0)}

    item = SuperResolutionPairs(Patches(), factor=4)[0]
    assert item["cond"].shape == (4, 16, 16, 16)
    assert torch.equal(item["cond"][-1:], degrade(item["image"], 4))
    with pytest.raises(InputError):
        SuperResolutionPairs(Patches(), factor=1)
    SuperResolutionPairs(Patches(), factor=8)  # two thick slices per patch
    with pytest.raises(InputError, match="a slice factor of 9 leaves the 16\\^3 training patch fewer than 2 thick"):
        SuperResolutionPairs(Patches(), factor=9)  # it trained on one averaged slice, silently


def lesion_training_files(base, chest_nodule_crop, tmp_path):
    """The real nodule crop and its mask as files, the base model file, and lesion patches over them."""
    image, mask = chest_nodule_crop
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(mask, tmp_path / "lesion.nii.gz")
    save_model(base.state_dict(), base.cfg, tmp_path / "base", half=False)
    data = LesionPatches([(tmp_path / "ct.nii.gz", tmp_path / "lesion.nii.gz", "chest")], base.cfg, seed=0)
    return data, str(tmp_path / "base.safetensors")


def test_lesion_masks_over_the_whole_ct_are_refused(base, chest_nodule_crop, tmp_path):
    """As inpaint and generate-lesion refuse them: nothing is left around the lesion to learn it against."""
    image, mask = chest_nodule_crop
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(mask.with_array(np.ones_like(mask.array)), tmp_path / "all.nii.gz")
    with pytest.raises(InputError, match="all.nii.gz covers the whole CT; give masks of the lesions only"):
        LesionPatches([(tmp_path / "ct.nii.gz", tmp_path / "all.nii.gz", "chest")], base.cfg, seed=0)


def test_finetune_trains_only_the_controlnet_and_saves_a_small_file(base, chest_nodule_crop, tmp_path):
    data, weights = lesion_training_files(base, chest_nodule_crop, tmp_path)
    item = data[0]
    assert item["cond"].shape[0] == 23 and item["image"].shape == (1, 16, 16, 16)
    assert set(np.unique(item["cond"][-1].numpy())) <= {0.0, 1.0}

    settings = TrainSettings(steps=3, batch_size=1, lr=1e-3, checkpoint_every=3, validate_every=1000)
    record = finetune(weights, "lesion", data, tmp_path / "run", settings)

    trained = record["model"]
    initial = ControlledNet(base, "lesion")
    for key, value in base.state_dict().items():
        assert torch.equal(trained.base.state_dict()[key], value), key
    changed = [k for k, v in trained.controlnet.state_dict().items()
               if not torch.equal(v, initial.controlnet.state_dict()[k])]
    assert any(k.startswith("controlnet_down_blocks.") for k in changed)

    info = json.loads((tmp_path / "run" / "ema.json").read_text())
    assert info["kind"] == "controlnet" and info["task"] == "lesion" and info["steps"] == 3
    base_size = (tmp_path / "base.safetensors").stat().st_size
    assert (tmp_path / "run" / "ema.safetensors").stat().st_size < base_size  # base weights not duplicated
    loaded, cfg, _ = load_model(tmp_path / "run" / "ema.safetensors")
    assert isinstance(loaded, ControlledNet) and loaded.task == "lesion" and cfg == base.cfg
    assert torch.equal(loaded.base.unet.conv_in.conv.weight, base.unet.conv_in.conv.weight)

    # A description that lacks its base model record is refused with a message, not a KeyError.
    (tmp_path / "broken.json").write_text(json.dumps({k: v for k, v in info.items() if k != "base_model"}))
    shutil.copy(tmp_path / "run" / "ema.safetensors", tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors is a ControlNet whose description lacks its base"):
        load_model(tmp_path / "broken")

    # The ControlNet names its base by SHA-256: a retrained base is refused, not silently combined.
    other = MedDiffNet(base.cfg)
    save_model(other.state_dict(), base.cfg, tmp_path / "base", half=False)
    with pytest.raises(CheckpointError, match="not installed"):
        load_model(tmp_path / "run" / "ema.safetensors")


def test_a_base_given_by_relative_path_is_recorded_absolute(base, tmp_path, monkeypatch):
    """So that the ControlNet finds its base from any working folder; a model name stays a name."""
    save_model(base.state_dict(), base.cfg, tmp_path / "base", half=False)
    monkeypatch.chdir(tmp_path)
    assert base_record("base.safetensors")["name"] == str(tmp_path / "base.safetensors")
    assert base_record("tiny")["name"] == "tiny"


def test_resumed_finetuning_equals_an_uninterrupted_run(base, chest_nodule_crop, tmp_path):
    data, weights = lesion_training_files(base, chest_nodule_crop, tmp_path)

    def run(out, steps, resume=False):
        settings = TrainSettings(steps=steps, batch_size=1, lr=1e-3, checkpoint_every=2, validate_every=1000)
        return finetune(weights, "lesion", data, tmp_path / out, settings, resume=resume)["model"]

    straight = run("straight", 4)
    run("resumed", 2)
    # A run saved before runs recorded their task (settings.extra empty) still resumes: it is a ControlNet run.
    folder = tmp_path / "resumed"
    state_record = folder / (json.loads((folder / "last.json").read_text())["state"] + ".json")
    record = json.loads(state_record.read_text())
    record["settings"]["extra"] = {}
    state_record.write_text(json.dumps(record))
    resumed = run("resumed", 4, resume=True)
    for key, value in straight.controlnet.state_dict().items():
        assert torch.equal(resumed.controlnet.state_dict()[key], value), key
    with pytest.raises(InputError, match="another task"):
        finetune(weights, "super-resolution", data, tmp_path / "resumed", TrainSettings(steps=6), resume=True)
    with pytest.raises(CheckpointError, match="a pre-training run and a ControlNet fine-tuning run cannot"):
        train(base.cfg, data, tmp_path / "resumed", TrainSettings(steps=6), resume=True)
    for suffix in (".safetensors", ".json"):  # the base as the run began on it
        shutil.copy(tmp_path / f"base{suffix}", tmp_path / f"original{suffix}")
    # The base file retrained in place (e.g. a training run's ema.safetensors): the message says so.
    changed = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.state_dict().items()}
    save_model(changed, base.cfg, tmp_path / "base", half=False)
    with pytest.raises(InputError, match="fine-tunes another base than .*: the run began on weights with SHA-256 .* A ControlNet fits "
                                         "only the exact base it was trained on"):
        finetune(weights, "lesion", data, tmp_path / "resumed", TrainSettings(steps=6), resume=True)
    # A state without its settings (hand-edited, or of another program) is named, as `train` names it.
    state_record = folder / (json.loads((folder / "last.json").read_text())["state"] + ".json")
    record = json.loads(state_record.read_text())
    del record["settings"]
    state_record.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="lacks its settings"):
        finetune(str(tmp_path / "original.safetensors"), "lesion", data, tmp_path / "resumed", TrainSettings(steps=6),
                 resume=True)


def test_a_resume_with_another_lesion_probability_is_warned_about(base, chest_nodule_crop, tmp_path, caplog):
    """The share of lesion-centred patches fixes which patches each step trains on, as the patch mix does for
    pre-training; a resume with another share changed them without a word (the run's default came back, too)."""
    data, weights = lesion_training_files(base, chest_nodule_crop, tmp_path)
    settings = TrainSettings(steps=1, batch_size=1, validate_every=1000)
    finetune(weights, "lesion", data, tmp_path / "run", settings)
    other = LesionPatches([(tmp_path / "ct.nii.gz", tmp_path / "lesion.nii.gz", "chest")], base.cfg, seed=0,
                          lesion_probability=0.5)
    caplog.clear()
    finetune(weights, "lesion", other, tmp_path / "run", dataclasses.replace(settings, steps=2), resume=True)
    assert ("resuming with other settings than the run was trained with (--lesion-probability 0.8 -> 0.5)"
            in caplog.text)


def test_finetuning_on_a_training_runs_ema_model_is_warned_about(base, chest_nodule_crop, tmp_path, caplog):
    data, _ = lesion_training_files(base, chest_nodule_crop, tmp_path)
    save_model(base.state_dict(), base.cfg, tmp_path / "run" / "ema", half=False)  # as a training run exports it
    (tmp_path / "run" / "last.json").write_text('{"state": "state-00000001", "step": 1}')
    finetune(str(tmp_path / "run" / "ema.safetensors"), "lesion", data, tmp_path / "cn",
             TrainSettings(steps=1, batch_size=1, validate_every=1000))
    assert "is a training run's EMA model, which the run's next checkpoint replaces" in caplog.text


def test_finetuning_a_controlnet_model_is_refused(base, tmp_path):
    net = ControlledNet(base, "lesion")
    from MedDiffFMLib.finetune import base_record, save_controlled

    save_model(base.state_dict(), base.cfg, tmp_path / "base", half=False)
    save_controlled(net.state_dict(), base.cfg, tmp_path / "cn", "lesion",
                    base_record(str(tmp_path / "base.safetensors")))
    with pytest.raises(InputError, match="already a ControlNet"):
        finetune(str(tmp_path / "cn.safetensors"), "lesion", None, tmp_path / "run", TrainSettings(steps=1))


@pytest.mark.parametrize("name, task", [("tiny-super-resolution", "super-resolution"), ("tiny-lesion", "lesion")])
def test_registered_controlnets_load_with_their_registered_base(name, task):
    from MedDiffFMLib.checkpoints import read_model_info, registry, resolve_model

    model, cfg, info = load_model(name)
    assert isinstance(model, ControlledNet) and model.task == task
    tiny = next(m for m in registry() if m["name"] == "tiny")
    assert info["base_model"]["sha256"] == tiny["sha256"] == read_model_info(resolve_model("tiny"))["sha256"]
    base, _, _ = load_model("tiny")
    for key, value in base.state_dict().items():
        assert torch.equal(model.base.state_dict()[key], value), key
    # Trained: the zero convolutions have left zero.
    assert any(v.any() for k, v in model.controlnet.state_dict().items() if k.startswith(OWN_PARTS[1:]))


def test_a_controlnet_whose_recorded_base_is_a_controlnet_is_refused_clearly(tmp_path):
    """A description naming a ControlNet as the base (itself, or another task's) used to recurse without end or
    fail deep inside the network; no ControlNet is ever taken as a base."""
    from MedDiffFMLib.checkpoints import read_model_info, resolve_model

    for suffix in (".safetensors", ".json"):
        shutil.copyfile(resolve_model("tiny-lesion").with_suffix(suffix), tmp_path / f"cn{suffix}")
    sidecar = tmp_path / "cn.json"
    info = json.loads(sidecar.read_text())
    for base in ({"name": str(tmp_path / "cn.safetensors"), "sha256": info["sha256"]},
                 {"name": "tiny-super-resolution",
                  "sha256": read_model_info(resolve_model("tiny-super-resolution"))["sha256"]}):
        sidecar.write_text(json.dumps(dict(info, base_model=base)))
        with pytest.raises(CheckpointError, match="cn.safetensors names .* as its base model, but that is a ControlNet"):
            load_model(tmp_path / "cn.safetensors")
    sidecar.write_text(json.dumps(dict(info, base_model={"name": "tiny", "sha256": 5})))
    with pytest.raises(CheckpointError, match="lacks its base model"):
        load_model(tmp_path / "cn.safetensors")


def test_the_finetune_command_trains_a_controlnet_and_refuses_bad_settings_before_preparing_data(
        chest_nodule_crop, tmp_path, capsys):
    """`finetune` end to end from the command line on the real nodule crop (lesion task, the registered tiny base),
    and the settings it refuses before any CT is read or cached."""
    from MedDiffFMLib.cli import main

    image, mask = chest_nodule_crop
    ct, lesion = write_volume(image, tmp_path / "ct.nii.gz"), write_volume(mask, tmp_path / "lesion.nii.gz")
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["finetune", "--base", "tiny", "--out", str(run), "--cache-dir", str(cache), "--steps", "2",
              "--batch-size", "1", "--validate-every", "1000", "--progress", "none"]
    for extra, message in (
            (["--task", "lesion", "--data", str(ct)], "needs one mask per CT file: 1 CT files, 0 masks"),
            (["--task", "lesion", "--data", "train", "--masks", str(lesion)], "the 'train' split brings its own"),
            (["--task", "lesion", "--data", str(ct), "--masks", str(lesion), "--val-data", str(ct)],
             "1 CT files, 0 masks \\(--val-data / --val-masks\\)"),
            (["--task", "lesion", "--data", str(ct), "--masks", str(lesion), "--val-masks", str(lesion)],
             "masks go with CT files; there is no --val-data"),
            (["--task", "super-resolution", "--data", str(ct), "--masks", str(lesion)],
             "the super-resolution task takes none"),
            (["--task", "lesion", "--data", str(ct), "--masks", str(lesion), "--lesion-probability", "1.5"],
             "lesion-centred patch probability must be in \\[0, 1\\], got 1.5"),
            (["--task", "super-resolution", "--data", str(ct), "--factor", "100000"],
             "a slice factor of 100000 leaves the 16\\^3 training patch fewer than 2 thick slices"),
            (["--task", "super-resolution", "--data", "train", "--region", "chest"],
             "--region sets the body region of your own CT files; the 'train' split brings"),
            (["--task", "lesion", "--data", str(ct), "--masks", str(lesion), "--region", "lung"],
             "unknown body region 'lung'; this model knows head_neck, chest, abdomen, other")):
        assert main(common + extra) == 2, extra
        assert re.search(message, capsys.readouterr().err), extra
        assert not run.exists() and not cache.exists()
    # The nodule crop is guessed `other` (too small to show a chest); --region says what it is.
    lesion_run = ["--task", "lesion", "--data", str(ct), "--masks", str(lesion), "--region", "chest"]
    assert main(common + lesion_run + ["--lesion-probability", "0.5"]) == 0
    info = json.loads((run / "ema.json").read_text())
    assert (info["kind"], info["task"], info["steps"]) == ("controlnet", "lesion", 2)
    assert info["training_data"]["regions"] == {"chest": 1}
    capsys.readouterr()
    # Resumed without the option, the run keeps its own share of lesion-centred patches (the default came back).
    resumed = list(common)
    resumed[resumed.index("--steps") + 1] = "3"
    assert main(resumed + lesion_run + ["--resume"]) == 0
    info = json.loads((run / "ema.json").read_text())
    assert info["steps"] == 3 and info["training_data"]["lesion_probability"] == 0.5
    assert "resuming with other settings" not in capsys.readouterr().err
    model, cfg, _ = load_model(run / "ema.safetensors")
    assert isinstance(model, ControlledNet) and cfg.name == "tiny"


def test_wrong_base_or_run_folder_is_refused_before_the_data_are_prepared(base, chest_nodule_crop, tmp_path, capsys):
    """A ControlNet given as the base, or a resume of a run of another task or of a pre-training run, was refused only
    after every CT had been read and cached (minutes for a split); `train --resume` into a fine-tuning run too."""
    from MedDiffFMLib.cli import main

    data, weights = lesion_training_files(base, chest_nodule_crop, tmp_path)
    run, cache = tmp_path / "run", tmp_path / "cache"
    finetune(weights, "lesion", data, run, TrainSettings(steps=1, batch_size=1, validate_every=1000))
    common = ["--data", str(tmp_path / "ct.nii.gz"), "--region", "chest", "--cache-dir", str(cache), "--steps", "2",
              "--batch-size", "1", "--progress", "none"]
    resume_sr = ["finetune", "--task", "super-resolution", "--factor", "4", "--base", weights, "--out", str(run),
                 "--resume"] + common
    for argv, message in (
            (resume_sr, "of another task, base model or slice factor \\(task lesion, base SHA-256 [0-9a-f]{12}"),
            (["finetune", "--task", "super-resolution", "--base", str(run / "ema.safetensors"), "--out",
              str(tmp_path / "new")] + common,
             "ema.safetensors is already a ControlNet model \\(fine-tuned for lesion\\); fine-tune on a base "
             "model such as `default`"),
            (["train", "--preset", "tiny", "--out", str(run), "--resume"] + common,
             "a pre-training run and a ControlNet fine-tuning run cannot continue each other")):
        assert main(argv) == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
        assert not cache.exists() and not (tmp_path / "new").exists(), argv
    # The same state as a pre-training run records itself: no fine-tuning settings, no task in its training data.
    state_record = run / (json.loads((run / "last.json").read_text())["state"] + ".json")
    record = json.loads(state_record.read_text())
    record["settings"]["extra"] = {}
    del record["training_data"]["task"]
    state_record.write_text(json.dumps(record))
    assert main(resume_sr) == 2
    assert "holds a pre-training run, not a fine-tuning run" in capsys.readouterr().err
    assert not cache.exists()
