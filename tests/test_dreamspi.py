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
    only_run_dir,
    read_scalars,
    run_script,
)

import dreamspi_atari as ds

GAMMA, LAMBDA = 0.99, 0.95


def dream_args(**kw):
    base = dict(norm_adv=True, clip_coef=0.2, wm_clip_coef=0.05, ent_coef=0.01, vf_coef=0.5, reward_loss_coef=0.01)
    base.update(transition_loss_coef=5e-4, deep_mdp=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def likely_done_agent(seed=0, n_actions=4):
    """An agent whose done predictor says p ~ 0.5, so that hard dones of both values show up in short rollouts."""
    torch.manual_seed(seed)
    agent = ds.Agent(n_actions)
    with torch.no_grad():
        agent.done_predictor.fc2.weight.mul_(0.01)
    return agent


def start_states(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.rand(n, 64, 7, 7, generator=g)  # real latents are post-ReLU, hence >= 0
    d0 = (torch.rand(n, generator=g) < 0.3).float()
    return z0, d0


def real_minibatch(n_actions=4, b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, n_actions, (b,), generator=g)
    logprobs = -1.4 + 0.2 * torch.randn(b, generator=g)  # some ratios fall outside the clip range
    advantages, returns = torch.randn(b, generator=g), torch.randn(b, generator=g)
    rewards = torch.randint(-1, 2, (b,), generator=g).float()
    wm_dones, next_dones = torch.zeros(b), torch.zeros(b)
    wm_dones[::5], next_dones[2::4] = 1, 1
    return obs, next_obs, actions, logprobs, advantages, returns, rewards, wm_dones, next_dones


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
def test_imagined_rollout_invariants_hard_done():
    agent = likely_done_agent()
    z0, d0 = start_states()
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


def test_imagined_rollout_soft_done():
    agent = likely_done_agent(seed=2)
    z0, d0 = start_states(seed=3)
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
def test_gae_with_horizon_one_is_the_td_error(soft_done):
    agent = likely_done_agent(seed=4)
    z0, d0 = start_states(seed=5)
    im = ds.imagine(agent, z0, d0, 1, soft_done=soft_done)
    adv, ret = ds.compute_gae(im["rewards"], im["values"], im["next_dones"], im["next_value"], GAMMA, LAMBDA)
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
def test_real_step_loss_has_the_done_loss_in_the_utility():
    torch.manual_seed(8)
    agent = ds.Agent(4)
    obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones, next_dones = real_minibatch()
    eps = torch.randn(16, 5, 64, 7, 7).clamp(-1, 1)
    args = dream_args()
    loss, out = ds.compute_losses(agent, args, obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones, next_dones, eps)
    z, z_next = agent.encode(obs), agent.encode(next_obs)
    z_target = torch.where(wm_dones.bool().view(-1, 1, 1, 1), z, z_next)
    torch.testing.assert_close(out["z_target"], z_target)
    done_loss = F.smooth_l1_loss(torch.sigmoid(agent.done_predictor(z_target)) + 1e-8, next_dones, reduction="none")
    torch.testing.assert_close(out["done_loss_per_sample"], done_loss)
    aux = 0.01 * (out["reward_loss_per_sample"] + done_loss) + 5e-4 * out["transition_loss_per_sample"]
    torch.testing.assert_close(out["utility"], out["adv_norm"] - aux)
    # the real step clips with wm_clip_coef (0.05 here), not clip_coef (0.2)
    ratio = out["ratio"]
    assert ((ratio - 1).abs() > 0.05).any()
    pg = torch.max(-out["utility"] * ratio, -out["utility"] * ratio.clamp(0.95, 1.05)).mean()
    torch.testing.assert_close(out["pg_loss"], pg)
    loss.backward()
    for name, p in agent.done_predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_imagination_loss_is_plain_ppo_on_latents():
    torch.manual_seed(9)
    agent = ds.Agent(4)
    g = torch.Generator().manual_seed(9)
    z = torch.rand(32, 64, 7, 7, generator=g)
    actions = torch.randint(0, 4, (32,), generator=g)
    logprobs = -1.4 + 0.3 * torch.randn(32, generator=g)
    adv, ret = torch.randn(32, generator=g), torch.randn(32, generator=g)
    args = dream_args()
    loss, out = ds.compute_losses(agent, args, z, None, actions, logprobs, adv, ret, None, None, None, latent=True)
    assert "reward_loss" not in out
    hidden = agent.network(z)
    probs = torch.distributions.Categorical(logits=agent.actor(hidden))
    ratio = (probs.log_prob(actions) - logprobs).exp()
    assert ((ratio - 1).abs() > 0.2).any()
    a = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    pg = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()  # clip_coef, not wm_clip_coef
    v = 0.5 * ((agent.critic(hidden).view(-1) - ret) ** 2).mean()
    torch.testing.assert_close(loss, pg - 0.01 * probs.entropy().mean() + 0.5 * v)


def test_bf16_autocast_keeps_sigma_ratio_losses_and_imagined_targets_in_float32():
    """Under --bf16's autocast every convolution and linear layer computes in bfloat16, but the spectral norms equal the
    float32 ones exactly, the log-probabilities, ratios and losses (done loss included) are float32 and close to the
    float32 loss, and an imagined rollout's rewards, dones, values and log-probabilities (GAE's inputs) are float32."""
    torch.manual_seed(14)
    agent = ds.Agent(4)
    batch, args = real_minibatch(b=32, seed=14), dream_args()
    eps = torch.randn(32, 5, 64, 7, 7).clamp(-1, 1)
    loss32, out32 = ds.compute_losses(agent, args, *batch, eps=eps)
    layers = [m for m in agent.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, ds.SNLinear, ds.SNConv2d))]
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in layers]
    sn = [m for m in layers if isinstance(m, (ds.SNLinear, ds.SNConv2d))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, out16 = ds.compute_losses(agent, args, *batch, eps=eps)
        sigmas16 = [m.sigma() for m in sn]
    for h in hooks:
        h.remove()
    # all but the transition head's conv2, which runs through its gathered weights (an einsum, autocast too)
    assert len(dtypes) == len(layers) - 1 and set(dtypes) == {torch.bfloat16}
    for m, sigma in zip(sn, sigmas16, strict=True):
        assert sigma.dtype == torch.float32 and torch.equal(sigma, m.sigma())
    keys = ["newlogprob", "ratio", "reward_loss_per_sample", "transition_loss_per_sample", "done_loss_per_sample"]
    for key in keys + ["mixture_logits", "done_prob", "utility", "pg_loss", "done_loss"]:
        assert out16[key].dtype == torch.float32, key
    assert loss16.dtype == torch.float32
    # products in a row: the encoder's 3 convolutions, then the torso and a head (ratio, loss), the transition head's 2
    # convolutions and mixture layer (transition loss) or the done predictor's 2 layers (done loss, on the next latent)
    assert_normwise(loss16, loss32, bf16_tol(5), "loss")
    for key, layers in (("ratio", 5), ("transition_loss", 6), ("done_loss", 5)):
        assert_normwise(out16[key], out32[key], bf16_tol(layers), key)
    z0, d0 = start_states(n=8, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
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


def test_imagination_update_changes_no_encoder_or_world_model_parameter():
    agent = likely_done_agent(seed=10)
    optimizers = make_optimizers(agent)
    z0, d0 = start_states(n=32, seed=11)
    im = ds.imagine(agent, z0, d0, 4)
    adv, ret = ds.compute_gae(im["rewards"], im["values"], im["next_dones"], im["next_value"], GAMMA, LAMBDA)
    before = snapshot(agent)
    flat = lambda t: t.reshape((-1,) + t.shape[2:])
    loss, _ = ds.compute_losses(
        agent,
        dream_args(),
        flat(im["obs"]),
        None,
        flat(im["actions"]),
        flat(im["logprobs"]),
        flat(adv),
        flat(ret),
        None,
        None,
        None,
        latent=True,
    )
    ds.optimizer_step(loss, agent, optimizers, ["actor", "critic"], 0.5, {})
    groups = agent.param_groups()
    assert all(p.grad is None for p in groups["encoder"] + groups["world_model"])  # no gradient even reached them
    assert changed(agent, before) == {"encoder": False, "world_model": False, "actor": True, "critic": True}


@pytest.mark.parametrize("dyna_style", [False, True])
def test_real_step_changes_no_actor_or_critic_parameter(dyna_style):
    torch.manual_seed(12)
    agent = ds.Agent(4)
    optimizers = make_optimizers(agent)
    batch = real_minibatch(seed=12)
    before = snapshot(agent)
    loss, _ = ds.compute_losses(agent, dream_args(), *batch)
    names = ["encoder", "world_model"] + (["actor", "critic"] if dyna_style else [])
    ds.optimizer_step(loss, agent, optimizers, names, 0.5, {})
    assert changed(agent, before) == {"encoder": True, "world_model": True, "actor": dyna_style, "critic": dyna_style}
    done_params = list(agent.done_predictor.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(done_params, before["world_model"][-len(done_params) :], strict=True))


def test_each_group_is_clipped_on_its_own():
    torch.manual_seed(13)
    agent = ds.Agent(4)
    optimizers = make_optimizers(agent)
    loss, _ = ds.compute_losses(agent, dream_args(), *real_minibatch(seed=13))
    ds.optimizer_step(1e4 * loss, agent, optimizers, ["encoder", "world_model"], 0.5, {})
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
    "repr_wm/sir",
    "imagination/reward_mean",
    "imagination/done_rate",
] + [
    f"{prefix}/{m}"
    for prefix in ("repr_wm", "imagination")
    for m in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "ratio_max", "ratio_min")
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
        [
            "--num-envs",
            "2",
            "--num-steps",
            "16",
            "--total-timesteps",
            "64",
            "--env-backend",
            "gymnasium",
            "--soft-done",
            "--dyna-style",
        ],
        ["--num-envs", "2", "--num-steps", "96", "--total-timesteps", "384", "--update-epochs", "1", "--bf16"],
    ],
    ids=["envpool", "gymnasium-soft-done-dyna", "bf16"],
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
    # the real and the imagined minibatches have the same size
    batch, minibatches, horizon = int(hp["batch_size"]), int(hp["num_minibatches"]), int(hp["imagination_horizon"])
    assert int(hp["imagination_batch_size"]) == horizon * batch
    assert int(hp["imagination_num_minibatches"]) == horizon * minibatches
    assert int(hp["imagination_batch_size"]) // int(hp["imagination_num_minibatches"]) == int(hp["minibatch_size"])
    # each group's learning rate at iteration k is lr0 * (1 - (k - 1) / num_iterations)
    n_it = int(hp["num_iterations"])
    for name, lr0 in [("encoder", 2e-4), ("world_model", 2e-4), ("actor", 2.75e-5), ("critic", 2.75e-5)]:
        expected = [lr0 * (1 - k / n_it) for k in range(n_it)]
        assert scalars[f"charts/{name}_learning_rate"] == pytest.approx(expected, rel=1e-6), name
    assert len(scalars["charts/SPS"]) == n_it
    if "--soft-done" in flags:
        assert 0 < scalars["imagination/done_rate"][0] < 1
    else:  # a full game of Breakout was played, its raw score logged
        assert_finite_metrics(
            scalars, ["charts/episodic_return", "charts/avg_episodic_return", "charts/human_normalized_score"]
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--imagination-horizon", "0"], "--imagination-horizon 0 must be positive"),
        (["--imagination-epochs", "0"], "--imagination-epochs 0 must be positive"),
        (["--wm-clip-coef", "1.5"], "--wm-clip-coef 1.5 must lie in (0, 1)"),
        (["--wm-clip-coef", "0"], "--wm-clip-coef 0.0 must lie in (0, 1)"),
        (["--clip-coef", "1.5"], "--clip-coef 1.5 must lie in (0, 1)"),
        (["--env-id", "Breakot-v5"], "did you mean Breakout-v5"),
        (["--num-envs", "3", "--num-steps", "5"], "not divisible by --num-minibatches"),
        (["--total-timesteps", "100"], "smaller than one batch"),
        (["--gamma", "1.0"], "--gamma 1.0 must lie in (0.5, 1)"),
        (["--gamma", "0.3"], "--gamma 0.3 must lie in (0.5, 1)"),
        (["--gae-lambda", "1.5"], "--gae-lambda 1.5 must lie in [0, 1]"),
        (["--encoder-learning-rate", "0"], "--encoder-learning-rate 0.0 must be positive"),
        (["--world-model-learning-rate", "-1e-4"], "--world-model-learning-rate -0.0001 must be positive"),
        (["--actor-learning-rate", "nan"], "--actor-learning-rate nan must be finite"),
        (["--critic-learning-rate", "inf"], "--critic-learning-rate inf must be finite"),
        (["--vf-coef", "inf"], "--vf-coef inf must be finite"),
        (["--ent-coef", "-0.01"], "--ent-coef -0.01 must be non-negative"),
        (["--reward-loss-coef", "-0.01"], "--reward-loss-coef -0.01 must be non-negative"),
        (["--transition-loss-coef", "-1e-4"], "--transition-loss-coef -0.0001 must be non-negative"),
        (["--max-grad-norm", "0"], "--max-grad-norm 0.0 must be positive"),
        (["--target-kl", "0"], "--target-kl 0.0 must be positive"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1 must be non-negative"),
        (["--eval-episodes", "-1"], "--eval-episodes -1 must be non-negative"),
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


# The real CLI under a recorder that keeps the (sticky, noop_max) of every env that make_envs returns; it ends the run
# when the first evaluation envs are made (a game of Breakout takes ~10 s here; training has flushed its logs by then)
ENV_RECORDER = r"""
import json, os, runpy, sys

script, record = os.environ["SCRIPT"], []


def on_return(frame, event, arg):
    if event == "return" and hasattr(arg, "config"):  # envpool
        record.append((arg.config["repeat_action_probability"], arg.config["noop_max"]))
    elif event == "return":
        env = arg.envs[0]
        record.append((env.unwrapped.ale.getFloat("repeat_action_probability"), env.get_wrapper_attr("noop_max")))
    if len(record) == 2:  # the training envs, then the greedy evaluation's
        with open(os.environ["RECORD"], "w") as f:
            json.dump(record, f)
        os._exit(0)
    return on_return


def trace(frame, event, arg):
    if frame.f_code.co_filename == script and frame.f_code.co_name == "make_envs":
        frame.f_trace_lines = False
        return on_return
    return None


sys.argv = [script, *sys.argv[1:]]
sys.settrace(trace)
runpy.run_path(script, run_name="__main__")
sys.exit("the run ended before its evaluation")
"""


def test_cli_stochastic_env_reaches_the_training_and_evaluation_envs(tmp_path):
    """A tiny --stochastic-env run (one iteration, then --eval-episodes): the training envs and the evaluation envs are
    the stochastic ALE (sticky actions 0.3, up to 60 no-ops)."""
    (tmp_path / "recorder.py").write_text(ENV_RECORDER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=os.path.join(REPO, "dreamspi_atari.py"), RECORD=str(tmp_path / "r"))
    flags = ["--num-envs", "2", "--num-steps", "16", "--total-timesteps", "32", "--imagination-horizon", "1"]
    cmd = [sys.executable, str(tmp_path / "recorder.py"), "--no-progress", "--stochastic-env", *flags, "--eval-episodes", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_finite_metrics(read_scalars(only_run_dir(tmp_path)), METRICS)
    assert torch.load(checkpoint_path(tmp_path), weights_only=False)["args"]["stochastic_env"] is True
    got = json.loads((tmp_path / "r").read_text())
    assert len(got) == 2 and all(s == pytest.approx(0.3) and noops == 60 for s, noops in got), got


# ------------------------------------------------------------------------------ the training loop, watched from outside
# The real CLI under a recorder that is not part of the script: it wraps the env that make_envs returns (its reset and
# step results are the oracle: the done flag of an observation is terminated | truncated of the step that produced it)
# and, through sys.settrace, copies the arguments of compute_losses (real-data step) and of imagine, with the agent's
# weights at the first real-data minibatch of every iteration and at the start of imagination.
LOOP_RECORDER = r"""
import os, runpy, sys
import numpy as np
import torch

script, record = os.environ["SCRIPT"], dict(reset=[], steps=[], real=[], imagine=[], before_real=[])
weights = lambda agent: {k: v.detach().clone() for k, v in agent.state_dict().items()}


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


def trace(frame, event, arg):
    if frame.f_code.co_filename != script:
        return None
    name, args = frame.f_code.co_name, frame.f_locals
    if name == "make_envs":
        frame.f_trace_lines = False
        return on_return
    if name == "compute_losses" and not args["latent"]:
        if len(record["before_real"]) == len(record["imagine"]):  # the first real-data minibatch of the iteration
            record["before_real"].append(weights(args["agent"]))
        keys = ("mb_obs", "mb_next_obs", "mb_wm_dones", "mb_next_dones")
        record["real"].append({k: args[k].detach().clone() for k in keys})
    if name == "imagine":
        record["imagine"].append(dict(z0=args["z0"].clone(), d0=args["d0"].clone(), weights=weights(args["agent"])))
    return None


sys.argv = [script, *sys.argv[1:]]
sys.settrace(trace)
runpy.run_path(script, run_name="__main__")
sys.settrace(None)
torch.save(record, os.environ["RECORD"])
"""
# 2 iterations of 2 envs x 32 steps: both envs lose a life inside the batches; 4 x 2 real and 1 x 2 x 2 imagined minibatches
LOOP = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "128", "--num-minibatches", "2"]
LOOP += ["--update-epochs", "4", "--imagination-horizon", "2", "--imagination-epochs", "1"]


@pytest.fixture(scope="module")
def recorded_loop(tmp_path_factory):
    """backend -> (what the recorder saw, the final checkpoint.pt, per-env observations (S+1, N, ...) and their done flags)."""
    runs = {}

    def run(backend):
        if backend not in runs:
            cwd = tmp_path_factory.mktemp(f"loop_{backend}")
            (cwd / "recorder.py").write_text(LOOP_RECORDER)
            env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=os.path.join(REPO, "dreamspi_atari.py"))
            env["RECORD"] = str(cwd / "record.pt")
            cmd = [sys.executable, str(cwd / "recorder.py"), "--no-progress", "--env-backend", backend, *LOOP]
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            rec = torch.load(cwd / "record.pt", weights_only=False)
            (first_obs,) = rec["reset"]
            obs = torch.stack([first_obs] + [o for o, _ in rec["steps"]])
            flags = torch.stack([torch.zeros(first_obs.shape[0], dtype=torch.bool)] + [d for _, d in rec["steps"]]).float()
            assert obs.shape[:2] == (2 * 32 + 1, 2) and len(rec["imagine"]) == len(rec["before_real"]) == 2
            runs[backend] = rec, torch.load(checkpoint_path(cwd), weights_only=False), obs, flags
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
    after_imagination = rec["before_real"][1:] + [saved["model"]]
    for before, imagined, after in zip(rec["before_real"], rec["imagine"], after_imagination, strict=True):
        assert moved(before, imagined["weights"]) == {"encoder": True, "world_model": True, "actor": False, "critic": False}
        assert moved(imagined["weights"], after) == {"encoder": False, "world_model": False, "actor": True, "critic": True}


def test_loop_adam_step_counts_of_the_four_groups(recorded_loop):
    """2 iterations: encoder and world model 2 x 4 epochs x 2 minibatches, actor and critic 2 x 1 epoch x (2 x H=2)."""
    _, saved, _, _ = recorded_loop("gymnasium")
    expected = {"encoder": 16, "world_model": 16, "actor": 8, "critic": 8}
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
    t_, calls = 32, 4 * 2  # per iteration: 4 epochs over the batch, 2 minibatches each
    # envpool resets one step late: (o, o') is a reset when o is flagged; gymnasium resets at once: when o' is
    mask = 0 if backend == "envpool" else 1
    for k in range(2):
        expected, got = Counter(), Counter()
        for t in range(k * t_, (k + 1) * t_):  # each transition (o, o') with the label "was the episode over at o'?"
            for e in range(obs.shape[1]):
                key = (obs[t, e].numpy().tobytes(), obs[t + 1, e].numpy().tobytes())
                expected[key, flags[t + mask, e].item(), flags[t + 1, e].item()] += 4  # once per epoch
        for mb in rec["real"][k * calls : (k + 1) * calls]:
            batch = (mb["mb_obs"], mb["mb_next_obs"], mb["mb_wm_dones"], mb["mb_next_dones"])
            for o, o_next, wm_done, label in zip(*batch, strict=True):
                got[(o.numpy().tobytes(), o_next.numpy().tobytes()), wm_done.item(), label.item()] += 1
        assert got == expected
        # labels that the done flag of o would get wrong are in the batch
        assert any(flags[t + 1].ne(flags[t]).any() for t in range(k * t_, (k + 1) * t_))
