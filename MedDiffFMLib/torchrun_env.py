"""Where this process stands among torchrun's processes, as the environment torchrun sets says.

Free of torch, so that the command line can read it before any heavy import (only the first process logs).
"""
from __future__ import annotations

import os
from typing import NamedTuple

from .errors import InputError


class Place(NamedTuple):
    rank: int = 0
    world: int = 1
    local: int = 0


def torchrun_place() -> Place:
    """This process's rank, the number of processes and its rank on this machine; `Place()` when run alone.

    RANK counts only with WORLD_SIZE > 1: a job scheduler may export RANK for a single process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Place()
        return Place(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError):
        raise InputError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} with RANK={os.environ.get('RANK')!r} and "
                         f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} is not a torchrun launch: start several "
                         "processes with torchrun, or unset WORLD_SIZE to run one") from None
