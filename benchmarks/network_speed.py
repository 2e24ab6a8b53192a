"""Network inference throughput (windows/s) per architecture and option: a benchmark, not a test.

    python benchmarks/network_speed.py --device cuda --batch 256 --options eager cudnn compile+cudnn
    python benchmarks/network_speed.py --channels preset 8,32,64 --batch 4 --iters 2   # CPU smoke run

Denoising's cost is windows x (one forward pass a window) per step, so this times the forward pass alone, on
random inputs of the shapes the sampler feeds it (no_grad, bf16 autocast on CUDA as `denoise --precision bf16`),
and counts its FLOPs with `torch.utils.flop_counter`. `--channels` times variants of --preset with other
channel counts per level (untrained: cost does not depend on the weights), to size a cheaper network before
training one. `--window-size W` times windows of W^3 voxels instead of the preset's training patch (as the
sampling option of that name); the Mvoxel/s column compares window sizes. `--windows N` prints the seconds
a step of N windows would take at each measured rate (default 3170: CRLM-CT-1004 padded to 512 x 512 x 300,
overlap 0.25, abdomen window, 32^3 windows; give the count for other windows, e.g. 872 for 48^3 at 0.1667). Options:
  eager           the network as the product runs it (cuDNN picks its algorithms by heuristics; on the CPU every
                  3D convolution takes oneDNN's kernel, `network.OneDNNConv3d`)
  torch-conv      the CPU's 3D convolutions on PyTorch's own choice of kernel (plain nn.Conv3d), which for a
                  small batch (one window) is not oneDNN's: compare with eager at --batch 1
  cudnn           torch.backends.cudnn.benchmark: cuDNN times its algorithms on the first call
  channels_last   weights and inputs NDHWC
  compile         torch.compile(dynamic=False), default mode
  max-autotune    torch.compile(mode="max-autotune-no-cudagraphs")
  cudagraphs      torch.compile(mode="reduce-overhead"): the compiled calls replayed as CUDA graphs
Options combine with '+', e.g. compile+cudnn. `--profile` also prints, per configuration, the operators that
take the time in 3 profiled calls (torch.profiler), to find what limits the network on a device.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffFMLib.conditioning import condition_channels  # noqa: E402
from MedDiffFMLib.config import preset  # noqa: E402
from MedDiffFMLib.network import MedDiffNet, OneDNNConv3d, parameter_count  # noqa: E402

KNOWN = {"eager", "torch-conv", "cudnn", "channels_last", "compile", "max-autotune", "cudagraphs"}


def variant(name: str, channels: str, window: int = 0):
    """--preset with another channel count per level (GroupNorm groups shrink to fit the smallest level) and
    windows of `window`^3 voxels (0: the preset's patch)."""
    cfg = preset(name)
    if window:
        cfg = dataclasses.replace(cfg, patch_size=window)
    if channels == "preset":
        return cfg
    levels = tuple(int(c) for c in channels.split(","))
    if len(levels) != len(cfg.channels):
        raise SystemExit(f"--channels {channels}: the {name} preset has {len(cfg.channels)} levels")
    groups = min(cfg.norm_num_groups, min(levels))
    heads = tuple(min(h, c) if h else 0 for h, c in zip(cfg.num_head_channels, levels))
    return dataclasses.replace(cfg, channels=levels, norm_num_groups=groups, num_head_channels=heads)


def inputs(cfg, batch: int, device: torch.device, channels_last: bool):
    p = cfg.patch_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 1, p, p, p, generator=gen).to(device)
    cond = torch.randn(batch, condition_channels(cfg), p, p, p, generator=gen).to(device)
    if channels_last:
        x, cond = x.to(memory_format=torch.channels_last_3d), cond.to(memory_format=torch.channels_last_3d)
    t = torch.full((batch,), 100, dtype=torch.long, device=device)
    region = torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, cond, region


def flops_per_window(cfg) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = MedDiffNet(cfg).eval()
    # Gradients on: the counter does not know oneDNN's convolution, which CPU inference takes (OneDNNConv3d).
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs(cfg, 1, torch.device("cpu"), False))
    return counter.get_total_flops()


def windows_per_second(cfg, option: str, device: torch.device, batch: int, iters: int, profile: bool = False) -> float:
    parts = set(option.split("+"))
    torch.backends.cudnn.benchmark = "cudnn" in parts
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MedDiffNet(cfg).to(device).eval()
    if "torch-conv" in parts:
        for layer in model.modules():
            if isinstance(layer, OneDNNConv3d):
                layer.__class__ = torch.nn.Conv3d
    channels_last = "channels_last" in parts
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if "max-autotune" in parts:
        model = torch.compile(model, dynamic=False, mode="max-autotune-no-cudagraphs")
    elif "cudagraphs" in parts:
        model = torch.compile(model, dynamic=False, mode="reduce-overhead")
    elif "compile" in parts:
        model = torch.compile(model, dynamic=False)
    args = inputs(cfg, batch, device, channels_last)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), autocast():
        for _ in range(2):  # warm-up: compilation, cuDNN's algorithm search
            model(*args)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(*args)
        sync()
        rate = batch * iters / (time.perf_counter() - start)
        if profile:
            print_profile(model, args, device, sync)
    return rate


def print_profile(model, args, device: torch.device, sync) -> None:
    """The operators that take the time (self time) in 3 calls: a table printed before the configuration's row."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            model(*args)
        sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--channels", nargs="+", default=["preset"], metavar="C1,C2,...",
                        help="channel counts per level; 'preset' (the default) is the preset's own")
    parser.add_argument("--options", nargs="+", default=["eager"])
    parser.add_argument("--batch", type=int, default=256, help="windows per network call")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3170, help="windows per denoising step, for the s/step column")
    parser.add_argument("--window-size", type=int, default=0,
                        help="window edge in voxels (default: the preset's patch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true", help="also print where each configuration spends its time")
    args = parser.parse_args(argv)
    unknown = {p for o in args.options for p in o.split("+")} - KNOWN
    if unknown:
        parser.error(f"unknown option(s) {sorted(unknown)}; choose from {sorted(KNOWN)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"\n{where}, torch {torch.__version__}, {precision}, batch {args.batch}, {args.iters} timed calls")
    header = ("channels", "window", "params", "GFLOP/window", "option", "windows/s", "Mvoxel/s", "TFLOP/s",
              f"s/step ({args.windows} windows)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for channels in args.channels:
        cfg = variant(args.preset, channels, args.window_size)
        params = parameter_count(MedDiffNet(cfg)) / 1e6
        gflop = flops_per_window(cfg) / 1e9
        label = ",".join(map(str, cfg.channels)) + f" | {cfg.patch_size}"
        for option in args.options:
            try:
                rate = windows_per_second(cfg, option, device, args.batch, args.iters, args.profile)
            except Exception as exc:  # e.g. no C compiler for torch.compile: report and go on
                print(f"| {label} | {params:.2f}M | {gflop:.2f} | {option} | failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:80]} |", flush=True)
                continue
            print(f"| {label} | {params:.2f}M | {gflop:.2f} | {option} | {rate:.0f} | "
                  f"{rate * cfg.patch_size ** 3 / 1e6:.3g} | {rate * gflop / 1e3:.1f} | {args.windows / rate:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
