# A grid of (flag values x seeds) of one training script (deepspi_maze.py, deepspi_atari.py or dreamspi_atari.py), run
# one process at a time or --jobs N at once (each child niced to 19 with OMP_NUM_THREADS=1, or --threads), then
# summarised from the runs' TensorBoard files: a CSV, a markdown table and a figure. Run from the repository root; the
# runs go to runs/.
#
# The grid: --algo LABEL=FLAGS (repeatable; each algorithm is crossed with every cell), --grid "FLAG=V1,V2 FLAG2=W1,W2"
# (repeatable: the cells of one --grid are the product of its flags' values, several --grid add their cells up), --base
# FLAGS for every run, --seeds. A cell's runs are found again by their exp_name, {label}-{cell values}-{hash of every flag
# but --seed}: a finished run (its checkpoint.pt at the last iteration, or its whole curve in the committed CSV of --out:
# {out}_curves.csv for the maze, {out}.csv for Atari, so that a machine without runs/ goes on) is skipped, a cut one
# resumed from its checkpoint.pt (`--resume runs/.../checkpoint.pt --no-progress`, nothing else), any other one started.
# Examples:
#   python experiments/sweep.py --base="--n 10" --algo deepspi= \
#       --algo ppo="--reward-loss-coef 0 --transition-loss-coef 0" --grid clip-coef=0.01,0.1,0.2,0.5,0.8 --seeds 1 2 3 4 5 \
#       --seed-major --out docs/learning/maze_sweep_clip --reference docs/learning/maze_10seeds_curves.csv
#   python experiments/sweep.py --base="--n 10" --algo deepspi= --grid reward-loss-coef=0.001,0.1,1 \
#       --grid transition-loss-coef=5e-5,5e-3,5e-2 --seeds 1 2 3 --seed-major --out docs/learning/maze_sweep_alpha \
#       --reference docs/learning/maze_10seeds_curves.csv
#   python experiments/sweep.py --base="--total-timesteps 163840" --algo deepspi= \
#       --algo ppo="--reward-loss-coef 0 --transition-loss-coef 0" --grid n=15,20 --seeds 1 2 3 4 5 --seed-major \
#       --out docs/learning/maze_sweep_n --reference docs/learning/maze_10seeds_curves.csv --reference-n 5 10
#   python experiments/sweep.py --base="--n 10" --algo deepspi="--enforce-neighbourhood" \
#       --algo ppo="--enforce-neighbourhood --reward-loss-coef 0 --transition-loss-coef 0" --seeds 1 2 3 4 5 \
#       --seed-major --out docs/learning/maze_sweep_neighbourhood --reference docs/learning/maze_10seeds_curves.csv
#   python experiments/sweep.py --script deepspi_atari.py --base="--num-envs 8 --num-steps 128 --total-timesteps 300032" \
#       --algo deepspi= --grid clip-coef=0.1,0.2,0.5 --out docs/learning/breakout_sweep_clip
# Add --dry-run to list the commands, --report-only to summarise the finished runs without training. Maze tables: per
# cell, the final exact V^pi(s_I), the steps to leave the star-blind plateau (the first iteration with V^pi(s_I) >=
# star-blind value + 0.5, as experiments/maze_seeds.py), the final normalised star distance, the mean and max of
# charts/sir against 1/gamma, the final world-model losses; {out}_curves.csv keeps every iteration, so that
# --from-curves remakes them without runs/. The Atari scripts' tables and figures are experiments/compare.py's.
# The n = 15 and 20 budget, 163,840 steps (4x the default): the default runs leave the plateau after about 11k steps at
# n = 5 and 21-25k at n = 10 (docs/learning/maze_10seeds_curves.csv), about linear in n, so about 50k at n = 20 on
# average; 4x leaves room for the slow seeds. In the background: nohup nice -n 19 python experiments/sweep.py ... &
# SIGINT or SIGTERM stops the sweep after its runs' current iteration (each writes its checkpoint.pt); the same command
# goes on. Each run's output: runs/sweep_logs/{exp_name}__{seed}.log.
import contextlib
import csv
import dataclasses
import glob
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
import compare  # noqa: E402
from compare import fail  # noqa: E402
from maze_figure import ALGOS  # noqa: E402

SCRIPTS = ["deepspi_maze.py", "deepspi_atari.py", "dreamspi_atari.py"]
FORBIDDEN = {"seed", "exp_name", "resume", "eval_only"}  # set by the sweep itself, or not training
MAZE_TAGS = {  # curves CSV column: TensorBoard tag
    "init_value": "charts/init_value",
    "star_blind_value": "charts/star_blind_value",
    "optimal_value": "charts/optimal_value",
    "repr_dist_normalized": "charts/repr_dist_normalized",
    "sir": "charts/sir",
    "transition_loss": "losses/transition_loss",
    "reward_loss": "losses/reward_loss",
}
ATARI_TAGS = [compare.RETURN_TAG, "charts/sir", "losses/transition_loss"]
DREAMSPI_TAGS = [compare.RETURN_TAG, "charts/sir", "repr_wm/transition_loss"]  # the same CSV columns (compare.column_name)


@dataclass
class Args:
    script: str = "deepspi_maze.py"
    """the training script, one of deepspi_maze.py, deepspi_atari.py, dreamspi_atari.py"""
    base: str = ""
    """flags of every run (--base="--n 10 --total-timesteps 81920": with "=", since the value begins with --)"""
    algo: tyro.conf.UseAppendAction[List[str]] = field(default_factory=list)
    """LABEL=FLAGS, repeatable: an algorithm and its flags (ppo="--reward-loss-coef 0 --transition-loss-coef 0"; deepspi=
    for none); default: one algorithm named after the script, with no flags"""
    grid: tyro.conf.UseAppendAction[List[str]] = field(default_factory=list)
    """"FLAG=V1,V2 FLAG2=W1,W2", repeatable: the product of these values (a bool flag takes True/False); several --grid
    add their cells up; none: one cell, the base flags"""
    seeds: List[int] = field(default_factory=lambda: [1])
    """the seeds of every cell"""
    seed_major: bool = False
    """run every cell of the first seed, then of the second... (a partial sweep then covers every cell)"""
    jobs: int = 1
    """how many runs train at the same time"""
    threads: int = 1
    """each run's OMP_NUM_THREADS: 1 for a run beside others; 2 lets a lone run use both cores of a 2-core machine"""
    dry_run: bool = False
    """list the commands (and the runs already finished) and stop"""
    report_only: bool = False
    """train nothing: summarise the finished runs"""
    from_curves: Optional[str] = None
    """maze: remake the outputs from this {out}_curves.csv instead of runs/ (no grid needed)"""
    reference: Optional[str] = None
    """maze: also show the runs of this experiments/maze_seeds.py curves CSV (defaults, exp_name deepspi and ppo)"""
    reference_n: List[int] = field(default_factory=list)
    """the corridor lengths n taken from --reference (default: those of the sweep's cells)"""
    window: int = 50_000
    """Atari scripts: compare.py's window of environment steps"""
    at: List[int] = field(default_factory=list)
    """Atari scripts: the table's steps, as compare.py's --at (default: each seed's last window)"""
    out: str = "sweep"
    """output prefix: {out}.csv (maze: one row per cell and seed), {out}.md, {out}.png, maze: {out}_curves.csv"""
    title: str = ""
    """the figure's title"""


@dataclass
class Task:
    label: str  # the cell's label in tables, e.g. "ppo clip-coef=0.2"
    index: int  # the cell's place in the grid (tables follow it)
    exp_name: str
    seed: int
    command: List[str]  # the script's arguments of a new run


def parse_pairs(text, what):
    """'A=1,2 B=3' -> [(A, [1, 2]), (B, [3])]."""
    pairs = []
    for item in shlex.split(text):
        name, sep, values = item.partition("=")
        name = name.lstrip("-")
        if not sep or not name or not values or "" in values.split(","):
            fail(f"{what} {text!r}: expected FLAG=V1,V2,... items")
        pairs.append((name, values.split(",")))
    return pairs


def check_flags(module, script, tokens, where):
    """Parse a run's flags as the script would, and check their domains (the script's own check_args)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parsed = tyro.cli(module.Args, args=tokens)
        except SystemExit:
            lines = [line.strip(" │╭╰─") for line in err.getvalue().splitlines()]
            detail = next((line for line in lines if line and "usage" not in line.lower()), "")
            fail(f"{where}: {script} does not take {shlex.join(tokens)!r} ({detail})")
    if parsed.checkpoint_every == 0:
        fail(f"{where}: --checkpoint-every 0 leaves nothing to resume from")
    module.check_args(parsed)  # one line and exit code 2 on a bad value
    return parsed


def make_tasks(args):
    """The runs of the grid, in the order they train, and each cell's parsed arguments of the script."""
    base = shlex.split(args.base)
    algos = []
    for spec in args.algo or [os.path.splitext(args.script)[0].replace("_", "-") + "="]:
        label, sep, flags = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", label):
            fail(f"--algo {spec!r}: expected LABEL=FLAGS, LABEL made of letters, digits, '.', '+', '-'")
        algos.append((label, shlex.split(flags)))
    if len({label for label, _ in algos}) < len(algos):
        fail(f"--algo: two algorithms share a label: {args.algo}")
    grids = [(text, parse_pairs(text, "--grid")) for text in args.grid or [""]]
    tokens = base + [t for _, flags in algos for t in flags] + ["--" + n for _, pairs in grids for n, _ in pairs]
    names = {t[2:].split("=")[0].replace("-", "_").removeprefix("no_") for t in tokens if t.startswith("--")}
    if names & FORBIDDEN:
        fail(f"the sweep sets {', '.join('--' + n.replace('_', '-') for n in sorted(names & FORBIDDEN))} itself")
    module = importlib.import_module(os.path.splitext(args.script)[0])  # after the cheap checks: it imports torch
    fields = {f.name: f for f in dataclasses.fields(module.Args)}
    cells = []
    for text, pairs in grids:
        for name, _ in pairs:
            if name.replace("-", "_") not in fields:
                fail(f"--grid {text!r}: {args.script} has no flag --{name}")
        for values in itertools.product(*(v for _, v in pairs)):
            cells.append(list(zip([n for n, _ in pairs], values, strict=True)))
    tasks, parsed = [], {}
    for cell in cells:
        cell_flags = []
        for name, value in cell:
            if fields[name.replace("-", "_")].type is bool:
                if value not in ("True", "False"):
                    fail(f"--grid: --{name} is a switch, its values are True and False, not {value!r}")
                cell_flags.append(f"--{'' if value == 'True' else 'no-'}{name}")
            else:
                cell_flags += [f"--{name}", value]
        for label, algo_flags in algos:
            flags = algo_flags + cell_flags
            where = f"--algo {label} " + " ".join(f"{n}={v}" for n, v in cell)
            run_args = check_flags(module, args.script, base + flags, where.strip())
            digest = hashlib.sha1(json.dumps([args.script, base, flags]).encode()).hexdigest()[:6]
            slug = re.sub(r"[^A-Za-z0-9.+]+", "-", "-".join([label] + [f"{n}{v}" for n, v in cell])).strip("-")
            cell_label = " ".join([label] + [f"{n}={v}" for n, v in cell])
            exp_name = f"{slug}-{digest}"
            parsed[cell_label] = run_args
            for seed in args.seeds:
                command = ["--no-progress", "--exp-name", exp_name, "--seed", str(seed)] + base + flags
                tasks.append(Task(cell_label, len(parsed) - 1, exp_name, seed, command))
    if len({t.exp_name for t in tasks}) < len(tasks) // len(args.seeds):
        fail("two cells of the grid are the same runs (a value given twice?)")
    return sorted(tasks, key=lambda t: (t.seed, t.index)) if args.seed_major else tasks, parsed


def run_state(task):
    """(state, run_dir, checkpoint) of a task's runs in runs/: 'finished', 'cut' (a checkpoint to resume) or 'new'."""
    import torch

    best = ("new", None, None, -1)
    for run_dir in sorted(glob.glob(os.path.join("runs", f"*__{task.exp_name}__{task.seed}__*"))):
        path = os.path.join(run_dir, "checkpoint.pt")
        if run_dir.endswith("__eval") or not os.path.isfile(path):
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # e.g. a disk filled up while writing it (checkpoints are written atomically)
            print(f"warning: {path} unreadable ({type(e).__name__}): not resumed", flush=True)
            continue
        done = saved["iteration"] >= saved["args"]["num_iterations"]
        rank = saved["iteration"] + (1 << 40) * done
        if rank > best[3]:
            best = ("finished" if done else "cut", run_dir, saved, rank)
    return best[:3]


def task_steps(run_args):
    """The steps a run of these parsed arguments ends at: its whole iterations."""
    batch = run_args.num_envs * run_args.num_steps
    return run_args.total_timesteps // batch * batch


def committed_path(args):
    """The sweep's committed per-seed CSV: {out}_curves.csv for the maze, {out}.csv for the Atari scripts."""
    return f"{args.out}_curves.csv" if args.script == "deepspi_maze.py" else f"{args.out}.csv"


def committed_runs(args, tasks, parsed):
    """{(label, seed): the committed CSV's rows or curve} of the tasks whose whole run is in committed_path(args) (its last
    step is the run's last step): a machine without runs/ takes them as finished."""
    path = committed_path(args)
    if not os.path.isfile(path):
        return {}
    found = {}  # (label, seed): (last step, curve or rows)
    if args.script == "deepspi_maze.py":
        for label, seeds in read_curves(path).items():
            for seed, curve in seeds.items():
                found[(label, seed)] = (curve["global_step"][-1], curve)
    else:
        rows_of = {}
        _, rows = compare.read_csv(path)
        for row in rows:
            rows_of.setdefault((row["algorithm"], row["seed"]), []).append(row)
        for key, rows in rows_of.items():
            found[key] = (max(row["global_step"] for row in rows), rows)
    return {
        (t.label, t.seed): found[(t.label, t.seed)][1]
        for t in tasks
        if (t.label, t.seed) in found and found[(t.label, t.seed)][0] == task_steps(parsed[t.label])
    }


def pid_file(task):
    return os.path.join("runs", "sweep_logs", f"{task.exp_name}__{task.seed}.pid")


def training_now(task):
    """Whether a sweep (this one or another) trains this run now: its pid file names a live process of the run."""
    try:
        pid = int(open(pid_file(task)).read())
        return task.exp_name in open(f"/proc/{pid}/cmdline", "rb").read().decode()  # not a recycled pid
    except (OSError, ValueError):
        return False


def train(args, tasks, committed):
    states = [run_state(task) for task in tasks]
    todo = []
    for task, (state, run_dir, saved) in zip(tasks, states, strict=True):
        if training_now(task):
            print(f"# training now, left alone: {task.label} seed {task.seed} (pid file {pid_file(task)})", flush=True)
        elif state == "finished":
            print(f"# finished: {task.label} seed {task.seed}: {run_dir}", flush=True)
        elif (task.label, task.seed) in committed:
            print(f"# finished: {task.label} seed {task.seed}: its whole run is in {committed_path(args)}", flush=True)
        elif state == "cut":
            print(f"# cut after iteration {saved['iteration']}/{saved['args']['num_iterations']}: {run_dir}", flush=True)
            todo.append((task, ["--resume", os.path.join(run_dir, "checkpoint.pt"), "--no-progress"]))
        else:
            todo.append((task, task.command))
    script = os.path.join(ROOT, args.script)
    for _, command in todo:
        print(shlex.join(["python", os.path.relpath(script)] + command), flush=True)
    if args.dry_run or not todo:
        return 0

    stopping, running, failed, count = [], {}, [], 0

    def stop(signum, frame):  # the children checkpoint at the end of their iteration and exit
        stopping.append(signum)
        for process in running:
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    os.makedirs(os.path.join("runs", "sweep_logs"), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    while (todo and not stopping) or running:
        while todo and not stopping and len(running) < args.jobs:
            task, command = todo.pop(0)
            if training_now(task) or run_state(task)[0] == "finished":  # another sweep took it since the list was made
                print(f"# taken by another sweep since: {task.label} seed {task.seed}", flush=True)
                continue
            count += 1
            log = os.path.join("runs", "sweep_logs", f"{task.exp_name}__{task.seed}.log")
            what = "resume" if command[0] == "--resume" else "start"
            print(f"[{count}] {what} {task.label} seed {task.seed} (log: {log})", flush=True)
            with open(log, "a") as f:
                process = subprocess.Popen(
                    [sys.executable, script] + command, stdout=f, stderr=subprocess.STDOUT, env=env,
                    preexec_fn=lambda: os.nice(19),
                )  # fmt: skip
            running[process] = (task, time.time(), log)
            with open(pid_file(task), "w") as f:
                f.write(str(process.pid))
        time.sleep(0.2)
        for process in [p for p in running if p.poll() is not None]:
            task, start, log = running.pop(process)
            if not training_now(task):  # else the pid file is another sweep's, which took the same run
                with contextlib.suppress(FileNotFoundError):
                    os.remove(pid_file(task))
            seconds = time.time() - start
            if process.returncode == 0:
                print(f"done {task.label} seed {task.seed} in {seconds:.0f} s", flush=True)
            elif stopping:
                print(f"stopped {task.label} seed {task.seed} (exit code {process.returncode}, log: {log})", flush=True)
            else:
                failed.append(task)
                print(f"FAILED {task.label} seed {task.seed}: exit code {process.returncode} (log: {log})", flush=True)
    if stopping:
        print(f"stopped by {signal.Signals(stopping[0]).name}: run the same command again to go on", flush=True)
        sys.exit(128 + stopping[0])
    return len(failed)


def finished_runs(tasks):
    """[(task, run_dir, saved checkpoint)] of the finished runs, in the grid's cell order."""
    found = [(task, state) for task in tasks if (state := run_state(task))[0] == "finished"]
    return [(task,) + state[1:] for task, state in sorted(found, key=lambda r: (r[0].index, r[0].seed))]


def maze_curves(runs):
    """{label: {seed: curve}}, a curve: {n, gamma, wall_s, global_step: [...], column: [...] for MAZE_TAGS}."""
    out = {}
    for task, run_dir, saved in runs:
        scalars = compare.read_events(run_dir)
        steps = sorted({step for step, _ in scalars.get(MAZE_TAGS["init_value"], [])})
        curve = {"n": saved["args"]["n"], "gamma": saved["args"]["gamma"], "global_step": steps}
        curve["wall_s"] = compare.wall_seconds(run_dir)
        for column, tag in MAZE_TAGS.items():
            values = dict(scalars.get(tag, []))
            curve[column] = [values.get(step, math.nan) for step in steps]
        out.setdefault(task.label, {})[task.seed] = curve
    return out


CURVE_META = ["cell", "n", "gamma", "seed", "wall_s", "global_step"]


def write_curves(path, curves):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CURVE_META + list(MAZE_TAGS))
        for label, seeds in curves.items():
            for seed, c in seeds.items():
                for k, step in enumerate(c["global_step"]):
                    values = ["" if math.isnan(c[col][k]) else c[col][k] for col in MAZE_TAGS]
                    writer.writerow([label, c["n"], c["gamma"], seed, c["wall_s"], step] + values)


def read_curves(path):
    """The curves of write_curves' CSV, or of an experiments/maze_seeds.py curves CSV (n, epsilon, algorithm, seed,
    global_step, init_value: runs with default settings, whose star-blind value this computes)."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        ours = reader.fieldnames == CURVE_META + list(MAZE_TAGS)
        if not ours and reader.fieldnames != ["n", "epsilon", "algorithm", "seed", "global_step", "init_value"]:
            raise ValueError("not a curves CSV of experiments/sweep.py or experiments/maze_seeds.py")
        for r in reader:
            if ours:
                label, meta = r["cell"], {"n": int(r["n"]), "gamma": float(r["gamma"]), "wall_s": float(r["wall_s"])}
                values = {col: float(r[col]) if r[col] else math.nan for col in MAZE_TAGS}
            else:
                import deepspi_maze

                n, gamma = int(r["n"]), deepspi_maze.Args.gamma
                label = f"{ALGOS.get(r['algorithm'], (r['algorithm'],))[0]} defaults n={n} ({os.path.basename(path)})"
                meta = {"n": n, "gamma": gamma, "wall_s": math.nan}
                values = dict.fromkeys(MAZE_TAGS, math.nan) | {"init_value": float(r["init_value"])}
                values["star_blind_value"] = deepspi_maze.star_blind_value(n, float(r["epsilon"]), gamma)
                values["optimal_value"] = deepspi_maze.optimal_value(n, float(r["epsilon"]), gamma)
            curve = out.setdefault(label, {}).setdefault(
                int(r["seed"]), meta | {"global_step": []} | {c: [] for c in MAZE_TAGS}
            )
            curve["global_step"].append(int(r["global_step"]))
            for col in MAZE_TAGS:
                curve[col].append(values[col])
    return out


def last_finite(values):
    finite = [v for v in values if not math.isnan(v)]
    return finite[-1] if finite else math.nan


def seed_stats(c, margin):
    v, steps = np.array(c["init_value"]), c["global_step"]
    level = c["star_blind_value"][0] + margin
    hits = np.flatnonzero(v >= level)
    sir = [x for x in c["sir"] if not math.isnan(x)]
    return {
        "n": c["n"],
        "seed": None,
        "steps": steps[-1],
        "final_value": float(v[-1]),
        "star_blind_value": c["star_blind_value"][0],
        "optimal_value": c["optimal_value"][0],
        "steps_to_leave_plateau": int(steps[hits[0]]) if len(hits) else None,
        "final_repr_dist_normalized": last_finite(c["repr_dist_normalized"]),
        "sir_mean": float(np.mean(sir)) if sir else math.nan,
        "sir_max": float(np.max(sir)) if sir else math.nan,
        "inv_gamma": 1 / c["gamma"],
        "final_transition_loss": last_finite(c["transition_loss"]),
        "final_reward_loss": last_finite(c["reward_loss"]),
        "wall_s": c["wall_s"],
    }


def mean_std(values, digits="{:.3g}"):
    """mean ± std (ddof 0) of the values that are not None or NaN; one value alone, without a ± 0; none: –."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) == 1:
        return digits.format(values[0])
    return f"{digits.format(np.mean(values))} ± {digits.format(np.std(values))}" if values else "–"


PLATEAU_MARGIN = 0.5  # as experiments/maze_seeds.py's --plateau-margin


def maze_report(args, curves, command, asked=None, legend=""):
    """The maze's CSV (a row per cell and seed), markdown table and figure; asked: {label: (seeds asked for, n)} of the
    sweep's cells, so that a table made while the sweep runs says how many have finished, none included; legend: a
    line on the flags of the cells."""
    asked = asked or {}
    rows, lines = [], []
    for label, seeds in curves.items():
        for seed, c in sorted(seeds.items()):
            rows.append({"cell": label} | seed_stats(c, PLATEAU_MARGIN) | {"seed": seed})
    levels = {(r["n"], round(r["inv_gamma"], 6)): r for r in rows}  # one line per maze (logged values are float32)
    levels = [(n, r["optimal_value"], r["star_blind_value"], r["inv_gamma"]) for (n, _), r in sorted(levels.items())]
    lines += [
        f"Made by `{command}`. Confounding maze: exact V^π(s_I) of each iteration's policy (charts/init_value); it leaves "
        f"the star-blind plateau at the first iteration with V^π(s_I) ≥ star-blind value + {PLATEAU_MARGIN}; the star "
        "distance is charts/repr_dist_normalized at the last iteration; SIR: charts/sir over the iterations, against "
        "1/γ; L_P and L_R: the transition and reward losses of the last minibatch. Mean ± std (ddof 0) across the seeds "
        "of each cell (steps to leave: over the seeds that leave; one seed: its value); every seed in the CSV."
        + (" " + legend if legend else ""),
        "",
    ]
    lines += [f"- n = {n}: V* = {v:.3f}, star-blind value {b:.3f} (plateau below {b + PLATEAU_MARGIN:.3f}); 1/γ = {g:.4f}"
              for n, v, b, g in levels]  # fmt: skip
    lines += [
        "",
        "| cell | n | seeds | steps | final V^π(s_I) | left the plateau | steps to leave | final star distance "
        "| mean SIR | max SIR | final L_P | final L_R | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in curves:
        cell = [r for r in rows if r["cell"] == label]
        left = [r["steps_to_leave_plateau"] for r in cell if r["steps_to_leave_plateau"] is not None]
        seeds = ", ".join(str(r["seed"]) for r in cell)
        steps = "/".join(str(s) for s in sorted({r["steps"] for r in cell}))
        col = lambda key, digits="{:.3g}", cell=cell: mean_std([r[key] for r in cell], digits)  # noqa: E731
        lines.append(
            f"| {label} | {cell[0]['n']} | {len(cell)}{f' of {asked[label][0]}' if label in asked else ''} ({seeds}) "
            f"| {steps} | {col('final_value', '{:.3f}')} "
            f"| {len(left)}/{len(cell)} | {mean_std(left, '{:.0f}')} | {col('final_repr_dist_normalized')} "
            f"| {col('sir_mean', '{:.3f}')} | {col('sir_max', '{:.3f}')} | {col('final_transition_loss')} "
            f"| {col('final_reward_loss')} | {col('wall_s', '{:.0f}')} |"
        )
    for label, (count, n) in asked.items():
        if label not in curves:
            lines.append(f"| {label} | {n} | 0 of {count} |" + " – |" * 10)
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None or v != v else v for k, v in r.items()} for r in rows)
    with open(f"{args.out}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("init_value", "exact $V^\\pi(s_I)$"), ("repr_dist_normalized", "normalised star distance"), ("sir", "SIR")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.8 * len(panels)))
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for k, (label, seeds) in enumerate(curves.items()):
        for ax, (col, _) in zip(axes, panels, strict=True):
            seed_curves = {
                s: ([x for x, y in zip(c["global_step"], c[col], strict=True) if y == y], [y for y in c[col] if y == y])
                for s, c in seeds.items()
            }
            seed_curves = {s: xy for s, xy in seed_curves.items() if xy[0]}
            if seed_curves:
                compare.plot_curves(ax, seed_curves, cmap(k % cmap.N), label)
    for n, v, b, _ in levels:
        axes[0].axhline(v, color="k", lw=1, label=f"n = {n}: V* = {v:.2f}")
        axes[0].axhline(b, color="k", ls="--", lw=1, label=f"n = {n}: star-blind value {b:.2f}")
        axes[0].axhline(b + PLATEAU_MARGIN, color="gray", ls=":", lw=1, label=f"n = {n}: leaves the plateau")
    gammas = [axes[2].axhline(g, color="k", ls="--", lw=1, label=f"1/γ = {g:.4f}") for g in {r["inv_gamma"] for r in rows}]
    for ax, (_, name) in zip(axes, panels, strict=True):
        ax.set(xlabel="environment steps", ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the panels: many cells
    axes[2].legend(handles=gammas, fontsize=7)
    axes[0].set_title(args.title or "Confounding maze sweep: one thin line per seed, thick: the mean", fontsize=11)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=80)
    plt.close(fig)
    return rows


def atari_runs(args, tasks, runs, committed):
    """The grid's runs, a markdown line each: its cell and seed, finished or not, and its training time in seconds
    (compare.wall_seconds), which {out}_runs.csv keeps for the runs that a machine without runs/ takes from {out}.csv."""
    path = f"{args.out}_runs.csv"
    wall = {}
    if os.path.isfile(path):
        with open(path, newline="") as f:
            wall = {(r["cell"], int(r["seed"])): float(r["wall_s"]) for r in csv.DictReader(f) if r["wall_s"]}
    for task, run_dir, _ in runs:
        wall[(task.label, task.seed)] = compare.wall_seconds(run_dir)
    finished = {(task.label, task.seed) for task, _, _ in runs} | set(committed)
    ordered = sorted(tasks, key=lambda t: (t.index, t.seed))
    lines = [
        f"**Runs**: {len(finished)} of {len(tasks)} finished; the training time of each (s), the sum over its processes.",
        "",
        "| cell | seed | finished | wall time (s) |",
        "|---|---|---|---|",
    ]
    for task in ordered:
        key = (task.label, task.seed)
        seconds = f"{wall[key]:.0f}" if key in wall else "–"
        lines.append(f"| {task.label} | {task.seed} | {'yes' if key in finished else 'not yet'} | {seconds} |")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "seed", "wall_s"])
        writer.writerows([t.label, t.seed, wall[(t.label, t.seed)]] for t in ordered if (t.label, t.seed) in wall)
    return lines


def atari_report(args, runs, command, committed, tasks):
    tags = DREAMSPI_TAGS if args.script == "dreamspi_atari.py" else ATARI_TAGS
    columns, rows = [compare.column_name(t) for t in tags], []
    in_runs = {(task.label, task.seed) for task, _, _ in runs}
    for task, run_dir, _ in runs:
        rows += [{"algorithm": task.label, "seed": task.seed} | r for r in compare.window_rows(
            compare.read_events(run_dir), tags, args.window)]  # fmt: skip
    for key, committed_rows in committed.items():  # the committed runs that runs/ does not hold
        if key not in in_runs:
            rows += [{c: r[c] for c in ["algorithm", "seed", "global_step"] + columns} for r in committed_rows]
    compare.write_csv(f"{args.out}.csv", columns, rows)
    compare.plot(rows, columns, f"{args.out}.png", args.title)
    lines = compare.table(rows, columns, args.at, args.window, command)
    lines[1:1] = ["", *atari_runs(args, tasks, runs, committed)]
    with open(f"{args.out}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args):
    if args.script not in SCRIPTS:
        fail(f"--script {args.script}: one of {', '.join(SCRIPTS)}")
    if args.threads < 1:
        fail(f"--threads must be >= 1: --threads {args.threads}")
    if args.jobs < 1 or not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        fail(f"--jobs must be >= 1 and --seeds distinct non-negative integers: --jobs {args.jobs} --seeds {args.seeds}")
    maze = args.script == "deepspi_maze.py"
    if not maze and (args.from_curves or args.reference):
        fail("--from-curves and --reference are for deepspi_maze.py (for the others: experiments/compare.py --from-csv)")
    for path in [args.from_curves, args.reference]:
        if path and not os.path.isfile(path):
            fail(f"no such file: {path}")
    if args.window < 0 or any(step <= 0 for step in args.at):
        fail(f"--window must be >= 0 and --at positive step counts: --window {args.window} --at {args.at}")
    command = shlex.join(["python", "experiments/sweep.py", *sys.argv[1:]])
    failed = 0
    if args.from_curves:
        try:
            curves = read_curves(args.from_curves)
        except (ValueError, KeyError) as e:
            fail(f"--from-curves {args.from_curves}: {e}")
    else:
        tasks, parsed = make_tasks(args)
        committed = committed_runs(args, tasks, parsed)
        if not args.report_only:
            failed = train(args, tasks, committed)
            if args.dry_run:
                return
        runs = finished_runs(tasks)
        if not runs and not committed:
            if args.report_only:
                fail(f"no finished run of this grid in {os.path.abspath('runs')}/ or {committed_path(args)}")
            print("no finished run to summarise")
            sys.exit(1 if failed else 0)
        if not maze:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            atari_report(args, runs, command, committed, tasks)
            print(f"wrote {args.out}.csv, {args.out}.md, {args.out}.png, {args.out}_runs.csv")
            sys.exit(1 if failed else 0)
        curves = maze_curves(runs)
        for (label, seed), curve in committed.items():  # the committed runs that runs/ does not hold, in grid order
            curves.setdefault(label, {}).setdefault(seed, curve)
        order = {task.label: task.index for task in tasks}
        curves = {label: dict(sorted(curves[label].items())) for label in sorted(curves, key=order.get)}
        if args.reference:
            try:
                reference = read_curves(args.reference)
            except (ValueError, KeyError) as e:
                fail(f"--reference {args.reference}: {e}")
            ns = args.reference_n or sorted({p.n for p in parsed.values()})
            curves = {k: v for k, v in reference.items() if next(iter(v.values()))["n"] in ns} | curves
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    asked = legend = None
    if not args.from_curves:
        asked = {label: (len(args.seeds), p.n) for label, p in parsed.items()}
        flags = [f"every run `{args.base}`"] if args.base else []
        flags += [f"{label} `{algo or '(none)'}`" for label, _, algo in (spec.partition("=") for spec in args.algo)]
        legend = f"Flags: {'; '.join(flags)}; then each cell's." if flags else ""
        spelled = " ".join([args.base, *args.algo, *args.grid])
        if "no-dedup-obs" not in spelled and "dedup-obs=False" not in spelled:
            legend = (legend + " ").lstrip() + (
                "Code: deepspi_maze.py with the deduplicated update (--dedup-obs, the default since commit 24177dd); "
                "PPO mode gives the same numbers with either update."
            )
    maze_report(args, curves, command, asked, legend)
    written = [f"{args.out}{ext}" for ext in (".csv", ".md", ".png")]
    if not args.from_curves:
        write_curves(f"{args.out}_curves.csv", curves)
        written.append(f"{args.out}_curves.csv")
    print("wrote " + ", ".join(written))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(tyro.cli(Args))
