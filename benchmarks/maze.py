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
# Then, in this process on one thread, the world model's parts of the run's DeepSPI update, beside PPO mode's time: its
# transition and reward heads (deepspi_maze.py's own), forward and backward, and their per-sample floor: what any update
# with the same numbers does for every sample of every minibatch, whatever is shared between samples. It draws the clipped
# transition noise (the same numbers need the same draws) and computes the weighted sum of the mixture's scaled noise,
# forward and backward.
#   python benchmarks/maze.py --n 10 --repeats 2
import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
from sps import cpu_name  # noqa: E402  (benchmarks/sps.py: the CPU and its AVX-512 and AMX sets)

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


def minibatch_updates(total_timesteps):
    """The optimizer steps of a deepspi_maze.py run of total_timesteps agent steps with the script's defaults (128 envs x 8
    steps a batch, 4 epochs of 4 minibatches): 16 a full batch; steps short of a batch are not run."""
    from deepspi_maze import Args

    defaults = Args()
    batch = defaults.num_envs * defaults.num_steps
    return (total_timesteps // batch) * defaults.update_epochs * defaults.num_minibatches


def update_parts(args, iterations=50, repeats=3):
    """The world model's share of the run's DeepSPI update, on one thread: {part: seconds for all the run's minibatch
    updates}, each part timed per minibatch (min over repeats of the mean over iterations) and times the updates. The
    minibatch: 256 samples of uniformly drawn maze states and actions, through deepspi_maze.py's own heads (the default,
    deduplicated ones), with the gradient into the latents and fresh gradients each time, as in the real update; the floor
    parts redo, on their own and as plain torch operations, the per-sample work that any update with the same numbers
    does."""
    import torch

    from deepspi_maze import Agent, Args, ConfoundingMaze

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    defaults = Args()
    minibatch = defaults.num_envs * defaults.num_steps // defaults.num_minibatches
    updates = minibatch_updates(args.total_timesteps)
    maze = ConfoundingMaze(n=args.n)
    agent = Agent(n_actions=4)
    with torch.no_grad():
        z = agent.encoder(torch.as_tensor(maze.observations).float() / 255.0)  # every state's latent, once
    z.requires_grad_(True)  # the real update's gradient goes on into the encoder
    index = torch.randint(0, len(z), (minibatch,))
    action = torch.randint(0, 4, (minibatch,))
    transition = agent.transition_model
    shape = (minibatch, transition.n_components, transition.channels) + tuple(z.shape[2:])
    pair = index * 4 + action
    weighted_scale = torch.rand((4 * len(z),) + shape[1:], requires_grad=True)
    eps = torch.randn(shape).clamp(-1.0, 1.0)

    def transition_head():
        agent.zero_grad()
        z.grad = None
        transition.sample_distinct(z, action, index).sum().backward()

    def reward_head():
        agent.zero_grad()
        z.grad = None
        agent.reward_model(z, action, index).sum().backward()

    def draw():
        torch.randn(shape).clamp(-1.0, 1.0)

    def weighted_sum():
        weighted_scale.grad = None
        (weighted_scale[pair] * eps).sum(1).sum().backward()

    parts = {
        "the transition head, forward and backward": transition_head,
        "the reward head, forward and backward": reward_head,
        "floor: drawing the clipped noise": draw,
        "floor: the weighted sum of the scaled noise, forward and backward": weighted_sum,
    }
    seconds = {}
    for name, part in parts.items():
        part()  # warm-up
        means = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iterations):
                part()
            means.append((time.perf_counter() - start) / iterations)
        seconds[name] = min(means) * updates
    return seconds, updates, shape, len(z)


def spread(values, digits="{:.0f}"):
    if len(values) == 1:
        return digits.format(values[0])
    return " / ".join(digits.format(v) for v in (min(values), statistics.median(values), max(values)))


def main():
    parser = Parser(
        description="deepspi_maze.py: DeepSPI and PPO-mode run times, side by side; with both deepspi and ppo among the "
        "modes, then the world model's parts of the DeepSPI update (its heads and their per-sample floor), timed on their own"
    )
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
    if len(set(args.modes)) < len(args.modes):
        fail(f"--modes: each mode once, got {' '.join(args.modes)}")
    if args.markdown:
        text = open(args.markdown).read()
        if BEGIN not in text or END not in text or text.index(END) < text.index(BEGIN):
            fail(f"--markdown {args.markdown}: the lines {BEGIN} and {END} are not in it, in that order")
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

    if "ppo" in args.modes and "deepspi" in args.modes:
        seconds, updates, shape, states = update_parts(args)
        ppo = statistics.median(w for w, _ in times["ppo"])
        floor = sum(value for name, value in seconds.items() if name.startswith("floor"))
        lines += [
            "",
            f"The world model's parts of the DeepSPI update, for the run's {updates} minibatch updates (each timed per "
            f"minibatch of {shape[0]} samples of the {states} maze states, one thread, min of 3), beside PPO mode's median "
            f"wall time ({ppo:.1f} s). The floor is the per-sample work that any update with the same numbers does, "
            f"{' x '.join(map(str, shape))} noise numbers a minibatch drawn and weighted, timed as plain torch operations.",
            "",
            "| part | seconds | / PPO mode |",
            "|---|---|---|",
        ]
        for name, value in seconds.items():
            lines.append(f"| {name} | {value:.1f} | {value / ppo:.2f} |")
        lines += [
            f"| the floor, both parts | {floor:.1f} | {floor / ppo:.2f} |",
            "",
            f"The transition head includes its floor. A DeepSPI/PPO ratio of 2 would leave {ppo - floor:.1f} s to all "
            f"that DeepSPI adds above the floor (the reward head included); the transition head alone takes "
            f"{seconds['the transition head, forward and backward'] - floor:.1f} s above it.",
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
