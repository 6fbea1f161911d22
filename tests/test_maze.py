# deepspi_maze.py: the confounding maze (spec MAZE_AND_DREAMSPI.md Part A, "Test oracles" 1-9), parity with the official
# maze tables (fixtures/official/maze.npz), the CLI in each mode, bad input and one short learning check.
import csv
import glob
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import REPO, assert_finite_metrics, assert_normwise, f32_tol, only_run_dir, read_scalars, run_script
from deepspi_reference import reference_loss

import deepspi_maze as M

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
MAZE_CONV_K = 64 + 512 + 576  # the encoder's sums: 1 x 8 x 8, 32 x 4 x 4 and 64 x 3 x 3 terms
MAZE_FWD_K = MAZE_CONV_K + 3136 + 512  # then the torso and a head


def bellman_optimal(maze, iters=5000):
    V = np.zeros(maze.num_states)
    for _ in range(iters):
        V = (maze.R + maze.gamma * maze.P @ V).max(1)
    return V


def policy_value_iterative(maze, pi, num_iters=1000):
    """V^pi by num_iters sweeps of V <- r^pi + gamma P^pi V from V = 0 (what the official code logs)."""
    P_pi, r_pi = np.einsum("sa,sat->st", pi, maze.P), (pi * maze.R).sum(1)
    V = np.zeros(maze.num_states)
    for _ in range(num_iters):
        V = r_pi + maze.gamma * P_pi @ V
    return V


def scripted(maze, top_up=True, bottom_up=False):
    """RIGHT everywhere, with UP at the chosen star cells."""
    pi = np.zeros((maze.num_states, 4))
    pi[:, RIGHT] = 1.0
    for star, up in ((maze.top_star, top_up), (maze.bottom_star, bottom_up)):
        if up:
            pi[star] = np.eye(4)[UP]
    return pi


# ---------------------------------------------------------------------------------------------------- oracles 1-3


def test_grid_and_state_indices():
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    expected = ["#####G##", "#>>>>!W#", "I@###F##", "#>>>>!W#", "########"]
    assert ["".join(row) for row in maze.grid] == expected
    for n in (2, 3, 5, 10, 20):
        maze = M.ConfoundingMaze(n, 0.2, 0.99)
        assert maze.num_states == 2 * n + 6 and maze.P.shape == (2 * n + 6, 4, 2 * n + 6) and maze.R.shape == (2 * n + 6, 4)
        assert maze.initial_state == n + 2
        assert maze.critical_states == (n, 2 * n + 4) == (maze.top_star, maze.bottom_star)
        assert maze.terminal_states == (0, n + 1, n + 4, 2 * n + 5)
        symbols = maze.grid[tuple(maze.state_coords.T)]
        assert symbols[0] == "G" and symbols[n + 4] == "F" and symbols[n + 3] == "@"
        assert "".join(symbols[1 : n + 2]) == ">" * (n - 1) + "!W"
        assert "".join(symbols[n + 5 :]) == ">" * (n - 1) + "!W"


@pytest.mark.parametrize("n,epsilon", [(2, 0.2), (5, 0.2), (5, 0.05), (10, 0.5)])
def test_transitions_are_stochastic(n, epsilon):
    maze = M.ConfoundingMaze(n, epsilon, 0.99)
    assert maze.P.dtype == np.float64 and maze.R.dtype == np.float64
    np.testing.assert_allclose(maze.P.sum(-1), 1.0, atol=1e-12)
    assert (maze.P >= 0).all()
    hazard = n + 3
    np.testing.assert_allclose(maze.P[hazard, :, 1], 1 - epsilon)
    np.testing.assert_allclose(maze.P[hazard, :, n + 5], epsilon)
    for s in maze.terminal_states:
        assert (maze.P[s, :, s] == 1).all() and (maze.R[s] == 0).all()
    # walls are never entered and nothing but @ is random
    assert ((maze.P == 0) | (maze.P == 1)).all(axis=(1, 2))[np.arange(maze.num_states) != hazard].all()


def test_rewards():
    n, eps, gamma = 5, 0.2, 0.99
    maze = M.ConfoundingMaze(n, eps, gamma)
    assert maze.R[5, UP] == pytest.approx(5.257679, abs=1e-6) == n / gamma**n
    assert maze.R[14, UP] == pytest.approx(-47.319107, abs=1e-6)
    assert maze.R[14, UP] == pytest.approx(-(2 - eps) * n / (eps * gamma**n), rel=1e-12)
    expected = np.zeros_like(maze.R)
    expected[[5, 14], RIGHT] = 1.0
    expected[[1, 2, 3, 4, 10, 11, 12, 13], RIGHT] = 1.0  # the corridor cells
    expected[5, UP], expected[14, UP] = maze.R[5, UP], maze.R[14, UP]
    np.testing.assert_array_equal(maze.R, expected)


# ---------------------------------------------------------------------------------------------------- oracles 4-5


@pytest.mark.parametrize(
    "n,epsilon,v_star",
    [(5, 0.2, 8.010281), (2, 0.2, 2.758160), (10, 0.2, 16.575242), (20, 0.2, 33.039159), (5, 0.05, 8.611559)],
)
def test_optimal_value(n, epsilon, v_star):
    assert M.optimal_value(n, epsilon, 0.99) == pytest.approx(v_star, abs=1e-6)
    maze = M.ConfoundingMaze(n, epsilon, 0.99)
    assert bellman_optimal(maze)[maze.initial_state] == pytest.approx(M.optimal_value(n, epsilon, 0.99), abs=1e-6)
    assert M.policy_value(maze, scripted(maze))[maze.initial_state] == pytest.approx(v_star, abs=1e-6)


def test_reference_values_n5():
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    value = lambda pi: M.policy_value(maze, pi)[maze.initial_state]
    assert M.star_blind_value(5, 0.2, 0.99) == pytest.approx(4.803465, abs=1e-6)
    assert value(scripted(maze, top_up=False)) == pytest.approx(4.803465, abs=1e-6)
    assert value(scripted(maze, top_up=True, bottom_up=True)) == pytest.approx(-1.088015, abs=1e-6)
    assert value(np.full((maze.num_states, 4), 0.25)) == pytest.approx(1.773834, abs=1e-6)


@pytest.mark.parametrize("n,epsilon", [(2, 0.2), (5, 0.2), (5, 0.05), (10, 0.3)])
def test_confounded_policies_are_capped(n, epsilon):
    maze = M.ConfoundingMaze(n, epsilon, 0.99)
    v_right = M.policy_value(maze, scripted(maze, False, False))[maze.initial_state]
    v_bad = M.policy_value(maze, scripted(maze, True, True))[maze.initial_state]
    assert v_right == pytest.approx(M.star_blind_value(n, epsilon, 0.99), abs=1e-9)
    values = []
    for p in np.linspace(0, 1, 11):
        pi = scripted(maze, False, False)
        pi[list(maze.critical_states)] = (1 - p) * np.eye(4)[RIGHT] + p * np.eye(4)[UP]
        values.append(M.policy_value(maze, pi)[maze.initial_state])
        assert values[-1] == pytest.approx(v_right + p * (v_bad - v_right), abs=1e-9)
    assert max(values) == pytest.approx(v_right) and v_right < M.optimal_value(n, epsilon, 0.99)
    # no star-blind policy does better, even a stochastic one mixing all four actions at the stars
    rng = np.random.default_rng(0)
    for _ in range(50):
        pi = scripted(maze, False, False)
        pi[list(maze.critical_states)] = rng.dirichlet(np.ones(4))
        assert M.policy_value(maze, pi)[maze.initial_state] <= v_right + 1e-9


# ---------------------------------------------------------------------------------------------------- oracle 6


def run_policy(maze, pi_actions, num_envs, steps, seed=0):
    envs = M.MazeVecEnv(maze, num_envs, seed)
    obs, _ = envs.reset()
    returns, lengths, ep_return, ep_len, tops = [], [], np.zeros(num_envs), np.zeros(num_envs, dtype=int), []
    for _ in range(steps):
        state = envs.state.copy()
        obs, reward, terminated, truncated, info = envs.step(pi_actions[state])
        np.testing.assert_array_equal(obs, maze.observations[envs.state])
        ep_return += info["reward"]
        ep_len += 1
        tops += list(state[(state == 1)])  # corridor starts: count top entries
        tops += list(state[(state == maze.n + 5)])
        for i in np.flatnonzero(terminated | truncated):
            returns.append(ep_return[i])
            lengths.append(ep_len[i])
            ep_return[i], ep_len[i] = 0, 0
            assert envs.state[i] == maze.initial_state and envs.steps[i] == 0  # same-step auto-reset
    return np.array(returns), np.array(lengths), np.array(tops), terminated, truncated


def test_scripted_episodes_through_the_vector_env():
    n, eps, gamma = 5, 0.2, 0.99
    maze = M.ConfoundingMaze(n, eps, gamma)
    pi_star = scripted(maze).argmax(1)
    returns, lengths, tops, _, _ = run_policy(maze, pi_star, num_envs=4000, steps=n + 2)
    assert len(returns) == 4000 and (lengths == n + 2).all()  # every env finished exactly one episode
    top_return, bottom_return = (n - 1) + n / gamma**n, n
    assert set(np.round(returns, 9)) == {round(top_return, 9), bottom_return}
    frac_top = np.mean(tops == 1)
    assert abs(frac_top - (1 - eps)) < 4 * np.sqrt(eps * (1 - eps) / 4000)
    assert abs(returns.mean() - 8.4061) < 0.1
    assert abs(((1 - eps) * top_return + eps * bottom_return) - 8.4061) < 1e-4
    # the bottom return with UP, and a policy that never moves: done at step 200 (truncation) with return 0
    assert maze.R[maze.bottom_star, UP] + (n - 1) == pytest.approx((n - 1) - (2 - eps) * n / (eps * gamma**n))
    stay = np.full(maze.num_states, LEFT)
    returns, lengths, _, terminated, truncated = run_policy(maze, stay, num_envs=3, steps=200)
    assert (returns == 0).all() and (lengths == 200).all() and truncated.all() and not terminated.any()


def test_vector_env_is_seeded():
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    actions = np.full(64, RIGHT)
    runs = []
    for seed in (3, 3, 4):
        envs = M.MazeVecEnv(maze, 64, seed)
        envs.reset()
        runs.append(np.stack([envs.step(actions)[0] for _ in range(4)]))
    assert (runs[0] == runs[1]).all() and not (runs[0] == runs[2]).all()


# ---------------------------------------------------------------------------------------------------- oracle 7


@pytest.mark.parametrize("n,diff", [(5, 374), (2, 544), (10, 204), (3, 476)])
def test_rendering(n, diff):
    maze = M.ConfoundingMaze(n, 0.2, 0.99)
    obs = maze.render(maze.initial_state)
    assert obs.shape == (1, 84, 84) and obs.dtype == np.uint8
    assert maze.observations.shape == (maze.num_states, 1, 84, 84)
    _, counts = np.unique(maze.rows, return_counts=True)
    assert list(counts) == [17, 17, 16, 17, 17]
    top, bottom = maze.observations[maze.top_star], maze.observations[maze.bottom_star]
    assert (top != bottom).sum() == diff
    # the agent block is 255 and only the agent is 255; done hides it
    for s in range(maze.num_states):
        assert (maze.observations[s] == 255).sum() > 0
    assert (maze.render(maze.initial_state, done=True) == 255).sum() == 0
    if n == 5:
        assert obs[0, 40, 0] == 255 and obs[0, 0, 0] == 50


# ---------------------------------------------------------------------------------------------------- oracle 8


def test_iterative_matches_exact_evaluation():
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        logits = rng.normal(size=(maze.num_states, 4)) * 3
        pi = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        worst = max(worst, np.abs(M.policy_value(maze, pi) - policy_value_iterative(maze, pi)).max())
    assert worst < 1e-3


# ---------------------------------------------------------------------------------------------------- oracle 9


def test_ppo_only_loss_is_plain_clipped_ppo(device):
    """The reference loss (which tests/test_maze_runs.py checks the real loop against) on the maze's agent, PPO mode."""
    torch.manual_seed(0)
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    args = types.SimpleNamespace(**vars(M.Args(reward_loss_coef=0.0, transition_loss_coef=0.0)), clip_vloss=False)
    agent = M.Agent(4).to(device)
    rng = np.random.default_rng(0)
    states, next_states = rng.integers(0, maze.num_states, 32), rng.integers(0, maze.num_states, 32)
    obs, next_obs = torch.as_tensor(maze.observations[states]), torch.as_tensor(maze.observations[next_states])
    actions = torch.randint(0, 4, (32,))
    old_logprobs, advantages, returns = -torch.rand(32) - 1, torch.randn(32), torch.randn(32)
    rewards, dones = torch.randn(32), torch.zeros(32)
    batch = obs, next_obs, actions, old_logprobs, advantages, returns, rewards, dones
    obs, next_obs, actions, old_logprobs, advantages, returns, rewards, dones = (x.to(device) for x in batch)
    loss, out = reference_loss(agent, args, obs, next_obs, actions, old_logprobs, advantages, returns, rewards, dones)
    assert "reward_loss" not in out
    # plain clipped PPO (CleanRL ppo_atari, unclipped value loss), written out again
    hidden = agent.network(agent.encoder(obs / 255.0))
    logits, value = agent.actor(hidden), agent.critic(hidden).view(-1)
    logp = torch.log_softmax(logits, -1).gather(1, actions.view(-1, 1)).squeeze(1)
    entropy = -(logits.softmax(-1) * torch.log_softmax(logits, -1)).sum(-1).mean()
    ratio = (logp - old_logprobs).exp()
    adv = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    expected = pg - args.ent_coef * entropy + args.vf_coef * 0.5 * ((value - returns) ** 2).mean()
    # two float32 computations; longest sums: the encoder and torso (see deepspi_maze.Agent), the heads, the batch mean
    assert_normwise(loss, expected, f32_tol(MAZE_FWD_K + len(obs), 2), "loss")


def test_dedup_encoding_is_exact(device):
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    obs = torch.as_tensor(maze.observations[np.random.default_rng(0).integers(0, maze.num_states, 64)]).to(device)
    grads = []
    for dedup in (True, False):
        torch.manual_seed(0)
        agent = M.Agent(4, dedup_obs=dedup).to(device)
        z = agent.encode(obs)
        (z**2).sum().backward()
        grads.append((z.detach(), agent.encoder[0].weight.grad))
    # the latents of a repeated observation are copies of one encoding; the gradient sums over 64 samples either way
    assert_normwise(grads[0][0], grads[1][0], f32_tol(MAZE_CONV_K, 2), "z")
    assert_normwise(grads[0][1], grads[1][1], f32_tol(MAZE_CONV_K + 576 + 512 + 64 * 20 * 20, 2), "grad conv1.weight")


def maze_minibatch(maze, size, seed):
    """A minibatch of real maze transitions from random states and actions: uint8 images of s and s', actions, rewards,
    and resets (about one in eight)."""
    rng = np.random.default_rng(seed)
    states = rng.integers(0, maze.num_states, size)
    actions = rng.integers(0, 4, size)
    next_states = (rng.random(size)[:, None] < maze.P[states, actions].cumsum(-1)).argmax(1)
    obs = torch.as_tensor(maze.observations[states])
    next_obs = torch.as_tensor(maze.observations[next_states])
    rewards = torch.as_tensor(maze.R[states, actions], dtype=torch.float32)
    resets = torch.as_tensor(rng.random(size) < 0.125, dtype=torch.float32)
    return obs, next_obs, torch.as_tensor(actions, dtype=torch.float32), rewards, resets


def test_deduplicated_world_model_matches_per_sample():
    """--dedup-obs' update (the batch's distinct images as rows, each encoded once; the heads once per distinct image for
    every action, conv2 as one matrix product per group; the mixture sample as the weighted mean plus the weighted scales
    times the noise) against --no-dedup-obs' (every row through the encoder and the heads, the taken action's conv2, the
    official sample): the same noise gives the same per-sample losses and gradients, up to float32 rounding."""
    maze = M.ConfoundingMaze(5, 0.2, 0.99)
    obs, next_obs, actions, rewards, resets = maze_minibatch(maze, 256, 0)
    eps = torch.randn((256, 5, 64, 7, 7), generator=torch.Generator().manual_seed(1)).clamp(-1.0, 1.0)
    results = []
    for dedup in (False, True):
        torch.manual_seed(0)
        agent = M.Agent(4, dedup_obs=dedup)
        images = torch.cat([obs, next_obs])
        rows = torch.arange(len(images))
        if dedup:  # as the training loop: the distinct images, then each row's image
            unique_images, rows = torch.unique(images.flatten(1), dim=0, return_inverse=True)
            images = unique_images.view((-1, 1, 84, 84))
        z_distinct, image_index = agent.encode_rows(images, rows)
        z, next_z = z_distinct[image_index].tensor_split([len(obs)])
        distinct = None
        if dedup:
            assert len(z_distinct) < len(obs)  # images repeat
            distinct = (z_distinct, image_index[: len(obs)])
        reward_loss, transition_loss = agent.world_model_losses(z, next_z, actions, rewards, resets, eps, distinct)
        (0.01 * reward_loss + 5e-4 * transition_loss).mean().backward()
        grads = {name: p.grad.clone() for name, p in agent.named_parameters() if p.grad is not None}
        results.append((z.detach(), reward_loss.detach(), transition_loss.detach(), grads))
    (z0, r0, t0, g0), (z1, r1, t1, g1) = results
    assert g0.keys() == g1.keys() and any(name.startswith("transition_model") for name in g0)
    # forward: the encoder, then conv1 (64 x 2 x 2 terms), conv2 (8 x 2 x 2), the mixture of 5 and the loss's 3136 terms
    # (the reward head: 3136 + 256 + 256); two float32 computations
    forward_k = MAZE_CONV_K + 256 + 32 + 5 + 3136
    assert_normwise(z1, z0, f32_tol(MAZE_CONV_K, 2), "z")
    assert_normwise(r1, r0, f32_tol(MAZE_CONV_K + 3136 + 256 + 256, 2), "reward loss")
    assert_normwise(t1, t0, f32_tol(forward_k, 2), "transition loss")
    # backward: the forward chain again, then the weight gradients' sums over the 256 samples (the 512 images for the
    # encoder) and each layer's output positions (at most 20 x 20)
    for name, grad in g0.items():
        assert_normwise(g1[name], grad, f32_tol(2 * forward_k + 512 * 20 * 20, 2), f"grad {name}")


# ---------------------------------------------------------------------------------------------------- official parity


@pytest.mark.parametrize("prefix", ["n5", "n3"])
def test_parity_with_official_maze(fixtures_dir, prefix):
    f = np.load(os.path.join(fixtures_dir, "maze.npz"))
    g = lambda k: f[f"{prefix}/{k}"]
    assert int(g("max_steps")) == 200
    maze = M.ConfoundingMaze(int(g("n_path")), float(g("epsilon")), float(g("gamma")))
    # the official builder works in float64 and casts to float32; our epsilon and gamma are the float32 values here
    maze64 = M.ConfoundingMaze(int(g("n_path")), float(np.float64(str(g("epsilon")))), float(np.float64(str(g("gamma")))))
    np.testing.assert_allclose(maze64.P, g("P_f64"), rtol=0, atol=1e-12)
    np.testing.assert_allclose(maze64.R, g("R_f64"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(maze.P.astype(np.float32), g("P"), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(maze.R.astype(np.float32), g("R"), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(maze.is_terminal, g("is_terminal"))
    assert maze.terminal_states == tuple(np.flatnonzero(g("is_terminal")))
    assert maze.initial_state == int(g("initial_state"))
    assert sorted(maze.critical_states) == sorted(g("critical_states").tolist())  # the official order comes from a set
    np.testing.assert_array_equal(maze.state_coords, g("state_coords"))
    np.testing.assert_array_equal(maze.intensity, g("grid_intensity"))
    np.testing.assert_array_equal(maze.grid, g("grid_symbols"))
    np.testing.assert_array_equal(maze.observations, g("obs"))
    np.testing.assert_array_equal(maze.render(maze.initial_state, done=True), g("obs_done_background"))
    np.testing.assert_array_equal(M.MazeVecEnv(maze, 2, seed=1).reset()[0], g("env_reset_obs"))
    for name in ("uniform", "right", "opt", "up_both"):
        pi = g(f"pi_{name}")
        np.testing.assert_allclose(M.policy_value(maze64, pi), g(f"V_exact_{name}"), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(policy_value_iterative(maze64, pi), g(f"V_iter1000_{name}"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- CLI

MAZE_METRICS = [
    "charts/episodic_return",
    "charts/avg_episodic_return",
    "charts/SPS",
    "charts/learning_rate",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "charts/init_value",
    "charts/optimal_value",
    "charts/star_blind_value",
    "charts/repr_dist",
    "charts/repr_dist_normalized",
    "charts/p_up_top_star",
    "charts/p_up_bottom_star",
    "charts/p_right_top_star",
    "charts/p_right_bottom_star",
    "charts/sir",
]
TINY = ("--num-envs", "8", "--num-steps", "16", "--total-timesteps", "384")


@pytest.mark.parametrize(
    "mode,flags",
    [
        ("deepspi", ()),
        ("ppo", ("--reward-loss-coef", "0", "--transition-loss-coef", "0")),
        ("deep_mdp", ("--deep-mdp",)),
        ("mask_next_done", ("--mask-next-done", "--no-dedup-obs", "--n", "3", "--epsilon", "0.1")),
    ],
)
def test_cli_smoke(tmp_path, mode, flags):
    result = run_script("deepspi_maze.py", *TINY, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    world_model = ["losses/reward_loss", "losses/transition_loss"] if mode != "ppo" else []
    assert_finite_metrics(scalars, MAZE_METRICS + world_model)
    if mode == "ppo":
        assert "losses/reward_loss" not in scalars
    assert len(scalars["charts/init_value"]) == 3
    maze = M.ConfoundingMaze(*((3, 0.1) if mode == "mask_next_done" else (5, 0.2)), 0.99)
    # V* by value iteration, the star-blind value as V of "RIGHT everywhere": oracles independent of the closed forms
    assert scalars["charts/optimal_value"] == pytest.approx([bellman_optimal(maze)[maze.initial_state]] * 3, rel=1e-6)
    v_blind = M.policy_value(maze, scripted(maze, top_up=False))[maze.initial_state]
    assert scalars["charts/star_blind_value"] == pytest.approx([v_blind] * 3, rel=1e-6)
    # the last iteration logs the exact evaluation of the policy after the last update, the one in checkpoint.pt
    # (TensorBoard keeps float32: rel 1e-6)
    agent = M.Agent(4)
    agent.load_state_dict(torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"])
    with torch.inference_mode():
        pi = agent.actor(agent.network(agent.encode(torch.as_tensor(maze.observations)))).softmax(-1).double().numpy()
    assert scalars["charts/init_value"][-1] == pytest.approx(M.policy_value(maze, pi)[maze.initial_state], rel=1e-6)
    for star, name in ((maze.top_star, "top"), (maze.bottom_star, "bottom")):
        for action, verb in ((UP, "up"), (RIGHT, "right")):
            assert scalars[f"charts/p_{verb}_{name}_star"][-1] == pytest.approx(pi[star, action], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--n", "1"), "--n"),
        (("--epsilon", "0"), "--epsilon"),
        (("--epsilon", "1"), "--epsilon"),
        (("--gamma", "1"), "--gamma"),
        (("--gamma", "0.5"), "--gamma"),
        (("--num-envs", "0"), "--num-envs"),
        (("--max-steps", "0"), "--max-steps"),
        (("--num-envs", "3", "--num-steps", "3"), "divisible"),
        (("--total-timesteps", "100"), "--total-timesteps 100 < one batch"),
        (("--n", "1"), "--n 1 must be at least 2 (n = 1 is degenerate: F overwrites @)"),
        (("--epsilon", "nan"), "--epsilon nan must be in (0, 1)"),
        (("--gamma", "1.0"), "--gamma 1.0 must be in (0.5, 1), as the theory assumes"),
        (("--gamma", "nan"), "--gamma nan must be in (0.5, 1)"),
        (("--gae-lambda", "1.5"), "--gae-lambda 1.5 must be in [0, 1]"),
        (("--learning-rate", "0"), "--learning-rate 0.0 must be positive"),
        (("--learning-rate", "nan"), "--learning-rate nan must be positive and finite"),
        (("--clip-coef", "1.5"), "--clip-coef 1.5 must be in (0, 1)"),
        (("--vf-coef", "inf"), "--vf-coef inf must be non-negative and finite"),
        (("--ent-coef", "-0.01"), "--ent-coef -0.01 must be non-negative"),
        (("--reward-loss-coef", "-0.01"), "--reward-loss-coef -0.01 must be non-negative"),
        (("--max-grad-norm", "0"), "--max-grad-norm 0.0 must be positive"),
        (("--target-kl", "0"), "--target-kl 0.0 must be positive"),
        (("--max-steps", "-3"), "--max-steps -3 must be positive"),
        (("--checkpoint-every", "-1"), "--checkpoint-every -1 must be non-negative"),
    ],
)
def test_bad_input(tmp_path, flags, message):
    result = run_script("deepspi_maze.py", *flags, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "error" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs"))


# ---------------------------------------------------------------------------------------------------- learning


def test_deepspi_learns_small_maze_and_separates_the_stars_more_than_ppo(tmp_path):
    """A short DeepSPI run on n=2 beats the best star-blind policy (V_right = 1.950 < V* = 2.758). PPO does too, so what
    shows DeepSPI's world model is the representation: the latents of the two look-alike stars end further apart,
    relative to their size, than PPO's at the same seed and budget (final normalised distance 0.75-1.09 vs 0.47-0.57
    at seeds 1-3; 2.0x at seed 1). The figure tools in experiments/ read the same two runs from their event files."""
    flags = ("--n", "2", "--num-envs", "16", "--num-steps", "8", "--total-timesteps", "6144", "--num-minibatches", "2")
    flags += ("--update-epochs", "2", "--learning-rate", "1e-3", "--seed", "1")
    rows = {}
    for algo, extra in (("deepspi", ()), ("ppo", ("--reward-loss-coef", "0", "--transition-loss-coef", "0"))):
        result = run_script("deepspi_maze.py", *flags, *extra, "--exp-name", algo, cwd=tmp_path, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = glob.glob(str(tmp_path / "runs" / f"*__{algo}__1__*"))
        rows[algo] = read_scalars(run_dir)
    v_blind, v_star = M.star_blind_value(2, 0.2, 0.99), M.optimal_value(2, 0.2, 0.99)
    deepspi, ppo = rows["deepspi"], rows["ppo"]
    final = np.mean(deepspi["charts/init_value"][-5:])
    assert final > v_blind + 0.2, (final, v_blind, v_star)
    assert deepspi["charts/p_up_top_star"][-1] > 0.5 and deepspi["charts/p_up_bottom_star"][-1] < 0.2
    assert np.isfinite(deepspi["losses/transition_loss"]).all() and "losses/transition_loss" not in ppo
    separation = [np.mean(r["charts/repr_dist_normalized"][-5:]) for r in (deepspi, ppo)]
    assert separation[0] > 1.3 * separation[1], separation

    # experiments/maze_figure.py and maze_seeds.py on these runs: every iteration's row, from the event files
    tools = os.path.join(REPO, "experiments")
    cmd = [sys.executable, os.path.join(tools, "maze_figure.py"), "--extra=--n 2", "--out", "fig"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "fig_runs.csv", newline="") as f:
        table = list(csv.DictReader(f))
    for algo, scalars in rows.items():
        algo_rows = [r for r in table if r["algo"] == algo]
        assert [int(r["global_step"]) for r in algo_rows] == [128 * (i + 1) for i in range(48)]
        for column in ("init_value", "repr_dist_normalized", "p_up_top_star", "p_right_bottom_star", "sir"):
            assert [float(r[column]) for r in algo_rows] == pytest.approx(scalars[f"charts/{column}"], rel=1e-6), column
        wall = [float(r["wall_s"]) for r in algo_rows]
        assert wall == sorted(wall) and wall[0] >= 0
    assert all(math.isnan(float(r["transition_loss"])) for r in table if r["algo"] == "ppo")
    assert (tmp_path / "fig.png").stat().st_size > 1000 and "| DeepSPI | 1 | 6144 |" in (
        tmp_path / "fig_results.md"
    ).read_text()
    cmd = [sys.executable, os.path.join(tools, "maze_seeds.py"), "--n", "2", "--seeds", "1", "--at", "3072", "--out", "s"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "s.csv", newline="") as f:
        finals = {r["algorithm"]: float(r["final_value"]) for r in csv.DictReader(f)}
    assert finals == pytest.approx({"DeepSPI": deepspi["charts/init_value"][-1], "PPO": ppo["charts/init_value"][-1]})
