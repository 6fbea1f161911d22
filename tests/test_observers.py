"""tests/probe.py and tests/recorder.py observe the scripts' own lines and names. A student's edit that removes one must
fail with one line that names the line or the name, the script, and the test that observes it, before the run starts."""

import json
import os
import subprocess
import sys

from conftest import REPO

PROBE = os.path.join(REPO, "tests", "probe.py")
RECORDER = os.path.join(REPO, "tests", "recorder.py")


def edited_copy(tmp_path, old, new, script="deepspi_atari.py"):
    """A copy of the script with one piece of its text replaced (it must occur exactly once)."""
    with open(os.path.join(REPO, script)) as f:
        text = f.read()
    assert text.count(old) == 1, old
    path = tmp_path / script
    path.write_text(text.replace(old, new))
    return path


def run(cmd, tmp_path, **env):
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()  # it stopped before the run
    (line,) = proc.stderr.strip().splitlines()
    return line


def test_probe_names_an_edited_line_the_script_and_the_test(tmp_path):
    step = "optimizer.step()"
    script = edited_copy(tmp_path, f"                {step}\n", "                optimizer.step()  # edited\n")
    lines = json.dumps([[step, ["loss"], None]])
    line = run([sys.executable, PROBE, "record.pt", "", str(script), "--no-progress"], tmp_path, PROBE_LINES=lines)
    assert f"the line {step!r} is not in deepspi_atari.py" in line
    assert "tests/test_observers.py::test_probe_names_an_edited_line_the_script_and_the_test observes it" in line


def test_probe_names_a_renamed_function(tmp_path):
    script = edited_copy(tmp_path, "def spectral_sigma(", "def spectral_norm(")
    script.write_text(script.read_text().replace("spectral_sigma(", "spectral_norm("))
    line = run([sys.executable, PROBE, "record.pt", "spectral_sigma:12", str(script), "--no-progress"], tmp_path)
    assert "the function 'spectral_sigma' is not in deepspi_atari.py" in line
    assert "test_probe_names_a_renamed_function observes it" in line


def test_recorder_names_a_renamed_loop_variable(tmp_path):
    script = edited_copy(tmp_path, "mb_inds = b_inds[start:end]", "minibatch = b_inds[start:end]")
    script.write_text(script.read_text().replace("[mb_inds]", "[minibatch]"))
    line = run([sys.executable, RECORDER, "record.pt", str(script), "--no-progress"], tmp_path)
    assert "the variable 'mb_inds' is not in deepspi_atari.py" in line
    assert "test_recorder_names_a_renamed_loop_variable observes it" in line
