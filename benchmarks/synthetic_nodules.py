"""Anomaly detection on synthetic lung nodules: enough lesion cases to rank cases, on a CT no model trained on.

`anomaly_quality.py` has two real lesions, so its case-level AUROC rests on a handful of pairs, and both lesions
chose `detect-anomalies`' noising step. Here the lung of the validation CT pyradiomics lung1 is cut into boxes of
the size of the real nodule's bounding box grown by `--margin-mm` (a grid with the box's size as step; no real
nodule voxel; at least `--min-lung` of the box lung: below -500 HU inside the body). Each box is scored as a
healthy case, and again `--nodules` times with one synthetic nodule inserted, so a lesion case and its healthy
twin differ only by the nodule (the same noise seed is used for both).

A nodule is a sphere of a diameter drawn from `--diameters`, centred where the whole sphere lies in lung. Each
voxel is raised by the share of its volume inside the sphere (thick slices average the sphere's cap, as a CT
slice does) times the gap from the box's median lung HU to `--nodule-hu`, so the lung's own texture and noise
stay on it. Its lesion mask holds the voxels at least half inside.

    python benchmarks/synthetic_nodules.py                  # the local-contrast reference only
    python benchmarks/synthetic_nodules.py --model default  # + MedDiffFM at detect-anomalies' step (--t to change)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from anomaly_quality import lesion_crop, local_contrast, meddifffm_detector, report  # noqa: E402

from MedDiffFMLib.anatomy import body_mask  # noqa: E402
from MedDiffFMLib.dataset import SHARED_CASES, VALIDATION_SUBJECTS, shared_data_root  # noqa: E402
from MedDiffFMLib.io import Volume, read_mask, read_volume  # noqa: E402

CASE = "pyradiomics_lung1"
MASK = "pyradiomics_lung1/lung1_label.nrrd"
#: Inside the body, lung (and airways) lie below this HU.
LUNG_BELOW_HU = -500.0
#: Sub-samples per voxel edge when measuring how much of a voxel a sphere fills.
SUPERSAMPLE = 5


def lung_mask(image: Volume) -> np.ndarray:
    """The voxels below LUNG_BELOW_HU inside the body (the air around the body is not lung)."""
    return body_mask(image) & (image.array < LUNG_BELOW_HU)


def lung_boxes(lung: np.ndarray, lesion: np.ndarray, shape, min_lung: float):
    """Boxes of `shape` (zyx slices) on a grid with the box's size as step, holding no lesion voxel and at least
    `min_lung` of lung."""
    boxes = []
    for corner in np.ndindex(*(size // n for size, n in zip(lung.shape, shape))):
        box = tuple(slice(i * n, (i + 1) * n) for i, n in zip(corner, shape))
        if not lesion[box].any() and lung[box].mean() >= min_lung:
            boxes.append(box)
    return boxes


def sphere_fraction(shape, spacing_zyx, centre_zyx_mm, radius_mm: float) -> np.ndarray:
    """The share of each voxel's volume (voxel centres at index * spacing) inside the sphere."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    axes = [(np.arange(n)[:, None] + offsets[None, :]) * s - c  # (voxels, sub-samples) in mm from the centre
            for n, s, c in zip(shape, spacing_zyx, centre_zyx_mm)]
    z2, y2, x2 = (a ** 2 for a in axes)
    inside = (z2[:, None, None, :, None, None] + y2[None, :, None, None, :, None]
              + x2[None, None, :, None, None, :]) <= radius_mm ** 2
    return inside.mean(axis=(3, 4, 5))


def insert_nodule(box: Volume, lung: np.ndarray, rng: np.random.Generator, diameter_mm: float, nodule_hu: float):
    """`box` with one nodule where a sphere of `diameter_mm` fits in its `lung` (None if nowhere), and its mask."""
    radius = diameter_mm / 2
    # Room in mm to the nearest voxel that is not lung (or the box's edge, which counts as not lung).
    room = ndimage.distance_transform_edt(np.pad(lung, 1), sampling=box.spacing_zyx)[1:-1, 1:-1, 1:-1]
    centres = np.argwhere(room > radius)
    if not len(centres):
        return None
    centre = centres[rng.integers(len(centres))] * np.asarray(box.spacing_zyx)
    share = sphere_fraction(box.shape, box.spacing_zyx, centre, radius)
    lung_hu = float(np.median(box.array[lung]))
    nodule = box.array.astype(np.float32) + share.astype(np.float32) * (nodule_hu - lung_hu)
    return box.with_array(nodule), share >= 0.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synthetic_nodules")
    parser.add_argument("--margin-mm", type=float, default=15.0, help="box size: the nodule's box grown by this")
    parser.add_argument("--min-lung", type=float, default=0.5, help="least share of lung in a box")
    parser.add_argument("--nodules", type=int, default=2, help="nodule cases per healthy box")
    parser.add_argument("--diameters", type=float, nargs=2, default=(6.0, 15.0), metavar=("MIN", "MAX"),
                        help="nodule diameters (mm), drawn uniformly")
    parser.add_argument("--nodule-hu", type=float, default=-20.0, help="a solid nodule's HU")
    parser.add_argument("--model", help="also score MedDiffFM (a model name or file)")
    parser.add_argument("--t", type=int, help="MedDiffFM's noising step (default: detect-anomalies')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="nodule placement and MedDiffFM's noise")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    image_path, region, subject = SHARED_CASES[CASE]
    assert subject in VALIDATION_SUBJECTS, f"{CASE} is not a validation case"
    image = read_volume(args.data_root / image_path)
    lesion = read_mask(args.data_root / MASK, like=image).array > 0
    lung = lung_mask(image)
    shape = lesion_crop(image, image.with_array(lesion.astype(np.uint8)), args.margin_mm)[0].shape
    rng = np.random.default_rng(args.seed)
    cases = []  # (name, image, lesion mask or None)
    for index, box in enumerate(lung_boxes(lung, lesion, shape, args.min_lung)):
        healthy = image.crop(box)
        cases.append((f"box{index}", healthy, None))
        for nodule in range(args.nodules):
            diameter = float(rng.uniform(*args.diameters))
            placed = insert_nodule(healthy, lung[box], rng, diameter, args.nodule_hu)
            if placed is not None:
                cases.append((f"box{index}_nodule{nodule}_{diameter:.0f}mm", *placed))
    if not any(mask is not None for _, _, mask in cases):
        raise SystemExit("no box has room for a nodule: lower --min-lung or --diameters")

    detectors = {"local contrast": local_contrast}
    if args.model:
        meddifffm = meddifffm_detector(args.model, args.device, args.t, args.seed)
        detectors["MedDiffFM"] = lambda box: meddifffm(box, region)
    for detector, score in detectors.items():
        report(detector, [score(box) for _, box, _ in cases], cases, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
