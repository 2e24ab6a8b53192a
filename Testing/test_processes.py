"""Whether a process exists, asked without disturbing it (job folders of a killed Slicer, a training run's lock)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import types

import pytest

from MedDiffFMLib.processes import process_is_gone


def test_a_live_process_is_not_gone_and_an_ended_one_is():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_is_gone(child.pid) and not process_is_gone(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert process_is_gone(child.pid)


def test_on_windows_kernel32_is_asked_and_only_a_process_that_cannot_exist_or_has_exited_counts_as_gone(monkeypatch):
    """os.kill(pid, 0) terminates a process on Windows. Process 11 runs (STILL_ACTIVE), 12 has exited, 13 does not
    exist (OpenProcess: invalid parameter), 14 is another user's (access denied), 15's exit code cannot be read."""
    exit_codes = {11: 259, 12: 0, 15: None}
    error, closed = [], []

    def open_process(access, inherit, pid):
        error[:] = [0 if pid in exit_codes else 87 if pid == 13 else 5]
        return pid if pid in exit_codes else None

    def exit_code(handle, code):
        if exit_codes[handle] is None:
            return 0
        code._obj.value = exit_codes[handle]
        return 1

    def close_handle(handle):
        closed.append(handle)
        return 1

    kernel32 = types.SimpleNamespace(OpenProcess=open_process, GetExitCodeProcess=exit_code, CloseHandle=close_handle)
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error: kernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: error[0], raising=False)
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail("os.kill would terminate the process"))
    monkeypatch.setattr(os, "name", "nt")
    assert [process_is_gone(pid) for pid in (11, 12, 13, 14, 15)] == [False, True, True, False, False]
    assert closed == [11, 12, 15]  # every handle opened is closed
