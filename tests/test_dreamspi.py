"""dreamspi_atari.py: imagined rollouts, the two losses, parameter isolation between the groups, and the real CLI."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_finite_metrics, only_run_dir, read_scalars, run_script

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


def test_compute_gae_equals_the_deepspi_loop():
    """The factored GAE is the inline loop of deepspi_atari.py (dones[t + 1] masks the bootstrap after step t)."""
    g = torch.Generator().manual_seed(6)
    t_, n = 7, 5
    rewards, values = torch.randn(t_, n, generator=g), torch.randn(t_, n, generator=g)
    dones = (torch.rand(t_ + 1, n, generator=g) < 0.3).float()
    next_value = torch.randn(1, n, generator=g)
    ref = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(t_)):
        nextnonterminal = 1.0 - dones[t + 1]
        nextvalues = next_value if t == t_ - 1 else values[t + 1]
        delta = rewards[t] + GAMMA * nextvalues * nextnonterminal - values[t]
        ref[t] = lastgaelam = delta + GAMMA * LAMBDA * nextnonterminal * lastgaelam
    adv, ret = ds.compute_gae(rewards, values, dones[1:], next_value, GAMMA, LAMBDA)
    assert torch.equal(adv, ref) and torch.equal(ret, ref + values)


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
    ],
    ids=["envpool", "gymnasium-soft-done-dyna"],
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
        (["--imagination-horizon", "0"], "--imagination-horizon must be positive"),
        (["--wm-clip-coef", "1.5"], "--wm-clip-coef must lie in (0, 1)"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    proc = run_script("dreamspi_atari.py", *flags, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "runs").exists()
