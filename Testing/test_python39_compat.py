"""MedDiffFMLib must stay importable in Slicer 5.6/5.8, which embed Python 3.9: checked with vermin."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

# vermin ships no `__main__`; this runs its console entry point with the test's interpreter.
VERMIN = [sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())"]
# `X | Y` unions are off by default in vermin; Slicer's parameter-node annotations are evaluated at runtime.
ARGS = ["--target=3.9-", "--violations", "--no-tips", "--eval-annotations", "--feature", "union-types"]


def run_vermin(path):
    return subprocess.run(VERMIN + ARGS + [str(path)], capture_output=True, text=True, timeout=300)


def test_library_needs_at_most_python_3_9():
    done = run_vermin(REPO / "MedDiffFMLib")
    assert done.returncode == 0, f"Python > 3.9 features in MedDiffFMLib:\n{done.stdout}\n{done.stderr}"


def test_vermin_check_catches_newer_syntax(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("def f(x):\n    match x:\n        case 1:\n            return 1\n")
    done = run_vermin(newer)
    assert done.returncode != 0 and "pattern matching requires" in done.stdout


def test_vermin_check_catches_union_annotations(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("class Parameters:\n    segment: str | None = None\n")
    done = run_vermin(newer)
    assert done.returncode != 0 and "union types" in done.stdout
