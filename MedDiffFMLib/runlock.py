"""An exclusive lock on a training run folder while `train`/`finetune` runs in it: two runs into one folder overwrite
each other's checkpoints and models, and the folder keeps only the last one's.

Free of torch, so that the command line can check the lock before the (slow) data preparation.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from .errors import InputError
from .processes import process_is_gone

log = logging.getLogger(__name__)

#: In the run folder while a run trains there: {"pid": ..., "host": ...} of the process that holds it.
LOCK_FILE = "train.lock"


def check_run_lock(out_dir) -> Optional[dict]:
    """Refuse while another live training holds the lock of `out_dir`; returns the holder of a stale lock (its
    process is gone from this host), or None when there is no lock."""
    path = Path(out_dir) / LOCK_FILE
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # being written by a run starting just now, or damaged
        pid, host = None, None
    if pid is not None and host == socket.gethostname() and process_is_gone(pid):
        return {"pid": pid, "host": host}
    who = f"process {pid} on {host}" if pid is not None else "a run that is starting (or left its lock damaged)"
    raise InputError(f"{out_dir} is in use by another training ({who}): two runs in one folder overwrite each "
                     "other's checkpoints and models. Wait for it to finish, stop it (kill "
                     f"{pid if pid is not None else 'PID'}: it writes a checkpoint first) and resume, or train into "
                     f"another folder. If no training runs there any more, delete {path}")


@contextlib.contextmanager
def run_lock(out_dir) -> Iterator[None]:
    """Hold the lock of `out_dir` (created if need be) for the block, also when it ends by an error or Ctrl-C."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # novermin (flags, not a type union)
            break
        except FileExistsError:
            stale = check_run_lock(out_dir)
            if stale is not None:
                log.warning("taking over the lock %s of process %d, which is gone (a run killed before it could "
                            "remove its lock)", path, stale["pid"])
                with contextlib.suppress(FileNotFoundError):  # another run may have taken it over just now
                    path.unlink()
    with os.fdopen(handle, "w", encoding="utf-8") as lock:
        json.dump(mine, lock)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # removed by hand meanwhile: not ours to remove any more
            if json.loads(path.read_text(encoding="utf-8")) == mine:
                path.unlink()
