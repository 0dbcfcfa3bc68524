"""Pareto fronts and hypervolume of stored trials (pure functions of trial values).

Objectives are turned into losses (maximised ones negated) and, for the hypervolume,
normalised per objective to [0, 1] between given bounds (``lo`` best, ``hi`` worst);
the reference point is 1.1 in every normalised objective, so a plan at the worst bound
still adds volume. The volume itself is Optuna's exact WFG computation
(``optuna._hypervolume.compute_hypervolume``: Optuna 5 has no public one, so it comes through
:mod:`dse.optuna_private`). Comparing two fronts needs the same bounds for both: :func:`bounds` of their union.
"""

from __future__ import annotations

import numpy as np
import optuna

from dse.optuna_private import compute_hypervolume

REFERENCE = 1.1
"""Reference point of the hypervolume in every normalised objective."""


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """A completed trial that passed the hardware screen, was evaluated, and breaks no constraint."""
    return (trial.state == optuna.trial.TrialState.COMPLETE and bool(trial.user_attrs.get("evaluated"))
            and all(v <= 0 for v in trial.constraints.values()))


def _maximised(direction) -> bool:
    """For ``StudyDirection`` members (an IntEnum: ``str()`` gives a number) and direction names alike."""
    if isinstance(direction, optuna.study.StudyDirection):
        return direction == optuna.study.StudyDirection.MAXIMIZE
    return str(direction).lower() == "maximize"


def losses(values, directions) -> np.ndarray:
    """Objective values (rows = trials) as losses: maximised objectives negated."""
    signs = np.array([-1.0 if _maximised(d) else 1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(signs)) * signs


def nondominated(loss: np.ndarray) -> np.ndarray:
    """Boolean mask of rows no other row dominates (<= everywhere, < somewhere); equal rows are all kept.
    The distinct rows in lexicographic order: the first remaining one is on the front (no later row can
    dominate it) and removes those it dominates; one pass per front point."""
    loss = np.asarray(loss, dtype=float)
    if len(loss) == 0:
        return np.zeros(0, dtype=bool)
    rows, inverse = np.unique(loss, axis=0, return_inverse=True)
    keep = np.zeros(len(rows), dtype=bool)
    remaining = np.arange(len(rows))
    while remaining.size:
        keep[remaining[0]] = True
        rest = remaining[1:]
        remaining = rest[~np.all(rows[remaining[0]] <= rows[rest], axis=1)]
    return keep[inverse.reshape(-1)]


def dominates(a, b, directions) -> bool:
    """Whether objective vector ``a`` Pareto-dominates ``b``."""
    la, lb = losses([a], directions)[0], losses([b], directions)[0]
    return bool(np.all(la <= lb) and np.any(la < lb))


def bounds(loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective best and worst loss of the rows (the normalisation of :func:`hypervolume`)."""
    loss = np.asarray(loss, dtype=float)
    return loss.min(axis=0), loss.max(axis=0)


def hypervolume(loss: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Hypervolume of the rows, normalised between ``lo`` and ``hi``, against :data:`REFERENCE`."""
    loss = np.asarray(loss, dtype=float)
    if loss.size == 0:
        return 0.0
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = (loss - lo) / span
    inside = np.all(scaled < REFERENCE, axis=1)
    if not inside.any():
        return 0.0
    points = scaled[inside]
    return float(compute_hypervolume(points[nondominated(points)], np.full(loss.shape[1], REFERENCE),
                                     assume_pareto=True))


def trial_losses(trials, directions) -> np.ndarray:
    return losses([t.values for t in trials], directions) if trials else np.zeros((0, len(directions)))


def study_front(study: optuna.Study, trials=None) -> list[optuna.trial.FrozenTrial]:
    """Feasible evaluated trials on the front (one per distinct objective vector), in trial order."""
    trials = [t for t in (trials if trials is not None else study.get_trials(deepcopy=False)) if is_feasible(t)]
    if not trials:
        return []
    loss = trial_losses(trials, study.directions)
    mask = nondominated(loss)
    seen, out = set(), []
    for trial, keep in zip(trials, mask):
        key = tuple(trial.values)
        if keep and key not in seen:
            seen.add(key)
            out.append(trial)
    return out


def study_hypervolume(study: optuna.Study, trials=None) -> float:
    """Hypervolume of the study's feasible trials, normalised by their own bounds (a progress figure)."""
    trials = [t for t in (trials if trials is not None else study.get_trials(deepcopy=False)) if is_feasible(t)]
    if not trials:
        return 0.0
    loss = trial_losses(trials, study.directions)
    return hypervolume(loss, *bounds(loss))


def hypervolume_history(trials, directions) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the feasible trials up to it) for each feasible trial in number order,
    all normalised by the bounds of every feasible trial, so the curve never falls. The volume is computed
    again only when a trial enters the front (a weakly dominated one leaves it unchanged)."""
    trials = sorted((t for t in trials if is_feasible(t)), key=lambda t: t.number)
    if not trials:
        return []
    loss = trial_losses(trials, directions)
    lo, hi = bounds(loss)
    front, volume, out = loss[:0], 0.0, []
    for trial, row in zip(trials, loss):
        if not np.any(np.all(front <= row, axis=1)):
            front = np.vstack([front[~np.all(row <= front, axis=1)], row])
            volume = hypervolume(front, lo, hi)
        out.append((trial.number, volume))
    return out
