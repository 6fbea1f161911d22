# One GPU check, sized for at most 8 minutes on one H100 with 16 CPU cores: (1) the numerical tests, which run each case
# on the CPU and on CUDA; (2) 3-iteration runs of the four scripts through their real CLI with --cuda, in float32 and
# with --bf16 (deepspi_atari_multigpu.py under torchrun with one process); (3) steady SPS of DeepSPI, its PPO mode and
# DreamSPI beside CleanRL's ppo_atari_envpool.py (--cleanrl, a local copy outside this repository) on the same backend,
# at 128 envs x 8 steps and 8 x 128, measured one run after the other with benchmarks/sps.py's runner. It prints one
# markdown block (the GPU, the CPU count, the torch version, the results) and writes it to --markdown files. Exit
# status 0 when every test and run passed, 1 otherwise, 2 on bad input.
#   python benchmarks/gpu_check.py --cleanrl /tmp/ppo_atari_envpool.py --markdown docs/speed.md
#   python benchmarks/gpu_check.py --dry-run      # the same at a tiny size on the CPU (no GPU needed)
# (docs/speed.md, "GPU", says how to run it on a machine without internet)
import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import types
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sps  # noqa: E402 (benchmarks/sps.py: the runner and the steady-state SPS)

ROOT = sps.ROOT
BEGIN, END = "<!-- benchmarks/gpu_check.py -->", "<!-- /benchmarks/gpu_check.py -->"
GAME = "Breakout"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
ATARI_FLAGS = ["--env-id", f"{GAME}NoFrameskip-v4"]
# (label, launcher, script, flags) of the 3-iteration runs; the size comes from the mode (full or --dry-run)
SCRIPTS = [
    ("deepspi_atari.py", [], "deepspi_atari.py", ATARI_FLAGS),
    ("deepspi_atari_multigpu.py (torchrun, 1 process)", TORCHRUN, "deepspi_atari_multigpu.py", ATARI_FLAGS),
    ("dreamspi_atari.py", [], "dreamspi_atari.py", ATARI_FLAGS),
    ("deepspi_maze.py", [], "deepspi_maze.py", []),
]  # fmt: skip
SPS_MODES = ["deepspi", "ppo", "dreamspi", "cleanrl"]
# per mode: the two SPS layouts (num_envs, num_steps), the runs' size, the test selection (all: []), the processes
FULL = dict(layouts=[(128, 8), (8, 128)], run_size=(128, 8), warmup=1, iterations=3, tests=[], test_workers=4, workers=4)
DRY = dict(
    layouts=[(8, 4), (2, 16)],
    run_size=(4, 8),
    warmup=1,
    iterations=2,
    tests=["tests/test_parity_official.py", "-k", "deepspi_loss_values or encoder_torso"],
    test_workers=1,
    workers=2,
)
TORCH_INFO = """
import json, os, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
                  "gpu": torch.cuda.get_device_name(0) if cuda else None, "gpus": torch.cuda.device_count() if cuda else 0}))
"""


def fail(message):
    """Bad input: one line on stderr, exit status 2."""
    print(f"gpu_check.py: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too (no usage block)
        fail(f"{message} (see --help)")


def torch_info():
    out = subprocess.run([sys.executable, "-c", TORCH_INFO], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_tests(selection, workers):
    """The numerical tests through pytest; returns ({device id: {outcome: count}}, seconds, pytest's exit status)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "tests.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "numerical", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        if workers > 1 and importlib.util.find_spec("xdist"):
            cmd += ["-n", str(workers), "--dist", "loadfile"]
        cmd += selection or ["tests"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-3000:], proc.stderr[-2000:], sep="", flush=True)
        counts = {}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = case.get("name", "")
                params = name[name.index("[") + 1 : -1].split("-") if "[" in name else []
                dev = "cuda" if "cuda" in params else "cpu" if "cpu" in params else "cpu only"
                outcome = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
                counts.setdefault(dev, {}).setdefault(outcome, 0)
                counts[dev][outcome] += 1
        return counts, time.time() - t0, proc.returncode


def script_run(label, launcher, script, flags, size, bf16, cuda, threads):
    """One 3-iteration run of a script through its CLI; returns (label, seconds, None or the error's last lines)."""
    num_envs, num_steps = size
    cmd = [*(launcher or [sys.executable]), os.path.join(ROOT, script), "--no-progress", *flags]
    cmd += ["--num-envs", str(num_envs), "--num-steps", str(num_steps), "--total-timesteps", str(3 * num_envs * num_steps)]
    cmd += ["--cuda" if cuda else "--no-cuda"] + (["--bf16"] if bf16 else [])
    name = f"`{label}{' --cuda' if cuda else ''}{' --bf16' if bf16 else ''}`"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        runs = os.listdir(os.path.join(tmp, "runs")) if os.path.isdir(os.path.join(tmp, "runs")) else []
    if proc.returncode == 0 and len(runs) == 1:
        return name, time.time() - t0, None
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return name, time.time() - t0, f"exit status {proc.returncode}, {len(runs)} run folders:\n{tail}"


def sps_modes(cleanrl, envpool, cuda):
    """sps.py mode strings ('LABEL=SCRIPT FLAGS') of DeepSPI, PPO mode, DreamSPI and CleanRL on the same backend."""
    extra = ("--cuda" if cuda else "--no-cuda") + ("" if envpool else " --env-backend gymnasium")
    modes = [f"{m}={sps.MODES[m]} {extra}" for m in SPS_MODES if m != "cleanrl"]
    if cleanrl and envpool:  # CleanRL's own flags; the -v5 id is its default's family; --cuda is its default
        modes.append(f"cleanrl={os.path.abspath(cleanrl)} --env-id {{game}}-v5")
    return modes


def measure_sps(modes, layouts, warmup, iterations):
    """{(layout, label): steady SPS or the error}; the runs go one after the other, the modes alternated per layout."""
    result = {}
    for num_envs, num_steps in layouts:
        args = types.SimpleNamespace(num_envs=num_envs, num_steps=num_steps, warmup=warmup, iterations=iterations)
        for mode in modes:
            t0 = time.time()
            try:
                sps_value, _ = sps.run_mode(mode, GAME, args)
            except SystemExit as e:  # sps.run_mode exits with the failed command and its stderr
                sps_value = str(e.code)
                print(sps_value, file=sys.stderr)
            result[(num_envs, num_steps), sps.label(mode)] = sps_value
            shown = f"{sps_value:.0f}" if isinstance(sps_value, float) else "failed"
            print(f"SPS {num_envs} x {num_steps} {sps.label(mode)}: {shown} ({time.time() - t0:.0f} s)", flush=True)
    return result


def sps_table(result, layouts, labels):
    head = "| mode | " + " | ".join(f"SPS {e} × {s} | / cleanrl" for e, s in layouts) + " |"
    lines = [head, "|---|" + "---|---|" * len(layouts)]
    for label in labels:
        cells = []
        for layout in layouts:
            value, base = result.get((layout, label)), result.get((layout, "cleanrl"))
            ok = isinstance(value, float)
            cells.append(f"{value:.0f}" if ok else "failed")
            cells.append(f"{value / base:.2f}" if ok and isinstance(base, float) and label != "cleanrl" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main():
    parser = Parser(description="The GPU check: numerical tests on CUDA, --cuda runs of the four scripts, SPS beside CleanRL")
    parser.add_argument("--dry-run", action="store_true", help="the same at a tiny size on the CPU (no GPU needed)")
    parser.add_argument(
        "--cleanrl", help="CleanRL's ppo_atari_envpool.py (a copy made to run on gymnasium 1.x): the cleanrl mode"
    )
    parser.add_argument(
        "--markdown",
        nargs="+",
        default=[],
        help=f"also write the block to these files: new ones, or between the lines {BEGIN} and {END}",
    )
    parser.add_argument("--skip", nargs="+", default=[], choices=["tests", "runs", "sps"], help="leave out these parts")
    args = parser.parse_args()
    if args.cleanrl and not os.path.isfile(args.cleanrl):
        fail(f"--cleanrl {args.cleanrl}: no such file")
    for path in args.markdown:
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            fail(f"--markdown {path}: its folder does not exist")
        text = open(path).read() if os.path.isfile(path) else None
        if text is not None and not (BEGIN in text and END in text):  # a new file gets the block; a file, its block
            fail(f"--markdown {path}: the file exists without the lines {BEGIN} and {END}")
    info = torch_info()
    if not args.dry_run and not info["gpu"]:
        fail("no CUDA device here (torch.cuda.is_available() is False); --dry-run runs the check at a tiny size on the CPU")
    cfg, cuda = (DRY, False) if args.dry_run else (FULL, True)
    if args.dry_run:  # a small, possibly shared CPU: one thread per process (docs/speed.md, "Threads")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    envpool = importlib.util.find_spec("envpool") is not None
    if not args.cleanrl:
        print("note: no --cleanrl PATH: the cleanrl mode is skipped", file=sys.stderr)
    elif not envpool:
        print("note: envpool is not installed: the cleanrl mode (ppo_atari_envpool.py) is skipped", file=sys.stderr)
    start, ok, lines = time.time(), True, []

    if "tests" not in args.skip:
        counts, seconds, status = run_tests(cfg["tests"], cfg["test_workers"])
        ok &= status == 0
        per_device = "; ".join(
            f"{dev}: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(c.items())) for dev, c in sorted(counts.items())
        )
        selection = shlex.join(cfg["tests"]) if cfg["tests"] else "tests"
        lines += [f"**Numerical tests** (`pytest -m numerical {selection}`, {seconds:.0f} s): {per_device or 'none ran'}", ""]

    if "runs" not in args.skip:
        threads = max(1, info["cpus"] // cfg["workers"])  # the side-by-side runs share the cores
        jobs = [(*s, cfg["run_size"], bf16, cuda, threads) for s in SCRIPTS for bf16 in (False, True)]
        with ThreadPoolExecutor(cfg["workers"]) as pool:  # correctness runs: side by side, unlike the SPS runs
            results = list(pool.map(lambda job: script_run(*job), jobs))
        size = f"{cfg['run_size'][0]} envs × {cfg['run_size'][1]} steps"
        lines += [f"**3-iteration runs** ({size}, up to {cfg['workers']} at a time, OMP_NUM_THREADS={threads}):", ""]
        lines += ["| run | result | seconds |", "|---|---|---|"]
        for name, seconds, error in results:
            ok &= error is None
            lines.append(f"| {name} | {'ok' if error is None else 'failed'} | {seconds:.0f} |")
            if error:
                print(f"{name} failed: {error}", file=sys.stderr)
        lines.append("")

    if "sps" not in args.skip:
        modes = sps_modes(args.cleanrl, envpool, cuda)
        result = measure_sps(modes, cfg["layouts"], cfg["warmup"], cfg["iterations"])
        ok &= all(isinstance(v, float) and math.isfinite(v) for v in result.values())
        backend = "envpool" if envpool else "gymnasium"
        lines += [
            f"**Steady SPS** on {GAME}, {backend} backend, one run per mode and layout, one after the other "
            f"({cfg['iterations']} measured iterations after {cfg['warmup']} warm-up; benchmarks/sps.py's steady SPS):",
            "",
        ]
        lines += sps_table(result, cfg["layouts"], [sps.label(m) for m in modes])
        lines.append("")

    where = f"{info['gpu']}, CUDA {info['cuda']}" if cuda else f"CPU only (--dry-run): {sps.cpu_name()}"
    head = f"{where}; {info['cpus']} CPUs; torch {info['torch']}; {time.time() - start:.0f} s in all"
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]])
    block = "\n".join([head, "", *lines, f"Command: `{command}`", ""])
    print("\n" + block)
    for path in args.markdown:
        sps.write_block(path, block, BEGIN, END)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
