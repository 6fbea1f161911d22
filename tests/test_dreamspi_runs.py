"""dreamspi_atari.py: runs that survive faults (checkpoints with the four optimizers, a resume that goes on from the
checkpoint with the saved arguments, signals, a non-finite loss in either step, no host reads per minibatch).
Real CLI runs on Breakout with the gymnasium backend."""

import glob
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, checkpoint_path, error_lines, only_run_dir, read_scalars, resume_probed, run_script

import dreamspi_atari as ds

SCRIPT = os.path.join(REPO, "dreamspi_atari.py")
# 10 iterations of 2 envs x 24 steps
TINY = ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "24", "--total-timesteps", "480"]
TINY += ["--num-minibatches", "2", "--update-epochs", "1", "--imagination-horizon", "1"]
GROUPS = {"encoder", "world_model", "actor", "critic"}
# a fault injector that is not part of the script: it patches torch, then runs dreamspi_atari.py as `python` would
DRIVER = """
import os, runpy, sys
import torch
import torch.nn.functional as F

if os.environ["FAULT"] == "real":  # the transition loss of iteration 2's first real-data minibatch turns NaN
    smooth_l1_loss, calls = F.smooth_l1_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1  # three calls per minibatch (reward, transition, done), two minibatches per iteration
        return smooth_l1_loss(*args, **kwargs) * (float("nan") if calls[0] >= 8 and calls[0] % 3 == 2 else 1.0)

    F.smooth_l1_loss = poisoned
if os.environ["FAULT"] == "imagination":  # the imagined dones of iteration 2 turn NaN (one draw per iteration)
    bernoulli, calls = torch.bernoulli, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        return bernoulli(*args, **kwargs) * (float("nan") if calls[0] >= 2 else 1.0)

    torch.bernoulli = poisoned
if os.environ["FAULT"] == "count-host-reads":  # every read of a tensor on the host, outside the optimizer's own step
    import atexit

    reads = [0]

    def counting(read):
        def counted(self, *args, **kwargs):
            reads[0] += os.sep + os.path.join("torch", "optim") not in sys._getframe(1).f_code.co_filename
            return read(self, *args, **kwargs)

        return counted

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    atexit.register(lambda: open("host_reads.txt", "w").write(str(reads[0])))
sys.argv = [os.environ["SCRIPT"], *sys.argv[1:]]
runpy.run_path(os.environ["SCRIPT"], run_name="__main__")
"""


def make_optimizers(agent):
    return {name: torch.optim.Adam(p, lr=1e-3, eps=1e-5) for name, p in agent.param_groups().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 10-iteration run without interruption; its final checkpoint and model serve the other tests."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    flags = ["--checkpoint-every", "100", "--save-model"]
    proc = run_script("dreamspi_atari.py", *TINY, *flags, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    assert sorted(os.listdir(run_dir))[:2] == ["checkpoint.pt", "dreamspi_atari.cleanrl_model"]  # no temp files left
    return run_dir, read_scalars(run_dir), proc.stdout


# ------------------------------------------------------------------------------------------------------ in-process
def test_checkpoint_round_trip_restores_all_four_optimizers(tmp_path):
    torch.manual_seed(0)
    agent = ds.Agent(4)
    optimizers = make_optimizers(agent)
    for names in (["encoder", "world_model"], ["actor", "critic"]):  # as the real-data step, then the imagination step
        loss = sum(p.square().sum() for p in agent.parameters())
        ds.step_groups(loss, agent, optimizers, names, 0.5)
    path = str(tmp_path / "checkpoint.pt")
    ds.save_atomic({"model": agent.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    loaded = torch.load(path, weights_only=False)
    agent2 = ds.Agent(4)
    agent2.load_state_dict(loaded["model"])
    optimizers2 = make_optimizers(agent2)
    for name, optimizer in optimizers2.items():
        optimizer.load_state_dict(loaded["optimizers"][name])
    for (name, a), b in zip(agent.state_dict().items(), agent2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name in GROUPS:
        s1, s2 = optimizers[name].state_dict()["state"], optimizers2[name].state_dict()["state"]
        assert len(s1) == len(agent.param_groups()[name]), name  # every parameter of the group took a step
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k][m], s2[k][m]) for k in s1 for m in s1[k]), name
        # the restored state belongs to the new agent's parameters
        assert optimizers2[name].param_groups[0]["params"][0] is agent2.param_groups()[name][0]


def test_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [ds.make_run_dir("Pong__x__1__5") for _ in range(3)] == ["Pong__x__1__5", "Pong__x__1__5_2", "Pong__x__1__5_3"]
    assert ds.make_run_dir("Pong__x__1__5", reuse=True) == "Pong__x__1__5"  # --resume goes on in its own directory


# --------------------------------------------------------------------------------------------------------- faults
def test_uninterrupted_run_saves_checkpoint_and_model(uninterrupted):
    """The final checkpoint holds the four optimizers, and the saved model holds the weights and the arguments that
    evaluate.py reads (as deepspi_atari.py's: the keys "model", "args" and "script")."""
    run_dir = uninterrupted[0]
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert saved["iteration"] == 10 and saved["global_step"] == 480 and "envs" not in saved  # a resume starts new games
    assert set(saved["optimizers"]) == GROUPS and all(saved["optimizers"][k]["state"] for k in GROUPS)
    model = torch.load(os.path.join(run_dir, "dreamspi_atari.cleanrl_model"), weights_only=False)
    assert set(model) == {"model", "args", "script"} and model["script"] == "dreamspi_atari.py"
    assert all(torch.equal(model["model"][k], v) for k, v in saved["model"].items())
    assert model["args"] == saved["args"] and model["args"]["exp_name"] == "dreamspi_atari"


def assert_resumed_from(saved, run_dir, uninterrupted, record):
    """The resumed run went on from the checkpoint: its first real-data step saw the checkpoint's weights, the Adam
    step counts of the four optimizers went on from the checkpoint's (10 iterations x 1 epoch x 2 real-data minibatches
    for the encoder and the world model, 10 x 1 epoch x (2 x H=1) imagined ones for the actor and the critic), it logged
    each iteration once (the events after the checkpoint were purged), with the steps and learning rates of the
    uninterrupted run, and everything logged up to the checkpoint is the uninterrupted run's."""
    first = torch.load(record, weights_only=False)[0]["args"]["agent"]
    assert first.keys() == saved["model"].keys() and all(torch.equal(first[k], v) for k, v in saved["model"].items())
    final = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert final["iteration"] == 10 and final["global_step"] == 480
    for group in GROUPS:
        assert {state["step"].item() for state in final["optimizers"][group]["state"].values()} == {20}, group
    resumed = read_scalars(run_dir)
    k = saved["iteration"]
    for group in GROUPS:
        tag = f"charts/{group}_learning_rate"
        assert resumed[tag] == uninterrupted[tag] and len(resumed[tag]) == 10, tag
    for tag in ("repr_wm/transition_loss", "repr_wm/done_loss", "imagination/value_loss", "imagination/policy_loss"):
        assert len(resumed[tag]) == 10 and resumed[tag][:k] == uninterrupted[tag][:k], tag
    assert saved["global_step"] == 48 * k


def test_sigterm_checkpoints_then_resume_goes_on_from_the_checkpoint(tmp_path, uninterrupted):
    with open(tmp_path / "stderr.txt", "w") as err:
        cmd = [sys.executable, SCRIPT, "--no-progress", *TINY, "--checkpoint-every", "1"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 240
    while not checkpoint_path(tmp_path):  # after iteration 1
        assert proc.poll() is None and time.time() < deadline, "the run ended too early, or timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "SIGTERM after iteration" in stderr
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert 1 <= saved["iteration"] < 10 and set(saved["optimizers"]) == GROUPS and "envs" not in saved
    resumed = resume_probed("dreamspi_atari.py", checkpoint_path(tmp_path), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after iteration {saved['iteration']}/10, with new games" in resumed.stdout
    assert_resumed_from(saved, only_run_dir(tmp_path), uninterrupted[1], tmp_path / "record.pt")


@pytest.mark.parametrize(
    "fault, message, broken",
    [
        ("real", "non-finite transition and policy loss at iteration 2", "repr_wm/transition_loss"),
        ("imagination", "non-finite imagined policy and imagined value loss at iteration 2", "imagination/value_loss"),
    ],
    ids=["real-data", "imagination"],
)
def test_nonfinite_loss_stops_with_one_line_and_the_last_checkpoint_untouched(tmp_path, fault, message, broken):
    """A NaN in iteration 2 (a world-model loss of the real-data step, or the imagined dones): the run logs that iteration,
    stops with one line naming the first non-finite terms (of the real-data step if it had any, else of imagination),
    and the checkpoint of iteration 1 stays as it was, the resume point."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=SCRIPT, FAULT=fault)
    cmd = [sys.executable, str(driver), "--no-progress", *TINY, "--checkpoint-every", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert f"error: {message}; resume from runs/" in line and line.endswith("/checkpoint.pt"), line
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    # the checkpoint is the end of iteration 1 (its 1 x 2 real-data and 1 x 2 x H=1 imagined minibatches in the Adam
    # step counts), which a resume continues
    assert saved["iteration"] == 1 and saved["global_step"] == 48
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert set(saved["optimizers"]) == GROUPS
    for group in GROUPS:
        assert {state["step"].item() for state in saved["optimizers"][group]["state"].values()} == {2}, group
    scalars = read_scalars(only_run_dir(tmp_path))  # iteration 1, then the failing one: nothing lost
    assert len(scalars["charts/actor_learning_rate"]) == 2 and math.isnan(scalars[broken][-1])


def test_no_host_reads_in_the_minibatch_loops(tmp_path):
    """Neither step reads anything back from the device per minibatch (a GPU would stall on each read): the run's host
    reads of tensors are as many with 4 minibatches x 2 epochs in both steps as with 1 x 1."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=SCRIPT, FAULT="count-host-reads")
    counts = []
    for n, epochs in (("1", "1"), ("4", "2")):
        cwd = tmp_path / n
        cwd.mkdir()
        flags = ["--num-minibatches", n, "--update-epochs", epochs, "--imagination-epochs", epochs]
        cmd = [sys.executable, str(driver), "--no-progress", *TINY[:6], "--total-timesteps", "96", *flags]  # 2 iterations
        cmd += ["--imagination-horizon", "2"]  # imagined minibatches: 2 x the real-data ones
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(int((cwd / "host_reads.txt").read_text()))
    assert counts[0] == counts[1] and counts[0] > 0, counts


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resume", "missing.pt"], "--resume: cannot read missing.pt (FileNotFoundError)"),
        (["--resume", "{bogus}"], "--resume: cannot read"),
        (
            ["--resume", "{checkpoint}", "--actor-learning-rate", "0.1", "--save-model"],
            "--resume takes the saved run's arguments, not --actor-learning-rate",
        ),
        (["--resume", "{model}"], "is not a checkpoint.pt of dreamspi_atari.py"),
        (["--resume", "{deepspi}"], "is not a checkpoint.pt of dreamspi_atari.py (it was written by deepspi_atari.py)"),
    ],
    ids=["missing", "not-a-checkpoint", "other-flag", "model-not-checkpoint", "deepspi-checkpoint"],
)
def test_bad_run_flags_exit_2_with_one_line(tmp_path, uninterrupted, flags, message):
    run_dir, bogus, deepspi = uninterrupted[0], tmp_path / "bogus.pt", tmp_path / "deepspi.pt"
    bogus.write_text("not a checkpoint")
    checkpoint = torch.load(f"{run_dir}/checkpoint.pt", weights_only=False)  # as deepspi_atari.py's: one optimizer
    torch.save(
        {**{k: v for k, v in checkpoint.items() if k != "optimizers"}, "optimizer": {}, "script": "deepspi_atari.py"}, deepspi
    )
    names = dict(checkpoint=f"{run_dir}/checkpoint.pt", model=f"{run_dir}/dreamspi_atari.cleanrl_model")
    proc = run_script("dreamspi_atari.py", *[f.format(**names, bogus=bogus, deepspi=deepspi) for f in flags], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert message in line, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_multi_process_training_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts each process
    proc = run_script("dreamspi_atari.py", *TINY, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "this script runs one process (torchrun: deepspi_atari_multigpu.py, on Atari)" in line
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_a_model_prints_and_logs_both_policies_and_records_videos(tmp_path, uninterrupted):
    """evaluate.py on a DreamSPI saved model: it takes dreamspi_atari.py's Agent (done head included) from the saved
    exp_name, plays the greedy and the sampled policy, logs both and records each one's first game."""
    model = os.path.join(uninterrupted[0], "dreamspi_atari.cleanrl_model")
    proc = run_script("evaluate.py", model, "--episodes", "2", "--capture-video", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("greedy", "sampled"):
        assert f"eval, {mode} policy: " in proc.stdout and " ± " in proc.stdout and "over 2 games" in proc.stdout
        assert len(glob.glob(str(tmp_path / "videos" / "*__dreamspi_atari__*__eval" / mode / "*.mp4"))) == 1
    scalars = read_scalars(only_run_dir(tmp_path))
    assert len(scalars["eval/episodic_return"]) == len(scalars["eval/greedy_episodic_return"]) == 2
    assert "charts/SPS" not in scalars  # no training


def test_evaluate_a_checkpoint_with_envpool_and_another_seed(tmp_path, uninterrupted):
    checkpoint = os.path.join(uninterrupted[0], "checkpoint.pt")
    proc = run_script("evaluate.py", checkpoint, "--env-backend", "envpool", "--seed", "5", "--episodes", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 1 games" in proc.stdout
    assert glob.glob(str(tmp_path / "runs" / "*__dreamspi_atari__5__*__eval"))  # the seed given
    assert not (tmp_path / "videos").exists()


def test_evaluate_refuses_a_model_without_the_done_head(tmp_path, uninterrupted):
    """A model that is not DreamSPI's (here: without the done head, as deepspi_atari.py's) under DreamSPI's exp_name:
    one line and exit code 2."""
    saved = torch.load(os.path.join(uninterrupted[0], "dreamspi_atari.cleanrl_model"), weights_only=False)
    headless = {k: v for k, v in saved["model"].items() if not k.startswith("done_predictor.")}
    torch.save({**saved, "model": headless}, tmp_path / "headless.cleanrl_model")
    proc = run_script("evaluate.py", str(tmp_path / "headless.cleanrl_model"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "does not fit the Agent of" in line and line.rstrip().endswith("with --script"), line
