"""deepspi_atari.py's training loop, checked through its real CLI on real games: the minibatches its inline loss trains
on, the loss and the clipped gradients it produces (against tests/deepspi_reference.py's loss on the same inputs and
weights, in each loss mode), the advantages of its inline GAE, the SIR it logs, the spectral norm it builds, the
gradients that deepspi_atari_multigpu.py averages over its torchrun ranks, and --bf16.

The runs go through tests/probe.py, which records, without changing the script, the arguments and results of chosen
functions and the values the inline loop holds at chosen lines (the minibatch, the weights and random state before its
forward pass, the loss terms and gradients at `optimizer.step()`); every assertion compares them with an oracle that
does not share the script's code: the frame stack of the real emulator, the reference loss, an explicit sum, a
recomputation from the saved model, an SVD, a hand-written Adam step.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import REPO, U32, assert_normwise, f32_tol, only_run_dir, read_scalars
from deepspi_reference import minibatch_from_storage, reference_loss

import deepspi_atari as d

PROBE = os.path.join(REPO, "tests", "probe.py")
SCRIPT = os.path.join(REPO, "deepspi_atari.py")
MULTIGPU = os.path.join(REPO, "deepspi_atari_multigpu.py")
# 2 envs x 128 steps x 3 iterations: several lost lives and game overs of a near-random Breakout policy
LOOP = ["--env-id", "BreakoutNoFrameskip-v4", "--num-envs", "2", "--num-steps", "128", "--total-timesteps", "768"]
LOOP += ["--update-epochs", "1", "--save-model"]  # one epoch: each iteration's minibatches are its whole batch, once
RECORDED = "get_action_and_value,get_value,spectral_sigma:12"
# the lines of the inline loop and what is recorded there: (line, expressions, how many times at most); docs/tests.md
# lists them: a line edited away stops the probed run with its name (tests/probe.py)
FORWARD = "mb_inds = b_inds[start:end]"  # before the minibatch's forward pass: its weights and random state
STEP = "optimizer.step()"
GAE = "returns = advantages + values"
UPDATE = "clipfracs = []"  # the update starts: the rollout storage, as tests/recorder.py keeps it
STORAGE = ["obs", "actions", "logprobs", "rewards", "dones", "values", "next_value"]
MINIBATCH = [
    "b_obs",
    "b_next_obs",
    "b_actions",
    "b_logprobs",
    "b_advantages",
    "b_returns",
    "b_values",
    "b_rewards",
    "b_resets",
]
TRAINED = [f"{b}[mb_inds]" for b in MINIBATCH] + ["iteration", "mb_inds", "mb_advantages", "loss", "pg_loss", "v_loss"]
TRAINED += ["entropy_loss", "reward_loss", "transition_loss", "newvalue"]
GRADS = "[p.grad for p in agent.parameters()]"
LINES = [[STEP, TRAINED, None], [GAE, ["rewards", "values", "dones", "next_value", "advantages"], None]]


def probe_run(cwd, *flags, record=RECORDED, lines=LINES, torchrun=0, modules=False, timeout=300):
    """The probed CLI run; with torchrun, of deepspi_atari_multigpu.py with that many processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    script = MULTIGPU if torchrun else SCRIPT
    cmd = [sys.executable, *launcher, PROBE, str(cwd / "record.pt"), record, script, "--no-progress", *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PROBE_MODULES="1" if modules else "")
    env["PROBE_LINES"] = json.dumps(lines)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(path, name):
    return [r for r in torch.load(path, weights_only=False) if r["name"] == name]


@pytest.fixture(scope="module", params=["envpool", "gymnasium"])
def loop_run(request, tmp_path_factory):
    """One probed run per backend: envpool with the corrected spectral norm, gymnasium with the faithful one."""
    backend = request.param
    cwd = tmp_path_factory.mktemp(backend)
    sn = ["--no-sn-faithful"] if backend == "envpool" else []
    probe_run(cwd, *LOOP, "--env-backend", backend, *sn)
    run_dir = only_run_dir(cwd)
    model = torch.load(os.path.join(run_dir, "deepspi_atari.cleanrl_model"), weights_only=False)["model"]
    calls = lambda name: records(cwd / "record.pt", name)  # noqa: E731
    steps = [r["args"] for r in calls(STEP)]
    return types.SimpleNamespace(backend=backend, calls=calls, steps=steps, scalars=read_scalars(run_dir), model=model)


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
    """Each trained sample's reset flag (its world-model target becomes phi(s)) against the real frame stacks of
    (s, s'): every transition across a reset is flagged; with the gymnasium backend (same-step reset) exactly those are."""
    obs = torch.cat([s["b_obs[mb_inds]"] for s in loop_run.steps])
    next_obs = torch.cat([s["b_next_obs[mb_inds]"] for s in loop_run.steps])
    flagged = torch.cat([s["b_resets[mb_inds]"] for s in loop_run.steps]).bool()
    breaks = stack_breaks(obs, next_obs)
    assert breaks.sum() >= 2, "the run saw no reset: the check would be empty"
    assert flagged[breaks].all(), "a transition across a reset was not masked"
    if loop_run.backend == "gymnasium":
        assert torch.equal(flagged, breaks)
    else:  # envpool also flags the step after each lost life, which continues the frame stack but ignores its action
        assert flagged.sum() > breaks.sum()


def test_gae_against_the_discounted_sum_of_td_errors_cut_by_the_next_observations_flag(loop_run):
    """The inline GAE: A_t = sum_k (gamma lambda)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} (1 - d_{t+1}) - V_t, the
    sum stopping after the first step whose next flag d_{t+1} is set, written out as the explicit double sum on each
    iteration's rollout; d_{t+1} ('obs[t + 1] ended an episode') against the frame stacks: the reset transition itself
    with gymnasium, one step before it with envpool (which resets one step late); the minibatches get these advantages."""
    gamma, lam = 0.99, 0.95
    seq = rollout_observations(loop_run)
    breaks = torch.stack([stack_breaks(seq[k], seq[k + 1]) for k in range(len(seq) - 1)]).float()  # (steps, envs)
    gaes = [r["args"] for r in loop_run.calls(GAE)]
    next_dones = torch.cat([g["dones"][1:] for g in gaes])
    assert breaks.sum() >= 2 and next_dones.sum() >= 2
    if loop_run.backend == "gymnasium":
        assert torch.equal(next_dones, breaks)
    else:  # a game over seen at transition k + 1 was announced by the done flag of step k
        assert (next_dones[:-1][breaks[1:].bool()] == 1).all()
    per_iteration = len(loop_run.steps) // len(gaes)
    for i, g in enumerate(gaes):
        rewards, values, cut = g["rewards"].double(), g["values"].double(), g["dones"][1:].double()
        v_next = torch.cat([values[1:], g["next_value"].double()])
        delta = rewards + gamma * v_next * (1 - cut) - values
        expected = torch.zeros_like(delta)
        for t in range(len(delta)):
            weight, alive = 1.0, torch.ones(delta.shape[1], dtype=torch.float64)
            for k in range(t, len(delta)):
                expected[t] += alive * weight * delta[k]
                alive, weight = alive * (1 - cut[k]), weight * gamma * lam
        # float32 against the float64 sum: each advantage sums up to 128 TD errors of 3 terms each (conftest.f32_tol)
        assert_normwise(g["advantages"], expected, f32_tol(3 * len(delta)), f"advantages of iteration {i + 1}")
        fed = torch.cat([s["b_advantages[mb_inds]"] for s in loop_run.steps[i * per_iteration : (i + 1) * per_iteration]])
        assert torch.equal(fed.sort().values, g["advantages"].flatten().sort().values)


def test_logged_sir_is_the_max_ratio_of_the_saved_policy_over_the_last_batch(loop_run):
    """charts/sir of the last iteration = max over its batch of pi_new(a|s) / pi_old(a|s), recomputed from the saved
    final weights and the behaviour log-probs the minibatches carried."""
    per_iteration = len(loop_run.steps) // len(loop_run.calls(GAE))
    last = loop_run.steps[-per_iteration:]
    obs, actions, old_logprobs = (torch.cat([s[f"{k}[mb_inds]"] for s in last]) for k in ("b_obs", "b_actions", "b_logprobs"))
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


# ---------------------------------------------------------------------------------- the inline loss, mode by mode
# the loop and the reference are two float32 computations of the DeepSPI loss (conftest.f32_tol), over the chain of sums
# of test_parity_official.py's loss on a minibatch of 32: the forward value, then its gradient
FWD_K = 256 + 512 + 576 + 256 + 32 + 6272 + 3136 + 32
FWD_TOL, GRAD_TOL = f32_tol(FWD_K, 2), f32_tol(2 * FWD_K + 32 * 20 * 20, 2)


MODES = {
    "deepspi": [],
    "ppo": ["--reward-loss-coef", "0", "--transition-loss-coef", "0"],
    "deep-mdp": ["--deep-mdp"],
    "clip-vloss": ["--clip-vloss", "--max-grad-norm", "1e9", "--learning-rate", "0.003"],  # values move past the clip
}


@pytest.mark.parametrize("mode", list(MODES))
def test_the_loop_trains_on_the_reference_loss(tmp_path, mode):
    """Each optimizer step of a real run (2 iterations x 2 epochs x 2 minibatches) against tests/deepspi_reference.py's
    loss on the same minibatch, weights and random state (the transition noise): the loss, its terms, the utility that
    replaces the advantage, the per-sample world-model losses and every gradient as clipped to --max-grad-norm. The
    reference is pinned to the official code (test_parity_official.py) and to plain PPO, DeepMDP and CleanRL's clipped
    value loss (test_atari.py), so the loop's loss is too, in every mode."""
    flags = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "128", "--num-minibatches", "2"]
    flags += ["--update-epochs", "2", "--save-model", *MODES[mode]]
    lines = [[UPDATE, ["iteration", *STORAGE], None], [FORWARD, ["agent", "torch.get_rng_state()"], None]]
    lines += [[STEP, [*TRAINED, GRADS], None]]
    probe_run(tmp_path, *flags, record="", lines=lines, modules=True)
    run_dir = only_run_dir(tmp_path)
    args = types.SimpleNamespace(
        **torch.load(os.path.join(run_dir, "deepspi_atari.cleanrl_model"), weights_only=False)["args"]
    )
    before, steps = records(tmp_path / "record.pt", FORWARD), records(tmp_path / "record.pt", STEP)
    storage = {r["args"]["iteration"]: r["args"] for r in records(tmp_path / "record.pt", UPDATE)}
    assert len(before) == len(steps) == 2 * 2 * 2 and len(storage) == 2
    for k, (b, s) in enumerate(zip(before, steps, strict=True)):
        agent = d.Agent(4, args.sn_faithful)
        agent.load_state_dict(b["args"]["agent"])
        # every input from the rollout storage and mb_inds, not from the loop's b_* arrays
        mb = minibatch_from_storage(
            storage[s["args"]["iteration"]], s["args"]["mb_inds"], args.gamma, args.gae_lambda, args.env_backend == "gymnasium"
        )
        torch.set_rng_state(b["args"]["torch.get_rng_state()"])  # the loop's transition noise
        inputs = ("obs", "next_obs", "actions", "logprobs", "advantages", "returns", "rewards", "resets")
        loss, out = reference_loss(agent, args, *[mb[name] for name in inputs], values=mb["values"])
        got = s["args"]
        assert_normwise(got["loss"], loss, FWD_TOL, f"step {k}: loss")
        for key, ref in (("pg_loss", "pg_loss"), ("v_loss", "v_loss"), ("entropy_loss", "entropy_loss")):
            assert_normwise(got[key], out[ref], FWD_TOL, f"step {k}: {key}")
        assert_normwise(got["mb_advantages"], out["utility"], FWD_TOL, f"step {k}: utility")  # it replaced the advantage
        if mode != "ppo":
            assert_normwise(got["reward_loss"], out["reward_loss_per_sample"], FWD_TOL, f"step {k}: reward_loss")
            assert_normwise(got["transition_loss"], out["transition_loss_per_sample"], FWD_TOL, f"step {k}: transition_loss")
        params = list(agent.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = torch.cat([g.flatten() for g in grads if g is not None]).norm()
        scale = min(1.0, args.max_grad_norm / (norm.item() + 1e-6))  # clip_grad_norm_
        for (name, _), g_loop, g_ref in zip(agent.named_parameters(), got[GRADS], grads, strict=True):
            if g_ref is None:  # PPO mode: no world model at all
                assert mode == "ppo" and g_loop is None and name.split(".")[0] in ("reward_model", "transition_model"), name
                continue
            assert_normwise(g_loop, g_ref * scale, GRAD_TOL, f"step {k}: grad {name}")
    if mode == "clip-vloss":  # the value clip is exercised
        assert any(((s["args"]["newvalue"] - s["args"]["b_values[mb_inds]"]).abs() > 0.1).any() for s in steps)


def test_torchrun_averages_the_gradients_of_the_two_ranks(tmp_path):
    """deepspi_atari_multigpu.py with two gloo ranks, each on its own games, one minibatch, one step (PPO mode: no
    sampled noise; no grad clipping): the saved weights are one Adam step along the mean of the two ranks' gradients,
    written out here by hand; a sum would change every entry whose gradient is small next to Adam's eps."""
    flags = ["--env-backend", "gymnasium", "--num-envs", "4", "--num-steps", "16", "--total-timesteps", "64", "--save-model"]
    flags += ["--num-minibatches", "1", "--update-epochs", "1", "--max-grad-norm", "1e9"]
    flags += ["--reward-loss-coef", "0", "--transition-loss-coef", "0"]
    lines = [[UPDATE, STORAGE, 1], [FORWARD, ["agent"], 1], [STEP, ["mb_inds"], 1]]
    probe_run(tmp_path, *flags, record="", lines=lines, torchrun=2, modules=True)
    ranks = [torch.load(tmp_path / f"record_rank{r}.pt", weights_only=False) for r in (0, 1)]
    saved = torch.load(os.path.join(only_run_dir(tmp_path), "deepspi_atari_multigpu.cleanrl_model"), weights_only=False)
    args = types.SimpleNamespace(**saved["args"])
    weights = [r[1]["args"]["agent"] for r in ranks]
    # each rank's minibatch from its rollout storage and mb_inds (gymnasium: a reset flag is the next step's done)
    batches = [minibatch_from_storage(r[0]["args"], r[2]["args"]["mb_inds"], args.gamma, args.gae_lambda, True) for r in ranks]
    assert not torch.equal(batches[0]["obs"], batches[1]["obs"])  # the ranks saw different data
    assert torch.equal(weights[0]["actor.weight"], weights[1]["actor.weight"])
    agent = d.Agent(4)
    agent.load_state_dict(weights[0])  # the weights before the step
    grads = []
    inputs = ("obs", "next_obs", "actions", "logprobs", "advantages", "returns", "rewards", "resets")
    for mb in batches:
        loss, _ = reference_loss(agent, args, *[mb[name] for name in inputs])
        grads.append(torch.autograd.grad(loss, list(agent.parameters()), allow_unused=True))
    lr, eps = saved["args"]["learning_rate"], 1e-5
    for (name, p), g0, g1 in zip(agent.named_parameters(), *grads, strict=True):
        if g0 is None:  # the world model is not used in PPO mode
            assert torch.equal(saved["model"][name], p.detach()), name
            continue
        g = (g0 + g1) / 2  # Adam's first step: m_hat = g, v_hat = g^2
        expected = p.detach() - lr * g / (g.abs() + eps)
        # the same float32 gradients on both sides (same kernels, one thread): the two Adam steps differ only by rounding,
        # u |p| for the subtraction on each side and a few u of the step (lr at most) for its own operations
        tol = 2 * U32 * p.detach().abs() + 8 * U32 * lr
        assert ((saved["model"][name] - expected).abs() <= tol).all(), name


def test_bf16_reaches_the_rollout_and_the_update(tmp_path):
    """--bf16: the real loop's rollout values and minibatch latents are bfloat16 (autocast is on), while the
    log-probabilities, ratios and losses stay float32; without the flag everything is float32."""
    dtypes = ["str(z.dtype)", "str(newlogprob.dtype)", "str(ratio.dtype)", "str(transition_loss.dtype)", "str(loss.dtype)"]
    for flags, low in (([], "torch.float32"), (["--bf16"], "torch.bfloat16")):
        cwd = tmp_path / low
        cwd.mkdir()
        probe_run(
            cwd, *LOOP[:6], "--total-timesteps", "256", *flags, record="get_action_and_value:1", lines=[[STEP, dtypes, 1]]
        )
        (rollout,) = records(cwd / "record.pt", "get_action_and_value")
        (step,) = records(cwd / "record.pt", STEP)
        assert str(rollout["ret"][3].dtype) == step["args"]["str(z.dtype)"] == low  # the critic's output, the latent
        assert rollout["ret"][1].dtype == torch.float32
        assert {step["args"][k] for k in dtypes[1:]} == {"torch.float32"}
