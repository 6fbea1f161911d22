"""deepspi_atari.py: building blocks (exact properties), loss equivalences, environments and the real CLI.

The loss equivalences are checked on tests/deepspi_reference.py's loss, on the script's modules: the script computes its
loss inline in the training loop, and tests/test_atari_loop.py checks that the loop trains on exactly that loss (in
DeepSPI, PPO, --deep-mdp and --clip-vloss mode)."""

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_finite_metrics, assert_normwise, bf16_tol, f32_tol, only_run_dir, read_scalars, run_script
from deepspi_reference import reference_loss

import deepspi_atari as d
import deepspi_maze
import dreamspi_atari

COMMON_METRICS = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/avg_episodic_return",
    "charts/learning_rate",
    "charts/SPS",
    "charts/sir",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
]
WM_METRICS = ["losses/reward_loss", "losses/transition_loss"]


def loss_args(**kw):
    base = dict(norm_adv=True, clip_coef=0.1, ent_coef=0.01, vf_coef=0.5, reward_loss_coef=0.01)
    base.update(transition_loss_coef=5e-4, deep_mdp=False, clip_vloss=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def minibatch(n_actions=4, b=16, seed=0, device="cpu"):
    """A random minibatch, drawn on the CPU (the same numbers on every device) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, n_actions, (b,), generator=g)
    logprobs = -1.4 + 0.2 * torch.randn(b, generator=g)  # some ratios fall outside [0.9, 1.1]
    advantages, returns = torch.randn(b, generator=g), torch.randn(b, generator=g)
    rewards = torch.randint(-1, 2, (b,), generator=g).float()
    wm_dones = torch.zeros(b)
    wm_dones[::5] = 1
    return tuple(x.to(device) for x in (obs, next_obs, actions, logprobs, advantages, returns, rewards, wm_dones))


# --------------------------------------------------------------------------------------------- Lipschitz building blocks
def test_group_sort_sorts_adjacent_pairs_and_keeps_values():
    x = torch.randn(5, 12)
    y = d.group_sort(x)
    pairs_in, pairs_out = x.view(5, 6, 2), y.view(5, 6, 2)
    assert torch.equal(pairs_out[..., 0], pairs_in.min(-1).values)
    assert torch.equal(pairs_out[..., 1], pairs_in.max(-1).values)
    x4 = torch.randn(3, 8, 7, 7)
    y4 = d.group_sort(x4)
    assert y4.shape == x4.shape
    assert torch.all(y4[:, 0::2] <= y4[:, 1::2])
    assert torch.equal(torch.sort(y4[:, 2:4], 1).values, torch.sort(x4[:, 2:4], 1).values)  # pairs never mix channels
    with pytest.raises(RuntimeError):  # an odd channel count cannot be paired
        d.group_sort(torch.randn(2, 5))


def test_same_padding_is_bottom_right_only():
    conv = d.SNConv2d(1, 1)
    x = torch.randn(1, 1, 7, 7, requires_grad=True)
    y = conv(x)
    assert y.shape == (1, 1, 7, 7)
    for i in range(7):
        for j in range(7):
            (grad,) = torch.autograd.grad(y[0, 0, i, j], x, retain_graph=True)
            deps = {tuple(p) for p in torch.nonzero(grad[0, 0]).tolist()}
            expected = {(r, c) for r in (i, i + 1) for c in (j, j + 1) if r < 7 and c < 7}
            assert deps == expected, (i, j, deps)


@pytest.mark.parametrize("n_actions", [4, 18])
def test_grouped_transition_conv_channel_layout(n_actions):
    """Group g of the 16-group conv reads hidden channels [8g, 8g+8) and predicts latent channels [4g, 4g+4)."""
    torch.manual_seed(0)
    model = d.TransitionModel(n_actions)
    z = torch.rand(3, 64, 7, 7)
    action = torch.tensor([0, n_actions - 1, 1])
    eps = torch.zeros(3, 5, 64, 7, 7)
    with torch.no_grad():
        _, _, loc0, scale0 = model(z, action, eps)
        for g in (0, 5, 15):
            # perturb the weights of group g only
            saved = model.conv2.weight.clone()
            model.conv2.weight[40 * n_actions * g : 40 * n_actions * (g + 1)] += 0.5
            _, _, loc1, scale1 = model(z, action, eps)
            model.conv2.weight.copy_(saved)
            changed = torch.nonzero(((loc1 - loc0).abs() + (scale1 - scale0).abs()).amax((0, 1, 3, 4)) > 0).flatten()
            assert changed.tolist() == list(range(4 * g, 4 * g + 4))
            # perturb one hidden channel of group g (after conv1, before the GroupSort pairs that stay inside the group)
            hook = model.conv1.register_forward_hook(
                lambda m, i, o, c=8 * g + 3: o + F.one_hot(torch.tensor(c), 128).view(1, -1, 1, 1)
            )
            _, _, loc2, _ = model(z, action, eps)
            hook.remove()
            changed = torch.nonzero((loc2 - loc0).abs().amax((0, 1, 3, 4)) > 0).flatten()
            assert set(changed.tolist()) <= set(range(4 * g, 4 * g + 4)) and len(changed) > 0


@pytest.mark.parametrize("n_actions", [4, 18])
def test_taken_action_transition_equals_full_conv(n_actions, device):
    """The head evaluates only the taken action's channels; it must equal the full conv followed by the action gather."""
    torch.manual_seed(1)
    model = d.TransitionModel(n_actions).to(device)
    z = torch.rand(6, 64, 7, 7).to(device).requires_grad_(True)
    action = torch.randint(0, n_actions, (6,)).to(device)
    eps = torch.randn(6, 5, 64, 7, 7).clamp(-1, 1).to(device)
    sample, logits, loc, scale = model(z, action, eps)
    h = d.group_sort(model.conv1(z))
    o = F.conv2d(F.pad(h, (0, 1, 0, 1)), model.conv2.normalized_weight(), model.conv2.bias, groups=16)
    o = o.view(6, 64, 5, 2, n_actions, 7, 7)[torch.arange(6, device=device), :, :, :, action]
    loc_ref = 0.5 * o[:, :, :, 0].transpose(1, 2)
    scale_ref = 0.5 * (F.softplus(o[:, :, :, 1].transpose(1, 2)) + 1e-6)
    w = logits.softmax(1).view(6, 5, 1, 1, 1)
    sample_ref = (w * (loc_ref + scale_ref * eps)).sum(1)
    # two float32 computations; longest sums: conv1 64 x 4, conv2 8 x 4 per group, the 5-way mixture (forward), then
    # the weight gradient over 6 x 7 x 7 positions and the input gradient over 128 x 4 (backward)
    fwd_tol, grad_tol = f32_tol(256 + 32 + 5, 2), f32_tol(256 + 32 + 5 + 294 + 512, 2)
    for name, got, ref in (("loc", loc, loc_ref), ("scale", scale, scale_ref), ("sample", sample, sample_ref)):
        assert_normwise(got, ref, fwd_tol, name)
    grads = torch.autograd.grad(sample.square().sum(), [z, model.conv2.weight, model.conv2.bias], retain_graph=True)
    grads_ref = torch.autograd.grad(sample_ref.square().sum(), [z, model.conv2.weight, model.conv2.bias])
    for name, got, ref in zip(("z", "conv2.weight", "conv2.bias"), grads, grads_ref, strict=True):
        assert_normwise(got, ref, grad_tol, f"grad {name}")


@pytest.mark.parametrize("module", [d, deepspi_maze, dreamspi_atari], ids=lambda m: m.__name__)
def test_transition_noise_is_clipped_to_one(monkeypatch, module):
    """Without eps given, the head draws its own noise and clips it to [-1, 1]: with every draw forced to 3, the sample
    is the mixture of loc + scale, exactly; unclipped it would be loc + 3 scale."""
    torch.manual_seed(7)
    model = module.TransitionModel(4)
    z, action = torch.rand(3, 64, 7, 7), torch.tensor([0, 3, 1])
    monkeypatch.setattr(torch, "randn_like", lambda x: torch.full_like(x, 3.0))
    with torch.no_grad():
        sample, logits, loc, scale = model(z, action)
        clipped = model(z, action, eps=torch.ones(3, 5, 64, 7, 7))[0]
    w = logits.softmax(1).view(3, 5, 1, 1, 1)
    assert torch.equal(sample, clipped)
    torch.testing.assert_close(sample, (w * (loc + scale)).sum(1))


def test_faithful_spectral_norm_scales_inversely_and_corrected_is_one_lipschitz(device):
    torch.manual_seed(2)
    for layer in (d.SNLinear(3136, 256), d.SNLinear(256, 4), d.SNConv2d(64, 128), d.SNConv2d(128, 2560, groups=16)):
        layer.to(device)
        w = layer.normalized_weight().detach()
        with torch.no_grad():
            layer.weight.mul_(0.1)
        # two power iterations of 2 matrix products each, over at most in + out = 3392 terms, before and after scaling
        assert_normwise(layer.normalized_weight().detach(), w / 0.1, f32_tol(5 * 3392, 2), "W_sn of 0.1 W")
    # faithful: sigma_hat = ||W^T u||^2 exactly, far from a unit spectral norm after scaling
    layer = d.SNLinear(256, 256).to(device)
    assert torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2) < 0.9
    with torch.no_grad():
        layer.weight.mul_(0.1)
    assert torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2) > 5
    # corrected: every (group) matrix has spectral norm 1, whatever the scale
    for layer in (d.SNLinear(3136, 256, faithful=False), d.SNConv2d(128, 2560, groups=16, faithful=False)):
        layer.to(device)
        with torch.no_grad():
            layer.weight.mul_(0.1)
        m = layer.normalized_weight().detach()
        m = m.t() if m.dim() == 2 else m.reshape(16, -1, m[0].numel())
        # the float64 norm of the float32 W / sigma_1: only the script's float32 SVD errs, by sums over in + out terms
        assert_normwise(torch.linalg.matrix_norm(m.double(), 2), torch.ones(m.shape[:-2]), f32_tol(sum(m.shape[-2:])))


def test_reward_head_gathers_the_taken_action(device):
    torch.manual_seed(3)
    model = d.RewardModel(6).to(device)
    z = torch.rand(4, 64, 7, 7).to(device)
    all_actions = torch.stack([model(z, torch.full((4,), a, device=device)) for a in range(6)], 1)
    action = torch.tensor([5, 0, 2, 2], device=device)
    torch.testing.assert_close(model(z, action), all_actions[torch.arange(4, device=device), action])


# ------------------------------------------------------------------------------------------------------------ the loss
def ppo_reference_loss(agent, args, obs, actions, logprobs, advantages, returns):
    """Plain clipped PPO (CleanRL's, value loss unclipped), written independently of the DeepSPI loss."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions)
    ratio = (newlogprob - logprobs).exp()
    adv = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    v = 0.5 * ((newvalue.view(-1) - returns) ** 2).mean()
    return pg - args.ent_coef * entropy.mean() + args.vf_coef * v


def test_loss_equals_ppo_when_world_model_coefficients_are_zero(device):
    torch.manual_seed(4)
    agent = d.Agent(4).to(device)
    obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones = minibatch(device=device)
    args = loss_args(reward_loss_coef=0.0, transition_loss_coef=0.0)
    loss, out = reference_loss(agent, args, obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones)
    ref = ppo_reference_loss(agent, args, obs, actions, logprobs, adv, ret)
    # two float32 computations (channels_last against NCHW); longest sums: the encoder (256 + 512 + 576), the torso 3136,
    # the heads 512 and the batch mean 16
    assert_normwise(loss, ref, f32_tol(256 + 512 + 576 + 3136 + 512 + 16, 2), "loss")
    assert "transition_loss" not in out  # PPO mode does not even compute the world model
    loss.backward()
    wm = list(agent.reward_model.parameters()) + list(agent.transition_model.parameters())
    assert all(p.grad is None for p in wm)
    assert ((out["ratio"] - 1).abs() > 0.1).any()  # the clip is exercised


def test_deepspi_utility_and_world_model_gradients(device):
    torch.manual_seed(5)
    agent = d.Agent(4).to(device)
    obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones = minibatch(device=device)
    args = loss_args()
    eps = torch.randn(16, 5, 64, 7, 7).clamp(-1, 1).to(device)
    loss, out = reference_loss(agent, args, obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones, eps=eps)
    aux = 0.01 * out["reward_loss_per_sample"] + 5e-4 * out["transition_loss_per_sample"]
    torch.testing.assert_close(out["utility"], out["adv_norm"] - aux)
    # reset transitions target the current latent; the others phi(s') through the same encoder
    z, z_next = agent.encode(obs), agent.encode(next_obs)
    torch.testing.assert_close(out["z_target"], torch.where(wm_dones.bool().view(-1, 1, 1, 1), z, z_next))
    torch.testing.assert_close(out["reward_loss_per_sample"], F.smooth_l1_loss(out["reward_pred"], rew, reduction="none"))
    loss.backward()
    for name, p in list(agent.reward_model.named_parameters()) + list(agent.transition_model.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the world-model losses reach the encoder too: its gradient differs from PPO's
    ppo_grad = torch.autograd.grad(
        ppo_reference_loss(agent, args, obs, actions, logprobs, adv, ret), agent.encoder[4].weight, retain_graph=False
    )[0]
    assert not torch.allclose(agent.encoder[4].weight.grad, ppo_grad)


def test_channels_last_encoder_equals_the_plain_layout(device):
    """encode runs the convolutions in channels_last (faster on CPU); values and gradients are those of the NCHW pass."""
    torch.manual_seed(6)
    agent = d.Agent(4).to(device)
    obs = minibatch(device=device)[0]
    fast, plain = agent.encode(obs), agent.encoder(obs / 255.0)
    assert fast.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    exact = copy.deepcopy(agent.encoder).double()  # both float32 layouts against one float64 reference
    ref = exact(obs.double() / 255.0)
    # longest sums: forward 4 x 8 x 8 + 32 x 4 x 4 + 64 x 3 x 3; backward the input gradients of conv3 and conv2 (576,
    # 512) and conv1's weight gradient over 16 x 20 x 20 positions
    fwd_k = 256 + 512 + 576
    for name, z in (("channels_last", fast), ("NCHW", plain)):
        assert_normwise(z, ref, f32_tol(fwd_k), name)
    params = list(agent.encoder.parameters())
    grads = torch.autograd.grad(fast.square().sum(), params), torch.autograd.grad(plain.square().sum(), params)
    grads_ref = torch.autograd.grad(ref.square().sum(), list(exact.parameters()))
    for (name, _), g_fast, g_plain, g_ref in zip(agent.encoder.named_parameters(), *grads, grads_ref, strict=True):
        assert_normwise(g_fast, g_ref, f32_tol(fwd_k + 576 + 512 + 6400), f"grad {name} (channels_last)")
        assert_normwise(g_plain, g_ref, f32_tol(fwd_k + 576 + 512 + 6400), f"grad {name} (NCHW)")


def test_bf16_autocast_keeps_sigma_ratio_and_losses_in_float32(device):
    """Under --bf16's autocast every convolution and linear layer computes in bfloat16, but the spectral norms equal the
    float32 ones exactly and the log-probabilities, ratios and losses are float32 and close to the float32 loss."""
    torch.manual_seed(7)
    agent = d.Agent(4).to(device)
    batch, args = minibatch(b=32, device=device), loss_args()
    eps = torch.randn(32, 5, 64, 7, 7).clamp(-1, 1).to(device)
    loss32, out32 = reference_loss(agent, args, *batch, eps=eps)
    layers = [m for m in agent.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, d.SNLinear, d.SNConv2d))]
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in layers]
    sn = [m for m in layers if isinstance(m, (d.SNLinear, d.SNConv2d))]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss16, out16 = reference_loss(agent, args, *batch, eps=eps)
        sigmas16 = [m.sigma() for m in sn]
    for h in hooks:
        h.remove()
    # all but the transition head's conv2, which runs through its gathered weights (an einsum, autocast too); the three
    # encoder convolutions run twice (s and s')
    assert len(dtypes) == len(layers) - 1 + 3 and set(dtypes) == {torch.bfloat16}
    for m, sigma in zip(sn, sigmas16, strict=True):
        assert sigma.dtype == torch.float32 and torch.equal(sigma, m.sigma())
    for key in ("newlogprob", "ratio", "reward_loss_per_sample", "transition_loss_per_sample", "utility", "pg_loss"):
        assert out16[key].dtype == torch.float32, key
    assert loss16.dtype == torch.float32
    # products in a row: the encoder's 3 convolutions, then the torso and a head (ratio, loss) or the transition head's
    # 2 convolutions and mixture layer (transition loss); the float32 side's own error is negligible beside bf16's
    assert_normwise(loss16, loss32, bf16_tol(5), "loss")
    assert_normwise(out16["transition_loss"], out32["transition_loss"], bf16_tol(6), "transition_loss")
    assert_normwise(out16["ratio"], out32["ratio"], bf16_tol(5), "ratio")


def test_clip_vloss_is_cleanrls_clipped_value_loss(device):
    """--clip-vloss with both coefficients at 0 is CleanRL's PPO loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2),
    written out here, with values whose updates fall on both sides of the clip; without it the value loss is unclipped."""
    torch.manual_seed(8)
    agent = d.Agent(4).to(device)
    obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones = minibatch(device=device)
    args = loss_args(reward_loss_coef=0.0, transition_loss_coef=0.0, clip_vloss=True)
    with torch.no_grad():
        new_value = agent.get_value(obs).view(-1)
    old_values = new_value + torch.linspace(-0.3, 0.3, 16, device=device)  # |V - V_old| up to 0.3, the clip is 0.1
    loss, out = reference_loss(agent, args, obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones, values=old_values)
    clipped = old_values + (new_value - old_values).clamp(-0.1, 0.1)
    v_ref = 0.5 * torch.max((new_value - ret) ** 2, (clipped - ret) ** 2).mean()
    torch.testing.assert_close(out["v_loss"], v_ref)
    ppo = ppo_reference_loss(agent, args, obs, actions, logprobs, adv, ret)
    unclipped = 0.5 * ((new_value - ret) ** 2).mean()
    torch.testing.assert_close(loss, ppo + 0.5 * (v_ref - unclipped))
    assert not torch.isclose(v_ref, unclipped)


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_stochastic_env_has_sticky_actions_and_60_noops(backend):
    """--stochastic-env: the official stochastic ALE, sticky actions 0.3 and up to 60 no-ops, whatever the id says."""
    for env_id, stochastic, expected in [("BreakoutNoFrameskip-v4", False, (0.0, 30)), ("ALE/Breakout-v5", False, (0.25, 30))]:
        for case in ((env_id, stochastic, expected), (env_id, True, (0.3, 60))):
            envs = d.make_envs(case[0], backend, num_envs=1, seed=1, stochastic=case[1])
            if backend == "envpool":
                got = envs.config["repeat_action_probability"], envs.config["noop_max"]
            else:
                got = (
                    envs.envs[0].unwrapped.ale.getFloat("repeat_action_probability"),
                    envs.envs[0].get_wrapper_attr("noop_max"),
                )
            envs.close()
            assert got[0] == pytest.approx(case[2][0]) and got[1] == case[2][1], (case, got)


def test_deep_mdp_adds_the_losses_outside_the_clip(device):
    torch.manual_seed(6)
    agent = d.Agent(4).to(device)
    obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones = minibatch(device=device)
    eps = torch.randn(16, 5, 64, 7, 7).clamp(-1, 1).to(device)
    batch = (obs, next_obs, actions, logprobs, adv, ret, rew, wm_dones)
    loss, out = reference_loss(agent, loss_args(deep_mdp=True), *batch, eps=eps)
    ppo = ppo_reference_loss(agent, loss_args(), obs, actions, logprobs, adv, ret)
    aux = (0.01 * out["reward_loss_per_sample"] + 5e-4 * out["transition_loss_per_sample"]).mean()
    torch.testing.assert_close(loss, ppo + aux)
    torch.testing.assert_close(out["utility"], out["adv_norm"])


@pytest.mark.parametrize("module", [dreamspi_atari], ids=lambda m: m.__name__)  # deepspi_atari.py: test_atari_loop.py
def test_compute_gae_against_the_discounted_sum_of_td_errors(module):
    """A_t = sum_k (gamma lambda)^k delta_{t+k}, each delta_t = r_t + gamma V_{t+1} (1 - d_{t+1}) - V_t, the sum stopping
    after the first step whose next done flag is set; written as the explicit double sum, on a trajectory with dones."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, -1.0]])
    values = torch.tensor([[0.5, 1.0], [0.2, 0.0], [0.3, 0.4], [0.1, 0.6]])
    next_dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # env 0 ends after step 1, env 1 after 2
    next_value = torch.tensor([[0.7, -0.3]])
    v_next = torch.cat([values[1:], next_value])
    delta = rewards + gamma * v_next * (1 - next_dones) - values
    expected = torch.zeros(4, 2)
    for n in range(2):
        for t in range(4):
            for k in range(t, 4):
                expected[t, n] += (gamma * lam) ** (k - t) * delta[k, n]
                if next_dones[k, n]:
                    break
    # the same numbers by hand for env 0: delta_1 = 0 + 0 - 0.2 ends its episode, so A_1 = -0.2
    assert expected[1, 0].item() == pytest.approx(-0.2)
    block = dict(rewards=rewards, values=values, next_dones=next_dones, next_value=next_value)  # DreamSPI's imagined block
    advantages, returns = module.compute_gae(block, gamma, lam)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)


# ----------------------------------------------------------------------------------------------------- environments
def test_env_id_mapping(capsys):
    """The three id forms of a game are accepted, and each makes that game's emulator; anything else is bad input."""
    for env_id in ("BreakoutNoFrameskip-v4", "Breakout-v5", "ALE/Breakout-v5", "MontezumaRevengeNoFrameskip-v4"):
        d.check_args(d.Args(env_id=env_id))
        envs = d.make_envs(env_id, "gymnasium", num_envs=1, seed=1)
        assert envs.envs[0].unwrapped.spec.id == f"ALE/{env_id.removeprefix('ALE/').split('-')[0].split('NoFrameskip')[0]}-v5"
        envs.close()
    for bad in ("Breakout-v4", "ALE/BreakoutNoFrameskip-v4", "CartPole-v1", "breakout"):
        with pytest.raises(SystemExit) as e:
            d.check_args(d.Args(env_id=bad))
        assert e.value.code == 2 and f"unknown env id {bad!r}" in capsys.readouterr().err


@pytest.mark.parametrize("env_id", ["BreakoutNoFrameskip-v4", "ALE/Pong-v5", "Venture-v5"])
def test_backends_agree_on_spaces(env_id):
    shapes = {}
    for backend in ("envpool", "gymnasium"):
        envs = d.make_envs(env_id, backend, num_envs=2, seed=1)
        obs, _ = envs.reset()
        step = envs.step(np.zeros(2, dtype=np.int64))
        assert step[0].shape == obs.shape
        shapes[backend] = (obs.shape, obs.dtype, envs.single_action_space.n)
        envs.close()
    assert shapes["envpool"] == shapes["gymnasium"] == ((2, 4, 84, 84), np.uint8, shapes["envpool"][2])


@pytest.mark.parametrize("module", [d, dreamspi_atari], ids=lambda m: m.__name__)
@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_episode_bookkeeping_life_loss_ends_the_episode_the_score_runs_to_the_game_over(backend, module):
    """A lost life ends an episode for learning (Breakout: 5 per game); finished_games reports one raw full-game score,
    at the game over, no smaller than the sum of the sign-clipped rewards of the whole game (both Atari scripts)."""
    envs = module.make_envs("BreakoutNoFrameskip-v4", backend, num_envs=1, seed=3)
    envs.reset()
    terminations, clipped, scores, games = 0, 0.0, np.zeros(1), {}
    rng = np.random.default_rng(0)
    for _ in range(3000):
        _, reward, term, trunc, infos = envs.step(rng.integers(0, 4, 1))
        terminations, clipped = terminations + int(term[0]), clipped + float(reward[0])
        assert reward[0] in (-1.0, 0.0, 1.0)
        games = module.finished_games(infos, trunc, scores)
        if games:
            break
    envs.close()
    assert list(games) == [0] and terminations == 5
    assert games[0] >= clipped


# ------------------------------------------------------------------------------------------------------- the real CLI
TINY = ["--num-envs", "2", "--num-steps", "128", "--total-timesteps", "768"]


@pytest.mark.parametrize(
    "flags, wm",
    [
        (["--env-id", "BreakoutNoFrameskip-v4"], True),
        (["--env-id", "BreakoutNoFrameskip-v4", "--env-backend", "gymnasium"], True),
        (["--env-id", "Venture-v5"], True),  # 18 actions
        (["--env-id", "Breakout-v5", "--reward-loss-coef", "0", "--transition-loss-coef", "0"], False),  # PPO
        (["--env-id", "Breakout-v5", "--deep-mdp", "--no-sn-faithful"], True),
        (["--env-id", "Breakout-v5", "--stochastic-env", "--clip-vloss"], True),
        (["--env-id", "Breakout-v5", "--bf16"], True),
    ],
    ids=["envpool", "gymnasium", "18-actions", "ppo", "deep-mdp", "stochastic-clip-vloss", "bf16"],
)
def test_cli_smoke(tmp_path, flags, wm):
    proc = run_script("deepspi_atari.py", *TINY, *flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(only_run_dir(tmp_path))
    episode_metrics = [] if "Venture-v5" in flags else ["charts/episodic_return", "charts/avg_episodic_return"]
    names = [m for m in COMMON_METRICS if "episod" not in m] + episode_metrics + (WM_METRICS if wm else [])
    assert_finite_metrics(scalars, names)
    if not wm:
        assert not set(WM_METRICS) & set(scalars)
    assert len(scalars["charts/SPS"]) == 3  # one point per iteration


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "Breakot-v5"], "did you mean Breakout-v5"),
        (["--env-id", "CartPole-v1"], "unknown env id"),
        (["--num-envs", "3", "--num-steps", "5"], "is not divisible by --num-minibatches 4"),
        (["--num-envs", "0"], "--num-envs 0 must be positive"),
        (["--num-minibatches", "-1"], "--num-minibatches -1 must be positive"),
        (["--total-timesteps", "100"], "--total-timesteps 100 < one batch"),
        (["--clip-coef", "1.5"], "--clip-coef 1.5 must be in (0, 1)"),
        (["--clip-coef", "0"], "--clip-coef 0.0 must be in (0, 1)"),
        (["--reward-loss-coef", "-0.01"], "must be non-negative"),
        (["--transition-loss-coef", "-1e-4"], "must be non-negative"),
        (["--gamma", "1.0"], "--gamma 1.0 must be in (0.5, 1)"),
        (["--gamma", "0.3"], "--gamma 0.3 must be in (0.5, 1)"),
        (["--gamma", "nan"], "--gamma nan must be in (0.5, 1)"),
        (["--gae-lambda", "1.5"], "--gae-lambda 1.5 must be in [0, 1]"),
        (["--learning-rate", "0"], "--learning-rate 0.0 must be positive"),
        (["--learning-rate", "nan"], "--learning-rate nan must be positive and finite"),
        (["--vf-coef", "inf"], "--vf-coef inf must be non-negative and finite"),
        (["--ent-coef", "-0.01"], "--ent-coef -0.01 must be non-negative"),
        (["--max-grad-norm", "0"], "--max-grad-norm 0.0 must be positive"),
        (["--target-kl", "0"], "--target-kl 0.0 must be positive"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1 must be non-negative"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    # a budget of one small batch first (a later flag wins): a check that went missing shows as a short run, not a long one
    proc = run_script(
        "deepspi_atari.py", "--num-envs", "2", "--num-steps", "64", "--total-timesteps", "128", *flags, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "runs").exists()
