"""experiments/dream_check.py through its real CLI, on real Breakout steps (gymnasium backend) of a DreamSPI agent saved
here as a checkpoint is ({"model", "args", "script", "global_step"}), so that nothing trains. The done head is set to a
certain answer: then every imagined rollout ends at its first step or none does, which fixes the table exactly."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, error_lines

import deepspi_atari as d
import dreamspi_atari as ds

TOOL = os.path.join(REPO, "experiments", "dream_check.py")
SMALL = ["--envs", "2", "--steps", "12", "--horizon", "3"]


def checkpoint(path, done_logit=None, module=ds, script="dreamspi_atari.py", init_seed=0):
    """A freshly initialised Agent (torch seed init_seed) saved as a checkpoint of `script` with --seed 1; done_logit:
    the done head answers this logit for every latent (weights 0, bias done_logit)."""
    torch.manual_seed(init_seed)
    agent = module.Agent(4)
    if done_logit is not None:
        torch.nn.init.zeros_(agent.done_predictor.fc2.weight)
        torch.nn.init.constant_(agent.done_predictor.fc2.bias, done_logit)
    args = dataclasses.asdict(module.Args()) | dict(env_backend="gymnasium", num_envs=2, exp_name="dream-test", seed=1)
    torch.save(dict(model=agent.state_dict(), args=args, script=script, global_step=1024), path)
    return str(path)


def run(*flags, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *flags], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def rows(stdout):
    """{step: [cells]} of the printed table."""
    table = [line.split(" | ") for line in stdout.splitlines() if line.startswith("| imagined") or line.startswith("| real")]
    return {cells[0][2:]: [c.strip(" |") for c in cells[1:]] for cells in table}


def test_a_done_head_that_always_fires_ends_every_rollout_at_once_and_keeps_it_on_the_real_latent(tmp_path):
    """P(done) = 1: every rollout ends at h = 1 and stays on its start latent, a real one, so from h = 1 on the
    latents are the real ones (distance 0, no negative entries, the real entropy); the real next states see P(done) 1."""
    table = rows(run(checkpoint(tmp_path / "c.pt", done_logit=1e4), *SMALL, cwd=tmp_path).stdout)
    assert list(table) == ["imagined h = 0", "imagined h = 1", "imagined h = 2", "imagined h = 3", "real next states"]
    entropy, p_done, ended, reward, value, zeros, negative, distance = table["imagined h = 0"]
    assert (p_done, ended, negative, distance) == ("–", "–", "0.000", "0.0")
    for h in (1, 2, 3):
        got = table[f"imagined h = {h}"]
        assert got[:3] == [entropy, "1.000", "1.000"] and got[4:] == [value, zeros, "0.000", "0.0"], (h, got)
    assert table["imagined h = 3"][3] == "–"  # no reward after the last state
    assert table["real next states"][1] == "1.000"


def test_a_done_head_that_never_fires_ends_no_rollout_and_the_latents_leave_the_real_ones(tmp_path, monkeypatch):
    """P(done) = 0: no rollout ends; the world model's samples are dense (a soft mixture sample is never exactly 0),
    unlike the post-ReLU real latents; the --markdown block is written between the file's markers, with the step."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- experiments/dream_check.py dream-test -->\nold\n<!-- /experiments/dream_check.py dream-test -->\nend\n"
    )
    proc = run(checkpoint(tmp_path / "c.pt", done_logit=-1e4), *SMALL, "--markdown", str(doc), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = rows(proc.stdout)
    for h in (1, 2, 3):
        entropy, p_done, ended, reward, value, zeros, negative, distance = table[f"imagined h = {h}"]
        assert (p_done, ended, zeros) == ("0.000", "0.000", "0.000"), h
        assert float(negative) > 0 and float(distance) > 0, h
    assert table["real next states"][1] == "0.000"
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "`dream-test` (seed 1) at step 1,024: 2 x 12 real steps" in text and "| imagined h = 3 |" in text


@pytest.mark.parametrize(
    "make, flags, message",
    [
        (lambda p: checkpoint(p, module=d, script="deepspi_atari.py"), [], "was not written by dreamspi_atari.py"),
        (lambda p: checkpoint(p), ["--envs", "0"], "--envs 0 must be positive"),
        (lambda p: checkpoint(p), ["--markdown", "doc.md"], "--markdown doc.md: the file needs the lines"),
        (lambda p: str(p) + ".missing", [], "no file"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, make, flags, message):
    proc = run(make(tmp_path / "c.pt"), *flags, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert message in line, line
    assert proc.stdout == ""


def test_the_same_checkpoint_and_seed_give_the_same_block_and_another_seed_other_games(tmp_path):
    """The policy's draws, the envs and the world model's noise all follow --seed."""
    path = checkpoint(tmp_path / "c.pt")
    first, again, other = (run(path, *SMALL, "--seed", seed, cwd=tmp_path).stdout for seed in ("7", "7", "8"))
    assert "| imagined h = 1 |" in first and first == again and first != other


def test_fresh_takes_the_weights_the_run_started_from_not_the_files(tmp_path):
    """--fresh: the Agent as dreamspi_atari.py makes it after torch.manual_seed(args.seed), whatever the file's weights
    (here a done head that always fires): the same table as a file that holds those initial weights; its own markers."""
    trained = checkpoint(tmp_path / "trained.pt", done_logit=1e4)
    initial = checkpoint(tmp_path / "initial.pt", init_seed=1)  # the run's seed is 1
    doc = tmp_path / "doc.md"
    doc.write_text(
        "<!-- experiments/dream_check.py dream-test fresh -->\n<!-- /experiments/dream_check.py dream-test fresh -->\n"
    )
    fresh = run(trained, *SMALL, "--fresh", "--markdown", str(doc), cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert rows(fresh.stdout) == rows(run(initial, *SMALL, cwd=tmp_path).stdout)
    assert rows(fresh.stdout)["imagined h = 1"][1] != "1.000"
    assert "`dream-test` (seed 1) freshly initialised" in doc.read_text()
