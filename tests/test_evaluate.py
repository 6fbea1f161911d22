"""evaluate.py through its real CLI: which training script it takes (the one the file records, else the older rule from
the exp_name, else --script) and the last line naming where it wrote. The files are made here from each script's
Agent and Args, as a checkpoint or --save-model writes them ({"model", "args"}, plus "script" where recorded), so that
the tests do not train."""

import dataclasses
import glob
import os

import pytest
import torch
from conftest import error_lines, read_scalars, run_script

import deepspi_atari as d
import deepspi_maze as dm
import dreamspi_atari as ds


def saved_file(path, module, script=None, **args):
    """A .cleanrl_model of `module`'s freshly initialised Agent (4 actions) with the script's default arguments updated
    by `args`; "script": script unless None (an older file)."""
    torch.manual_seed(0)
    saved = {"model": module.Agent(4).state_dict(), "args": dataclasses.asdict(module.Args()) | args}
    if script is not None:
        saved["script"] = script
    torch.save(saved, path)
    return str(path)


def dreamspi_model(path, script="dreamspi_atari.py", exp_name="dreamspi_128x8"):
    """A DreamSPI model saved with another --exp-name, as docs/results.md's runs are (its Agent has a done head, which
    deepspi_atari.py's has not)."""
    return saved_file(path, ds, script, exp_name=exp_name, env_backend="gymnasium", num_envs=2, seed=1)


def eval_dirs(cwd):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(cwd), "runs", "*__eval")))


def test_the_recorded_script_is_taken_whatever_the_exp_name_and_the_last_line_names_the_folders(tmp_path):
    """A DreamSPI model with --exp-name dreamspi_128x8 that records "dreamspi_atari.py": evaluated with DreamSPI's Agent
    (the older rule would take deepspi_atari.py, which does not fit); the last line names the eval run folder and the
    video folder, both of which exist and hold the results."""
    model = dreamspi_model(tmp_path / "dreamspi_128x8.cleanrl_model")
    proc = run_script("evaluate.py", model, "--episodes", "1", "--capture-video", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_name,) = eval_dirs(tmp_path)
    assert run_name.startswith("BreakoutNoFrameskip-v4__dreamspi_128x8__3__")  # the default seed: 1 + num_envs
    assert proc.stdout.splitlines()[-1] == f"eval results: runs/{run_name}, videos: videos/{run_name}"
    scalars = read_scalars(str(tmp_path / "runs" / run_name))
    assert len(scalars["eval/greedy_episodic_return"]) == len(scalars["eval/episodic_return"]) == 1
    assert sorted(os.listdir(tmp_path / "videos" / run_name)) == ["greedy", "sampled"]


def test_an_older_file_without_the_script_takes_its_exp_name_then_says_how_to_pass_script(tmp_path):
    """Files that do not record their script keep the older rule: {exp_name}.py when the repository has it (here
    dreamspi_atari.py), else deepspi_atari.py, whose Agent a DreamSPI model does not fit: one line that says the file
    records no script and how to give it; with --script dreamspi_atari.py (a name, from another folder) it plays."""
    by_name = dreamspi_model(tmp_path / "a.cleanrl_model", script=None, exp_name="dreamspi_atari")
    proc = run_script("evaluate.py", by_name, "--episodes", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_name,) = eval_dirs(tmp_path)
    assert "__dreamspi_atari__" in run_name and proc.stdout.splitlines()[-1] == f"eval results: runs/{run_name}"

    renamed = dreamspi_model(tmp_path / "b.cleanrl_model", script=None, exp_name="dreamspi_128x8")
    proc = run_script("evaluate.py", renamed, "--episodes", "1", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "does not fit the Agent of deepspi_atari.py" in line and "does not record its training script" in line
    assert "exp_name dreamspi_128x8" in line and line.endswith("e.g. dreamspi_atari.py, with --script"), line
    assert len(eval_dirs(tmp_path)) == 1  # nothing written

    proc = run_script("evaluate.py", renamed, "--episodes", "1", "--script", "dreamspi_atari.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(eval_dirs(tmp_path)) == 2 and "__dreamspi_128x8__" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    "make, flags, message",
    [
        # a deepspi_atari.py model that records dreamspi_atari.py (a file edited by hand): the recorded script is taken
        (
            lambda p: saved_file(p, d, "dreamspi_atari.py"),
            [],
            "does not fit the Agent of dreamspi_atari.py; give the script that wrote it with --script",
        ),
        (lambda p: saved_file(p, dm, "deepspi_maze.py"), [], "deepspi_maze.py has no Atari games to play"),
        (lambda p: saved_file(p, dm), [], "deepspi_maze.py has no Atari games to play"),  # older: from its exp_name
        (lambda p: saved_file(p, d, "gone.py"), [], "no training script"),
        (lambda p: saved_file(p, d, "deepspi_atari.py"), ["--script", "nowhere.py"], "no training script nowhere.py"),
    ],
    ids=["recorded-script-does-not-fit", "maze-recorded", "maze-older", "recorded-script-missing", "missing-script"],
)
def test_a_file_its_script_cannot_play_exits_2_with_one_line(tmp_path, make, flags, message):
    model = make(tmp_path / "model.cleanrl_model")
    proc = run_script("evaluate.py", model, *flags, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert message in line, line
    assert not (tmp_path / "runs").exists()
