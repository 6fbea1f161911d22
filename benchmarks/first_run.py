# What a new user's first runs cost on this machine: the README's quick try (a whole run, timed) and the default Atari run
# (deepspi_atari.py's defaults, 128 envs x 8 steps on Breakout: its steady-state SPS over a few iterations, and the hours
# that makes for the default 10M steps). Each goes through the real CLI in a fresh temporary directory; figures are
# printed, never asserted, with the machine they were measured on.
#   python benchmarks/first_run.py                   # prints the table and writes first_run.md here
#   python benchmarks/first_run.py --atari-iterations 5 --out docs/learning/first_run.md --markdown README.md  # maintainers
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE]
import sps  # noqa: E402  (benchmarks/sps.py: read_sps, cpu_name, torch_version, write_block)

ROOT = os.path.dirname(HERE)
QUICK_TRY = ["deepspi_maze.py", "--total-timesteps", "20480"]  # the README's quick try
BEGIN, END = "<!-- benchmarks/first_run.py -->", "<!-- /benchmarks/first_run.py -->"
DEFAULT_STEPS = 10_000_000  # deepspi_atari.py's default --total-timesteps
BATCH = 128 * 8  # deepspi_atari.py's default --num-envs x --num-steps


def timed(cmd, cwd):
    """(wall seconds, CPU seconds of the child) of one command, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description="the cost of the README's quick try and of a default Atari run")
    parser.add_argument("--atari-iterations", type=int, default=5, help="measured iterations of the Atari run (after one)")
    parser.add_argument("--out", default="first_run.md", help="the table, with the machine, goes to this file")
    parser.add_argument("--markdown", nargs="*", default=[], help="also between the markers of these files (README.md)")
    args = parser.parse_args()
    if args.atari_iterations < 1:
        print("first_run.py: error: --atari-iterations must be >= 1", file=sys.stderr)
        sys.exit(2)
    for path in args.markdown:
        text = open(path).read() if os.path.exists(path) else ""
        if BEGIN not in text or END not in text:
            print(f"first_run.py: error: --markdown {path} needs the lines {BEGIN} and {END}", file=sys.stderr)
            sys.exit(2)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    machine = f"{sps.cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}, torch {sps.torch_version()}"
    with tempfile.TemporaryDirectory() as tmp:
        quick_wall, quick_cpu = timed([sys.executable, os.path.join(ROOT, QUICK_TRY[0]), *QUICK_TRY[1:]], tmp)
    steps = (1 + args.atari_iterations) * BATCH
    atari = ["deepspi_atari.py", "--no-progress", "--total-timesteps", str(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        atari_wall, atari_cpu = timed([sys.executable, os.path.join(ROOT, atari[0]), *atari[1:]], tmp)
        steady, _ = sps.read_sps(tmp, 1)
    hours = DEFAULT_STEPS / steady / 3600
    command = " ".join(["python", "benchmarks/first_run.py", *sys.argv[1:]])
    block = "\n".join(
        [
            "| run | command | wall time | CPU time |",
            "|---|---|---|---|",
            f"| the quick try | `python {' '.join(QUICK_TRY)}` | {quick_wall:.0f} s | {quick_cpu:.0f} s |",
            f"| a default Atari run, {steps:,} steps | `python {' '.join(atari)}` | {atari_wall:.0f} s | {atari_cpu:.0f} s |",
            "",
            f"The default Atari run (`python deepspi_atari.py`: DeepSPI on Breakout, 128 envs x 8 steps) went at "
            f"{steady:.0f} agent steps per second once started, so its {DEFAULT_STEPS:,} steps take about {hours:.0f} h "
            f"on this machine. Measured on {machine} by `{command}`.",
            "",
        ]
    )
    print(block)
    sps.write_block(args.out, block, BEGIN, END)
    written = [args.out]
    for path in args.markdown:
        sps.write_block(path, block, BEGIN, END)
        written.append(path)
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
