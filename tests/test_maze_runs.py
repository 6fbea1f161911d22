"""deepspi_maze.py: runs that survive faults (checkpoints, resume after SIGTERM and kill -9, a non-finite loss, bad
run flags) and the wiring of the training loop (the loss it trains on, the reset mask, SIR). Real CLI runs on the n=2
maze with budgets of tiny batches."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import REPO, checkpoint_path, error_lines, f32_tol, only_run_dir, read_scalars, run_script
from deepspi_reference import minibatch_from_storage, reference_loss

import deepspi_maze as M

SCRIPT = os.path.join(REPO, "deepspi_maze.py")
PROBE = os.path.join(REPO, "tests", "probe.py")
TINY = ["--n", "2", "--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1"]
TINY += ["--total-timesteps", "768"]  # 12 iterations of 64 steps
# a fault injector that is not part of the script: it patches torch or TensorBoard, then runs deepspi_maze.py as `python`
# would
DRIVER = """
import os, runpy, signal, sys
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

if os.environ["FAULT"] == "nan":  # the transition loss turns NaN at minibatch 4 (iteration 2, minibatch 2)
    smooth_l1_loss, calls = F.smooth_l1_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1  # two calls per minibatch: reward, then transition
        return smooth_l1_loss(*args, **kwargs) * (float("nan") if calls[0] >= 8 and calls[0] % 2 == 0 else 1.0)

    F.smooth_l1_loss = poisoned
if os.environ["FAULT"] == "kill":  # kill -9 once iteration 5 is on disk (the writer is flushed once per iteration)
    flush, calls = SummaryWriter.flush, [0]

    def killed(self):
        flush(self)
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    SummaryWriter.flush = killed
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
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def probe(cwd, lines, *flags):
    """Run the script under tests/probe.py, recording the given inline lines (PROBE_LINES); returns the records."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PROBE_MODULES="1", PROBE_LINES=json.dumps(lines))
    cmd = [sys.executable, PROBE, str(cwd / "record.pt"), "", SCRIPT, "--no-progress", *flags]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, torch.load(cwd / "record.pt", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 12-iteration run without interruption; its final checkpoint and model serve the round-trip and bad-flag tests.
    Returns (run dir, scalars)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = run_script("deepspi_maze.py", *TINY, "--checkpoint-every", "100", "--save-model", cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    assert sorted(os.listdir(run_dir))[:2] == ["checkpoint.pt", "deepspi_maze.cleanrl_model"]  # no temp files left
    return run_dir, read_scalars(run_dir)


# ------------------------------------------------------------------------------------------------------ in-process
def test_checkpoint_round_trip(tmp_path, uninterrupted):
    """The run's checkpoint loads into a fresh agent and Adam; saved again atomically it is the same."""
    saved = torch.load(os.path.join(uninterrupted[0], "checkpoint.pt"), weights_only=False)
    assert saved["iteration"] == 12 and saved["global_step"] == 768 and saved["args"]["n"] == 2
    assert saved["last_returns"].shape == (8,)
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


def test_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "ConfoundingMaze-n5-eps0.2__x__1__5"
    assert [M.make_run_dir(name) for _ in range(3)] == [name, f"{name}_2", f"{name}_3"]
    assert M.make_run_dir(name, reuse=True) == name  # --resume goes on in its own directory


# --------------------------------------------------------------------------------------------------------- faults
def resume(checkpoint, cwd, *flags):
    """--resume through tests/probe.py, recording the weights and the Adam state before the resumed run's first step."""
    lines = [["obs[step] = next_obs", ["agent", "optimizer.state_dict()", "global_step"], 1]]
    proc, records = probe(cwd, lines, "--resume", checkpoint, *flags)
    return proc, records[0]["args"]


def assert_resumed_from(saved, run_dir, uninterrupted, first):
    """The resumed run went on from the checkpoint: its first step acted with the checkpoint's weights and Adam state,
    its Adam step counts went on from the checkpoint's (12 iterations x 2 minibatches in all), it logged each iteration
    once (the crashed run's events after the checkpoint were purged), with the steps and learning rates of the
    uninterrupted run, and everything logged up to the checkpoint is the uninterrupted run's."""
    assert first["global_step"] - 8 == saved["global_step"] == 64 * saved["iteration"]  # the first step's 8 envs counted
    assert all(torch.equal(first["agent"][k], v) for k, v in saved["model"].items())
    adam, adam_saved = first["optimizer.state_dict()"]["state"], saved["optimizer"]["state"]
    assert adam.keys() == adam_saved.keys() and all(torch.equal(adam[k][m], adam_saved[k][m]) for k in adam for m in adam[k])
    final = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert {state["step"].item() for state in final["optimizer"]["state"].values()} == {12 * 2}
    resumed, k = read_scalars(run_dir), saved["iteration"]
    assert resumed["charts/learning_rate"] == uninterrupted["charts/learning_rate"]
    for tag in ("losses/value_loss", "losses/policy_loss", "charts/sir", "charts/init_value", "charts/repr_dist"):
        assert len(resumed[tag]) == 12 and resumed[tag][:k] == uninterrupted[tag][:k], tag


def test_sigterm_checkpoints_then_resume_goes_on_from_the_checkpoint(tmp_path, uninterrupted):
    """SIGTERM during training (no periodic checkpoints): the iteration ends, the checkpoint is written, exit 143; the
    resumed run goes on from it, with new episodes (and, given --checkpoint-every 10, a checkpoint at its end)."""
    with open(tmp_path / "stderr.txt", "w") as err:
        cmd = [sys.executable, SCRIPT, "--no-progress", *TINY, "--checkpoint-every", "0"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    logged = lambda: len(read_scalars(only_run_dir(tmp_path)).get("charts/learning_rate", []))  # noqa: E731
    while not (tmp_path / "runs").exists() or logged() < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended too early or timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "SIGTERM after iteration" in stderr
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert 2 <= saved["iteration"] < 12
    resumed, first = resume(checkpoint_path(tmp_path), tmp_path, "--checkpoint-every", "10")
    assert f"after iteration {saved['iteration']}/12, with new episodes" in resumed.stdout
    assert_resumed_from(saved, only_run_dir(tmp_path), uninterrupted[1], first)


def test_kill9_then_resume_hides_the_lost_iteration(tmp_path, uninterrupted):
    """kill -9 once iteration 5 was logged, with the last checkpoint at iteration 4: the resumed run purges the crashed
    run's iteration-5 events and goes on from the checkpoint."""
    proc = run(*TINY, "--checkpoint-every", "4", cwd=tmp_path, fault="kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert saved["iteration"] == 4 and len(read_scalars(only_run_dir(tmp_path))["charts/init_value"]) == 5
    _, first = resume(checkpoint_path(tmp_path), tmp_path)
    assert_resumed_from(saved, only_run_dir(tmp_path), uninterrupted[1], first)


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, uninterrupted):
    """A NaN transition loss in iteration 2 (--no-sn-faithful: its SVD must survive the bad weights until the iteration
    ends): exit 1 with one line naming the terms and the iteration, both iterations logged, and the checkpoint of
    iteration 1 untouched: the weights of a clean run after iteration 1."""
    proc = run(*TINY, "--no-sn-faithful", "--checkpoint-every", "1", cwd=tmp_path, fault="nan")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "non-finite transition and policy loss at iteration 2; resume from runs/" in line and "checkpoint.pt" in line
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert saved["iteration"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())
    scalars = read_scalars(only_run_dir(tmp_path))
    assert len(scalars["charts/learning_rate"]) == 2 and math.isnan(scalars["losses/transition_loss"][-1])
    clean = tmp_path / "clean"
    clean.mkdir()
    proc = run_script("deepspi_maze.py", *TINY[:-1], "64", "--no-sn-faithful", cwd=clean, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.load(checkpoint_path(clean), weights_only=False)["model"]
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--resume", "missing.pt"], {}, "--resume: cannot read missing.pt"),
        (["--resume", "{checkpoint}", "--learning-rate", "0.1"], {}, "takes the saved run's arguments, not --learning-rate"),
        (["--resume", "{checkpoint}", "--no-dedup-obs"], {}, "takes the saved run's arguments, not --no-dedup-obs"),
        (["--resume", "{model}"], {}, "is not a checkpoint.pt of deepspi_maze.py"),
        (["--resume", "{atari}"], {}, "is not a checkpoint.pt of deepspi_maze.py"),
        (["--resume", "{bogus}"], {}, "cannot read"),
        ([], {"WORLD_SIZE": "2"}, "this script runs one process"),
    ],
    ids=["missing", "other-flag", "other-negated-flag", "model-not-checkpoint", "atari-checkpoint", "not-a-file", "torchrun"],
)
def test_bad_run_flags_exit_2_with_one_line(tmp_path, uninterrupted, flags, env, message):
    run_dir, bogus, atari = uninterrupted[0], tmp_path / "bogus.pt", tmp_path / "atari.pt"
    bogus.write_text("not a checkpoint")
    torch.save({"iteration": 1, "args": {"env_id": "BreakoutNoFrameskip-v4"}}, atari)
    names = dict(
        checkpoint=f"{run_dir}/checkpoint.pt", model=f"{run_dir}/deepspi_maze.cleanrl_model", bogus=bogus, atari=atari
    )
    proc = run(*[f.format(**names) for f in flags], cwd=tmp_path, **env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "error" in line and message in line, proc.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- the loop's wiring
def tabular_policy(path, maze):
    """The (S, 4) action probabilities of the agent saved at path (a model or checkpoint) on every maze state."""
    agent = M.Agent(4)
    agent.load_state_dict(torch.load(path, weights_only=False)["model"])
    with torch.inference_mode():
        return agent.actor(agent.network(agent.encode(torch.as_tensor(maze.observations)))).softmax(-1).double().numpy()


# The loop's minibatches as it trains on them: the rollout storage when the update starts (as tests/recorder.py keeps
# it), the weights, the torch random state (the transition head's noise) and mb_inds before the encoder pass, the loss
# and its parts after it, the clipped gradients at the optimizer step (docs/tests.md lists these lines).
STORAGE_LINE = [
    "clipfracs = []",
    ["iteration", "obs", "actions", "logprobs", "rewards", "dones", "values", "next_value"],
    None,
]
MINIBATCH_LINES = [
    [
        "mb_rows = torch.cat([b_rows[mb_inds], b_next_rows[mb_inds]]) if world_model else b_rows[mb_inds]",
        ["agent", "torch.get_rng_state()", "iteration", "mb_inds"],
        None,
    ],
    ["optimizer.zero_grad()", ["loss", "pg_loss", "v_loss", "entropy_loss", "reward_loss", "transition_loss"], None],
    ["optimizer.step()", ["[p.grad for p in agent.parameters()]"], None],
]
LOOP = ["--n", "3", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "2"]
LOOP += ["--total-timesteps", "256", "--max-grad-norm", "0.1"]
MODES = {"deepspi": [], "ppo": ["--reward-loss-coef", "0", "--transition-loss-coef", "0"], "deep_mdp": ["--deep-mdp"]}
# float32 sums of the maze network and world model: encoder (1 x 8 x 8, 32 x 4 x 4, 64 x 3 x 3), torso, transition head
# (64 x 4, 8 x 4 per group, the 6272-wide mixture layer), the transition loss over 7 x 7 x 64 latents, a minibatch mean;
# the gradients: back again and the widest weight-gradient sum (conv1 over 2 x 64 x 20 x 20 positions)
LOOP_FWD_K = 64 + 512 + 576 + 3136 + 512 + 256 + 32 + 6272 + 3136 + 64
LOOP_GRAD_K = 2 * LOOP_FWD_K + 128 * 20 * 20


@pytest.mark.parametrize("mode", MODES)
def test_loop_trains_on_the_reference_loss(tmp_path, mode):
    """Every optimizer step of a real run (DeepSPI, PPO and DeepMDP mode) is that of tests/deepspi_reference.py's loss
    on the same minibatch, weights and transition noise: the loss and its parts, and the gradients clipped to
    --max-grad-norm; the world-model terms are those of the maze's reset mask (b_resets)."""
    _, records = probe(tmp_path, [STORAGE_LINE, *MINIBATCH_LINES], *LOOP, *MODES[mode])
    storage = {r["args"]["iteration"]: r["args"] for r in records if r["name"] == STORAGE_LINE[0]}
    records = [r for r in records if r["name"] != STORAGE_LINE[0]]
    inputs, losses, steps = (records[i::3] for i in range(3))
    assert [r["name"] for r in records[:3]] == [line[0] for line in MINIBATCH_LINES]
    assert len(inputs) == len(losses) == len(steps) == 2 * 2 * 2  # iterations x epochs x minibatches
    args = types.SimpleNamespace(**vars(M.tyro.cli(M.Args, args=LOOP + MODES[mode])), clip_vloss=False)  # no such flag
    resets = 0
    for x, got, step in zip(inputs, losses, steps, strict=True):
        x, got, step = x["args"], got["args"], step["args"]
        agent = M.Agent(4)
        agent.load_state_dict(x["agent"])
        torch.set_rng_state(x["torch.get_rng_state()"])
        # every input from the rollout storage and mb_inds, not from the loop's b_* arrays
        mb = minibatch_from_storage(storage[x["iteration"]], x["mb_inds"], args.gamma, args.gae_lambda, args.mask_next_done)
        batch = [mb[k] for k in ("obs", "next_obs", "actions", "logprobs", "advantages", "returns", "rewards")]
        loss, out = reference_loss(agent, args, *batch, mb["resets"])
        resets += int(mb["resets"].sum())
        tol = f32_tol(LOOP_FWD_K, 2)
        for name, ref in [("loss", loss), ("pg_loss", out["pg_loss"]), ("v_loss", out["v_loss"])]:
            assert got[name].item() == pytest.approx(ref.item(), rel=tol, abs=tol * loss.abs().item()), name
        assert got["entropy_loss"].item() == pytest.approx(out["entropy_loss"].item(), rel=tol)
        for name in ("reward_loss", "transition_loss"):
            ref = out.get(f"{name}_per_sample", torch.zeros(len(batch[0])))
            torch.testing.assert_close(got[name], ref.detach(), rtol=tol, atol=tol * ref.abs().max().item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        got_grads = step["[p.grad for p in agent.parameters()]"]  # None: a parameter outside the loss (PPO's world model)
        assert [g is None for g in got_grads] == [p.grad is None for p in agent.parameters()]
        ref = torch.cat([p.grad.flatten() for p in agent.parameters() if p.grad is not None])
        grads = torch.cat([g.flatten() for g in got_grads if g is not None])
        err = (grads.double() - ref.double()).abs().max() / ref.double().abs().max()
        assert err <= f32_tol(LOOP_GRAD_K, 2), err
    assert mode == "ppo" or resets > 0  # the reset mask was exercised


# tests/probe.py records each iteration's flattened batch. One env step per iteration, one minibatch and one epoch: each
# record is one iteration's whole batch, one row per env, and row e of iteration k is the step after row e of iteration
# k-1. 40 steps per env stay below the time limit (200), so an episode ends exactly when it reaches G, W or F.
WIRING = ["--n", "2", "--num-envs", "16", "--num-steps", "1", "--num-minibatches", "1", "--update-epochs", "1"]
WIRING += ["--total-timesteps", "640", "--no-anneal-lr", "--learning-rate", "1e-3"]
BATCH_LINE = ["b_inds = np.arange(args.batch_size)", ["obs", "b_obs", "b_actions", "b_logprobs", "b_resets"], None]


@pytest.fixture(scope="module", params=["default", "mask_next_done"])
def probed(request, tmp_path_factory):
    """A 40-iteration run (with --mask-next-done or not) under tests/probe.py. Returns (mode, batches, run dir)."""
    cwd = tmp_path_factory.mktemp(f"probed_{request.param}")
    flags = WIRING + (["--mask-next-done"] if request.param == "mask_next_done" else [])
    _, records = probe(cwd, [BATCH_LINE], *flags)
    batches = [record["args"] for record in records]
    for batch in batches:  # s' of each step: the storage's next row (obs[t + 1])
        batch["b_next_obs"] = batch["obs"][1:].reshape(batch["b_obs"].shape)
    assert len(batches) == 40 and all(len(batch["b_obs"]) == 16 for batch in batches)
    return request.param, batches, only_run_dir(cwd)


def maze_rows(maze, batch):
    """Each row's (s, a, s') as maze states, read off the images (each state has its own observation)."""
    flat = maze.observations.reshape(maze.num_states, -1)

    def states(images):
        match = (images.numpy().reshape(len(images), 1, -1) == flat[None]).all(-1)
        assert (match.sum(1) == 1).all()
        return match.argmax(1)

    return states(batch["b_obs"]), batch["b_actions"].long().numpy(), states(batch["b_next_obs"])


def test_world_model_reset_mask_flags_the_episode_boundaries(probed):
    """The rows whose latent target is phi(s), not phi(s'): with --mask-next-done exactly the steps that reach a terminal
    cell (from the maze's tables); by default (official) the first steps of episodes, i.e. rows at s_I, as many in each
    iteration as the previous iteration had episode ends (none in the first: the run's first state is not a reset)."""
    mode, batches, _ = probed
    maze = M.ConfoundingMaze(2, 0.2, 0.99)
    previous_ends, total_ends = 0, 0
    for batch in batches:
        s, a, s_next = maze_rows(maze, batch)
        ends = maze.P[s, a] @ maze.is_terminal  # 1 where the step reaches G, W or F (never at random: @ only branches)
        assert set(ends) <= {0.0, 1.0} and (s_next[ends == 1] == maze.initial_state).all()  # the same-step reset
        mask = batch["b_resets"].numpy()
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
    _, batches, run_dir = probed
    maze = M.ConfoundingMaze(2, 0.2, 0.99)
    pi_new = tabular_policy(os.path.join(run_dir, "checkpoint.pt"), maze)
    s, a, _ = maze_rows(maze, batches[-1])
    ratios = pi_new[s, a] / batches[-1]["b_logprobs"].double().exp().numpy()
    sir = read_scalars(run_dir)["charts/sir"]
    # the script's float32 log-probabilities against this float32 recomputation: an absolute error in log pi' (normwise
    # on the logits' scale, the maze network's sums: conftest.f32_tol; twice through log-softmax) is a relative error of
    # the ratio
    rel = 2 * f32_tol(64 + 512 + 576 + 3136 + 512, 2) * np.abs(np.log(pi_new[s, a])).max()
    assert len(sir) == 40 and sir[-1] == pytest.approx(ratios.max(), rel=rel)
    assert ratios.max() - ratios.min() > 2 * rel * ratios.max()  # the max is told apart from any other statistic
