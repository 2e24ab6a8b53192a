"""Patient axis order: tasks see a CT with its array axes along the patient's axes, however it was stored.

The network's position channels, the threshold anatomy's per-slice body mask, the noise estimate's in-plane
boxes and super-resolution's slice axis all take array axis 0 (z) as the head-foot axis and the other two as
in-plane axes. A CT stored sagittal- or coronal-first, or with reversed axes, is brought to LPS order (ITK axes
x, y, z along the patient's left, posterior and superior directions, as DICOM's patient axes), processed there,
and brought back. That is a permutation and reversal of the array with the geometry carried along: exact, and
free when the CT is stored that way already. An oblique grid takes the patient axis nearest to each of its axes.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple, TypeVar

import numpy as np

from .io import Volume
from .validation import check_same_grid

T = TypeVar("T")


@dataclass(frozen=True)
class AxisOrder:
    """Patient axis p (ITK order x, y, z) is the stored image's axis `source[p]`, reversed where `flip[p]`."""

    source: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]

    @classmethod
    def of(cls, direction: Sequence[float]) -> "AxisOrder":
        matrix = np.asarray(direction, float).reshape(3, 3)  # column a: stored axis a in LPS coordinates
        source = [-1, -1, -1]
        # Largest cosines first: exact for axis-aligned grids, the nearest patient axis for oblique ones.
        for flat in np.argsort(-np.abs(matrix), axis=None, kind="stable"):
            patient, stored = divmod(int(flat), 3)
            if source[patient] < 0 and stored not in source:
                source[patient] = stored
        return cls(tuple(source), tuple(bool(matrix[p, source[p]] < 0) for p in range(3)))

    @property
    def identity(self) -> bool:
        return self.source == (0, 1, 2) and not any(self.flip)

    def inverse(self) -> "AxisOrder":
        source, flip = [0, 0, 0], [False, False, False]
        for patient, stored in enumerate(self.source):
            source[stored], flip[stored] = patient, self.flip[patient]
        return AxisOrder(tuple(source), tuple(flip))

    def spacing(self, spacing: Sequence[float]) -> Tuple[float, float, float]:
        """Voxel spacing (x, y, z) of the stored grid in patient order."""
        return tuple(float(spacing[s]) for s in self.source)

    def array(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x) array of the stored grid in patient order (contiguous; ITK axis a is array axis 2 - a)."""
        for patient, stored in enumerate(self.source):
            if self.flip[patient]:
                array = np.flip(array, axis=2 - stored)
        return np.ascontiguousarray(np.transpose(array, [2 - self.source[2 - axis] for axis in range(3)]))

    def volume(self, vol: Volume) -> Volume:
        """`vol` in patient order, the same voxels at the same physical points."""
        matrix = np.asarray(vol.direction, float).reshape(3, 3)
        size = list(reversed(vol.shape))
        origin = np.asarray(vol.origin, float)
        columns = []
        for patient, stored in enumerate(self.source):
            if self.flip[patient]:  # the stored axis's last voxel becomes the first
                origin = origin + matrix[:, stored] * vol.spacing[stored] * (size[stored] - 1)
            columns.append(-matrix[:, stored] if self.flip[patient] else matrix[:, stored])
        return Volume(self.array(vol.array), self.spacing(vol.spacing),
                      tuple(float(o) for o in origin), tuple(float(v) for v in np.stack(columns, axis=1).ravel()))


def in_patient_axes(task: Callable[..., T]) -> Callable[..., T]:
    """Run `task` on its CT in patient order and bring what it returns back to the caller's order.

    The CT is the task's first Volume argument (in the order of its parameters); its other Volume arguments
    (masks, label maps) must be on the CT's grid, which is checked here, so that a refusal describes the
    caller's grid. Those Volumes and arrays of the CT's shape are reordered with it. Back come the Volumes the
    task returns, alone, in tuples or lists, or as dataclass fields (nested): those on the CT's grid get the
    caller's exact geometry, others (super-resolution's thin grid) have theirs carried back; arrays of the
    CT's shape in patient order are reordered too."""
    signature = inspect.signature(task)

    @functools.wraps(task)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        ct = next((value for value in bound.arguments.values() if isinstance(value, Volume)), None)
        order = None if ct is None else AxisOrder.of(ct.direction)
        if order is None or order.identity:
            return task(*args, **kwargs)
        for name, value in bound.arguments.items():
            if isinstance(value, Volume) and value is not ct:
                check_same_grid(value, ct, name.replace("_", " "))
        patient_ct = order.volume(ct)
        back = order.inverse()

        def forward(value):
            if value is ct:
                return patient_ct
            if isinstance(value, Volume):
                return patient_ct.with_array(order.array(value.array))
            if isinstance(value, np.ndarray) and value.shape == ct.shape:
                return order.array(value)
            return value

        def backward(value):
            if isinstance(value, Volume):
                if value.same_grid(patient_ct):
                    return ct.with_array(back.array(value.array))
                return back.volume(value)
            if isinstance(value, np.ndarray) and value.shape == patient_ct.shape:
                return back.array(value)
            if isinstance(value, (tuple, list)):
                return type(value)(backward(item) for item in value)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return dataclasses.replace(value, **{f.name: backward(getattr(value, f.name))
                                                     for f in dataclasses.fields(value) if f.init})
            return value

        for name, value in bound.arguments.items():
            bound.arguments[name] = forward(value)
        return backward(task(*bound.args, **bound.kwargs))

    return run
