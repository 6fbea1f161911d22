"""deepspi_atari.py's training loop, checked through its real CLI on real games: what the loop hands to compute_gae and
compute_losses, the SIR it logs, the spectral norm it builds, the gradients that deepspi_atari_multigpu.py averages over
its torchrun ranks, and the greedy evaluation.

The runs go through tests/probe.py, which records the arguments and results of chosen functions without changing the
script; every assertion compares them with an oracle that does not share the script's code: the frame stack of the
real emulator, a recomputation from the saved model, an SVD, a hand-written Adam step.
"""

import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import REPO, assert_normwise, f32_tol, only_run_dir, read_scalars

import deepspi_atari as d

PROBE = os.path.join(REPO, "tests", "probe.py")
SCRIPT = os.path.join(REPO, "deepspi_atari.py")
MULTIGPU = os.path.join(REPO, "deepspi_atari_multigpu.py")
# 2 envs x 128 steps x 3 iterations: several lost lives and game overs of a near-random Breakout policy
LOOP = ["--env-id", "BreakoutNoFrameskip-v4", "--num-envs", "2", "--num-steps", "128", "--total-timesteps", "768"]
LOOP += ["--update-epochs", "1", "--save-model"]  # one epoch: each iteration's minibatches are its whole batch, once
RECORDED = "compute_losses,compute_gae,get_action_and_value,get_value,spectral_sigma:12"


def probe_run(cwd, *flags, record=RECORDED, torchrun=0, modules=False, timeout=300):
    """The probed CLI run; with torchrun, of deepspi_atari_multigpu.py with that many processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    script = MULTIGPU if torchrun else SCRIPT
    cmd = [sys.executable, *launcher, PROBE, str(cwd / "record.pt"), record, script, "--no-progress", *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PROBE_MODULES="1" if modules else "")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=["envpool", "gymnasium"])
def loop_run(request, tmp_path_factory):
    """One probed run per backend: envpool with the corrected spectral norm, gymnasium with the faithful one."""
    backend = request.param
    cwd = tmp_path_factory.mktemp(backend)
    sn = ["--no-sn-faithful"] if backend == "envpool" else []
    probe_run(cwd, *LOOP, "--env-backend", backend, *sn)
    records = torch.load(cwd / "record.pt", weights_only=False)
    run_dir = only_run_dir(cwd)
    model = torch.load(os.path.join(run_dir, "deepspi_atari.cleanrl_model"), weights_only=False)["model"]
    calls = lambda name: [r for r in records if r["name"] == name]  # noqa: E731
    return types.SimpleNamespace(backend=backend, calls=calls, records=records, scalars=read_scalars(run_dir), model=model)


def stack_breaks(obs, next_obs):
    """True where next_obs is not obs shifted by one frame: the 4-frame stack of a real step always shifts by exactly
    one frame, so a break means the environment was reset in between (gymnasium: any reset; envpool: a game over)."""
    return ~(next_obs[:, :3] == obs[:, 1:]).flatten(1).all(1)


def rollout_observations(run):
    """The observations the loop acted on, in order, (steps + 1, envs, 4, 84, 84): the rollout's policy calls (no action
    given) and the final bootstrap observation of each iteration, which is the next iteration's first."""
    steps = [r["args"]["x"] for r in run.calls("get_action_and_value") if r["args"]["action"] is None]
    return torch.stack(steps + [run.calls("get_value")[-1]["args"]["x"]])


def test_reset_transitions_are_the_ones_the_emulator_reset(loop_run):
    """Each sample's reset flag (its world-model target becomes phi(s)) against the real frame stacks of (s, s'):
    every transition across a reset is flagged; with the gymnasium backend (same-step reset) exactly those are."""
    calls = loop_run.calls("compute_losses")
    obs = torch.cat([c["args"]["mb_obs"] for c in calls])
    next_obs = torch.cat([c["args"]["mb_next_obs"] for c in calls])
    flagged = torch.cat([c["args"]["mb_wm_dones"] for c in calls]).bool()
    breaks = stack_breaks(obs, next_obs)
    assert breaks.sum() >= 2, "the run saw no reset: the check would be empty"
    assert flagged[breaks].all(), "a transition across a reset was not masked"
    if loop_run.backend == "gymnasium":
        assert torch.equal(flagged, breaks)
    else:  # envpool also flags the step after each lost life, which continues the frame stack but ignores its action
        assert flagged.sum() > breaks.sum()


def test_gae_bootstrap_is_cut_by_the_flag_of_the_next_observation(loop_run):
    """compute_gae gets next_dones[t] = 'obs[t + 1] ended an episode': at the reset transition itself with gymnasium,
    one step before it with envpool (envpool resets one step late); its advantages are what the minibatches get."""
    seq = rollout_observations(loop_run)
    breaks = torch.stack([stack_breaks(seq[k], seq[k + 1]) for k in range(len(seq) - 1)]).float()  # (steps, envs)
    next_dones = torch.cat([c["args"]["next_dones"] for c in loop_run.calls("compute_gae")])
    assert breaks.sum() >= 2
    if loop_run.backend == "gymnasium":
        assert torch.equal(next_dones, breaks)
    else:  # a game over seen at transition k + 1 was announced by the done flag of step k
        assert (next_dones[:-1][breaks[1:].bool()] == 1).all()
    per_iteration = len(loop_run.calls("compute_losses")) // len(loop_run.calls("compute_gae"))
    for i, gae in enumerate(loop_run.calls("compute_gae")):
        minibatches = loop_run.calls("compute_losses")[i * per_iteration : (i + 1) * per_iteration]
        fed = torch.cat([c["args"]["mb_advantages"] for c in minibatches])
        assert torch.equal(fed.sort().values, gae["ret"][0].flatten().sort().values)


def test_logged_sir_is_the_max_ratio_of_the_saved_policy_over_the_last_batch(loop_run):
    """charts/sir of the last iteration = max over its batch of pi_new(a|s) / pi_old(a|s), recomputed from the saved
    final weights and the behaviour log-probs the minibatches carried."""
    per_iteration = len(loop_run.calls("compute_losses")) // len(loop_run.calls("compute_gae"))
    last = loop_run.calls("compute_losses")[-per_iteration:]
    obs, actions, old_logprobs = (torch.cat([c["args"][k] for c in last]) for k in ("mb_obs", "mb_actions", "mb_logprobs"))
    agent = d.Agent(4)
    agent.load_state_dict(loop_run.model)
    with torch.no_grad():
        ratios = (agent.get_action_and_value(obs, actions)[1] - old_logprobs).exp()
    # the script's float32 log-probabilities against this float32 recomputation: an absolute error in log pi' (normwise
    # on the logits' scale, over the network's sums: conftest.f32_tol; twice through log-softmax) is a relative error of
    # the ratio
    with torch.no_grad():
        logp = torch.log_softmax(agent.actor(agent.network(agent.encode(obs))), -1)
    rel = 2 * f32_tol(256 + 512 + 576 + 3136 + 512, 2) * logp.abs().max().item()
    assert ratios.max() - ratios.min() > 2 * rel * ratios.max()  # the max is told apart from any other statistic
    assert loop_run.scalars["charts/sir"][-1] == pytest.approx(ratios.max().item(), rel=rel)


def test_spectral_norm_mode_reaches_the_model(loop_run):
    """--no-sn-faithful (envpool run): every sigma the layers use is the exact largest singular value (an SVD in
    float64 here); the default faithful mode (gymnasium run) uses the official estimate, visibly different."""
    calls = loop_run.calls("spectral_sigma")
    assert len(calls) == 12
    for c in calls:
        exact = torch.linalg.svdvals(c["args"]["matrix"].double())[..., 0]
        if loop_run.backend == "envpool":
            # the script's float32 SVD errs by sums over at most rows + columns terms
            assert_normwise(c["ret"], exact, f32_tol(sum(c["args"]["matrix"].shape[-2:])), "sigma_1")
        else:
            assert ((c["ret"].double() / exact - 1).abs() > 1e-3).any()


def test_torchrun_averages_the_gradients_of_the_two_ranks(tmp_path):
    """deepspi_atari_multigpu.py with two gloo ranks, each on its own games, one minibatch, one step (PPO mode: no
    sampled noise; no grad clipping): the saved weights are one Adam step along the mean of the two ranks' gradients,
    written out here by hand; a sum would change every entry whose gradient is small next to Adam's eps."""
    flags = ["--env-backend", "gymnasium", "--num-envs", "4", "--num-steps", "16", "--total-timesteps", "64", "--save-model"]
    flags += ["--num-minibatches", "1", "--update-epochs", "1", "--max-grad-norm", "1e9"]
    flags += ["--reward-loss-coef", "0", "--transition-loss-coef", "0"]
    probe_run(tmp_path, *flags, record="compute_losses", torchrun=2, modules=True)
    ranks = [torch.load(tmp_path / f"record_rank{r}.pt", weights_only=False)[0] for r in (0, 1)]
    saved = torch.load(os.path.join(only_run_dir(tmp_path), "deepspi_atari_multigpu.cleanrl_model"), weights_only=False)
    assert not torch.equal(ranks[0]["args"]["mb_obs"], ranks[1]["args"]["mb_obs"])  # the ranks saw different data
    assert torch.equal(ranks[0]["args"]["agent"]["actor.weight"], ranks[1]["args"]["agent"]["actor.weight"])
    agent = d.Agent(4)
    agent.load_state_dict(ranks[0]["args"]["agent"])  # the weights before the step
    args = types.SimpleNamespace(**saved["args"])
    grads = []
    for r in ranks:
        batch = {k: v for k, v in r["args"].items() if k.startswith("mb_")}
        loss, _ = d.compute_losses(agent, args, **batch)
        grads.append(torch.autograd.grad(loss, list(agent.parameters()), allow_unused=True))
    lr, eps = saved["args"]["learning_rate"], 1e-5
    for (name, p), g0, g1 in zip(agent.named_parameters(), *grads, strict=True):
        if g0 is None:  # the world model is not used in PPO mode
            assert torch.equal(saved["model"][name], p.detach()), name
            continue
        g = (g0 + g1) / 2  # Adam's first step: m_hat = g, v_hat = g^2
        expected = p.detach() - lr * g / (g.abs() + eps)
        torch.testing.assert_close(saved["model"][name], expected, rtol=0, atol=2e-7, msg=name)


# ------------------------------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_greedy_evaluation_takes_the_argmax(monkeypatch, backend):
    """A fixed network whose most likely action (p = 0.4) is RIGHT: the greedy games play only RIGHT, the sampled
    games do not."""
    agent = d.Agent(4)
    with torch.no_grad():
        agent.actor.weight.zero_()
        agent.actor.bias.copy_(torch.tensor([0.2, 0.2, 0.4, 0.2]).log())  # RIGHT = action 2
    played, make_envs = [], d.make_envs

    def recording_make_envs(*a, **kw):
        envs = make_envs(*a, **kw)
        step = envs.step
        envs.step = lambda actions: (played[-1].extend(actions.tolist()), step(actions))[1]
        played.append([])
        return envs

    monkeypatch.setattr(d, "make_envs", recording_make_envs)
    logged = []
    writer = types.SimpleNamespace(add_scalar=lambda tag, value, step: logged.append(tag))
    args = types.SimpleNamespace(eval_episodes=1, capture_video=False, env_id="BreakoutNoFrameskip-v4", seed=1, num_envs=8)
    args.stochastic_env, args.bf16 = False, False
    args.env_backend = backend
    d.evaluate(agent, args, "unused", writer, torch.device("cpu"))
    greedy, sampled = played
    assert set(greedy) == {2} and len(greedy) > 10
    assert len(set(sampled)) == 4
    assert logged == ["eval/greedy_episodic_return", "eval/episodic_return"]


def test_bf16_reaches_the_rollout_and_the_update(tmp_path):
    """--bf16: the real loop's rollout values and minibatch latents are bfloat16 (autocast is on), while the
    log-probabilities, ratios and losses stay float32; without the flag everything is float32."""
    for flags, low in (([], torch.float32), (["--bf16"], torch.bfloat16)):
        cwd = tmp_path / str(low)
        cwd.mkdir()
        probe_run(cwd, *LOOP[:6], "--total-timesteps", "256", *flags, record="compute_losses:1,get_action_and_value:1")
        records = torch.load(cwd / "record.pt", weights_only=False)
        (rollout,) = [r["ret"] for r in records if r["name"] == "get_action_and_value"]
        ((loss, out),) = [r["ret"] for r in records if r["name"] == "compute_losses"]
        assert rollout[3].dtype == out["z"].dtype == low  # the critic's output and the encoder's latent
        assert rollout[1].dtype == out["ratio"].dtype == out["transition_loss"].dtype == loss.dtype == torch.float32
