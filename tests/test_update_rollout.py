"""The PPO update and the rollout of the training loops, checked through the real CLI on the real environments.

tests/recorder.py records, at CleanRL's boundaries only (the loop's variable names, torch's optimizer step, the vector
env's step and reset, clip_grad_norm_), every optimizer step and what the environment returned. The tests check:
- the update's schedule against the flags: each epoch's minibatches partition the batch in a fresh random order,
  update_epochs x num_minibatches steps per iteration (fewer only when --target-kl stops it, at an epoch's end), each
  step's gradient within --max-grad-norm (and clipped to it), each iteration's annealed (or constant) learning rate;
- the rollout's storage against the environment and the acting policy: observations, rewards (clipped), actions, and
  the log-probabilities, values and bootstrap value recomputed in float64 from the weights that acted.
"""

import copy
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO

import deepspi_atari
import deepspi_maze
import dreamspi_atari

RECORDER = os.path.join(REPO, "tests", "recorder.py")
U = 2.0**-24  # float32 unit roundoff

# SpaceInvaders: raw rewards of 5 to 30 points, so that a clipped reward differs from the raw one
ATARI = ["--env-id", "SpaceInvadersNoFrameskip-v4", "--num-envs", "2", "--num-minibatches", "4"]
RUNS = {
    # envpool, annealed learning rate, a --max-grad-norm so small that every step is clipped
    "atari-envpool": (
        deepspi_atari,
        ATARI + ["--env-backend", "envpool", "--num-steps", "128", "--total-timesteps", "768", "--update-epochs", "3"]
        + ["--max-grad-norm", "1e-3"],
    ),
    # gymnasium, constant learning rate, a --target-kl that the first epoch of every iteration exceeds
    "atari-gymnasium-kl": (
        deepspi_atari,
        ATARI + ["--env-backend", "gymnasium", "--num-steps", "64", "--total-timesteps", "256", "--update-epochs", "3"]
        + ["--learning-rate", "3e-4", "--no-anneal-lr", "--target-kl", "1e-7"],
    ),
    # the maze with a --target-kl that the first epoch of every iteration exceeds, at a constant learning rate
    "maze-kl": (
        deepspi_maze,
        ["--num-envs", "2", "--num-steps", "64", "--total-timesteps", "256", "--num-minibatches", "4"]
        + ["--update-epochs", "3", "--learning-rate", "3e-4", "--no-anneal-lr", "--target-kl", "1e-7"],
    ),
    "maze": (
        deepspi_maze,
        ["--num-envs", "2", "--num-steps", "128", "--total-timesteps", "768", "--num-minibatches", "4"]
        + ["--update-epochs", "3", "--max-grad-norm", "1e-3"],
    ),
    # four optimizers with their own learning rates; the imagined batch is num_envs x num_steps x horizon
    "dreamspi": (
        dreamspi_atari,
        ATARI + ["--num-steps", "64", "--total-timesteps", "256", "--update-epochs", "2", "--imagination-horizon", "2"]
        + ["--imagination-epochs", "2"]
        + ["--encoder-learning-rate", "2e-4", "--world-model-learning-rate", "1e-4", "--actor-learning-rate", "3e-5"]
        + ["--critic-learning-rate", "5e-5", "--max-grad-norm", "1e-4"],
    ),
}  # fmt: skip
# DreamSPI's parameter groups (each with its --GROUP-learning-rate), by the first part of the parameter names
DREAMSPI_GROUPS = {
    "encoder": "encoder",
    "reward_model": "world_model",
    "transition_model": "world_model",
    "done_predictor": "world_model",
    "network": "actor",
    "actor": "actor",
    "critic": "critic",
}
_cache = {}


def flag(flags, name, default=None):
    return type(default)(flags[flags.index(name) + 1]) if name in flags else default


@pytest.fixture(scope="module")
def recorded(request, tmp_path_factory):
    """The recorded run named by the test's parameter (run once per module)."""
    name = request.param
    if name not in _cache:
        module, flags = RUNS[name]
        cwd = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, RECORDER, str(cwd / "record.pt"), module.__file__, "--no-progress", "--no-cuda", *flags]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = torch.load(cwd / "record.pt", weights_only=False)
        batch = flag(flags, "--num-envs", 0) * flag(flags, "--num-steps", 0)
        run = types.SimpleNamespace(name=name, module=module, flags=flags, batch=batch, **record)
        run.num_iterations = flag(flags, "--total-timesteps", 0) // batch
        run.epochs, run.minibatches = flag(flags, "--update-epochs", 4), flag(flags, "--num-minibatches", 4)
        _cache[name] = run
    return _cache[name]


def updates(run, source="b_inds"):
    """{iteration: [epoch: [minibatch: (mb_inds, [steps])]]}: consecutive optimizer steps on the same minibatch are one
    update (DreamSPI steps one optimizer per parameter group)."""
    out = {}
    for s in (s for s in run.steps if s["source"] == source):
        epochs = out.setdefault(s["iteration"], [])
        if not epochs or epochs[-1][0] != s["epoch"]:
            epochs.append((s["epoch"], []))
        minibatches = epochs[-1][1]
        if not minibatches or not np.array_equal(minibatches[-1][0], s["mb_inds"]):
            minibatches.append((s["mb_inds"], []))
        minibatches[-1][1].append(s)
    return {it: [(e, mbs) for e, mbs in epochs] for it, epochs in out.items()}


def groups(step):
    """The DreamSPI parameter groups of the parameters that this optimizer step updates."""
    return {DREAMSPI_GROUPS[name.split(".")[0]] for name in step["params"]}


def expected_groups(run, source):
    """The parameter groups that one minibatch steps, one optimizer each: the agent's one optimizer, or DreamSPI's
    encoder and world model on real data (with the actor and critic if dyna-style) and actor and critic on imagination."""
    if run.module is not dreamspi_atari:
        return None
    if source == "i_inds" or "--dyna-style" in run.flags:
        return ["actor", "critic"] if source == "i_inds" else ["encoder", "world_model", "actor", "critic"]
    return ["encoder", "world_model"]


def check_epoch(epoch_index, epoch, minibatches, batch, num_minibatches, expected=None):
    mb_inds = [m for m, _ in minibatches]
    order = np.concatenate(mb_inds)
    assert len(mb_inds) == num_minibatches, (epoch_index, [len(m) for m in mb_inds])
    assert {len(m) for m in mb_inds} == {batch // num_minibatches}
    assert np.array_equal(np.sort(order), np.arange(batch)), "the minibatches do not partition the batch"
    assert not np.array_equal(order, np.arange(batch)), "the batch is not shuffled"
    assert epoch == epoch_index
    for _, steps in minibatches:
        if expected is None:
            assert len(steps) == 1, f"{len(steps)} optimizer steps on one minibatch"
        else:
            assert sorted(g for s in steps for g in groups(s)) == sorted(expected)
    return order


SCHEDULE = [("atari-envpool", "b_inds"), ("maze", "b_inds"), ("dreamspi", "b_inds"), ("dreamspi", "i_inds")]


@pytest.mark.parametrize("recorded,source", SCHEDULE, indirect=["recorded"], ids=[f"{r}-{s}" for r, s in SCHEDULE])
def test_each_epoch_partitions_the_batch_in_a_fresh_order(recorded, source):
    """Every iteration: update_epochs epochs of num_minibatches minibatches (one optimizer step each, or one per group
    that DreamSPI's phase trains); each epoch's minibatches partition the batch (disjoint, all of it) in an order that
    differs from the previous epoch's and the previous iteration's."""
    run = recorded
    batch, minibatches = run.batch, run.minibatches
    epochs = run.epochs
    if source == "i_inds":  # DreamSPI's imagination: horizon x the batch, minibatches of the real step's size
        horizon = flag(run.flags, "--imagination-horizon", 8)
        batch, minibatches, epochs = batch * horizon, minibatches * horizon, flag(run.flags, "--imagination-epochs", 1)
    schedule = updates(run, source)
    assert sorted(schedule) == list(range(1, run.num_iterations + 1))
    previous = None
    for iteration, iteration_epochs in schedule.items():
        assert len(iteration_epochs) == epochs, (iteration, len(iteration_epochs))
        for k, (epoch, mbs) in enumerate(iteration_epochs):
            order = check_epoch(k, epoch, mbs, batch, minibatches, expected_groups(run, source))
            assert previous is None or not np.array_equal(order, previous), "an epoch repeats the previous order"
            previous = order


@pytest.mark.parametrize("recorded", ["atari-gymnasium-kl", "maze-kl"], indirect=True)
def test_target_kl_stops_the_update_at_the_end_of_an_epoch(recorded):
    """--target-kl 1e-7: the first epoch moves the policy further than that, so every iteration stops after whole
    epochs, fewer than update_epochs, each a full partition of the batch."""
    run = recorded
    schedule = updates(run)
    assert sorted(schedule) == list(range(1, run.num_iterations + 1))
    for iteration, iteration_epochs in schedule.items():
        assert 1 <= len(iteration_epochs) < run.epochs, (iteration, len(iteration_epochs))
        for k, (epoch, mbs) in enumerate(iteration_epochs):
            check_epoch(k, epoch, mbs, run.batch, run.minibatches)


def gamma(n):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 sum of products."""
    return n * U / (1 - n * U)


@pytest.mark.parametrize("recorded", ["atari-envpool", "maze", "dreamspi"], indirect=True)
def test_every_step_is_clipped_to_max_grad_norm(recorded):
    """--max-grad-norm 1e-3 (DreamSPI: 1e-4), below every gradient (checked): the gradient each optimizer applies has
    the norm max_grad_norm, up to the float32 rounding of the norm that clip_grad_norm_ divides by. That norm is a sum of n
    squares (gamma_n) per tensor and then over the k tensors (gamma_k), each under a square root; the division and
    the scaling add a few u. clip_grad_norm_ divides by norm + 1e-6, which lowers the result by 1e-6 / norm."""
    run, max_norm = recorded, flag(recorded.flags, "--max-grad-norm", 0.0)
    sizes = {k: v.numel() for k, v in run.iterations[1]["agent"].items()}
    assert run.steps
    for s in run.steps:
        numels = [sizes[name] for name in s["params"]]
        tol = gamma(max(numels)) + gamma(len(numels)) + 5 * U
        assert s["clip"] is not None, "no clip_grad_norm_ over the parameters of this optimizer"
        pre = s["clip"][0]
        assert pre > 2 * max_norm, "the gradient is not larger than --max-grad-norm: the check would be empty"
        assert s["grad_norm"] <= max_norm * (1 + tol), (s["grad_norm"], max_norm)
        assert s["grad_norm"] >= max_norm * (1 - tol) * pre / (pre + 1e-6), (s["grad_norm"], max_norm)


@pytest.mark.parametrize("recorded", ["atari-envpool", "atari-gymnasium-kl", "maze", "maze-kl", "dreamspi"], indirect=True)
def test_learning_rate_is_annealed_per_iteration(recorded):
    """Each step's learning rate is frac * the flag's rate, frac = 1 - (iteration - 1) / num_iterations (each
    DreamSPI group from its own flag), or the flag's rate with --no-anneal-lr; float64 arithmetic of two operations."""
    run = recorded
    assert {s["iteration"] for s in run.steps} == set(range(1, run.num_iterations + 1))
    for s in run.steps:
        if run.module is dreamspi_atari:
            (group,) = groups(s)  # one optimizer per group
            base = flag(run.flags, "--" + group.replace("_", "-") + "-learning-rate", 0.0)
        else:
            base = flag(run.flags, "--learning-rate", 2.5e-4)
        frac = 1.0 if "--no-anneal-lr" in run.flags else 1.0 - (s["iteration"] - 1.0) / run.num_iterations
        assert s["lr"] == pytest.approx([frac * base], rel=4 * 2.0**-52, abs=0), (s["iteration"], s["lr"])


def env_steps(run):
    """The observation before each env step, the actions passed and what it returned, in order."""
    assert run.env[0]["call"] == "reset" and all(e["call"] == "step" for e in run.env[1:])
    obs = [torch.as_tensor(run.env[0]["ret"][0])] + [torch.as_tensor(e["ret"][0]) for e in run.env[1:]]
    return obs, run.env[1:]


ROLLOUTS = ["atari-envpool", "atari-gymnasium-kl", "maze", "dreamspi"]


@pytest.mark.parametrize("recorded", ROLLOUTS, indirect=True)
def test_rollout_stores_what_the_env_returned(recorded):
    """obs[t], actions[t], rewards[t] of each iteration's storage, as the update found it: the observation the policy
    acted on, the actions given to env.step, the reward it returned; on Atari the reward is the sign of the raw game
    score (envpool's info["reward"]), which SpaceInvaders makes differ from it."""
    run = recorded
    obs, steps = env_steps(run)
    T = flag(run.flags, "--num-steps", 0)
    assert len(steps) == run.num_iterations * T
    for iteration, stored in run.iterations.items():
        k = (iteration - 1) * T
        torch.testing.assert_close(stored["obs"], torch.stack(obs[k : k + T + 1]), rtol=0, atol=0)
        actions = torch.stack([torch.as_tensor(e["actions"]) for e in steps[k : k + T]])
        # exactly the env's actions (the Atari scripts store them as CleanRL does, in float32: exact below 2^24)
        torch.testing.assert_close(stored["actions"].double(), actions.double(), rtol=0, atol=0)
        rewards = torch.stack([torch.as_tensor(e["ret"][1]) for e in steps[k : k + T]]).float()
        torch.testing.assert_close(stored["rewards"], rewards, rtol=0, atol=0)
    rewards = np.stack([e["ret"][1] for e in steps])
    if run.module is not deepspi_maze:
        assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}
        if "reward" in steps[0]["ret"][4]:  # envpool's raw score
            raw = np.stack([e["ret"][4]["reward"] for e in steps])
            assert raw.max() > 1, "no reward above 1 point: clipping would not show"
            np.testing.assert_array_equal(rewards, np.sign(raw))
    assert (rewards != 0).sum() >= 2, "the run saw no reward: the check would be empty"


def float64_policy(agent, x):
    """The acting policy's values and log-probabilities of every action on the observations x, in float64, with a
    first-order bound on the error of the float32 rollout's numbers: each conv or linear output y = W x + b of a
    float32 forward pass is off by at most (gamma_{n+1} + u)(|W| |x| + |b|) (its n-term dot product, and the rounding of
    its input), ReLU and reshapes are exact, and the output moves by |d output / d y| times that. The log-softmax of
    A logits adds (gamma_A + 4u)(1 + |logsumexp| + |log-prob|): exp, sum, log and the two subtractions.
    x must hold distinct rows: the maze agent encodes the distinct observations of a batch once, in sorted order, and
    torch.unique's sorted distinct rows leave that order unchanged, so every layer's rows are x's rows."""
    agent = copy.deepcopy(agent).double()
    layers = {}

    def hook(module, inputs, y):
        (inp,) = inputs
        w, b = module.weight.abs(), module.bias.abs()
        if isinstance(module, nn.Conv2d):
            magnitude = F.conv2d(inp.abs(), w, b, module.stride, module.padding, module.dilation, module.groups)
        else:
            magnitude = F.linear(inp.abs(), w, b)
        layers[module] = (y, (gamma(module.weight[0].numel() + 1) + U) * magnitude)

    handles = [m.register_forward_hook(hook) for m in agent.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    agent.get_action_and_value(x.double(), torch.zeros(len(x), dtype=torch.long))
    for h in handles:
        h.remove()
    logits, value = layers[agent.actor][0], layers[agent.critic][0].flatten()
    logprobs = logits.log_softmax(1)
    ys, deltas = zip(*layers.values(), strict=True)

    def bound(output):
        grads = torch.autograd.grad(output.sum(), ys, retain_graph=True, allow_unused=True)
        return sum((g.abs() * d).flatten(1).sum(1) for g, d in zip(grads, deltas, strict=True) if g is not None)

    lse = logits.logsumexp(1)
    softmax = (gamma(logits.shape[1]) + 4 * U) * (1 + lse.abs()[:, None] + logprobs.abs())
    logprob_bounds = torch.stack([bound(logprobs[:, a]) for a in range(logits.shape[1])], 1) + softmax
    return value.detach(), bound(value).detach(), logprobs.detach(), logprob_bounds.detach()


def make_agent(run, state):
    n_actions = state["actor.bias"].numel()
    agent = run.module.Agent(n_actions)
    agent.load_state_dict(state)
    return agent


@pytest.mark.parametrize("recorded", ROLLOUTS, indirect=True)
def test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys(recorded):
    """logprobs[t] and values[t] of each iteration: log pi(actions[t] | obs[t]) and V(obs[t]) of the weights that
    acted (the update had not started), and next_value = V of the observation after the last step (obs[T], which the
    previous test ties to the env), each within the float32 bound of a float64 recomputation."""
    run = recorded
    for iteration, stored in run.iterations.items():
        agent = make_agent(run, stored["agent"])
        x = stored["obs"]  # (T + 1, N, ...): the acted-on observations and the one after the last step
        rows, inverse = torch.unique(x.flatten(0, 1).flatten(1), dim=0, return_inverse=True)
        value, value_bound, logprobs, logprob_bound = float64_policy(agent, rows.view((-1,) + x.shape[2:]))
        inverse = inverse.view(x.shape[:2])
        acted, last = inverse[:-1], inverse[-1]
        a = stored["actions"].long().unsqueeze(-1)  # whole numbers (the previous test)
        pairs = {
            "values": (stored["values"], value[acted], value_bound[acted]),
            "logprobs": (
                stored["logprobs"],
                logprobs[acted].gather(-1, a)[..., 0],
                logprob_bound[acted].gather(-1, a)[..., 0],
            ),
            "next_value": (stored["next_value"].flatten(), value[last], value_bound[last]),
        }
        for name, (got, ref, tol) in pairs.items():
            tol = tol + U * ref.abs()  # the float32 storage
            excess = (got.double() - ref).abs() / tol
            assert (excess <= 1).all(), f"{name} of iteration {iteration}: {excess.max():.3g} times the float32 bound"
