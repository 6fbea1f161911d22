# Cost of one update minibatch (the loss + backward + grad clip + Adam step) of deepspi_atari.py, in several modes
# alternated in one process (A B C A B C ...) on random Atari-shaped data, so that machine load hits them alike. Timed
# in process CPU time, so that time spent descheduled by other jobs does not count: run it with one thread
# (OMP_NUM_THREADS=1), where CPU time is the work done. Printed, never asserted. The modes:
#   deepspi, ppo            the script as it is (PPO: both world-model coefficients 0); -bf16: under --bf16's autocast
#   deepspi-nchw, ppo-nchw  the encoder in the default NCHW layout instead of channels_last (the layout before)
#   ppo+s'                  PPO plus an encoder pass (forward and backward) over s': DeepSPI with a free world model
#   grouped-head            the transition head's conv2 as one dense conv per action group instead of gathered weights
#   compiled                torch.compile(minibatch_loss); its compilation is timed apart, on the first call
# The last two are alternatives that were measured and not adopted (docs/speed.md).
#   OMP_NUM_THREADS=1 python benchmarks/minibatch.py --actions 4 18 --rounds 6 [--modes deepspi ppo ...]
import argparse
import contextlib
import dataclasses
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["deepspi", "deepspi-nchw", "deepspi-bf16", "ppo", "ppo-nchw", "ppo-bf16", "ppo+s'", "grouped-head", "compiled"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_batch(n_actions, size, generator):
    obs = torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator)
    next_obs = torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator)
    actions = torch.randint(0, n_actions, (size,), generator=generator)
    logprobs = torch.full((size,), -torch.log(torch.tensor(float(n_actions))).item())
    advantages, returns = torch.randn(size, generator=generator), torch.randn(size, generator=generator)
    rewards = torch.randint(-1, 2, (size,), generator=generator).float()
    dones = (torch.rand(size, generator=generator) < 0.05).float()
    return obs, next_obs, actions, logprobs, advantages, returns, rewards, dones


def minibatch_loss(script, agent, args, obs, next_obs, actions, logprobs, advantages, returns, rewards, resets):
    """The loss that deepspi_atari.py's minibatch loop computes inline (its lines, on these tensors)."""
    world_model = args.reward_loss_coef > 0 or args.transition_loss_coef > 0
    z, next_z = agent.encode(torch.cat([obs, next_obs]) if world_model else obs).tensor_split([len(obs)])
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(None, actions, z)
    ratio = (newlogprob - logprobs).exp()
    advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    reward_loss = transition_loss = torch.zeros_like(advantages)
    if world_model:
        reward_loss, transition_loss = agent.world_model_losses(z, next_z, actions, rewards, resets)
    utility = advantages - (args.reward_loss_coef * reward_loss + args.transition_loss_coef * transition_loss)
    pg_loss = torch.max(-utility * ratio, -utility * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
    v_loss = 0.5 * ((newvalue.view(-1) - returns) ** 2).mean()
    return pg_loss - args.ent_coef * entropy.mean() + v_loss * args.vf_coef


def grouped_head(script):
    """TransitionModel.forward with conv2 run densely once per action, on the samples that took it (exact, too)."""

    def forward(self, z, action, eps=None):
        b, a, (G, K, C, n) = z.shape[0], action.long(), (self.groups, self.n_components, self.channels, self.n_actions)
        h = script.group_sort(self.conv1(z))
        hp = F.pad(h, (0, 1, 0, 1))
        w, order = self.conv2.normalized_weight(), torch.argsort(a)
        parts = hp[order].split(torch.bincount(a, minlength=n).tolist())
        o = [F.conv2d(p, w[k::n], self.conv2.bias[k::n], groups=G) for k, p in enumerate(parts) if len(p)]
        o = torch.cat(o)[torch.argsort(order)].float().view(b, C, K, 2, *z.shape[2:])  # channels (c, k, loc/scale)
        loc, raw_scale = 0.5 * o[:, :, :, 0].transpose(1, 2), o[:, :, :, 1].transpose(1, 2)
        scale = 0.5 * (F.softplus(raw_scale) + 1e-6)
        logits = self.mixture(h.flatten(1)).float().view(b, K, n)
        logits = logits.gather(2, a.view(-1, 1, 1).expand(-1, K, 1)).squeeze(2)
        eps = torch.randn(loc.shape).clamp(-1.0, 1.0) if eps is None else eps
        return (logits.softmax(1).view(b, -1, 1, 1, 1) * (loc + scale * eps)).sum(1), logits, loc, scale

    return forward


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="per-minibatch cost of deepspi_atari.py's update, by mode")
    parser.add_argument("--actions", type=int, nargs="+", default=[4, 18], help="action counts (Breakout 4, Alien 18)")
    parser.add_argument("--minibatch-size", type=int, default=256, help="official: 128 x 8 / 4 minibatches")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    args = parser.parse_args()
    script = load_script("deepspi_atari")
    torch.use_deterministic_algorithms(True)  # as the script's default --torch-deterministic on CPU
    base = script.Args()
    ppo = dataclasses.replace(base, reward_loss_coef=0.0, transition_loss_coef=0.0)
    compiled = torch.compile(minibatch_loss)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), minibatch {args.minibatch_size}")
    for n_actions in args.actions:
        torch.manual_seed(1)
        batch = make_batch(n_actions, args.minibatch_size, torch.Generator().manual_seed(1))
        times = {mode: [] for mode in args.modes}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, oneDNN primitives; compiles the compiled mode)
            for mode in args.modes:
                mode_args = ppo if mode.startswith("ppo") else base
                agent = script.Agent(n_actions)
                optimizer = torch.optim.Adam(agent.parameters(), lr=base.learning_rate, eps=1e-5)
                with contextlib.ExitStack() as stack:
                    if mode.endswith("-nchw"):
                        stack.enter_context(patched(script.Agent, "encode", lambda self, x: self.encoder(x / 255.0)))
                    if mode == "grouped-head":
                        stack.enter_context(patched(script.TransitionModel, "forward", grouped_head(script)))
                    losses = compiled if mode == "compiled" else minibatch_loss
                    t0 = time.process_time()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.endswith("-bf16")):
                        loss = losses(script, agent, mode_args, *batch)
                    if mode == "ppo+s'":  # the gradient is zero, but the backward pass costs what it costs in DeepSPI
                        loss = loss + 0.0 * agent.encode(batch[1]).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(agent.parameters(), base.max_grad_norm)
                    optimizer.step()
                    elapsed = time.process_time() - t0
                if r:
                    times[mode].append(elapsed)
                elif mode == "compiled":
                    print(f"{n_actions:>2} actions, compiled: first call (compilation) {elapsed:.0f} s of CPU time")
        for mode, values in times.items():  # time(deepspi) / time(mode), paired by round: the update's speed-up
            ms = [1000 * v for v in values]
            line = f"{n_actions:>2} actions, {mode:>12}: {min(ms):.0f} / {statistics.median(ms):.0f} / {max(ms):.0f} ms"
            if "deepspi" in times and mode != "deepspi":
                ratios = sorted(d / m for d, m in zip(times["deepspi"], values, strict=True))
                line += f"; deepspi time / its time {ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}"
            print(line, flush=True)
