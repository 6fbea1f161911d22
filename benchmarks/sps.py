# Side-by-side throughput (SPS, agent steps per second) of DeepSPI, plain PPO and DreamSPI, each in float32 and --bf16,
# CleanRL's ppo_atari_envpool.py (a local copy outside this repository, --cleanrl) and the raw environment. Every run goes
# through the real CLI in a fresh temporary directory; the modes alternate (A B C A B C ...) over the repeats so that a
# noisy, shared machine slows them alike. Figures are printed, never asserted.
#   python benchmarks/sps.py --iterations 3 --repeats 2 --games Breakout Alien --cleanrl /tmp/ppo_atari_envpool.py
# (docs/speed.md says how to get CleanRL's file)
import argparse
import glob
import os
import platform
import re
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
    "deepspi-bf16": f"deepspi_atari.py {ATARI} --bf16",
    "ppo": f"deepspi_atari.py {ATARI} --reward-loss-coef 0 --transition-loss-coef 0",
    "ppo-bf16": f"deepspi_atari.py {ATARI} --reward-loss-coef 0 --transition-loss-coef 0 --bf16",
    "dreamspi": f"dreamspi_atari.py {ATARI}",
    "dreamspi-bf16": f"dreamspi_atari.py {ATARI} --bf16",
    "env": None,
}
BEGIN, END = "<!-- benchmarks/sps.py -->", "<!-- /benchmarks/sps.py -->"
# the ratios of the second table: (mode, mode it divides by), where both ran
PAIRS = [
    ("deepspi", "cleanrl"), ("deepspi-bf16", "cleanrl"), ("ppo", "cleanrl"), ("dreamspi", "deepspi"),
    ("dreamspi-bf16", "deepspi-bf16"), ("deepspi-bf16", "deepspi"), ("ppo-bf16", "ppo"), ("deepspi", "deepspi-unoptimised"),
]  # fmt: skip
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


def torch_version():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return out.stdout.strip()


def cpu_name():
    """The CPU model and the instruction sets that --bf16 relies on (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.machine()
    name = re.search(r"model name\s*:\s*(.*)", info)
    extras = [x for x in ("avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{x}\b", info)]
    return f"{name.group(1) if name else platform.machine()} ({', '.join(extras) or 'no AVX-512'})"


def write_block(path, block, begin, end):
    """Write `block` to the markdown file `path`: between the markers `begin` and `end` if the file has both, else as the
    whole file (a file with only one of the markers is left as it is)."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:  # replace the marked block only
        text = text[: text.index(begin) + len(begin)] + "\n" + block + text[text.index(end) :]
    with open(path, "w") as f:
        f.write(text if begin in text else block)


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
        "--modes", nargs="+", default=[*MODES, "cleanrl"],
        help=f"among {', '.join(MODES)}, cleanrl, or 'LABEL=SCRIPT FLAGS' for another script ({{game}} is substituted)",
    )  # fmt: skip
    parser.add_argument(
        "--cleanrl", help="CleanRL's ppo_atari_envpool.py (a copy made to run on gymnasium 1.x): the cleanrl mode"
    )
    parser.add_argument("--baseline", help="the mode the ratios divide by (default: cleanrl when it runs, else ppo)")
    parser.add_argument(
        "--markdown", nargs="+", default=[],
        help=f"also write the tables to these markdown files (between {BEGIN} and {END} if the file has them)",
    )  # fmt: skip
    args = parser.parse_args()
    modes = [m for m in args.modes if m != "cleanrl"]
    if "cleanrl" in args.modes and args.cleanrl:  # CleanRL's own flags; the -v5 id is its default's family
        modes.append(f"cleanrl={os.path.abspath(args.cleanrl)} --env-id {{game}}-v5")
    elif "cleanrl" in args.modes:
        print("note: no --cleanrl PATH: the cleanrl mode is skipped", file=sys.stderr)
    baseline = args.baseline or ("cleanrl" if any(label(m) == "cleanrl" for m in modes) else "ppo")
    assert args.warmup >= 1, "the steady-state window needs at least one warm-up iteration"

    steady = {(g, label(m)): [] for g in args.games for m in modes}
    own, n_actions = {}, {}
    for game in args.games:
        import envpool

        n_actions[game] = envpool.make(f"{game}-v5", env_type="gymnasium", num_envs=1).action_space.n
    for r in range(args.repeats):
        for game in args.games:
            for mode in modes:  # alternate the modes within each repeat
                t0 = time.time()
                sps, own_sps = run_mode(mode, game, args)
                steady[game, label(mode)].append(sps)
                own.setdefault((game, label(mode)), []).append(own_sps)
                print(f"{r + 1}/{args.repeats} {game} {label(mode)}: SPS {sps:.0f} ({time.time() - t0:.0f} s)", flush=True)

    ratio = lambda game, a, b: spread_ratio([x / y for x, y in zip(steady[game, a], steady[game, b], strict=True)])  # noqa: E731
    lines = [f"| game | mode | steady SPS min / median / max | own charts/SPS | / {baseline} min / median / max |"]
    lines.append("|---|---|---|---|---|")
    for game in args.games:
        for mode in map(label, modes):
            own_values = [v for v in own[game, mode] if v is not None]
            ratio_text = ratio(game, mode, baseline) if (game, baseline) in steady and mode != baseline else ""
            own_text = f"{statistics.median(own_values):.0f}" if own_values else ""
            lines.append(
                f"| {game} ({n_actions[game]} actions) | {mode} | {spread(steady[game, mode])} | {own_text} | {ratio_text} |"
            )
    pairs = [(g, a, b) for g in args.games for a, b in PAIRS if (g, a) in steady and (g, b) in steady]
    if pairs:
        lines += ["", "| game | ratio | min / median / max |", "|---|---|---|"]
        for g, a, b in pairs:
            lines.append(f"| {g} | {a} / {b} | {ratio(g, a, b)} |")
    note = (
        f"{args.num_envs} envs x {args.num_steps} steps, {args.iterations} measured iterations after {args.warmup} warm-up, "
        f"{args.repeats} repeats, modes alternated; steady SPS = steps / wall time between the charts/SPS events of the last "
        "warm-up and the last iteration (the script's own charts/SPS counts from start-up); ratios are per repeat, "
        "paired with the baseline run of the same repeat"
    )
    print("\n" + "\n".join(lines) + "\n\n" + note)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch_version()}"
    block = "\n".join(lines) + "\n\n" + note + f"; {machine}; command: `python {shlex.join(sys.argv)}`\n"
    for path in args.markdown:
        write_block(path, block, BEGIN, END)
