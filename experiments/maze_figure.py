# The confounding-maze figure (paper Fig. 3) and results table from deepspi_maze.py runs: README.md, "deepspi_maze.py".
# Run from the repository root:
#   python experiments/maze_figure.py --run     # train DeepSPI and PPO (3 seeds each, default settings), then plot
#   python experiments/maze_figure.py           # plot the runs already in runs/ (or, when there are none, {out}_runs.csv)
# The runs are read from their TensorBoard files; {out}_runs.csv keeps every per-iteration row, to redraw without runs/.
import csv
import glob
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro

ALGOS = {  # exp_name: (label, extra flags of deepspi_maze.py)
    "deepspi": ("DeepSPI", []),
    "ppo": ("PPO", ["--reward-loss-coef", "0", "--transition-loss-coef", "0"]),
}


@dataclass
class Args:
    run: bool = False
    """train the runs first (each algorithm x seed, one after the other unless --jobs > 1)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """the seeds to train"""
    jobs: int = 1
    """how many runs train at the same time"""
    extra: str = ""
    """extra flags for every deepspi_maze.py run, given with '=' (--extra="--n 10"); the plot then shows those runs only"""
    runs_dir: str = "runs"
    """where deepspi_maze.py writes its runs"""
    out: str = "maze"
    """output prefix: {out}.png (figure), {out}_results.md (table), {out}_runs.csv (all per-iteration rows)"""


def event_rows(run_dir):
    """One row per iteration of a deepspi_maze.py run, from its TensorBoard files: iteration, global_step, wall_s (seconds
    from the run's first event), and every scalar logged once per iteration, named without its section
    (charts/init_value -> init_value; nan where an iteration did not log it, e.g. before the first finished episode)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "charts/init_value" not in tags:
        return []
    iterations, start = acc.Scalars("charts/init_value"), acc.FirstEventTimestamp()
    rows = [
        {"iteration": i + 1, "global_step": e.step, "wall_s": round(e.wall_time - start, 2)} for i, e in enumerate(iterations)
    ]
    index = {e.step: i for i, e in enumerate(iterations)}
    for tag in tags:
        events = acc.Scalars(tag)
        if len({e.step for e in events}) < len(events) or tag.startswith("charts/episodic"):  # logged per episode
            continue
        for row in rows:
            row[tag.split("/", 1)[-1]] = math.nan
        for e in events:
            if e.step in index:
                rows[index[e.step]][tag.split("/", 1)[-1]] = e.value
    return rows


def read_runs(runs_dir, maze_tag):
    """{exp_name: [{"seed", "rows"} of each run]} for the runs of the given maze (the last run of each exp_name and seed
    wins; runs started in the same second end in _2, _3...)."""
    latest = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, f"{maze_tag}__*__*__*"))):
        _, exp_name, seed, stamp = os.path.basename(path).split("__")
        key = tuple(int(part) for part in stamp.split("_"))
        if exp_name in ALGOS and glob.glob(os.path.join(path, "events.out.tfevents.*")):
            if (exp_name, seed) not in latest or key > latest[(exp_name, seed)][0]:
                latest[(exp_name, seed)] = (key, path)
    runs = {}
    for (exp_name, seed), (_, path) in sorted(latest.items()):
        if rows := event_rows(path):
            runs.setdefault(exp_name, []).append({"seed": int(seed), "rows": rows})
    return runs


def column(run, name):
    return np.array([row[name] for row in run["rows"]])


def first_crossing(run, level):
    hits = np.flatnonzero(column(run, "init_value") >= level)
    return column(run, "global_step")[hits[0]] if len(hits) else np.nan


def spread(values, fmt="{:.3f}"):
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return "never"
    text = (fmt + " ± " + fmt).format(np.nanmean(values), np.nanstd(values))
    return text + f" [{fmt.format(np.nanmin(values))}, {fmt.format(np.nanmax(values))}]"


if __name__ == "__main__":
    import compare  # experiments/compare.py, beside this file: its fail() for bad input

    args = tyro.cli(Args)
    if args.jobs < 1 or not args.seeds:
        compare.fail(f"--jobs must be >= 1 and --seeds non-empty: --jobs {args.jobs} --seeds {args.seeds}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    import deepspi_maze

    maze_args = tyro.cli(deepspi_maze.Args, args=args.extra.split())
    maze_tag = f"ConfoundingMaze-n{maze_args.n}-eps{maze_args.epsilon}"
    if args.run:
        commands = [
            [sys.executable, os.path.join(root, "deepspi_maze.py"), "--no-progress", "--exp-name", name, "--seed", str(seed)]
            + flags
            + args.extra.split()
            for seed in args.seeds
            for name, (_, flags) in ALGOS.items()
        ]
        running = []
        for command in commands:
            while len(running) >= args.jobs:
                time.sleep(1)
                running = [p for p in running if p.poll() is None]
            print(" ".join(command[1:]), flush=True)
            running.append(subprocess.Popen(command))
        for p in running:
            p.wait()

    runs = read_runs(args.runs_dir, maze_tag)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if runs:  # keep every per-iteration row, so the figure can be redrawn without the runs/ folder
        with open(f"{args.out}_runs.csv", "w", newline="") as f:
            rows = [row for algo_runs in runs.values() for run in algo_runs for row in run["rows"]]
            fieldnames = ["algo", "seed"] + list(dict.fromkeys(k for row in rows for k in row))  # PPO has no world model
            writer = csv.DictWriter(f, fieldnames=fieldnames, restval="nan")
            writer.writeheader()
            for name, algo_runs in runs.items():
                for run in algo_runs:
                    writer.writerows({"algo": name, "seed": run["seed"], **row} for row in run["rows"])
    elif os.path.exists(f"{args.out}_runs.csv"):
        print(f"no runs of {maze_tag} in {args.runs_dir}/: using {args.out}_runs.csv")
        with open(f"{args.out}_runs.csv") as f:
            for row in csv.DictReader(f):
                name, seed = row.pop("algo"), int(row.pop("seed"))
                algo_runs = runs.setdefault(name, [])
                if not algo_runs or algo_runs[-1]["seed"] != seed:
                    algo_runs.append({"seed": seed, "rows": []})
                algo_runs[-1]["rows"].append({k: float(v) for k, v in row.items()})
    if not runs:
        compare.fail(f"no runs of {maze_tag} found in {args.runs_dir}/ (train them with --run)")

    v_star = deepspi_maze.optimal_value(maze_args.n, maze_args.epsilon, maze_args.gamma)
    v_blind = deepspi_maze.star_blind_value(maze_args.n, maze_args.epsilon, maze_args.gamma)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    axes = axes.flatten()
    colors = {"deepspi": "tab:blue", "ppo": "tab:orange"}
    for name, algo_runs in runs.items():
        label = ALGOS[name][0]
        for i, run in enumerate(algo_runs):
            steps = column(run, "global_step")
            kw = dict(
                color=colors[name],
                alpha=0.9,
                lw=1.2,
                label=f"{label} (seeds {', '.join(str(r['seed']) for r in algo_runs)})" if i == 0 else None,
            )
            axes[0].plot(steps, column(run, "init_value"), **kw)
            axes[1].plot(steps, column(run, "p_up_top_star"), **kw)
            axes[1].plot(steps, column(run, "p_up_bottom_star"), color=colors[name], alpha=0.9, lw=1.2, ls="--")
            axes[2].plot(steps, column(run, "repr_dist"), **kw)
            axes[3].plot(steps, column(run, "repr_dist_normalized"), **kw)
    axes[0].axhline(v_star, color="k", ls="-", lw=1, label=f"V* = {v_star:.3f}")
    axes[0].axhline(v_blind, color="k", ls="--", lw=1, label=f"best star-blind = {v_blind:.3f}")
    axes[0].set(title="exact $V^\\pi(s_I)$ of the network's policy", xlabel="environment steps", ylabel="$V^\\pi(s_I)$")
    axes[1].set(title="P(UP | top *) (solid), P(UP | bottom *) (dashed)", xlabel="environment steps", ylim=(-0.02, 1.02))
    axes[2].set(title="star latent distance mean$(\\phi(o_{top*}) - \\phi(o_{bottom*}))^2$", xlabel="environment steps")
    axes[3].set(title="the same, divided by the mean squared latent of the two stars", xlabel="environment steps")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Confounding maze n={maze_args.n}, epsilon={maze_args.epsilon}, gamma={maze_args.gamma}", fontsize=11)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=80)

    lines = [
        f"Confounding maze n={maze_args.n}, ε={maze_args.epsilon}, γ={maze_args.gamma}: V* = {v_star:.3f}, best star-blind "
        f"V = {v_blind:.3f}. Mean ± std [min, max] over seeds; final = last iteration.",
        "",
        "| algorithm | seeds | steps | final V^π(s_I) | best V^π(s_I) | steps to V ≥ star-blind | steps to V ≥ 0.95·V* "
        "| final P(UP\\|top ⋆) | final P(UP\\|bottom ⋆) | final star latent distance | final normalised distance "
        "| avg episodic return (last 5 it.) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, algo_runs in runs.items():
        final = lambda key, algo_runs=algo_runs: [column(r, key)[-1] for r in algo_runs]
        lines.append(
            f"| {ALGOS[name][0]} | {', '.join(str(r['seed']) for r in algo_runs)} | "
            f"{', '.join(str(int(column(r, 'global_step')[-1])) for r in algo_runs)} | {spread(final('init_value'))} | "
            f"{spread([column(r, 'init_value').max() for r in algo_runs])} | "
            f"{spread([first_crossing(r, v_blind) for r in algo_runs], '{:.0f}')} | "
            f"{spread([first_crossing(r, 0.95 * v_star) for r in algo_runs], '{:.0f}')} | "
            f"{spread(final('p_up_top_star'))} | {spread(final('p_up_bottom_star'), '{:.4f}')} | "
            f"{spread(final('repr_dist'), '{:.4f}')} | {spread(final('repr_dist_normalized'), '{:.3f}')} | "
            f"{spread([np.nanmean(column(r, 'avg_episodic_return')[-5:]) for r in algo_runs])} | "
            f"{spread(final('wall_s'), '{:.0f}')} |"
        )
    with open(f"{args.out}_results.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}.png, {args.out}_results.md, {args.out}_runs.csv")
