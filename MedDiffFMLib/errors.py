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


class Cancelled(MedDiffFMError):
    """Raised from a progress callback to stop a long job; nothing is written."""
