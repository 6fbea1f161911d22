"""experiments/verdicts.py: its statistics against exact oracles, and its CLI on hand-made curves CSVs."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import verdicts  # noqa: E402


def test_permutation_p_counts_the_splits_as_extreme_as_the_observed_one():
    # 3 against 3 seeds: 20 splits; only the observed one and its mirror reach |difference| = 3
    assert verdicts.permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    # identical cells: every split is at least as extreme as a difference of 0
    assert verdicts.permutation_p([1, 1], [1, 1]) == 1.0
    # [0, 10] against [5, 5]: the difference 0 is the least extreme there is
    assert verdicts.permutation_p([0, 10], [5, 5]) == 1.0
    # 5 against 5, fully separated: 2 of the 252 splits
    assert verdicts.permutation_p(range(5), range(10, 15)) == pytest.approx(2 / math.comb(10, 5))


def test_random_splits_estimate_the_exact_permutation_p():
    """Beyond the exact limit the p-value comes from random splits: (hits + 1) / (reps + 1), whose error against the
    exact p is binomial. 10 seeds against 10 (184,756 splits), computed both ways."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 10), rng.normal(0.8, 1.0, 10)
    exact = verdicts.permutation_p(a, b)
    reps = 20_000
    approx = verdicts.permutation_p(a, b, exact_limit=1000, reps=reps)
    assert 0.0 < exact < 1.0
    assert abs(approx - exact) <= 5 * math.sqrt(exact * (1 - exact) / reps) + 1 / reps  # 5 binomial std: fails ~1e-6
    # fully separated cells of 12 seeds: only 2 of the C(24, 12) = 2,704,156 splits are as extreme, so p ~ 1 / (reps + 1)
    assert verdicts.permutation_p(range(12), range(100, 112), reps=reps) <= 3 / (reps + 1)


def test_bootstrap_ci_of_constant_cells_is_their_difference():
    lo, hi = verdicts.bootstrap_ci([3.0, 3.0, 3.0], [1.0, 1.0])
    assert lo == hi == 2.0
    lo, hi = verdicts.bootstrap_ci([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.0])
    assert 0.0 <= lo < 2.0 < hi <= 4.0  # the observed difference 2 inside, the bounds inside the possible range


def test_gap_change_ci_of_constant_cells_is_the_change_of_the_gap():
    # gap 3 - 1 = 2 at the new setting, 5 - 4 = 1 at the reference: the gap grows by exactly 1 in every resample
    lo, hi = verdicts.bootstrap_gap_change_ci([3.0, 3.0], [1.0, 1.0, 1.0], [5.0, 5.0], [4.0, 4.0])
    assert lo == hi == 1.0
    lo, hi = verdicts.bootstrap_gap_change_ci([0.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    assert 0.0 <= lo < 1.0 < hi <= 2.0  # the observed change 1 inside, the bounds inside the possible range


def test_gap_change_row_on_hand_made_curves():
    def cell(values):  # one-iteration runs, V* = 10
        return {seed: curve([v]) for seed, v in enumerate(values, 1)}

    row = verdicts.gap_change_row("g", verdicts.normalised_final, (cell([6, 6]), cell([2, 2])), (cell([5, 5]), cell([4, 4])))
    assert row == "| g | gap 0.4 | gap 0.1 | 0.3 | – (bootstrap only) | [0.3, 0.3] |  |"
    row = verdicts.gap_change_row("g", verdicts.normalised_final, (cell([6]), cell([2, 2])), (cell([5, 5]), cell([4, 4])))
    assert "needs 2 seeds a cell" in row
    assert verdicts.gap_change_row("g", verdicts.normalised_final, ({}, cell([2, 2])), (cell([5]), cell([4]))).startswith(
        "| g | – | – | – | needs 2 seeds a cell"
    )


def curve(values, **tags):
    c = {"global_step": [1024 * (k + 1) for k in range(len(values))], "init_value": list(values), "optimal_value": [10.0]}
    return c | {tag: tags.get(tag, [math.nan] * len(values)) for tag in ("sir", "transition_loss", "repr_dist_normalized")}


def test_run_measures_on_hand_made_curves():
    c = curve([1.0, 3.0, 2.5, 4.0, 1.0] + [5.0] * 10, sir=[1.0] * 14 + [1.7], transition_loss=list(range(15)))
    assert verdicts.early_value(c) == pytest.approx(np.mean([1.0, 3.0, 2.5, 4.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0]))
    assert verdicts.worst_fall(c) == 3.0  # 4.0 -> 1.0
    assert verdicts.worst_fall(curve([1.0, 2.0, 3.0])) == 0.0
    assert verdicts.final_lp(c) == np.mean(range(5, 15))  # the last 10 iterations
    assert verdicts.max_sir(c) == 1.7 and verdicts.normalised_final(c) == 0.5
    assert verdicts.normalised_mean(curve([1.0, 2.0, 6.0])) == pytest.approx(0.3)  # mean 3 over V* = 10
    cut = {1: curve([1.0, 2.0, 3.0]), 2: curve([1.0, 2.0])}
    assert list(verdicts.whole_runs(cut)) == [1]  # seed 2 stopped before the cell's last step


def test_cli_tables_on_hand_made_curves(tmp_path):
    learning = tmp_path / "docs" / "learning"
    learning.mkdir(parents=True)
    header = "cell,n,gamma,seed,wall_s,global_step,init_value,star_blind_value,optimal_value,repr_dist_normalized,sir,"
    lines = [header + "transition_loss,reward_loss"]
    for cell, values in (("deepspi clip-coef=0.1", [5.0, 6.0, 7.0]), ("deepspi clip-coef=0.5", [8.0, 9.0, 10.0])):
        for seed, v in enumerate(values, 1):
            lines += [f"{cell},10,0.99,{seed},1.0,{1024 * k},{v},9.37,16.58,0.5,1.1,70,0.1" for k in (1, 2)]
    (learning / "maze_sweep_clip_curves.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.md").write_text(
        "a\n<!-- experiments/verdicts.py docs/learning -->\nold\n<!-- /experiments/verdicts.py docs/learning -->\nb\n"
    )
    cmd = [sys.executable, os.path.join(REPO, "experiments", "verdicts.py"), "--markdown", "r.md"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = "| deepspi: early V | C = 1.5: 9 ± 0.816 (3 seeds) | C = 1.1: 6 ± 0.816 (3 seeds) | 3 | 0.100 (20 splits) |"
    assert row in proc.stdout, proc.stdout
    assert "| deepspi: early V | C = 1.01: no run |" in proc.stdout
    text = (tmp_path / "r.md").read_text()
    assert row in text and "old" not in text and text.endswith("<!-- /experiments/verdicts.py docs/learning -->\nb\n")
    (tmp_path / "bad.md").write_text("no markers\n")
    proc = subprocess.run(cmd[:2] + ["--markdown", "bad.md"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_p_value_that_rounds_to_zero_reads_below_one_in_a_thousand():
    """Random splits give p >= 1 / 100,001, never 0: such a p prints as "< 0.001", the others to 3 decimals."""
    assert verdicts.p_text(1 / 100_001) == "< 0.001"
    assert verdicts.p_text(0.0004999) == "< 0.001"
    assert verdicts.p_text(0.0005) == "0.001"  # not below 0.0005: to 3 decimals
    assert verdicts.p_text(2 / 252) == "0.008"
