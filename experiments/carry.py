# Carries a cut run to the next machine in the repository: a run longer than a session (DreamSPI to 1M steps on one
# CPU core takes about 3 to 6 hours) would otherwise start from 0 on every new machine, since runs/ does not travel.
# `save` copies the run's folder (its checkpoint.pt, about 53 MB for an Atari script, and its TensorBoard files) into
# experiments/carried_runs/, to be committed; `restore` copies the carried runs back into a runs/ folder, unless that
# folder holds the same run at the same iteration or later. experiments/queue.sh restores before it starts its lanes,
# and the sweep then resumes the run. Once the run has finished and its curve is committed, remove its carried folder
# (restore says so). Run from the repository root:
#   python experiments/carry.py save runs/BreakoutNoFrameskip-v4__dreamspi-8x128-a34bde__1__1796541418
#   python experiments/carry.py restore runs
import argparse
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CARRIED = os.path.join(HERE, "carried_runs")


def fail(message):
    """Bad input: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a wrong command line: one line too, not argparse's usage and message
        fail(message)


def progress(run_dir):
    """(iteration, num_iterations) of the run's checkpoint.pt, or None when it has none or it cannot be read."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        return saved["iteration"], saved["args"]["num_iterations"]
    except Exception:  # a truncated file or not a checkpoint of ours
        return None


def copy_run(source, target):
    """Copy the files of the run folder source into target, replacing target whole (written beside it, then renamed)."""
    partial = target.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name in sorted(os.listdir(source)):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(partial, name))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(partial, target)


def save(run_dirs, carried):
    for run_dir in run_dirs:  # every argument checked before anything is copied
        state = progress(run_dir)
        if state is None:
            fail(f"{run_dir}: no readable checkpoint.pt (a run folder of runs/ is expected)")
        if state[0] >= state[1]:
            fail(f"{run_dir}: finished ({state[0]}/{state[1]} iterations): commit its curve with the sweep instead")
    os.makedirs(carried, exist_ok=True)
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        copy_run(run_dir, os.path.join(carried, name))
        iteration, total = progress(run_dir)
        size = sum(os.path.getsize(os.path.join(carried, name, f)) for f in os.listdir(os.path.join(carried, name)))
        print(f"carried {name}: iteration {iteration}/{total}, {size / 2**20:.0f} MiB in {os.path.relpath(carried)}/{name}")


def restore(runs, carried):
    names = sorted(os.listdir(carried)) if os.path.isdir(carried) else []
    names = [name for name in names if os.path.isdir(os.path.join(carried, name)) and not name.endswith(".partial")]
    if not names:
        print(f"nothing carried in {os.path.relpath(carried)}")
        return
    os.makedirs(runs, exist_ok=True)
    for name in names:
        mine = progress(os.path.join(carried, name))
        if mine is None:
            fail(f"{os.path.relpath(carried)}/{name}: no readable checkpoint.pt")
        here = progress(os.path.join(runs, name))
        if here is not None and here[0] >= here[1]:
            print(f"finished here ({here[0]}/{here[1]}): {name}; once its curve is committed: git rm -r {carried}/{name}")
        elif here is not None and here[0] >= mine[0]:
            print(f"kept {os.path.join(runs, name)}: iteration {here[0]}/{here[1]}, the carried one is at {mine[0]}")
        else:
            copy_run(os.path.join(carried, name), os.path.join(runs, name))
            print(f"restored {os.path.join(runs, name)}: iteration {mine[0]}/{mine[1]}")


if __name__ == "__main__":
    parser = Parser(description="Carry cut runs across machines in experiments/carried_runs/.")
    parser.add_argument("action", choices=["save", "restore"], help="save: run folders into the repository; restore: back")
    parser.add_argument("paths", nargs="+", help="save: the run folders to carry; restore: the runs/ folder")
    parser.add_argument("--carried", default=CARRIED, help=argparse.SUPPRESS)  # the tests' own folder
    args = parser.parse_args()
    if args.action == "restore" and len(args.paths) != 1:
        fail(f"restore takes one runs/ folder, not {len(args.paths)}")
    if args.action == "save":
        save(args.paths, args.carried)
    else:
        restore(args.paths[0], args.carried)
