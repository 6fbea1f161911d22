import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "official")  # numbers from the official JAX code; see its README.md
sys.path.insert(0, REPO)
# ------------------------------------------------------------------------------------------- floating-point tolerances
# Two computations of the same quantity in float32 differ by their rounding, which depends on the order the CPU's kernels
# sum in (AVX2, AVX-512 and AMX builds of oneDNN and ATen each choose their own). The tolerances below follow from the
# size of the sums instead, so they hold on any CPU and stay far below the effect of a real bug (a sign, a term, a mask).
U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-9  # unit roundoff of bfloat16 (8 significant bits)
NUMERICAL_MODULES = {"test_atari", "test_dreamspi", "test_maze", "test_parity_official"}
NORMWISE_ERRORS = []  # (test, quantity, error, tolerance) of every assert_normwise, printed with TOLERANCE_REPORT=1


def f32_tol(k, computations=1):
    """Normwise relative error bound for a float32 result whose longest chain of sums (forward and backward) adds k terms
    in all, whatever the summation order: lambda sqrt(k) u per float32 computation compared, with lambda = 8 (Higham and
    Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019: a sum of k terms exceeds
    lambda sqrt(k) u times the sum of their magnitudes with probability below 2k exp(-lambda^2 / 2), 1e-10 here). A
    float64 reference counts as exact; two float32 computations compared with each other count twice."""
    return computations * 8 * math.sqrt(k) * U32


def bf16_tol(layers):
    """Normwise relative error bound for a result of `layers` matrix products in a row under bfloat16 autocast: each
    rounds both operands to bfloat16 (2 u16 per product, to first order; the sums themselves stay in float32)."""
    return 2 * layers * U16


def assert_normwise(got, ref, tol, name=""):
    """max |got - ref| <= tol * max |ref|, in float64: an error relative to the tensor's scale, since float32 sums err by
    a fraction of the magnitude of their terms, not of each (possibly cancelled, near-zero) element."""
    got, ref = torch.as_tensor(got).detach().cpu().double(), torch.as_tensor(ref).detach().cpu().double()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    err = (got - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
    NORMWISE_ERRORS.append((os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], name, err, tol))
    assert err <= tol, f"{name}: normwise relative error {err:.3g} > {tol:.3g}"
    return err


# ------------------------------------------------------------------------------------------------------------- devices
# The numerical tests that run the networks take the `device` fixture: each runs on the CPU always, and on CUDA where
# torch.cuda.is_available(), else that case is skipped with CUDA_SKIP. The modules are built on the CPU and moved with
# .to(device), the inputs drawn on the CPU and moved, as the scripts do; so both devices see the same numbers, and a
# factory call without device= inside a script fails on CUDA instead of passing unnoticed. The tolerances are the rules
# above on every device: the CUDA cases turn TF32 off (cuDNN uses it for float32 convolutions by default on Ampere and
# later GPUs, rounding their inputs to 10 mantissa bits, u = 2^-11), so that a float32 result is a float32 computation.
CUDA_SKIP = "CUDA is not available (torch.cuda.is_available() is False): the case runs where a GPU is"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP))]


@pytest.fixture(params=DEVICES)
def device(request):
    """torch.device("cpu"), then torch.device("cuda") (TF32 off for the test) where a GPU is."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def pytest_configure(config):
    config.addinivalue_line("markers", "numerical: in-process floating-point checks, which CI also runs on AVX2 code paths")


def pytest_collection_modifyitems(items):
    """The in-process tests of the modules that compare floats are `numerical` (seconds in all); the CLI runs (the ones
    that need a temporary folder) are not."""
    for item in items:
        module = getattr(item.module, "__name__", "")
        if module in NUMERICAL_MODULES and not {"tmp_path", "tmp_path_factory"} & set(item.fixturenames):
            item.add_marker("numerical")


def pytest_terminal_summary(terminalreporter):
    """With TOLERANCE_REPORT=1: the worst error of each tolerance, beside its bound, and the CPU code path in use."""
    if not os.environ.get("TOLERANCE_REPORT") or not NORMWISE_ERRORS:
        return
    worst = {}
    for test, name, err, tol in NORMWISE_ERRORS:
        key = (test.split("[")[0], tol)
        if key not in worst or err > worst[key][0]:
            worst[key] = (err, name)
    terminalreporter.section(f"normwise errors (ATen {torch.backends.cpu.get_cpu_capability()})")
    for (test, tol), (err, name) in sorted(worst.items()):
        margin = f"{tol / err:7.1f}x" if err else "  exact"
        terminalreporter.write_line(f"{err:9.2e} <= {tol:9.2e} {margin}  {test}  {name}")


# in-process tests use small tensors; one thread avoids oversubscribing the 2-core CI machine (much faster there)
torch.set_num_threads(1)
# and so does every script a test starts, which inherits this environment (a test that wants more threads sets its own):
# pytest-xdist runs a test file per core, and torch's OpenMP threads spin while they wait for a core. Measured on a 2-core
# Xeon, three 3-iteration `deepspi_atari.py --deep-mdp` runs started side by side took 35, 379 and 380 s with torch's
# default 2 threads (CI timed such a run out at 300 s), and 16 s each with OMP_NUM_THREADS=1 (5 s alone).
os.environ["OMP_NUM_THREADS"] = "1"


def run_script(script, *flags, cwd, timeout=300):
    """Run one of the scripts through its real CLI, in `cwd` (so runs/ lands there); returns the CompletedProcess."""
    quiet = [] if script == "evaluate.py" else ["--no-progress"]  # the training scripts' progress bar
    cmd = [sys.executable, os.path.join(REPO, script), *quiet, *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# the inline loss of deepspi_atari.py and dreamspi_atari.py: the line that starts each minibatch's forward pass
# the line before a minibatch's forward pass, the same in both scripts (docs/tests.md, "Observed lines and names")
FORWARD_LINES = {"deepspi_atari.py": "mb_inds = b_inds[start:end]", "dreamspi_atari.py": "mb_inds = b_inds[start:end]"}


def resume_probed(script, checkpoint, cwd):
    """`script --resume checkpoint` through tests/probe.py, recording (in cwd/record.pt, as the first record's
    args["agent"]) the weights that the first minibatch of the resumed run sees."""
    probe = os.path.join(REPO, "tests", "probe.py")
    lines = [[FORWARD_LINES[script], ["agent"], 1]]
    cmd = [sys.executable, probe, str(cwd / "record.pt"), "", os.path.join(REPO, script), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PROBE_MODULES="1", PROBE_LINES=json.dumps(lines))
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
    return FIXTURES
