# The confounding maze over many seeds: for each setting (n) and algorithm (DeepSPI, PPO), per seed, the final exact
# V^pi(s_I), the steps to first reach the best star-blind value and 0.95 V*, and whether the seed is still on the
# star-blind plateau at chosen steps; a CSV, a markdown table per setting and a figure. From the deepspi_maze.py runs in
# runs/ (their TensorBoard files: charts/init_value, the exact V^pi(s_I) of each iteration's policy), or from the curves
# CSV it wrote earlier. Run from the repository root, after training the runs, e.g. for seed in 1..10:
#   python deepspi_maze.py --no-progress --exp-name deepspi --seed $seed --n 5
#   python deepspi_maze.py --no-progress --exp-name ppo --seed $seed --n 5 --reward-loss-coef 0 --transition-loss-coef 0
#   python experiments/maze_seeds.py    # reads runs/, writes maze_10seeds{.csv,.md,.png,_curves.csv} in the current folder
#   python experiments/maze_seeds.py --from-curves docs/learning/maze_10seeds_curves.csv   # the committed runs, no runs/
# The committed docs/learning/maze_10seeds.* and the table of docs/results.md: --out docs/learning/maze_10seeds
# --markdown docs/results.md (docs/maintainers.md).
import csv
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import compare  # noqa: E402
from maze_figure import ALGOS, read_runs  # noqa: E402

import deepspi_maze  # noqa: E402

COLORS = {"deepspi": "tab:blue", "ppo": "tab:orange"}


@dataclass
class Args:
    n: List[int] = field(default_factory=lambda: [5, 10])
    """the settings: the maze's corridor length n (runs ConfoundingMaze-n{n}-eps{epsilon}__{exp_name}__{seed}__{stamp})"""
    epsilon: float = 0.2
    """the maze's epsilon (the runs' --epsilon)"""
    gamma: float = 0.99
    """the discount of V* and the star-blind value (the runs' --gamma; checked against the V* and star-blind value they log)"""
    seeds: List[int] = field(default_factory=lambda: list(range(1, 11)))
    """the seeds expected for each algorithm and setting (a missing one is reported; other seeds are left out)"""
    at: List[int] = field(default_factory=lambda: [10_000, 20_000, 40_000])
    """the steps of the plateau check: V^pi(s_I) of the last iteration at or before each step"""
    plateau_margin: float = 0.5
    """on the plateau: V^pi(s_I) < star-blind value + this"""
    end_tolerance: float = 0.1
    """ends at the star-blind value: |final V^pi(s_I) - star-blind value| <= this"""
    runs_dir: str = "runs"
    """where deepspi_maze.py wrote its runs (the latest run of each exp_name and seed is used)"""
    from_curves: Optional[str] = None
    """read the curves from this {out}_curves.csv instead of runs/"""
    out: str = "maze_10seeds"
    """output prefix: {out}.csv (per seed), {out}.md (tables), {out}.png (figure), {out}_curves.csv (every iteration)"""
    markdown: List[str] = field(default_factory=list)
    """also write the summary (the mean rows of each setting) into these files (e.g. README.md), between the lines
    <!-- experiments/maze_seeds.py {out} --> and <!-- /experiments/maze_seeds.py {out} -->, which each file must have"""


def value_at(steps, values, at):
    """V of the last iteration at or before step `at` (nan if none, or if the run has not reached `at`)."""
    k = np.searchsorted(steps, at, side="right") - 1
    return float(values[k]) if k >= 0 and at <= steps[-1] else math.nan


def first_step(steps, values, level):
    hits = np.flatnonzero(values >= level)
    return int(steps[hits[0]]) if len(hits) else None


def seed_stats(steps, values, v_blind, v_star, args):
    stats = {
        "steps": int(steps[-1]),
        "final_value": float(values[-1]),
        "steps_to_star_blind": first_step(steps, values, v_blind),
        "steps_to_0.95_optimal": first_step(steps, values, 0.95 * v_star),
    }
    for at in args.at:
        v = value_at(steps, values, at)
        stats[f"value_at_{at}"] = v
        stats[f"plateau_at_{at}"] = None if math.isnan(v) else bool(v < v_blind + args.plateau_margin)
    stats["ends_at_star_blind"] = bool(abs(values[-1] - v_blind) <= args.end_tolerance)
    stats["ends_at_0.95_optimal"] = bool(values[-1] >= 0.95 * v_star)
    return stats


def read_curves_csv(path, args):
    """{(n, exp_name): {seed: (steps, values)}} of a curves CSV written by this script."""
    found = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if float(r["epsilon"]) == args.epsilon and int(r["n"]) in args.n:
                steps, values = found.setdefault((int(r["n"]), r["algorithm"]), {}).setdefault(int(r["seed"]), ([], []))
                steps.append(int(r["global_step"]))
                values.append(float(r["init_value"]))
    return {key: {s: (np.array(x), np.array(y)) for s, (x, y) in c.items()} for key, c in found.items()}


def load_curves(args):
    """{(n, exp_name): {seed: (steps, values)}} from runs/ (checking the runs' V* and star-blind value) or a curves CSV.
    From runs/, a seed with no run there is taken from {out}_curves.csv when that file has it (a machine without the
    runs of an earlier one goes on from the committed curves)."""
    if args.from_curves:
        return read_curves_csv(args.from_curves, args)
    found = {}
    for n in args.n:
        v_star, v_blind = (
            deepspi_maze.optimal_value(n, args.epsilon, args.gamma),
            deepspi_maze.star_blind_value(n, args.epsilon, args.gamma),
        )
        for name, runs in read_runs(args.runs_dir, f"ConfoundingMaze-n{n}-eps{args.epsilon}").items():
            for run in runs:
                rows = run["rows"]
                logged = rows[0]["optimal_value"], rows[0]["star_blind_value"]  # float32 in TensorBoard: rel. 2^-24
                if not all(math.isclose(x, v, rel_tol=1e-6) for x, v in zip(logged, (v_star, v_blind), strict=True)):
                    compare.fail(f"n={n} {name} seed {run['seed']}: the run's V* or star-blind value is not this gamma's")
                steps = np.array([int(r["global_step"]) for r in rows])
                found.setdefault((n, name), {})[run["seed"]] = (steps, np.array([r["init_value"] for r in rows]))
    committed = f"{args.out}_curves.csv"
    if os.path.exists(committed):
        for key, seeds in read_curves_csv(committed, args).items():
            kept = {s: c for s, c in seeds.items() if s not in found.get(key, {})}  # all: the rewritten file keeps them
            if kept:
                print(f"n={key[0]} {key[1]}: seeds {sorted(kept)} from {committed} (no run of them in {args.runs_dir}/)")
                found.setdefault(key, {}).update(kept)
    return found


def fmt_steps(values, count):
    reached = [v for v in values if v is not None]
    if not reached:
        return "never"
    text = f"{np.mean(reached):.0f}"
    return text + ("" if len(reached) == count else f" ({len(reached)}/{count} seeds; the others never)")


def plateau_cell(value, plateau):
    return "–" if plateau is None else f"{'yes' if plateau else 'no'} ({value:.2f})"


def main(args):
    if not args.n or min(args.n) < 1 or not args.seeds or not args.at or min(args.at) <= 0:
        compare.fail(f"--n, --seeds and --at must be non-empty, n >= 1 and steps > 0: got {args.n}, {args.seeds}, {args.at}")
    if args.plateau_margin < 0 or args.end_tolerance < 0 or not 0 < args.gamma <= 1 or not 0 <= args.epsilon <= 1:
        compare.fail("--plateau-margin and --end-tolerance must be >= 0, --gamma in (0, 1], --epsilon in [0, 1]")
    if args.from_curves and not os.path.exists(args.from_curves):
        compare.fail(f"--from-curves {args.from_curves}: no such file")
    begin, end = compare.markers("maze_seeds.py", args.out)
    compare.check_markers(args.markdown, begin, end)
    curves = load_curves(args)
    names = [name for name in ALGOS if any((n, name) in curves for n in args.n)]
    if not names:
        compare.fail(f"no maze runs of n={args.n}, epsilon={args.epsilon} in {args.from_curves or args.runs_dir + '/'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    source = (
        f"`{args.from_curves}`"
        if args.from_curves
        else f"the runs in {args.runs_dir}/ (seeds without one: `{args.out}_curves.csv`)"
    )
    intro = (
        f"Made by `python experiments/maze_seeds.py` from {source} "
        "(deepspi_maze.py, default settings but --n; DeepSPI: exp_name deepspi, with the deduplicated update (--dedup-obs, "
        "the default since commit 24177dd); PPO: exp_name ppo with --reward-loss-coef 0 --transition-loss-coef 0). "
        "V^π(s_I) is the exact value of each iteration's policy "
        "(charts/init_value); steps to a level: the first iteration with V^π(s_I) ≥ it; "
        f"plateau at a step: V^π(s_I) of the last iteration at or before it < star-blind + {args.plateau_margin} "
        "(below the star-blind value counts too); mean rows: mean ± std (ddof 0) across seeds, "
        "crossing steps averaged over the seeds that reach the level."
    )
    rows, lines = [], [intro, ""]
    command = shlex.join(["python", "experiments/maze_seeds.py", *sys.argv[1:]])
    brief = [f"Made by `{command}` (each seed: `{args.out}.md`).", ""]  # the --markdown block
    for n in args.n:
        v_star = deepspi_maze.optimal_value(n, args.epsilon, args.gamma)
        v_blind = deepspi_maze.star_blind_value(n, args.epsilon, args.gamma)
        lines += [
            f"## n = {n}, ε = {args.epsilon}, γ = {args.gamma}: V* = {v_star:.3f}, best star-blind V = {v_blind:.3f}, "
            f"0.95·V* = {0.95 * v_star:.3f}",
            "",
            "| algorithm | seed | steps | final V^π(s_I) | steps to V ≥ star-blind | steps to V ≥ 0.95·V* | "
            + " | ".join(f"on plateau at {at} (V)" for at in args.at)
            + " |",
            "|---|---|---|---|---|---|" + "---|" * len(args.at),
        ]
        brief += [lines[-4].replace("## ", "**", 1).replace(":", ":**", 1), ""] + lines[-2:]
        summary = []
        for name in names:
            label = ALGOS[name][0]
            seed_curves = {s: c for s, c in sorted(curves.get((n, name), {}).items()) if s in args.seeds}
            missing = [s for s in args.seeds if s not in seed_curves]
            if missing:
                print(f"warning: n={n} {label}: no run of seeds {missing}")
            stats = {seed: seed_stats(steps, values, v_blind, v_star, args) for seed, (steps, values) in seed_curves.items()}
            if len({s["steps"] for s in stats.values()}) > 1:
                print(f"warning: n={n} {label}: the runs end at different steps (one still running?)")
            for seed, s in stats.items():
                rows.append({"n": n, "epsilon": args.epsilon, "gamma": args.gamma, "algorithm": label, "seed": seed} | s)
                lines.append(
                    f"| {label} | {seed} | {s['steps']} | {s['final_value']:.3f} | "
                    f"{s['steps_to_star_blind'] if s['steps_to_star_blind'] is not None else 'never'} | "
                    f"{s['steps_to_0.95_optimal'] if s['steps_to_0.95_optimal'] is not None else 'never'} | "
                    + " | ".join(plateau_cell(s[f"value_at_{at}"], s[f"plateau_at_{at}"]) for at in args.at)
                    + " |"
                )
            if not stats:
                continue
            count, finals = len(stats), [s["final_value"] for s in stats.values()]
            cells = []
            for at in args.at:
                known = [s for s in stats.values() if s[f"plateau_at_{at}"] is not None]
                on = sum(s[f"plateau_at_{at}"] for s in known)
                cells.append(f"{on}/{len(known)} ({np.mean([s[f'value_at_{at}'] for s in known]):.2f})" if known else "–")
            lines.append(
                f"| **{label}** | **mean ({count} seeds)** | | **{np.mean(finals):.3f} ± {np.std(finals):.3f}** | "
                f"{fmt_steps([s['steps_to_star_blind'] for s in stats.values()], count)} | "
                f"{fmt_steps([s['steps_to_0.95_optimal'] for s in stats.values()], count)} | " + " | ".join(cells) + " |"
            )
            brief.append(lines[-1])
            blind = sum(s["ends_at_star_blind"] for s in stats.values())
            near = sum(s["ends_at_0.95_optimal"] for s in stats.values())
            summary.append(
                f"{label}: {blind}/{count} seeds ({blind / count:.0%}) end at the star-blind value "
                f"(|final V^π(s_I) − {v_blind:.3f}| ≤ {args.end_tolerance}), {near}/{count} end at ≥ 0.95·V* "
                f"(final V^π(s_I) {min(finals):.3f} to {max(finals):.3f})"
            )
        paper = (
            " The paper reports, at n = 5, ε = 0.2, PPO ≈ 4.8 (the star-blind value) and DeepSPI ≈ 8.01 (V*)."
            if n == 5 and args.epsilon == 0.2
            else ""
        )
        summary.sort(key=lambda line: not line.startswith("PPO"))  # the paper's claim is about PPO: its line first
        lines += ["", "; ".join(summary) + "." + paper, ""]
        brief += lines[-3:]

    columns = list(rows[0])
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    with open(f"{args.out}.md", "w") as f:
        f.write("\n".join(lines))
    if not args.from_curves:  # every iteration's V^pi(s_I), so that all of this can be made again without runs/
        settings = {(n, args.epsilon) for n in args.n}
        other_settings = []  # the rows of the other settings (n, epsilon) in the file it rewrites are kept
        if os.path.exists(f"{args.out}_curves.csv"):
            with open(f"{args.out}_curves.csv", newline="") as f:
                other_settings = [r for r in csv.reader(f) if r[0] != "n" and (int(r[0]), float(r[1])) not in settings]
        with open(f"{args.out}_curves.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["n", "epsilon", "algorithm", "seed", "global_step", "init_value"])
            writer.writerows(other_settings)
            for (n, name), seed_curves in sorted(curves.items()):
                for seed, (steps, values) in sorted(seed_curves.items()):
                    writer.writerows(
                        [n, args.epsilon, name, seed, int(x), float(y)] for x, y in zip(steps, values, strict=True)
                    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.n), figsize=(6.5 * len(args.n), 4.5), squeeze=False)
    for ax, n in zip(axes[0], args.n, strict=True):
        v_star = deepspi_maze.optimal_value(n, args.epsilon, args.gamma)
        v_blind = deepspi_maze.star_blind_value(n, args.epsilon, args.gamma)
        for name in names:
            seed_curves = {s: c for s, c in curves.get((n, name), {}).items() if s in args.seeds}
            if seed_curves:
                compare.plot_curves(ax, seed_curves, COLORS[name], ALGOS[name][0])
        ax.axhline(v_star, color="k", lw=1, label=f"V* = {v_star:.3f}")
        ax.axhline(v_blind, color="k", ls="--", lw=1, label=f"best star-blind = {v_blind:.3f}")
        ax.axhline(v_blind + args.plateau_margin, color="gray", ls=":", lw=1, label=f"star-blind + {args.plateau_margin}")
        ax.set(title=f"n = {n}, ε = {args.epsilon}", xlabel="environment steps", ylabel="exact $V^\\pi(s_I)$")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Confounding maze: exact $V^\\pi(s_I)$ of the network's policy, one thin line per seed", fontsize=11)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=80)
    for path in args.markdown:
        compare.write_between(path, begin, end, "\n".join(brief))
    print("\n".join(lines))
    written = [f"{args.out}{ext}" for ext in (".csv", ".md", ".png")] + (
        [] if args.from_curves else [f"{args.out}_curves.csv"]
    )
    print("wrote " + ", ".join(written + args.markdown))


if __name__ == "__main__":
    main(tyro.cli(Args))
