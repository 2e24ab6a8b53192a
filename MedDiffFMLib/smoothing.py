"""Separable smoothing filters for whole CTs, on all CPU threads.

scipy's `ndimage` filters run on one core, and a 512 x 512 x 300 CT is filtered several times while a task sets
up (anatomy, noise estimate, blend weights). A separable filter is a sequence of 1D passes, and each pass treats
every line on its own, so each pass is split into slabs across another axis and run in threads (scipy releases the
GIL there). The results are bit-identical to scipy's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np


def gaussian_filter(array: np.ndarray, sigma: Union[float, Sequence[float]], truncate: float = 4.0,
                    mode: str = "reflect", output: Optional[type] = None,
                    threads: Optional[int] = None) -> np.ndarray:
    """`scipy.ndimage.gaussian_filter(array, sigma, mode=mode, truncate=truncate, output=output)` (output: a dtype
    or None) on `threads` threads (None: torch's intra-op thread count, which `--threads` sets)."""
    from scipy import ndimage

    sigmas = _per_axis(array, sigma, float)
    passes = [(axis, lambda src, out, axis=axis, s=s: ndimage.gaussian_filter1d(
        src, s, axis=axis, mode=mode, truncate=truncate, output=out))
        for axis, s in enumerate(sigmas) if s > 1e-15]  # scipy's own test for "no smoothing"
    return _separable(array, passes, output, threads)


def uniform_filter(array: np.ndarray, size: Union[int, Sequence[int]], mode: str = "reflect",
                   output: Optional[type] = None, threads: Optional[int] = None) -> np.ndarray:
    """`scipy.ndimage.uniform_filter(array, size, mode=mode, output=output)` on `threads` threads (as above)."""
    from scipy import ndimage

    sizes = _per_axis(array, size, int)
    passes = [(axis, lambda src, out, axis=axis, n=n: ndimage.uniform_filter1d(src, n, axis=axis, mode=mode,
                                                                             output=out))
              for axis, n in enumerate(sizes) if n > 1]
    return _separable(array, passes, output, threads)


def _per_axis(array: np.ndarray, value, kind) -> List:
    values = [kind(value)] * np.ndim(array) if np.isscalar(value) else [kind(v) for v in value]
    if len(values) != np.ndim(array):
        raise ValueError(f"{len(values)} filter sizes for an array of {np.ndim(array)} dimensions")
    return values


def _separable(array: np.ndarray, passes: List[Tuple[int, Callable]], output: Optional[type],
               threads: Optional[int]) -> np.ndarray:
    """Run the 1D `passes` (axis, filter1d(src, out)) one after the other, each split into slabs across another axis,
    the first from `array` into a new array of dtype `output` (None: the array's), the later ones in place, as
    scipy's own separable filters do."""
    import torch

    array = np.asarray(array)
    out = np.empty(array.shape, dtype=array.dtype if output is None else output)
    if not passes:
        out[...] = array
        return out
    threads = max(1, torch.get_num_threads() if threads is None else int(threads))
    source = array
    with ThreadPoolExecutor(threads) as pool:
        for axis, filter1d in passes:
            if array.ndim == 1:  # no other axis to split across
                slabs = [(slice(None),)]
            else:
                split = 1 if axis == 0 else 0
                bounds = np.linspace(0, array.shape[split], min(threads, array.shape[split]) + 1).astype(int)
                slabs = [(slice(None),) * split + (slice(a, b),) for a, b in zip(bounds[:-1], bounds[1:])]
            list(pool.map(lambda slab, src=source: filter1d(src[slab], out[slab]), slabs))
            source = out
    return out
