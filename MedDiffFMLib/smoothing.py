"""Gaussian smoothing of whole CTs on all CPU threads.

scipy's `ndimage.gaussian_filter` runs on one core, and a 512 x 512 x 300 CT is smoothed several times while a
task sets up (anatomy, noise estimate, blend weights): about 6 s of a GPU denoise's set-up. The filter is
separable and every 1D pass treats each line on its own, so each pass is split into slabs across another axis and
run in threads (scipy releases the GIL there). The result is bit-identical to scipy's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

import numpy as np


def gaussian_filter(array: np.ndarray, sigma: Union[float, Sequence[float]], truncate: float = 4.0,
                    mode: str = "reflect", output: Optional[type] = None,
                    threads: Optional[int] = None) -> np.ndarray:
    """`scipy.ndimage.gaussian_filter(array, sigma, mode=mode, truncate=truncate, output=output)` (output: a dtype
    or None) computed on `threads` threads (None: torch's intra-op thread count, which `--threads` sets)."""
    import torch
    from scipy import ndimage

    array = np.asarray(array)
    sigmas = [float(sigma)] * array.ndim if np.isscalar(sigma) else [float(s) for s in sigma]
    if len(sigmas) != array.ndim:
        raise ValueError(f"{len(sigmas)} sigmas for an array of {array.ndim} dimensions")
    out = np.empty(array.shape, dtype=array.dtype if output is None else output)
    threads = max(1, torch.get_num_threads() if threads is None else int(threads))
    source = array
    passes = [(axis, s) for axis, s in enumerate(sigmas) if s > 1e-15]  # scipy's own test for "no smoothing"
    if not passes:
        out[...] = array
        return out
    with ThreadPoolExecutor(threads) as pool:
        for axis, s in passes:
            split = 1 if axis == 0 and array.ndim > 1 else 0
            bounds = np.linspace(0, array.shape[split], min(threads, array.shape[split]) + 1).astype(int)
            slabs = [(slice(None),) * split + (slice(a, b),) for a, b in zip(bounds[:-1], bounds[1:])]
            # Later passes read and write `out` slab by slab, in place, as scipy's own passes do.
            list(pool.map(lambda slab, src=source: ndimage.gaussian_filter1d(
                src[slab], s, axis=axis, mode=mode, truncate=truncate, output=out[slab]), slabs))
            source = out
    return out
