# The statistics behind the verdicts of docs/results.md ("The paper's predictions"), from the committed curves CSVs of
# experiments/sweep.py (docs/learning/maze_sweep_*_curves.csv) and experiments/maze_seeds.py: for each prediction, the
# cells it compares, each cell's mean ± std over its seeds (ddof 0), and for two cells the difference of their means with
# a two-sided permutation test (every split of the pooled seeds into the two cells' sizes, or 100,000 random ones
# beyond 200,000 splits) and a percentile
# bootstrap 95% confidence interval (each cell resampled with replacement, 10,000 times, seed 0). Only whole runs count (a
# seed whose curve stops before its cell's last step is left out). Run from the repository root:
#   python experiments/verdicts.py                     # prints the tables
#   python experiments/verdicts.py --markdown docs/results.md   # for maintainers: rewrites the block between
#       <!-- experiments/verdicts.py docs/learning --> and <!-- /experiments/verdicts.py docs/learning --> in that file
import argparse
import itertools
import math
import os
import shlex
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import compare  # noqa: E402
import sweep  # noqa: E402

LEARNING = "docs/learning"
EARLY_STEPS = 10_240  # "early": the first quarter of the 40,960-step budget at n = 10 (10 iterations of 1,024 steps)
LAST = 10  # L_P at the end of a run: the mean of its last 10 iterations' values (each the last minibatch's)


EXACT_LIMIT = 200_000  # at most this many splits (10 seeds against 10: 184,756): every split; more: random ones
RANDOM_SPLITS = 100_000


def permutation_p(a, b, exact_limit=EXACT_LIMIT, reps=RANDOM_SPLITS, seed=0):
    """Two-sided permutation p-value of mean(a) - mean(b): the share of the splits of a + b into groups of len(a) and
    len(b) whose difference is at least as large in absolute value (the observed split counts). Exact (every split)
    up to exact_limit splits; beyond, `reps` random splits (seed `seed`), p = (hits + 1) / (reps + 1)."""
    pooled = np.array(list(a) + list(b), dtype=float)
    observed = abs(np.mean(a) - np.mean(b))
    if math.comb(len(pooled), len(a)) > exact_limit:
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random((reps, len(pooled))), axis=1)  # a random permutation per row
        shuffled = pooled[order]
        diffs = np.abs(shuffled[:, : len(a)].mean(1) - shuffled[:, len(a) :].mean(1))
        return (int(np.sum(diffs >= observed - 1e-12 * max(1.0, observed))) + 1) / (reps + 1)
    hits = 0
    total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(a)):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(chosen)] = True
        diff = abs(pooled[mask].mean() - pooled[~mask].mean())
        hits += diff >= observed - 1e-12 * max(1.0, observed)
        total += 1
    return hits / total


def bootstrap_ci(a, b, reps=10_000, seed=0):
    """Percentile bootstrap 95% interval of mean(a) - mean(b), each group resampled with replacement."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diffs = rng.choice(a, (reps, len(a))).mean(1) - rng.choice(b, (reps, len(b))).mean(1)
    return np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)


def bootstrap_gap_change_ci(a1, b1, a0, b0, reps=10_000, seed=0):
    """Percentile bootstrap 95% interval of (mean(a1) - mean(b1)) - (mean(a0) - mean(b0)): how much a gap between two
    cells changes from one setting to another, each of the four groups resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = [rng.choice(np.asarray(x, dtype=float), (reps, len(x))).mean(1) for x in (a1, b1, a0, b0)]
    change = (means[0] - means[1]) - (means[2] - means[3])
    return np.percentile(change, 2.5), np.percentile(change, 97.5)


def spread_p(a, b):
    """Permutation p-value of a difference in spread: permutation_p (exact, or from random splits beyond its limit) on
    each seed's absolute deviation from its cell's median (Brown and Forsythe's form of Levene's test)."""
    return permutation_p(np.abs(np.asarray(a) - np.median(a)), np.abs(np.asarray(b) - np.median(b)))


def whole_runs(seeds):
    """The seeds whose curve reaches the last step of the cell."""
    end = max(c["global_step"][-1] for c in seeds.values())
    return {s: c for s, c in sorted(seeds.items()) if c["global_step"][-1] == end}


def early_value(c):
    steps = np.array(c["global_step"])
    return float(np.mean(np.array(c["init_value"])[steps <= EARLY_STEPS]))


def final_value(c):
    return float(c["init_value"][-1])


def normalised_final(c):
    return float(c["init_value"][-1] / c["optimal_value"][0])


def normalised_mean(c):
    """The mean of V^pi(s_I) / V* over a run's iterations: the area under its learning curve, which still separates two
    algorithms that both end near V* within a long budget."""
    return float(np.mean(c["init_value"]) / c["optimal_value"][0])


def final_lp(c):
    values = [v for v in c["transition_loss"] if not math.isnan(v)]
    return float(np.mean(values[-LAST:])) if values else math.nan


def star_distance(c):
    return sweep.last_finite(c["repr_dist_normalized"])


def worst_fall(c):
    """The largest fall of V^pi(s_I) from one iteration to the next (0 if it never falls)."""
    v = np.array(c["init_value"])
    return float(max(0.0, np.max(v[:-1] - v[1:]))) if len(v) > 1 else 0.0


def max_sir(c):
    return float(np.nanmax(c["sir"]))


def fmt(x, digits=3):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def p_text(p):
    """A p-value to 3 decimals; one that rounds to 0 as "< 0.001" (random splits cannot go below 1 / 100,001)."""
    return "< 0.001" if p < 0.0005 else f"{p:.3f}"


def cell_text(values):
    if not values:
        return "no run"
    if len(values) == 1:
        return f"{fmt(values[0])} (1 seed)"
    return f"{fmt(np.mean(values))} ± {fmt(np.std(values))} ({len(values)} seeds)"


def contrast_row(name, metric, a_label, a, b_label, b, spread=False):
    """One table row: two cells' values of a metric, their difference, its permutation p and bootstrap CI."""
    xa = [metric(c) for c in a.values()]
    xb = [metric(c) for c in b.values()]
    xa = [x for x in xa if not math.isnan(x)]
    xb = [x for x in xb if not math.isnan(x)]
    row = [name, f"{a_label}: {cell_text(xa)}", f"{b_label}: {cell_text(xb)}"]
    if len(xa) >= 2 and len(xb) >= 2:
        lo, hi = bootstrap_ci(xa, xb)
        splits = math.comb(len(xa) + len(xb), len(xa))
        splits = f"{splits} splits" if splits <= EXACT_LIMIT else f"{RANDOM_SPLITS:,} random splits"
        row += [fmt(np.mean(xa) - np.mean(xb)), f"{p_text(permutation_p(xa, xb))} ({splits})", f"[{fmt(lo)}, {fmt(hi)}]"]
        row += [f"{np.std(xa) / np.std(xb):.2f}, p = {p_text(spread_p(xa, xb))}" if spread and np.std(xb) > 0 else ""]
    else:
        row += ["–", "needs 2 seeds a cell", "–", ""]
    return "| " + " | ".join(row) + " |"


def gap_change_row(name, metric, cells, cells_ref):
    """One table row: the gap DeepSPI - PPO of a metric at one setting (cells) against its gap at a reference setting
    (cells_ref), each a (DeepSPI cell, PPO cell) pair; the change of the gap with its bootstrap interval."""
    values = [[x for x in (metric(c) for c in cell.values()) if not math.isnan(x)] for cell in (*cells, *cells_ref)]
    gaps = [np.mean(values[0]) - np.mean(values[1]), np.mean(values[2]) - np.mean(values[3])] if all(values) else None
    row = [name]
    row += [f"gap {fmt(gaps[0])}" if gaps else "–", f"gap {fmt(gaps[1])}" if gaps else "–"]
    if all(len(v) >= 2 for v in values):
        lo, hi = bootstrap_gap_change_ci(*values)
        row += [fmt(gaps[0] - gaps[1]), "– (bootstrap only)", f"[{fmt(lo)}, {fmt(hi)}]", ""]
    else:
        row += ["–", "needs 2 seeds a cell", "–", ""]
    return "| " + " | ".join(row) + " |"


HEADER = [
    "| measure | cell A | cell B | A − B | permutation p | bootstrap 95% CI | std ratio A/B, spread p |",
    "|---|---|---|---|---|---|---|",
]


def load(*names):
    """{label: {seed: curve}} of the whole runs in these curves CSVs (the seeds of a label from all of them)."""
    merged = {}
    for name in names:
        path = os.path.join(LEARNING, f"{name}_curves.csv")
        if os.path.exists(path):
            for label, seeds in sweep.read_curves(path).items():
                merged.setdefault(label, {}).update(seeds)
    return {label: whole_runs(seeds) for label, seeds in merged.items()}


def first_cell(curves, *labels):
    for label in labels:
        if curves.get(label):
            return curves[label]
    return {}


def report():
    clip = load("maze_sweep_clip", "maze_sweep_clip_seeds6-20")  # seeds 1-5, then the more seeds of queue.sh's lane D
    neighbourhood = load("maze_sweep_neighbourhood")
    alpha = load("maze_sweep_alpha")
    by_n = load("maze_sweep_n")
    defaults = load("maze_10seeds")
    lines = []

    lines += [
        "**1. A larger C learns faster early, with more variance.** Maze n = 10, 40,960 steps; C = 1 + `--clip-coef`; "
        f"early V: the mean V^π(s_I) of the iterations up to {EARLY_STEPS:,} steps; final V: V^π(s_I) at the end; "
        "cell B is the default C = 1.1.",
        "",
        *HEADER,
    ]
    for algo in ("deepspi", "ppo"):
        base = clip.get(f"{algo} clip-coef=0.1", {})
        for clip_coef in ("0.01", "0.2", "0.5", "0.8"):
            cell = clip.get(f"{algo} clip-coef={clip_coef}", {})
            c_text = f"C = {1 + float(clip_coef):g}"
            lines.append(contrast_row(f"{algo}: early V", early_value, c_text, cell, "C = 1.1", base, spread=True))
            lines.append(contrast_row(f"{algo}: final V", final_value, c_text, cell, "C = 1.1", base, spread=True))
    lines.append("")

    lines += [
        "**2. The default α (α_R = 0.01, α_P = 5e-4) minimises L_P without suppressing policy learning.** Maze n = 10, "
        f"DeepSPI; L_P: the mean transition loss of the last {LAST} iterations; cell B is the default α.",
        "",
        *HEADER,
    ]
    base = clip.get("deepspi clip-coef=0.1", {})
    for flag, values in (("reward-loss-coef", ("0.001", "0.1", "1")), ("transition-loss-coef", ("5e-5", "5e-3", "5e-2"))):
        for value in values:
            cell = first_cell(alpha, f"deepspi {flag}={value}", f"deepspi {flag}={float(value):g}")
            short = "α_R" if flag == "reward-loss-coef" else "α_P"
            lines.append(contrast_row("final L_P", final_lp, f"{short} = {float(value):g}", cell, "default", base))
            lines.append(contrast_row("final V", final_value, f"{short} = {float(value):g}", cell, "default", base))
    lines.append("")

    lines += [
        "**3. The star separation and the DeepSPI − PPO gap grow with n.** Final V^π(s_I) / V* (n = 5 and 10: 40,960 "
        "steps, the 10-seed study at n = 5 and the C = 1.1 cells at n = 10; n = 15 and 20: 163,840 steps); mean V / V*: "
        "V^π(s_I) / V* averaged over the run's iterations (the area under the curve); star distance: "
        "the final normalised distance of the two stars' latents (logged by the sweeps, not by the 10-seed study); gap "
        "growth: the gap DeepSPI − PPO at n (cell A) against the gap at a smaller n (cell B), with a bootstrap interval "
        "of its change (the four cells resampled).",
        "",
        *HEADER,
    ]
    cells = {
        5: (first_cell(defaults, "DeepSPI defaults n=5 (maze_10seeds_curves.csv)"),
            first_cell(defaults, "PPO defaults n=5 (maze_10seeds_curves.csv)")),
        10: (clip.get("deepspi clip-coef=0.1", {}), clip.get("ppo clip-coef=0.1", {})),
        15: (by_n.get("deepspi n=15", {}), by_n.get("ppo n=15", {})),
        20: (by_n.get("deepspi n=20", {}), by_n.get("ppo n=20", {})),
    }  # fmt: skip
    for n, (deep, ppo) in cells.items():
        lines.append(contrast_row(f"n = {n}: final V / V*", normalised_final, "DeepSPI", deep, "PPO", ppo))
        lines.append(contrast_row(f"n = {n}: mean V / V*", normalised_mean, "DeepSPI", deep, "PPO", ppo))
        if n != 5:
            lines.append(contrast_row(f"n = {n}: star distance", star_distance, "DeepSPI", deep, "PPO", ppo))
    for n, ref in ((10, 5), (15, 10), (20, 10)):  # does the gap grow? each gap against a smaller n's (A: at n, B: at ref)
        lines.append(gap_change_row(f"gap growth, final V / V*: n = {n} − n = {ref}", normalised_final, cells[n], cells[ref]))
        lines.append(gap_change_row(f"gap growth, mean V / V*: n = {n} − n = {ref}", normalised_mean, cells[n], cells[ref]))
        if ref != 5:
            lines.append(
                gap_change_row(f"gap growth, star distance: n = {n} − n = {ref}", star_distance, cells[n], cells[ref])
            )
    lines.append("")

    lines += [
        "**4. Enforcing the neighbourhood improves more safely.** Maze n = 10, C = 1.1; worst fall: the largest drop of "
        "V^π(s_I) from one iteration to the next (an update that made the policy worse); cell B: the same algorithm "
        "without `--enforce-neighbourhood`.",
        "",
        *HEADER,
    ]
    for algo in ("deepspi", "ppo"):
        enforced = neighbourhood.get(algo, {})
        base = clip.get(f"{algo} clip-coef=0.1", {})
        for name, metric in (("worst fall", worst_fall), ("max SIR", max_sir), ("final V", final_value)):
            lines.append(contrast_row(f"{algo}: {name}", metric, "enforced", enforced, "default", base, spread=False))
    lines.append("")
    return lines


def main():
    parser = argparse.ArgumentParser(description="the statistics of the verdicts in docs/results.md")
    parser.add_argument("--markdown", nargs="*", default=[], help="rewrite the block between the markers in these files")
    args = parser.parse_args()
    begin, end = compare.markers("verdicts.py", LEARNING)
    compare.check_markers(args.markdown, begin, end)
    command = shlex.join(["python", "experiments/verdicts.py", *sys.argv[1:]])
    lines = [f"Made by `{command}` from the curves CSVs in `{LEARNING}/`.", "", *report()]
    print("\n".join(lines))
    for path in args.markdown:
        compare.write_between(path, begin, end, "\n".join(lines))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
