"""MedDiffFM: a 3D CT diffusion foundation model (MedDiff-FM) as a plain Python library.

No Slicer imports here: the Slicer module in ../MedDiffFM is a thin shell around this package.
"""
from __future__ import annotations

__version__ = "0.1.0"
