import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "official")
sys.path.insert(0, REPO)
# in-process tests use small tensors; one thread avoids oversubscribing the 2-core CI machine (much faster there)
torch.set_num_threads(1)


def run_script(script, *flags, cwd, timeout=300):
    """Run one of the scripts through its real CLI, in `cwd` (so runs/ lands there); returns the CompletedProcess."""
    quiet = [] if script == "evaluate.py" else ["--no-progress"]  # the training scripts' progress bar
    cmd = [sys.executable, os.path.join(REPO, script), *quiet, *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# deepspi_atari.py's minibatch loop computes its loss inline: this line starts each minibatch's forward pass
FORWARD_LINE = "mb_obs = torch.cat([b_obs[mb_inds], b_next_obs[mb_inds]]) if world_model else b_obs[mb_inds]"


def resume_probed(script, checkpoint, cwd):
    """`script --resume checkpoint` through tests/probe.py, recording (in cwd/record.pt, as the first record's
    args["agent"]) the weights that the first minibatch of the resumed run sees."""
    probe = os.path.join(REPO, "tests", "probe.py")
    record = "" if script == "deepspi_atari.py" else "compute_losses:1"  # the others have a compute_losses function
    cmd = [sys.executable, probe, str(cwd / "record.pt"), record, os.path.join(REPO, script), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PROBE_MODULES="1", PROBE_LINES=json.dumps([[FORWARD_LINE, ["agent"], 1]]))
    return subprocess.run([*cmd, "--resume", checkpoint], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def read_scalars(run_dir):
    """All scalars of the TensorBoard event files in run_dir: {tag: [values]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run_dir(cwd):
    runs = glob.glob(os.path.join(str(cwd), "runs", "*"))
    assert len(runs) == 1, runs
    return runs[0]


def checkpoint_path(cwd):
    """The checkpoint.pt of the one run under cwd/runs, or None."""
    found = glob.glob(os.path.join(str(cwd), "runs", "*", "checkpoint.pt"))
    return found[0] if found else None


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def assert_finite_metrics(scalars, names):
    missing = [n for n in names if n not in scalars]
    assert not missing, f"missing metrics {missing}; have {sorted(scalars)}"
    for n in names:
        assert scalars[n] and all(math.isfinite(v) for v in scalars[n]), (n, scalars[n])


@pytest.fixture
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"official fixtures not found at {FIXTURES} (they live outside the repository, in ../shared)")
    return FIXTURES
