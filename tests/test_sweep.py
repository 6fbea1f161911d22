"""experiments/sweep.py through its real CLI, on tiny deepspi_maze.py runs in a temporary folder: the commands it lists,
the runs it trains, skips and resumes, its tables against the runs' TensorBoard files, and bad input."""

import csv
import glob
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, error_lines, read_scalars

import deepspi_maze

SWEEP = os.path.join(REPO, "experiments", "sweep.py")
BASE = "--base=--num-envs 8 --num-steps 8 --total-timesteps 256 --checkpoint-every 1"  # 4 iterations of 64 steps
GRID = [BASE, "--algo", "deepspi=", "--grid", "clip-coef=0.1,0.3"]
ITERATIONS, BATCH = 4, 64
LONG = 12  # iterations of the run that is cut: time enough to ask a second sweep, then signal it, after its first checkpoint


def sweep(*flags, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SWEEP, *flags], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def listed(stdout):
    """{(clip_coef, seed): exp_name} of the commands the sweep lists (before it trains, or alone with --dry-run)."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("python "):
            words = line.split()
            found[words[words.index("--clip-coef") + 1], int(words[words.index("--seed") + 1])] = words[
                words.index("--exp-name") + 1
            ]
    return found


def run_dirs(cwd, exp_name, seed):
    return sorted(glob.glob(os.path.join(str(cwd), "runs", f"*__{exp_name}__{seed}__*")))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2-cell grid (clip-coef 0.1 and 0.3, seed 1), trained, then asked for again."""
    cwd = tmp_path_factory.mktemp("sweep")
    first = sweep(*GRID, "--out", "out/t", cwd=cwd)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    names = listed(first.stdout)
    assert sorted(names) == [("0.1", 1), ("0.3", 1)]
    second = sweep(*GRID, "--out", "out/t", cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd, names, first.stdout, second.stdout


def test_runs_the_grid_and_skips_finished_runs(swept):
    cwd, names, first, second = swept
    assert first.count("] start deepspi clip-coef=") == 2
    for (clip, seed), exp_name in names.items():
        (run_dir,) = run_dirs(cwd, exp_name, seed)
        assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["iteration"] == ITERATIONS
        assert f"# finished: deepspi clip-coef={clip} seed 1: runs/{os.path.basename(run_dir)}" in second
    assert "start" not in second and "resume" not in second
    assert len(glob.glob(str(cwd / "runs" / "*__*"))) == 2


def test_tables_hold_the_event_files_numbers(swept):
    """Each CSV row against the run's TensorBoard scalars (read by tests/conftest.py); the markdown row of each cell."""
    cwd, names, _, _ = swept
    rows = {row["cell"]: row for row in csv.DictReader(open(cwd / "out" / "t.csv"))}
    assert sorted(rows) == ["deepspi clip-coef=0.1", "deepspi clip-coef=0.3"]
    table = (cwd / "out" / "t.md").read_text()
    for (clip, seed), exp_name in names.items():
        row = rows[f"deepspi clip-coef={clip}"]
        (run_dir,) = run_dirs(cwd, exp_name, seed)
        s = read_scalars(run_dir)
        value, blind = s["charts/init_value"], s["charts/star_blind_value"][0]
        assert len(value) == ITERATIONS and int(row["seed"]) == 1 and int(row["steps"]) == ITERATIONS * BATCH
        assert float(row["final_value"]) == value[-1] and float(row["star_blind_value"]) == blind
        left = [BATCH * (k + 1) for k, v in enumerate(value) if v >= blind + 0.5]
        assert row["steps_to_leave_plateau"] == (str(left[0]) if left else "")
        assert float(row["final_repr_dist_normalized"]) == s["charts/repr_dist_normalized"][-1]
        assert float(row["sir_mean"]) == float(np.mean(s["charts/sir"])) and float(row["sir_max"]) == max(s["charts/sir"])
        assert float(row["inv_gamma"]) == 1 / 0.99
        assert float(row["final_transition_loss"]) == s["losses/transition_loss"][-1]
        assert float(row["final_reward_loss"]) == s["losses/reward_loss"][-1]
        # the training time: positive, and within the run's lifetime (its start stamp, in whole seconds, to its checkpoint)
        lifetime = os.path.getmtime(os.path.join(run_dir, "checkpoint.pt")) - int(run_dir.rsplit("__", 1)[1].split("_")[0])
        assert 0 < float(row["wall_s"]) <= lifetime + 1
        line = next(line for line in table.splitlines() if line.startswith(f"| deepspi clip-coef={clip} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:5] == ["5", "1 of 1 (1)", str(ITERATIONS * BATCH), f"{value[-1]:.3f}"]  # one seed: its value, no ± 0
        assert cells[5] == f"{len(left[:1])}/1"
    # which code made the table: these runs used the default, deduplicated world-model update
    assert "Code: deepspi_maze.py with the deduplicated update (--dedup-obs" in table
    assert os.path.getsize(cwd / "out" / "t.png") > 0


def test_from_curves_remakes_the_same_csv(swept):
    cwd, _, _, _ = swept
    proc = sweep("--from-curves", "out/t_curves.csv", "--out", "out/again", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cwd / "out" / "again.csv").read_text() == (cwd / "out" / "t.csv").read_text()


def test_committed_curves_count_as_finished_on_a_machine_without_runs(swept, tmp_path):
    """A fresh clone has the committed {out}_curves.csv and no runs/: the sweep trains only what that CSV lacks (here the
    new seed 2), and its tables hold the committed seed's numbers; a curve that stops short of the run's last step (a
    run cut before the CSV was written) is trained again."""
    cwd, _, _, _ = swept
    os.makedirs(tmp_path / "out")
    rows = list(csv.reader(open(cwd / "out" / "t_curves.csv")))
    header, body = rows[0], rows[1:]
    step = header.index("global_step")
    short = [r for r in body if not (r[0] == "deepspi clip-coef=0.3" and int(r[step]) == ITERATIONS * BATCH)]
    with open(tmp_path / "out" / "t_curves.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + short)
    dry = sweep(*GRID, "--seeds", "1", "2", "--out", "out/t", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "# finished: deepspi clip-coef=0.1 seed 1: its whole run is in out/t_curves.csv" in dry.stdout
    assert sorted(listed(dry.stdout)) == [("0.1", 2), ("0.3", 1), ("0.3", 2)]
    assert not os.path.exists(tmp_path / "runs")
    with open(tmp_path / "out" / "t_curves.csv", "w", newline="") as f:  # the whole curves again: seed 1 is finished
        csv.writer(f).writerows(rows)
    proc = sweep(*GRID, "--seeds", "1", "2", "--out", "out/t", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(listed(proc.stdout)) == [("0.1", 2), ("0.3", 2)]
    assert proc.stdout.count("] start deepspi clip-coef=") == 2
    old = {(r["cell"], r["seed"]): r for r in csv.DictReader(open(cwd / "out" / "t.csv"))}
    new = {(r["cell"], r["seed"]): r for r in csv.DictReader(open(tmp_path / "out" / "t.csv"))}
    assert sorted(new) == sorted([*old, ("deepspi clip-coef=0.1", "2"), ("deepspi clip-coef=0.3", "2")])
    assert all(new[key] == old[key] for key in old)  # the committed seed's row, unchanged
    curves = list(csv.reader(open(tmp_path / "out" / "t_curves.csv")))
    assert [r for r in curves if r[header.index("seed")] == "1"] == body


def test_cut_run_is_resumed_not_restarted(tmp_path):
    """A second sweep leaves the run in training alone; SIGTERM to the sweep after its run's first checkpoint: the run
    checkpoints and stops; the next sweep resumes it (--resume), in the same run directory, which ends with each
    iteration logged once."""
    flags = [BASE.replace("256", str(LONG * BATCH)), "--algo", "deepspi=", "--grid", "clip-coef=0.1", "--seeds", "2"]
    dry = sweep(*flags, "--dry-run", cwd=tmp_path)
    (exp_name,) = listed(dry.stdout).values()
    assert dry.returncode == 0 and not os.path.exists(tmp_path / "runs")  # listed, not run
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, SWEEP, *flags], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs" / f"*__{exp_name}__2__*" / "checkpoint.pt")):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its run's first checkpoint"
        time.sleep(0.02)
    meanwhile = sweep(*flags, "--dry-run", cwd=tmp_path)
    assert (
        "# training now, left alone: deepspi clip-coef=0.1 seed 2" in meanwhile.stdout and "--resume" not in meanwhile.stdout
    )
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    (run_dir,) = run_dirs(tmp_path, exp_name, 2)
    cut = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["iteration"]
    assert 1 <= cut < LONG, "the run ended before the signal (make it longer)"
    resumed = sweep(*flags, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"# cut after iteration {cut}/{LONG}" in resumed.stdout and "] resume deepspi clip-coef=0.1 seed 2" in resumed.stdout
    )
    assert f"--resume runs/{os.path.basename(run_dir)}/checkpoint.pt --no-progress" in resumed.stdout
    assert run_dirs(tmp_path, exp_name, 2) == [run_dir]
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 2  # the cut process's and the resumed one's
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["iteration"] == LONG
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("charts/init_value")] == [BATCH * k for k in range(1, LONG + 1)]


def test_plateau_steps_of_a_maze_seeds_curves_csv(tmp_path):
    """--from-curves on the committed 10-seed curves: each seed's steps to leave the plateau and final value, computed
    here from the CSV and the maze's exact star-blind value."""
    source = os.path.join(REPO, "docs", "learning", "maze_10seeds_curves.csv")
    proc = sweep("--from-curves", source, "--out", "t", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = {}
    for r in csv.DictReader(open(source)):
        curves.setdefault((int(r["n"]), r["algorithm"], int(r["seed"])), []).append(
            (int(r["global_step"]), float(r["init_value"]))
        )
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(rows) == len(curves) >= 20  # every seed of the file (PPO: 10 at n = 5 and 10; DeepSPI: those re-run)
    for row in rows:
        n, seed = int(row["n"]), int(row["seed"])
        algorithm = "deepspi" if row["cell"].startswith("DeepSPI") else "ppo"
        curve = curves[n, algorithm, seed]
        level = deepspi_maze.star_blind_value(n, 0.2, 0.99) + 0.5
        left = [step for step, v in curve if v >= level]
        assert row["steps_to_leave_plateau"] == (str(left[0]) if left else "")
        assert float(row["final_value"]) == curve[-1][1] and math.isnan(float(row["sir_max"] or "nan"))
    assert any(row["steps_to_leave_plateau"] for row in rows) and any(not row["steps_to_leave_plateau"] for row in rows)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grid", "clip-coef"], "expected FLAG=V1,V2"),
        (["--grid", "no-such-flag=1"], "has no flag --no-such-flag"),
        (["--grid", "clip-coef=1.5"], "--clip-coef 1.5 must be in (0, 1)"),
        (["--base=--seed 3"], "the sweep sets --seed itself"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--report-only"], "no finished run of this grid"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, flags, message):
    proc = sweep(*flags, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_committed_atari_csv_counts_only_whole_runs(tmp_path):
    """The Atari scripts' committed {out}.csv (experiments/compare.py's windows, the last one ending at the run's last
    step): a run whose rows reach its last step counts as finished, one that stops short does not."""
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import compare
    import sweep as sweep_module
    import tyro

    out = str(tmp_path / "b")
    flags = ["--script", "deepspi_atari.py", "--base=--num-envs 8 --num-steps 128 --total-timesteps 3072"]
    args = tyro.cli(sweep_module.Args, args=flags + ["--grid", "clip-coef=0.1,0.2", "--seeds", "1", "2", "--out", out])
    tasks, parsed = sweep_module.make_tasks(args)
    columns = [compare.column_name(t) for t in sweep_module.ATARI_TAGS]
    rows = []
    for label, seed, last in [("deepspi-atari clip-coef=0.1", 1, 3072), ("deepspi-atari clip-coef=0.2", 1, 2048)]:
        rows += [
            {"algorithm": label, "seed": seed, "global_step": step} | dict.fromkeys(columns, 1.0) for step in (1024, last)
        ]
    compare.write_csv(out + ".csv", columns, rows)
    committed = sweep_module.committed_runs(args, tasks, parsed)
    assert sorted(committed) == [("deepspi-atari clip-coef=0.1", 1)]
    assert [r["global_step"] for r in committed[("deepspi-atari clip-coef=0.1", 1)]] == [1024, 3072]


def test_atari_runs_table_counts_the_finished_runs_and_keeps_their_wall_times(tmp_path, monkeypatch):
    """The Atari report's run list: "k of N finished", each run's training time from its TensorBoard files when runs/
    has it, else from {out}_runs.csv, which the report rewrites so that a machine without runs/ keeps every time."""
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import sweep as sweep_module
    import tyro

    out = str(tmp_path / "b")
    flags = ["--script", "deepspi_atari.py", "--base=--num-envs 8 --num-steps 128 --total-timesteps 3072"]
    args = tyro.cli(sweep_module.Args, args=flags + ["--grid", "clip-coef=0.1,0.2", "--seeds", "1", "2", "--out", out])
    tasks, _ = sweep_module.make_tasks(args)
    a, b = "deepspi-atari clip-coef=0.1", "deepspi-atari clip-coef=0.2"
    (tmp_path / "b_runs.csv").write_text(f"cell,seed,wall_s\n{a},1,55.0\n")  # a committed run, timed on another machine
    monkeypatch.setattr(sweep_module.compare, "wall_seconds", lambda run_dir: {"runs/x": 123.4}[run_dir])
    b1 = next(t for t in tasks if (t.label, t.seed) == (b, 1))
    lines = sweep_module.atari_runs(args, tasks, [(b1, "runs/x", None)], {(a, 1): []})
    assert lines[0].startswith("**Runs**: 2 of 4 finished;")
    assert lines[4:8] == [f"| {a} | 1 | yes | 55 |", f"| {a} | 2 | not yet | – |", f"| {b} | 1 | yes | 123 |"] + [
        f"| {b} | 2 | not yet | – |"
    ]
    # a new machine: no runs/, both runs in the committed CSVs; the times come from b_runs.csv
    lines = sweep_module.atari_runs(args, tasks, [], {(a, 1): [], (b, 1): []})
    assert lines[4] == f"| {a} | 1 | yes | 55 |" and lines[6] == f"| {b} | 1 | yes | 123 |"


def test_two_sweeps_of_one_grid_train_each_run_once(tmp_path):
    """Two queue lanes sweeping the same grid: the second leaves the first's run alone, and neither starts a run that the
    other took after it listed its work (each run once, in one run directory), and both end with exit code 0."""
    flags = [BASE.replace("256", str(LONG * BATCH)), "--algo", "deepspi=", "--grid", "clip-coef=0.1", "--seeds", "1", "2", "3"]
    names = listed(sweep(*flags, "--dry-run", cwd=tmp_path).stdout)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, SWEEP, *flags], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs" / "sweep_logs" / f"{names['0.1', 1]}__1.pid")):
        assert first.poll() is None and time.time() < deadline, "the first sweep ended before it started seed 1"
        time.sleep(0.02)
    second = subprocess.Popen([sys.executable, SWEEP, *flags], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=env)
    outs = [process.communicate(timeout=600)[0] for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    assert "# training now, left alone: deepspi clip-coef=0.1 seed 1" in outs[1], outs[1]
    assert "# taken by another sweep since: deepspi clip-coef=0.1 seed 2" in outs[0], outs[0]  # the second one took it
    for seed in (1, 2, 3):
        assert len(run_dirs(tmp_path, names["0.1", seed], seed)) == 1, (seed, outs)
    assert not glob.glob(str(tmp_path / "runs" / "sweep_logs" / "*.pid"))


CARRY = os.path.join(REPO, "experiments", "carry.py")


def carry(*args, cwd):
    return subprocess.run([sys.executable, CARRY, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_cut_run_carried_to_a_machine_without_runs_goes_on_as_at_home(tmp_path):
    """A run cut by SIGTERM (trained with --threads 2: its process sees OMP_NUM_THREADS=2), carried by experiments/carry.py
    to a folder without runs/ (a new machine), goes on there from its checkpoint: the resumed run ends with the same
    weights, bit for bit, as the same run resumed where it was cut, and its curve holds every iteration once."""
    home, away, carried = tmp_path / "home", tmp_path / "away", str(tmp_path / "carried")
    home.mkdir()
    away.mkdir()
    flags = [BASE.replace("256", str(LONG * BATCH)), "--algo", "deepspi=", "--grid", "clip-coef=0.1", "--seeds", "3"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, SWEEP, *flags, "--threads", "2"], cwd=home, stdout=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 120
    while not glob.glob(str(home / "runs" / "*" / "checkpoint.pt")):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its run's first checkpoint"
        time.sleep(0.02)
    (pid_path,) = glob.glob(str(home / "runs" / "sweep_logs" / "*.pid"))
    environ = open(f"/proc/{int(open(pid_path).read())}/environ", "rb").read().split(b"\0")
    assert b"OMP_NUM_THREADS=2" in environ
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    (run_dir,) = glob.glob(str(home / "runs" / "*__3__*"))
    name = os.path.basename(run_dir)
    cut = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["iteration"]
    assert 1 <= cut < LONG, "the run ended before the signal (make it longer)"

    saved = carry("save", f"runs/{name}", "--carried", carried, cwd=home)
    assert saved.returncode == 0 and f"carried {name}: iteration {cut}/{LONG}" in saved.stdout, saved.stderr
    restored = carry("restore", "runs", "--carried", carried, cwd=away)
    assert restored.returncode == 0 and f"restored runs/{name}: iteration {cut}/{LONG}" in restored.stdout, restored.stderr
    again = carry("restore", "runs", "--carried", carried, cwd=away)
    assert f"kept runs/{name}: iteration {cut}/{LONG}" in again.stdout  # the same run here already: left alone
    for cwd in (home, away):
        resumed = sweep(*flags, cwd=cwd)
        assert resumed.returncode == 0 and f"# cut after iteration {cut}/{LONG}" in resumed.stdout, resumed.stderr[-3000:]
    weights = [torch.load(cwd / "runs" / name / "checkpoint.pt", weights_only=False)["model"] for cwd in (home, away)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(away / "runs" / name), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("charts/init_value")] == [BATCH * k for k in range(1, LONG + 1)]
    done = carry("restore", "runs", "--carried", carried, cwd=away)
    assert f"finished here ({LONG}/{LONG}): {name}; once its curve is committed: git rm -r" in done.stdout
    finished = carry("save", f"runs/{name}", "--carried", carried, cwd=away)
    assert finished.returncode == 2 and finished.stderr.splitlines() == [
        f"error: runs/{name}: finished ({LONG}/{LONG} iterations): commit its curve with the sweep instead"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["save", "runs"], "runs: no readable checkpoint.pt (a run folder of runs/ is expected)"),
        (["restore", "a", "b"], "restore takes one runs/ folder, not 2"),
        (["move", "runs"], "argument action: invalid choice: 'move'"),
    ],
)
def test_carry_bad_input_one_line_exit_2(tmp_path, args, message):
    (tmp_path / "runs").mkdir()
    proc = carry(*args, "--carried", str(tmp_path / "carried"), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {message}") and proc.stdout == "" and not os.path.exists(tmp_path / "carried")


@pytest.mark.parametrize(
    "script, loss_tag", [("deepspi_atari.py", "losses/transition_loss"), ("dreamspi_atari.py", "repr_wm/transition_loss")]
)
def test_atari_report_reads_each_scripts_transition_loss(tmp_path, monkeypatch, script, loss_tag):
    """The Atari report's transition_loss_mean column comes from the tag the script logs: DreamSPI logs its world model's
    losses under repr_wm/, DeepSPI under losses/. Runs of TensorBoard files written here, reported through atari_report."""
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import sweep as sweep_module
    import tyro
    from torch.utils.tensorboard import SummaryWriter

    out = str(tmp_path / "r")
    flags = ["--script", script, "--base=--num-envs 8 --num-steps 128 --total-timesteps 2048", "--seeds", "1", "--out", out]
    args = tyro.cli(sweep_module.Args, args=flags + ["--window", "1024"])
    tasks, _ = sweep_module.make_tasks(args)
    run_dir = tmp_path / "run"
    writer = SummaryWriter(str(run_dir))
    for step, value in [(1024, 3.0), (2048, 5.0)]:
        writer.add_scalar("charts/episodic_return", 1.0, step)
        writer.add_scalar("charts/sir", 1.25, step)
        writer.add_scalar(loss_tag, value, step)
    writer.close()
    monkeypatch.setattr(sweep_module.compare, "plot", lambda *a, **k: None)
    sweep_module.atari_report(args, [(tasks[0], str(run_dir), None)], "cmd", {}, tasks)
    with open(out + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["global_step"], r["transition_loss_mean"]) for r in rows] == [("1024", "3.0"), ("2048", "5.0")]
    assert "Not logged by" not in open(out + ".md").read()
