"""benchmarks/gpu_check.py through its real CLI: the dry run (the whole check at a tiny size on the CPU) and bad input."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

CHECK = os.path.join(REPO, "benchmarks", "gpu_check.py")
BEGIN, END = "<!-- benchmarks/gpu_check.py -->", "<!-- /benchmarks/gpu_check.py -->"


def gpu_check(*flags, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, CHECK, *flags], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def test_dry_run_runs_every_part_and_writes_one_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{BEGIN}\nold block\n{END}\nafter\n")
    proc = gpu_check("--dry-run", "--markdown", str(doc), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "note: no --cleanrl PATH: the cleanrl mode is skipped" in proc.stderr
    text = doc.read_text()
    assert text.startswith(f"before\n{BEGIN}\n") and text.endswith(f"{END}\nafter\n") and "old block" not in text
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert block.strip() in proc.stdout  # the printed block is the written one
    head = block.strip().splitlines()[0]
    assert head.startswith("CPU only (--dry-run)") and f"; {os.cpu_count()} CPUs; torch {torch.__version__};" in head
    # the numerical tests ran on the CPU; their CUDA cases ran too where a GPU is, else they were skipped
    tests = re.search(r"\*\*Numerical tests\*\* \(.*?\): (.*)", block).group(1)
    cpu = re.search(r"\bcpu: (\d+) passed", tests)
    assert cpu and int(cpu.group(1)) > 0 and "failure" not in tests and "error" not in tests, tests
    assert re.search(r"\bcuda: \d+ " + ("passed" if torch.cuda.is_available() else "skipped"), tests), tests
    # the eight 3-iteration runs: four scripts, float32 and --bf16
    runs = re.findall(r"^\| `(.*?)` \| (\w+) \| \d+ \|$", block, re.M)
    scripts = ["deepspi_atari.py", "deepspi_atari_multigpu.py (torchrun, 1 process)", "dreamspi_atari.py", "deepspi_maze.py"]
    assert runs == [(f"{s}{bf16}", "ok") for s in scripts for bf16 in ("", " --bf16")], runs
    # steady SPS of the three modes at the two layouts, a positive number each
    sps = {
        m: (int(a), int(b)) for m, a, b in re.findall(r"^\| (deepspi|ppo|dreamspi) \| (\d+) \|  \| (\d+) \|  \|$", block, re.M)
    }
    assert sorted(sps) == ["deepspi", "dreamspi", "ppo"] and min(min(v) for v in sps.values()) > 0, block
    assert "failed" not in block


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dry-run", "--cleanrl", "no_such_file.py"], "--cleanrl no_such_file.py: no such file"),
        (["--dry-run", "--markdown", "no_such_folder/out.md"], "--markdown no_such_folder/out.md: its folder does not exist"),
        (["--dry-run", "--markdown", os.path.join(REPO, "README.md")], "README.md: the file exists without the lines"),
        (["--dry-run", "--skip", "everything"], "argument --skip: invalid choice"),
        (["--dry-run", "--iterations", "3"], "unrecognized arguments: --iterations 3"),
        pytest.param(
            [],
            "no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run"),
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    proc = gpu_check(*flags, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: ") and message in lines[0], proc.stderr
    assert not os.listdir(tmp_path)
