# The figures of the README's diff tour: the size of deepspi_atari.py and how many of its lines differ from CleanRL's
# ppo_atari.py, counted as `diff -w ppo_atari.py deepspi_atari.py | grep -c '^[<>]'`, and the same count between
# deepspi_atari.py and its torchrun variant. CleanRL's file is not part of this repository: fetch it at the commit the
# figures refer to, then run from the repository root:
#   curl -sL -o /tmp/ppo_atari.py https://raw.githubusercontent.com/vwxyzjn/cleanrl/fe8d8a03c41a7ef5b523e2e354bd01c363e786bb/cleanrl/ppo_atari.py
#   python experiments/diff_tour.py --cleanrl /tmp/ppo_atari.py
# It prints the table; --markdown README.md also writes it into the README (docs/maintainers.md). It also prints each
# script's size against its budget (LINE_BUDGETS, DIFF_BUDGETS) and exits with 1 if one is over.
import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "fe8d8a0"
# git's object id of cleanrl/ppo_atari.py at that commit (`git rev-parse fe8d8a0:cleanrl/ppo_atari.py`)
BLOB = "f1b21d286e11f827772116d27661b20ea62d87eb"
BEGIN, END = "<!-- experiments/diff_tour.py -->", "<!-- /experiments/diff_tour.py -->"
# ceilings (not targets) on the scripts' sizes: lines of each file, and changed lines (`diff -w`) against its parent;
# tests/test_budgets.py checks those that need no CleanRL file
LINE_BUDGETS = {"deepspi_atari.py": 772, "dreamspi_atari.py": 958, "deepspi_maze.py": 860}
DIFF_BUDGETS = {  # (parent, file): changed lines
    ("ppo_atari.py", "deepspi_atari.py"): 601,
    ("deepspi_atari.py", "dreamspi_atari.py"): 324,
    ("deepspi_atari.py", "deepspi_atari_multigpu.py"): 170,
}


def fail(message):
    """Bad input: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def git_blob_id(data):
    """The id git gives a file's content, so the check needs no git and no network."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def count_lines(path):
    with open(path, "rb") as f:
        return len(f.read().splitlines())


def changed_lines(old, new):
    """(removed, added): the lines `diff -w old new` marks with < and >."""
    out = subprocess.run(["diff", "-w", old, new], capture_output=True, text=True)
    if out.returncode > 1:  # 0: same, 1: different, 2: trouble
        fail(f"diff -w {old} {new}: {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    return sum(line.startswith("<") for line in lines), sum(line.startswith(">") for line in lines)


def main():
    parser = argparse.ArgumentParser(description="the diff tour's line counts, against CleanRL's ppo_atari.py")
    parser.add_argument("--cleanrl", required=True, help=f"CleanRL's cleanrl/ppo_atari.py at commit {COMMIT}")
    parser.add_argument(
        "--markdown", nargs="+", default=[],
        help=f"also write the table into these files, between the lines {BEGIN} and {END}, which each file must have",
    )  # fmt: skip
    args = parser.parse_args()
    if shutil.which("diff") is None:
        fail("needs the diff program (GNU diffutils or BSD diff) on the PATH")
    try:
        with open(args.cleanrl, "rb") as f:
            blob = git_blob_id(f.read())
    except OSError as e:
        fail(f"--cleanrl {args.cleanrl}: {e.strerror}")
    if blob != BLOB:
        fail(f"--cleanrl {args.cleanrl} is not CleanRL's cleanrl/ppo_atari.py at commit {COMMIT} (see this file's header)")
    for path in args.markdown:
        text = open(path).read() if os.path.exists(path) else ""
        if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
            fail(f"--markdown {path}: the file needs the lines {BEGIN} and {END} (in that order)")

    single, multi = os.path.join(ROOT, "deepspi_atari.py"), os.path.join(ROOT, "deepspi_atari_multigpu.py")
    removed, added = changed_lines(args.cleanrl, single)
    removed_multi, added_multi = changed_lines(single, multi)
    command = shlex.join(["python", "experiments/diff_tour.py", "--cleanrl", args.cleanrl])  # prints it, writes nothing
    block = "\n".join([
        f"Made by `{command}`; changed lines are those `diff -w` marks with `<` or `>`.",
        "",
        "| file | lines | changed lines | against |",
        "|---|---|---|---|",
        f"| CleanRL's `ppo_atari.py` ({COMMIT}) | {count_lines(args.cleanrl)} | | |",
        f"| `deepspi_atari.py` | {count_lines(single)} | {removed + added} ({removed} removed, {added} added) "
        "| CleanRL's `ppo_atari.py` |",
        f"| `deepspi_atari_multigpu.py` | {count_lines(multi)} | {removed_multi + added_multi} "
        f"({removed_multi} removed, {added_multi} added) | `deepspi_atari.py` |",
    ])  # fmt: skip
    print(block)
    over = []
    for (parent, name), most in DIFF_BUDGETS.items():
        old = args.cleanrl if parent == "ppo_atari.py" else os.path.join(ROOT, parent)
        changed = sum(changed_lines(old, os.path.join(ROOT, name)))
        print(f"budget: {name} against {parent}: {changed} changed lines (at most {most})")
        if changed > most:
            over.append(f"{name} against {parent}: {changed} changed lines > {most}")
    for name, most in LINE_BUDGETS.items():
        lines = count_lines(os.path.join(ROOT, name))
        print(f"budget: {name}: {lines} lines (at most {most})")
        if lines > most:
            over.append(f"{name}: {lines} lines > {most}")
    if over:
        print(f"over budget: {'; '.join(over)}", file=sys.stderr)
        sys.exit(1)
    for path in args.markdown:
        text = open(path).read()
        with open(path, "w") as f:
            f.write(text[: text.index(BEGIN) + len(BEGIN)] + "\n" + block + "\n" + text[text.index(END) :])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
