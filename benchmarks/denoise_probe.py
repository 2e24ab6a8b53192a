"""Where a denoising model's error comes from, on the blocks of the validation table at one dose.

For each case (the validation CTs of `denoise_quality.py`: 8 scored slices, 256 x 256 in-plane, 12 context slices),
the block is given simulated low-dose noise (`lowdose`, I0 = --photons, seed 0) and denoised with the oracle noise
std, as the table does. Per model it prints, in the [-160, 240] HU window:
- PSNR, the mean error (bias) and the rms error where the clean block lies inside the window, and the PSNR the
  result would have without its bias;
- with --white: PSNR on the same block with white Gaussian noise of the same std (does the model handle the
  texture of CT noise, or noise as such?);
- with --mirror: PSNR of the mean of the result and the un-mirrored result of the left-right mirrored input (a
  self-ensemble).

    python benchmarks/denoise_probe.py --model denoise --cases lung1_image --white --mirror
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedDiffFMLib import evaluate as harness  # noqa: E402
from MedDiffFMLib.dataset import shared_data_root  # noqa: E402
from MedDiffFMLib.lowdose import simulate_low_dose  # noqa: E402
from MedDiffFMLib.metrics import DENOISING_WINDOW_HU, hu_window_metrics  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from denoise_quality import validation_paths  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model name or file (repeat to compare)")
    parser.add_argument("--cases", nargs="*", help="case names, e.g. lung1_image (default: all validation cases)")
    parser.add_argument("--photons", type=float, default=1e5, help="incident photons of the simulated dose")
    parser.add_argument("--white", action="store_true", help="also with white noise of the same std")
    parser.add_argument("--mirror", action="store_true", help="also the left-right mirror self-ensemble")
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    window = DENOISING_WINDOW_HU
    for name, clean, scored in harness.load_cases([Path(p) for p in validation_paths(args.data_root)], 8, 256, 12):
        if args.cases and name not in args.cases:
            continue
        noisy = simulate_low_dose(clean, photons=args.photons, seed=0)
        sigma = harness.noise_std_in_window(noisy.array[scored], clean.array[scored], window)
        reference = clean.array[scored]
        inside = (reference > window[0]) & (reference < window[1])
        for model in args.model:
            denoise = harness.meddifffm_method(model, device="cpu")
            result = denoise(noisy, sigma).array
            error = result[scored] - reference
            bias = float(error[inside].mean())
            row = {"PSNR": _psnr(result[scored], reference), "bias HU": bias,
                   "rms HU": float(np.sqrt((error[inside] ** 2).mean())),
                   "PSNR without bias": _psnr(result[scored] - bias, reference)}
            if args.white:
                noise = np.random.default_rng(0).normal(0.0, sigma, clean.shape)
                white = clean.with_array((clean.array + noise).astype(np.float32))
                row["PSNR with white noise"] = _psnr(denoise(white, sigma).array[scored], reference)
            if args.mirror:
                mirrored = noisy.with_array(np.ascontiguousarray(noisy.array[:, :, ::-1]))
                back = denoise(mirrored, sigma).array[:, :, ::-1]
                row["PSNR of the mirror ensemble"] = _psnr(((result + back) / 2)[scored], reference)
            print(f"{name} (noise {sigma:.1f} HU), {model}: " + "; ".join(f"{k} {v:.2f}" for k, v in row.items()),
                  flush=True)
    return 0


def _psnr(result: np.ndarray, reference: np.ndarray) -> float:
    return hu_window_metrics(result, reference, DENOISING_WINDOW_HU)["psnr"]


if __name__ == "__main__":
    sys.exit(main())
