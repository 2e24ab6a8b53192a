"""Anomaly detection on held-out real lesions: MedDiffFM vs a local-contrast reference detector.

Cases (validation subjects of `MedDiffFMLib.dataset`, never trained on): the lung nodule of
pyradiomics lung1 and the soft-tissue sarcoma (GTV) of IBSI STS_002, each cropped to the lesion's
bounding box plus `--margin-mm` on every side, so the crop also holds healthy axial slices for the
image-level AUROC. Metrics from `MedDiffFMLib.evaluate.evaluate_anomaly`: pixel AUROC, slice-level
AUROC, best Dice, PRO to FPR 0.3.

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


def lesion_crop(image: Volume, mask: Volume, margin_mm: float):
    """Image and mask cut to the lesion's bounding box grown by `margin_mm` (clamped to the image)."""
    nonzero = np.nonzero(mask.array)
    bounds = []
    for axis, spacing in enumerate(image.spacing_zyx):
        grow = int(np.ceil(margin_mm / spacing))
        bounds.append(slice(max(nonzero[axis].min() - grow, 0), nonzero[axis].max() + 1 + grow))
    return image.crop(bounds), mask.crop(bounds)


def local_contrast(image: Volume, size_mm: float = 15.0, smoothing_mm: float = 1.0) -> np.ndarray:
    """|lightly smoothed HU - in-plane median over ~size_mm|, per axial slice."""
    dy, dx = image.spacing_zyx[1:]
    smooth = ndimage.gaussian_filter(image.array.astype(np.float32), (0, smoothing_mm / dy, smoothing_mm / dx))
    size = (1, max(3, int(round(size_mm / dy)) | 1), max(3, int(round(size_mm / dx)) | 1))
    return np.abs(smooth - ndimage.median_filter(smooth, size=size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anomaly_quality")
    parser.add_argument("--margin-mm", type=float, default=30.0)
    parser.add_argument("--model", help="also score MedDiffFM (a model name or file)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    crops = []
    for case_id, mask_path in LESION_CASES.items():
        image_path, _region, subject = SHARED_CASES[case_id]
        assert subject in VALIDATION_SUBJECTS, f"{case_id} is not a validation case"
        image = read_volume(args.data_root / image_path)
        mask = read_mask(args.data_root / mask_path, like=image)
        crops.append((case_id, *lesion_crop(image, mask, args.margin_mm)))

    detectors = {"local contrast": lambda image, case_id: local_contrast(image)}
    if args.model:
        import torch

        from MedDiffFMLib.tasks import common
        from MedDiffFMLib.tasks.anomaly import detect_anomalies

        torch.set_num_threads(1)
        device = common.choose_device(args.device)
        network = common.load_task_model(args.model, device)
        # The crop is the region searched (a body mask is ill-defined in a crop through the lung), and the
        # body region is known for these cases (crops are too small to guess it from).
        detectors["MedDiffFM"] = lambda image, case_id: detect_anomalies(
            image, network, mask=image.with_array(np.ones(image.shape, np.uint8)),
            region=SHARED_CASES[case_id][1], seed=args.seed, device=device).anomaly_map.array

    for detector, score in detectors.items():
        cases = [harness.AnomalyCase(case_id, score(image, case_id), mask.array > 0, image.array)
                 for case_id, image, mask in crops]
        rows = harness.evaluate_anomaly(cases)
        harness.write_anomaly_report(rows, cases, args.out / detector.replace(" ", "_"))
        print(f"## {detector}\n\n{harness.markdown_table(rows, harness.ANOMALY_COLUMNS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
