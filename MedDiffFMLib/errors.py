"""Exception types. Every error a user can cause says what is wrong and what to do about it."""
from __future__ import annotations


class MedDiffFMError(Exception):
    """Base class: the CLI prints the message and exits with code 2, the Slicer module shows it."""


class InputError(MedDiffFMError, ValueError):
    """An input volume, mask, parameter or path is unusable as given."""


class CheckpointError(MedDiffFMError):
    """A model file is missing, corrupt, truncated or does not match the requested use."""


class ResourceError(MedDiffFMError):
    """The job would not fit in the available memory or an optional dependency is missing."""


class TrainingDiverged(MedDiffFMError):
    """The training loss or gradients became NaN or infinite; the last checkpoint is kept as it was."""


class Cancelled(MedDiffFMError):
    """Raised from a progress callback to stop a long job; nothing is written."""


#: How allocation failures read where they are not a MemoryError: torch's CPU and CUDA allocators, cuBLAS and cuDNN
#: (..._STATUS_ALLOC_FAILED), ITK ("Failed to allocate memory for image"), NumPy ("Unable to allocate").
_OUT_OF_MEMORY_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                          "failed to allocate memory", "alloc_failed", "unable to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is memory running out (somewhere the memory estimates did not foresee)."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or any(phrase in text for phrase in _OUT_OF_MEMORY_PHRASES))
