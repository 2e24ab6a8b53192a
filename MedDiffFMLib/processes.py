"""Whether a process still exists, asked without disturbing it, on POSIX and on Windows.

Free of torch, so that the Slicer module can use it (it removes the job folders of a Slicer that was killed).
"""
from __future__ import annotations

import os


def process_is_gone(pid: int) -> bool:
    """True only when no process `pid` exists on this machine; False when it lives or that cannot be told."""
    if os.name != "nt":
        try:
            os.kill(pid, 0)  # signal 0 only asks
        except ProcessLookupError:
            return True
        except OSError:  # another user's live process
            return False
        return False
    # Windows has no harmless signal (os.kill terminates): ask kernel32.
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = ctypes.c_void_p  # a handle is pointer-sized; ctypes' default int truncates it
    kernel32.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
    kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
    kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 87  # ERROR_INVALID_PARAMETER: the id names no process
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value != 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
