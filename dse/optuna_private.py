"""Every use of Optuna's private API in the project, in this one module (``optuna<6`` is pinned in
pyproject.toml; ``tests/test_optuna_private.py`` imports exactly these names and fails if Optuna moves them).

Optuna 5.0 has no public counterpart for any of them:

* ``optuna._hypervolume.compute_hypervolume``: the exact (WFG) hypervolume. The public API offers it only
  inside plots (``optuna.visualization.plot_hypervolume_history``) and the terminator;
* ``optuna.storages._rdb.models``: the RDB schema (Optuna maintains and migrates it), for the trial counts
  per study and state that the studies page shows without loading any trial (the public
  ``get_all_trials`` would read every trial of every study), and for :func:`light_trials`: the trials
  without their parameters. A driver's trial has one parameter per searched unit (121 for the default
  space), and Optuna's public ``get_trials()`` parses each one's distribution: 1.7 s for 300 trials where
  the values, constraints and user attributes alone take 0.02 s;
* ``optuna.study._constrained_optimization._CONSTRAINTS_KEY``: the system attribute that holds constraint
  values (``FrozenTrial.constraints`` reads it);
* ``Study._storage``: the storage a loaded study reads from, so :func:`dse.records.TrialRecords.of` finds a
  study's records when a caller hands over only the study (``Study`` has no public storage accessor).
"""

from __future__ import annotations

import json
from datetime import datetime

import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.storages._rdb.models import (StudyModel, TrialModel, TrialSystemAttributeModel,
                                         TrialUserAttributeModel, TrialValueModel)
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial

__all__ = ["compute_hypervolume", "light_trials", "study_storage", "trial_counts", "user_attr"]
_IN_CHUNK = 500
"""Trial ids per ``IN (...)`` query (below every database's bound-parameter limit)."""


def trial_counts(storage: optuna.storages.RDBStorage) -> dict[str, tuple[dict[str, int], datetime | None]]:
    """Per study name: trials per state name, and the time (naive UTC) of its latest trial start or finish;
    two aggregate queries, no trial loaded."""
    from sqlalchemy import func
    from sqlalchemy.orm import Session

    with Session(storage.engine) as session:
        counts = session.query(StudyModel.study_name, TrialModel.state, func.count(TrialModel.trial_id)).join(
            TrialModel, TrialModel.study_id == StudyModel.study_id).group_by(
            StudyModel.study_name, TrialModel.state).all()
        latest = dict(session.query(StudyModel.study_name, func.max(func.coalesce(
            TrialModel._datetime_complete_utc, TrialModel._datetime_start_utc))).join(
            TrialModel, TrialModel.study_id == StudyModel.study_id).group_by(StudyModel.study_name).all())
    states: dict[str, dict[str, int]] = {}
    for name, state, n in counts:
        states.setdefault(name, {})[state.name] = n
    out = {}
    for name in set(states) | set(latest):
        last = latest.get(name)
        out[name] = (states.get(name, {}), datetime.fromisoformat(last) if isinstance(last, str) else last)
    return out


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage ``study`` was loaded from: the :class:`optuna.storages.RDBStorage` itself where Optuna wrapped
    it in its trial cache."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def light_trials(storage: optuna.storages.RDBStorage, study_id: int, known: dict[int, FrozenTrial],
                 without: tuple[str, ...] = ()) -> tuple[list[FrozenTrial], dict[int, FrozenTrial]]:
    """Every trial of the study in number order as :class:`FrozenTrial` objects with their values, user
    attributes (but ``without``), constraint values and times, and no parameters or intermediate values.
    Trials whose id is in ``known`` are taken from there, not read. Returns (trials, the ones read by id)."""
    from sqlalchemy import or_
    from sqlalchemy.orm import Session

    V, U, S, T = TrialValueModel, TrialUserAttributeModel, TrialSystemAttributeModel, TrialModel
    with Session(storage.engine) as session:
        rows = session.query(T).filter(T.study_id == study_id).order_by(T.number).all()
        todo = [r.trial_id for r in rows if r.trial_id not in known]
        values: dict[int, dict[int, float]] = {}
        attrs: dict[int, dict] = {}
        system: dict[int, dict] = {}
        for chunk in ([None] if len(todo) == len(rows) else _chunks(todo)) if todo else []:
            def scoped(query, model, chunk=chunk):  # the whole study with one join, else IN lists
                if chunk is None:
                    return query.join(T, T.trial_id == model.trial_id).filter(T.study_id == study_id)
                return query.filter(model.trial_id.in_(chunk))

            for trial_id, objective, value, kind in scoped(
                    session.query(V.trial_id, V.objective, V.value, V.value_type), V):
                values.setdefault(trial_id, {})[objective] = V.stored_repr_to_value(value, kind)
            query = scoped(session.query(U.trial_id, U.key, U.value_json), U)
            for trial_id, key, text in query.filter(U.key.notin_(without)) if without else query:
                attrs.setdefault(trial_id, {})[key] = json.loads(text)
            for trial_id, key, text in scoped(session.query(S.trial_id, S.key, S.value_json), S).filter(
                    or_(S.key.like(f"{_CONSTRAINTS_KEY}:%"), S.key == _CONSTRAINTS_KEY)):
                system.setdefault(trial_id, {})[key] = json.loads(text)
        fresh = {}
        for r in rows:
            if r.trial_id in known:
                continue
            v = values.get(r.trial_id)
            fresh[r.trial_id] = FrozenTrial(
                number=r.number, state=r.state, value=None, values=[v[i] for i in sorted(v)] if v else None,
                datetime_start=r.datetime_start, datetime_complete=r.datetime_complete, params={},
                distributions={}, user_attrs=attrs.get(r.trial_id, {}), system_attrs=system.get(r.trial_id, {}),
                intermediate_values={}, trial_id=r.trial_id)
        return [known.get(r.trial_id) or fresh[r.trial_id] for r in rows], fresh


def user_attr(storage: optuna.storages.RDBStorage, trial_ids: list[int], key: str) -> dict[int, object]:
    """One user attribute of each of ``trial_ids`` (ids as :func:`light_trials` returns them) that has it."""
    from sqlalchemy.orm import Session

    U = TrialUserAttributeModel
    out = {}
    with Session(storage.engine) as session:
        for chunk in _chunks(trial_ids):
            for trial_id, text in session.query(U.trial_id, U.value_json).filter(U.trial_id.in_(chunk),
                                                                                 U.key == key):
                out[trial_id] = json.loads(text)
    return out


def _chunks(ids: list[int]):
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i:i + _IN_CHUNK]
