# Cost of one update minibatch (compute_losses + backward + grad clip + Adam step) of deepspi_atari.py in DeepSPI and in
# PPO mode, alternated in one process (A B A B ...) on random Atari-shaped data, so that machine load hits both alike.
# Timed in process CPU time, so that time spent descheduled by other jobs does not count: run it with one thread
# (OMP_NUM_THREADS=1), where CPU time is the work done. Printed, never asserted. The third mode, "ppo+s'", is PPO mode
# plus an encoder pass (forward and backward) over s': DeepSPI with a free world model, the bound on any exact speed-up
# of the world model, since phi(s') must go through the live encoder in every minibatch.
#   OMP_NUM_THREADS=1 python benchmarks/minibatch.py --actions 4 18 --rounds 6
import argparse
import dataclasses
import importlib.util
import os
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="per-minibatch cost of DeepSPI vs PPO mode (deepspi_atari.py)")
    parser.add_argument("--actions", type=int, nargs="+", default=[4, 18], help="action counts (Breakout 4, Alien 18)")
    parser.add_argument("--minibatch-size", type=int, default=256, help="official: 128 x 8 / 4 minibatches")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    script = load_script("deepspi_atari")
    base = script.Args()
    ppo = dataclasses.replace(base, reward_loss_coef=0.0, transition_loss_coef=0.0)
    modes = {"deepspi": base, "ppo": ppo, "ppo+s'": ppo}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), minibatch {args.minibatch_size}")
    for n_actions in args.actions:
        torch.manual_seed(1)
        batch = make_batch(n_actions, args.minibatch_size, torch.Generator().manual_seed(1))
        times = {mode: [] for mode in modes}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, oneDNN primitives)
            for mode, mode_args in modes.items():
                agent = script.Agent(n_actions)
                optimizer = torch.optim.Adam(agent.parameters(), lr=base.learning_rate, eps=1e-5)
                t0 = time.process_time()
                loss, _ = script.compute_losses(agent, mode_args, *batch)
                if mode == "ppo+s'":  # the gradient is zero, but the backward pass costs what it costs in DeepSPI
                    loss = loss + 0.0 * agent.encode(batch[1]).sum()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), base.max_grad_norm)
                optimizer.step()
                if r:
                    times[mode].append(time.process_time() - t0)
        for mode, values in times.items():
            ms = [1000 * v for v in values]
            print(f"{n_actions:>2} actions, {mode:>7}: {min(ms):.0f} / {statistics.median(ms):.0f} / {max(ms):.0f} ms")
        for mode in ("deepspi", "ppo+s'"):  # time(PPO) / time(mode), paired by round: the update's SPS ratio
            ratios = sorted(p / d for p, d in zip(times["ppo"], times[mode], strict=True))
            spread = f"{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}"
            print(f"{n_actions:>2} actions, PPO time / {mode} time: {spread}")
