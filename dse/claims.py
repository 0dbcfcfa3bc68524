"""Claims: which driver evaluates a plan, so drivers sharing one study never evaluate a plan twice.

A claim is a row ``(study, kind, key) -> (trial, owner, heartbeat)`` in a small table
``dse_claims`` of the study's own database (SQLite or PostgreSQL), next to Optuna's
tables. The primary key makes taking a claim atomic: of two drivers inserting the same
key, exactly one succeeds. Kinds:

* ``plan``: key is the plan hash, trial the trial that evaluates it (proxy fidelity);
* ``full``: key is a trial number whose plan is being promoted to the full lm-eval tasks.

A claim can be taken over only through :meth:`Claims.take_over`, a compare-and-swap on
the previous owner and heartbeat, after the caller decided the holder is gone (its trial
failed, or its heartbeat is older than the grace period). Owners refresh the heartbeat of
their open claims with :meth:`Claims.touch`.

Every operation is safe to repeat (the driver repeats one whose reply a storage outage cut off): a
claim or take-over already ours for the same trial succeeds again, a release or touch changes nothing
the second time.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

_META = sa.MetaData()
TABLE = sa.Table(
    "dse_claims", _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("trial", sa.Integer, nullable=False),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),   # seconds since the epoch (owner's clock)
)


@dataclass(frozen=True)
class Claim:
    trial: int
    owner: str
    heartbeat: float


class Claims:
    """Claims of one study, held by this process as ``owner`` (a fresh id per driver)."""

    def __init__(self, storage_url: str, study: str, engine: sa.Engine | None = None):
        self.engine = engine or sa.create_engine(storage_url, poolclass=sa.pool.NullPool)
        self.study = study
        self.owner = uuid.uuid4().hex
        try:
            _META.create_all(self.engine, checkfirst=True)
        except sa.exc.DatabaseError:  # another driver created the table between our check and our CREATE
            if not sa.inspect(self.engine).has_table(TABLE.name):
                raise

    def claim(self, kind: str, key: str, trial: int) -> Claim | None:
        """Take the claim for ``trial``; returns None on success, else the current holder's claim."""
        row = {"study": self.study, "kind": kind, "key": key, "trial": trial, "owner": self.owner,
               "heartbeat": time.time()}
        try:
            with self.engine.begin() as conn:
                conn.execute(TABLE.insert().values(**row))
            return None
        except sa.exc.IntegrityError:
            held = self.get(kind, key)
            if held is None:  # released in between
                return self.claim(kind, key, trial)
            return None if self._ours(held, trial) else held

    def get(self, kind: str, key: str) -> Claim | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(TABLE.c.trial, TABLE.c.owner, TABLE.c.heartbeat).where(
                *self._where(kind, key))).first()
        return None if row is None else Claim(*row)

    def take_over(self, kind: str, key: str, held: Claim, trial: int) -> bool:
        """Replace ``held`` by our claim for ``trial`` unless someone else changed it meanwhile."""
        with self.engine.begin() as conn:
            result = conn.execute(TABLE.update().where(
                *self._where(kind, key), TABLE.c.owner == held.owner, TABLE.c.heartbeat == held.heartbeat,
                TABLE.c.trial == held.trial).values(trial=trial, owner=self.owner, heartbeat=time.time()))
        return result.rowcount == 1 or self._ours(self.get(kind, key), trial)

    def release(self, kind: str, key: str, trial: int | None = None) -> None:
        """Drop our claim (e.g. the evaluation failed and someone may retry); with ``trial``, only if it is that
        trial's."""
        where = [*self._where(kind, key), TABLE.c.owner == self.owner]
        if trial is not None:
            where.append(TABLE.c.trial == trial)
        with self.engine.begin() as conn:
            conn.execute(TABLE.delete().where(*where))

    def touch(self, kind: str, keys: list[str]) -> None:
        """Refresh the heartbeat of our claims ``keys`` of ``kind``."""
        if not keys:
            return
        with self.engine.begin() as conn:
            conn.execute(TABLE.update().where(TABLE.c.study == self.study, TABLE.c.kind == kind,
                                              TABLE.c.key.in_(keys), TABLE.c.owner == self.owner)
                         .values(heartbeat=time.time()))

    def all(self, kind: str) -> dict[str, Claim]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(TABLE.c.key, TABLE.c.trial, TABLE.c.owner, TABLE.c.heartbeat).where(
                TABLE.c.study == self.study, TABLE.c.kind == kind)).all()
        return {key: Claim(trial, owner, heartbeat) for key, trial, owner, heartbeat in rows}

    def _ours(self, held: Claim | None, trial: int) -> bool:
        return held is not None and held.owner == self.owner and held.trial == trial

    def _where(self, kind: str, key: str):
        return TABLE.c.study == self.study, TABLE.c.kind == kind, TABLE.c.key == key

    def close(self) -> None:
        self.engine.dispose()
