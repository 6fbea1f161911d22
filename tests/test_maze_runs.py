"""deepspi_maze.py: runs that survive faults and can be evaluated (checkpoints, exact resume after SIGTERM and kill -9,
a non-finite loss, evaluation with the exact V^pi, video). Real CLI runs on the n=2 maze with budgets of tiny batches."""

import csv
import glob
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, checkpoint_path, error_lines, f32_tol, only_run_dir, read_scalars, run_script

import deepspi_maze as M

SCRIPT = os.path.join(REPO, "deepspi_maze.py")
TINY = ["--n", "2", "--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1"]
TINY += ["--total-timesteps", "768", "--num-threads", "1"]  # 12 iterations of 64 steps
EVAL = ["--eval-episodes", "3"]
# a fault injector that is not part of the script: it patches torch or tqdm, then runs deepspi_maze.py as `python` would
DRIVER = """
import os, runpy, signal, sys
import torch.nn.functional as F
import tqdm

if os.environ["FAULT"] == "nan":  # the transition loss turns NaN at minibatch 4 (iteration 2, minibatch 2)
    smooth_l1_loss, calls = F.smooth_l1_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1  # two calls per minibatch: reward, then transition
        return smooth_l1_loss(*args, **kwargs) * (float("nan") if calls[0] >= 8 and calls[0] % 2 == 0 else 1.0)

    F.smooth_l1_loss = poisoned
if os.environ["FAULT"] == "kill":  # kill -9 once iteration 5 is in progress.csv (the bar advances after the row)
    update, calls = tqdm.tqdm.update, [0]

    def killed(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return update(self, *args, **kwargs)

    tqdm.tqdm.update = killed
sys.argv = [os.environ["SCRIPT"], *sys.argv[1:]]
runpy.run_path(os.environ["SCRIPT"], run_name="__main__")
"""


def run(*flags, cwd, fault="", **env):
    """Run the script (through the fault driver if fault is set) with extra environment variables."""
    script = SCRIPT
    if fault:
        script = cwd / "driver.py"
        script.write_text(DRIVER)
    cmd = [sys.executable, str(script), "--no-progress", *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=SCRIPT, FAULT=fault, **env)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def progress_rows(run_dir):
    with open(os.path.join(run_dir, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(run_dir, uninterrupted):
    """Every scalar and every progress.csv value of the two runs is equal, except the wall-clock columns."""
    scalars, expected = read_scalars(run_dir), uninterrupted[1]
    assert set(scalars) == set(expected)
    for tag in sorted(expected):
        if tag != "charts/SPS":
            assert scalars[tag] == expected[tag], tag
    rows, expected_rows = progress_rows(run_dir), progress_rows(uninterrupted[0])
    assert len(rows) == len(expected_rows) == 12
    for row, expected_row in zip(rows, expected_rows, strict=True):
        assert {k: v for k, v in row.items() if k not in ("wall_s", "SPS")} == {
            k: v for k, v in expected_row.items() if k not in ("wall_s", "SPS")
        }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 12-iteration run without interruption, evaluated after training; its final checkpoint and model serve the
    round-trip, evaluation and bad-flag tests. Returns (run dir, scalars, stdout)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = run_script("deepspi_maze.py", *TINY, *EVAL, "--checkpoint-every", "100", "--save-model", cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    assert sorted(os.listdir(run_dir))[:2] == ["checkpoint.pt", "deepspi_maze.cleanrl_model"]  # no temp files left
    return run_dir, read_scalars(run_dir), proc.stdout


# ------------------------------------------------------------------------------------------------------ in-process
def test_checkpoint_round_trip(tmp_path, uninterrupted):
    """The run's checkpoint loads into a fresh agent, Adam and maze env; saved again atomically it is the same, and the
    restored env (cells, step counters, numpy generator) has the same future as the original."""
    saved = torch.load(os.path.join(uninterrupted[0], "checkpoint.pt"), weights_only=False)
    assert saved["iteration"] == 12 and saved["global_step"] == 768 and saved["args"]["n"] == 2
    assert saved["next_obs"].shape == (8, 1, 84, 84) and saved["episode_returns"].shape == (8,)
    agent = M.Agent(4)
    agent.load_state_dict(saved["model"])
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    optimizer.load_state_dict(saved["optimizer"])
    path = str(tmp_path / "checkpoint.pt")
    M.save_atomic({"model": agent.state_dict(), "optimizer": optimizer.state_dict()}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    loaded = torch.load(path, weights_only=False)
    for name, value in saved["model"].items():
        assert torch.equal(loaded["model"][name], value), name
    s1, s2 = saved["optimizer"]["state"], loaded["optimizer"]["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k][m], s2[k][m]) for k in s1 for m in s1[k])

    maze = M.ConfoundingMaze(2, 0.2, 0.99)
    envs = M.MazeVecEnv(maze, 64, seed=1)
    envs.reset()
    rng = np.random.default_rng(0)
    for _ in range(3):
        envs.step(rng.integers(0, 4, 64))
    M.save_atomic(envs.get_state(), path)
    actions = rng.integers(0, 4, (50, 64))  # branchings at @, terminal cells and time limits on the way
    expected = [envs.step(a) for a in actions]
    other = M.MazeVecEnv(maze, 64, seed=99)
    other.reset()
    other.set_state(torch.load(path, weights_only=False))
    for a, (obs, reward, term, trunc, _) in zip(actions, expected, strict=True):
        obs2, reward2, term2, trunc2, _ = other.step(a)
        assert np.array_equal(obs, obs2) and np.array_equal(reward, reward2)
        assert np.array_equal(term, term2) and np.array_equal(trunc, trunc2)
    assert sum(term.sum() for _, _, term, _, _ in expected) >= 1


def test_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "ConfoundingMaze-n5-eps0.2__x__1__5"
    assert [M.make_run_dir(name) for _ in range(3)] == [name, f"{name}_2", f"{name}_3"]
    assert M.make_run_dir(name, reuse=True) == name  # --resume goes on in its own directory


# --------------------------------------------------------------------------------------------------------- faults
def test_sigterm_checkpoints_then_resume_is_exact(tmp_path, uninterrupted):
    """SIGTERM during training (no periodic checkpoints): the iteration ends, the checkpoint is written, exit 143; the
    resumed run logs exactly what the uninterrupted one did, its evaluation included."""
    with open(tmp_path / "stderr.txt", "w") as err:
        cmd = [sys.executable, SCRIPT, "--no-progress", *TINY, "--checkpoint-every", "0"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / "runs" / "*" / "progress.csv")) or len(progress_rows(only_run_dir(tmp_path))) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended too early or timed out"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "SIGTERM after iteration" in stderr
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert 2 <= saved["iteration"] < 12 and saved["global_step"] == 64 * saved["iteration"]
    assert len(progress_rows(only_run_dir(tmp_path))) == saved["iteration"]
    resumed = run_script("deepspi_maze.py", "--resume", checkpoint_path(tmp_path), *EVAL, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after iteration {saved['iteration']}/12, with its arguments" in resumed.stdout
    assert_same_run(only_run_dir(tmp_path), uninterrupted)


def test_kill9_then_resume_drops_the_lost_iteration(tmp_path, uninterrupted):
    """kill -9 after iteration 5 was logged, with the last checkpoint at iteration 4: the resumed run drops the crashed
    run's iteration-5 row of progress.csv and hides its events, then logs them again as the uninterrupted run did."""
    proc = run(*TINY, "--checkpoint-every", "4", cwd=tmp_path, fault="kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert saved["iteration"] == 4 and len(progress_rows(only_run_dir(tmp_path))) == 5
    resumed = run_script("deepspi_maze.py", "--resume", checkpoint_path(tmp_path), *EVAL, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(only_run_dir(tmp_path), uninterrupted)


def test_nonfinite_loss_stops_with_one_line_and_a_checkpoint(tmp_path):
    proc = run(*TINY, cwd=tmp_path, fault="nan")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "non-finite transition and policy loss at iteration 2 (epoch 1, minibatch 2)" in line and "checkpoint.pt" in line
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert saved["iteration"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)  # iteration 1, then the failing one: nothing lost
    assert len(scalars["charts/learning_rate"]) == 2 and math.isnan(scalars["losses/transition_loss"][-1])
    rows = progress_rows(run_dir)
    assert len(rows) == 2 and rows[-1]["transition_loss"] == "nan" and math.isfinite(float(rows[-1]["init_value"]))


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--capture-video"], {}, "needs --eval-episodes N or --eval-only"),
        (["--resume", "missing.pt"], {}, "no such file missing.pt"),
        (["--resume", "{checkpoint}", "--learning-rate", "0.1", "--save-model"], {}, "--learning-rate (saved: 0.00025)"),
        (["--resume", "{model}"], {}, "is a saved model"),
        (["--eval-only", "{bogus}"], {}, "cannot read"),
        (["--resume", "{checkpoint}", "--eval-only", "{model}"], {}, "exclude each other"),
        ([], {"WORLD_SIZE": "2"}, "multi-process training (torchrun) is only in deepspi_atari.py"),
    ],
    ids=["video-without-eval", "missing", "conflicting-flag", "model-not-checkpoint", "not-a-model", "both", "torchrun"],
)
def test_bad_run_flags_exit_2_with_one_line(tmp_path, uninterrupted, flags, env, message):
    run_dir, bogus = uninterrupted[0], tmp_path / "bogus.pt"
    bogus.write_text("not a model")
    names = dict(checkpoint=f"{run_dir}/checkpoint.pt", model=f"{run_dir}/deepspi_maze.cleanrl_model", bogus=bogus)
    proc = run(*[f.format(**names) for f in flags], cwd=tmp_path, **env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "error" in line and message in line, proc.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------ evaluation
def tabular_policy(path, maze):
    """The (S, 4) action probabilities of the agent saved at path (a model or checkpoint) on every maze state."""
    agent = M.Agent(4)
    agent.load_state_dict(torch.load(path, weights_only=False)["model"])
    with torch.inference_mode():
        return agent.actor(agent.network(agent.encode(torch.as_tensor(maze.observations)))).softmax(-1).double().numpy()


def exact_values(model):
    """V^pi(s_I) of the saved agent's greedy and sampled tabular policies, computed here."""
    maze = M.ConfoundingMaze(2, 0.2, 0.99)
    pi = tabular_policy(model, maze)
    greedy = np.eye(4)[pi.argmax(1)]
    return {mode: M.policy_value(maze, p)[maze.initial_state] for mode, p in (("greedy", greedy), ("sampled", pi))}


def test_save_model_and_evaluation_after_training(uninterrupted):
    run_dir, scalars, stdout = uninterrupted
    model = os.path.join(run_dir, "deepspi_maze.cleanrl_model")
    saved = torch.load(model, weights_only=False)
    assert set(saved) == {"model", "args"} and saved["args"]["n"] == 2 and saved["args"]["eval_episodes"] == 3
    for mode, value in exact_values(model).items():
        assert f"eval, {mode} policy: " in stdout and f"exact V^pi(s_I) = {value:.4f} (V* = 2.7582)" in stdout
    assert stdout.count("over 3 episodes of ConfoundingMaze-n2-eps0.2") == 2
    assert len(scalars["eval/episodic_return"]) == len(scalars["eval/greedy_episodic_return"]) == 3
    assert len(scalars["charts/learning_rate"]) == 12


def test_eval_only_prints_and_logs_both_policies_and_records_videos(tmp_path, uninterrupted):
    from moviepy import VideoFileClip

    model = os.path.join(uninterrupted[0], "deepspi_maze.cleanrl_model")
    flags = ["--eval-only", model, "--eval-episodes", "2", "--seed", "5", "--capture-video"]
    proc = run_script("deepspi_maze.py", *flags, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode, value in exact_values(model).items():
        assert f"eval, {mode} policy: " in proc.stdout and " ± " in proc.stdout
        assert f"exact V^pi(s_I) = {value:.4f}" in proc.stdout
        (video,) = glob.glob(str(tmp_path / "videos" / "*__eval" / mode / "*.mp4"))
        clip = VideoFileClip(video)
        assert tuple(clip.size) == (336, 336) and clip.duration >= 1  # at least the 4 steps to a terminal cell, at 4 fps
        clip.close()
    assert proc.stdout.count("over 2 episodes") == 2
    scalars = read_scalars(only_run_dir(tmp_path))
    assert len(scalars["eval/episodic_return"]) == len(scalars["eval/greedy_episodic_return"]) == 2
    assert len(scalars["eval/init_value"]) == len(scalars["eval/greedy_init_value"]) == 1
    assert "charts/SPS" not in scalars  # no training


# ------------------------------------------------------------------------------------------- the loop's wiring
# tests/probe.py records every compute_losses call of a real CLI run. One env step per iteration, one minibatch and one
# epoch: each call is one iteration's whole batch, one row per env, and row e of iteration k is the step after row e of
# iteration k-1. 40 steps per env stay below the time limit (200), so an episode ends exactly when it reaches G, W or F.
WIRING = ["--n", "2", "--num-envs", "16", "--num-steps", "1", "--num-minibatches", "1", "--update-epochs", "1"]
WIRING += ["--total-timesteps", "640", "--no-anneal-lr", "--learning-rate", "1e-3", "--num-threads", "1"]


@pytest.fixture(scope="module", params=["default", "mask_next_done"])
def probed(request, tmp_path_factory):
    """A 40-iteration run (with --mask-next-done or not) under tests/probe.py. Returns (mode, calls' args, run dir)."""
    cwd = tmp_path_factory.mktemp(f"probed_{request.param}")
    flags = WIRING + (["--mask-next-done"] if request.param == "mask_next_done" else [])
    cmd = [sys.executable, os.path.join(REPO, "tests", "probe.py"), str(cwd / "calls.pt"), "compute_losses", SCRIPT]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([*cmd, "--no-progress", *flags], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [record["args"] for record in torch.load(cwd / "calls.pt", weights_only=False)]
    assert len(calls) == 40 and all(len(call["mb_obs"]) == 16 for call in calls)
    return request.param, calls, only_run_dir(cwd)


def maze_rows(maze, call):
    """Each row's (s, a, s') as maze states, read off the images (each state has its own observation)."""
    flat = maze.observations.reshape(maze.num_states, -1)

    def states(images):
        match = (images.numpy().reshape(len(images), 1, -1) == flat[None]).all(-1)
        assert (match.sum(1) == 1).all()
        return match.argmax(1)

    return states(call["mb_obs"]), call["mb_actions"].numpy(), states(call["mb_next_obs"])


def test_world_model_reset_mask_flags_the_episode_boundaries(probed):
    """The rows whose latent target is phi(s), not phi(s'): with --mask-next-done exactly the steps that reach a terminal
    cell (from the maze's tables); by default (official) the first steps of episodes, i.e. rows at s_I, as many in each
    iteration as the previous iteration had episode ends (none in the first: the run's first state is not a reset)."""
    mode, calls, _ = probed
    maze = M.ConfoundingMaze(2, 0.2, 0.99)
    previous_ends, total_ends = 0, 0
    for call in calls:
        s, a, s_next = maze_rows(maze, call)
        ends = maze.P[s, a] @ maze.is_terminal  # 1 where the step reaches G, W or F (never at random: @ only branches)
        assert set(ends) <= {0.0, 1.0} and (s_next[ends == 1] == maze.initial_state).all()  # the same-step reset
        mask = call["mb_wm_dones"].numpy()
        assert set(mask) <= {0.0, 1.0}
        if mode == "mask_next_done":
            np.testing.assert_array_equal(mask, ends)
        else:
            assert (s[mask == 1] == maze.initial_state).all() and mask.sum() == previous_ends
        previous_ends = ends.sum()
        total_ends += previous_ends
    assert total_ends >= 20  # the masks were put to the test


def test_sir_is_the_largest_importance_ratio_of_the_last_batch(probed):
    """charts/sir of the last iteration = max over its batch of pi'(a|s) / pi(a|s): pi' the saved final policy (on every
    maze state), pi(a|s) the rollout's probability of the row's action."""
    _, calls, run_dir = probed
    maze = M.ConfoundingMaze(2, 0.2, 0.99)
    pi_new = tabular_policy(os.path.join(run_dir, "checkpoint.pt"), maze)
    s, a, _ = maze_rows(maze, calls[-1])
    ratios = pi_new[s, a] / calls[-1]["mb_logprobs"].double().exp().numpy()
    sir = read_scalars(run_dir)["charts/sir"]
    # the script's float32 log-probabilities against this float32 recomputation: an absolute error in log pi' (normwise
    # on the logits' scale, the maze network's sums: conftest.f32_tol; twice through log-softmax) is a relative error of
    # the ratio
    rel = 2 * f32_tol(64 + 512 + 576 + 3136 + 512, 2) * np.abs(np.log(pi_new[s, a])).max()
    assert len(sir) == 40 and sir[-1] == pytest.approx(ratios.max(), rel=rel)
    assert ratios.max() - ratios.min() > 2 * rel * ratios.max()  # the max is told apart from any other statistic
