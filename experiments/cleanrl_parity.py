# Our PPO mode with CleanRL's settings against CleanRL's ppo_atari_envpool.py on the same data: both scripts play a few
# iterations of Breakout from one seed, each from a temporary copy that re-seeds torch right after its optimizer is made.
# The re-seed is needed because deepspi_atari.py builds the world-model heads after the actor-critic (same initial
# actor-critic weights as CleanRL's), which moves torch's random stream: without it the two sample other actions from
# the first step on, and two runs of "the same" seed are two different seeds. Exit code 0 when both play the same games
# with the same scores (which needs the same action at every step), 1 when not. CleanRL's file is not in this repository
# (docs/results.md says how to get it and run it on gymnasium 1.x):
#   python experiments/cleanrl_parity.py --cleanrl /tmp/ppo_atari_envpool.py \
#       --out docs/learning/cleanrl_parity.md
import glob
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402

ANCHOR = "    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)\n"
RESEED = "    torch.manual_seed(args.seed)  # experiments/cleanrl_parity.py: the same random stream from here on\n"
OURS = ["--num-envs", "8", "--num-steps", "128", "--clip-vloss", "--reward-loss-coef", "0", "--transition-loss-coef", "0"]


@dataclass
class Args:
    cleanrl: str
    """CleanRL's ppo_atari_envpool.py (a copy outside this repository, with the gymnasium 1.x edits of DEPENDENCIES.md)"""
    iterations: int = 10
    """iterations of 1,024 steps (CleanRL's 8 x 128) that each script trains"""
    seed: int = 1
    """the seed of both runs"""
    out: str = ""
    """also write the table to this markdown file"""


def reseeded_copy(path, folder):
    """A copy of a training script in `folder` with RESEED after its one ANCHOR line (bad input: exit 2)."""
    text = open(path).read()
    if text.count(ANCHOR) != 1:
        compare.fail(f"{path}: expected exactly one line {ANCHOR.strip()!r}, found {text.count(ANCHOR)}")
    copy = os.path.join(folder, os.path.basename(path))
    with open(copy, "w") as f:
        f.write(text.replace(ANCHOR, ANCHOR + RESEED))
    return copy


def train(script, flags, folder):
    """Run one training script in `folder` (its runs/ go there); its scalars, {tag: [(step, value)]}."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, script, *flags], cwd=folder, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{os.path.basename(script)} failed:\n{proc.stderr[-3000:]}")
    (run_dir,) = glob.glob(os.path.join(folder, "runs", "*"))
    return compare.read_events(run_dir)


def main(args):
    if not os.path.isfile(args.cleanrl):
        compare.fail(f"--cleanrl {args.cleanrl}: no such file")
    if args.iterations < 1:
        compare.fail(f"--iterations must be >= 1, got {args.iterations}")
    steps = ["--total-timesteps", str(args.iterations * 1024), "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        theirs = train(reseeded_copy(args.cleanrl, a), ["--env-id", "Breakout-v5", *steps], a)
        ours_script = reseeded_copy(os.path.join(os.path.dirname(HERE), "deepspi_atari.py"), b)
        ours = train(ours_script, ["--env-id", "BreakoutNoFrameskip-v4", *steps, *OURS, "--no-progress"], b)
    # the decisive check: the same games, score for score, need the same actions at every step, so the same policies
    games = [[v for _, v in run.get("charts/episodic_return", [])] for run in (theirs, ours)]
    same_games = sum(x == y for x, y in zip(*games, strict=False))
    command = shlex.join(["python", "experiments/cleanrl_parity.py", *sys.argv[1:]])
    lines = [
        f"Made by `{command}`: CleanRL's ppo_atari_envpool.py (Breakout-v5) against `deepspi_atari.py "
        f"--env-id BreakoutNoFrameskip-v4 {shlex.join(OURS)}`, seed {args.seed}, {args.iterations} iterations of 8 x 128, "
        "both re-seeded after their optimizer.",
        "",
        f"**Games**: CleanRL finished {len(games[0])}, ours {len(games[1])}; the first {min(map(len, games))} compared in "
        f"the order they ended: {same_games} have the same score.",
        "",
        "**Logged losses** (relative difference: |ours − CleanRL's| / |CleanRL's|):",
        "",
        "| tag | " + " | ".join(str(step) for step, _ in theirs["losses/value_loss"]) + " |",
        "|---|" + "---|" * len(theirs["losses/value_loss"]),
    ]
    worst = (0.0, "")
    for tag in sorted(t for t in set(theirs) & set(ours) if t.startswith("losses/") or t == "charts/learning_rate"):
        mine, cells = dict(ours[tag]), []
        for step, value in theirs[tag]:
            diff = abs(mine[step] - value) / abs(value) if value else abs(mine[step])
            cells.append(f"{value:.4g} / {mine[step]:.4g} ({diff:.1%})")
            worst = max(worst, (diff, f"{tag} at {step}"))
        lines.append(f"| {tag} (CleanRL / ours) | " + " | ".join(cells) + " |")
    lines += ["", f"Largest relative difference: {worst[0]:.1%} ({worst[1]}); float32 sums in another order drift apart."]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(0 if games[0] == games[1] and games[0] else 1)


if __name__ == "__main__":
    main(tyro.cli(Args))
