"""Every use of Optuna's private API in the project, in this one module (``optuna<6`` is pinned in
pyproject.toml; ``tests/test_optuna_private.py`` imports exactly these names and fails if Optuna moves them).

Optuna 5.0 has no public counterpart for any of them:

* ``optuna._hypervolume.compute_hypervolume``: the exact (WFG) hypervolume. The public API offers it only
  inside plots (``optuna.visualization.plot_hypervolume_history``) and the terminator;
* ``optuna.storages._rdb.models``: the RDB schema (Optuna maintains and migrates it), for the trial counts
  per study and state that the studies page shows without loading any trial (the public
  ``get_all_trials`` would read every trial of every study);
* ``Study._storage``: the storage a loaded study reads from, so :func:`dse.records.TrialRecords.of` finds a
  study's records when a caller hands over only the study (``Study`` has no public storage accessor).
"""

from __future__ import annotations

from datetime import datetime

import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.storages._rdb.models import StudyModel, TrialModel

__all__ = ["compute_hypervolume", "study_storage", "trial_counts"]


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
