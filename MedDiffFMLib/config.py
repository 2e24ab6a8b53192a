"""Model configuration: architecture, conditioning, intensity windows and diffusion settings.

A checkpoint stores its `ModelConfig` as JSON, so a model file always says which anatomy encoding,
patch size and windows it expects. Presets: `tiny` (tests, seconds on CPU), `default` (trains usefully on
a CPU or in about a GPU-hour, runs on CPU), `paper` (the MedDiff-FM paper: 128^3 patches, base 32 channels,
1 residual block, attention only at the coarsest 16^3 level).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Tuple

REGIONS = ("head_neck", "chest", "abdomen", "other")

# Paper windows (level, width) -> [lo, hi] HU; "other" (extremities) uses the head-and-neck soft-tissue window.
PAPER_WINDOWS: Dict[str, Tuple[float, float]] = {
    "head_neck": (50 - 200, 50 + 200),
    "chest": (-500 - 900, -500 + 900),
    "abdomen": (60 - 180, 60 + 180),
    "other": (50 - 200, 50 + 200),
}


@dataclass
class ModelConfig:
    name: str
    patch_size: int
    channels: Tuple[int, ...]
    attention_levels: Tuple[bool, ...]
    num_head_channels: Tuple[int, ...]
    norm_num_groups: int
    num_res_blocks: int = 1
    pe_frequencies: int = 4
    anatomy: Dict[str, object] = field(
        default_factory=lambda: {"source": "threshold", "encoding": "onehot", "num_classes": 4})
    regions: Tuple[str, ...] = REGIONS
    windows: Dict[str, Tuple[float, float]] = field(default_factory=lambda: dict(PAPER_WINDOWS))
    num_train_timesteps: int = 1000
    schedule: str = "cosine"
    # Training-time choices that inference must know about are recorded here too.
    anatomy_dropout: float = 0.1
    train_spacings: Tuple[Tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),)

    def __post_init__(self):
        n = len(self.channels)
        if not (len(self.attention_levels) == len(self.num_head_channels) == n):
            raise ValueError("channels, attention_levels and num_head_channels need one entry per level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every channel count must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.patch_size % 2 ** (n - 1):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by 2^{n - 1} (one halving per level)")
        missing = set(self.regions) - set(self.windows)
        if missing:
            raise ValueError(f"no intensity window for regions {sorted(missing)}")

    def region_index(self, region: str) -> int:
        if region not in self.regions:
            raise ValueError(f"unknown body region {region!r}; choose one of {', '.join(self.regions)}")
        return self.regions.index(region)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)} (model made by a newer MedDiffFM?)")
        for key in ("channels", "attention_levels", "num_head_channels", "regions"):
            if key in data:
                data[key] = tuple(data[key])
        if "windows" in data:
            data["windows"] = {k: tuple(v) for k, v in data["windows"].items()}
        if "train_spacings" in data:
            data["train_spacings"] = tuple(tuple(s) for s in data["train_spacings"])
        return cls(**data)


# Typical clinical grids (z, y, x) the default model also trains on, so tasks can run on the input's grid.
CLINICAL_SPACINGS = ((1.0, 1.0, 1.0), (1.5, 0.8, 0.8), (3.0, 0.9, 0.9), (5.0, 0.7, 0.7), (3.0, 3.0, 3.0))

PRESETS: Dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", patch_size=16, channels=(8, 16, 16), attention_levels=(False, False, True),
                        num_head_channels=(0, 0, 16), norm_num_groups=8, pe_frequencies=2),
    "default": ModelConfig(name="default", patch_size=32, channels=(16, 32, 64),
                           attention_levels=(False, False, True), num_head_channels=(0, 0, 32),
                           norm_num_groups=16, pe_frequencies=4, train_spacings=CLINICAL_SPACINGS),
    "paper": ModelConfig(name="paper", patch_size=128, channels=(32, 64, 64, 128),
                         attention_levels=(False, False, False, True), num_head_channels=(0, 0, 0, 32),
                         norm_num_groups=32, pe_frequencies=4,
                         anatomy={"source": "totalsegmentator", "encoding": "binary", "num_classes": 118}),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
