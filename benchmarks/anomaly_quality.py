"""Anomaly detection on held-out real lesions: MedDiffFM vs a local-contrast reference detector.

Cases (validation subjects of `MedDiffFMLib.dataset`, never trained on): the lung nodule of
pyradiomics lung1 and the soft-tissue sarcoma (GTV) of IBSI STS_002, each cropped to the lesion's
bounding box plus `--margin-mm` on every side, so the crop also holds healthy axial slices for the
image-level AUROC. Healthy cases: `--healthy-crops` boxes of the lesion crop's size from the same CT that
hold no lesion voxel and whose tissue mix (air / lung / soft tissue and bone) is nearest the lesion
crop's (none fit beside the sarcoma), and the whole abdomen CT of the TotalSegmentator example (no lesion
annotated). Metrics from `MedDiffFMLib.evaluate.evaluate_anomaly`: pixel AUROC, slice-level AUROC, best
Dice, PRO to FPR 0.3, and the AUROC of lesion cases against healthy ones by their highest score.

The reference detector scores how much each voxel differs from the median of its ~15 mm in-plane
neighbourhood: a classical baseline any learned detector should beat.

    python benchmarks/anomaly_quality.py                    # reference detector only
    python benchmarks/anomaly_quality.py --model default    # + MedDiffFM (tasks.anomaly)
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

from MedDiffFMLib import evaluate as harness  # noqa: E402
from MedDiffFMLib.dataset import SHARED_CASES, VALIDATION_SUBJECTS, shared_data_root  # noqa: E402
from MedDiffFMLib.io import Volume, read_mask, read_volume  # noqa: E402

#: case id -> lesion mask path relative to the data folder.
LESION_CASES = {
    "pyradiomics_lung1": "pyradiomics_lung1/lung1_label.nrrd",
    "ibsi_sts_002": "ibsi_sts/STS_002/CT_mask.nii.gz",
}
#: Validation CTs with no lesion annotated, scored whole as healthy cases.
HEALTHY_CASES = ("ts_example_ct_sm",)
#: HU bands whose shares describe a crop's tissue mix: air, lung, soft tissue and bone.
TISSUE_BANDS_HU = (-900.0, -500.0)


def lesion_crop(image: Volume, mask: Volume, margin_mm: float):
    """Image and mask cut to the lesion's bounding box grown by `margin_mm` (clamped to the image)."""
    nonzero = np.nonzero(mask.array)
    bounds = []
    for axis, spacing in enumerate(image.spacing_zyx):
        grow = int(np.ceil(margin_mm / spacing))
        bounds.append(slice(max(nonzero[axis].min() - grow, 0), nonzero[axis].max() + 1 + grow))
    return image.crop(bounds), mask.crop(bounds)


def tissue_mix(array: np.ndarray) -> np.ndarray:
    """Shares of the voxels in the TISSUE_BANDS_HU bands."""
    return np.bincount(np.digitize(array.ravel(), TISSUE_BANDS_HU), minlength=len(TISSUE_BANDS_HU) + 1) / array.size


def healthy_crops(image: Volume, mask: Volume, shape, count: int):
    """Up to `count` boxes of `shape` (zyx) from `image`, on a grid with the box's size as step, that hold no lesion
    voxel, nearest first to the tissue mix of the lesion's own box (centred on the lesion), as (index, crop)."""
    nonzero = np.nonzero(mask.array)
    centre = [int(round((a.min() + a.max()) / 2)) for a in nonzero]
    starts = [min(max(c - n // 2, 0), size - n) for c, n, size in zip(centre, shape, image.shape)]
    reference = tissue_mix(image.array[tuple(slice(s, s + n) for s, n in zip(starts, shape))])
    candidates = []
    for corner in np.ndindex(*(size // n for size, n in zip(image.shape, shape))):
        box = tuple(slice(i * n, (i + 1) * n) for i, n in zip(corner, shape))
        if not mask.array[box].any():
            candidates.append((float(np.abs(tissue_mix(image.array[box]) - reference).sum()), box))
    candidates.sort(key=lambda item: item[0])
    return [(index, image.crop(box)) for index, (_, box) in enumerate(candidates[:count])]


def local_contrast(image: Volume, size_mm: float = 15.0, smoothing_mm: float = 1.0) -> np.ndarray:
    """|lightly smoothed HU - in-plane median over ~size_mm|, per axial slice."""
    dy, dx = image.spacing_zyx[1:]
    smooth = ndimage.gaussian_filter(image.array.astype(np.float32), (0, smoothing_mm / dy, smoothing_mm / dx))
    size = (1, max(3, int(round(size_mm / dy)) | 1), max(3, int(round(size_mm / dx)) | 1))
    return np.abs(smooth - ndimage.median_filter(smooth, size=size))


def meddifffm_detector(model: str, device: str, t, seed: int):
    """`detect-anomalies`' map as f(crop, body region), searching the whole crop (a body mask is ill-defined in a
    crop through the lung) with the region given (crops are too small to guess it from); `t` None: its default."""
    import torch

    from MedDiffFMLib.tasks import common
    from MedDiffFMLib.tasks.anomaly import DEFAULT_T, detect_anomalies

    torch.set_num_threads(1)
    device = common.choose_device(device)
    network = common.load_task_model(model, device)
    return lambda image, region: detect_anomalies(
        image, network, mask=image.with_array(np.ones(image.shape, np.uint8)), region=region,
        t=DEFAULT_T if t is None else t, seed=seed, device=device).anomaly_map.array


def report(detector: str, maps, cases, out: Path) -> None:
    """Score one detector's `maps` of `cases` ((name, image, lesion mask or None)); write and print its tables."""
    scored = [harness.AnomalyCase(name, scores, mask, image.array) for (name, image, mask), scores in zip(cases, maps)]
    rows = harness.evaluate_anomaly(scored)
    harness.write_anomaly_report(rows, scored, out / detector.replace(" ", "_"))
    print(f"## {detector}\n\n{harness.markdown_table(rows, harness.ANOMALY_COLUMNS)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anomaly_quality")
    parser.add_argument("--margin-mm", type=float, default=30.0)
    parser.add_argument("--model", help="also score MedDiffFM (a model name or file)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--healthy-crops", type=int, default=3, help="healthy boxes per lesion CT (0: none)")
    parser.add_argument("--t", type=int, help="MedDiffFM's noising step (default: detect-anomalies')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    crops = []  # (name, case id, image, lesion mask or None for a healthy case)
    for case_id, mask_path in LESION_CASES.items():
        image_path, _region, subject = SHARED_CASES[case_id]
        assert subject in VALIDATION_SUBJECTS, f"{case_id} is not a validation case"
        image = read_volume(args.data_root / image_path)
        mask = read_mask(args.data_root / mask_path, like=image)
        crop, crop_mask = lesion_crop(image, mask, args.margin_mm)
        crops.append((case_id, case_id, crop, crop_mask.array > 0))
        crops += [(f"{case_id}_healthy{index}", case_id, healthy, None)
                  for index, healthy in healthy_crops(image, mask, crop.shape, args.healthy_crops)]
    for case_id in HEALTHY_CASES:
        assert SHARED_CASES[case_id][2] in VALIDATION_SUBJECTS, f"{case_id} is not a validation case"
        crops.append((case_id, case_id, read_volume(args.data_root / SHARED_CASES[case_id][0]), None))

    detectors = {"local contrast": lambda image, case_id: local_contrast(image)}
    if args.model:
        meddifffm = meddifffm_detector(args.model, args.device, args.t, args.seed)
        detectors["MedDiffFM"] = lambda image, case_id: meddifffm(image, SHARED_CASES[case_id][1])
    for detector, score in detectors.items():
        report(detector, [score(image, case_id) for _, case_id, image, _ in crops],
               [(name, image, mask) for name, _, image, mask in crops], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
