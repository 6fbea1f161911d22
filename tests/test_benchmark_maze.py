"""benchmarks/maze.py: bad input is refused in one line with exit code 2 before any run, and a small run through the real
CLI prints both modes, their ratios and the world model's parts of the DeepSPI update with their per-sample floor, and
writes its block into --markdown. The times themselves are the benchmark: printed, never asserted."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

TOOL = os.path.join(REPO, "benchmarks", "maze.py")
BEGIN, END = "<!-- benchmarks/maze.py -->", "<!-- /benchmarks/maze.py -->"


def run_tool(cwd, *flags):
    return subprocess.run([sys.executable, TOOL, *flags], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--modes", "deepspi", "sac"], "--modes: unknown sac"),
        (["--repeats", "0"], "need --repeats >= 1"),
        (["--total-timesteps", "100"], "--total-timesteps >= 1024"),
        (["--markdown", "missing.md"], "--markdown missing.md: no such file"),
        (["--markdown", "plain.md"], "--markdown plain.md: the lines"),
        (["--n", "ten"], "argument --n: invalid int value"),
    ],
)
def test_bad_input_one_line_exit_2_before_any_run(tmp_path, flags, message):
    (tmp_path / "plain.md").write_text("no markers\n")
    proc = run_tool(tmp_path, *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == "" and sorted(os.listdir(tmp_path)) == ["plain.md"]  # nothing ran, nothing written


def test_small_run_prints_both_modes_and_the_world_models_parts(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    proc = run_tool(tmp_path, "--n", "2", "--total-timesteps", "1024", "--repeats", "1", "--markdown", str(page))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[:4]] == ["| mode", "| deepspi", "| ppo", "| part"]
    assert rows[2].split(" | ")[3:] == ["1.00", "1.00 |"]  # PPO mode against itself
    # one batch of 128 x 8 steps: 4 epochs of 4 minibatches of 256 samples, each drawing 5 x 64 x 7 x 7 numbers a sample;
    # the maze with n = 2 has 2 n + 6 = 10 states
    assert "for the run's 16 minibatch updates (each timed per minibatch of 256 samples of the 10 maze states" in proc.stdout
    assert "256 x 5 x 64 x 7 x 7 noise numbers a minibatch" in proc.stdout
    parts = [
        row.split(" | ")[0][2:] for row in proc.stdout.splitlines() if row.startswith("| the") or row.startswith("| floor")
    ]
    assert parts == [
        "the transition head, forward and backward",
        "the reward head, forward and backward",
        "floor: drawing the clipped noise",
        "floor: the weighted sum of the scaled noise, forward and backward",
        "the floor, both parts",
    ]
    text = page.read_text()
    assert text.startswith(f"before\n{BEGIN}\n| mode |") and text.endswith(f"\n{END}\nafter\n") and "old" not in text
    assert "| the floor, both parts |" in text


def test_no_floor_without_both_a_deepspi_mode_and_ppo_mode(tmp_path):
    proc = run_tool(tmp_path, "--n", "2", "--total-timesteps", "1024", "--repeats", "1", "--modes", "ppo")
    assert proc.returncode == 0, proc.stderr
    assert "| ppo |" in proc.stdout and "floor" not in proc.stdout
