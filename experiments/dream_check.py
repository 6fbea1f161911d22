# Where DreamSPI's imagination leaves the real data: loads a dreamspi_atari.py checkpoint, plays --envs x --steps real
# steps with its sampled policy (the training envs: envpool's episodic lives and clipped rewards), then rolls the world
# model out from every real state for the run's imagination horizon, as the training loop does. For each imagined step
# h (h = 0: the real states) it prints the share of rollouts that drew a done, and over the latents the world model
# sampled: the policy's entropy, the predicted reward and value, the shares of zero and negative entries and how far
# they lie from the real latents; then the real steps' life losses and reward, the done head on real next states and
# the size of the transition noise; how many distinct latents the encoder gives the real states and how much the policy
# changes between them. Run from the repository root:
#   python experiments/dream_check.py runs/BreakoutNoFrameskip-v4__dreamspi-8x128-a34bde__1__*/checkpoint.pt
#   python experiments/dream_check.py CHECKPOINT --markdown docs/results.md  # the table between the file's
#       <!-- experiments/dream_check.py {exp_name} --> and <!-- /experiments/dream_check.py {exp_name} --> lines
#   python experiments/dream_check.py CHECKPOINT --fresh  # the same agent as initialised (markers: "{exp_name} fresh")
import argparse
import math
import os
import shlex
import sys

import numpy as np
import torch
from torch.distributions.categorical import Categorical

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare  # noqa: E402  (the markdown block helpers)

import evaluate  # noqa: E402  (load_script, fail)
from benchmarks.maze import cpu_name  # noqa: E402


def load(path, fresh=False):
    """(script module, agent, saved dict) of a dreamspi_atari.py checkpoint.pt or saved model; bad input exits 2.
    fresh: the agent as initialised (torch seed: the run's seed) instead of the file's weights."""
    if not os.path.isfile(path):
        evaluate.fail(f"no file {path}")
    try:  # a pickle: load only files you trust
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        evaluate.fail(f"cannot read {path} ({type(e).__name__})")
    if not isinstance(saved, dict) or not {"model", "args"} <= saved.keys():
        evaluate.fail(f"{path} is neither a checkpoint.pt nor a saved model")
    if saved.get("script", "dreamspi_atari.py") != "dreamspi_atari.py" or "done_predictor.fc2.bias" not in saved["model"]:
        evaluate.fail(f"{path} was not written by dreamspi_atari.py: only DreamSPI imagines")
    script = evaluate.load_script(os.path.join(os.path.dirname(HERE), "dreamspi_atari.py"))
    if fresh:  # as dreamspi_atari.py makes it: torch.manual_seed(args.seed), then Agent
        torch.manual_seed(saved["args"]["seed"])
    agent = script.Agent(saved["model"]["actor.bias"].numel(), saved["args"].get("sn_faithful", True))
    if not fresh:
        agent.load_state_dict(saved["model"])
    return script, agent.eval(), saved


def play(script, agent, args, num_envs, num_steps, seed):
    """num_steps steps of num_envs training envs under the sampled policy: obs (T+1, N, ...), rewards, dones (T+1, N; the
    flag that came with obs[t]) and the real next observation of each step (envpool: obs[t + 1]; gymnasium: final_obs
    where a step ended). With envpool a step whose obs came with a done flag is the reset the env does one step late."""
    envs = script.make_envs(args["env_id"], args["env_backend"], num_envs, seed, None, args.get("stochastic_env", False))
    next_obs, _ = envs.reset()
    obs = np.zeros((num_steps + 1,) + next_obs.shape, dtype=next_obs.dtype)
    real_next = np.zeros((num_steps,) + next_obs.shape, dtype=next_obs.dtype)
    rewards = np.zeros((num_steps, num_envs), dtype=np.float32)
    dones = np.zeros((num_steps + 1, num_envs), dtype=np.float32)
    ended = np.zeros((num_steps, num_envs), dtype=np.float32)  # the step ended an episode (a lost life)
    for t in range(num_steps):
        obs[t] = next_obs
        with torch.inference_mode():
            action = agent.get_action_and_value(torch.as_tensor(next_obs))[0]
        next_obs, reward, terminations, truncations, infos = envs.step(action.numpy())
        rewards[t] = reward
        ended[t] = np.logical_or(terminations, truncations)
        real_next[t] = next_obs
        for i in np.nonzero(infos.get("_final_obs", []))[0]:  # gymnasium resets in the same step
            real_next[t, i] = infos["final_obs"][i]
        dones[t + 1] = ended[t] if args["env_backend"] == "envpool" else 0.0
    obs[num_steps] = next_obs
    envs.close()
    return obs, real_next, rewards, dones, ended


def nearest(points, reference, exclude_self=False):
    """Each point's Euclidean distance to its nearest reference point (itself left out when points is reference)."""
    d = torch.cdist(points.flatten(1).double(), reference.flatten(1).double())
    if exclude_self:
        d.fill_diagonal_(math.inf)
    return d.min(1).values


def signals(agent, z):
    """The policy's entropy, the value, and the share of zero and of negative entries of the latents z (the real ones
    are post-ReLU maps: never negative, mostly zero); nan for an empty z."""
    if len(z) == 0:
        return dict(entropy=math.nan, value=math.nan, zeros=math.nan, negative=math.nan)
    hidden = agent.network(z)
    entropy = Categorical(logits=agent.actor(hidden).float()).entropy().mean().item()
    zeros = (z == 0).float().mean().item()
    negative = (z < 0).float().mean().item()
    return dict(entropy=entropy, value=agent.critic(hidden).float().mean().item(), zeros=zeros, negative=negative)


def mean_or_nan(x):
    return x.float().mean().item() if len(x) else math.nan


def check(script, agent, saved, num_envs, num_steps, seed, horizon):
    """The rows of the table and the notes under it.

    Row h = 0: the real states (their distance: to the nearest other real state). Row h >= 1: the share of rollouts
    whose step h drew a done (such a rollout stays where it was for that step, as in training), and the other columns
    over the latents that step h sampled, which are the world model's. Distances are in units of the mean move of
    one real step, ||phi(s') - phi(s)||. Notes: the real steps' life losses and reward; the done head on the real next
    states that lost a life and on the others; the size of the transition noise (a sample minus the mixture's mean)
    against a real entry's; the distance and negative share of the noise-free first step (the mixture's mean); the
    distinct observations and latents of the real states, the latents' nonzero entries, and the policy's mean
    probabilities over the real states with the largest total-variation distance of one state's probabilities from them."""
    args = saved["args"]
    torch.manual_seed(seed)  # the policy's and the world model's draws
    obs, real_next, rewards, dones, ended = play(script, agent, args, num_envs, num_steps, seed)
    with torch.no_grad():
        frames = torch.as_tensor(obs[:-1]).flatten(0, 1)  # the real states' observations, (T N, ...)
        z0 = agent.encode(frames)
        d0 = torch.as_tensor(dones[:-1]).flatten()
        im = script.imagine(agent, z0, d0, horizon, args.get("soft_done", False))
        latents = torch.cat([im["obs"], im["next_obs"][-1:]])  # (H + 1, N, ...)
        valid = d0 == 0  # the real states and transitions, without envpool's reset steps
        real = z0[valid]
        z_next = agent.encode(torch.as_tensor(real_next).flatten(0, 1))[valid]
        move = (z_next - real).flatten(1).norm(dim=1).mean().item()
        move = move if move > 0 else math.nan  # an encoder that gives every state one latent: no unit of distance
        rows = [dict(step="real states, h = 0", done=math.nan, **signals(agent, z0))]
        rows[0]["reward"] = im["rewards"][0].mean().item()
        rows[0]["distance"] = nearest(real, real, exclude_self=True).mean().item() / move
        for h in range(1, horizon + 1):
            drawn = im["next_dones"][h - 1]
            sampled = drawn < 1 if args.get("soft_done", False) else drawn == 0  # soft dones hold nothing
            z = latents[h][sampled]
            row = dict(step=f"imagined h = {h}", done=drawn.mean().item(), **signals(agent, z))
            row["reward"] = mean_or_nan(im["rewards"][h][sampled]) if h < horizon else math.nan
            row["distance"] = nearest(z, real).mean().item() / move if len(z) else math.nan
            rows.append(row)
        p_next = torch.sigmoid(agent.done_predictor(z_next))
        ended_t = torch.as_tensor(ended).flatten()[valid]
        notes = dict(lost_life=ended_t.mean().item(), real_reward=torch.as_tensor(rewards).flatten()[valid].mean().item())
        notes.update(lost=mean_or_nan(p_next[ended_t == 1]), kept=mean_or_nan(p_next[ended_t == 0]))
        notes.update(n_lost=int(ended_t.sum().item()), n_kept=int((ended_t == 0).sum().item()))
        sample, _, loc, _ = agent.transition_model(z0[valid], im["actions"][0][valid])
        mean = agent.transition_model(z0[valid], im["actions"][0][valid], torch.zeros_like(loc))[0]  # eps = 0
        notes.update(noise=(sample - mean).abs().mean().item(), size=real.abs().mean().item())
        notes.update(mean_distance=nearest(mean, real).mean().item() / move, mean_negative=(mean < 0).float().mean().item())
        # the encoder's range and the policy's dependence on the state, over the real states (no reset steps)
        images = frames[valid].flatten(1)
        nonzero = (real.flatten(1) != 0).sum(1)
        notes.update(n_real=len(real), n_images=len(torch.unique(images, dim=0)), entries=real[0].numel())
        notes.update(n_distinct=len(torch.unique(real.flatten(1), dim=0)))
        notes.update(nonzero=nonzero.float().mean().item(), all_zero=(nonzero == 0).float().mean().item())
        probs = Categorical(logits=agent.actor(agent.network(real)).float()).probs
        mean_probs = probs.mean(0)
        notes.update(mean_probs=mean_probs.tolist(), largest_tv=0.5 * (probs - mean_probs).abs().sum(1).max().item())
    return rows, notes


def fmt(x, digits=3):
    return "–" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def table(rows, notes, saved, command, num_envs, num_steps, fresh=False):
    """The markdown block: what was measured, the table, the notes, the command and the machine."""
    args = saved["args"]
    len_actions = saved["model"]["actor.bias"].numel()
    step = saved.get("global_step", args.get("total_timesteps"))
    when = "freshly initialised (its Agent and arguments, new weights)" if fresh else f"at step {step:,}"
    lines = [
        f"`{args['exp_name']}` (seed {args['seed']}) {when}: {num_envs} x {num_steps} real steps with the sampled "
        f"policy, and from each real state a rollout of {len(rows) - 1} imagined steps, as in training.",
        "",
        "- h = 0: the real states. The distance is to the nearest other real state.",
        "- h >= 1: *done*: the share of rollouts whose step h drew a done (they stay where they were for that step). The "
        "other columns are over the latents that step h sampled from the world model.",
        "- *reward*: the reward head's prediction. *distance*: to the nearest real latent, in units of the mean move of "
        "one real step (the distance between the latents of a real state and of the state after it).",
        "",
        "| step | done | policy entropy | reward | value | zero entries | negative entries | distance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["step"], fmt(r["done"]), fmt(r["entropy"]), fmt(r["reward"], 4), fmt(r["value"])]
        cells += [fmt(r["zeros"]), fmt(r["negative"]), fmt(r["distance"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The real steps: {fmt(notes['lost_life'])} of them lost a life; their reward averages "
        f"{fmt(notes['real_reward'], 4)}. The done head on the real next states: P(done) {fmt(notes['lost'])} after "
        f"the {notes['n_lost']} steps that lost a life, {fmt(notes['kept'])} after the {notes['n_kept']} others.",
        "",
        f"The transition noise (a sample minus the mixture's mean) averages {notes['noise']:.3g} an entry in absolute "
        f"value; a real latent's entries average {notes['size']:.3g}. Without its noise (the mixture's mean), the "
        f"first imagined step lies at a distance of {fmt(notes['mean_distance'], 1)}, with {fmt(notes['mean_negative'])} "
        "of its entries negative.",
        "",
        f"The encoder on the {notes['n_real']} real states (without envpool's reset steps), which hold "
        f"{notes['n_images']} distinct observations: {notes['n_distinct']} distinct latents; a latent has "
        f"{fmt(notes['nonzero'], 2)} nonzero entries of {notes['entries']} on average, and {fmt(notes['all_zero'])} of "
        f"the states have the all-zero latent. The policy on them: mean probabilities "
        f"{' / '.join(fmt(p) for p in notes['mean_probs'])} for actions 0 to {len_actions - 1}; no state's "
        f"probabilities lie more than {fmt(notes['largest_tv'], 4)} (total variation) from that mean.",
        "",
        f"The policy's largest entropy is ln {len_actions} = {math.log(len_actions):.3f}. Made by `{command}` on "
        f"{cpu_name()}.",
    ]
    return "\n".join(lines) + "\n"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a wrong command line: one line, not argparse's usage and message
        evaluate.fail(message)


def main():
    parser = Parser(description="where DreamSPI's imagined rollouts leave the real data")
    parser.add_argument("checkpoint", help="a checkpoint.pt or .cleanrl_model written by dreamspi_atari.py")
    parser.add_argument("--envs", type=int, default=8, help="real envs")
    parser.add_argument("--steps", type=int, default=128, help="real steps of each env")
    parser.add_argument("--seed", type=int, default=1000, help="env i is seeded seed + i; the torch draws use seed")
    parser.add_argument("--horizon", type=int, help="imagined steps (default: the run's --imagination-horizon)")
    parser.add_argument("--fresh", action="store_true", help="the run's agent as initialised, not its trained weights")
    parser.add_argument("--markdown", nargs="*", default=[], help="also write the block into these files")
    cli = parser.parse_args()
    for name in ("envs", "steps"):
        if getattr(cli, name) <= 0:
            evaluate.fail(f"--{name} {getattr(cli, name)} must be positive")
    if cli.horizon is not None and cli.horizon <= 0:
        evaluate.fail(f"--horizon {cli.horizon} must be positive")
    script, agent, saved = load(cli.checkpoint, cli.fresh)
    begin, end = compare.markers("dream_check.py", saved["args"]["exp_name"] + (" fresh" if cli.fresh else ""))
    compare.check_markers(cli.markdown, begin, end)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    horizon = cli.horizon or saved["args"]["imagination_horizon"]
    rows, notes = check(script, agent, saved, cli.envs, cli.steps, cli.seed, horizon)
    command = "python experiments/dream_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    block = table(rows, notes, saved, command, cli.envs, cli.steps, cli.fresh)
    print(block, end="")
    for path in cli.markdown:
        compare.write_between(path, begin, end, block)


if __name__ == "__main__":
    main()
