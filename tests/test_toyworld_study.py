"""The study's choices on validation identities: sampler settings (study.choose_sampling) and Apply
Predicted LoRA's strength (study.choose_strength), both by the one-standard-error rule."""

from __future__ import annotations

import numpy as np

from difflora_toyworld.study import choose_sampling, choose_strength, strength_key, validation_key

GRID = [("ddim", 25, 3.0), ("ddim", 10, 3.0), ("dpm++", 5, 2.0)]


def _rows(per_identity: dict, prompt: dict | None = None, base_prompt: float = 0.70) -> dict:
    rows = {"val-base": {"prompt_accuracy": base_prompt, "per_identity": [0.27] * 4}}
    for setting, values in per_identity.items():
        rows[validation_key(*setting)] = {"per_identity": list(values),
                                          "prompt_accuracy": (prompt or {}).get(setting, base_prompt)}
    return rows


def test_the_cheapest_setting_within_one_standard_error_of_the_best_wins():
    best = np.linspace(0.40, 0.50, 32)
    wobble = 0.02 * np.resize([1.0, -1.0], 32)  # paired SE 0.0036: a mean 0.002-0.003 lower is within it
    rows = _rows({GRID[0]: best, GRID[1]: best - 0.002 + wobble, GRID[2]: best - 0.003 + wobble})
    choice = choose_sampling(rows, GRID)
    assert (choice["sampler"], choice["steps"], choice["guidance"]) == ("dpm++", 5, 2.0)
    assert choice["best"] == list(GRID[0])


def test_a_cheaper_setting_clearly_worse_than_the_best_is_not_chosen():
    best = np.linspace(0.40, 0.50, 32)
    rows = _rows({GRID[0]: best, GRID[1]: best - 0.03, GRID[2]: best - 0.05})  # every identity loses
    choice = choose_sampling(rows, GRID)
    assert (choice["sampler"], choice["steps"]) == ("ddim", 25)
    assert choice["identity_accuracy"] == choice["best_identity_accuracy"]


def test_settings_that_cost_the_prompt_more_than_five_points_are_not_eligible():
    best = np.linspace(0.40, 0.50, 32)
    rows = _rows({GRID[0]: best + 0.05, GRID[1]: best, GRID[2]: best - 0.05},
                 prompt={GRID[0]: 0.60})  # the most identity, 10 points of prompt lost
    choice = choose_sampling(rows, GRID)
    assert choice["best"] == list(GRID[1]) and choice["eligible"] == 2


def _strength_rows(per_identity: dict, prompt: dict | None = None, base_prompt: float = 0.70) -> dict:
    rows = {"val-base": {"prompt_accuracy": base_prompt, "per_identity": [0.27] * 4}}
    for s, values in per_identity.items():
        rows[strength_key(s, "val")] = {"per_identity": list(values), "prompt_accuracy": (prompt or {}).get(s, base_prompt)}
    return rows


def test_the_strength_nearest_one_within_one_standard_error_of_the_best_wins():
    best = np.linspace(0.40, 0.50, 32)
    wobble = 0.02 * np.resize([1.0, -1.0], 32)
    rows = _strength_rows({1.0: best - 0.002 + wobble, 1.5: best - 0.001 + wobble, 2.0: best})
    choice = choose_strength(rows, (1.0, 1.5, 2.0))
    assert choice["strength"] == 1.0 and choice["best"] == 2.0


def test_a_strength_that_clearly_adds_identity_is_chosen():
    best = np.linspace(0.40, 0.50, 32)
    rows = _strength_rows({1.0: best - 0.06, 1.5: best, 2.0: best - 0.03})  # every identity gains at 1.5
    choice = choose_strength(rows, (1.0, 1.5, 2.0))
    assert choice["strength"] == 1.5 and choice["identity_accuracy"] == choice["best_identity_accuracy"]


def test_a_strength_that_costs_the_prompt_more_than_five_points_is_not_eligible():
    best = np.linspace(0.40, 0.50, 32)
    rows = _strength_rows({1.0: best - 0.06, 1.5: best, 2.0: best + 0.05}, prompt={2.0: 0.60})
    choice = choose_strength(rows, (1.0, 1.5, 2.0))
    assert choice["strength"] == 1.5 and choice["eligible"] == 2
