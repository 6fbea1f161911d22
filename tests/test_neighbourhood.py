"""--enforce-neighbourhood through the real CLI: the update epochs stop at the end of the epoch in which a minibatch's
importance ratio (measured before that minibatch's step) left [2 - C, C], C = 1 + clip_coef. So a run with the flag is,
iteration for iteration, the run whose --update-epochs is the epoch that left the band: its logged charts/sir is that
run's, which can exceed C by what that last epoch moved the policy (the check sees each sample's ratio once per epoch,
before the later steps of the epoch)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, checkpoint_path, only_run_dir, read_scalars, run_script

MAZE = ["--num-envs", "16", "--num-steps", "8", "--seed", "1", "--clip-coef", "0.2"]  # 4 minibatches of 32
ATARI = ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "128", "--seed", "1"]
TIMING = {"charts/SPS"}  # the only scalar that depends on the wall clock


# the line of the maze's minibatch loop whose clip fractions the flag reads (any ratio outside the band: a fraction > 0)
DRIFT_LINE = "clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]"


def run(tmp_path, name, script, *flags):
    cwd = tmp_path / name
    cwd.mkdir()
    proc = run_script(script, *flags, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(cwd)


def results(cwd):
    saved = torch.load(checkpoint_path(cwd), weights_only=False)
    steps = {int(state["step"]) for state in saved["optimizer"]["state"].values()}  # Adam's step count: optimizer steps
    assert len(steps) == 1, steps
    scalars = read_scalars(only_run_dir(cwd))
    return {tag: values for tag, values in scalars.items() if tag not in TIMING}, steps.pop()


def drifts(tmp_path, name, *flags):
    """A maze run under tests/probe.py: its scalars, optimizer steps and {(iteration, epoch): max |ratio - 1| over the
    epoch's minibatches, each measured before its step}, the float32 numbers the flag compares with the clip."""
    cwd = tmp_path / name
    cwd.mkdir()
    lines = [[DRIFT_LINE, ["iteration", "epoch", "(ratio - 1.0).abs().max()"], None]]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PROBE_LINES=json.dumps(lines))
    probe, script = os.path.join(REPO, "tests", "probe.py"), os.path.join(REPO, "deepspi_maze.py")
    cmd = [sys.executable, probe, str(cwd / "record.pt"), "", script, "--no-progress", *flags]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = {}
    for record in torch.load(cwd / "record.pt", weights_only=False):
        key, value = (record["args"]["iteration"], record["args"]["epoch"]), record["args"]["(ratio - 1.0).abs().max()"]
        epochs[key] = max(epochs.get(key, value), value)
    return *results(cwd), epochs


def left_band(drift, clip_coef):
    """Whether max |ratio - 1| left [0, clip], in float32 as the script compares it (the Python float clip_coef is rounded
    to float32 for the comparison with the float32 tensor)."""
    return bool(np.float32(drift) > np.float32(clip_coef))


def test_maze_stops_after_the_epoch_that_left_the_band(tmp_path):
    """One iteration (the same batch in every run): the flagged 4-epoch update equals, scalar for scalar, the unflagged
    update of k* epochs, k* the first epoch count whose minibatch ratios left the band; here k* < 4, so it stops early
    (k* x 4 optimizer steps, not 16), and its logged SIR is the k*-epoch run's: C plus at most that last epoch's drift."""
    one_batch = [*MAZE, "--total-timesteps", "128"]
    epochs = {k: run(tmp_path, f"epochs{k}", "deepspi_maze.py", *one_batch, "--update-epochs", str(k)) for k in (1, 2, 3)}
    *epochs[4], drift = drifts(tmp_path, "epochs4", *one_batch, "--update-epochs", "4")  # epoch e's drift: any k >= e
    flagged, steps = run(tmp_path, "flagged", "deepspi_maze.py", *one_batch, "--enforce-neighbourhood")
    k_star = next(k for k in (1, 2, 3, 4) if left_band(drift[1, k - 1], 0.2) or k == 4)
    assert 1 < k_star < 4, f"the band should be left after the first epoch and before the last: k* = {k_star}"
    assert steps == 4 * k_star and epochs[4][1] == 16
    assert flagged == epochs[k_star][0]
    assert flagged != epochs[4][0]
    sir = {k: epochs[k][0]["charts/sir"][0] for k in epochs}
    print(f"C = 1.2; SIR after k epochs: {sir}; k* = {k_star}; with the flag: {flagged['charts/sir'][0]}")
    # here the SIR after the last epoch inside the band is at most C, so the logged one exceeds C by at most one epoch's
    # drift (in general the in-band check, made before each minibatch's step, does not bound the SIR after the epoch)
    assert sir[k_star - 1] <= 1.2 and flagged["charts/sir"][0] - 1.2 <= sir[k_star] - sir[k_star - 1]


def test_maze_flag_changes_nothing_while_the_ratio_stays_in_the_band(tmp_path):
    """A clip so wide (C = 1.9) that the ratio never leaves the band: the flagged run is the unflagged one, exactly."""
    flags = [*MAZE[:-2], "--clip-coef", "0.9", "--total-timesteps", "512"]
    plain, plain_steps, drift = drifts(tmp_path, "plain", *flags)
    flagged, flagged_steps = run(tmp_path, "flagged", "deepspi_maze.py", *flags, "--enforce-neighbourhood")
    assert len(drift) == 4 * 4 and not any(left_band(d, 0.9) for d in drift.values())
    assert flagged == plain and flagged_steps == plain_steps == 4 * 4 * 4


@pytest.mark.parametrize("script", ["deepspi_atari.py"])
def test_atari_tiny_clip_stops_after_one_epoch(tmp_path, script):
    """clip-coef 1e-4: the first minibatch's step already moves the ratio out of [1 - 1e-4, 1 + 1e-4], so every
    iteration's update stops after its first epoch: the run is the --update-epochs 1 run, with a quarter of the steps."""
    flags = [*ATARI, "--clip-coef", "0.0001"]
    one_epoch, one_epoch_steps = run(tmp_path, "epochs1", script, *flags, "--update-epochs", "1")
    flagged, steps = run(tmp_path, "flagged", script, *flags, "--enforce-neighbourhood")
    iterations = len(flagged["charts/sir"])
    assert iterations == 2 and steps == one_epoch_steps == iterations * 4  # 4 minibatches, 1 of the 4 epochs
    assert flagged == one_epoch
