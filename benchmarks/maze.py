# Wall time of whole deepspi_maze.py runs, DeepSPI beside its PPO mode (both world-model coefficients 0), side by side in
# one run. Every run goes through the real CLI on one thread (OMP_NUM_THREADS=1) in a fresh temporary directory; the modes
# alternate (A B C A B C ...) over the repeats, so that a shared machine slows them alike. Each run's wall time and CPU
# time (user + system, of the child process: what a busy machine does not inflate) are printed, with each mode's ratio to
# PPO mode within the same repeat. Printed, never asserted. The modes:
#   deepspi             the default: each distinct image encoded once, the world model's heads once per distinct
#                       (image, action) pair of a minibatch, the transition noise per sample
#   deepspi-per-sample  --no-dedup-obs: every row of a minibatch through the encoder and the heads, as deepspi_atari.py
#   ppo                 --reward-loss-coef 0 --transition-loss-coef 0 (no world model at all)
#   ppo-per-sample      PPO mode with --no-dedup-obs
# Then, in this process on one thread, the per-sample floor of the run's DeepSPI update: what any update with the same numbers
# does for every sample of every minibatch, whatever is shared between samples. It draws the clipped transition noise (the
# same numbers need the same draws) and computes the weighted sum of the mixture's scaled noise, forward and backward, as
# deepspi_maze.py's torch ops. It prints the floor beside PPO mode's time, with what a DeepSPI/PPO ratio of 2 would leave to
# the rest of the world model.
#   python benchmarks/maze.py --n 10 --repeats 2
import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PPO = "--reward-loss-coef 0 --transition-loss-coef 0"
MODES = {
    "deepspi": "",
    "deepspi-per-sample": "--no-dedup-obs",
    "ppo": PPO,
    "ppo-per-sample": f"{PPO} --no-dedup-obs",
}
BEGIN, END = "<!-- benchmarks/maze.py -->", "<!-- /benchmarks/maze.py -->"


def fail(message):
    print(f"{sys.argv[0]}: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a wrong command line: one line too, not argparse's usage and message
        fail(message)


def run_mode(mode, args):
    """(wall seconds, CPU seconds) of one run of deepspi_maze.py in mode, in a fresh temporary directory."""
    command = [sys.executable, os.path.join(ROOT, "deepspi_maze.py"), "--no-progress", "--n", str(args.n)]
    command += ["--total-timesteps", str(args.total_timesteps), "--seed", str(args.seed)] + shlex.split(MODES[mode])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def per_sample_floor(args, repeats=3):
    """Seconds on one thread, min over repeats, of the run's per-sample work in its DeepSPI update: (noise draw, weighted
    sum forward and backward), each for all its minibatch updates."""
    import torch

    from deepspi_maze import Args, TransitionModel

    torch.set_num_threads(1)
    defaults = Args()
    batch = defaults.num_envs * defaults.num_steps
    minibatch = batch // defaults.num_minibatches
    updates = (args.total_timesteps // batch) * defaults.update_epochs * defaults.num_minibatches
    model = TransitionModel(n_actions=4)
    shape = (minibatch, model.n_components, model.channels, 7, 7)  # (sample, component, the 64 x 7 x 7 latent)
    pairs = 4 * (2 * args.n + 6)  # the most distinct (state, action) pairs a minibatch can hold
    generator = torch.Generator().manual_seed(args.seed)
    pair = torch.randint(0, pairs, (minibatch,), generator=generator)
    weighted_scale = torch.rand((pairs,) + shape[1:], generator=generator, requires_grad=True)

    def draw():
        return torch.randn(shape).clamp(-1.0, 1.0)

    def weighted_sum(eps):
        out = (weighted_scale[pair] * eps).sum(1)
        out.backward(torch.ones_like(out))

    eps = draw()
    draw_times, sum_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(updates):
            draw()
        draw_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(updates):
            weighted_sum(eps)
        sum_times.append(time.perf_counter() - start)
    return min(draw_times), min(sum_times), updates, shape


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values, digits="{:.0f}"):
    if len(values) == 1:
        return digits.format(values[0])
    return " / ".join(digits.format(v) for v in (min(values), statistics.median(values), max(values)))


def main():
    parser = Parser(description="deepspi_maze.py: DeepSPI and PPO-mode run times, side by side")
    parser.add_argument("--n", type=int, default=10, help="the maze's corridor length")
    parser.add_argument("--total-timesteps", type=int, default=40960, help="agent steps per run (the script's default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["deepspi", "ppo"], help=f"of {', '.join(MODES)}")
    parser.add_argument("--markdown", help="also write the table into this file, between the lines " + BEGIN + " and " + END)
    args = parser.parse_args()
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown:
        fail(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.repeats < 1 or args.n < 2 or args.total_timesteps < 1024:
        fail(
            f"need --repeats >= 1, --n >= 2, --total-timesteps >= 1024 (one batch): "
            f"{args.repeats}, {args.n}, {args.total_timesteps}"
        )
    if args.markdown and not os.path.isfile(args.markdown):
        fail(f"--markdown {args.markdown}: no such file")
    if args.markdown and not all(marker in open(args.markdown).read() for marker in (BEGIN, END)):
        fail(f"--markdown {args.markdown}: the lines {BEGIN} and {END} are not in it")
    baseline = "ppo" if "ppo" in args.modes else args.modes[0]

    times = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:
            wall, cpu = run_mode(mode, args)
            times[mode].append((wall, cpu))
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)

    lines = [
        f"| mode | wall time (s) | CPU time (s) | wall / {baseline} | CPU / {baseline} |",
        "|---|---|---|---|---|",
    ]
    for mode in args.modes:
        walls = [w for w, _ in times[mode]]
        cpus = [c for _, c in times[mode]]
        wall_ratios = [w / b[0] for w, b in zip(walls, times[baseline], strict=True)]
        cpu_ratios = [c / b[1] for c, b in zip(cpus, times[baseline], strict=True)]
        lines.append(
            f"| {mode} | {spread(walls)} | {spread(cpus)} | {spread(wall_ratios, '{:.2f}')} | {spread(cpu_ratios, '{:.2f}')} |"
        )
    import torch

    if "ppo" in args.modes and any(mode.startswith("deepspi") for mode in args.modes):
        draw, weighted, updates, shape = per_sample_floor(args)
        ppo = statistics.median(w for w, _ in times["ppo"])
        room = ppo - draw - weighted  # 2 x PPO mode, less PPO mode and the floor
        lines += [
            "",
            f"The per-sample floor of the DeepSPI update ({updates} minibatch updates, one thread, min of 3): drawing the "
            f"clipped noise, {' x '.join(map(str, shape))} numbers a minibatch, {draw:.1f} s; the weighted sum of the "
            f"mixture's scaled noise, forward and backward, {weighted:.1f} s; together {draw + weighted:.1f} s, "
            f"{(draw + weighted) / ppo:.2f} times PPO mode's median wall time ({ppo:.0f} s). A DeepSPI/PPO ratio of 2 would "
            f"leave {room:.1f} s to everything else the world model adds (encoding s', the heads, their spectral norms, "
            f"backward and optimizer).",
        ]
    lines += [
        "",
        f"deepspi_maze.py --n {args.n} --total-timesteps {args.total_timesteps} --seed {args.seed}, one thread "
        f"(OMP_NUM_THREADS=1), {args.repeats} repeat(s), modes alternated; min / median / max over the repeats, ratios "
        f"paired within each repeat; {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; command: "
        f"`{shlex.join(['python', 'benchmarks/maze.py', *sys.argv[1:]])}`",
    ]
    print("\n".join(lines))
    if args.markdown:
        text = open(args.markdown).read()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        with open(args.markdown, "w") as f:
            f.write(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)
        print(f"wrote the table into {args.markdown}")


if __name__ == "__main__":
    main()
