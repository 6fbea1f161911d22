"""benchmarks/maze.py: bad input is refused in one line with exit code 2 before any run, and a small run through the real
CLI prints both modes, their ratios and the world model's parts of the DeepSPI update with their per-sample floor, and
writes its block into --markdown. The times themselves are the benchmark: printed, never asserted."""

import importlib.util
import os
import re
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
        (["--modes", "deepspi", "ppo", "deepspi"], "--modes: each mode once"),
        (["--markdown", "reversed.md"], "--markdown reversed.md: the lines"),
    ],
)
def test_bad_input_one_line_exit_2_before_any_run(tmp_path, flags, message):
    (tmp_path / "plain.md").write_text("no markers\n")
    (tmp_path / "reversed.md").write_text(f"{END}\n{BEGIN}\n")
    proc = run_tool(tmp_path, *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == "" and sorted(os.listdir(tmp_path)) == ["plain.md", "reversed.md"]  # nothing ran, nothing written


def test_minibatch_updates_count_full_batches_of_16_optimizer_steps():
    spec = importlib.util.spec_from_file_location("benchmark_maze", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # 128 envs x 8 steps = 1024 a batch, 4 epochs x 4 minibatches = 16 steps a batch; a part batch is not run
    assert [module.minibatch_updates(t) for t in (1023, 1024, 2047, 2048, 40960)] == [0, 16, 16, 32, 640]


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
    # the parts table's values: each ratio is its seconds over PPO mode's time, the floor the sum of its two parts, and the
    # room that a ratio of 2 leaves is PPO mode's time less the floor (each printed value rounded: 0.05 s, 0.005)
    ppo = float(re.search(r"PPO mode's median wall time \((\d+\.\d) s\)", proc.stdout).group(1))
    table = {row.split(" | ")[0][2:]: row[:-2].split(" | ")[1:] for row in proc.stdout.splitlines() if " | " in row}
    for name in parts:
        seconds, ratio = map(float, table[name])
        assert seconds > 0 and abs(ratio - seconds / ppo) <= 0.005 + 0.05 / (ppo - 0.05) * (1 + ratio), (
            name,
            seconds,
            ratio,
            ppo,
        )
    floor = float(table["the floor, both parts"][0])
    assert abs(floor - float(table[parts[2]][0]) - float(table[parts[3]][0])) <= 0.1 + 1e-9
    room = float(re.search(r"A DeepSPI/PPO ratio of 2 would leave (-?\d+\.\d) s", proc.stdout).group(1))
    assert abs(room - (ppo - floor)) <= 0.1 + 1e-9


def test_no_parts_without_both_the_deepspi_and_ppo_modes(tmp_path):
    proc = run_tool(tmp_path, "--n", "2", "--total-timesteps", "1024", "--repeats", "1", "--modes", "ppo")
    assert proc.returncode == 0, proc.stderr
    assert "| ppo |" in proc.stdout and "floor" not in proc.stdout
