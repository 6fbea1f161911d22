# Learning curves of several algorithms over seeds, from the TensorBoard files of their runs (or from a CSV this tool
# wrote earlier): a CSV (one row per algorithm, seed and window), a PNG (a thin line per seed, a thick mean across
# seeds) and a markdown table of the values at chosen steps. Run from the repository root:
#   python experiments/compare.py --run "DeepSPI=runs/BreakoutNoFrameskip-v4__deepspi_atari__*" \
#       --run "PPO=runs/BreakoutNoFrameskip-v4__ppo_atari__*" --tags charts/sir losses/transition_loss \
#       --at 250000 500000 750000 1000000 --table docs/learning/breakout.md --out docs/learning/breakout \
#       --markdown README.md   # the return table between README's <!-- experiments/compare.py docs/learning/breakout -->
#   python experiments/compare.py --from-csv docs/learning/breakout.csv --at 500000 --out docs/learning/breakout  # no runs/
import csv
import glob
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import tyro

RETURN_TAG = "charts/episodic_return"
FIXED = ["algorithm", "seed", "global_step"]  # the CSV's first columns; every other column is a scalar's window mean


@dataclass
class Args:
    run: tyro.conf.UseAppendAction[List[str]] = field(default_factory=list)
    """LABEL=GLOB, repeatable: the run directories (runs/{env}__{exp_name}__{seed}__{stamp}) of one algorithm, one per seed"""
    from_csv: List[str] = field(default_factory=list)
    """CSV files written earlier by this tool, read instead of (or besides) runs: redraw figures and tables without runs/"""
    only: List[str] = field(default_factory=list)
    """keep only these algorithms (labels) of the --from-csv rows (default: all of them), e.g. one run of a committed CSV
    beside new runs"""
    tags: List[str] = field(default_factory=list)
    """more scalars, after charts/episodic_return: each one a column {name}_mean (charts/sir: sir_mean) and a panel"""
    window: int = 50_000
    """bin the scalars into windows of this many environment steps and average each window (0: no bins, one row per
    logged step); a window's global_step is its end, or the run's last step for the last, partial one. With --from-csv,
    give the window the CSV was made with: the table uses it to mark values taken from an earlier row"""
    at: List[int] = field(default_factory=list)
    """the table's steps: each cell is the last window at or before the step (default: each seed's last window)"""
    max_step: Optional[int] = None
    """leave out the windows that end after this step (e.g. a long run beside a short one, over the short one's steps)"""
    table: Optional[str] = None
    """also write the markdown table (it is always printed) to this file"""
    markdown: List[str] = field(default_factory=list)
    """also write the episodic-return table into these files (e.g. README.md), between the lines
    <!-- experiments/compare.py {out} --> and <!-- /experiments/compare.py {out} -->, which each file must have"""
    out: str = "compare"
    """output prefix: {out}.csv and {out}.png"""
    title: str = ""
    """the figure's title"""


def fail(message):
    """Bad input: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def markers(tool, out):
    """The lines between which `tool` (e.g. compare.py) writes its block for the output prefix `out` into a markdown file."""
    return f"<!-- experiments/{tool} {out} -->", f"<!-- /experiments/{tool} {out} -->"


def check_markers(paths, begin, end):
    """Fail before any work if a --markdown file lacks the marker lines (so a long read of runs/ is not wasted)."""
    for path in paths:
        text = open(path).read() if os.path.exists(path) else ""
        if begin not in text or end not in text or text.index(begin) > text.index(end):
            fail(f"--markdown {path}: the file needs the lines {begin} and {end} (in that order)")


def write_between(path, begin, end, block):
    """Replace what lies between the marker lines of a markdown file with `block`."""
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: text.index(begin) + len(begin)] + "\n" + block.rstrip("\n") + "\n" + text[text.index(end) :])


def column_name(tag):
    """The CSV column of a scalar tag: its last part and _mean (charts/episodic_return -> episodic_return_mean)."""
    return tag.rsplit("/", 1)[-1] + "_mean"


def run_seed(run_dir):
    """The seed in a run directory's name, {env}__{exp_name}__{seed}__{stamp}[_k]."""
    parts = os.path.basename(os.path.normpath(run_dir)).split("__")
    if len(parts) != 4 or not parts[2].isdigit():
        raise ValueError(f"{run_dir}: not a run directory name {{env}}__{{exp_name}}__{{seed}}__{{stamp}}")
    return int(parts[2])


def find_runs(specs):
    """[(label, seed, run_dir)] for the --run LABEL=GLOB specs, in their order and by seed; evaluation-only runs
    (…__eval) are skipped. Two runs of one label with the same seed are an error: narrow the glob."""
    found = []
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or not pattern:
            raise ValueError(f"--run {spec!r}: expected LABEL=GLOB")
        dirs = [d for d in sorted(glob.glob(pattern)) if os.path.isdir(d) and not d.rstrip("/").endswith("__eval")]
        if not dirs:
            raise ValueError(f"--run {spec!r}: no run directory matches {pattern}")
        by_seed = {}
        for d in dirs:
            by_seed.setdefault(run_seed(d), []).append(d)
        twice = {seed: ds for seed, ds in by_seed.items() if len(ds) > 1}
        if twice:
            raise ValueError(f"--run {spec!r}: several runs with the same seed, narrow the glob: {twice}")
        found += [(label, seed, ds[0]) for seed, ds in sorted(by_seed.items())]
    return found


def read_events(run_dir):
    """All scalars of a run directory's TensorBoard files (as tests/conftest.py read_scalars): {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wall_seconds(run_dir):
    """The seconds a run's processes trained: each process (a resumed run adds one) writes its own TensorBoard file, so
    the sum over the files of the time from a file's first event to its last; the time between processes is left out."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    total = 0.0
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        times = [event.wall_time for event in EventFileLoader(path).Load()]
        total += max(times) - min(times) if times else 0.0
    return total


def window_rows(scalars, tags, window):
    """Rows {global_step, column_name(tag): mean} of a run's scalars: one per window of `window` steps, (k W, (k+1) W],
    from the first window to the one holding the run's last logged step (window 0: one row per step a tag is logged at).
    A window's global_step is its end, or the run's last step if that is earlier; a tag with no value there: nan."""
    last = max((step for tag in tags for step, _ in scalars.get(tag, [])), default=None)
    if last is None:
        return []
    last = max(last, max(step for values in scalars.values() for step, _ in values))  # e.g. charts/SPS, each iteration
    if window > 0:
        key = lambda step: max(step - 1, 0) // window  # noqa: E731
        count = key(last) + 1
        ends = [min((k + 1) * window, last) for k in range(count)]
    else:
        steps = sorted({step for tag in tags for step, _ in scalars.get(tag, [])})
        index = {step: k for k, step in enumerate(steps)}
        key, count, ends = index.__getitem__, len(steps), steps
    rows = [{"global_step": end} for end in ends]
    for tag in tags:
        bins = [[] for _ in range(count)]
        for step, value in scalars.get(tag, []):
            bins[key(step)].append(value)
        for row, values in zip(rows, bins, strict=True):
            row[column_name(tag)] = float(np.mean(values)) if values else math.nan
    return rows


def read_csv(path):
    """The rows of a CSV this tool wrote: seed and global_step as int, the other columns as float (empty: nan)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or reader.fieldnames[:3] != FIXED:
            raise ValueError(f"{path}: not a CSV of experiments/compare.py (its columns must begin with {', '.join(FIXED)})")
        rows = [
            {"algorithm": r["algorithm"], "seed": int(r["seed"]), "global_step": int(r["global_step"])}
            | {k: float(v) if v != "" else math.nan for k, v in r.items() if k not in FIXED}
            for r in reader
        ]
    return reader.fieldnames[3:], rows


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIXED + columns)
        for row in rows:
            values = [row.get(c, math.nan) for c in columns]
            writer.writerow([row["algorithm"], row["seed"], row["global_step"]] + ["" if math.isnan(v) else v for v in values])


def curves(rows, col):
    """{algorithm: {seed: (steps, values)}} of one column, the nan entries dropped."""
    out = {}
    for row in rows:
        if not math.isnan(row.get(col, math.nan)):
            steps, values = out.setdefault(row["algorithm"], {}).setdefault(row["seed"], ([], []))
            steps.append(row["global_step"])
            values.append(row[col])
    return out


def mean_curve(seed_curves):
    """The mean across seeds at the steps where every seed has a value: (steps, means)."""
    series = [dict(zip(steps, values, strict=True)) for steps, values in seed_curves.values()]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return np.array(common), np.array([np.mean([s[step] for s in series]) for step in common])


def plot_curves(ax, seed_curves, color, label):
    """One thin line per seed and a thick mean across seeds (shared with experiments/maze_seeds.py)."""
    for steps, values in seed_curves.values():
        ax.plot(steps, values, color=color, lw=0.8, alpha=0.4, marker="o" if len(steps) == 1 else None)
    steps, mean = mean_curve(seed_curves)
    seeds = f"{len(seed_curves)} seed" + ("s" if len(seed_curves) != 1 else "")
    ax.plot(steps, mean, color=color, lw=2.4, marker="o" if len(steps) == 1 else None, label=f"{label} (mean of {seeds})")


def plot(rows, columns, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = list(dict.fromkeys(row["algorithm"] for row in rows))
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(algorithms)}
    fig, axes = plt.subplots(len(columns), 1, figsize=(8, 3.4 * len(columns)), squeeze=False)
    for ax, col in zip(axes[:, 0], columns, strict=True):
        for algorithm, seed_curves in curves(rows, col).items():
            plot_curves(ax, seed_curves, colors[algorithm], algorithm)
        ax.set(xlabel="environment steps", ylabel=col)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:  # on the top panel: tight_layout leaves no room for a figure suptitle
        axes[0, 0].set_title(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fmt(value):
    if not math.isfinite(value):
        return "–"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def value_at(seed_curve, at):
    """(step, value) of the last window at or before `at` (None: the last one), or None if there is none."""
    steps, values = seed_curve
    picks = [k for k, step in enumerate(steps) if at is None or step <= at]
    return (steps[picks[-1]], values[picks[-1]]) if picks else None


def stale(pick, at, window, last):
    """Whether a (step, value) picked for step `at` is not that step's: it lies more than a window before it (a gap), or
    its run's last row (`last`, its global_step) ends before `at` (a last, partial window holds only the steps up to it)."""
    return at is not None and window > 0 and (pick[0] < at - window or last < at)


def table(rows, columns, at, window, command):
    """Markdown: per column, the mean ± std across seeds and each seed's value at the steps `at`."""
    algorithms = list(dict.fromkeys(row["algorithm"] for row in rows))
    last = {}  # (algorithm, seed): the step of the run's last row, whichever columns it has
    for row in rows:
        key = (row["algorithm"], row["seed"])
        last[key] = max(last.get(key, 0), row["global_step"])
    points = at or [None]
    lines = [f"Made by `{command}`.", ""]
    for col in columns:
        by_algorithm = curves(rows, col)
        what = f"values averaged over windows of {window:,} steps" if window else "the logged values"
        if at and window:
            where = (
                "Each cell is the last window that ends at or before the column's step. A value marked (at S) is that of "
                "a window ending at step S, because the run stops before the column's step or has no window in the "
                f"{window:,} steps before it; it is not in the mean."
            )
        elif at:
            where = "Each cell is the last value logged at or before the column's step."
        else:
            where = "Each cell is the run's last value, marked (at S) with its step S."
        lines += [
            f"**{col}**: {what}. {where} An algorithm with several seeds has a first row with the mean ± the standard "
            "deviation (population, ddof 0) over its seeds; (n=k) marks a mean over only k of them.",
            "",
            "| algorithm | seed | " + " | ".join(str(p) if p is not None else "final" for p in points) + " |",
            "|---|---|" + "---|" * len(points),
        ]
        for algorithm in [a for a in algorithms if a in by_algorithm]:
            seed_curves = by_algorithm[algorithm]
            cells = {seed: [value_at(c, p) for p in points] for seed, c in sorted(seed_curves.items())}
            means = []
            for k, p in enumerate(points):  # the mean leaves out the seeds whose runs end before the step (− window)
                values = [
                    pick[1]
                    for seed, picked in cells.items()
                    if (pick := picked[k]) and not stale(pick, p, window, last[algorithm, seed])
                ]
                text = (
                    f"{fmt(np.mean(values))} ± {fmt(np.std(values))}" if len(values) > 1 else fmt(values[0]) if values else "–"
                )
                means.append(text + (f" (n={len(values)})" if values and len(values) < len(cells) else ""))
            if len(cells) > 1:  # one seed: its own row says it all
                lines.append(f"| {algorithm} | mean ± std ({len(cells)} seeds) | " + " | ".join(means) + " |")
            for seed, picked in cells.items():
                texts = []
                for p, pick in zip(points, picked, strict=True):
                    if pick is None:
                        texts.append("–")
                    else:
                        earlier = p is None or stale(pick, p, window, last[algorithm, seed])
                        texts.append(fmt(pick[1]) + (f" (at {pick[0]})" if earlier else ""))
                lines.append(f"| {algorithm} | {seed} | " + " | ".join(texts) + " |")
        missing = [a for a in algorithms if a not in by_algorithm]  # e.g. PPO mode has no world-model loss
        lines += ["", f"Not logged by: {', '.join(missing)}.", ""] if missing else [""]
    return lines


def main(args):
    tags = list(dict.fromkeys([RETURN_TAG] + args.tags))
    names = [column_name(tag) for tag in tags]
    if len(set(names)) < len(names):
        fail(f"two tags would share a column name: {', '.join(tags)}")
    if not args.run and not args.from_csv:
        fail("give runs (--run LABEL=GLOB, repeatable) or --from-csv FILE")
    if args.only and not args.from_csv:
        fail("--only selects algorithms of --from-csv rows: give --from-csv FILE")
    if args.window < 0:
        fail(f"--window must be >= 0 (0: no bins), got {args.window}")
    if any(step <= 0 for step in args.at) or (args.max_step is not None and args.max_step <= 0):
        fail(f"--at and --max-step must be positive step counts, got --at {args.at} --max-step {args.max_step}")
    begin, end = markers("compare.py", args.out)
    check_markers(args.markdown, begin, end)
    columns, rows = [], []
    for path in args.from_csv:
        try:
            csv_columns, csv_rows = read_csv(path)
        except (OSError, ValueError, KeyError) as e:
            fail(f"--from-csv {path}: {e}")
        columns += [c for c in csv_columns if c not in columns]
        rows += [row for row in csv_rows if not args.only or row["algorithm"] in args.only]
    if args.only and not any(row["algorithm"] in args.only for row in rows):
        fail(f"--only {' '.join(args.only)}: no such algorithm in --from-csv {' '.join(args.from_csv)}")
    if args.run:
        try:
            runs = find_runs(args.run)
        except ValueError as e:
            fail(e)
        columns += [c for c in names if c not in columns]
        for label, seed, run_dir in runs:
            run_rows = window_rows(read_events(run_dir), tags, args.window)
            if not run_rows:
                print(f"note: {run_dir} has none of {', '.join(tags)}: left out")
            rows += [{"algorithm": label, "seed": seed} | row for row in run_rows]
            print(f"{label}: seed {seed}, {run_dir} ({len(run_rows)} rows)")
    rows = [row for row in rows if args.max_step is None or row["global_step"] <= args.max_step]
    if not rows:
        fail("no rows" + (f" at or before --max-step {args.max_step}" if args.max_step else ""))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_csv(f"{args.out}.csv", columns, rows)
    plot(rows, columns, f"{args.out}.png", args.title)
    command = "python experiments/compare.py " + shlex.join(sys.argv[1:])
    lines = table(rows, columns, args.at, args.window, command)
    print("\n".join(lines))
    if args.table:
        os.makedirs(os.path.dirname(args.table) or ".", exist_ok=True)
        with open(args.table, "w") as f:
            f.write("\n".join(lines))
    block = "\n".join(table(rows, columns[:1], args.at, args.window, command))  # the return table alone
    for path in args.markdown:
        write_between(path, begin, end, block)
    written = [args.table] if args.table else []
    print(f"wrote {args.out}.csv ({len(rows)} rows), {args.out}.png" + "".join(f", {p}" for p in written + args.markdown))


if __name__ == "__main__":
    main(tyro.cli(Args))
