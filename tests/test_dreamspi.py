"""dreamspi_atari.py: imagined rollouts, the two losses, parameter isolation between the groups, and the real CLI."""

import json
import math
import os
import subprocess
import sys
import types
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    REPO,
    assert_finite_metrics,
    assert_normwise,
    bf16_tol,
    checkpoint_path,
    f32_tol,
    only_run_dir,
    read_scalars,
    run_script,
)
from deepspi_reference import minibatch_from_storage
from dreamspi_reference import imagination_step_loss, real_step_loss

import dreamspi_atari as ds

GAMMA, LAMBDA = 0.99, 0.95


def dream_args(**kw):
    base = dict(norm_adv=True, clip_coef=0.2, wm_clip_coef=0.05, ent_coef=0.01, vf_coef=0.5, reward_loss_coef=0.01)
    base.update(transition_loss_coef=5e-4, deep_mdp=False, clip_vloss=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def likely_done_agent(seed=0, n_actions=4, device="cpu"):
    """An agent whose done predictor says p ~ 0.5, so that hard dones of both values show up in short rollouts."""
    torch.manual_seed(seed)
    agent = ds.Agent(n_actions)
    with torch.no_grad():
        agent.done_predictor.fc2.weight.mul_(0.01)
    return agent.to(device)


def start_states(n=24, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.rand(n, 64, 7, 7, generator=g)  # real latents are post-ReLU, hence >= 0
    d0 = (torch.rand(n, generator=g) < 0.3).float()
    return z0.to(device), d0.to(device)


def real_minibatch(n_actions=4, b=16, seed=0, device="cpu"):
    """A random minibatch, drawn on the CPU (the same numbers on every device) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, n_actions, (b,), generator=g)
    logprobs = -1.4 + 0.2 * torch.randn(b, generator=g)  # some ratios fall outside the clip range
    advantages, returns = torch.randn(b, generator=g), torch.randn(b, generator=g)
    rewards = torch.randint(-1, 2, (b,), generator=g).float()
    wm_dones, next_dones = torch.zeros(b), torch.zeros(b)
    wm_dones[::5], next_dones[2::4] = 1, 1
    return tuple(x.to(device) for x in (obs, next_obs, actions, logprobs, advantages, returns, rewards, wm_dones, next_dones))


def make_optimizers(agent):
    lrs = {"encoder": 2e-4, "world_model": 2e-4, "actor": 2.75e-5, "critic": 2.75e-5}
    return {name: torch.optim.Adam(p, lr=lrs[name], eps=1e-5) for name, p in agent.param_groups().items()}


def snapshot(agent):
    return {name: [p.detach().clone() for p in params] for name, params in agent.param_groups().items()}


def changed(agent, before):
    """Per group: did any parameter change?"""
    now = agent.param_groups()
    return {name: any(not torch.equal(a, b) for a, b in zip(now[name], before[name], strict=True)) for name in now}


# ------------------------------------------------------------------------------------------------ imagined rollouts
def test_imagined_rollout_invariants_hard_done(device):
    agent = likely_done_agent(device=device)
    z0, d0 = start_states(device=device)
    h_, n = 5, z0.shape[0]
    im = ds.imagine(agent, z0, d0, h_)
    assert im["obs"].shape == im["next_obs"].shape == (h_, n, 64, 7, 7)
    for key in ("actions", "logprobs", "values", "rewards", "dones", "next_dones"):
        assert im[key].shape == (h_, n), key
    assert im["next_value"].shape == (n,)
    assert not any(t.requires_grad for t in im.values())
    assert torch.equal(im["obs"][0], z0) and torch.equal(im["dones"][0], d0)
    for h in range(h_ - 1):
        assert torch.equal(im["obs"][h + 1], im["next_obs"][h])
        assert torch.equal(im["dones"][h + 1], im["next_dones"][h])
    nd = im["next_dones"]
    assert set(nd.unique().tolist()) == {0.0, 1.0}  # hard dones, and both values occur
    frozen = nd.bool()
    assert torch.equal(im["next_obs"][frozen], im["obs"][frozen])  # a predicted termination keeps z' = z
    assert not torch.equal(im["next_obs"][~frozen], im["obs"][~frozen])
    with torch.no_grad():
        for h in range(h_):
            z, a = im["obs"][h], im["actions"][h]
            assert torch.equal(im["rewards"][h], agent.reward_model(z, a))  # exactly the reward head
            hidden = agent.network(z)
            logp = F.log_softmax(agent.actor(hidden), dim=1).gather(1, a.view(-1, 1)).squeeze(1)
            torch.testing.assert_close(im["logprobs"][h], logp)
            torch.testing.assert_close(im["values"][h], agent.critic(hidden).view(-1))
        torch.testing.assert_close(im["next_value"], agent.critic(agent.network(im["next_obs"][-1])).view(-1))
    assert (im["logprobs"] <= 0).all()


def test_imagined_rollout_soft_done(device):
    agent = likely_done_agent(seed=2, device=device)
    z0, d0 = start_states(seed=3, device=device)
    im = ds.imagine(agent, z0, d0, 3, soft_done=True)
    nd = im["next_dones"]
    assert ((nd > 0) & (nd < 1)).all()  # probabilities, not draws
    with torch.no_grad():
        for h in range(3):
            # d' is the predictor's probability on z', and z' is the unfrozen transition sample
            torch.testing.assert_close(nd[h], torch.sigmoid(agent.done_predictor(im["next_obs"][h])))
            assert not torch.equal(im["next_obs"][h], im["obs"][h])
    for h in range(2):
        assert torch.equal(im["dones"][h + 1], nd[h]) and torch.equal(im["obs"][h + 1], im["next_obs"][h])


@pytest.mark.parametrize("soft_done", [False, True])
def test_gae_with_horizon_one_is_the_td_error(soft_done, device):
    agent = likely_done_agent(seed=4, device=device)
    z0, d0 = start_states(seed=5, device=device)
    im = ds.imagine(agent, z0, d0, 1, soft_done=soft_done)
    adv, ret = ds.compute_gae(im, GAMMA, LAMBDA)
    with torch.no_grad():
        v_next = agent.critic(agent.network(im["next_obs"][0])).view(-1)
    td = im["rewards"][0] + GAMMA * (1 - im["next_dones"][0]) * v_next - im["values"][0]
    torch.testing.assert_close(adv[0], td)
    torch.testing.assert_close(ret, adv + im["values"])


@pytest.mark.parametrize("logit", [-2.0, 0.0, 1.5])
def test_done_sampling_frequency(logit):
    torch.manual_seed(7)
    n = 100_000
    draws = ds.sample_done(torch.full((n,), logit))
    p = 1 / (1 + math.exp(-logit))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert abs(draws.mean().item() - p) < 3 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(ds.sample_done(torch.full((3,), logit), soft=True), torch.full((3,), p))


# --------------------------------------------------------------------------------------------------------- the losses
def test_world_model_losses_hold_the_done_loss_on_the_reset_masked_target(device):
    """Agent.world_model_losses: the reward and transition losses of deepspi_atari.py's method, and the done loss
    Huber(sigmoid(D(z')) + 1e-8, next done) on the same target z' (phi(s) for a reset transition), which trains D."""
    torch.manual_seed(8)
    agent = ds.Agent(4).to(device)
    obs, next_obs, actions, _, _, _, rewards, resets, next_dones = real_minibatch(device=device)
    eps = torch.randn(16, 5, 64, 7, 7).clamp(-1, 1).to(device)
    z, next_z = agent.encode(obs), agent.encode(next_obs)
    reward_loss, transition_loss, done_loss = agent.world_model_losses(z, next_z, actions, rewards, resets, next_dones, eps)
    target = torch.where(resets.bool().view(-1, 1, 1, 1), z, next_z)
    assert resets.any() and not resets.all()  # both targets occur
    with torch.no_grad():
        expected = F.smooth_l1_loss(torch.sigmoid(agent.done_predictor(target)) + 1e-8, next_dones, reduction="none")
        sample = agent.transition_model(z, actions, eps)[0]
    torch.testing.assert_close(done_loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(reward_loss, F.smooth_l1_loss(agent.reward_model(z, actions), rewards, reduction="none"))
    torch.testing.assert_close(transition_loss, F.smooth_l1_loss(sample, target, reduction="none").sum((1, 2, 3)))
    done_loss.sum().backward()
    for name, p in agent.done_predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("clip_vloss", [False, True])
def test_imagination_loss_is_plain_ppo_on_latents(clip_vloss, device):
    torch.manual_seed(9)
    agent = ds.Agent(4).to(device)
    g = torch.Generator().manual_seed(9)
    z = torch.rand(32, 64, 7, 7, generator=g)
    actions = torch.randint(0, 4, (32,), generator=g)
    logprobs = -1.4 + 0.3 * torch.randn(32, generator=g)
    adv, ret, values = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g)
    z, actions, logprobs, adv, ret, values = (x.to(device) for x in (z, actions, logprobs, adv, ret, values))
    args = dream_args(clip_vloss=clip_vloss)
    loss, terms, (old_kl, kl, clipfrac) = ds.imagination_loss(agent, args, z, actions, logprobs, adv, ret, values)
    hidden = agent.network(z)
    probs = torch.distributions.Categorical(logits=agent.actor(hidden))
    ratio = (probs.log_prob(actions) - logprobs).exp()
    assert ((ratio - 1).abs() > 0.2).any()
    a = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    pg = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()  # clip_coef, not wm_clip_coef
    v = (agent.critic(hidden).view(-1) - ret) ** 2
    if clip_vloss:  # CleanRL's clipped value loss, with the imagination step's clip_coef
        v_clipped = values + (agent.critic(hidden).view(-1) - values).clamp(-0.2, 0.2)
        assert ((agent.critic(hidden).view(-1) - values).abs() > 0.2).any()
        v = torch.max(v, (v_clipped - ret) ** 2)
    torch.testing.assert_close(loss, pg - 0.01 * probs.entropy().mean() + 0.5 * 0.5 * v.mean())
    torch.testing.assert_close(terms, torch.stack([pg, 0.5 * v.mean(), probs.entropy().mean()]))
    torch.testing.assert_close(clipfrac, ((ratio - 1).abs() > 0.2).float().mean())
    torch.testing.assert_close(kl, ((ratio - 1) - (ratio.log())).mean())
    torch.testing.assert_close(old_kl, -ratio.log().mean())
    assert not any(t.requires_grad for t in (old_kl, kl, clipfrac))


def test_bf16_autocast_keeps_sigma_ratio_losses_and_imagined_targets_in_float32(device):
    """Under --bf16's autocast every convolution and linear layer computes in bfloat16, but the spectral norms equal the
    float32 ones exactly, the world-model losses (done loss included) and the imagination loss are float32 and close to
    the float32 ones, and an imagined rollout's rewards, dones, values and log-probabilities (GAE's inputs) are float32."""
    torch.manual_seed(14)
    agent = ds.Agent(4).to(device)
    obs, next_obs, actions, logprobs, adv, ret, rewards, resets, next_dones = real_minibatch(b=32, seed=14, device=device)
    eps = torch.randn(32, 5, 64, 7, 7).clamp(-1, 1).to(device)

    def losses():
        z, next_z = agent.encode(torch.cat([obs, next_obs])).tensor_split([32])
        wm = agent.world_model_losses(z, next_z, actions, rewards, resets, next_dones, eps)
        return *wm, ds.imagination_loss(agent, dream_args(), z, actions, logprobs, adv, ret, adv)[0]

    ref = losses()
    layers = [m for m in agent.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, ds.SNLinear, ds.SNConv2d))]
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in layers]
    sn = [m for m in layers if isinstance(m, (ds.SNLinear, ds.SNConv2d))]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = losses()
        sigmas16 = [m.sigma() for m in sn]
    for h in hooks:
        h.remove()
    # all but the transition head's conv2, which runs through its gathered weights (an einsum, autocast too)
    assert len(dtypes) == len(layers) - 1 and set(dtypes) == {torch.bfloat16}
    for m, sigma in zip(sn, sigmas16, strict=True):
        assert sigma.dtype == torch.float32 and torch.equal(sigma, m.sigma())
    assert all(x.dtype == torch.float32 for x in got)
    # products in a row: the encoder's 3 convolutions, then the reward head's 3 layers, the transition head's 2
    # convolutions and mixture layer, the done predictor's 2 layers, or the torso and a head (imagination loss)
    for name, g, r, n in zip(("reward", "transition", "done", "imagination"), got, ref, (6, 6, 5, 5), strict=True):
        assert_normwise(g, r, bf16_tol(n), name)
    z0, d0 = start_states(n=8, seed=14, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        imagined = ds.imagine(agent, z0, d0, 2)
    for key in ("rewards", "next_dones", "values", "next_value", "logprobs", "obs"):
        assert imagined[key].dtype == torch.float32, key


# ------------------------------------------------------------------------------------------------- parameter groups
def test_parameter_groups_partition_the_agent():
    agent = ds.Agent(6)
    groups = agent.param_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in agent.parameters()}
    assert {id(p) for p in agent.network.parameters()} <= {id(p) for p in groups["actor"]}
    assert {id(p) for p in groups["critic"]} == {id(p) for p in agent.critic.parameters()}
    assert {id(p) for p in agent.done_predictor.parameters()} <= {id(p) for p in groups["world_model"]}


def test_imagination_update_changes_no_encoder_or_world_model_parameter(device):
    agent = likely_done_agent(seed=10, device=device)
    optimizers = make_optimizers(agent)
    z0, d0 = start_states(n=32, seed=11, device=device)
    im = ds.imagine(agent, z0, d0, 4)
    adv, ret = ds.compute_gae(im, GAMMA, LAMBDA)
    before = snapshot(agent)
    flat = [t.flatten(0, 1) for t in (im["obs"], im["actions"], im["logprobs"], adv, ret, im["values"])]
    loss, _, _ = ds.imagination_loss(agent, dream_args(), *flat)
    ds.step_groups(loss, agent, optimizers, ["actor", "critic"], 0.5)
    groups = agent.param_groups()
    assert all(p.grad is None for p in groups["encoder"] + groups["world_model"])  # no gradient even reached them
    assert changed(agent, before) == {"encoder": False, "world_model": False, "actor": True, "critic": True}


@pytest.mark.parametrize("dyna_style", [False, True])
def test_real_step_changes_no_actor_or_critic_parameter(dyna_style, device):
    torch.manual_seed(12)
    agent = ds.Agent(4).to(device)
    optimizers = make_optimizers(agent)
    before = snapshot(agent)
    loss, _ = real_step_loss(agent, dream_args(), *real_minibatch(seed=12, device=device))
    names = ["encoder", "world_model"] + (["actor", "critic"] if dyna_style else [])
    ds.step_groups(loss, agent, optimizers, names, 0.5)
    assert changed(agent, before) == {"encoder": True, "world_model": True, "actor": dyna_style, "critic": dyna_style}
    done_params = list(agent.done_predictor.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(done_params, before["world_model"][-len(done_params) :], strict=True))


def test_each_group_is_clipped_on_its_own(device):
    torch.manual_seed(13)
    agent = ds.Agent(4).to(device)
    optimizers = make_optimizers(agent)
    loss, _ = real_step_loss(agent, dream_args(), *real_minibatch(seed=13, device=device))
    ds.step_groups(1e4 * loss, agent, optimizers, ["encoder", "world_model"], 0.5)
    for name in ("encoder", "world_model"):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in agent.param_groups()[name]]))
        assert norm.item() == pytest.approx(0.5, rel=1e-4), name


# ------------------------------------------------------------------------------------------------------- the real CLI
METRICS = [
    "charts/SPS",
    "charts/sir",
    "charts/encoder_learning_rate",
    "charts/world_model_learning_rate",
    "charts/actor_learning_rate",
    "charts/critic_learning_rate",
    "repr_wm/reward_loss",
    "repr_wm/transition_loss",
    "repr_wm/done_loss",
    "imagination/reward_mean",
    "imagination/done_rate",
    "imagination/return_mean",
    "imagination/real_return_mean",
    "imagination/real_reward_mean",
    "imagination/real_done_rate",
] + [
    f"{prefix}/{m}"
    for prefix in ("repr_wm", "imagination")
    for m in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "explained_variance")
]


def hyperparameters(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = [line.strip("|").split("|") for line in text.splitlines()[2:]]
    return {key: value for key, value in rows}


@pytest.mark.parametrize(
    "flags",
    [
        ["--num-envs", "2", "--num-steps", "96", "--total-timesteps", "384", "--update-epochs", "1"],
        ["--num-envs", "2", "--num-steps", "16", "--total-timesteps", "64", "--env-backend", "gymnasium"]
        + ["--soft-done", "--dyna-style", "--clip-vloss"],
        ["--num-envs", "2", "--num-steps", "96", "--total-timesteps", "384", "--update-epochs", "1", "--bf16"],
    ],
    ids=["envpool", "gymnasium-soft-done-dyna-clip-vloss", "bf16"],
)
def test_cli_smoke(tmp_path, flags):
    proc = run_script(
        "dreamspi_atari.py", "--env-id", "BreakoutNoFrameskip-v4", "--imagination-horizon", "2", *flags, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    assert_finite_metrics(scalars, METRICS)
    assert not any(tag.startswith("losses/") for tag in scalars)
    hp = hyperparameters(run_dir)
    assert int(hp["imagination_batch_size"]) == int(hp["imagination_horizon"]) * int(hp["batch_size"])
    # each group's learning rate at iteration k is lr0 * (1 - (k - 1) / num_iterations)
    n_it = int(hp["num_iterations"])
    for name, lr0 in [("encoder", 2e-4), ("world_model", 2e-4), ("actor", 2.75e-5), ("critic", 2.75e-5)]:
        expected = [lr0 * (1 - k / n_it) for k in range(n_it)]
        assert scalars[f"charts/{name}_learning_rate"] == pytest.approx(expected, rel=1e-6), name
    assert len(scalars["charts/SPS"]) == n_it
    # the real batch's counterparts of the imagined rates: means of 0/1 values (Breakout's clipped rewards, the done
    # labels) over one batch, so each is a whole number of that batch's steps
    batch = int(hp["batch_size"])
    for tag in ("imagination/real_reward_mean", "imagination/real_done_rate"):
        counts = [x * batch for x in scalars[tag]]
        assert all(0 <= c <= batch and c == pytest.approx(round(c), abs=batch * 6e-8) for c in counts), (tag, counts)
    if "--soft-done" in flags:
        assert 0 < scalars["imagination/done_rate"][0] < 1
    else:  # a full game of Breakout was played, its raw score logged
        assert_finite_metrics(scalars, ["charts/episodic_return", "charts/avg_episodic_return"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--imagination-horizon", "0"], "--imagination-horizon 0 must be positive"),
        (["--imagination-epochs", "0"], "--imagination-epochs 0 must be positive"),
        (["--wm-clip-coef", "1.5"], "--wm-clip-coef 1.5 must be in (0, 1)"),
        (["--wm-clip-coef", "0"], "--wm-clip-coef 0.0 must be in (0, 1)"),
        (["--clip-coef", "1.5"], "--clip-coef 1.5 must be in (0, 1)"),
        (["--env-id", "Breakot-v5"], "did you mean Breakout-v5"),
        (["--num-envs", "3", "--num-steps", "5"], "not divisible by --num-minibatches"),
        (["--total-timesteps", "100"], "--total-timesteps 100 < one batch"),
        (["--gamma", "1.0"], "--gamma 1.0 must be in (0.5, 1)"),
        (["--gamma", "0.3"], "--gamma 0.3 must be in (0.5, 1)"),
        (["--gae-lambda", "1.5"], "--gae-lambda 1.5 must be in [0, 1]"),
        (["--encoder-learning-rate", "0"], "--encoder-learning-rate 0.0 must be positive and finite"),
        (["--world-model-learning-rate", "-1e-4"], "--world-model-learning-rate -0.0001 must be positive and finite"),
        (["--actor-learning-rate", "nan"], "--actor-learning-rate nan must be positive and finite"),
        (["--critic-learning-rate", "inf"], "--critic-learning-rate inf must be positive and finite"),
        (["--vf-coef", "inf"], "--vf-coef inf must be non-negative and finite"),
        (["--ent-coef", "-0.01"], "--ent-coef -0.01 must be non-negative"),
        (["--reward-loss-coef", "-0.01"], "--reward-loss-coef -0.01 must be non-negative"),
        (["--transition-loss-coef", "-1e-4"], "--transition-loss-coef -0.0001 must be non-negative"),
        (["--max-grad-norm", "0"], "--max-grad-norm 0.0 must be positive"),
        (["--target-kl", "0"], "--target-kl 0.0 must be positive"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1 must be non-negative"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    proc = run_script("dreamspi_atari.py", *flags, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def env_config(envs):
    """(sticky-action probability, no-op maximum) of what make_envs returned, on either backend."""
    if hasattr(envs, "config"):  # envpool
        return envs.config["repeat_action_probability"], envs.config["noop_max"]
    return envs.envs[0].unwrapped.ale.getFloat("repeat_action_probability"), envs.envs[0].get_wrapper_attr("noop_max")


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_stochastic_env_has_sticky_actions_and_60_noops(backend):
    """--stochastic-env: the official stochastic ALE, sticky actions 0.3 and up to 60 no-ops, whatever the id says."""
    for env_id, sticky in [("BreakoutNoFrameskip-v4", 0.0), ("ALE/Breakout-v5", 0.25)]:
        for stochastic, expected in [(False, (sticky, 30)), (True, (0.3, 60))]:
            envs = ds.make_envs(env_id, backend, num_envs=1, seed=1, stochastic=stochastic)
            got = env_config(envs)
            envs.close()
            assert got[0] == pytest.approx(expected[0]) and got[1] == expected[1], (env_id, stochastic, got)


# The real CLI under a recorder that keeps the (sticky, noop_max) of the envs that make_envs returns, then lets it run
ENV_RECORDER = r"""
import json, os, runpy, sys

script, record = os.environ["SCRIPT"], []


def on_return(frame, event, arg):
    if event == "return" and hasattr(arg, "config"):  # envpool
        record.append((arg.config["repeat_action_probability"], arg.config["noop_max"]))
    elif event == "return":
        env = arg.envs[0]
        record.append((env.unwrapped.ale.getFloat("repeat_action_probability"), env.get_wrapper_attr("noop_max")))
    return on_return


def trace(frame, event, arg):
    if frame.f_code.co_filename == script and frame.f_code.co_name == "make_envs":
        frame.f_trace_lines = False
        return on_return
    return None


sys.argv = [script, *sys.argv[1:]]
sys.settrace(trace)
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(os.environ["RECORD"], "w") as f:
        json.dump(record, f)
"""


def test_cli_stochastic_env_reaches_the_training_envs(tmp_path):
    """A tiny --stochastic-env run (one iteration): the training envs are the stochastic ALE (sticky actions 0.3, up to
    60 no-ops), and the run saves the flag for evaluate.py."""
    (tmp_path / "recorder.py").write_text(ENV_RECORDER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=os.path.join(REPO, "dreamspi_atari.py"), RECORD=str(tmp_path / "r"))
    flags = ["--num-envs", "2", "--num-steps", "16", "--total-timesteps", "32", "--imagination-horizon", "1"]
    cmd = [sys.executable, str(tmp_path / "recorder.py"), "--no-progress", "--stochastic-env", *flags]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_finite_metrics(read_scalars(only_run_dir(tmp_path)), METRICS)
    assert torch.load(checkpoint_path(tmp_path), weights_only=False)["args"]["stochastic_env"] is True
    got = json.loads((tmp_path / "r").read_text())
    assert len(got) == 1 and all(s == pytest.approx(0.3) and noops == 60 for s, noops in got), got


# ------------------------------------------------------------------------------ the training loop, watched from outside
# The real CLI under a recorder that is not part of the script: it wraps the env that make_envs returns (its reset and
# step results are the oracle: the done flag of an observation is terminated | truncated of the step that produced it),
# copies the arguments of imagine with the agent's weights, and, through sys.settrace, what the loop holds when it is
# about to run chosen lines: the weights and the random state before a minibatch's forward pass (for the first
# minibatches of each step), and the minibatch and the loss terms when the step's backward pass begins.
LOOP_RECORDER = r"""
import os, runpy, sys
import numpy as np
import torch

script = os.environ["SCRIPT"]
record = dict(reset=[], steps=[], imagine=[], real=[], imagined=[], before_real=[], before_imagined=[], storage=[])
source = [line.strip() for line in open(script)]
weights = lambda agent: {k: v.detach().clone() for k, v in agent.state_dict().items()}
REAL = ["b_obs", "b_next_obs", "b_actions", "b_logprobs", "b_advantages", "b_returns", "b_rewards", "b_resets"]
REAL = [f"{b}[mb_inds]" for b in REAL + ["b_next_dones", "b_values"]]
REAL += ["loss", "pg_loss", "v_loss", "entropy_loss", "mb_advantages", "reward_loss", "transition_loss", "done_loss"]
REAL += ["mb_inds", "iteration"]
STORAGE = ["obs", "actions", "logprobs", "rewards", "dones", "values", "next_value", "iteration"]
IMAGINED = [f"{i}[mb_inds]" for i in ("i_obs", "i_actions", "i_logprobs", "i_advantages", "i_returns", "i_values")]
IMAGINED += ["loss", "terms"]
LINES = {  # line -> (record key, expressions); "before": the weights, random state and iteration
    "b_inds = np.arange(args.batch_size)": ("storage", STORAGE),
    "mb_obs = torch.cat([b_obs[mb_inds], b_next_obs[mb_inds]])": ("before_real", None),
    "step_groups(loss, agent, optimizers, real_groups, args.max_grad_norm)": ("real", REAL),
    "mb = (i_obs[mb_inds], i_actions[mb_inds], i_logprobs[mb_inds], i_advantages[mb_inds], i_returns[mb_inds])": (
        "before_imagined", None),
    'step_groups(loss, agent, optimizers, ["actor", "critic"], args.max_grad_norm)': ("imagined", IMAGINED),
}
MAX_BEFORE = int(os.environ["MAX_BEFORE"])  # weights are large: the first minibatches of each step, per iteration
for line in LINES:  # a line edited away: one line naming it, the script and the test, before the run
    if line not in source:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        sys.exit(f"tests/test_dreamspi.py's recorder: the line {line!r} is not in {os.path.basename(script)}, and {test} "
                 "observes it; if the script was edited on purpose, update LOOP_RECORDER's LINES (docs/tests.md)")


def watch(envs):
    reset, step = envs.reset, envs.step

    def watched_reset(*args, **kwargs):
        result = reset(*args, **kwargs)
        record["reset"].append(torch.as_tensor(np.array(result[0])))
        return result

    def watched_step(actions):
        result = step(actions)
        record["steps"].append((torch.as_tensor(np.array(result[0])), torch.as_tensor(np.logical_or(result[2], result[3]))))
        return result

    envs.reset, envs.step = watched_reset, watched_step


def on_return(frame, event, arg):
    if event == "return":
        watch(arg)
    return on_return


def on_line(frame, event, arg):
    if event == "line" and source[frame.f_lineno - 1] in LINES:
        key, exprs = LINES[source[frame.f_lineno - 1]]
        loop = frame.f_locals
        if exprs is not None:
            values = {e: eval(e, frame.f_globals, loop) for e in exprs}
            record[key].append({e: v.detach().clone() if torch.is_tensor(v) else np.copy(v) for e, v in values.items()})
        elif sum(r["iteration"] == loop["iteration"] for r in record[key]) < MAX_BEFORE:
            entry = dict(iteration=loop["iteration"], weights=weights(loop["agent"]), rng=torch.get_rng_state())
            record[key].append(entry)
    return on_line


def trace(frame, event, arg):
    if frame.f_code.co_filename != script:
        return None
    name, args = frame.f_code.co_name, frame.f_locals
    if name == "<module>":
        return on_line
    if name == "make_envs":
        frame.f_trace_lines = False
        return on_return
    if name == "imagine":
        record["imagine"].append(dict(z0=args["z0"].clone(), d0=args["d0"].clone(), weights=weights(args["agent"])))
    return None


sys.argv = [script, *sys.argv[1:]]
sys.settrace(trace)
runpy.run_path(script, run_name="__main__")
sys.settrace(None)
torch.save(record, os.environ["RECORD"])
"""
# 2 iterations of 2 envs x 32 steps: both envs lose a life inside the batches; 2 x 2 real and 1 x 2 x 2 imagined minibatches
EPOCHS = 2
LOOP = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "128", "--num-minibatches", "2"]
LOOP += ["--update-epochs", str(EPOCHS), "--imagination-horizon", "2", "--imagination-epochs", "1"]


def record_loop(cwd, backend, *flags, max_before=0):
    """(what the recorder saw, the final checkpoint.pt) of a recorded LOOP run with these flags."""
    (cwd / "recorder.py").write_text(LOOP_RECORDER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=os.path.join(REPO, "dreamspi_atari.py"), RECORD=str(cwd / "r.pt"))
    env.update(MAX_BEFORE=str(max_before), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(cwd / "recorder.py"), "--no-progress", "--env-backend", backend, *LOOP, *flags]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(cwd / "r.pt", weights_only=False), torch.load(checkpoint_path(cwd), weights_only=False)


@pytest.fixture(scope="module")
def recorded_loop(tmp_path_factory):
    """backend -> (what the recorder saw, the final checkpoint.pt, per-env observations (S+1, N, ...) and their done flags)."""
    runs = {}

    def run(backend):
        if backend not in runs:
            rec, saved = record_loop(tmp_path_factory.mktemp(f"loop_{backend}"), backend, max_before=1)
            (first_obs,) = rec["reset"]
            obs = torch.stack([first_obs] + [o for o, _ in rec["steps"]])
            flags = torch.stack([torch.zeros(first_obs.shape[0], dtype=torch.bool)] + [d for _, d in rec["steps"]]).float()
            assert obs.shape[:2] == (2 * 32 + 1, 2) and len(rec["imagine"]) == len(rec["before_real"]) == 2
            runs[backend] = rec, saved, obs, flags
        return runs[backend]

    return run


def group_keys():
    """{group: the state_dict keys of its parameters}"""
    agent = ds.Agent(4)
    names = {id(p): k for k, p in agent.named_parameters()}
    return {group: {names[id(p)] for p in params} for group, params in agent.param_groups().items()}


def moved(before, after):
    """Per group: did any of its parameters change (False: all bit-identical)?"""
    return {g: any(not torch.equal(before[k], after[k]) for k in keys) for g, keys in group_keys().items()}


def test_loop_real_step_moves_only_encoder_and_world_model_imagination_only_actor_and_critic(recorded_loop):
    rec, saved, _, _ = recorded_loop("gymnasium")
    starts = [r["weights"] for r in rec["before_real"]]
    for before, imagined, after in zip(starts, rec["imagine"], starts[1:] + [saved["model"]], strict=True):
        assert moved(before, imagined["weights"]) == {"encoder": True, "world_model": True, "actor": False, "critic": False}
        assert moved(imagined["weights"], after) == {"encoder": False, "world_model": False, "actor": True, "critic": True}


def test_loop_adam_step_counts_of_the_four_groups(recorded_loop):
    """2 iterations: encoder and world model 2 x 2 epochs x 2 minibatches, actor and critic 2 x 1 epoch x (2 x H=2)."""
    _, saved, _, _ = recorded_loop("gymnasium")
    expected = {"encoder": 8, "world_model": 8, "actor": 8, "critic": 8}
    for group, keys in group_keys().items():
        state = saved["optimizers"][group]["state"]
        assert len(state) == len(keys), group  # every parameter of the group took its steps
        assert {int(s["step"]) for s in state.values()} == {expected[group]}, group


def test_loop_imagines_from_every_encoded_real_state_with_its_own_done_flag(recorded_loop):
    rec, _, obs, flags = recorded_loop("gymnasium")
    t_ = 32
    for k, imagined in enumerate(rec["imagine"]):
        start_obs, start_flags = obs[k * t_ : (k + 1) * t_].flatten(0, 1), flags[k * t_ : (k + 1) * t_].flatten(0, 1)
        assert start_flags.any() and not torch.equal(start_flags, flags[k * t_ + 1 : (k + 1) * t_ + 1].flatten(0, 1))
        agent = ds.Agent(4)
        agent.load_state_dict(imagined["weights"])
        with torch.no_grad():  # the encoder after this iteration's real-data step
            latents = agent.encode(start_obs).flatten(1)
        dist = torch.cdist(imagined["z0"].flatten(1), latents)
        assert dist.min(1).values.max() < 1e-3 * latents.norm(dim=1).min()
        # equal observations (a game's first frames repeat) are one class: compare the multisets of (class, done flag)
        same = [next(i for i in range(len(start_obs)) if torch.equal(start_obs[i], o)) for o in start_obs]
        starts = Counter((same[j], d) for j, d in zip(dist.argmin(1).tolist(), imagined["d0"].tolist(), strict=True))
        assert starts == Counter(zip(same, start_flags.tolist(), strict=True))  # every real state, with its own flag


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_loop_done_label_is_the_next_observations_flag_and_the_reset_mask_follows_the_backend(recorded_loop, backend):
    rec, _, obs, flags = recorded_loop(backend)
    t_, calls = 32, EPOCHS * 2  # per iteration: EPOCHS epochs over the batch, 2 minibatches each
    # envpool resets one step late: (o, o') is a reset when o is flagged; gymnasium resets at once: when o' is
    mask = 0 if backend == "envpool" else 1
    for k in range(2):
        expected, got = Counter(), Counter()
        for t in range(k * t_, (k + 1) * t_):  # each transition (o, o') with the label "was the episode over at o'?"
            for e in range(obs.shape[1]):
                key = (obs[t, e].numpy().tobytes(), obs[t + 1, e].numpy().tobytes())
                expected[key, flags[t + mask, e].item(), flags[t + 1, e].item()] += EPOCHS  # once per epoch
        for mb in rec["real"][k * calls : (k + 1) * calls]:
            names = ("b_obs[mb_inds]", "b_next_obs[mb_inds]", "b_resets[mb_inds]", "b_next_dones[mb_inds]")
            for o, o_next, reset, label in zip(*(mb[n] for n in names), strict=True):
                got[(o.numpy().tobytes(), o_next.numpy().tobytes()), reset.item(), label.item()] += 1
        assert got == expected
        # labels that the done flag of o would get wrong are in the batch
        assert any(flags[t + 1].ne(flags[t]).any() for t in range(k * t_, (k + 1) * t_))


# two float32 computations of the loss: the longest chain of sums runs through the encoder (fan-ins 256, 512, 576), the
# transition head (256, 32) and the transition loss's sum over the latent (3136), about 5,000 terms in all
LOSS_TOL = f32_tol(5000, computations=2)


# clip-vloss-dyna: clips so small that the values leave both bands within the minibatches compared
CLIP_VLOSS = [
    "--clip-vloss",
    "--dyna-style",
    "--clip-coef",
    "0.001",
    "--wm-clip-coef",
    "0.0005",
    "--critic-learning-rate",
    "1e-3",
]


@pytest.mark.parametrize("flags", [[], CLIP_VLOSS], ids=["default", "clip-vloss-dyna"])
def test_the_loop_trains_on_the_reference_losses(tmp_path, flags):
    """The first two minibatches of each step of a real run (2 iterations) against tests/dreamspi_reference.py's losses
    on the same minibatch, weights and random state (the transition noise): the real-data step's loss, its terms, the
    utility that replaces the advantage (with the done loss inside) and the per-sample world-model losses, and the
    imagination step's loss and terms. The references are pinned to the official code (test_parity_official.py)."""
    # clips small and different (so that a step clipping with the other one's coefficient shows), a faster actor
    clips = ["--clip-coef", "0.01", "--wm-clip-coef", "0.002", "--actor-learning-rate", "1e-3"]
    rec, saved = record_loop(tmp_path, "gymnasium", *clips, *flags, max_before=2)
    args, clipped, value_clipped = types.SimpleNamespace(**saved["args"]), {"real": False, "imagined": False}, {}
    assert len(rec["real"]) == 2 * EPOCHS * 2 and len(rec["imagined"]) == 2 * 4
    real = [r for k, r in enumerate(rec["real"]) if k % (EPOCHS * 2) < 2]  # the first 2 minibatches of each iteration
    imagined = [r for k, r in enumerate(rec["imagined"]) if k % 4 < 2]
    storage = {int(r["iteration"]): r for r in rec["storage"]}
    for phase, befores, steps in (("real", rec["before_real"], real), ("imagined", rec["before_imagined"], imagined)):
        assert len(befores) == len(steps) == 4, phase
        for k, (before, got) in enumerate(zip(befores, steps, strict=True)):
            agent = ds.Agent(4, args.sn_faithful)
            agent.load_state_dict(before["weights"])
            torch.set_rng_state(before["rng"])  # the loop's transition noise
            if phase == "real":
                # every input from the rollout storage and mb_inds, not from the loop's b_* arrays (gymnasium: a
                # reset flag is the next step's done)
                mb = minibatch_from_storage(storage[int(got["iteration"])], got["mb_inds"], args.gamma, args.gae_lambda, True)
                names = ["obs", "next_obs", "actions", "logprobs", "advantages", "returns", "rewards", "resets"]
                batch = [mb[n] for n in names + ["next_dones"]]
                loss, out = real_step_loss(agent, args, *batch, values=mb["values"])
                pairs = [("mb_advantages", out["utility"])]  # the utility replaced the advantage
                pairs += [(f"{n}_loss", out[f"{n}_loss_per_sample"]) for n in ("reward", "transition", "done")]
                pairs += [(n, out[n]) for n in ("pg_loss", "v_loss", "entropy_loss")]
            else:
                names = ["i_obs", "i_actions", "i_logprobs", "i_advantages", "i_returns", "i_values"]
                loss, out = imagination_step_loss(agent, args, *(got[f"{n}[mb_inds]"] for n in names))
                pairs = [("terms", torch.stack([out["pg_loss"], out["v_loss"], out["entropy_loss"]]))]
            for key, ref in [("loss", loss), *pairs]:
                assert_normwise(got[key], ref, LOSS_TOL, f"{phase} {k} {key}")
            clip = args.wm_clip_coef if phase == "real" else args.clip_coef
            clipped[phase] |= bool(((out["ratio"] - 1).abs() > clip).any())
            values = got["b_values[mb_inds]" if phase == "real" else "i_values[mb_inds]"]
            value_clipped[phase] = value_clipped.get(phase, False) or bool(((out["newvalue"] - values).abs() > clip).any())
    assert clipped == {"real": True, "imagined": True}  # each step's clip is exercised
    if args.clip_vloss:  # and its value clip
        assert value_clipped == {"real": True, "imagined": True}
