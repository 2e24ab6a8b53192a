"""Conversion between a Slicer IJK-to-RAS matrix and SimpleITK image geometry (LPS).

Slicer stores a volume's geometry as one 4x4 IJK-to-RAS matrix; SimpleITK (and so MedDiffFMLib) uses
spacing, origin and a direction matrix in LPS. RAS and LPS differ by the sign of the first two axes.
Voxel arrays need no reordering: `slicer.util.arrayFromVolume` and `SimpleITK.GetArrayFromImage`
both index (k, j, i) = (z, y, x).
"""
import numpy as np

# Multiplying by this flips x and y: RAS <-> LPS (the map is its own inverse).
_RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitkGeometryFromIJKToRAS(ijkToRAS):
    """Return (spacing, origin, direction) in SimpleITK's LPS convention for a 4x4 IJK-to-RAS matrix.

    spacing and origin are (x, y, z) tuples; direction is the row-major 3x3 matrix as 9 floats.
    """
    ijkToLPS = _RAS_LPS_FLIP @ np.asarray(ijkToRAS, dtype=float)
    axes = ijkToLPS[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not np.isfinite(ijkToLPS).all():  # e.g. Slicer's NaN directions for a matrix with a zero column
        raise ValueError(f"IJK-to-RAS matrix holds NaN or infinite values: {np.asarray(ijkToRAS).tolist()}; set the "
                         "volume's spacing, origin and directions (Volumes module, Volume Information)")
    if np.any(spacing <= 0):
        raise ValueError(f"IJK-to-RAS matrix has a zero-length axis (spacing {spacing.tolist()})")
    direction = axes / spacing
    return tuple(spacing.tolist()), tuple(ijkToLPS[:3, 3].tolist()), tuple(direction.ravel().tolist())


def ijkToRASFromSitkGeometry(spacing, origin, direction):
    """Return the 4x4 IJK-to-RAS matrix (numpy) of a SimpleITK geometry (LPS spacing/origin/direction)."""
    ijkToLPS = np.eye(4)
    ijkToLPS[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float)
    ijkToLPS[:3, 3] = origin
    return _RAS_LPS_FLIP @ ijkToLPS
