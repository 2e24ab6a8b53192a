"""An exclusive lock on a training run folder while `train`/`finetune` runs in it: two runs into one folder overwrite
each other's checkpoints and models, and the folder keeps only the last one's.

The lock is the operating system's, on the file `train.lock` in the folder (`flock` on POSIX, `msvcrt.locking` on
Windows): it ends with the process however the process ends (a kill, a crash, a reboot), so no lock is ever left
behind and no process id has to be judged alive or reused. The file stays; while a run holds it, it names that run's
process for the message another run gets. Free of torch, so that the command line can check the lock before the
(slow) data preparation.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import IO, Iterator

from .errors import InputError

log = logging.getLogger(__name__)

#: In the run folder: locked while a run trains there, and then holding {"pid": ..., "host": ...} of its process.
LOCK_FILE = "train.lock"
#: The byte Windows locks, far beyond the JSON: a locked byte there cannot be read by others, and the JSON must be.
_WINDOWS_LOCKED_BYTE = 1 << 20


@contextlib.contextmanager
def run_lock(out_dir) -> Iterator[None]:
    """Hold the lock of `out_dir` (made if need be) for the block; refuse while another process holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+", encoding="utf-8") as handle:  # "a+": never emptied before the lock is ours
        if not _try_lock(handle):
            raise _in_use(out_dir)
        try:
            _write(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            yield
        finally:
            _write(handle, "")
            _unlock(handle)


def check_run_lock(out_dir) -> None:
    """Refuse while another process holds the lock of `out_dir` (taken and let go at once)."""
    path = Path(out_dir) / LOCK_FILE
    if not path.is_file():
        return
    with open(path, "a+", encoding="utf-8") as handle:
        if not _try_lock(handle):
            raise _in_use(Path(out_dir))
        _unlock(handle)


def _in_use(out_dir: Path) -> InputError:
    try:
        holder = json.loads((out_dir / LOCK_FILE).read_text(encoding="utf-8"))
        who, pid = f"process {holder['pid']} on {holder['host']}", holder["pid"]
    except (OSError, ValueError, KeyError, TypeError):  # a run starting this very moment has not written it yet
        who, pid = "a run starting now", "PID"
    return InputError(f"{out_dir} is in use by another training ({who}): two runs in one folder overwrite each other's "
                      f"checkpoints and models. Wait for it to finish, or stop it (kill {pid}: it writes a checkpoint "
                      "first) and resume, or train into another folder")


def _write(handle: IO[str], text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def _try_lock(handle: IO[str]) -> bool:
    """False while another process (or another open of the file in this process) holds the lock. Where the file
    system has no locks (some network shares), True with a warning: refusing every run there would be worse."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(_WINDOWS_LOCKED_BYTE)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            # Two distinct bits, added: vermin reads `a | b` of unknown types as a 3.10 union type.
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX + fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):  # held (msvcrt: EACCES...)
            return False
        log.warning("cannot lock %s (%s): this file system offers no locks, so nothing stops a second training "
                    "from running into the same folder; make sure none does", handle.name, exc.strerror or exc)
    return True


def _unlock(handle: IO[str]) -> None:
    with contextlib.suppress(OSError):  # never locked where the file system has no locks
        if os.name == "nt":
            import msvcrt

            handle.seek(_WINDOWS_LOCKED_BYTE)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
