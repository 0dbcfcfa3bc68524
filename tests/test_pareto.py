"""Pareto filter, dominance and hypervolume against hand-worked and brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest

from dse.pareto import REFERENCE, bounds, dominates, hypervolume, losses, nondominated


def test_losses_negate_maximised_objectives():
    got = losses([[0.5, 100.0, 2.0]], ["minimize", "maximize", "minimize"])
    assert got.tolist() == [[0.5, -100.0, 2.0]]
    # a study's own directions are IntEnum members, whose str() is a number
    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    assert losses([[0.5, 100.0, 2.0]], study.directions).tolist() == [[0.5, -100.0, 2.0]]


def test_nondominated_and_dominates_by_hand():
    loss = np.array([[1, 5], [2, 2], [3, 3], [5, 1], [2, 2], [1, 6]], dtype=float)
    # (3,3) is dominated by (2,2); (1,6) by (1,5); the duplicate (2,2) rows dominate neither other
    assert nondominated(loss).tolist() == [True, True, False, True, True, False]
    assert dominates([0.1, 200.0], [0.2, 150.0], ["minimize", "maximize"])
    assert not dominates([0.1, 200.0], [0.1, 200.0], ["minimize", "maximize"])  # equal is not dominance
    assert not dominates([0.1, 100.0], [0.2, 150.0], ["minimize", "maximize"])


def test_nondominated_against_brute_force_with_ties_and_infinities():
    rng = np.random.default_rng(1)
    for n, k in ((0, 3), (1, 2), (40, 2), (300, 3)):
        loss = rng.integers(0, 6, size=(n, k)).astype(float)  # small integers: many equal rows and ties
        if n:
            loss[rng.random(n) < 0.1, 0] = np.inf
        expected = [not any(np.all(o <= row) and np.any(o < row) for o in loss) for row in loss]
        assert nondominated(loss).tolist() == expected


def test_hypervolume_2d_by_hand():
    # bounds [0, 1] per objective; reference 1.1: staircase of (0, 1), (0.5, 0.5), (1, 0)
    loss = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    lo, hi = bounds(loss)
    # 3 slabs: x in [0, .5) height 1.1-1.0; x in [.5, 1) height 1.1-0.5; x in [1, 1.1) height 1.1
    expected = 0.5 * 0.1 + 0.5 * 0.6 + 0.1 * 1.1
    assert hypervolume(loss, lo, hi) == pytest.approx(expected, abs=1e-12)
    # a dominated point adds nothing; a point beyond the reference is ignored
    more = np.vstack([loss, [[0.8, 0.9]], [[2.0, -5.0]]])
    assert hypervolume(more, lo, hi) == pytest.approx(expected, abs=1e-12)


def test_hypervolume_3d_against_a_brute_force_grid():
    rng = np.random.default_rng(0)
    loss = rng.random((7, 3)) * np.array([2.0, 50.0, 0.1]) + np.array([0.0, -100.0, 0.05])
    lo, hi = bounds(loss)
    scaled = (loss - lo) / (hi - lo)
    n = 110  # grid cells of 0.01 up to the reference point 1.1
    centres = (np.arange(n) + 0.5) / 100
    covered = 0
    for x, y in itertools.product(centres, centres):
        column = np.all(scaled[:, :2] <= [x, y], axis=1)
        if column.any():  # cells above the lowest third coordinate of the points that cover (x, y)
            covered += np.sum(centres >= scaled[column, 2].min())
    assert REFERENCE == 1.1
    assert hypervolume(loss, lo, hi) == pytest.approx(covered / 100 ** 3, abs=3e-3)


def test_hypervolume_history_equals_wfg_on_every_prefix():
    """The incremental history (volume recomputed only when the front changes) against Optuna's WFG on each
    prefix of the feasible trials; infeasible and unevaluated trials do not count."""
    from dse.optuna_private import compute_hypervolume

    from dse.pareto import hypervolume_history

    rng = np.random.default_rng(1)
    directions = ["minimize", "maximize", "minimize"]
    trials, kept = [], []
    for number in range(60):
        values = [float(rng.random()), float(rng.random() * 100), float(rng.random() * 0.1)]
        if number % 7 == 3:
            values = list(trials[-1].values)  # a duplicate of the previous point
        feasible = number % 5 != 0
        trials.append(optuna.trial.create_trial(values=values, user_attrs={"evaluated": feasible}))
        if feasible:
            kept.append((number, values))
    for number, t in enumerate(trials):
        t.number = number
    loss = np.array([v for _, v in kept]) * np.array([1.0, -1.0, 1.0])
    lo, hi = loss.min(0), loss.max(0)
    scaled = (loss - lo) / (hi - lo)
    expected = [compute_hypervolume(scaled[: i + 1], np.full(3, REFERENCE)) for i in range(len(kept))]
    got = hypervolume_history(trials, directions)
    assert [n for n, _ in got] == [n for n, _ in kept]
    assert [v for _, v in got] == pytest.approx(expected, rel=1e-12)
    assert all(b >= a for a, b in zip(expected, expected[1:]))
