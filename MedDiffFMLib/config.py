"""Model configuration: architecture, conditioning, intensity windows and diffusion settings.

A checkpoint stores its `ModelConfig` as JSON, so a model file always says which anatomy encoding,
patch size and windows it expects. Presets: `tiny` (tests, seconds on CPU), `default` (trains usefully on
a CPU or in about a GPU-hour, runs on CPU), `paper` (the MedDiff-FM paper: 128^3 patches, base 32 channels,
1 residual block, attention only at the coarsest 16^3 level).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Tuple

REGIONS = ("head_neck", "chest", "abdomen", "other")
#: Noise schedules `diffusion.Schedule.from_name` builds.
SCHEDULES = ("cosine",)
#: Network arithmetic, for sampling and training: auto (bf16 autocast on a GPU that has it, else fp32), fp32, bf16.
PRECISIONS = ("auto", "fp32", "bf16")
#: Upper bounds of a usable configuration (`ModelConfig._check_values`): far above any preset, far below what
#: would make building the model or its schedule exhaust memory.
MAX_PATCH_SIZE = 512
MAX_CHANNELS = 2048
MAX_ANATOMY_CLASSES = 1024
MAX_TIMESTEPS = 100_000

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
        self._as_tuples()
        self._check_values()
        n = len(self.channels)
        if not (len(self.attention_levels) == len(self.num_head_channels) == n):
            raise ValueError("channels, attention_levels and num_head_channels need one entry per level")
        attention = [(c, heads) for c, attend, heads in
                     zip(self.channels, self.attention_levels, self.num_head_channels) if attend]
        if any(not heads for _, heads in attention):
            raise ValueError(f"every attention level needs num_head_channels > 0, got {self.num_head_channels}")
        if any(c % heads for c, heads in attention):
            raise ValueError("num_head_channels must divide the channels of each attention level, got "
                             f"{self.num_head_channels} for channels {self.channels}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every channel count must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.patch_size % 2 ** (n - 1):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by 2^{n - 1} (one halving per level)")
        missing = set(self.regions) - set(self.windows)
        if missing:
            raise ValueError(f"no intensity window for regions {sorted(missing)}")

    def _as_tuples(self) -> None:
        """Lists (JSON's, or a caller's) become the tuples the fields declare; a value of the wrong kind is left
        for `_check_values` to name."""
        for key in ("channels", "attention_levels", "num_head_channels", "regions"):
            if isinstance(getattr(self, key), list):
                setattr(self, key, tuple(getattr(self, key)))
        if isinstance(self.windows, dict):
            self.windows = {k: tuple(v) if isinstance(v, list) else v for k, v in self.windows.items()}
        if isinstance(self.train_spacings, (list, tuple)):
            self.train_spacings = tuple(tuple(s) if isinstance(s, list) else s for s in self.train_spacings)

    def _check_values(self) -> None:
        """Types and ranges, so that a hand-edited or damaged description fails here with its field named instead of
        deep inside the network, and never asks for an absurd allocation. The bounds are far above any model the
        presets describe."""
        def whole(value, low, high):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high

        def number(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        problems = []
        if not isinstance(self.name, str):
            problems.append(f"name {self.name!r} is not text")
        if not whole(self.patch_size, 4, MAX_PATCH_SIZE):
            problems.append(f"patch_size {self.patch_size!r} is not a whole number in 4..{MAX_PATCH_SIZE}")
        if not (self.channels and all(whole(c, 1, MAX_CHANNELS) for c in self.channels)):
            problems.append(f"channels {self.channels!r} are not whole numbers in 1..{MAX_CHANNELS}")
        if not all(isinstance(a, bool) for a in self.attention_levels):
            problems.append(f"attention_levels {self.attention_levels!r} are not true/false")
        if not all(whole(h, 0, MAX_CHANNELS) for h in self.num_head_channels):
            problems.append(f"num_head_channels {self.num_head_channels!r} are not whole numbers >= 0")
        if not whole(self.norm_num_groups, 1, MAX_CHANNELS):
            problems.append(f"norm_num_groups {self.norm_num_groups!r} is not a whole number >= 1")
        if not whole(self.num_res_blocks, 1, 32):
            problems.append(f"num_res_blocks {self.num_res_blocks!r} is not a whole number in 1..32")
        if not whole(self.pe_frequencies, 0, 32):
            problems.append(f"pe_frequencies {self.pe_frequencies!r} is not a whole number in 0..32")
        anatomy = self.anatomy if isinstance(self.anatomy, dict) else {}
        if not {"source", "encoding", "num_classes"} <= set(anatomy) or not all(
                isinstance(anatomy[k], str) for k in ("source", "encoding")) \
                or not whole(anatomy["num_classes"], 1, MAX_ANATOMY_CLASSES):
            problems.append(f"anatomy {self.anatomy!r} is not {{source, encoding, num_classes in "
                            f"1..{MAX_ANATOMY_CLASSES}}}")
        if not (self.regions and all(isinstance(r, str) for r in self.regions)):
            problems.append(f"regions {self.regions!r} are not names")
        windows = self.windows if isinstance(self.windows, dict) else {}
        if not windows or not all(isinstance(w, tuple) and len(w) == 2 and all(map(number, w)) and w[0] < w[1]
                                  for w in windows.values()):
            problems.append(f"windows {self.windows!r} are not HU ranges (low, high) per region")
        if not whole(self.num_train_timesteps, 2, MAX_TIMESTEPS):
            problems.append(f"num_train_timesteps {self.num_train_timesteps!r} is not a whole number in "
                            f"2..{MAX_TIMESTEPS}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not (number(self.anatomy_dropout) and 0 <= self.anatomy_dropout <= 1):
            problems.append(f"anatomy_dropout {self.anatomy_dropout!r} is not in 0..1")
        if not all(isinstance(s, tuple) and len(s) == 3 and all(number(v) and v > 0 for v in s)
                   for s in self.train_spacings):
            problems.append(f"train_spacings {self.train_spacings!r} are not (z, y, x) spacings in mm")
        if problems:
            raise ValueError("; ".join(problems))

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
