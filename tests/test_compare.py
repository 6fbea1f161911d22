"""experiments/compare.py on two tiny real runs of deepspi_atari.py (DeepSPI and its PPO mode, through the real CLI):
the CSV's window means against the runs' own TensorBoard scalars, the figure, the table and the --from-csv round trip."""

import csv
import glob
import math
import os
import subprocess
import sys

import numpy as np
from conftest import REPO, run_script

TINY = ["--env-id", "BreakoutNoFrameskip-v4", "--num-envs", "2", "--num-steps", "128", "--total-timesteps", "512"]
WINDOW = 128  # 4 windows over the 2 iterations: some with no episode, some with values of both envs
TAGS = ["charts/episodic_return", "charts/sir", "losses/transition_loss"]


def compare(*flags, cwd):
    cmd = [sys.executable, os.path.join(REPO, "experiments", "compare.py"), *flags]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def scalars_with_steps(run_dir):
    """{tag: [(step, value)]}: tests/conftest.py read_scalars, with the steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_real_runs(tmp_path):
    for flags in (
        ["--seed", "1"],
        ["--seed", "2", "--exp-name", "ppo", "--reward-loss-coef", "0", "--transition-loss-coef", "0"],
    ):
        proc = run_script("deepspi_atari.py", *TINY, *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {
        "DeepSPI": glob.glob(str(tmp_path / "runs" / "*__deepspi_atari__1__*")),
        "PPO": glob.glob(str(tmp_path / "runs" / "*__ppo__2__*")),
    }
    assert all(len(dirs) == 1 for dirs in runs.values()), runs

    at = ["256", "512"]
    flags = ["--run", "DeepSPI=runs/*__deepspi_atari__*", "--run", "PPO=runs/*__ppo__*", "--tags", *TAGS[1:]]
    readme = tmp_path / "README.md"
    begin, end = "<!-- experiments/compare.py out/cmp -->", "<!-- /experiments/compare.py out/cmp -->"
    readme.write_text(f"# title\n{begin}\nold table\n{end}\nend\n")
    flags += ["--markdown", "README.md"]
    proc = compare(*flags, "--window", str(WINDOW), "--at", *at, "--out", "out/cmp", "--table", "out/cmp.md", cwd=tmp_path)
    rows = read_rows(tmp_path / "out" / "cmp.csv")
    columns = ["episodic_return_mean", "sir_mean", "transition_loss_mean"]
    assert list(rows[0]) == ["algorithm", "seed", "global_step", *columns]
    png = tmp_path / "out" / "cmp.png"
    assert png.exists() and png.stat().st_size > 1000

    # the window means, recomputed from the runs' TensorBoard scalars: windows (0, 128], ..., (384, 512]
    expected = []
    for label, seed in (("DeepSPI", 1), ("PPO", 2)):
        scalars = scalars_with_steps(runs[label][0])
        assert scalars["charts/episodic_return"], "no finished episode: the test needs at least one"
        for k in range(512 // WINDOW):
            row = {"algorithm": label, "seed": str(seed), "global_step": str((k + 1) * WINDOW)}
            for tag, col in zip(TAGS, columns, strict=True):
                values = [v for step, v in scalars.get(tag, []) if k * WINDOW < step <= (k + 1) * WINDOW]
                row[col] = float(np.mean(values)) if values else math.nan
            expected.append(row)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            if isinstance(value, float):
                assert (got[key] == "" and math.isnan(value)) or float(got[key]) == value, (got, want)
            else:
                assert got[key] == value, (got, want)
    # PPO mode logs no world-model loss; some window of each run has no episode, some a finished one
    assert all(r["transition_loss_mean"] == "" for r in rows if r["algorithm"] == "PPO")
    assert any(r["episodic_return_mean"] == "" for r in rows) and any(r["episodic_return_mean"] != "" for r in rows)

    # the table: printed and written, the mean and each seed's value at the chosen steps
    table = (tmp_path / "out" / "cmp.md").read_text()
    assert table.strip() in proc.stdout
    sir = {(r["algorithm"], r["global_step"]): float(r["sir_mean"]) for r in rows if r["sir_mean"] != ""}
    assert f"| DeepSPI | 1 | {sir['DeepSPI', '256']:.2f} | {sir['DeepSPI', '512']:.2f} |" in table
    assert f"| PPO | 2 | {sir['PPO', '256']:.2f} | {sir['PPO', '512']:.2f} |" in table
    assert "mean ± std (" not in table  # one seed each: no mean row
    transition = table.split("**transition_loss_mean**")[1]  # a run without the tag has no rows in its table
    assert "| DeepSPI | 1 |" in transition and "| PPO |" not in transition and "Not logged by: PPO." in transition
    # --markdown: the return table (the first of the table file's sections) replaces the marked block, the rest stays
    head, block = readme.read_text().split(begin + "\n")
    block, tail = block.split(end)
    assert head == "# title\n" and tail == "\nend\n" and "old table" not in block
    assert block.strip() == table.split("**sir_mean**")[0].strip() and "**episodic_return_mean**" in block

    # --from-csv: the same CSV and table again, without runs/
    os.rename(tmp_path / "runs", tmp_path / "moved")
    proc = compare("--from-csv", "out/cmp.csv", "--window", str(WINDOW), "--at", *at, "--out", "out/again", cwd=tmp_path)
    assert (tmp_path / "out" / "again.csv").read_text() == (tmp_path / "out" / "cmp.csv").read_text()
    assert (tmp_path / "out" / "again.png").stat().st_size > 1000
    assert table.split("\n", 2)[2] in proc.stdout  # all but the first line, which names the sources
    # a step after the runs' end (512), within a window of it: each seed shows its last window's value and step, no mean
    proc = compare(
        "--from-csv", "out/cmp.csv", "--window", str(WINDOW), "--at", "640", "--tags", "charts/sir", "--out", "o", cwd=tmp_path
    )
    sir_last = [float(r["sir_mean"]) for r in read_rows(tmp_path / "o.csv") if r["algorithm"] == "DeepSPI" and r["sir_mean"]][
        -1
    ]
    assert f"| DeepSPI | 1 | {sir_last:.2f} (at 512) |" in proc.stdout and "| DeepSPI | mean" not in proc.stdout
    # --max-step: the windows that end after it are left out, the others are the same rows
    compare("--from-csv", "out/cmp.csv", "--window", str(WINDOW), "--max-step", "256", "--out", "out/cut", cwd=tmp_path)
    assert read_rows(tmp_path / "out" / "cut.csv") == [r for r in rows if int(r["global_step"]) <= 256] != rows


def test_table_means_over_several_seeds_and_a_lone_seed_without_a_mean_row(tmp_path):
    """--from-csv on hand-made windows of 100 steps: A has seed 1 to step 400 and seed 2 to step 200, B one seed. At
    200, A's row is the mean ± std of both seeds; at 400, seed 2 shows its last value (at 200), outside the mean, which
    is then seed 1's value alone, marked (n=1) and without a ± 0; B has its seed's row and no mean row."""
    rows = [("A", 1, 100 * k, v) for k, v in enumerate([1.0, 2.0, 3.0, 4.0], 1)] + [("A", 2, 100, 10.0), ("A", 2, 200, 20.0)]
    rows += [("B", 1, 100 * k, v) for k, v in enumerate([5.0, 6.0, 7.0, 8.0], 1)]
    with open(tmp_path / "w.csv", "w", newline="") as f:
        csv.writer(f).writerows([["algorithm", "seed", "global_step", "episodic_return_mean"], *rows])
    proc = compare("--from-csv", "w.csv", "--window", "100", "--at", "200", "400", "--out", "o", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    table = lines[lines.index("| algorithm | seed | 200 | 400 |") :]
    assert table[2:6] == [
        "| A | mean ± std (2 seeds) | 11.00 ± 9.00 | 4.00 (n=1) |",
        "| A | 1 | 2.00 | 4.00 |",
        "| A | 2 | 20.00 | 20.00 (at 200) |",
        "| B | 1 | 6.00 | 8.00 |",
    ]
    caption = lines[lines.index("| algorithm | seed | 200 | 400 |") - 2]
    assert caption.startswith("**episodic_return_mean**: values averaged over windows of 100 steps. ")
    assert "(at S)" in caption and "parentheses" not in caption
    # --only keeps the chosen algorithms of the CSV: B alone, its rows unchanged
    proc = compare("--from-csv", "w.csv", "--only", "B", "--window", "100", "--at", "200", "400", "--out", "b", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[lines.index("| algorithm | seed | 200 | 400 |") + 2 :][:2] == ["| B | 1 | 6.00 | 8.00 |", ""]
    assert [r["algorithm"] for r in csv.DictReader(open(tmp_path / "b.csv"))] == ["B"] * 4
    cmd = [sys.executable, os.path.join(REPO, "experiments", "compare.py"), "--from-csv", "w.csv", "--only", "Z"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --only Z: no such algorithm in --from-csv w.csv"


def test_compare_errors(tmp_path):
    (tmp_path / "runs" / "Breakout__x__1__100").mkdir(parents=True)
    (tmp_path / "runs" / "Breakout__x__1__200").mkdir()
    cmd = [sys.executable, os.path.join(REPO, "experiments", "compare.py"), "--out", "o"]
    for flags, message in (
        (["--run", "X=runs/*__x__*"], "several runs with the same seed"),
        (["--run", "X=runs/nothing*"], "no run directory matches"),
        (["--run", "runs/*"], "expected LABEL=GLOB"),
        ([], "give runs"),
        (["--from-csv", "missing.csv"], "--from-csv missing.csv"),
        (["--from-csv", "runs"], "--from-csv runs"),
        (["--run", "X=runs/*__x__1__100", "--only", "A"], "--only selects algorithms of --from-csv rows"),
        (["--run", "X=runs/*__x__1__100", "--window", "-1"], "--window must be >= 0"),
        (["--run", "X=runs/*__x__1__100", "--at", "0"], "must be positive"),
        (["--run", "X=runs/*__x__1__100", "--markdown", "missing.md"], "needs the lines <!-- experiments/compare.py o -->"),
    ):
        proc = subprocess.run(cmd + flags, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_maze_seeds_from_curves(tmp_path):
    """experiments/maze_seeds.py on hand-made curves (n=5, epsilon=0.2: star-blind 4.803, 0.95 V* 7.610)."""
    curves = {("deepspi", 1): [2.0, 5.0, 7.7, 8.0], ("ppo", 1): [2.0, 4.9, 5.0, 4.85], ("ppo", 2): [3.0, 4.0, 4.5, 4.6]}
    lines = ["n,epsilon,algorithm,seed,global_step,init_value"]
    for (name, seed), values in curves.items():
        lines += [f"5,0.2,{name},{seed},{step},{v}" for step, v in zip([5000, 10000, 20000, 40000], values, strict=True)]
    (tmp_path / "curves.csv").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, os.path.join(REPO, "experiments", "maze_seeds.py"), "--from-curves", "curves.csv", "--n", "5"]
    begin, end = "<!-- experiments/maze_seeds.py m -->", "<!-- /experiments/maze_seeds.py m -->"
    (tmp_path / "README.md").write_text(f"top\n{begin}\nold\n{end}\nbottom\n")
    flags = ["--seeds", "1", "2", "--out", "m", "--markdown", "README.md"]
    proc = subprocess.run(cmd + flags, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["algorithm"], r["seed"]): r for r in read_rows(tmp_path / "m.csv")}
    assert set(rows) == {("DeepSPI", "1"), ("PPO", "1"), ("PPO", "2")}
    want = {  # steps to star-blind, to 0.95 V*, plateau at 10k, 20k, 40k, ends at star-blind, ends at >= 0.95 V*
        ("DeepSPI", "1"): ("10000", "20000", "True", "False", "False", "False", "True"),
        ("PPO", "1"): ("10000", "", "True", "True", "True", "True", "False"),
        ("PPO", "2"): ("", "", "True", "True", "True", "False", "False"),
    }
    keys = ["steps_to_star_blind", "steps_to_0.95_optimal", "plateau_at_10000", "plateau_at_20000", "plateau_at_40000"]
    for key, values in want.items():
        assert tuple(rows[key][k] for k in keys + ["ends_at_star_blind", "ends_at_0.95_optimal"]) == values, rows[key]
    assert float(rows["PPO", "1"]["final_value"]) == 4.85
    table = (tmp_path / "m.md").read_text()
    assert "PPO: 1/2 seeds (50%) end at the star-blind value" in table and "DeepSPI: 0/1 seeds (0%)" in table
    assert "| **PPO** | **mean (2 seeds)** | | **4.725 ± 0.125** | 10000 (1/2 seeds; the others never) | never |" in table
    assert (tmp_path / "m.png").stat().st_size > 1000
    # --markdown: the mean rows and the summary line of each setting, between the markers; the per-seed rows stay out
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith(f"top\n{begin}\n") and readme.endswith(f"\n{end}\nbottom\n") and "old" not in readme
    mean_rows = [line for line in table.splitlines() if line.startswith("| **")]
    assert len(mean_rows) == 2 and all(line in readme for line in mean_rows) and "| PPO | 2 |" not in readme
    assert "PPO: 1/2 seeds (50%) end at the star-blind value" in readme
    for flags, message in (
        (["--plateau-margin", "-1"], "--plateau-margin and --end-tolerance must be >= 0"),
        (["--at", "0"], "steps > 0"),
        (["--from-curves", "missing.csv"], "--from-curves missing.csv: no such file"),
    ):
        proc = subprocess.run(cmd[:2] + flags, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
    figure = [sys.executable, os.path.join(REPO, "experiments", "maze_figure.py"), "--jobs", "0"]
    proc = subprocess.run(figure, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--jobs must be >= 1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cleanrl_parity_bad_input(tmp_path):
    """experiments/cleanrl_parity.py needs a CleanRL file outside the repository (the check itself: docs/learning)."""
    (tmp_path / "other.py").write_text("print('no optimizer here')\n")
    cmd = [sys.executable, os.path.join(REPO, "experiments", "cleanrl_parity.py")]
    for flags, message in (
        (["--cleanrl", "missing.py"], "--cleanrl missing.py: no such file"),
        (["--cleanrl", "other.py"], "expected exactly one line 'optimizer = optim.Adam("),
        (["--cleanrl", "other.py", "--iterations", "0"], "--iterations must be >= 1"),
    ):
        proc = subprocess.run(cmd + flags, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)


def test_maze_seeds_takes_the_seeds_without_runs_from_its_committed_curves(tmp_path):
    """experiments/maze_seeds.py reading runs/: a seed with no run there comes from {out}_curves.csv, the file it wrote
    before (on a machine without the earlier runs), and the outputs are made from both."""
    lines = ["n,epsilon,algorithm,seed,global_step,init_value"]
    for name, seed, final in (("deepspi", 1, 8.0), ("deepspi", 2, 7.9), ("ppo", 1, 4.85), ("ppo", 3, 4.7)):
        lines += [f"5,0.2,{name},{seed},{step},{v}" for step, v in zip([5000, 10000], [2.0, final], strict=True)]
    lines[1:1] = ["10,0.2,ppo,1,5000,3.0"]  # another setting: kept as it is
    (tmp_path / "m_curves.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "runs").mkdir()
    cmd = [sys.executable, os.path.join(REPO, "experiments", "maze_seeds.py"), "--n", "5", "--seeds", "1", "2", "--out", "m"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "n=5 deepspi: seeds [1, 2] from m_curves.csv (no run of them in runs/)" in proc.stdout, proc.stdout
    assert "n=5 ppo: seeds [1, 3] from m_curves.csv" in proc.stdout, proc.stdout
    rows = {(r["algorithm"], r["seed"]): float(r["final_value"]) for r in read_rows(tmp_path / "m.csv")}
    assert rows == {("DeepSPI", "1"): 8.0, ("DeepSPI", "2"): 7.9, ("PPO", "1"): 4.85}  # seed 3 is not asked for
    assert (tmp_path / "m_curves.csv").read_text().splitlines() == lines  # rewritten: no seed, no setting lost
