"""Denoising quality on the held-out validation cases: MedDiffFM vs Gaussian / NLM / BM3D.

Runs `python -m MedDiffFMLib evaluate denoise` on one case per body region of the fixed validation
split (`MedDiffFMLib.dataset.VALIDATION_SUBJECTS`, never trained on): pyradiomics lung1 (chest,
0.57 mm pixels, 5 mm slices), TotalSegmentator example_ct_sm (abdomen, 3 mm) and IBSI STS_002
(limb, 0.98 mm pixels, 3.27 mm slices). Setup as ../shared/NOTES-DENOISING.md: the 8 middle slices
of each are scored, low dose simulated with I0 = 1e5 (about the paper's Mayo quarter-dose baseline PSNR)
and 2.5e4 photons, PSNR/SSIM in [-160, 240] HU, oracle noise std for every method. Every method gets
12 more slices on each side as unscored context (example_ct_sm has 30 slices in all), as a whole scan
would give a 3D denoiser; `--context-slices 0` gives the thin blocks of the earlier tables.

    python benchmarks/denoise_quality.py                   # classical baselines only
    python benchmarks/denoise_quality.py --model denoise   # + MedDiffFM (the task's default model)
Extra arguments pass through to `evaluate denoise` (e.g. --nfe 10, --photons 1e5, --device cuda; --overwrite to
replace an earlier table in --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedDiffFMLib.cli import main  # noqa: E402
from MedDiffFMLib.dataset import SHARED_CASES, VALIDATION_SUBJECTS, shared_data_root  # noqa: E402

#: One case per region from the validation subjects (example_ct_sm rather than its parent example_ct:
#: the same subject, and 8 middle slices of the crop are upper abdomen with liver).
BENCHMARK_CASES = ("pyradiomics_lung1", "ts_example_ct_sm", "ibsi_sts_002")


def validation_paths(data_root: Path):
    paths = []
    for case_id in BENCHMARK_CASES:
        relative, _region, subject = SHARED_CASES[case_id]
        assert subject in VALIDATION_SUBJECTS, f"{case_id} is not a validation case"
        paths.append(str(data_root / relative))
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Any other option (--model, --methods, --nfe, --device, --crop, ...) "
                                     "passes through to `python -m MedDiffFMLib evaluate denoise`; see its --help.")
    parser.add_argument("--data-root", type=Path, default=shared_data_root(),
                        help="the shared CT data folder (holds MANIFEST.md)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "denoise_quality",
                        help="folder for denoise_results.{csv,md} and the per-case figures")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--context-slices", type=int, default=12)
    parser.add_argument("--photons", type=float, nargs="+", default=[1e5, 2.5e4])
    return parser.parse_known_args(argv)


if __name__ == "__main__":
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    args, passthrough = parse_args()
    sys.exit(main(["evaluate", "denoise", *validation_paths(args.data_root), "--out", str(args.out),
                   "--slices", str(args.slices), "--context-slices", str(args.context_slices),
                   "--photons", *map(str, args.photons), *passthrough]))
