"""Slice super-resolution on held-out real CT: MedDiffFM models vs linear interpolation between slices.

Each case is a crop of a validation subject of `MedDiffFMLib.dataset` (never trained on). Its slices are averaged in
groups of `--factor` (what a thick-slice reconstruction of the same scan measures), each model turns those thick
slices back into thin ones (`tasks.super_resolution.super_resolve`, its defaults: NFE, overlap, final projection),
and the result is compared with the original slices. The baseline is the thick slices linearly interpolated onto
the thin grid (what a viewer shows, and the ControlNet's own condition). Metrics: PSNR / SSIM in the [-160, 240] HU
window (soft tissue) and over [-1000, 1000] HU (lung and bone too), and seconds per case.

    python benchmarks/super_resolution_quality.py --model tiny-super-resolution --model RUN/ema.safetensors
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedDiffFMLib.dataset import shared_data_root  # noqa: E402
from MedDiffFMLib.io import Volume, read_volume  # noqa: E402
from MedDiffFMLib.metrics import hu_window_metrics  # noqa: E402
from MedDiffFMLib.tasks.common import load_task_model  # noqa: E402
from MedDiffFMLib.tasks.super_resolution import (average_slices, interpolate_slices, super_resolve,  # noqa: E402
                                                 thin_geometry)

#: case -> (file relative to the data folder, crop box (z, y, x) of the thin volume, body region).
CASES = {
    "example_ct (abdomen, 3 mm)": ("totalsegmentator/example_ct/example_ct.nii.gz",
                                   (slice(40, 80), slice(20, 84), slice(29, 93)), "abdomen"),
    "STS_002 (limb, 3.27 mm)": ("ibsi_sts/STS_002/CT_image.nii.gz",
                                (slice(4, 44), slice(40, 104), slice(48, 112)), "other"),
}
WINDOWS = {"[-160, 240]": (-160.0, 240.0), "[-1000, 1000]": (-1000.0, 1000.0)}


def thick_from_thin(thin: Volume, factor: int) -> Volume:
    """The thin volume's slices averaged in groups of `factor`, on the grid whose thin grid is `thin`'s."""
    array = average_slices(torch.from_numpy(thin.array.astype(np.float32)), factor).numpy()
    sx, sy, sz = thin.spacing
    axis = np.asarray(thin.direction, dtype=float).reshape(3, 3)[:, 2]
    origin = tuple(float(o) for o in np.asarray(thin.origin) + (factor - 1) / 2.0 * sz * axis)
    thick = Volume(array, (sx, sy, sz * factor), origin, thin.direction)
    assert np.allclose(thin_geometry(thick, factor)[1], thin.origin, atol=1e-4)  # the thin grid comes back
    return thick


def scores(result: np.ndarray, truth: np.ndarray) -> list:
    return [hu_window_metrics(result, truth, window) for window in WINDOWS.values()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--model", action="append", default=[], help="super-resolution model (repeat to compare)")
    parser.add_argument("--factor", type=int, default=5)
    parser.add_argument("--nfe", type=int, help="network evaluations (unset: the task's default)")
    parser.add_argument("--lambda", dest="lam", type=float, help="DiffPIR prior weight (unset: the task's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    models = {name: load_task_model(name, torch.device("cpu")) for name in args.model}

    header = " | ".join(f"PSNR / SSIM {w}" for w in WINDOWS)
    print(f"| case | method | {header} | time (s) |\n|---|---|" + "---|" * (len(WINDOWS) + 1))
    for case in args.cases or CASES:
        path, box, region = CASES[case]
        thin = read_volume(args.data_root / path).crop(box)
        whole = thin.shape[0] // args.factor * args.factor  # whole groups only: the thin grid then comes back
        thin = thin.crop((slice(0, whole), slice(None), slice(None)))
        thick = thick_from_thin(thin, args.factor)
        n_thin = thin.shape[0]
        started = time.time()
        linear = interpolate_slices(torch.from_numpy(thick.array), args.factor, n_thin).numpy()
        rows = [("linear interpolation", scores(linear, thin.array), time.time() - started)]
        for name, model in models.items():
            options = {key: value for key, value in (("nfe", args.nfe), ("lam", args.lam)) if value is not None}
            started = time.time()
            result = super_resolve(thick, model, factor=args.factor, region=region, seed=args.seed, **options)
            assert result.shape == thin.shape and np.allclose(result.origin, thin.origin, atol=1e-3)
            rows.append((f"MedDiffFM `{name}`", scores(result.array, thin.array), time.time() - started))
        for method, metrics, seconds in rows:
            cells = " | ".join(f"{m['psnr']:.2f} / {m['ssim']:.3f}" for m in metrics)
            print(f"| {case} | {method} | {cells} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
