"""The benchmark scripts run end to end at toy sizes (their numbers are measured elsewhere, not asserted)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import LIMB_NII

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def denoise_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # spawned children import the script by name too
    import denoise_speed

    yield denoise_speed
    sys.modules.pop("denoise_speed", None)


def test_denoise_speed_prints_one_row_per_configuration(denoise_speed, capsys):
    # The whole limb slice (with the air around it, so it passes the CT check), 8 slices.
    argv = ["--input", str(LIMB_NII), "--preset", "tiny", "--size", "198", "202", "8", "--nfe", "1",
            "--window-batch", "8", "--memory-format", "contiguous", "channels_last", "--device", "cpu"]
    assert denoise_speed.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2
    assert {row.split("|")[5].strip() for row in rows} == {"contiguous", "channels_last"}
    assert all(float(row.split("|")[8]) > 0 for row in rows)  # seconds
