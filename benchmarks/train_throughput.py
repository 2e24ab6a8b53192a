"""Training throughput (patches/s) per preset, device and option: a benchmark, not a test.

    python benchmarks/train_throughput.py --presets tiny default --batch-size 4 --steps 10 --threads 2

Times full optimizer steps (forward, L1 epsilon loss, backward, Adam) on random inputs of the right shapes,
so the numbers are the network's cost alone; data loading is measured separately with --with-data CACHE_DIR
(patches/s of CTPatchDataset on the train split). On a CPU shared with other jobs use --threads 1: two
threads were slower there (OpenMP threads wait on each other when one is descheduled).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from MedDiffFMLib.conditioning import condition_channels
from MedDiffFMLib.config import preset
from MedDiffFMLib.network import MedDiffNet, parameter_count

OPTIONS = ("plain", "channels_last", "compile", "compile+channels_last")


def time_steps(name: str, device: torch.device, option: str, batch: int, steps: int, bf16: bool) -> float:
    """Patches per second over `steps` optimizer steps after two warm-up steps."""
    cfg = preset(name)
    torch.manual_seed(0)
    model = MedDiffNet(cfg).to(device)
    channels_last, compiled = "channels_last" in option, "compile" in option
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if compiled:
        torch._dynamo.reset()  # a fresh compile per preset (one fixed shape each, no dynamic-shape recompiles)
    forward = torch.compile(model, dynamic=False) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    p = cfg.patch_size
    x = torch.randn(batch, 1, p, p, p, device=device)
    cond = torch.randn(batch, condition_channels(cfg), p, p, p, device=device)
    if channels_last:
        x, cond = x.to(memory_format=torch.channels_last_3d), cond.to(memory_format=torch.channels_last_3d)
    t = torch.randint(0, 1000, (batch,), device=device)
    region = torch.zeros(batch, dtype=torch.long, device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = (forward(x, t, cond, region).float() - x).abs().mean()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def data_throughput(name: str, cache_dir: str, n: int) -> float:
    """Patches/s of CTPatchDataset on the train split (preprocesses into cache_dir first if needed)."""
    from MedDiffFMLib.dataset import CTPatchDataset, shared_data_root, split_cases

    data = CTPatchDataset(split_cases(shared_data_root(), "train"), preset(name), cache_dir)
    data[0]
    start = time.perf_counter()
    for i in range(1, n + 1):
        data[i]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "default"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--with-data", metavar="CACHE_DIR",
                        help="also time patch sampling from this preprocessing cache (e.g. runs/cache)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; batch {args.batch_size}; torch {torch.__version__}")
    print(f"{'preset':8} {'params':>8} {'option':22} {'precision':9} {'patches/s':>10} {'s/step':>8}")
    for name in args.presets:
        params = parameter_count(MedDiffNet(preset(name))) / 1e6
        precisions = [False, True] if device.type == "cuda" else [False]
        for option in args.options:
            for bf16 in precisions:
                try:
                    rate = time_steps(name, device, option, args.batch_size, args.steps, bf16)
                    print(f"{name:8} {params:7.2f}M {option:22} {'bf16' if bf16 else 'fp32':9} {rate:10.2f} "
                          f"{args.batch_size / rate:8.2f}", flush=True)
                except Exception as exc:  # e.g. torch.compile without a C compiler: report, go on
                    print(f"{name:8} {params:7.2f}M {option:22} {'bf16' if bf16 else 'fp32':9} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}", flush=True)
        if args.with_data:
            rate = data_throughput(name, args.with_data, 50)
            print(f"{name:8} data sampling (CTPatchDataset, 1 process): {rate:.1f} patches/s")


if __name__ == "__main__":
    main()
