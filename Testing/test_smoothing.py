"""The threaded separable filters give scipy's results bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedDiffFMLib.smoothing import gaussian_filter, uniform_filter

GAUSSIAN = (gaussian_filter, ndimage.gaussian_filter)
UNIFORM = (uniform_filter, ndimage.uniform_filter)


@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("filters, shape, parameter, options", [
    (GAUSSIAN, (7, 33, 20), (0.7, 1.5, 2.0), {}),
    (GAUSSIAN, (5, 9, 11), (0.0, 1.0, 1.0), {"output": np.float32}),
    (GAUSSIAN, (6, 8, 10), 1.2, {"truncate": 2.0}),
    (GAUSSIAN, (2, 40, 3), (1.0, 0.0, 3.0), {"mode": "nearest"}),
    (GAUSSIAN, (4, 5, 6), (0.0, 0.0, 0.0), {}),
    (GAUSSIAN, (50,), 2.0, {}),  # one axis: nothing to split across
    (UNIFORM, (6, 23, 17), (1, 5, 7), {}),
    (UNIFORM, (6, 23, 17), 3, {"mode": "nearest"}),
    (UNIFORM, (6, 23, 17), (1, 1, 1), {}),
    (UNIFORM, (6, 23, 17), (3, 1, 4), {"output": np.float64}),
    (UNIFORM, (30,), 5, {}),
])
def test_threaded_filter_equals_scipy(filters, shape, parameter, options, threads):
    ours, scipys = filters
    image = (np.random.default_rng(0).normal(size=shape) * 100).astype(np.float32)
    expected = scipys(image, parameter, **options)
    result = ours(image, parameter, threads=threads, **options)
    assert result.dtype == expected.dtype
    assert np.array_equal(result, expected)


def test_integer_ct_smoothed_into_float32_as_scipy_does():
    ct = np.random.default_rng(1).integers(-1024, 2000, size=(9, 30, 41)).astype(np.int16)
    expected = ndimage.gaussian_filter(ct.astype(np.float32), (0.3, 1.2, 1.2), truncate=2.0)
    assert np.array_equal(gaussian_filter(ct, (0.3, 1.2, 1.2), truncate=2.0, output=np.float32, threads=4), expected)


def test_sigma_count_must_match_the_dimensions():
    with pytest.raises(ValueError, match="2 filter sizes for an array of 3 dimensions"):
        gaussian_filter(np.zeros((3, 4, 5)), (1.0, 1.0))
