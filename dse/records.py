"""Trial records: each trial's plan, accelerator and per-layer hardware report, beside the study, not in its
attributes.

A plan and its report are about 100 kB of JSON for a 30-block model. Kept in Optuna user attributes, every
``get_trials()`` and every Optuna tool (optuna-dashboard, ``copy_study``) would carry them for every trial,
so they live in a small table ``dse_trial_records`` of the study's own database (SQLite or PostgreSQL), next
to Optuna's tables and to :mod:`dse.claims`' ``dse_claims``: one row ``(study, trial, kind) -> JSON`` with

* ``study``: the study's ``uid`` user attribute (its name for studies without one), so a later study of the
  same name never sees an earlier one's records;
* ``trial``: the trial number (the same in every storage a study is copied to);
* ``kind``: ``plan`` (:meth:`dse.plan.ModelPlan.to_dict`), ``hw`` (:meth:`hwcost.HwReport.to_dict`) or
  ``accelerator`` (:meth:`hwcost.Accelerator.to_dict`: the whole accelerator the report was costed on; the
  trial's ``accelerator`` user attribute holds only the fields the study searches).

The driver writes a trial's records before it tells the trial, so a finished trial with a plan has its
record; the trial's user attributes keep the scalars (``hw_metrics``, ``plan_hash``, ``plan_summary``,
constraints, evaluation, timings, worker, fidelity, searched ``accelerator`` fields). Trials written before
the ``accelerator`` record have none (:meth:`TrialRecords.accelerator` is None; their study's spec holds
the one accelerator of all its trials). Studies written before this table existed hold ``plan``
and ``hw`` in their user attributes; :meth:`TrialRecords.plan` and :meth:`TrialRecords.report` read those
(from the trial given, else from Optuna's storage: the dashboard's light trials leave them out), so such
studies export and show as before. Readers (the dashboard, ``dse export``) create nothing.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import optuna
import sqlalchemy as sa

_META = sa.MetaData()
TABLE = sa.Table(
    "dse_trial_records", _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("trial", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("value_json", sa.Text, nullable=False),
)
KINDS = ("plan", "hw", "accelerator")


def study_key(study: optuna.Study) -> str:
    """The key of a study's records (and claims): its ``uid`` attribute, else its name."""
    return study.user_attrs.get("uid") or study.study_name


class TrialRecords:
    """The records of one study in the database behind ``engine`` (module docstring). Thread-safe."""

    def __init__(self, engine: sa.Engine, study: str, create: bool = False,
                 storage: optuna.storages.RDBStorage | None = None, study_name: str | None = None):
        """``study``: the key (:func:`study_key`); ``storage`` and ``study_name``: where an old study's trials
        keep their plan and report as user attributes (:meth:`plan`)."""
        self.engine, self.study = engine, study
        self.storage, self.study_name = storage, study_name
        self._table = False
        self._lock = threading.Lock()
        if create:
            try:
                _META.create_all(engine, checkfirst=True)
            except sa.exc.DatabaseError:  # another driver created the table between our check and our CREATE
                if not sa.inspect(engine).has_table(TABLE.name):
                    raise
            self._table = True

    @classmethod
    def of(cls, study: optuna.Study, storage: optuna.storages.RDBStorage | None = None) -> "TrialRecords":
        """The records of ``study``, read through ``storage`` (default: the storage the study was loaded from)."""
        if storage is None:
            from dse.optuna_private import study_storage

            storage = study_storage(study)
        return cls(storage.engine, study_key(study), storage=storage, study_name=study.study_name)

    def put(self, number: int, **records: Any) -> None:
        """Store trial ``number``'s records, e.g. ``put(3, plan=plan.to_dict(), hw=report.to_dict())``."""
        rows = [{"study": self.study, "trial": number, "kind": kind, "value_json": json.dumps(value)}
                for kind, value in records.items()]
        with self.engine.begin() as conn:
            conn.execute(TABLE.insert(), rows)

    def get(self, number: int, kind: str) -> Any | None:
        """Trial ``number``'s record ``kind``, or None (none stored, or no table in this database)."""
        if not self._has_table():
            return None
        with self.engine.connect() as conn:
            text = conn.execute(sa.select(TABLE.c.value_json).where(
                TABLE.c.study == self.study, TABLE.c.trial == number, TABLE.c.kind == kind)).scalar()
        return None if text is None else json.loads(text)

    def plan(self, trial: optuna.trial.FrozenTrial) -> dict | None:
        """The trial's plan (:meth:`dse.plan.ModelPlan.to_dict`): its record, or the user attribute of a
        study written before this table (in ``trial``, else in the storage); None if it has neither."""
        return self._find(trial, "plan")

    def report(self, trial: optuna.trial.FrozenTrial) -> dict | None:
        """The trial's hardware report (:meth:`hwcost.HwReport.to_dict`, per-layer rows included), as
        :meth:`plan` finds it."""
        return self._find(trial, "hw")

    def accelerator(self, trial: optuna.trial.FrozenTrial) -> dict | None:
        """The accelerator the trial was costed on (:meth:`hwcost.Accelerator.to_dict`), or None for a trial
        written before this record (:func:`dse.export.trial_accelerator` falls back on the study's spec)."""
        return self.get(trial.number, "accelerator")

    def _find(self, trial: optuna.trial.FrozenTrial, kind: str):
        return trial.user_attrs.get(kind) or self.get(trial.number, kind) or self._stored_attr(trial.number, kind)

    def _stored_attr(self, number: int, key: str):
        """User attribute ``key`` of trial ``number`` in Optuna's storage (one trial read), or None."""
        if self.storage is None or self.study_name is None:
            return None
        try:
            study_id = self.storage.get_study_id_from_name(self.study_name)
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            return None
        return self.storage.get_trial(trial_id).user_attrs.get(key)

    def _has_table(self) -> bool:
        """Whether the table exists; asked again until it does (a driver may create it later)."""
        with self._lock:
            if not self._table:
                self._table = sa.inspect(self.engine).has_table(TABLE.name)
            return self._table


def copy_records(key: str, source: sa.Engine, target: sa.Engine) -> int:
    """Copy the records of the study keyed ``key`` (:func:`study_key`) from one database to another, e.g. after
    ``optuna.copy_study`` (which copies Optuna's tables only; the copy keeps the ``uid`` and trial numbers, so
    the records match it). Creates the table in ``target`` if needed; returns the rows copied."""
    with source.connect() as conn:
        if not sa.inspect(conn).has_table(TABLE.name):
            return 0
        rows = [dict(r._mapping) for r in conn.execute(sa.select(TABLE).where(TABLE.c.study == key))]
    if rows:
        TrialRecords(target, key, create=True)
        with target.begin() as conn:
            conn.execute(TABLE.insert(), rows)
    return len(rows)
