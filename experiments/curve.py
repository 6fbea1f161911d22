# One run's learning curve from its TensorBoard file: a CSV of the chosen scalars (one row per logged step) and a PNG.
#   python experiments/curve.py runs/BreakoutNoFrameskip-v4__deepspi_atari__1__1795500000 --out docs/breakout_deepspi
import csv
import glob
import os
from dataclasses import dataclass, field
from typing import List

import tyro


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run directory (runs/{run_name}) holding one events.out.tfevents file"""
    tags: List[str] = field(
        default_factory=lambda: ["charts/avg_episodic_return", "charts/human_normalized_score", "charts/sir", "charts/SPS"]
    )
    """the scalars to export; the first one is plotted"""
    out: str = "curve"
    """output prefix: {out}.csv and {out}.png"""
    title: str = ""
    """the figure's title (default: the run directory's name)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(args.run_dir, "events.out.tfevents.*"))
    if len(files) != 1:
        raise SystemExit(f"error: expected one events.out.tfevents file in {args.run_dir}, found {len(files)}")
    events = EventAccumulator(files[0], size_guidance={"scalars": 0}).Reload()
    missing = [tag for tag in args.tags if tag not in events.Tags()["scalars"]]
    if missing:
        raise SystemExit(f"error: {args.run_dir} has no {', '.join(missing)}")
    series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in args.tags}
    steps = sorted(set().union(*series.values()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["global_step"] + args.tags)
        writer.writerows([step] + [series[tag].get(step, "") for tag in args.tags] for step in steps)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = zip(*sorted(series[args.tags[0]].items()), strict=True)
    ax.plot(x, y)
    ax.set(xlabel="environment steps", ylabel=args.tags[0], title=args.title or os.path.basename(args.run_dir.rstrip("/")))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=80)
    print(f"wrote {args.out}.csv ({len(steps)} rows) and {args.out}.png")
