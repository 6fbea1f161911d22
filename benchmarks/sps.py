# Side-by-side throughput (SPS, agent steps per second) of DeepSPI, plain PPO, DreamSPI and the raw environment.
# Every run goes through the real CLI in a fresh temporary directory; the modes alternate (A B C A B C ...) over the
# repeats so that a noisy, shared machine slows them alike. Figures are printed, never asserted.
#   python benchmarks/sps.py --iterations 4 --repeats 3 --games Breakout Alien
import argparse
import glob
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATARI = "--env-id {game}NoFrameskip-v4 --no-progress"
MODES = {  # name: "script flags", {game} substituted; "env" is the raw envpool throughput with random actions (the ceiling)
    "deepspi": f"deepspi_atari.py {ATARI}",
    "ppo": f"deepspi_atari.py {ATARI} --reward-loss-coef 0 --transition-loss-coef 0",
    "dreamspi": f"dreamspi_atari.py {ATARI}",
    "env": None,
}
ENV_CEILING = """
import sys, time, envpool, numpy as np
game, num_envs, num_steps, warmup, iterations = sys.argv[1], *map(int, sys.argv[2:])
envs = envpool.make(f"{game}-v5", env_type="gymnasium", num_envs=num_envs, episodic_life=True, reward_clip=True, seed=1,
                    repeat_action_probability=0.0, noop_max=30)
envs.reset()
rng = np.random.default_rng(1)
for i in range(warmup + iterations):
    if i == warmup:
        start = time.perf_counter()
    for _ in range(num_steps):
        envs.step(rng.integers(envs.single_action_space.n, size=num_envs))
print(iterations * num_steps * num_envs / (time.perf_counter() - start))
"""


def read_sps(run_dir, warmup):
    """(steady-state SPS over the iterations after the warm-up, from the wall times of the charts/SPS events; the
    script's own last charts/SPS, which counts from start-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(run_dir, "runs", "*"))
    scalars = EventAccumulator(events, size_guidance={"scalars": 0}).Reload().Scalars("charts/SPS")
    first, last = scalars[warmup - 1], scalars[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time), last.value


def run_mode(mode, game, args):
    """One run; returns (steady SPS, the script's own last charts/SPS or None)."""
    if mode == "env":
        cmd = [sys.executable, "-c", ENV_CEILING, game, str(args.num_envs), str(args.num_steps)]
        out = subprocess.run(cmd + [str(args.warmup), str(args.iterations)], capture_output=True, text=True, check=True)
        return float(out.stdout), None
    steps = (args.warmup + args.iterations) * args.num_envs * args.num_steps
    with tempfile.TemporaryDirectory() as tmp:
        script, *flags = shlex.split((MODES[mode] if mode in MODES else mode.split("=", 1)[1]).format(game=game))
        cmd = [sys.executable, os.path.join(ROOT, script), *flags, "--num-envs", str(args.num_envs)]
        cmd += ["--num-steps", str(args.num_steps), "--total-timesteps", str(steps)]
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        return read_sps(tmp, args.warmup)


def label(mode):
    return mode.split("=", 1)[0]


def spread(values):
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


def spread_ratio(values):
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DeepSPI / PPO / DreamSPI / raw env SPS, side by side")
    parser.add_argument("--iterations", type=int, default=4, help="measured iterations per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="start-up iterations left out of the steady-state window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-envs", type=int, default=128)
    parser.add_argument("--num-steps", type=int, default=8)
    parser.add_argument("--games", nargs="+", default=["Breakout", "Alien"], help="Breakout: 4 actions, Alien: 18")
    parser.add_argument(
        "--modes", nargs="+", default=["deepspi", "ppo", "dreamspi", "env"],
        help=f"among {', '.join(MODES)}, or 'LABEL=SCRIPT FLAGS' for another script or flag set ({{game}} is substituted)",
    )  # fmt: skip
    parser.add_argument("--baseline", default="ppo", help="the mode the ratios divide by")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    args = parser.parse_args()
    modes = [m for m in args.modes if m != "dreamspi" or os.path.exists(os.path.join(ROOT, "dreamspi_atari.py"))]
    if len(modes) < len(args.modes):
        print("note: dreamspi_atari.py does not exist (yet): the dreamspi mode is skipped", file=sys.stderr)
    assert args.warmup >= 1, "the steady-state window needs at least one warm-up iteration"

    steady = {(g, m): [] for g in args.games for m in modes}
    own, n_actions = {}, {}
    for game in args.games:
        import envpool

        n_actions[game] = envpool.make(f"{game}-v5", env_type="gymnasium", num_envs=1).action_space.n
    for r in range(args.repeats):
        for game in args.games:
            for mode in modes:  # alternate the modes within each repeat
                t0 = time.time()
                sps, own_sps = run_mode(mode, game, args)
                steady[game, mode].append(sps)
                own.setdefault((game, mode), []).append(own_sps)
                print(f"{r + 1}/{args.repeats} {game} {label(mode)}: SPS {sps:.0f} ({time.time() - t0:.0f} s)", flush=True)

    lines = [f"| game | mode | steady SPS min / median / max | own charts/SPS | / {args.baseline} min / median / max |"]
    lines.append("|---|---|---|---|---|")
    for game in args.games:
        for mode in modes:
            values, own_values = steady[game, mode], [v for v in own[game, mode] if v is not None]
            ratio = ""
            if (game, args.baseline) in steady and mode != args.baseline:
                ratio = spread_ratio([a / b for a, b in zip(values, steady[game, args.baseline], strict=True)])
            own_text = f"{statistics.median(own_values):.0f}" if own_values else ""
            lines.append(f"| {game} ({n_actions[game]} actions) | {label(mode)} | {spread(values)} | {own_text} | {ratio} |")
    note = (
        f"{args.num_envs} envs x {args.num_steps} steps, {args.iterations} measured iterations after {args.warmup} warm-up, "
        f"{args.repeats} repeats, modes alternated; steady SPS = steps / wall time between the charts/SPS events of the last "
        "warm-up and the last iteration (the script's own charts/SPS counts from start-up); ratios are per repeat, "
        "paired with the baseline run of the same repeat"
    )
    print("\n" + "\n".join(lines) + "\n\n" + note)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n\n" + note + "\n")
