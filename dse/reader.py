"""Reading stored studies: opening a storage without creating anything, the studies' overview, and the trials.

Trials keep only small user attributes (the plan and the per-layer report are :mod:`dse.records`), but a
driver's trial also has one Optuna parameter per searched unit (121 for the default space), and Optuna's
public ``study.get_trials()`` parses every parameter's distribution: 1.7 s for 300 trials. Tables, fronts
and charts need only the values, the constraints and the user attributes, so :class:`TrialReader` reads
those (:func:`dse.optuna_private.light_trials`, 0.02 s for the same 300) and returns ordinary
:class:`optuna.trial.FrozenTrial` objects without parameters, which the rest of ``dse`` (Pareto,
hypervolume, tables) takes as they are. A finished trial never changes (Optuna freezes its attributes),
so the reader keeps finished trials and reads only new and unfinished ones again. Trials of studies
written before :mod:`dse.records` are read without their ``plan`` and ``hw`` attributes; those stored
before the driver wrote ``hw_metrics`` get it derived from their report (:func:`dse.report.hw_metrics`),
the one case where the reader loads a report.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from dse.errors import UserError


STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
"""Database URL schemes a study storage may use."""


class StorageError(UserError, ValueError):
    """A storage URL that names no readable study storage (one-line message, password masked)."""


CONNECT_TIMEOUT_S = 5
"""How long a PostgreSQL server may take to answer a connection before the storage counts as unreachable."""


def storage_url(url: str):
    """``url`` parsed (a :class:`sqlalchemy.engine.URL`); :class:`StorageError` for a malformed one (a
    non-numeric port included) or a scheme other than :data:`STORAGE_SCHEMES`."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"{url!r} is not a database URL such as sqlite:///dse-studies.db") from None
    except ValueError:  # make_url's int() of the port
        port = url.rpartition("@")[2].partition("/")[0].rpartition(":")[2]
        raise StorageError(f"port {port!r} of the database URL is not a number (e.g. "
                           "postgresql://user@host:5432/db)") from None
    if parsed.drivername not in STORAGE_SCHEMES:
        raise StorageError(f"scheme '{parsed.drivername}' is not one of {', '.join(STORAGE_SCHEMES)}")
    return parsed


def _engine_kwargs(parsed) -> dict:
    """Engine options of every storage ``dse`` opens: a pre-ping, and a bounded connection wait on a server."""
    kwargs: dict = {"pool_pre_ping": True}
    if not parsed.drivername.startswith("sqlite"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def _has_study_tables(parsed) -> bool:
    """Connect once to the database of ``parsed`` and tell whether it holds Optuna's tables; StorageError
    (the driver's reason, one line) when it cannot be reached or read, without creating anything."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = sqlalchemy.create_engine(parsed, **_engine_kwargs(parsed))
    except ImportError as err:
        raise StorageError(f"cannot open {_shown(parsed)}: {err}") from None
    try:
        with engine.connect() as connection:
            return sqlalchemy.inspect(connection).has_table("studies")
    except SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).strip().splitlines()[0].split())[:200]
        raise StorageError(f"cannot open {_shown(parsed)}: {reason}") from None
    finally:
        engine.dispose()


def _shown(parsed) -> str:
    return parsed.render_as_string(hide_password=True)


def _reader(url: str, parsed) -> optuna.storages.RDBStorage:
    """Optuna's storage on a database known to hold its tables, creating nothing."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=True, engine_kwargs=_engine_kwargs(parsed))
    except (SQLAlchemyError, RuntimeError) as err:  # RuntimeError: a table schema of another Optuna version
        reason = str(err).strip().splitlines()[0][:200]
        raise StorageError(f"cannot read studies from {_shown(parsed)}: {reason}") from None


def existing_storage(url: str) -> optuna.storages.RDBStorage:
    """Open the study storage at ``url`` for reading, creating nothing: a missing SQLite file stays missing,
    and a database without Optuna's tables is refused. Raises :class:`StorageError`."""
    parsed = storage_url(url)
    if parsed.drivername.startswith("sqlite") and (not parsed.database or not Path(parsed.database).exists()):
        raise StorageError(f"SQLite file '{parsed.database}' does not exist (no studies there)")
    if not _has_study_tables(parsed):
        raise StorageError(f"{_shown(parsed)} holds no studies (no Optuna tables)")
    return _reader(url, parsed)


def storage_to_create(url: str) -> optuna.storages.RDBStorage | None:
    """Check the storage ``dse start`` will create its study in, creating nothing: the storage for reading when
    it holds Optuna's tables, None when it holds none yet (a new SQLite file in an existing, writable folder; a
    reachable empty database). Raises :class:`StorageError` for an unreachable or refused server, an unknown
    role or database, a SQLite path in a missing folder, a file that is not a database."""
    import os

    parsed = storage_url(url)
    if parsed.drivername.startswith("sqlite"):
        path = Path(parsed.database)
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise StorageError(f"folder '{folder}' of SQLite file '{path}' does not exist (create it first)")
        if not path.exists():
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StorageError(f"cannot create SQLite file '{path}': folder '{folder}' is not writable")
            return None
        if path.is_dir():
            raise StorageError(f"SQLite path '{path}' is a folder, not a database file")
    return _reader(url, parsed) if _has_study_tables(parsed) else None


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
    """The light trials of one study (``study``: its name, or its id in ``storage``), read incrementally
    (module docstring), and the study itself (``study``). Thread-safe: one reader may serve every dashboard
    session of a study."""

    def __init__(self, storage: optuna.storages.RDBStorage, study: str | int):
        name = storage.get_study_name_from_id(study) if isinstance(study, int) else study
        self.storage, self.study_id = storage, storage.get_study_id_from_name(name)
        self.study = optuna.load_study(study_name=name, storage=storage)
        self._finished: dict[int, FrozenTrial] = {}
        self._lock = threading.Lock()

    def trials(self) -> list[FrozenTrial]:
        """Every trial of the study in trial-number order; finished ones from memory after the first read."""
        from dse.optuna_private import light_trials, user_attr
        from dse.report import hw_metrics

        with self._lock:
            trials, fresh = light_trials(self.storage, self.study_id, self._finished, without=("plan", "hw"))
            stale = [trial_id for trial_id, t in fresh.items() if "hw_metrics" not in t.user_attrs]
            for trial_id, hw in user_attr(self.storage, stale, "hw").items():
                fresh[trial_id].user_attrs["hw_metrics"] = hw_metrics({"hw": hw})
            self._finished.update({i: t for i, t in fresh.items() if t.state.is_finished()})
            return trials
