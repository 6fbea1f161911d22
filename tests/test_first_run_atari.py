"""The first run explains itself (issue 29), through the real CLI of the three Atari scripts (deepspi_atari.py,
dreamspi_atari.py and deepspi_atari_multigpu.py as one process): --help, computed fields that are not flags, the start,
minute and done lines, the gamma * C row of the hyperparameters, a resume that refuses another script's file, says
that a run is finished and extends a run, and Ctrl-C during the start-up, once and twice. Breakout, gymnasium backend,
runs of 2 iterations of 2 envs x 8 steps."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, only_run_dir, read_scalars, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPTS = ["deepspi_atari.py", "dreamspi_atari.py", "deepspi_atari_multigpu.py"]
# 2 iterations of 2 envs x 8 steps: --total-timesteps 40 is not a multiple of the batch of 16; a checkpoint every iteration
TINY = ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "8", "--total-timesteps", "40"]
TINY += ["--num-minibatches", "2", "--update-epochs", "1", "--checkpoint-every", "1"]
# the learning rates of each script: {TensorBoard tag: the rate at iteration 1}
RATES = {
    "deepspi_atari.py": {"charts/learning_rate": 2.5e-4},
    "dreamspi_atari.py": {f"charts/{g}_learning_rate": r for g, r in [("encoder", 2e-4), ("world_model", 2e-4)]},
    "deepspi_atari_multigpu.py": {"charts/learning_rate": 2.5e-4},
}
RATES["dreamspi_atari.py"].update({"charts/actor_learning_rate": 2.75e-5, "charts/critic_learning_rate": 2.75e-5})
# patches that are not part of the scripts, then the script runs as `python` would run it
DRIVER = """
import os, runpy, sys, time
import gymnasium as gym
import torch

patch = os.environ["PATCH"]
if patch == "slow-envs":  # the start-up: building an env takes a minute
    make = gym.make

    def slow_make(*args, **kwargs):
        print("building the envs", flush=True)
        time.sleep(60)
        return make(*args, **kwargs)

    gym.make = slow_make
if patch == "envpool":  # says when envpool's C++ set-up starts
    import envpool

    envpool_make = envpool.make

    def announced(*args, **kwargs):
        print("building the envs", flush=True)
        return envpool_make(*args, **kwargs)

    envpool.make = announced
if patch == "slow-steps":  # an optimizer step takes 1.5 s: a signal sent just after a checkpoint lands in the next iteration
    adam_step = torch.optim.Adam.step

    def slow_step(self, *args, **kwargs):
        time.sleep(1.5)
        return adam_step(self, *args, **kwargs)

    torch.optim.Adam.step = slow_step
if patch == "fast-clock":  # each reading of the clock is 61 s later than the last: a --no-progress line every iteration
    clock, readings = time.time, [0]

    def fast_clock():
        readings[0] += 1
        return clock() + 61 * readings[0]

    time.time = fast_clock
sys.argv = [os.environ["SCRIPT"], *sys.argv[1:]]
runpy.run_path(os.environ["SCRIPT"], run_name="__main__")
"""


def flags(script, *more):
    return [*TINY, *(["--imagination-horizon", "1"] if script == "dreamspi_atari.py" else []), *more]


def driven(script, patch, *args, cwd):
    """Start `script *args` through DRIVER with one patch, in the background; stdout and stderr go to files in cwd."""
    (cwd / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=os.path.join(REPO, script), PATCH=patch)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        cmd = [sys.executable, str(cwd / "driver.py"), "--no-progress", *args]
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)


def wait_until(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended too early: {(proc.args, proc.returncode)}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def snapshot(folder):
    """{path: (size, mtime)} of every file under folder."""
    files = glob.glob(os.path.join(str(folder), "**"), recursive=True)
    return {f: (os.path.getsize(f), os.path.getmtime(f)) for f in files if os.path.isfile(f)}


def hyperparameters(run_dir):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    return dict(line.strip("|").split("|", 1) for line in text.splitlines()[2:])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(script): (cwd, run folder, CompletedProcess) of a 2-iteration run of script with --save-model, made once."""
    done = {}

    def run(script):
        if script not in done:
            cwd = tmp_path_factory.mktemp(script[:-3])
            proc = run_script(script, *flags(script, "--save-model"), cwd=cwd, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[script] = cwd, only_run_dir(cwd), proc
        return done[script]

    return run


# ------------------------------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_first_what_the_script_is_and_names_its_own_flags(tmp_path, script):
    env = dict(os.environ, COLUMNS="300")  # no wrapped help lines
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    algorithm = "DreamSPI" if script == "dreamspi_atari.py" else "DeepSPI"
    assert lines[0].startswith("usage:") and lines[1].startswith(f"{algorithm} on Atari (arXiv 2510.12312): "), lines[:3]
    assert lines[2].startswith(f"{algorithm}'s own flags: "), lines[:3]
    assert "--reward-loss-coef, --transition-loss-coef" in proc.stdout
    assert re.search(r"--cuda, --no-cuda +use CUDA when it is available \(--no-cuda: the CPU\)", proc.stdout)
    assert "total agent steps, over all envs (an agent step is 4 emulator frames)" in proc.stdout
    assert "a larger" in proc.stdout and "--total-timesteps extends it" in proc.stdout  # --resume's help
    for computed in ("--batch-size", "--minibatch-size", "--num-iterations", "--imagination-batch-size", "--gamma-c"):
        assert computed not in proc.stdout.lower()


# --------------------------------------------------------------------------------------------- computed fields, no flags
@pytest.mark.parametrize(
    "script, flag",
    [
        ("deepspi_atari.py", "--batch-size"),
        ("deepspi_atari.py", "--minibatch-size"),
        ("deepspi_atari.py", "--num-iterations"),
        ("dreamspi_atari.py", "--imagination-batch-size"),
        ("deepspi_atari_multigpu.py", "--batch-size"),
    ],
)
def test_computed_fields_are_unknown_flags(tmp_path, script, flag):
    proc = run_script(script, *flags(script, flag, "5"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"Unrecognized options: {flag}, 5" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- what a default run prints
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_says_what_it_runs_and_where_its_model_is(tiny, script):
    """The start line says that 40 is not a multiple of the batch and what runs instead; no gamma * C note on stderr, the
    value is a row of the hyperparameters; the done line names the model; checkpoint and model record the script."""
    cwd, run_dir, proc = tiny(script)
    name = os.path.basename(run_dir)
    lines = proc.stdout.splitlines()
    start = f"runs/{name}: 2 iterations of 2 envs x 8 steps = 32 agent steps"
    assert lines[0] == f"{start} (--total-timesteps 40 is not a multiple of the batch 16)", lines
    model = f"runs/{name}/{script[:-3]}.cleanrl_model"
    assert re.fullmatch(rf"done: 32 steps in \d+s, runs/{name}, model {model}", lines[-1]), lines
    assert "gamma" not in proc.stderr and "note" not in proc.stderr, proc.stderr
    assert hyperparameters(run_dir)["gamma_C"] == "1.089 (the paper's bound assumes < 1)"
    for path in (f"{run_dir}/checkpoint.pt", cwd / model):
        assert torch.load(path, map_location="cpu", weights_only=False)["script"] == script


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_progress_line_has_the_total_and_an_eta(tmp_path, script):
    """With a clock that jumps 61 s a reading, each iteration prints its --no-progress line: the steps of the whole run,
    the percentage, SPS, and ETA = the remaining steps / SPS."""
    proc = driven(script, "fast-clock", *flags(script, "--total-timesteps", "32"), cwd=tmp_path)
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    pattern = r"global_step=(\d+)/32 \((\d+)%\), SPS=(\d+), ETA (\d+)h(\d\d)m, avg_episodic_return=(n/a|-?[\d.]+)"
    found = [re.fullmatch(pattern, line) for line in (tmp_path / "stdout.txt").read_text().splitlines()]
    found = [m.groups() for m in found if m]
    assert [(g, pct) for g, pct, *_ in found] == [("16", "50"), ("32", "100")], found
    for g, _, sps, hours, minutes, _ in found:
        eta = (32 - int(g)) // max(int(sps), 1)
        assert (int(hours), int(minutes)) == (eta // 3600, eta // 60 % 60)


# ------------------------------------------------------------------------------------------------------------- --resume
@pytest.mark.parametrize("resumer", SCRIPTS)
def test_resume_refuses_another_scripts_checkpoint_before_building_anything(tmp_path, tiny, resumer):
    """Each other script's checkpoint, this script's saved model and a checkpoint that records no script: one line, exit
    2, no env built (no ALE banner), no folder made, nothing touched in the other run's folder."""
    cases = [(f"{tiny(w)[1]}/checkpoint.pt", f" (it was written by {w})") for w in SCRIPTS if w != resumer]
    old = torch.load(f"{tiny(resumer)[1]}/checkpoint.pt", map_location="cpu", weights_only=False)
    del old["script"]  # as the checkpoints written before the scripts recorded themselves
    torch.save(old, tmp_path / "old.pt")
    cases.append((str(tmp_path / "old.pt"), ""))
    cases.append((glob.glob(os.path.join(tiny(resumer)[1], "*.cleanrl_model"))[0], ""))  # a saved model, not a checkpoint
    for path, by in cases:
        before = snapshot(os.path.dirname(path))
        proc = run_script(resumer, "--resume", path, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "A.L.E" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines() == [f"{resumer}: error: --resume: {path} is not a checkpoint.pt of {resumer}{by}"]
        assert snapshot(os.path.dirname(path)) == before
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_finished_run_resumed_says_so_and_writes_nothing(tiny, script):
    cwd, run_dir, _ = tiny(script)
    before = snapshot(cwd)
    proc = run_script(script, "--resume", f"{run_dir}/checkpoint.pt", cwd=cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "A.L.E" not in proc.stderr, proc.stderr
    name = os.path.basename(run_dir)
    finished = "finished (2/2 iterations, 32 agent steps); --total-timesteps larger than 32 extends it"
    assert proc.stdout.splitlines() == [f"runs/{name}: {finished}"]
    assert snapshot(cwd) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_larger_total_timesteps_extends_the_run(tmp_path, tiny, script):
    """The run of 2 iterations, resumed with --total-timesteps 64, runs iterations 3 and 4 in its folder and saves its
    model again, as the run it resumes did (--save-model); each learning rate goes on as if the run had been started
    with 64 (frac = 1 - (i - 1)/4), the first two keep theirs (1, 1 - 1/2)."""
    shutil.copytree(tiny(script)[0] / "runs", tmp_path / "runs")
    run_dir = only_run_dir(tmp_path)
    proc = run_script(script, "--resume", f"{run_dir}/checkpoint.pt", "--total-timesteps", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = os.path.basename(run_dir)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"resuming runs/{name} after iteration 2/4, with new games", lines
    model = f"runs/{name}/{script.replace('.py', '.cleanrl_model')}"
    assert re.fullmatch(rf"done: 64 steps in \d+s, runs/{name}, model {model}", lines[-1]), lines
    saved = torch.load(f"{run_dir}/checkpoint.pt", map_location="cpu", weights_only=False)
    assert (saved["iteration"], saved["global_step"], saved["args"]["total_timesteps"]) == (4, 64, 64)
    scalars = read_scalars(run_dir)
    for tag, rate in RATES[script].items():
        expected = [np.float32(rate * frac) for frac in (1.0, 0.5, 0.5, 0.25)]
        assert [np.float32(x) for x in scalars[tag]] == expected, (tag, scalars[tag])


# ------------------------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_during_the_start_up_exits_at_once_and_leaves_no_run_folder(tmp_path, script):
    proc = driven(script, "slow-envs", *flags(script), cwd=tmp_path)
    wait_until(lambda: "building the envs" in (tmp_path / "stdout.txt").read_text(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == -signal.SIGINT  # killed by SIGINT: the shell says 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_inside_envpools_set_up_exits_at_once(tmp_path):
    """64 envpool envs take seconds to build, in C++; a Ctrl-C half a second in ends the process within seconds."""
    args = ["--env-backend", "envpool", "--num-envs", "64", "--total-timesteps", "512"]
    proc = driven("deepspi_atari.py", "envpool", *args, cwd=tmp_path)
    wait_until(lambda: "building the envs" in (tmp_path / "stdout.txt").read_text(), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == -signal.SIGINT
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not (tmp_path / "runs").exists()


def start_training(script, cwd):
    """A run of 20 iterations with slow optimizer steps, from the moment iteration 1's checkpoint exists."""
    proc = driven(script, "slow-steps", *flags(script, "--total-timesteps", "320"), cwd=cwd)
    wait_until(lambda: glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt")), proc, timeout=600)
    return proc, only_run_dir(cwd)


def wait_for_line(path, line, proc, timeout):
    wait_until(lambda: line in path.read_text().splitlines(), proc, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_is_acknowledged_at_once_then_stops_after_the_iteration_with_a_checkpoint(tmp_path, script):
    proc, run_dir = start_training(script, tmp_path)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    ack = "SIGINT: stopping after this iteration; Ctrl-C again to stop now"
    wait_for_line(tmp_path / "stderr.txt", ack, proc, timeout=10)
    assert time.time() - sent < 5  # within a second, on an idle machine
    assert proc.wait(timeout=300) == 130
    saved = torch.load(f"{run_dir}/checkpoint.pt", map_location="cpu", weights_only=False)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr, stderr
    checkpoint = f"runs/{os.path.basename(run_dir)}/checkpoint.pt"
    assert stderr.splitlines()[-1] == f"SIGINT after iteration {saved['iteration']}: resume from {checkpoint}"
    assert 2 <= saved["iteration"] < 20 and saved["script"] == script


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, script):
    proc, run_dir = start_training(script, tmp_path)
    proc.send_signal(signal.SIGINT)
    wait_for_line(tmp_path / "stderr.txt", "SIGINT: stopping after this iteration; Ctrl-C again to stop now", proc, 10)
    time.sleep(1.2)  # a human's second Ctrl-C (the torchrun variant takes a copy within 1 s for torchrun's forwarding)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and " after iteration " not in stderr, stderr  # it did not wait for the iteration
    checkpoint = f"runs/{os.path.basename(run_dir)}/checkpoint.pt"
    assert stderr.splitlines()[-1] == f"stopped now: resume from {checkpoint}"
    saved = torch.load(tmp_path / checkpoint, map_location="cpu", weights_only=False)
    assert saved["iteration"] >= 1 and saved["script"] == script
