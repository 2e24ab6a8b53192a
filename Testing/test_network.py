"""The network's space-to-depth stem: exact block rearrangement, full-resolution input and output, ControlNet and
window-size rules, and a denoise of real CT through a stem model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from MedDiffFMLib.config import ModelConfig, preset
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.finetune import ControlledNet
from MedDiffFMLib.network import MedDiffNet, depth_to_space, space_to_depth
from MedDiffFMLib.tasks.common import check_window_size
from MedDiffFMLib.tasks.denoise import denoise


@pytest.fixture(scope="module")
def stem_net():
    """An untrained `tiny` network behind a stem of 2, its zero-initialised layers given small random weights."""
    torch.manual_seed(0)
    model = MedDiffNet(dataclasses.replace(preset("tiny"), stem=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


def test_space_to_depth_moves_each_block_into_channels_and_back_exactly():
    x = torch.randn(2, 3, 4, 6, 8)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 24, 2, 3, 4)
    for a, b, c in np.ndindex(2, 2, 2):  # channel (ch, a, b, c) holds the voxels at offset (a, b, c) of each block
        assert torch.equal(y[:, 1 * 8 + a * 4 + b * 2 + c], x[:, 1, a::2, b::2, c::2])
    assert torch.equal(depth_to_space(y, 2), x)


def test_a_stem_network_works_at_full_resolution(stem_net):
    cfg = stem_net.cfg
    from MedDiffFMLib.conditioning import condition_channels

    x_t = torch.randn(2, 1, 16, 16, 16)
    cond = torch.randn(2, condition_channels(cfg), 16, 16, 16)
    t, region = torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        eps = stem_net(x_t, t, cond, region)
        assert eps.shape == x_t.shape
        # The UNet runs on 8^3 but every voxel of x_t reaches the output: change one, the voxels near it change.
        nudged = x_t.clone()
        nudged[0, 0, 7, 8, 9] += 1.0
        changed = (stem_net(nudged, t, cond, region) - eps).abs()[0, 0]
    assert changed[7, 8, 9] > 0 and changed[7, 8, 8] > 0 and changed[6, 8, 9] > 0


def test_a_controlnet_on_a_stem_network_starts_as_the_base_exactly(stem_net):
    from MedDiffFMLib.conditioning import condition_channels

    net = ControlledNet(stem_net, "lesion").eval()
    x_t = torch.randn(1, 1, 16, 16, 16)
    cond = torch.randn(1, condition_channels(stem_net.cfg) + 1, 16, 16, 16)
    t, region = torch.tensor([40]), torch.tensor([1])
    with torch.no_grad():
        assert torch.equal(net(x_t, t, cond, region), stem_net(x_t, t, cond[:, :-1], region))


def test_window_sizes_and_patches_follow_the_stem():
    cfg = dataclasses.replace(preset("tiny"), stem=2)  # one halving by the stem, two by the levels
    assert cfg.size_multiple == 8 and check_window_size(cfg, 24) == 24
    with pytest.raises(InputError, match=r"whole multiple of 8 voxels for this model \(its input stem"):
        check_window_size(cfg, 20)
    with pytest.raises(ValueError, match="patch_size 12 must be divisible by 8"):
        dataclasses.replace(cfg, patch_size=12)
    with pytest.raises(ValueError, match="stem must be 1 .* or 2"):
        dataclasses.replace(cfg, stem=3)
    # Models saved before the stem existed load as stem 1.
    saved = preset("default").to_dict()
    del saved["stem"]
    assert ModelConfig.from_dict(saved).stem == 1


def test_a_stem_model_denoises_real_ct(stem_net, chest_nodule_crop):
    image, _ = chest_nodule_crop
    rng = np.random.default_rng(0)
    noisy = image.with_array((image.array + rng.normal(0, 30, image.shape)).astype(np.float32))
    first = denoise(noisy, stem_net, nfe=2, noise_level=30, seed=3, region="chest")
    again = denoise(noisy, stem_net, nfe=2, noise_level=30, seed=3, region="chest")
    out = first.denoised
    assert out.shape == noisy.shape and out.spacing == noisy.spacing and out.origin == noisy.origin
    assert np.isfinite(out.array).all() and np.array_equal(out.array, again.denoised.array)
    assert out.array.min() >= noisy.array.min() and out.array.max() <= noisy.array.max()
    assert not np.array_equal(out.array, noisy.array)
