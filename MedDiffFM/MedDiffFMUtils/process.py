"""Run one `python -m MedDiffFMLib TASK ...` job as a separate process and follow it.

The job runs outside Slicer's Python so the GUI stays responsive and a cancel can kill it outright.
A reader thread moves the child's output lines into a queue; `poll()` drains the queue on the caller's
thread (the GUI calls it from a `qt.QTimer`, `wait()` calls it in a loop), turns
`MEDDIFFFM_PROGRESS <step> <total>` lines into progress callbacks and everything else into log lines.
Results are imported only after the process has succeeded, so a failed or cancelled job adds nothing
to the scene; the job's temporary folder is always removed.
"""
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

from .library import libraryRoot
from .tasks import inSlicerTerms

libraryRoot()  # makes MedDiffFMLib importable when the module runs from the source tree
from MedDiffFMLib.commands._common import PROGRESS_PREFIX  # noqa: E402  (the CLI's side of the protocol)

_END_OF_OUTPUT = None  # queue marker: the child closed its output


def parseProgressLine(line):
    """Return (step, total) for a `MEDDIFFFM_PROGRESS <step> <total>` line, else None."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != PROGRESS_PREFIX:
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


class TimeLeft:
    """Time left of a job from its progress reports, counted from the first report: model loading and
    set-up come before it and would make the first steps look slow."""

    def __init__(self):
        self._first = None  # (step, seconds) of the first report

    def text(self, step, total, now=None):
        """'about N min left' (or seconds), or '' until two reports a step apart have been seen."""
        now = time.monotonic() if now is None else now
        if self._first is None:
            self._first = (step, now)
            return ""
        stepsDone, elapsed = step - self._first[0], now - self._first[1]
        if stepsDone <= 0 or elapsed <= 0:
            return ""
        seconds = (total - step) * elapsed / stepsDone
        return f"about {seconds:.0f} s left" if seconds < 90 else f"about {seconds / 60:.0f} min left"


_LESS_MEMORY = "try a smaller window batch or a crop of the CT"
#: What the status codes a Windows process most often ends with, when no message of its own can say, mean.
_WINDOWS_STATUS = {
    0xC0000005: "an access violation: a crash inside a compiled library",
    0xC000001D: "an illegal instruction: a compiled library needs an instruction this CPU lacks",
    0xC0000017: f"out of memory; {_LESS_MEMORY}",
    0xC00000FD: "a stack overflow",
    0xC000013A: "interrupted: Ctrl+C, or its console was closed",
    0xC0000135: "a DLL was not found: reinstall PyTorch, or the library the output names",
    0xC0000409: "a fast fail: a compiled library stopped the process",
}


def errorMessageFromOutput(lines, returnCode):
    """The message to show for a failed run: the CLI's `error: ...` line (or argparse's `prog: error: ...`), with the
    Slicer names of the options it suggests, else the last output lines."""
    for line in reversed(lines):
        if line.startswith("error:"):
            return inSlicerTerms(line[len("error:"):].strip())
        if line.startswith("python -m MedDiffFMLib") and ": error: " in line:
            return inSlicerTerms(line.split(": error: ", 1)[1].strip())
    tail = "\n".join(lines[-15:]).strip()
    if returnCode < 0:  # POSIX: ended by a signal, which no message of the job's own can say
        ended = f"MedDiffFMLib was killed by signal {-returnCode}"
        if -returnCode == 9:
            ended += f" (SIGKILL: often the system running out of memory; {_LESS_MEMORY})"
    elif returnCode >= 0x80000000:  # Windows: a status code, such as 0xC0000005, which reads in hexadecimal
        meaning = _WINDOWS_STATUS.get(returnCode)
        ended = f"MedDiffFMLib ended with status 0x{returnCode:08X}" + (f" ({meaning})" if meaning else "")
    else:
        ended = f"MedDiffFMLib exited with code {returnCode}"
    return ended + (f":\n{tail}" if tail else " and printed nothing.")


class TaskFailed(RuntimeError):
    """The command line job failed; the message is the job's own error message."""

    def __init__(self, message, returnCode):
        super().__init__(message)
        self.returnCode = returnCode


class TaskCancelled(RuntimeError):
    """The job was cancelled by the user; nothing was added to the scene."""


# The job runs in its own process group (POSIX: a new session), so a cancel reaches everything it started:
# inside Slicer the started process is the PythonSlicer launcher and the job is its child. Windows: no console
# window beside Slicer's.
if sys.platform == "win32":
    # Two distinct bits, added: vermin reads `a | b` of unknown types as a 3.10 union type.
    _GROUP_OPTIONS = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP + subprocess.CREATE_NO_WINDOW}
else:
    _GROUP_OPTIONS = {"start_new_session": True}


#: Seconds cancel() waits for the killed job's process to exit.
CANCEL_WAIT_S = 5.0


def killProcessTree(process):
    """Kill a job started by TaskRun and everything it started (launcher child, workers, data loaders)."""
    try:
        if sys.platform == "win32":
            done = subprocess.run(["taskkill", "/PID", str(process.pid), "/T", "/F"], capture_output=True,
                                  creationflags=subprocess.CREATE_NO_WINDOW)
            if done.returncode == 0:
                return
        else:
            import signal

            os.killpg(process.pid, signal.SIGKILL)  # the group of a new session has the leader's pid
            return
    except ProcessLookupError:  # already gone
        return
    except OSError:  # e.g. no permission on the group: at least the job's own process goes
        pass
    if process.poll() is None:
        process.kill()


class TaskRun:
    """One command line job: start(), then poll() until it returns True, or wait().

    `importResults()` is called on the polling thread after a successful exit and its return value
    becomes `result`; `workDir` (the job's temporary folder) is deleted when the job ends.
    """

    def __init__(self, command, workDir, importResults, env=None, cwd=None,
                 logCallback=None, progressCallback=None):
        self.command = [str(part) for part in command]
        self.workDir = workDir
        self.importResults = importResults
        self.env = env
        self.cwd = cwd
        self.logCallback = logCallback
        self.progressCallback = progressCallback
        self.outputLines = []
        self.result = None
        self.error = None
        self.finished = False
        self._cancelRequested = False
        self._process = None
        self._reader = None
        self._lines = queue.Queue()

    def start(self):
        if self.finished:  # cancelled before it started: nothing runs
            return self
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive while the job runs, not at exit
        env["PYTHONIOENCODING"] = "utf-8"  # as this side decodes (Windows would write its code page)
        self._process = subprocess.Popen(
            self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # one stream keeps messages in order
            text=True, encoding="utf-8", errors="replace", bufsize=1, **_GROUP_OPTIONS)
        self._reader = threading.Thread(target=self._readOutput, name="MedDiffFM output reader", daemon=True)
        self._reader.start()
        return self

    @property
    def running(self):
        """True from start() until the job's process exits (its results may still wait for poll())."""
        return self._process is not None and self._process.poll() is None

    def _readOutput(self):
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._process.stdout.close()
        self._lines.put(_END_OF_OUTPUT)

    def cancel(self):
        """Stop the job and finish it with a TaskCancelled error: its results are not imported, also when its
        process had already ended, and its folder is removed. Returns once the job's process has exited (a killed
        process goes at once; waiting is bounded by CANCEL_WAIT_S, after which the next poll() finishes it), so the
        next job can start right away."""
        if self.finished:
            return
        self._cancelRequested = True
        if self._process is None:  # never started
            self._finish(None)
            return
        # POSIX: the group is signalled while any of its processes lives (they hold the output pipe): inside Slicer
        # the started launcher may be gone while the job, its child, still runs. (Windows' taskkill /T needs the
        # launcher alive.)
        if self._process.poll() is None or self._reader.is_alive():
            killProcessTree(self._process)
        deadline = time.monotonic() + CANCEL_WAIT_S
        try:
            returnCode = self._process.wait(timeout=CANCEL_WAIT_S)
        except subprocess.TimeoutExpired:
            return
        # The output ends once every process of the job has gone, so none can still write into the folder.
        self._reader.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self._reader.is_alive():
            self._finish(returnCode)

    def poll(self):
        """Handle the output that arrived; return True once the job has finished (see result/error)."""
        if self.finished:
            return True
        outputEnded = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is _END_OF_OUTPUT:
                outputEnded = True
                break
            self._handleLine(line)
        if outputEnded:
            self._finish(self._process.wait())
        return self.finished

    def wait(self, pollInterval=0.1, handleEvents=True):
        """Block until the job ends; return the imported result or raise its error. Inside Slicer (a call from
        the Python console) the application keeps handling events meanwhile (`handleEvents`): the views, the
        log and the progress stay live."""
        application = getattr(sys.modules.get("slicer"), "app", None) if handleEvents else None
        try:
            while not self.poll():
                if application is not None:
                    application.processEvents()
                time.sleep(pollInterval)
        except BaseException:
            # A failing callback or Ctrl-C must not leave the job running unwatched, holding the one-job slot,
            # with the exported CT in its folder.
            self.cancel()
            raise
        if self.error is not None:
            raise self.error
        return self.result

    def _handleLine(self, line):
        progress = parseProgressLine(line)
        if progress is not None:
            if self.progressCallback:
                self.progressCallback(*progress)
            return
        self.outputLines.append(line)
        if self.logCallback:
            self.logCallback(line)

    def _finish(self, returnCode):
        try:
            if self._cancelRequested:
                self.error = TaskCancelled("Cancelled; the scene was left unchanged.")
            elif returnCode != 0:
                self.error = TaskFailed(errorMessageFromOutput(self.outputLines, returnCode), returnCode)
            else:
                try:
                    self.result = self.importResults()
                except Exception as exc:  # reported like a job failure; the caller re-raises it
                    self.error = exc
        finally:
            shutil.rmtree(self.workDir, ignore_errors=True)
            self.finished = True


def pythonExecutable():
    """The Python that runs jobs: PythonSlicer inside Slicer (whose sys.executable is the app), else this one."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable
