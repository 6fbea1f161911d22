"""deepspi_atari.py: runs that survive faults and can be evaluated (checkpoints, resume, signals, a non-finite loss, and
evaluate.py on its checkpoints and saved models: greedy, sampled, video), and its torchrun variant
deepspi_atari_multigpu.py. Real CLI runs on Breakout with the gymnasium backend and budgets of a few batches."""

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

import deepspi_atari as d
import deepspi_atari_multigpu as dm
import evaluate

SCRIPT = os.path.join(REPO, "deepspi_atari.py")
EVALUATE = os.path.join(REPO, "evaluate.py")
MULTIGPU = os.path.join(REPO, "deepspi_atari_multigpu.py")
TINY = ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "448"]  # 7 iterations
# a fault injector that is not part of the script: it patches torch, then runs deepspi_atari.py as `python` would
DRIVER = """
import os, runpy, sys
import torch
import torch.nn.functional as F

fault, rank = os.environ["FAULT"], os.environ.get("RANK", "0")
if fault == "nan" and rank == os.environ.get("FAULT_RANK", "0"):  # the transition loss turns NaN at minibatch 20
    smooth_l1_loss, calls = F.smooth_l1_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1  # two calls per minibatch: reward, then transition
        return smooth_l1_loss(*args, **kwargs) * (float("nan") if calls[0] >= 40 and calls[0] % 2 == 0 else 1.0)

    F.smooth_l1_loss = poisoned
if fault == "drift" and rank == "1":  # rank 1's weights drift away from rank 0's
    step = torch.optim.Adam.step

    def drifting(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(1e-6)
        return out

    torch.optim.Adam.step = drifting
if fault == "count-host-reads":  # every read of a tensor's value on the host, outside the optimizer's own step counts
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


def command(*flags, driver=None, torchrun=0):
    """The command line of the script (through the fault driver); with torchrun, the variant with that many processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    return [sys.executable, *launcher, str(driver) if driver else MULTIGPU if torchrun else SCRIPT, "--no-progress", *flags]


def run(cmd, cwd, fault=None, fault_rank=0, timeout=300, script=SCRIPT):
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCRIPT=script, FAULT=fault or "", FAULT_RANK=str(fault_rank))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def start(*flags, cwd):
    """Start a training run in the background; stdout/stderr go to files in cwd."""
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen(command(*flags), cwd=cwd, stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_until(condition, proc, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended too early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 7-iteration run without interruption; its final checkpoint and model serve the evaluation tests."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = run_script("deepspi_atari.py", *TINY, "--checkpoint-every", "100", "--save-model", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    assert sorted(os.listdir(run_dir))[:2] == ["checkpoint.pt", "deepspi_atari.cleanrl_model"]  # no temp files left
    return run_dir, read_scalars(run_dir)


# ------------------------------------------------------------------------------------------------------ in-process
def test_checkpoint_round_trip(tmp_path):
    agent = d.Agent(4)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    agent.get_value(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "checkpoint.pt")
    d.save_atomic({"model": agent.state_dict(), "optimizer": optimizer.state_dict()}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    loaded = torch.load(path, weights_only=False)
    agent2 = d.Agent(4)
    agent2.load_state_dict(loaded["model"])
    optimizer2 = torch.optim.Adam(agent2.parameters(), lr=1e-3, eps=1e-5)
    optimizer2.load_state_dict(loaded["optimizer"])
    for (name, a), b in zip(agent.state_dict().items(), agent2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    s1, s2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k][m], s2[k][m]) for k in s1 for m in s1[k])


def test_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [d.make_run_dir("Pong__x__1__5") for _ in range(3)] == ["Pong__x__1__5", "Pong__x__1__5_2", "Pong__x__1__5_3"]
    assert d.make_run_dir("Pong__x__1__5", reuse=True) == "Pong__x__1__5"  # --resume goes on in its own directory


def test_parameter_identity_guard():
    sums = torch.arange(12.0, dtype=torch.float64).view(1, 12).repeat(3, 1)
    assert dm.out_of_sync_ranks(sums) == []
    sums[2, 5] += 1e-12
    assert dm.out_of_sync_ranks(sums) == [2]


# --------------------------------------------------------------------------------------------------------- faults
def assert_resumed_from(saved, run_dir, uninterrupted, record):
    """The resumed run went on from the checkpoint: its first minibatch saw the checkpoint's weights, its Adam step
    counts went on from the checkpoint's (7 iterations x 4 epochs x 4 minibatches in all), it logged each iteration once
    (the crashed run's events after the checkpoint were purged), with the steps and learning rates of the uninterrupted
    run, and everything logged up to the checkpoint is the uninterrupted run's."""
    first = torch.load(record, weights_only=False)[0]["args"]["agent"]
    assert all(torch.equal(first[k], v) for k, v in saved["model"].items())
    final = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert {state["step"].item() for state in final["optimizer"]["state"].values()} == {7 * 16}
    resumed = read_scalars(run_dir)
    k = saved["iteration"]
    assert resumed["charts/learning_rate"] == uninterrupted["charts/learning_rate"]
    for tag in ("losses/value_loss", "losses/policy_loss", "charts/sir"):
        assert len(resumed[tag]) == 7 and resumed[tag][:k] == uninterrupted[tag][:k], tag
    assert saved["global_step"] == 64 * k


def test_sigterm_checkpoints_then_resume_goes_on_from_the_checkpoint(tmp_path, uninterrupted):
    proc = start(*TINY, "--checkpoint-every", "2", cwd=tmp_path)
    wait_until(lambda: checkpoint_path(tmp_path), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "SIGTERM after iteration" in stderr
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert 2 <= saved["iteration"] < 7
    resumed = resume_probed("deepspi_atari.py", checkpoint_path(tmp_path), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after iteration {saved['iteration']}/7, with new games" in resumed.stdout
    assert_resumed_from(saved, only_run_dir(tmp_path), uninterrupted[1], tmp_path / "record.pt")


def test_kill9_then_resume_hides_the_lost_iteration(tmp_path, uninterrupted):
    """SIGKILL after iteration 4 was logged, with the last checkpoint at iteration 3: the resumed run purges the crashed
    run's iteration-4 events and goes on from the checkpoint."""
    proc = start(*TINY, "--checkpoint-every", "3", cwd=tmp_path)
    logged = lambda: len(read_scalars(only_run_dir(tmp_path)).get("charts/learning_rate", []))  # noqa: E731
    wait_until(lambda: checkpoint_path(tmp_path) and logged() >= 4, proc)
    proc.kill()
    proc.wait(timeout=60)
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert logged() > saved["iteration"]  # events beyond the checkpoint exist
    resumed = resume_probed("deepspi_atari.py", checkpoint_path(tmp_path), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_from(saved, only_run_dir(tmp_path), uninterrupted[1], tmp_path / "record.pt")


def test_nonfinite_loss_stops_with_one_line_and_the_last_checkpoint_untouched(tmp_path):
    # --no-sn-faithful: its SVD must not fail on the non-finite weights of the rest of the failing iteration
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = run(command(*TINY, "--no-sn-faithful", "--checkpoint-every", "1", driver=driver), tmp_path, fault="nan")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "non-finite transition and policy loss at iteration 2;" in line and "checkpoint.pt" in line
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    # the failing iteration wrote no checkpoint: the last one is the end of iteration 1, the weights of a clean
    # 1-iteration run (iteration 1 has the same learning rate, data and random streams whatever the budget)
    assert saved["iteration"] == 1 and saved["global_step"] == 64
    clean = tmp_path / "clean"
    clean.mkdir()
    one = run_script("deepspi_atari.py", *TINY, "--no-sn-faithful", "--total-timesteps", "64", cwd=clean)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = torch.load(checkpoint_path(clean), weights_only=False)
    for name, value in reference["model"].items():
        assert torch.equal(saved["model"][name], value), name
    scalars = read_scalars(only_run_dir(tmp_path))  # iteration 1, then the failing one: nothing lost
    assert len(scalars["charts/learning_rate"]) == 2 and math.isnan(scalars["losses/transition_loss"][-1])
    resumed = run_script("deepspi_atari.py", "--resume", checkpoint_path(tmp_path), cwd=tmp_path)  # no NaN any more
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_no_host_reads_in_the_minibatch_loop(tmp_path):
    """The update reads nothing back from the device per minibatch (a GPU would stall on each read): the run's host reads
    of tensors are as many with 8 minibatches per iteration (4 x 2 epochs) as with 1."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    counts = []
    for n, epochs in (("1", "1"), ("4", "2")):
        cwd = tmp_path / n
        cwd.mkdir()
        proc = run(
            command(*TINY, "--num-minibatches", n, "--update-epochs", epochs, driver=driver), cwd, fault="count-host-reads"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(int((cwd / "host_reads.txt").read_text()))
    assert counts[0] == counts[1] and counts[0] > 0, counts


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("deepspi_atari.py", ["--resume", "missing.pt"], "cannot read missing.pt (FileNotFoundError)"),
        ("deepspi_atari.py", ["--resume", "{bogus}"], "cannot read"),
        ("deepspi_atari.py", ["--resume", "{checkpoint}", "--learning-rate", "0.1", "--save-model"], "not --learning-rate"),
        ("deepspi_atari.py", ["--resume", "{checkpoint}", "--no-anneal-lr"], "not --no-anneal-lr"),
        ("deepspi_atari.py", ["--resume", "{checkpoint}", "--seed=3"], "not --seed"),
        ("deepspi_atari.py", ["--resume", "{model}"], "is not a checkpoint.pt of deepspi_atari.py"),
        ("evaluate.py", ["missing.pt"], "cannot read missing.pt (FileNotFoundError)"),
        ("evaluate.py", ["{bogus}"], "cannot read"),
        ("evaluate.py", ["{tensor}"], "is neither a checkpoint.pt nor a saved model"),
        ("evaluate.py", ["{model}", "--episodes", "0"], "--episodes 0 must be positive"),
        ("evaluate.py", ["{model}", "--script", "nowhere.py"], "no training script nowhere.py"),
        ("evaluate.py", ["{model}", "--script", "{maze}"], "deepspi_maze.py has no Atari games to play"),
        ("evaluate.py", ["{model}", "--script", "dreamspi_atari.py"], "does not fit the Agent of dreamspi_atari.py"),
        ("evaluate.py", ["{model}", "--env-backend", "ale"], "invalid choice: 'ale'"),
    ],
)
def test_bad_run_flags_exit_2_with_one_line(tmp_path, uninterrupted, script, flags, message):
    run_dir, bogus, tensor = uninterrupted[0], tmp_path / "bogus.pt", tmp_path / "tensor.pt"
    bogus.write_text("not a model")
    torch.save(torch.zeros(3), tensor)
    names = dict(checkpoint=f"{run_dir}/checkpoint.pt", model=f"{run_dir}/deepspi_atari.cleanrl_model", bogus=bogus)
    names.update(tensor=tensor, maze=os.path.join(REPO, "deepspi_maze.py"))
    proc = run_script(script, *[f.format(**names) for f in flags], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert message in line, proc.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- evaluation (evaluate.py)
def test_evaluate_prints_and_logs_both_policies_and_records_videos(tmp_path, uninterrupted):
    model = os.path.join(uninterrupted[0], "deepspi_atari.cleanrl_model")
    proc = run_script("evaluate.py", model, "--episodes", "2", "--capture-video", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("greedy", "sampled"):
        assert f"eval, {mode} policy: " in proc.stdout and " ± " in proc.stdout and "over 2 games" in proc.stdout
        assert len(glob.glob(str(tmp_path / "videos" / "*__eval" / mode / "*.mp4"))) == 1
    scalars = read_scalars(only_run_dir(tmp_path))
    assert len(scalars["eval/episodic_return"]) == len(scalars["eval/greedy_episodic_return"]) == 2
    assert "charts/SPS" not in scalars  # no training


def test_evaluate_a_checkpoint_with_envpool_and_another_seed(tmp_path, uninterrupted):
    checkpoint = os.path.join(uninterrupted[0], "checkpoint.pt")
    proc = run_script("evaluate.py", checkpoint, "--env-backend", "envpool", "--seed", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 10 games" in proc.stdout  # the default
    assert glob.glob(str(tmp_path / "runs" / "*__5__*__eval"))  # the seed given
    assert not (tmp_path / "videos").exists()


def test_save_model_with_envpool(tmp_path):
    flags = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "64", "--save-model"]
    proc = run_script("deepspi_atari.py", *flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(os.path.join(run_dir, "deepspi_atari.cleanrl_model"), weights_only=False)
    assert set(saved) == {"model", "args", "script"} and saved["args"]["env_backend"] == "envpool"
    agent = d.Agent(4)
    agent.load_state_dict(saved["model"])
    assert len(read_scalars(run_dir)["charts/learning_rate"]) == 1


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_greedy_evaluation_takes_the_argmax(monkeypatch, backend):
    """evaluate.evaluate with a fixed network whose most likely action (p = 0.4) is RIGHT: the greedy games play only
    RIGHT, the sampled games do not."""
    agent = d.Agent(4)
    with torch.no_grad():
        agent.actor.weight.zero_()
        agent.actor.bias.copy_(torch.tensor([0.2, 0.2, 0.4, 0.2]).log())  # RIGHT = action 2
    played, make_envs = [], d.make_envs

    def recording_make_envs(*a, **kw):
        envs = make_envs(*a, **kw)
        step = envs.step
        envs.step = lambda actions: (played[-1].extend(actions.tolist()), step(actions))[1]
        played.append([])
        return envs

    monkeypatch.setattr(d, "make_envs", recording_make_envs)
    for greedy in (True, False):
        scores = evaluate.evaluate(agent, d, "BreakoutNoFrameskip-v4", backend, 1, 9, torch.device("cpu"), greedy)
        assert scores.shape == (1,)
    greedy, sampled = played
    assert set(greedy) == {2} and len(greedy) > 10
    assert len(set(sampled)) == 4


# ------------------------------------------------------------------------------------------------ torchrun (gloo)
TORCHRUN = ["--env-backend", "gymnasium", "--num-envs", "4", "--num-steps", "32", "--total-timesteps", "384"]


def test_torchrun_two_processes(tmp_path):
    """2 CPU processes: envs split 2 + 2, the parameter-identity guard passes every iteration, rank 0 alone logs and
    writes the checkpoint, which holds both ranks' states (that the ranks play different games: the mean-gradient test)."""
    proc = run(command(*TORCHRUN, "--checkpoint-every", "2", "--save-model", torchrun=2), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 384 steps") == 1
    run_dir = only_run_dir(tmp_path)
    assert len(glob.glob(os.path.join(run_dir, "events.*"))) == 1
    assert len(read_scalars(run_dir)["charts/learning_rate"]) == 3
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    ranks = saved["ranks"]
    assert len(ranks) == 2 and len(ranks[0]["last_returns"]) == len(ranks[1]["last_returns"]) == 2  # 2 envs each


def test_the_single_process_script_refuses_torchrun_and_the_variant_checkpoints(tmp_path, uninterrupted):
    """deepspi_atari.py is one process: under torchrun it says which script to use; each script refuses the other's
    checkpoint (the variant's holds one state per rank)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run([*launcher, SCRIPT, "--no-progress", *TORCHRUN], tmp_path)
    assert (
        proc.returncode != 0
        and proc.stderr.count("this script runs one process (torchrun: deepspi_atari_multigpu.py, on Atari)") == 2
    )
    proc = run_script("deepspi_atari_multigpu.py", "--resume", f"{uninterrupted[0]}/checkpoint.pt", cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not a checkpoint.pt of deepspi_atari_multigpu.py (it was written by deepspi_atari.py)" in proc.stderr


@pytest.mark.parametrize("fault", ["drift", "nan"])
def test_torchrun_faults_on_one_rank_stop_every_rank(tmp_path, fault):
    """drift: rank 1's weights move away, the guard fails loudly on both ranks; nan: only rank 1's loss turns NaN, both
    ranks stop together after the checkpoint (no deadlock in either case)."""
    bf16 = ["--bf16"] if fault == "nan" else []  # the variant under --bf16 too: both ranks undo the same update
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    flags = [*TORCHRUN, *bf16, "--checkpoint-every", "1"]
    proc = run(command(*flags, driver=driver, torchrun=2), tmp_path, fault=fault, fault_rank=1, timeout=240, script=MULTIGPU)
    assert proc.returncode != 0
    if fault == "drift":
        assert "the parameters of ranks [1] differ from rank 0's after iteration 1" in proc.stderr
    else:
        assert proc.stderr.count("error: non-finite transition and policy loss at iteration") == 1  # rank 0 says it
        assert torch.load(checkpoint_path(tmp_path), weights_only=False)["iteration"] >= 1


RESUME_SHAPES = {  # one iteration of each script, as small as it runs
    "deepspi_atari.py": ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "16"],
    "deepspi_atari_multigpu.py": ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "16"],
    "dreamspi_atari.py": ["--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "16"],
    "deepspi_maze.py": ["--n", "2", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2"],
}


@pytest.mark.parametrize("script", list(RESUME_SHAPES))
def test_resume_keeps_the_saved_checkpoint_every_and_save_model_unless_given(tmp_path, script):
    """A resumed run goes on checkpointing and saving its model as the run it resumes did (a resume after a stop must not
    fall back on the defaults and lose the iterations since the last checkpoint), unless the flags are given again:
    a 1-iteration run with --checkpoint-every 3 --save-model, extended to 2 iterations with --total-timesteps only,
    keeps both (its model written again); extended to 3 with --checkpoint-every 5 --no-save-model, takes those."""
    proc = run_script(
        script, *RESUME_SHAPES[script], "--total-timesteps", "32", "--checkpoint-every", "3", "--save-model", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = os.path.join(only_run_dir(tmp_path), script.replace(".py", ".cleanrl_model"))
    os.remove(model)
    proc = run_script(script, "--resume", checkpoint_path(tmp_path), "--total-timesteps", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert (saved["iteration"], saved["args"]["checkpoint_every"], saved["args"]["save_model"]) == (2, 3, True)
    assert os.path.exists(model)
    os.remove(model)
    flags = ["--total-timesteps", "96", "--checkpoint-every", "5", "--no-save-model"]
    proc = run_script(script, "--resume", checkpoint_path(tmp_path), *flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert (saved["iteration"], saved["args"]["checkpoint_every"], saved["args"]["save_model"]) == (3, 5, False)
    assert not os.path.exists(model)
