"""dse.records on SQLite and on the real PostgreSQL server: put and get by study and trial, old studies'
user attributes first, and readers that create nothing."""

from __future__ import annotations

import uuid

import optuna
import pytest
import sqlalchemy as sa

from dse.records import TABLE, TrialRecords, study_key
from helpers import PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'r.db'}" if request.param == "sqlite" else PG_URL


def test_put_get_by_study_and_trial(url):
    engine = sa.create_engine(url)
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        ra, rb = TrialRecords(engine, a, create=True), TrialRecords(engine, b, create=True)
        plan, hw = {"layers": [{"name": "lm_head", "format": "4"}]}, {"layers": [{"name": "lm_head"}], "fits": True}
        ra.put(0, plan=plan, hw=hw)
        rb.put(0, plan={"layers": []})
        assert (ra.get(0, "plan"), ra.get(0, "hw")) == (plan, hw)
        assert rb.get(0, "plan") == {"layers": []} and rb.get(0, "hw") is None and ra.get(1, "plan") is None
        with pytest.raises(sa.exc.IntegrityError):  # a trial's record is written once
            ra.put(0, plan=plan)
        # an old study's trial carries its plan and report in its user attributes: those come first
        old = optuna.trial.create_trial(value=1.0, user_attrs={"plan": {"layers": []}, "hw": {"fits": False}})
        assert ra.plan(old) == {"layers": []} and ra.report(old) == {"fits": False}
        new = optuna.trial.create_trial(value=1.0, user_attrs={"plan_hash": "x"})
        new.number = 0
        assert ra.plan(new) == plan and ra.report(new) == hw  # trial number 0
    finally:
        with engine.begin() as conn:
            conn.execute(TABLE.delete().where(TABLE.c.study.in_([a, b])))
        engine.dispose()


def test_reading_a_database_without_the_table_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    study = optuna.create_study(study_name="plain", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    records = TrialRecords.of(study)
    assert records.study == study_key(study) == "plain"  # no uid attribute: the name
    assert records.plan(study.trials[0]) is None and records.report(study.trials[0]) is None
    assert not sa.inspect(sa.create_engine(url)).has_table(TABLE.name)
    TrialRecords(sa.create_engine(url), "plain", create=True).put(0, plan={"layers": []})
    assert records.plan(study.trials[0]) == {"layers": []}  # the table created later is found


def test_copy_records_to_postgresql(tmp_path):
    from dse.records import copy_records

    source, target = sa.create_engine(f"sqlite:///{tmp_path / 's.db'}"), sa.create_engine(PG_URL)
    key = uuid.uuid4().hex
    try:
        TrialRecords(source, key, create=True).put(3, plan={"layers": []}, hw={"fits": True})
        TrialRecords(source, "another", create=True).put(3, plan={"layers": [1]})
        assert copy_records(key, source, target) == 2
        copied = TrialRecords(target, key)
        assert (copied.get(3, "plan"), copied.get(3, "hw")) == ({"layers": []}, {"fits": True})
        assert copy_records("nothing", source, target) == 0
    finally:
        with target.begin() as conn:
            conn.execute(TABLE.delete().where(TABLE.c.study == key))
