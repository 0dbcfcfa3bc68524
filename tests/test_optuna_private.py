"""Optuna's private API the project uses, all of it in :mod:`dse.optuna_private` (``optuna<6`` pinned): this
test imports exactly those names from Optuna and fails when a release moves or changes them."""

from __future__ import annotations

import ast
from datetime import timezone

import numpy as np
import optuna

from helpers import ROOT


def test_the_private_names_are_where_dse_optuna_private_takes_them():
    from optuna._hypervolume import compute_hypervolume
    from optuna.storages._rdb.models import StudyModel, TrialModel

    assert compute_hypervolume(np.array([[0.5, 0.5]]), np.array([1.0, 1.0])) == 0.25
    assert compute_hypervolume(np.array([[0.5, 0.5]]), np.array([1.0, 1.0]), assume_pareto=True) == 0.25
    assert StudyModel.__tablename__ == "studies" and TrialModel.__tablename__ == "trials"
    for column in ("study_id", "study_name"):
        assert hasattr(StudyModel, column)
    for column in ("trial_id", "study_id", "state", "_datetime_start_utc", "_datetime_complete_utc"):
        assert hasattr(TrialModel, column)
    study = optuna.load_study(study_name="s", storage=_storage_with_study())
    assert isinstance(getattr(study._storage, "_backend", study._storage), optuna.storages.RDBStorage)


def _storage_with_study() -> optuna.storages.RDBStorage:
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    optuna.create_study(study_name="s", storage=storage)
    return storage


def test_trial_counts_and_study_storage():
    from dse.optuna_private import study_storage, trial_counts

    storage = _storage_with_study()
    study = optuna.load_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.ask()
    optuna.create_study(study_name="empty", storage=storage)
    counts = trial_counts(storage)
    assert set(counts) == {"s"}
    states, last = counts["s"]
    assert states == {"COMPLETE": 3, "RUNNING": 1}
    newest = max(t.datetime_complete or t.datetime_start for t in study.trials)  # naive local time
    assert abs(last.replace(tzinfo=timezone.utc).timestamp() - newest.timestamp()) < 1e-3
    assert study_storage(study) is storage


def test_no_other_module_imports_optuna_private_names():
    """``optuna._*`` imports and ``._storage`` / ``._trial_id`` / ``._study_id`` reads only in dse/optuna_private.py."""
    offenders = []
    for path in [*(ROOT / "dse").glob("*.py"), *(ROOT / "dashboard").glob("*.py")]:
        if path.name == "optuna_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
                if any(part.startswith("_") for part in node.module.split(".")):
                    offenders.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("_storage", "_trial_id", "_study_id", "_backend"):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders
