"""deepspi_maze.py as a first-time user meets it (issue 29), through the real CLI: --help, the flags that are computed,
what a run prints (the start line, V* and the star-blind value, the done line, the minute line of --no-progress),
--resume of a finished run, of a run extended by --total-timesteps and of another script's checkpoint, and Ctrl-C
(during the start-up, once in training, twice). Tiny runs: the default maze (n = 5) with one batch of 8 envs x 8 steps."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, only_run_dir, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import deepspi_maze as M

SCRIPT = os.path.join(REPO, "deepspi_maze.py")
TINY = ["--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1"]
TIMEOUT = 600  # the 2-core test machine is shared with background training jobs
# a driver that is not part of the script: it patches torch or the clock, then runs deepspi_maze.py as `python` would
DRIVER = """
import os, runpy, signal, sys, time
import torch

if os.environ["FAULT"] == "startup-sigint":  # Ctrl-C while the optimizer is built: in the start-up, before the run folder
    adam_init = torch.optim.Adam.__init__

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the default action of SIGINT ends the process before this returns
        adam_init(self, *args, **kwargs)

    torch.optim.Adam.__init__ = interrupted
if os.environ["FAULT"] == "slow-flush":  # each iteration waits 10 s after logging: a second Ctrl-C lands inside one
    from torch.utils.tensorboard import SummaryWriter

    flush = SummaryWriter.flush

    def slow(self):
        flush(self)
        time.sleep(10)

    SummaryWriter.flush = slow
if os.environ["FAULT"] == "fast-clock":  # a clock 1000 times faster than the wall clock: a --no-progress line an iteration
    wall, start = time.time, time.time()
    time.time = lambda: start + 1000 * (wall() - start)
sys.argv = [os.environ["SCRIPT"], *sys.argv[1:]]
runpy.run_path(os.environ["SCRIPT"], run_name="__main__")
"""


def command(fault, cwd):
    """The command line and environment that run the script, through the driver if fault is set."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", FAULT=fault, SCRIPT=SCRIPT)
    if not fault:
        return [sys.executable, SCRIPT], env
    (cwd / "driver.py").write_text(DRIVER)
    return [sys.executable, str(cwd / "driver.py")], env


def run(*flags, cwd, fault=""):
    """The script through its real CLI (through the driver if fault is set), in cwd; the CompletedProcess."""
    script, env = command(fault, cwd)
    return subprocess.run([*script, *flags], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def start(*flags, cwd, fault=""):
    """The script in the background (through the driver if fault is set), its stderr in cwd/stderr.txt; returns the
    process and the start line it printed."""
    script, env = command(fault, cwd)
    with open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*script, *flags], cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("runs/") and " iterations of " in line, (line, (cwd / "stderr.txt").read_text())
    return proc, line


def wait_for(path, text, timeout=TIMEOUT):
    """Seconds until text appears in the file at path."""
    began = time.time()
    while text not in path.read_text():
        assert time.time() - began < timeout, f"{text!r} not in {path} after {timeout}s"
        time.sleep(0.02)
    return time.time() - began


def folder_state(run_dir):
    """{file name: (size, mtime in ns)} of a run folder."""
    return {
        name: (os.stat(os.path.join(run_dir, name)).st_size, os.stat(os.path.join(run_dir, name)).st_mtime_ns)
        for name in os.listdir(run_dir)
    }


def learning_rates(run_dir):
    """{global_step: charts/learning_rate} over the event files of run_dir."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("charts/learning_rate")}


@pytest.fixture(scope="module")
def quick_try(tmp_path_factory):
    """A run of the default maze (n = 5) for 200 steps, 3 iterations of 64 (not a multiple: 8 steps are left out), with
    --save-model; returns (folder, CompletedProcess). The tests copy the folder before they resume it."""
    cwd = tmp_path_factory.mktemp("quick_try")
    proc = run_script("deepspi_maze.py", *TINY, "--total-timesteps", "200", "--save-model", cwd=cwd, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def copy_of(quick_try, tmp_path):
    """A copy of the quick try's runs/ in tmp_path; the path of its checkpoint.pt, relative to tmp_path."""
    shutil.copytree(quick_try[0] / "runs", tmp_path / "runs")
    return os.path.relpath(only_run_dir(tmp_path), tmp_path) + "/checkpoint.pt"


def test_help_says_what_the_script_is_and_names_the_deepspi_flags():
    """--help's first text line says what the script is, the next paragraph names the maze's and DeepSPI's flags; --cuda
    and --total-timesteps say what they do; the computed fields are not listed."""
    proc = subprocess.run(
        [sys.executable, "deepspi_maze.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("usage: deepspi_maze.py")
    assert lines[1].startswith("DeepSPI (arXiv 2510.12312) on the confounding maze of its Fig. 3: PPO whose encoder")
    assert lines[2].startswith("The maze's flags: --n, --epsilon, --max-steps; DeepSPI's own: --reward-loss-coef,")
    text = " ".join(proc.stdout.split())  # the help's table wraps its lines
    assert "use CUDA when it is available (--no-cuda: the CPU)" in re.sub(r"[│ ]+", " ", text)
    assert "agent steps over all envs" in re.sub(r"[│ ]+", " ", text)
    assert "--batch-size" not in text and "--minibatch-size" not in text and "--num-iterations" not in text


@pytest.mark.parametrize("flag", ["--batch-size", "--minibatch-size", "--num-iterations"])
def test_computed_fields_are_unknown_flags(tmp_path, flag):
    """A computed field given as a flag is tyro's unknown-option error: exit 2, no traceback, no run folder."""
    proc = run(*TINY, "--total-timesteps", "64", flag, "5", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Unrecognized options" in proc.stderr and flag in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_quick_try_prints_what_it_runs_the_two_reference_values_and_the_final_value(quick_try):
    """stdout: the start line (the steps that run, and why not 200), V* and the best star-blind value of the default maze
    (the README's 8.010 and 4.803), and the done line naming the model and the last logged V^pi(s_I); stderr: nothing
    (no gamma*C note). The gamma*C fact is a row of the hyperparameters text; the checkpoint and the model record the
    script that wrote them."""
    cwd, proc = quick_try
    run_dir = only_run_dir(cwd)
    run_name = os.path.relpath(run_dir, cwd)
    v_star, v_blind = M.optimal_value(5, 0.2, 0.99), M.star_blind_value(5, 0.2, 0.99)
    assert (f"{v_star:.3f}", f"{v_blind:.3f}") == ("8.010", "4.803")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    final = acc.Scalars("charts/init_value")[-1]
    assert final.step == 192
    start_line, values, done = proc.stdout.splitlines()
    assert start_line == f"{run_name}: 3 iterations of 8 envs x 8 steps = 192 agent steps" + (
        " (--total-timesteps 200 is not a multiple of the batch 64)"
    )
    assert values == f"V* = {v_star:.3f}, best star-blind value = {v_blind:.3f}"
    assert re.fullmatch(rf"done: 192 steps in \d+s, {run_name}, model {run_name}/deepspi_maze.cleanrl_model, (.*)", done)
    assert done.endswith(f", final V^pi(s_I) = {final.value:.3f}")
    assert proc.stderr == ""
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "|gamma_C|1.089 (the paper's bound assumes < 1)|" in text.splitlines()
    for name in ["checkpoint.pt", "deepspi_maze.cleanrl_model"]:
        assert torch.load(os.path.join(run_dir, name), weights_only=False)["script"] == "deepspi_maze.py"


@pytest.mark.parametrize("total", [None, "128"], ids=["as-saved", "smaller"])
def test_resuming_a_finished_run_says_so_and_writes_nothing(quick_try, tmp_path, total):
    """--resume of a finished run (with its own --total-timesteps, or a smaller one): one line, exit 0, the run folder
    unchanged (no new events file, no file touched), nothing else created."""
    checkpoint = copy_of(quick_try, tmp_path)
    run_dir = os.path.dirname(tmp_path / checkpoint)
    before, listing = folder_state(run_dir), sorted(os.listdir(tmp_path))
    flags = ["--resume", checkpoint] + (["--total-timesteps", total] if total else [])
    proc = run(*flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_name = os.path.dirname(checkpoint)
    n = 3 if total is None else 2
    assert (
        proc.stdout
        == f"{run_name}: finished (3/{n} iterations, 192 agent steps); --total-timesteps larger than 192 extends it\n"
    )
    assert proc.stderr == ""
    assert folder_state(run_dir) == before and sorted(os.listdir(tmp_path)) == listing


def test_a_larger_total_timesteps_extends_the_run_with_the_learning_rate_annealed_over_the_new_total(quick_try, tmp_path):
    """--resume CKPT --total-timesteps 320 runs iterations 4 and 5 of 5 in the same folder: the checkpoint reads back
    global_step 320 and the new total; the learning rate of iterations 4 and 5 is lr (1 - (i-1)/5), those of 1-3 stay
    lr (1 - (i-1)/3)."""
    checkpoint = copy_of(quick_try, tmp_path)
    proc = run("--resume", checkpoint, "--total-timesteps", "320", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_name = os.path.dirname(checkpoint)
    assert proc.stdout.splitlines()[0] == f"resuming {run_name} after iteration 3/5, with new episodes"
    assert proc.stdout.splitlines()[-1].startswith("done: 320 steps in ")
    saved = torch.load(tmp_path / checkpoint, weights_only=False)
    assert (saved["iteration"], saved["global_step"], saved["args"]["total_timesteps"]) == (5, 320, 320)
    assert saved["args"]["num_iterations"] == 5 and saved["script"] == "deepspi_maze.py"
    lr = 2.5e-4
    expected = {64: lr, 128: lr * (1 - 1 / 3), 192: lr * (1 - 2 / 3), 256: lr * (1 - 3 / 5), 320: lr * (1 - 4 / 5)}
    assert learning_rates(tmp_path / run_name) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("script", ["deepspi_atari.py", None], ids=["another-script", "no-script-recorded"])
def test_resume_refuses_a_checkpoint_of_another_script_in_one_line(quick_try, tmp_path, script):
    """A checkpoint recorded as another script's, or recording none (older files): exit 2, one line naming the script
    that wrote it when known, no traceback, no run folder."""
    saved = torch.load(os.path.join(only_run_dir(quick_try[0]), "checkpoint.pt"), weights_only=False)
    saved.pop("script")
    if script:
        saved["script"] = script
    torch.save(saved, tmp_path / "other.pt")
    proc = run("--resume", "other.pt", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    by = f" (it was written by {script})" if script else ""
    assert proc.stderr == f"deepspi_maze.py: error: --resume: other.pt is not a checkpoint.pt of deepspi_maze.py{by}\n"
    assert not (tmp_path / "runs").exists()


def test_the_no_progress_line_carries_the_total_and_an_eta(tmp_path):
    """--no-progress, with a clock 1000 times faster (a minute line after each iteration): each line reads
    global_step=g/192 (p%), SPS=s, ETA hHmmm with p = 100 g / 192 rounded down and the ETA the steps left over SPS."""
    proc = run(*TINY, "--total-timesteps", "192", "--no-progress", cwd=tmp_path, fault="fast-clock")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pattern = r"global_step=(\d+)/192 \((\d+)%\), SPS=(\d+), ETA (\d+)h(\d\d)m, avg_episodic_return=\S+, V_init=-?\d+\.\d{3}"
    lines = [re.fullmatch(pattern, line) for line in proc.stdout.splitlines() if line.startswith("global_step=")]
    assert len(lines) == 3 and all(lines), proc.stdout
    for line, step in zip(lines, [64, 128, 192], strict=True):
        g, percent, sps, hours, minutes = (int(x) for x in line.groups())
        assert (g, percent) == (step, 100 * step // 192)
        assert 60 * hours + minutes == int((192 - g) / max(sps, 1)) // 60


def test_ctrl_c_during_the_start_up_ends_at_once_without_traceback_or_run_folder(tmp_path):
    """SIGINT while the optimizer is built (the start-up, envs and agent made): the process ends by the signal (the shell
    reports 130) at once, with no traceback, and leaves no runs/ folder."""
    began = time.time()
    proc = run(*TINY, "--total-timesteps", "64", cwd=tmp_path, fault="startup-sigint")
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stderr[-3000:])
    assert time.time() - began < 30 + 60  # not the driver's 30 s sleep plus the run
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_in_training_is_acknowledged_at_once_then_stops_after_the_iteration(tmp_path):
    """One SIGINT in training: the acknowledgement on stderr at once, then a checkpoint at the end of the iteration and
    exit 130, with the line that names the checkpoint; no traceback."""
    proc, line = start(
        *TINY, "--n", "2", "--total-timesteps", "64000", "--checkpoint-every", "0", "--no-progress", cwd=tmp_path
    )
    proc.send_signal(signal.SIGINT)
    waited = wait_for(tmp_path / "stderr.txt", "SIGINT: stopping after this iteration; Ctrl-C again to stop now")
    assert proc.wait(timeout=TIMEOUT) == 130
    assert waited < 10  # at once (the loop has no long C call), with room for a loaded machine
    saved = torch.load(tmp_path / line.split(":")[0] / "checkpoint.pt", weights_only=False)
    ack, stopped = (tmp_path / "stderr.txt").read_text().splitlines()
    assert ack == "SIGINT: stopping after this iteration; Ctrl-C again to stop now"
    assert stopped == f"SIGINT after iteration {saved['iteration']}: resume from {line.split(':')[0]}/checkpoint.pt"


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """A second SIGINT, sent once the first was acknowledged, inside an iteration (each waits 10 s after logging, so it
    cannot end first): exit 130 at once with the line naming the checkpoint kept, the last one written (iteration >= 1,
    a whole file), no traceback."""
    flags = [*TINY, "--n", "2", "--total-timesteps", "64000", "--checkpoint-every", "1", "--no-progress"]
    proc, line = start(*flags, cwd=tmp_path, fault="slow-flush")
    checkpoint = tmp_path / line.split(":")[0] / "checkpoint.pt"
    while not checkpoint.exists():
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    wait_for(tmp_path / "stderr.txt", "Ctrl-C again to stop now")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=8) == 130  # before the iteration could end
    ack, stopped = (tmp_path / "stderr.txt").read_text().splitlines()
    assert ack == "SIGINT: stopping after this iteration; Ctrl-C again to stop now"
    assert stopped == f"stopped now: resume from {line.split(':')[0]}/checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["iteration"] >= 1
