"""Same numbers (run by hand, not in CI): does a refactor change any number the training scripts compute?

    git worktree add /tmp/ref REF                          # the tree to compare with, at commit REF
    python tests/same_numbers.py --reference /tmp/ref      # every case below
    python tests/same_numbers.py --reference /tmp/ref --only atari-deepspi-envpool maze-ppo
    python tests/same_numbers.py --list

Each case runs one script for 3 iterations with the same flags twice, once from this repository and once from the
reference tree, each in a fresh temporary folder with one thread (OMP_NUM_THREADS=1), and compares:
  - every TensorBoard scalar, bit for bit: the same tags, the same steps, the same float32 values (charts/SPS, a wall
    clock rate, is left out);
  - every tensor of the saved model (--save-model), bit for bit.
It prints `same: NAME` or `DIFFERENT: NAME` and the first differences, and exits with 1 if any case differs or fails.
"""

import argparse
import glob
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALL_CLOCK = {"charts/SPS"}
DEEPSPI, PPO = [], ["--reward-loss-coef", "0", "--transition-loss-coef", "0"]
# 3 iterations of 2 envs x 128 steps on Breakout: lost lives and finished games, so the episode scalars are logged too
ATARI = ["--env-id", "BreakoutNoFrameskip-v4", "--num-envs", "2", "--num-steps", "128", "--total-timesteps", "768"]
ATARI += ["--num-minibatches", "4", "--update-epochs", "2", "--no-progress", "--save-model"]
MAZE = ["--num-envs", "16", "--num-steps", "8", "--total-timesteps", "384", "--no-progress", "--save-model"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@dataclass
class Case:
    name: str
    script: str
    flags: list
    launcher: tuple = ()


CASES = [
    Case("atari-deepspi-envpool", "deepspi_atari.py", [*ATARI, "--env-backend", "envpool", *DEEPSPI]),
    Case("atari-ppo-envpool", "deepspi_atari.py", [*ATARI, "--env-backend", "envpool", *PPO]),
    Case("atari-deepspi-gymnasium", "deepspi_atari.py", [*ATARI, "--env-backend", "gymnasium", *DEEPSPI]),
    Case("atari-ppo-gymnasium", "deepspi_atari.py", [*ATARI, "--env-backend", "gymnasium", *PPO]),
    Case("multigpu-deepspi", "deepspi_atari_multigpu.py", [*ATARI, "--env-backend", "envpool", *DEEPSPI]),
    Case("multigpu-ppo", "deepspi_atari_multigpu.py", [*ATARI, "--env-backend", "envpool", *PPO]),
    Case("multigpu-torchrun-deepspi", "deepspi_atari_multigpu.py", [*ATARI, "--env-backend", "envpool"], tuple(TORCHRUN)),
    Case("dreamspi-deepspi", "dreamspi_atari.py", [*ATARI, "--env-backend", "envpool", *DEEPSPI]),
    Case("dreamspi-ppo", "dreamspi_atari.py", [*ATARI, "--env-backend", "envpool", *PPO]),
    Case("maze-deepspi", "deepspi_maze.py", [*MAZE, *DEEPSPI]),
    Case("maze-ppo", "deepspi_maze.py", [*MAZE, *PPO]),
]


def fail(message):
    """Bad input: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def start(root, case, cwd):
    launcher = list(case.launcher) if case.launcher else [sys.executable]
    cmd = [*launcher, os.path.join(root, case.script), *case.flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_run(cwd):
    """(scalars {tag: [(step, float32 bits)]}, model {name: tensor}) of the one run under cwd/runs."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = glob.glob(os.path.join(cwd, "runs", "*"))
    if len(runs) != 1:
        return None, None
    acc = EventAccumulator(runs[0], size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        if tag not in WALL_CLOCK:
            scalars[tag] = [(e.step, struct.pack("<f", e.value)) for e in acc.Scalars(tag)]
    models = glob.glob(os.path.join(runs[0], "*.cleanrl_model"))
    model = torch.load(models[0], map_location="cpu", weights_only=False)["model"] if models else None
    return scalars, model


def differences(ours, theirs):
    """The differences between two runs' (scalars, model), as lines."""
    (scalars, model), (ref_scalars, ref_model) = ours, theirs
    found = []
    for tag in sorted(set(scalars) | set(ref_scalars)):
        if tag not in scalars or tag not in ref_scalars:
            found.append(f"{tag}: logged by one run only")
        elif scalars[tag] != ref_scalars[tag]:
            pairs = zip(scalars[tag], ref_scalars[tag], strict=False)
            first = next(((a, b) for a, b in pairs if a != b), None)
            if first is None:
                found.append(f"{tag}: {len(scalars[tag])} values here, {len(ref_scalars[tag])} in the reference")
            else:
                (step, a), (_, b) = first
                here = struct.unpack("<f", a)[0]
                there = struct.unpack("<f", b)[0]
                found.append(f"{tag} at step {step}: {here!r} here, {there!r} in the reference")
    if (model is None) != (ref_model is None):
        found.append("saved model: written by one run only")
    elif model is not None:
        import torch

        if set(model) != set(ref_model):
            found.append("saved model: different tensor names")
        for name in sorted(set(model) & set(ref_model)):
            a = model[name]
            b = ref_model[name]
            if (
                a.dtype != b.dtype
                or a.shape != b.shape
                or not torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
            ):
                found.append(f"saved model: {name} differs")
    return found


def run_case(case, reference):
    with tempfile.TemporaryDirectory(prefix="same_numbers_") as tmp:
        cwds = [os.path.join(tmp, "here"), os.path.join(tmp, "reference")]
        for cwd in cwds:
            os.mkdir(cwd)
        procs = [start(REPO, case, cwds[0]), start(reference, case, cwds[1])]
        outputs = [p.communicate()[0] for p in procs]
        for proc, output, where in zip(procs, outputs, ("here", "in the reference"), strict=True):
            if proc.returncode != 0:
                return [f"the run {where} exited with {proc.returncode}: {output.strip()[-1500:]}"]
        runs = [read_run(cwd) for cwd in cwds]
        if runs[0][0] is None or runs[1][0] is None:
            return ["a run left no single run folder"]
        if not runs[0][0]:
            return ["no scalar was logged"]
        return differences(*runs)


def main():
    parser = argparse.ArgumentParser(description="compare the numbers of the training scripts with a reference tree")
    parser.add_argument("--reference", help="the root of the reference tree (e.g. a git worktree at the older commit)")
    parser.add_argument("--only", nargs="+", default=[], help="run only these cases")
    parser.add_argument("--list", action="store_true", help="list the cases and their commands, and exit")
    args = parser.parse_args()
    names = [c.name for c in CASES]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        fail(f"--only: unknown case {unknown[0]!r}; the cases: {', '.join(names)}")
    if args.list:
        for case in CASES:
            print(f"{case.name}: {' '.join([*case.launcher, case.script, *case.flags])}")
        return
    if args.reference is None:
        fail("--reference DIR is required (the root of the tree to compare with)")
    if not os.path.isfile(os.path.join(args.reference, "deepspi_atari.py")):
        fail(f"--reference {args.reference} holds no deepspi_atari.py")
    different = 0
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        found = run_case(case, os.path.abspath(args.reference))
        if found:
            different += 1
            print(f"DIFFERENT: {case.name}", flush=True)
            for line in found[:10]:
                print(f"    {line}", flush=True)
        else:
            print(f"same: {case.name}", flush=True)
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
