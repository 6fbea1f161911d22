"""benchmarks/first_run.py: bad input is refused in one line with exit code 2 before any run (the runs themselves are
the benchmark: figures printed, never asserted)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

TOOL = os.path.join(REPO, "benchmarks", "first_run.py")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--atari-iterations", "0"], "--atari-iterations must be >= 1"),
        (["--markdown", "plain.md"], "--markdown plain.md needs the lines <!-- benchmarks/first_run.py -->"),
    ],
)
def test_bad_input_one_line_exit_2_before_any_run(tmp_path, flags, message):
    (tmp_path / "plain.md").write_text("no markers\n")
    proc = subprocess.run([sys.executable, TOOL, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["plain.md"]  # nothing ran, nothing written
