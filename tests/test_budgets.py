"""The scripts' size budgets (ceilings, experiments/diff_tour.py's LINE_BUDGETS and DIFF_BUDGETS) that need no file from
outside the repository: each script's lines, and the changed lines (`diff -w`) of each variant against deepspi_atari.py.
The budget against CleanRL's ppo_atari.py needs CleanRL's file: experiments/diff_tour.py checks it."""

import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import diff_tour  # noqa: E402


@pytest.mark.parametrize("name", list(diff_tour.LINE_BUDGETS))
def test_script_lines_within_budget(name):
    assert diff_tour.count_lines(os.path.join(REPO, name)) <= diff_tour.LINE_BUDGETS[name]


@pytest.mark.parametrize("pair", [p for p in diff_tour.DIFF_BUDGETS if p[0] != "ppo_atari.py"], ids=lambda p: p[1])
def test_variant_changed_lines_within_budget(pair):
    parent, name = pair
    changed = sum(diff_tour.changed_lines(os.path.join(REPO, parent), os.path.join(REPO, name)))
    assert changed <= diff_tour.DIFF_BUDGETS[pair], f"{name}: {changed} lines changed against {parent}"
