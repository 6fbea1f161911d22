"""experiments/hns.py: the human-normalised score of runs, from the charts/episodic_return of their TensorBoard files."""

import glob
import os
import subprocess
import sys

import pytest
from conftest import REPO
from torch.utils.tensorboard import SummaryWriter

HNS = os.path.join(REPO, "experiments", "hns.py")


def hns(*args, cwd):
    return subprocess.run([sys.executable, HNS, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def fake_run(cwd, name, returns):
    """A run directory whose TensorBoard file holds these full-game returns, one per step."""
    writer = SummaryWriter(str(cwd / "runs" / name))
    for step, value in enumerate(returns):
        writer.add_scalar("charts/episodic_return", value, step)
    writer.close()
    return f"runs/{name}"


def test_hns_of_the_last_games_with_the_official_random_and_human_scores(tmp_path):
    """Breakout (random 1.7, human 30.5) and Pong (-20.7, 14.6), as the official utils/scores.py; the id forms
    XNoFrameskip-v4, X-v5 and ALE_X-v5 (the run directory's form of ALE/X-v5)."""
    breakout = fake_run(tmp_path, "BreakoutNoFrameskip-v4__deepspi_atari__1__100", [100.0, 2.0, 4.0, 9.0])
    pong = fake_run(tmp_path, "ALE_Pong-v5__deepspi_atari__1__100", [-21.0, -19.0])
    proc = hns(breakout, pong, "--last", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[1]: line.split(" | ")[2:] for line in proc.stdout.splitlines()[2:]}
    assert rows["Breakout"][:2] == ["3", "5.0"]  # the mean of the last 3 games
    assert float(rows["Breakout"][2].rstrip(" |")) == pytest.approx((5.0 - 1.7) / (30.5 - 1.7), abs=5e-4)
    assert float(rows["Pong"][2].rstrip(" |")) == pytest.approx((-20.0 + 20.7) / (14.6 + 20.7), abs=5e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs/missing"], "no run directory runs/missing"),
        (["{cartpole}"], "not an Atari run of the 57 games"),
        (["{empty}"], "has no charts/episodic_return"),
        (["{empty}", "{interrupted}"], "no run has a finished game"),
        (["{breakout}", "--last", "0"], "--last 0 must be positive"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    names = dict(
        cartpole=fake_run(tmp_path, "CartPole-v1__ppo__1__100", [1.0]),
        empty=fake_run(tmp_path, "Breakout-v5__deepspi_atari__1__100", []),
        breakout=fake_run(tmp_path, "Breakout-v5__deepspi_atari__2__100", [3.0]),
        interrupted="runs/Breakout-v5__deepspi_atari__3__100",
    )
    os.makedirs(tmp_path / names["interrupted"])
    proc = hns(*[a.format(**names) for a in args], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert message in line


def test_a_run_without_a_finished_game_is_left_out_with_a_note(tmp_path):
    """A glob over the seeds of a run that also matches the empty folder of an interrupted start and a run that has not
    finished a game yet: both are left out with a note on stderr each, and the table holds the finished run."""
    finished = fake_run(tmp_path, "BreakoutNoFrameskip-v4__deepspi_atari__1__100", [4.0, 6.0])
    started = fake_run(tmp_path, "BreakoutNoFrameskip-v4__deepspi_atari__2__100", [])
    os.makedirs(tmp_path / "runs" / "BreakoutNoFrameskip-v4__deepspi_atari__3__100")  # interrupted before any file
    matched = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "runs" / "*__deepspi_atari__*")))
    assert len(matched) == 3
    proc = hns(*matched, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0] == "| run | game | games | score | HNS |" and len(table) == 3
    assert table[2].startswith(f"| {os.path.basename(finished)} | Breakout | 2 | 5.0 | ")
    notes = proc.stderr.splitlines()
    assert notes == [
        f"note: {run} has no finished game (no charts/episodic_return): left out"
        for run in (started, "runs/BreakoutNoFrameskip-v4__deepspi_atari__3__100")
    ]
