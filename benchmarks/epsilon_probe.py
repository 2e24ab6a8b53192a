"""Epsilon error per validation case: how well each model predicts the noise it is given, white or CT-textured.

For each validation case (`MedDiffFMLib.dataset`, never trained on), fixed patches (the validation patches of a
training run: seed 1, no anatomy dropout) are noised at timesteps spread evenly over each --t-range, once with
white noise and once with CT-textured noise (`noise_texture.fbp_like_noise`, the texture `train --correlated-noise`
teaches). The table gives the mean |predicted - true noise| per model, also under bf16 autocast with --bf16. This
is the quantity training minimises, per case; benchmarks/README.md compares it with the denoising table
(`denoise_quality.py`), which it does not always follow (sessions 16-18).

    python benchmarks/epsilon_probe.py --model default --model denoise
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedDiffFMLib.dataset import CTPatchDataset, shared_data_root, split_cases  # noqa: E402
from MedDiffFMLib.diffusion import Schedule, q_sample  # noqa: E402
from MedDiffFMLib.noise_texture import fbp_like_noise  # noqa: E402
from MedDiffFMLib.tasks.common import load_task_model, model_config  # noqa: E402
from MedDiffFMLib.training import validation_batch  # noqa: E402

#: The seed of the noise: the same draw for every model, case and range.
NOISE_SEED = 7


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model name or file (repeat to compare)")
    parser.add_argument("--t-range", type=int, nargs=2, action="append", metavar=("LO", "HI"),
                        help="timesteps LO..HI (repeat; default: 5 20, 20 60, 60 150: where denoising starts)")
    parser.add_argument("--patches", type=int, default=8, help="validation patches per case")
    parser.add_argument("--bf16", action="store_true", help="also under CPU bf16 autocast")
    parser.add_argument("--data-root", type=Path, default=shared_data_root())
    parser.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / "results" / "cache",
                        help="preprocessed-volume cache (filled on first use)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {name: load_task_model(name, torch.device("cpu")) for name in args.model}
    cfg = model_config(next(iter(models.values())))
    schedule = Schedule.from_name(cfg.schedule, cfg.num_train_timesteps)
    precisions = ("fp32", "bf16") if args.bf16 else ("fp32",)
    columns = [f"{name} {p}" if args.bf16 else name for name in models for p in precisions]
    print("| case | t | noise | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for case in split_cases(args.data_root, "validation"):
        data = CTPatchDataset([case], cfg, args.cache_dir, seed=1, anatomy_dropout=0.0)
        batch = validation_batch(data, args.patches)
        for lo, hi in args.t_range or [(5, 20), (20, 60), (60, 150)]:
            t = torch.linspace(lo, hi, args.patches).long()
            for kind in ("white", "CT-textured"):
                generator = torch.Generator().manual_seed(NOISE_SEED)
                shape = batch["image"].shape
                noise = (torch.randn(shape, generator=generator) if kind == "white"
                         else fbp_like_noise(shape, generator))
                x_t = q_sample(schedule, batch["image"], t, noise)
                cells = []
                for model in models.values():
                    for precision in precisions:
                        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                            eps = model(x_t, t, batch["cond"], batch["region"]).float()
                        cells.append(f"{float((eps - noise).abs().mean()):.4f}")
                print(f"| {Path(case.path).name} | {lo}-{hi} | {kind} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
