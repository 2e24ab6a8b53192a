"""Plain-Python helpers of the MedDiffFM Slicer module.

Nothing here imports Qt, so the helpers (and the module's Logic) run in Slicer, in PythonSlicer and
under `slicer-core` (the MRML layer without the application), which is what the tests use.
"""
