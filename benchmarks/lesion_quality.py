"""Lesion inpainting on held-out real lesions: does a model fill a lesion mask with lesion-like tissue?

Each case is a validation subject of `MedDiffFMLib.dataset` with a lesion mask (never trained on). Every model
inpaints the voxels of the real lesion mask (`tasks.inpaint.inpaint`: RePaint, the voxels outside the mask are kept),
and the filled voxels are compared with the real lesion they replace:
- mean HU inside the mask, and its error against the real lesion's mean;
- W1: the Wasserstein-1 distance (HU) between the filled and the real in-mask intensity distributions;
- contrast: mean HU inside the mask minus the mean of a shell around it (the tissue the lesion sits in).
A lesion ControlNet should land nearer the real lesion than a base model, which fills the mask with the normal
tissue around it. Several seeds are averaged: one filling is one draw. `--task generate-lesion` scores the other
lesion task the same way: the whole box around the mask is synthesised anew (`tasks.lesion.generate_lesion`, lesion
ControlNets only), so the shell the contrast is taken against is synthesised too.

    python benchmarks/lesion_quality.py --model default --model tiny-lesion --model RUN/ema.safetensors
    python benchmarks/lesion_quality.py --task generate-lesion --model tiny-lesion --model RUN/ema.safetensors
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import wasserstein_distance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedDiffFMLib.dataset import shared_data_root  # noqa: E402
from MedDiffFMLib.errors import InputError  # noqa: E402
from MedDiffFMLib.finetune import check_task  # noqa: E402
from MedDiffFMLib.io import read_mask, read_volume  # noqa: E402
from MedDiffFMLib.tasks.common import load_task_model  # noqa: E402
from MedDiffFMLib.tasks.inpaint import inpaint  # noqa: E402
from MedDiffFMLib.tasks.lesion import generate_lesion  # noqa: E402

#: case -> (CT and lesion mask relative to the data folder, body region).
CASES = {
    "STS_002 (sarcoma, limb)": ("ibsi_sts/STS_002/CT_image.nii.gz", "ibsi_sts/STS_002/CT_mask.nii.gz", "other"),
    "lung1 (nodule, chest)": ("pyradiomics_lung1/lung1_image.nrrd", "pyradiomics_lung1/lung1_label.nrrd", "chest"),
}
#: In-plane width of the shell around the mask that `contrast` compares with (voxels).
SHELL_VOXELS = 3


def shell(inside: np.ndarray, voxels: int = SHELL_VOXELS) -> np.ndarray:
    """The voxels within `voxels` of the mask in-plane (slices are often thicker than the lesion's detail)."""
    grown = ndimage.binary_dilation(inside, structure=np.ones((1, 3, 3), bool), iterations=voxels)
    return grown & ~inside


def lesion_scores(filled: np.ndarray, real: np.ndarray, inside: np.ndarray) -> dict:
    ring = shell(inside)
    return {"mean": float(filled[inside].mean()),
            "w1": float(wasserstein_distance(filled[inside], real[inside])),
            "contrast": float(filled[inside].mean() - filled[ring].mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--model", action="append", default=[], help="model to fill the mask (repeat to compare)")
    parser.add_argument("--nfe", type=int, default=25)
    parser.add_argument("--resample", type=int, default=5, help="RePaint resampling (the task's default is 10)")
    parser.add_argument("--seeds", type=int, default=2, help="fillings per model and case, averaged")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--task", choices=("inpaint", "generate-lesion"), default="inpaint",
                        help="generate-lesion takes lesion ControlNets only, and no RePaint resampling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")  # test-model warnings are known
    torch.set_num_threads(args.threads)
    models = {name: load_task_model(name, torch.device("cpu")) for name in args.model}
    if args.task == "generate-lesion":
        for name, model in models.items():
            try:
                check_task(model, "lesion")  # before any case runs
            except InputError as err:
                parser.error(f"--model {name}: {err}")

    print("| case | filled by | mean HU in mask (error) | W1 to the real lesion (HU) | contrast to the shell (HU) "
          "| time (s) |\n|---|---|---|---|---|---|")
    for case in args.cases or CASES:
        image, mask_file, region = CASES[case]
        ct = read_volume(args.data_root / image)
        mask = read_mask(args.data_root / mask_file, like=ct)
        inside = mask.array > 0
        real = ct.array.astype(np.float32)
        truth = lesion_scores(real, real, inside)
        print(f"| {case} | the real lesion | {truth['mean']:.0f} | 0 | {truth['contrast']:.0f} | |", flush=True)
        for name, model in models.items():
            started, runs = time.time(), []
            for seed in range(args.seeds):
                if args.task == "inpaint":
                    filled = inpaint(ct, mask, model, nfe=args.nfe, resample=args.resample, region=region, seed=seed)
                else:
                    filled = generate_lesion(ct, mask, model, nfe=args.nfe, region=region, seed=seed)
                runs.append(lesion_scores(filled.array, real, inside))
            mean = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
            print(f"| {case} | `{name}` | {mean['mean']:.0f} ({mean['mean'] - truth['mean']:+.0f}) | {mean['w1']:.0f} "
                  f"| {mean['contrast']:.0f} | {(time.time() - started) / args.seeds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
