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
    from optuna.storages._rdb.models import (StudyModel, TrialModel, TrialSystemAttributeModel,
                                             TrialUserAttributeModel, TrialValueModel)
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    assert compute_hypervolume(np.array([[0.5, 0.5]]), np.array([1.0, 1.0])) == 0.25
    assert compute_hypervolume(np.array([[0.5, 0.5]]), np.array([1.0, 1.0]), assume_pareto=True) == 0.25
    assert StudyModel.__tablename__ == "studies" and TrialModel.__tablename__ == "trials"
    for column in ("study_id", "study_name"):
        assert hasattr(StudyModel, column)
    for column in ("trial_id", "number", "study_id", "state", "_datetime_start_utc", "_datetime_complete_utc",
                   "datetime_start", "datetime_complete"):
        assert hasattr(TrialModel, column)
    for model in (TrialUserAttributeModel, TrialSystemAttributeModel):
        assert all(hasattr(model, c) for c in ("trial_id", "key", "value_json"))
    assert all(hasattr(TrialValueModel, c) for c in ("trial_id", "objective", "value", "value_type",
                                                     "stored_repr_to_value"))
    assert _CONSTRAINTS_KEY == "constraints"
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


def test_light_trials_equal_optunas_without_parameters():
    from dse.optuna_private import light_trials, user_attr

    storage = _storage_with_study()

    def objective(trial):
        trial.set_user_attr("small", {"x": 1})
        trial.set_user_attr("plan", {"layers": []})
        trial.set_constraint("fits", trial.suggest_float("x", -1, 1))
        return trial.suggest_float("y", 0, 1), float("inf")

    study = optuna.create_study(study_name="two", storage=storage, directions=["minimize", "maximize"])
    study.optimize(objective, n_trials=3)
    running = study.ask()
    study_id = storage.get_study_id_from_name("two")
    trials, fresh = light_trials(storage, study_id, {}, without=("plan",))
    assert len(fresh) == 4
    for got, want in zip(trials, study.get_trials(), strict=True):
        assert (got.number, got.state, got.values, got.constraints, got.datetime_start, got.datetime_complete) == (
            want.number, want.state, want.values, want.constraints, want.datetime_start, want.datetime_complete)
        assert got.user_attrs == {k: v for k, v in want.user_attrs.items() if k != "plan"} and got.params == {}
    known = {i: t for i, t in fresh.items() if t.state.is_finished()}
    again, fresh = light_trials(storage, study_id, known)
    assert all(a is b for a, b in zip(again[:3], trials[:3])) and len(fresh) == 1
    assert fresh[next(iter(fresh))].number == running.number
    assert user_attr(storage, list(known), "plan") == {i: {"layers": []} for i in known}


def test_no_other_module_imports_optuna_private_names():
    """``optuna._*`` imports and ``._storage`` / ``._trial_id`` / ``._study_id`` reads (dse, dashboard, bench) only in
    dse/optuna_private.py."""
    offenders = []
    for path in [*(ROOT / "dse").glob("*.py"), *(ROOT / "dashboard").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        if path.name == "optuna_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
                if any(part.startswith("_") for part in node.module.split(".")):
                    offenders.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("_storage", "_trial_id", "_study_id", "_backend"):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders
