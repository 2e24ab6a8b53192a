"""Denoising speed and peak memory vs NFE, window batch size, precision and memory format: a benchmark,
not a test.

    python benchmarks/denoise_speed.py --size 128 128 64 --nfe 5 10 20 --window-batch 1 4 8
    # the issue-F GPU table (512 x 512 x 300 voxels):
    python benchmarks/denoise_speed.py --model default --device cuda --size 512 512 300 --nfe 3 \
        --window-batch 64 256 --precision fp32 bf16 --memory-format contiguous channels_last --project 1000 250 100 50

Every step is one network evaluation of the windows that hold voxels of the HU window (denoising skips the
windows wholly in air; the table shows how many it evaluated), so a run's time is setup + steps x (seconds per
step). Both are measured: the progress callback stamps the end of every step (after a GPU sync), the
step time is the mean gap between stamps (so a run needs >= 2 steps for it) and setup is the rest (anatomy,
condition stack, first-step warm-up excluded). `--project` prints setup + N x step time for the given N.
Denoising never takes more steps than its start time t_start allows (about 30 at a 20 HU noise level),
so the NFE 1000 / 250 / 100 / 50 rows the issue asks for are projected, not run: an hour of GPU time a row.
On a machine without a working SimpleITK (an empty `SimpleITK` module must still satisfy the import, see
scripts/gpu_session.sh), `--save-input ct.npz` (run where it is installed) writes the CT as read, and
`--input ct.npz` reads it back.

The volume is a real CT (default: the TotalSegmentator abdomen example, 3 mm) cropped or mirror-padded
to --size, denoised on its own grid with a fixed noise level (so the time is the sampler's, not the
noise estimate's). Cost does not depend on the weights, so by default an untrained network of --preset
is timed; --model loads a real one. Each configuration runs in a fresh process so that its peak memory
is its own: peak resident memory on CPU, peak allocated GPU memory on CUDA.
Denoising *quality* (PSNR/SSIM on simulated low dose) is benchmarks/denoise_quality.py.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedDiffFMLib.dataset import shared_data_root  # noqa: E402

DEFAULT_CT = shared_data_root() / "totalsegmentator" / "example_ct" / "example_ct.nii.gz"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_CT,
                        help="CT to crop/pad to --size (or a .npz written by --save-input)")
    parser.add_argument("--save-input", type=Path, help="only write --input as a .npz (for machines without SimpleITK)")
    parser.add_argument("--size", type=int, nargs=3, default=(96, 96, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--preset", default="default", help="untrained network of this preset (tiny/default/paper)")
    parser.add_argument("--model", help="registered model name or file instead of --preset")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--window-batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"),
                        help="bf16 only on CUDA")
    parser.add_argument("--memory-format", nargs="+", default=["contiguous"], choices=("contiguous", "channels_last"),
                        help="network weights' memory format (channels_last = NDHWC, as `train --channels-last`)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--window-size", type=int, help="sliding window edge in voxels (default: the model's patch)")
    parser.add_argument("--noise-level", type=float, default=20.0, help="HU; sets t_start, which caps the steps")
    parser.add_argument("--estimate-noise", action="store_true",
                        help="estimate the noise map from the image, as a user's denoise does (its time falls in "
                        "the setup column), instead of --noise-level")
    parser.add_argument("--project", type=int, nargs="*", default=[], metavar="STEPS",
                        help="also print the time projected for these step counts (from runs of >= 2 steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (its compile time falls in the setup column)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions that take the most time in the denoise call (cProfile), and "
                        "when each step ended: where the set-up goes. Profiling slows the per-window Python, so "
                        "these rows are not timings")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms on the first calls and keep the fastest "
                        "(the product leaves this off: 1-2 %% per step on an H100, benchmarks/README.md)")
    return parser.parse_args(argv)


def read_input(path: Path):
    """The CT of --input: an image file or series, or a .npz written by save_input()."""
    from MedDiffFMLib.io import Volume, read_volume

    if path.suffix != ".npz":
        return read_volume(path)
    with np.load(path) as data:
        return Volume(data["array"], *(tuple(float(v) for v in data[k]) for k in ("spacing", "origin", "direction")))


def save_input(source: Path, target: Path) -> None:
    ct = read_input(source)
    np.savez_compressed(target, array=ct.array, spacing=ct.spacing, origin=ct.origin, direction=ct.direction)


def volume_of_size(path: Path, size_xyz):
    """The CT cropped (centre) or mirror-padded to size_xyz, keeping its spacing."""
    from MedDiffFMLib.io import Volume

    ct = read_input(path)
    array = ct.array
    for axis, want in enumerate(reversed(size_xyz)):
        have = array.shape[axis]
        if have > want:
            start = (have - want) // 2
            array = np.take(array, range(start, start + want), axis=axis)
        elif have < want:
            pad = [(0, 0)] * 3
            pad[axis] = (0, want - have)
            array = np.pad(array, pad, mode="symmetric")
    return Volume(np.ascontiguousarray(array), ct.spacing, ct.origin, ct.direction)


def run_one(args, nfe: int, window_batch: int, precision: str, memory_format: str, results) -> None:
    """Child process: build everything, time one denoise() call, report its timings and peak memory."""
    import cProfile
    import pstats
    import resource

    import torch

    from MedDiffFMLib.tasks import common
    from MedDiffFMLib.tasks.denoise import denoise

    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = common.choose_device(args.device)
    if args.model:
        model = common.load_task_model(args.model, device)
    else:
        from MedDiffFMLib.config import preset
        from MedDiffFMLib.network import MedDiffNet

        torch.manual_seed(0)
        model = MedDiffNet(preset(args.preset)).to(device).eval()
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last_3d)
    if args.compile:  # one fixed shape: the sampler pads the last batch of a compiled network (make_sampler)
        model = torch.compile(model, dynamic=False)
    volume = volume_of_size(args.input, args.size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = []

    def stamp(step: int, total: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    noise_level = None if args.estimate_noise else args.noise_level
    if profiler is not None:
        profiler.enable()
    result = denoise(volume, model, nfe=nfe, noise_level=noise_level, region="abdomen", device=device,
                     overlap=args.overlap, window_batch=window_batch, window_size=args.window_size,
                     precision=precision, progress=stamp)
    sync()
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        print("steps ended at " + ", ".join(f"{t - start:.2f}" for t in stamps) + f" s; the call at {seconds:.2f} s")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile)
        sys.stdout.flush()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    per_step = float(np.mean(np.diff(stamps))) if len(stamps) > 1 else float("nan")
    # Step-to-step jitter can push a near-zero setup below zero; it is reported as 0 then.
    setup = max(0.0, seconds - len(stamps) * per_step) if len(stamps) > 1 else float("nan")
    evaluated, grid = result.windows[0]
    windows = f"{evaluated} of {grid}"
    noise = f"{result.noise_hu:.1f}" + (" estimated" if result.noise_estimate is not None else "")
    results.put((seconds, setup, per_step, peak, windows, len(stamps), device.type, noise))


def main(argv=None) -> int:
    from MedDiffFMLib.tasks.common import choose_device

    args = parse_args(argv)
    if args.save_input:
        save_input(args.input, args.save_input)
        print(f"wrote {args.save_input}")
        return 0
    context = multiprocessing.get_context("spawn")
    precisions = list(args.precision)
    if "bf16" in precisions and choose_device(args.device).type != "cuda":
        print("bf16 autocast is used on CUDA only (CPU runs fp32); skipping the bf16 rows")
        precisions.remove("bf16")
    size = "x".join(map(str, args.size))
    print(f"\nDenoising a {size} (x y z) volume, {args.model or 'untrained ' + args.preset} network, "
          f"overlap {args.overlap}, window {args.window_size or 'of the model'}, {args.threads} CPU thread(s), "
          f"cuDNN benchmark {'on' if args.cudnn_benchmark else 'off'}, torch.compile {'on' if args.compile else 'off'}")
    header = ("NFE", "steps", "window batch", "precision", "memory format", "device", "windows/step (of the grid)",
              "seconds", "setup s", "s/step", "peak GiB", "noise HU")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    rows = []  # each row is printed as soon as it is measured, so a run stopped early keeps what it has
    for nfe, batch, precision, fmt in itertools.product(args.nfe, args.window_batch, precisions, args.memory_format):
        results = context.Queue()
        child = context.Process(target=run_one, args=(args, nfe, batch, precision, fmt, results))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"| {nfe} | failed (exit code {child.exitcode}) | {batch} | {precision} | {fmt} |", flush=True)
            continue
        seconds, setup, per_step, peak, windows, steps, device, noise = results.get()
        rows.append((nfe, steps, batch, precision, fmt, device, windows, seconds, setup, per_step, peak / 2 ** 30))
        print(f"| {nfe} | {steps} | {batch} | {precision} | {fmt} | {device} | {windows} | {seconds:.2f} | "
              f"{setup:.2f} | {per_step:.3f} | {peak / 2 ** 30:.2f} | {noise} |", flush=True)
    if args.project:
        print_projection(rows, args.project)
    return 0


def print_projection(rows, step_counts) -> None:
    """Seconds for `step_counts` steps: each measured configuration's setup + N x its step time."""
    print("\nProjected from the rows above (setup + steps x s/step; peak memory does not grow with steps)")
    header = ("window batch", "precision", "memory format", "setup s", "s/step") + tuple(
        f"{n} steps (s)" for n in step_counts) + ("peak GiB",)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for nfe, steps, batch, precision, fmt, device, windows, seconds, setup, per_step, peak in rows:
        if steps < 2:
            print(f"| {batch} | {precision} | {fmt} | needs a run of >= 2 steps |")
            continue
        projected = " | ".join(f"{setup + n * per_step:.0f}" for n in step_counts)
        print(f"| {batch} | {precision} | {fmt} | {setup:.1f} | {per_step:.3f} | {projected} | {peak:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
