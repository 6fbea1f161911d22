"""experiments/dream_check.py through its real CLI, on real Breakout steps. The DreamSPI agents are saved here in a
checkpoint's format ({"model", "args", "script", "global_step"}), so that nothing trains. A done head set to a certain
answer fixes the table: every imagined step draws a done, or none does."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import FORWARD_LINES, REPO, error_lines

import deepspi_atari as d
import dreamspi_atari as ds

TOOL = os.path.join(REPO, "experiments", "dream_check.py")
SMALL = ["--envs", "2", "--steps", "12", "--horizon", "3"]


def checkpoint(path, done_logit=None, module=ds, script="dreamspi_atari.py", backend="gymnasium", weights=None):
    """A freshly initialised Agent (torch seed 0) saved as a checkpoint of `script` with --seed 1, or these weights;
    done_logit: the done head answers this logit for every latent (weights 0, bias done_logit)."""
    torch.manual_seed(0)
    agent = module.Agent(4)
    if weights is not None:
        agent.load_state_dict(weights)
    if done_logit is not None:
        torch.nn.init.zeros_(agent.done_predictor.fc2.weight)
        torch.nn.init.constant_(agent.done_predictor.fc2.bias, done_logit)
    args = dataclasses.asdict(module.Args()) | dict(env_backend=backend, num_envs=2, exp_name="dream-test", seed=1)
    torch.save(dict(model=agent.state_dict(), args=args, script=script, global_step=1024), path)
    return str(path)


def run(*flags, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *flags], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def rows(stdout):
    """{step: [cells]} of the printed table."""
    table = [line.split(" | ") for line in stdout.splitlines() if line.startswith("| imagined") or line.startswith("| real")]
    return {cells[0][2:]: [c.strip(" |") for c in cells[1:]] for cells in table}


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_a_done_head_that_always_fires_holds_every_rollout_so_no_step_samples(tmp_path, backend):
    """P(done) = 1: every imagined step draws a done, so every rollout stays where it was and no step samples a latent
    (its columns empty); the done head answers 1 on the real next states. With envpool, whose reset steps the tool
    leaves out, as with gymnasium."""
    proc = run(checkpoint(tmp_path / "c.pt", done_logit=1e4, backend=backend), *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = rows(proc.stdout)
    assert list(table) == ["real states, h = 0", "imagined h = 1", "imagined h = 2", "imagined h = 3"]
    done, entropy, reward, value, zeros, negative, distance = table["real states, h = 0"]
    assert done == "–" and negative == "0.000" and float(entropy) > 0 and float(distance) >= 0
    for h in (1, 2, 3):
        assert table[f"imagined h = {h}"] == ["1.000"] + ["–"] * 6, h
    assert "after the 0 steps that lost a life" in proc.stdout or "P(done) 1.000 after" in proc.stdout
    assert re.search(r"1\.000 after the \d+ others", proc.stdout), proc.stdout


def test_a_done_head_that_never_fires_lets_every_step_sample_dense_latents(tmp_path):
    """P(done) = 0: no step draws a done; every step samples, and the world model's samples are dense (a soft mixture
    sample is never exactly 0), unlike the post-ReLU real latents, and lie away from them; the --markdown block is
    written between the file's markers, with the step."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- experiments/dream_check.py dream-test -->\nthe block before\n"
        "<!-- /experiments/dream_check.py dream-test -->\nend\n"
    )
    proc = run(checkpoint(tmp_path / "c.pt", done_logit=-1e4), *SMALL, "--markdown", str(doc), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = rows(proc.stdout)
    for h in (1, 2, 3):
        done, entropy, reward, value, zeros, negative, distance = table[f"imagined h = {h}"]
        assert (done, zeros) == ("0.000", "0.000"), h
        assert float(negative) > 0 and float(distance) > 0 and float(entropy) > 0, h
        assert (reward == "–") == (h == 3), h  # no reward after the last state
    assert re.search(r"0\.000 after the \d+ others", proc.stdout), proc.stdout
    text = doc.read_text()
    assert "the block before" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "`dream-test` (seed 1) at step 1,024: 2 x 12 real steps" in text and "| imagined h = 3 |" in text


def test_an_encoder_that_maps_every_state_to_zero_gives_one_latent_and_one_policy(tmp_path):
    """An encoder whose last conv answers a negative bias everywhere (weights 0): after its ReLU every real state has the
    all-zero latent, so there is one distinct latent and the policy is the same in every state (total variation 0); no
    real step moves the latent, so the distances, in units of that move, are left empty.
    The freshly initialised encoder gives the real states many latents, and an actor with 1000 times its initial
    weights answers them with different probabilities."""
    torch.manual_seed(0)
    weights = ds.Agent(4).state_dict()
    weights["encoder.4.weight"] = torch.zeros_like(weights["encoder.4.weight"])
    weights["encoder.4.bias"] = torch.full_like(weights["encoder.4.bias"], -1.0)
    proc = run(checkpoint(tmp_path / "zero.pt", weights=weights), *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(
        r"The encoder on the 24 real states \(without envpool's reset steps\), which hold (\d+) distinct", proc.stdout
    )
    assert found and int(found[1]) > 1, proc.stdout  # many observations, one latent
    assert "observations: 1 distinct latents; a latent has 0.00 nonzero entries of 3136" in proc.stdout
    assert "and 1.000 of the states have the all-zero latent" in proc.stdout
    assert "no state's probabilities lie more than 0.0000 (total variation) from that mean" in proc.stdout
    real = rows(proc.stdout)["real states, h = 0"]
    assert real[4] == "1.000" and real[6] == "–"  # all entries zero; no real step moves the latent: no unit of distance
    torch.manual_seed(0)
    weights = ds.Agent(4).state_dict()
    weights["actor.weight"] = 1000 * weights["actor.weight"]  # an actor whose choice depends on the state
    other = run(checkpoint(tmp_path / "other.pt", weights=weights), *SMALL, cwd=tmp_path).stdout
    found = re.search(
        r"(\d+) distinct observations: (\d+) distinct latents; a latent has ([\d.]+) nonzero .* and ([\d.]+) of", other
    )
    assert found and int(found[1]) >= int(found[2]) > 1 and float(found[3]) > 0 and found[4] == "0.000", other
    tv = re.search(r"for actions 0 to 3; no state's probabilities lie more than ([\d.]+) \(total variation\)", other)
    assert tv and float(tv[1]) > 0, other


@pytest.mark.parametrize(
    "make, flags, message",
    [
        (lambda p: checkpoint(p, module=d, script="deepspi_atari.py"), [], "was not written by dreamspi_atari.py"),
        (lambda p: checkpoint(p), ["--envs", "0"], "--envs 0 must be positive"),
        (lambda p: checkpoint(p), ["--markdown", "doc.md"], "--markdown doc.md: the file needs the lines"),
        (lambda p: str(p) + ".missing", [], "no file"),
        (lambda p: checkpoint(p), ["--envs", "a"], "argument --envs: invalid int value: 'a'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, make, flags, message):
    proc = run(make(tmp_path / "c.pt"), *flags, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert message in line, line
    assert proc.stdout == "" and proc.stderr.splitlines() == [line], proc.stderr  # no usage text around it


def test_the_same_checkpoint_and_seed_give_the_same_block_and_another_seed_other_games(tmp_path):
    """The policy's draws, the envs and the world model's noise all follow --seed."""
    path = checkpoint(tmp_path / "c.pt")
    first, again, other = (run(path, *SMALL, "--seed", seed, cwd=tmp_path).stdout for seed in ("7", "7", "8"))
    assert "| imagined h = 1 |" in first and first == again and first != other


def test_fresh_takes_the_weights_the_run_started_from_not_the_files(tmp_path):
    """--fresh: the weights that dreamspi_atari.py's first minibatch sees in a run with --seed 1 (recorded through
    tests/probe.py), whatever the file's weights (here a done head that always fires): the same table as a file that
    holds the recorded weights; the block goes between its own markers."""
    probe = os.path.join(REPO, "tests", "probe.py")
    lines = [[FORWARD_LINES["dreamspi_atari.py"], ["agent"], 1]]
    env = dict(os.environ, PROBE_MODULES="1", PROBE_LINES=json.dumps(lines), OMP_NUM_THREADS="1")
    flags = ["--seed", "1", "--env-backend", "gymnasium", "--num-envs", "2", "--num-steps", "16", "--total-timesteps", "32"]
    cmd = [sys.executable, probe, str(tmp_path / "record.pt"), "", os.path.join(REPO, "dreamspi_atari.py"), "--no-progress"]
    proc = subprocess.run([*cmd, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    started = torch.load(tmp_path / "record.pt", weights_only=False)[0]["args"]["agent"]
    initial = checkpoint(tmp_path / "initial.pt", weights=started)
    trained = checkpoint(tmp_path / "trained.pt", done_logit=1e4)
    doc = tmp_path / "doc.md"
    doc.write_text(
        "<!-- experiments/dream_check.py dream-test fresh -->\n<!-- /experiments/dream_check.py dream-test fresh -->\n"
    )
    fresh = run(trained, *SMALL, "--fresh", "--markdown", str(doc), cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert rows(fresh.stdout) == rows(run(initial, *SMALL, cwd=tmp_path).stdout)
    assert rows(fresh.stdout)["imagined h = 1"][0] != "1.000"
    assert "`dream-test` (seed 1) freshly initialised" in doc.read_text()
