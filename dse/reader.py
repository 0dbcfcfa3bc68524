"""Reading stored studies light: the trials' small attributes only, new trials only on a second read.

A trial's stored plan and hardware report (``plan``, ``hw``: about 100 kB of JSON for a 30-block
model) are what makes ``study.get_trials()`` slow on a large study: Optuna's public API loads every
attribute of every trial (2,000 trials are 200 MB of JSON). Tables, fronts and charts need only the
values, the constraints and a few small attributes, so :class:`TrialReader` queries Optuna's own
RDB models (``optuna.storages._rdb.models``, the schema Optuna maintains and migrates) for those,
and returns ordinary :class:`optuna.trial.FrozenTrial` objects that the rest of ``dse`` (Pareto,
hypervolume, tables) takes as they are. A finished trial never changes (Optuna freezes its
attributes), so the reader keeps finished trials and reads only new and unfinished ones again.
Trials stored before the driver wrote ``hw_metrics`` get it derived from their report
(:func:`dse.report.hw_metrics`), the one case where the reader loads a report.

One trial in full (plan, per-layer report) is ``storage.get_trial(trial_id)``: Optuna's API.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages._rdb import models
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, or_
from sqlalchemy.orm import Session

from dse.report import hw_metrics

LIGHT_ATTRS = ("evaluated", "eval", "fidelity", "warm_start", "duplicate_of", "plan_summary", "plan_hash",
               "hw_metrics", "constraints", "worker", "error", "pruned", "timings_s")
"""User attributes a light trial carries (everything the driver stores but ``plan`` and ``hw``)."""
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
_IN_CHUNK = 500
"""Trial ids per ``IN (...)`` query (below every database's bound-parameter limit)."""


class StorageError(ValueError):
    """A storage URL that names no readable study storage (one-line message)."""


def existing_storage(url: str) -> optuna.storages.RDBStorage:
    """Open the study storage at ``url`` for reading, creating nothing: a missing SQLite file stays missing,
    and a database without Optuna's tables is refused. Raises :class:`StorageError`."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"{url!r} is not a database URL such as sqlite:///dse-studies.db") from None
    if parsed.drivername.startswith("sqlite") and (not parsed.database or not Path(parsed.database).exists()):
        raise StorageError(f"SQLite file '{parsed.database}' does not exist (no studies there)")
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True, engine_kwargs={"pool_pre_ping": True})
        storage.get_all_studies()
    except (SQLAlchemyError, ImportError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise StorageError(f"cannot read studies from {parsed.render_as_string(hide_password=True)}: "
                           f"{reason}") from None
    return storage


@dataclass
class StudyOverview:
    """One stored study as the studies page lists it: its spec attribute, trials per state, last update."""

    study_id: int
    name: str
    directions: list[str]
    metric_names: list[str]
    user_attrs: dict
    states: dict[str, int]
    last_update: datetime | None


def study_overviews(storage: optuna.storages.RDBStorage) -> list[StudyOverview]:
    """Every study in ``storage``, without loading any trial: names, directions, user attributes, trial
    counts per state and the time of the latest trial start or finish (UTC)."""
    studies = storage.get_all_studies()
    with Session(storage.engine) as session:
        counts = session.query(models.TrialModel.study_id, models.TrialModel.state,
                               func.count(models.TrialModel.trial_id)).group_by(
            models.TrialModel.study_id, models.TrialModel.state).all()
        latest = dict(session.query(models.TrialModel.study_id, func.max(func.coalesce(
            models.TrialModel._datetime_complete_utc, models.TrialModel._datetime_start_utc))).group_by(
            models.TrialModel.study_id).all())
    states: dict[int, dict[str, int]] = {}
    for study_id, state, n in counts:
        states.setdefault(study_id, {})[state.name] = n
    out = []
    for s in studies:
        names = s.system_attrs.get("study:metric_names") or []
        last = latest.get(s._study_id)
        out.append(StudyOverview(s._study_id, s.study_name, [d.name.lower() for d in s.directions], list(names),
                                 s.user_attrs, states.get(s._study_id, {}),
                                 datetime.fromisoformat(last) if isinstance(last, str) else last))
    return out


class TrialReader:
    """Light trials of one study, read incrementally (module docstring). Thread-safe: one reader may serve
    every dashboard session of a study."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_id: int):
        self.storage, self.study_id = storage, study_id
        self._finished: dict[int, FrozenTrial] = {}
        self._lock = threading.Lock()

    def trials(self) -> list[FrozenTrial]:
        """Every trial of the study in trial-number order; finished ones from memory after the first read."""
        with self._lock, Session(self.storage.engine) as session:
            rows = session.query(models.TrialModel).filter(models.TrialModel.study_id == self.study_id).order_by(
                models.TrialModel.number).all()
            todo = [r for r in rows if r.trial_id not in self._finished]
            values, attrs, system = _read_details(session, self.study_id, [r.trial_id for r in todo],
                                                  everything=len(todo) == len(rows))
            stale_hw = [r.trial_id for r in todo if "hw_metrics" not in attrs.get(r.trial_id, {})]
            for trial_id, hw in _read_attr(session, stale_hw, "hw").items():
                attrs.setdefault(trial_id, {})["hw_metrics"] = hw_metrics({"hw": hw})
            fresh = {}
            for r in todo:
                trial = _frozen(r, values.get(r.trial_id), attrs.get(r.trial_id, {}), system.get(r.trial_id, {}))
                fresh[r.trial_id] = trial
                if r.state in FINISHED:
                    self._finished[r.trial_id] = trial
        return [self._finished.get(r.trial_id) or fresh[r.trial_id] for r in rows]


def _chunks(ids: list[int]):
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i:i + _IN_CHUNK]


def _read_details(session: Session, study_id: int, trial_ids: list[int], everything: bool):
    """Objective values, light user attributes and constraint values of ``trial_ids`` (``everything``: the
    study's whole list, read with one join instead of ``IN`` lists)."""
    values: dict[int, dict[int, float]] = {}
    attrs: dict[int, dict] = {}
    system: dict[int, dict] = {}
    if not trial_ids:
        return values, attrs, system
    V, U, S, T = (models.TrialValueModel, models.TrialUserAttributeModel, models.TrialSystemAttributeModel,
                  models.TrialModel)
    for chunk in [None] if everything else _chunks(trial_ids):
        def scoped(query, model):
            if chunk is None:
                return query.join(T, T.trial_id == model.trial_id).filter(T.study_id == study_id)
            return query.filter(model.trial_id.in_(chunk))

        for trial_id, objective, value, kind in scoped(
                session.query(V.trial_id, V.objective, V.value, V.value_type), V):
            values.setdefault(trial_id, {})[objective] = V.stored_repr_to_value(value, kind)
        for trial_id, key, text in scoped(session.query(U.trial_id, U.key, U.value_json), U).filter(
                U.key.in_(LIGHT_ATTRS)):
            attrs.setdefault(trial_id, {})[key] = json.loads(text)
        for trial_id, key, text in scoped(session.query(S.trial_id, S.key, S.value_json), S).filter(
                or_(S.key.like(f"{_CONSTRAINTS_KEY}:%"), S.key == _CONSTRAINTS_KEY)):
            system.setdefault(trial_id, {})[key] = json.loads(text)
    return values, attrs, system


def _read_attr(session: Session, trial_ids: list[int], key: str) -> dict[int, object]:
    """One user attribute of each of ``trial_ids`` that has it."""
    U = models.TrialUserAttributeModel
    out = {}
    for chunk in _chunks(trial_ids):
        for trial_id, text in session.query(U.trial_id, U.value_json).filter(U.trial_id.in_(chunk), U.key == key):
            out[trial_id] = json.loads(text)
    return out


def _frozen(row, values: dict[int, float] | None, user_attrs: dict, system_attrs: dict) -> FrozenTrial:
    return FrozenTrial(
        number=row.number, state=row.state, value=None,
        values=[values[i] for i in sorted(values)] if values else None,
        datetime_start=row.datetime_start, datetime_complete=row.datetime_complete,
        params={}, distributions={}, user_attrs=user_attrs, system_attrs=system_attrs,
        intermediate_values={}, trial_id=row.trial_id)
