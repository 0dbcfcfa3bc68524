"""Reading stored studies: opening a storage without creating anything, the studies' overview, and the trials.

Trials keep only small user attributes (the plan and the per-layer report are :mod:`dse.records`), so
Optuna's public ``study.get_trials()`` is light, and Optuna's trial cache (the storage wrapper that
``optuna.load_study`` puts around an :class:`~optuna.storages.RDBStorage`) keeps finished trials and reads
only new and unfinished ones again: :class:`TrialReader` holds one loaded study for that. A study written
before :mod:`dse.records` (plan and report in the user attributes) reads the same way, only heavier.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial


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

    name: str
    directions: list[str]
    metric_names: list[str]
    user_attrs: dict
    states: dict[str, int]
    last_update: datetime | None


def study_overviews(storage: optuna.storages.RDBStorage) -> list[StudyOverview]:
    """Every study in ``storage``, without loading any trial: names, directions, user attributes, trial
    counts per state and the time of the latest trial start or finish (UTC)."""
    from dse.optuna_private import trial_counts

    counts = trial_counts(storage)
    out = []
    for s in storage.get_all_studies():
        names = s.system_attrs.get("study:metric_names") or []
        states, last = counts.get(s.study_name, ({}, None))
        out.append(StudyOverview(s.study_name, [d.name.lower() for d in s.directions], list(names), s.user_attrs,
                                 states, last))
    return out


class TrialReader:
    """The trials of one study (``study``: its name, or its id in ``storage``), read incrementally through
    Optuna's trial cache (module docstring). Thread-safe: one reader may serve every dashboard session."""

    def __init__(self, storage: optuna.storages.RDBStorage, study: str | int):
        name = storage.get_study_name_from_id(study) if isinstance(study, int) else study
        self.storage = storage
        self.study = optuna.load_study(study_name=name, storage=storage)
        self._lock = threading.Lock()

    def trials(self) -> list[FrozenTrial]:
        """Every trial of the study in trial-number order; finished ones from memory after the first read."""
        with self._lock:
            return self.study.get_trials(deepcopy=False)
