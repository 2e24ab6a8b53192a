"""Training data: CT files -> cached preprocessed volumes -> an endless, seeded stream of network inputs.

Each case is preprocessed once per training spacing (read, checked, resampled, windowed with its region's
window, anatomy labels) and cached as a compressed `.npz` whose name is a hash of the file contents and
every preprocessing setting, so a changed setting or input file never reuses a stale cache entry.
Those `.npz` entries can also be the training data themselves (a folder of them, or the files): a machine
that trains, e.g. a GPU node, then needs neither the raw scans nor a working SimpleITK (the import must
resolve: an empty `SimpleITK` module on the path will do, see scripts/gpu_session.sh). Each entry is one case.

Item `i` of `CTPatchDataset` is drawn from `numpy.random.default_rng([seed, i])`: the same index always
gives the same patch, whatever the worker, process or order. Distributed training therefore only needs
each rank to ask for different indices (`torch.utils.data.DistributedSampler` or the training loop's
own rank-interleaved indices); no per-rank seed handling is required.
"""
from __future__ import annotations

import hashlib
import json
import logging
import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .anatomy import AnatomySpec, encode_anatomy, get_anatomy
from .conditioning import anatomy_spec, assemble
from .config import ModelConfig
from .errors import InputError, ResourceError
from .io import VOLUME_SUFFIXES, Volume, atomic_path, holds_dicom_files, itk_path, read_mask, read_volume, sha256_file
from .orientation import AxisOrder
from .patches import MODES, sample_patch
from .preprocess import guess_region, resample, window_to_unit
from .validation import check_ct

log = logging.getLogger(__name__)

#: Bump when the preprocessing code changes in a way that makes old cache entries wrong.
CACHE_VERSION = 5  # 2: resampling keeps the field of view; entries in patient axis order. 3, 4: DICOM series with
# uneven slices or gantry tilt are read onto an orthogonal grid of even slices (io._even_slices). 5: anatomy from the
# model's own source (`training_anatomy`; before, threshold labels for every model)
#: Patch modes mixed at random (paper: image level, 2x region level, patch level).
DEFAULT_MODE_WEIGHTS = {"whole": 0.2, "crop2x": 0.3, "crop": 0.5}
#: A training grid may be at most this much finer than the native slice spacing (no invented slices).
MAX_SLICE_UPSAMPLING = 2.0


@dataclass(frozen=True)
class CTCase:
    """One training CT: its path, body region (None: guessed) and an optional anatomy label map."""

    path: str
    region: Optional[str] = None
    mask: Optional[str] = None
    subject: str = ""


def case_name(path: Union[str, Path]) -> str:
    """'STS_002/CT_image.nii.gz': how a run records a training CT (file or DICOM folder), with its folder's name,
    since data sets often name every case's file alike (CT_image.nii.gz, ct_cropped.nii.gz)."""
    path = Path(os.path.abspath(path))  # a bare file name has a folder too: the current one
    return f"{path.parent.name}/{path.name}"


#: Names the shared CT data folder (default: ../shared/data/ct beside the repository).
DATA_ROOT_ENV = "MEDDIFFFM_CT_DATA"


def shared_data_root() -> Path:
    """The shared CT data folder, which the split names 'train' and 'validation' and the benchmarks refer to."""
    return Path(os.environ.get(DATA_ROOT_ENV, Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"))


# ---------------------------------------------------------------------------------------------------
# The fixed train/validation split of the shared CT data (../shared/data/ct, see its MANIFEST.md).
# case id: (path relative to the data folder, body region, subject). Crops of one subject share a subject
# so they always fall on the same side. dcmqi_ct3slice (3 slices) is too thin to train on and left out.
SHARED_CASES: Dict[str, Tuple[str, str, str]] = {
    "pyradiomics_lung1": ("pyradiomics_lung1/lung1_image.nrrd", "chest", "lung1"),
    "ts_example_ct": ("totalsegmentator/example_ct/example_ct.nii.gz", "abdomen", "ts_example"),
    "ts_example_ct_sm": ("totalsegmentator/example_ct_sm/example_ct_sm.nii.gz", "abdomen", "ts_example"),
    "ts_pulmonary_ct_cropped": ("totalsegmentator/pulmonary_ct_cropped/ct_cropped.nii.gz", "chest", "ts_aorta"),
    "ts_aorta_ct_cropped": ("totalsegmentator/aorta_ct_cropped/ct_cropped.nii.gz", "chest", "ts_aorta"),
    "dcm_qa_ct_ge_head": ("dcm_qa_ct_ge_head/dicom", "head_neck", "ge_head"),
    "crlm_ct_1004": ("mirp_crlm/CRLM-CT-1004/image", "abdomen", "crlm_1004"),
}
SHARED_CASES.update({
    f"ibsi_sts_{n:03d}": (f"ibsi_sts/STS_{n:03d}/CT_image.nii.gz", "other", f"STS_{n:03d}")
    for n in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 15, 24, 25, 26, 28)
})
#: Suffix of a preprocessed cache entry, accepted as training data in place of a CT file.
CACHE_SUFFIX = ".npz"
#: Held-out subjects: a chest (lung1), an abdomen (the TotalSegmentator example, both crops), a limb.
VALIDATION_SUBJECTS = ("lung1", "ts_example", "STS_002")


def check_mode_weights(weights: Dict[str, float]) -> Dict[str, float]:
    """The patch-mode mix as given, once it names only known modes with finite, non-negative weights, not all 0."""
    weights = dict(weights)
    unknown = sorted(set(weights) - set(MODES))
    if unknown:
        raise InputError(f"unknown patch mode(s) {', '.join(unknown)}; the modes are {', '.join(MODES)}")
    values = list(weights.values())
    if not all(0 <= value < float("inf") for value in values) or sum(values) <= 0:
        raise InputError(f"patch mode weights must be finite, not negative, and not all 0, got {weights}")
    return weights


def split_cases(data_root: Union[str, Path], split: str) -> List[CTCase]:
    """The `train` or `validation` cases of the shared CT data under `data_root`."""
    if split not in ("train", "validation"):
        raise InputError(f"unknown data split {split!r}; choose 'train' or 'validation'")
    cases = []
    for case_id, (rel, region, subject) in sorted(SHARED_CASES.items()):
        if (subject in VALIDATION_SUBJECTS) == (split == "validation"):
            cases.append(CTCase(str(Path(data_root) / rel), region=region, subject=subject))
    missing = [c.path for c in cases if not Path(c.path).exists()]
    if missing:
        raise InputError(f"{len(missing)} cases of the {split} split are missing under {data_root} "
                         f"(first: {missing[0]}); point --data-root at the shared CT folder")
    return cases


def as_cases(files: Union[str, Path, Sequence[Union[str, Path, CTCase]]],
             masks: Optional[Sequence[Optional[Union[str, Path]]]] = None) -> List[CTCase]:
    """CTCase list from a folder (every volume file directly inside it, or the one DICOM series it holds), a list of
    paths or CTCases."""
    if isinstance(files, (str, Path)):
        folder = Path(files)
        if not folder.is_dir():
            raise InputError(f"training data {folder} is not a folder; give a folder or a list of CT files")
        suffixes = VOLUME_SUFFIXES + (CACHE_SUFFIX,)
        files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(suffixes))
        if not files and holds_dicom_files(folder):
            files = [folder]  # the folder of one DICOM series: one case, as every task reads it
        if not files:
            raise InputError(f"no CT volumes, cache entries ({', '.join(suffixes)}) or DICOM series found in "
                             f"{folder}")
    if masks is not None and len(masks) != len(files):
        raise InputError(f"{len(masks)} anatomy masks for {len(files)} CT files; give one (or None) per file")
    cases = []
    for i, item in enumerate(files):
        case = item if isinstance(item, CTCase) else CTCase(str(item))
        if masks is not None and masks[i] is not None:
            case = CTCase(case.path, case.region, str(masks[i]), case.subject)
        for path in (case.path, case.mask):
            if path is not None and not Path(path).exists():
                raise InputError(f"training input not found: {path}")
        cases.append(case)
    return cases


def with_region(cases: List[CTCase], region: Optional[str]) -> List[CTCase]:
    """`cases` with the body region `region` (None: each keeps its own, or has it guessed from its image). A cache
    entry holds the region it was prepared with, so it cannot take another."""
    if region is None:
        return cases
    entries = [case.path for case in cases if case.path.lower().endswith(CACHE_SUFFIX)]
    if entries:
        raise InputError(f"{entries[0]} is a cache entry, which holds its body region already: give its CT file to "
                         "set the region, or train on cache entries without --region")
    return [dataclasses.replace(case, region=region) for case in cases]


def training_anatomy(vol: Volume, spec: AnatomySpec, name: str) -> np.ndarray:
    """Anatomy labels of training CT `name` (`vol`: on its training grid) from the source the model is conditioned on,
    which the tasks compute again at inference; never another source in its place."""
    if spec.source == "user":
        raise InputError(f"{name}: the model is conditioned on anatomy label maps from the user, and this CT has none; "
                         "give every training CT its label map (the train command's --anatomy-labels and "
                         "--val-anatomy-labels; from Python: CTPatchDataset(..., masks=[...]))")
    try:
        return get_anatomy(vol, source=spec.source)[0]
    except ResourceError as exc:
        raise ResourceError(f"{name}: the model is conditioned on {spec.source} anatomy. {exc}") from None


def case_spacings(native_zyx: Sequence[float], train_spacings: Sequence[Sequence[float]]) -> List[Tuple[float, ...]]:
    """The training grids (z, y, x mm) used for one case: each configured spacing, with the slice spacing
    raised to at least native / MAX_SLICE_UPSAMPLING so no grid invents more than one slice in between."""
    floor_z = float(native_zyx[0]) / MAX_SLICE_UPSAMPLING
    grids = []
    for z, y, x in train_spacings:
        grid = (max(float(z), floor_z), float(y), float(x))
        if grid not in grids:
            grids.append(grid)
    return grids


class CTPatchDataset(torch.utils.data.Dataset):
    """Endless, seeded multi-level patches from a set of CTs: dict(image, cond, region, mode).

    `image` is (1, P, P, P) in [-1, 1], `cond` the condition channels of `conditioning.assemble`,
    `region` the body-region class index. Body regions are sampled evenly (then a case, then one of its
    cached spacings), so a few large-region sets do not drown the others.
    `length` only sets what `len()` reports (an epoch for samplers); any index is valid.
    """

    def __init__(self, files, cfg: ModelConfig, cache_dir: Union[str, Path], masks=None, seed: int = 0,
                 mode_weights: Optional[Dict[str, float]] = None, anatomy_dropout: Optional[float] = None,
                 length: int = 1_000_000, memory_budget_mb: float = 2048.0):
        self.cfg = cfg
        self.cases = as_cases(files, masks)
        if not self.cases:
            raise InputError("no training cases given")
        self.seed = int(seed)
        self.length = int(length)
        self.anatomy_dropout = cfg.anatomy_dropout if anatomy_dropout is None else float(anatomy_dropout)
        weights = check_mode_weights(DEFAULT_MODE_WEIGHTS if mode_weights is None else mode_weights)
        self.mode_weights = np.array([weights.get(m, 0.0) for m in MODES]) / sum(weights.values())
        self.spec = anatomy_spec(cfg)
        labelled = [c.path for c in self.cases if c.mask]
        if labelled and self.spec.source != "user":  # inference would compute other labels than these
            raise InputError(f"{labelled[0]}: an anatomy label map was given, but the model is conditioned on "
                             f"{self.spec.source} anatomy, which training computes from each CT as the tasks do; "
                             "label maps are for a model whose anatomy source is 'user'")
        self.cache_dir = Path(cache_dir)
        self.entries: List[List[Path]] = []  # per case: one cache file per training spacing
        self.regions: List[str] = []
        for case in self.cases:
            region, entries = self._prepare(case)
            self.regions.append(region)
            self.entries.append(entries)
        self._by_region = {r: [i for i, other in enumerate(self.regions) if other == r]
                           for r in sorted(set(self.regions))}
        self._memory: "OrderedDict[Path, dict]" = OrderedDict()
        self._memory_budget = memory_budget_mb * 2 ** 20

    def __len__(self) -> int:
        return self.length

    def summary(self) -> dict:
        """What the model was trained on (recorded in the checkpoint)."""
        return {"cases": [case_name(c.path) if not c.subject else f"{c.subject}:{case_name(c.path)}"
                          for c in self.cases],
                "regions": {r: len(ix) for r, ix in self._by_region.items()},
                # Exact: a resumed run draws its patches with these (a rounded mix would draw other ones).
                "mode_weights": dict(zip(MODES, self.mode_weights.tolist())),
                "anatomy_dropout": self.anatomy_dropout,
                "train_spacings": [list(s) for s in self.cfg.train_spacings]}

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        region = list(self._by_region)[rng.integers(len(self._by_region))]
        members = self._by_region[region]
        case = members[rng.integers(len(members))]
        entry = self._load(self.entries[case][rng.integers(len(self.entries[case]))])
        mode = MODES[rng.choice(len(MODES), p=self.mode_weights)]
        patch = sample_patch(entry["image"], entry["labels"], entry["spacing_zyx"], mode, self.cfg.patch_size, rng)
        if rng.random() < self.anatomy_dropout:
            anatomy = torch.zeros((self.spec.num_channels,) + tuple(patch["anatomy_labels"].shape))
        else:
            anatomy = torch.from_numpy(encode_anatomy(patch["anatomy_labels"].numpy(), self.spec))
        cond = assemble(self.cfg, anatomy, patch["coords"], patch["spacing_zyx"])
        return {"image": patch["image"], "cond": cond,
                "region": torch.tensor(self.cfg.region_index(region)), "mode": mode}

    # -- preprocessing cache --------------------------------------------------------------------------
    def _prepare(self, case: CTCase) -> Tuple[str, List[Path]]:
        """Region of the case and its cache files, preprocessing whatever is not cached yet."""
        if case.path.lower().endswith(CACHE_SUFFIX):
            return self._check_entry(Path(case.path)), [Path(case.path)]
        digest = _content_hash(Path(case.path))
        mask_digest = _content_hash(Path(case.mask)) if case.mask else None
        # A DICOM series has to be read to know its slice spacing; a file header is enough otherwise.
        geometry = None if Path(case.path).is_dir() else _header_geometry(Path(case.path))
        vol = self._read(case) if geometry is None else None  # also where a header is not 3D: say what is wrong
        spacing, direction = geometry or (vol.spacing, vol.direction)
        # Entries are in patient axis order, as the tasks see a CT (see `orientation`).
        order = AxisOrder.of(direction)
        native = tuple(reversed(order.spacing(spacing)))
        region = case.region
        if region is None:
            vol = vol if vol is not None else self._read(case)
            region, reason = guess_region(vol)
            log.info("%s: body region %s (%s)", case.path, region, reason)
        if region not in self.cfg.regions:
            raise InputError(f"{case.path}: unknown body region {region!r}; "
                             f"choose one of {', '.join(self.cfg.regions)}")
        entries = []
        for grid in case_spacings(native, self.cfg.train_spacings):
            params = {"version": CACHE_VERSION, "image": digest, "mask": mask_digest, "region": region,
                      "window": list(self.cfg.windows[region]), "spacing_zyx": list(grid),
                      "anatomy": self.spec.to_dict()}
            if not order.identity:
                params["patient_axes"] = [list(order.source), list(order.flip)]
            key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]
            path = self.cache_dir / f"{Path(case.path).name.split('.')[0]}-{key}.npz"
            intact = path.exists() and _entry_intact(path)
            if path.exists() and not intact:
                log.warning("cache entry %s is damaged; preprocessing %s again", path, case.path)
            if not intact:
                vol = vol if vol is not None else self._read(case)
                self._write_entry(path, case, vol, region, grid, params)
            entries.append(path)
        return region, entries

    def _check_entry(self, path: Path) -> str:
        """Body region of a cache entry given as training data, after checking it fits this model."""
        try:
            with np.load(path) as data:
                params = json.loads(str(data["params"]))
        except Exception as err:  # zip, key and JSON errors alike: the file is not one of our entries
            raise InputError(f"{path} is not a MedDiffFM preprocessed-cache entry ({err})") from None
        if not _entry_intact(path):
            raise InputError(f"{path}: the cache entry is damaged (truncated or corrupt); preprocess its CT again")
        region = params.get("region")
        # Version 5 changed only the labels of models not conditioned on threshold anatomy (`training_anatomy`).
        current = params.get("version") == CACHE_VERSION or (params.get("version") == 4
                                                             and self.spec.source == "threshold")
        if not current or region not in self.cfg.regions:
            raise InputError(f"{path}: cache entry of another preprocessing version or region "
                             f"({params.get('version')}, {region!r}); preprocess the CT again")
        anatomy = json.loads(json.dumps(self.spec.to_dict()))  # as it reads back from the entry's JSON
        if params.get("window") != list(self.cfg.windows[region]) or params.get("anatomy") != anatomy:
            raise InputError(f"{path}: cache entry made for another model configuration (HU window or anatomy "
                             "classes differ); preprocess the CT again for this model")
        # One of this model's grids, its slice spacing perhaps raised for thick slices (`case_spacings`).
        grid = params.get("spacing_zyx")
        if not any(isinstance(grid, list) and len(grid) == 3 and grid[1:] == list(s[1:]) and grid[0] >= s[0]
                   for s in self.cfg.train_spacings):
            raise InputError(f"{path}: cache entry on a grid of {grid} mm (z, y, x), none of this model's training "
                             f"grids {[list(s) for s in self.cfg.train_spacings]}; preprocess the CT again for this "
                             "model")
        return region

    def _read(self, case: CTCase) -> Volume:
        try:
            vol = read_volume(case.path)
            check_ct(vol)
        except InputError as exc:  # among many training files, say which one
            raise InputError(f"{case.path}: {exc}") from None
        return vol

    def _write_entry(self, path: Path, case: CTCase, vol: Volume, region: str, grid_zyx, params: dict) -> None:
        order = AxisOrder.of(vol.direction)
        resampled = resample(order.volume(vol), tuple(reversed(grid_zyx)))
        if case.mask:
            mask = order.volume(read_mask(case.mask, like=vol))
            labels = resample(mask, tuple(reversed(grid_zyx)), is_mask=True).array
            encode_anatomy(labels, self.spec)  # refuses labels outside the model's classes
        else:
            labels = training_anatomy(resampled, self.spec, case.path)
        # float16 keeps [-1, 1] to ~5e-4 (under 1 HU for every window) at half the disk and memory.
        image = window_to_unit(resampled.array, self.cfg.windows[region]).astype(np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, image=image, labels=labels.astype(np.uint8),
                                spacing_zyx=np.asarray(grid_zyx, dtype=np.float64),
                                params=np.asarray(json.dumps(params)))
        log.info("cached %s at %s mm (z,y,x) -> %s", case.path, grid_zyx, path.name)

    def _load(self, path: Path) -> dict:
        if path in self._memory:
            self._memory.move_to_end(path)
            return self._memory[path]
        with np.load(path) as data:
            entry = {"image": data["image"], "labels": data["labels"],
                     "spacing_zyx": tuple(float(s) for s in data["spacing_zyx"])}
        self._memory[path] = entry
        while len(self._memory) > 1 and _bytes(self._memory) > self._memory_budget:
            self._memory.popitem(last=False)
        return entry


def _entry_intact(path: Path) -> bool:
    """Whether a cache entry reads whole: every array present and every member's checksum right. Checked before
    training, so a damaged file is rebuilt instead of failing the first step that draws from it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            return archive.testzip() is None and ENTRY_ARRAYS <= names
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _bytes(memory: "OrderedDict[Path, dict]") -> int:
    return sum(e["image"].nbytes + e["labels"].nbytes for e in memory.values())


#: The arrays of a cache entry (`np.savez` members).
ENTRY_ARRAYS = {"image.npy", "labels.npy", "spacing_zyx.npy", "params.npy"}


def _content_hash(path: Path) -> str:
    """sha256 of a file, or of a DICOM folder's files (names and contents, sorted)."""
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _header_geometry(path: Path) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """Voxel spacing (x, y, z) and direction of a 3D image file from its header, without reading the pixels;
    None for an image that is not 3D or whose header cannot be read (reading it whole then says what is wrong)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(itk_path(path))
        reader.ReadImageInformation()
    except (RuntimeError, InputError):
        return None
    if reader.GetDimension() != 3:
        return None
    return reader.GetSpacing(), reader.GetDirection()
