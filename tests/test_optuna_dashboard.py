"""Optuna's own dashboard (a real ``optuna-dashboard`` server) on the study the driver made (conftest's
``sqlite_study``): it lists the study and its trials over HTTP, and what it sends per trial holds the trial's
scalars, not its plan or per-layer report (those are :mod:`dse.records`)."""

from __future__ import annotations

import json
import sys

import optuna
import pytest

from helpers import ROOT

pytest.importorskip("optuna_dashboard")
sys.path.insert(0, str(ROOT / "bench"))
from bench_records import OptunaDashboard  # noqa: E402  (the server bench/bench_records.py measures)

STUDY = "e2e-sqlite"


def test_optuna_dashboard_lists_the_study_and_its_lean_trials(sqlite_study, tmp_path):
    study, url = sqlite_study
    server = OptunaDashboard(url, tmp_path / "optuna-dashboard.log")
    try:
        ids = server.study_ids()
        assert STUDY in ids
        detail = json.loads(server.get(f"/api/studies/{ids[STUDY]}"))
    finally:
        server.close()
    trials = study.get_trials(deepcopy=False)
    assert [t["number"] for t in detail["trials"]] == [t.number for t in trials]
    assert [t["state"] for t in detail["trials"]] == [t.state.name.capitalize() for t in trials]
    for sent, stored in zip(detail["trials"], trials):
        keys = {a["key"] for a in sent["user_attrs"]}
        assert keys == set(stored.user_attrs) and not keys & {"plan", "hw"}
        if stored.state == optuna.trial.TrialState.COMPLETE:
            assert [float(v) for v in sent["values"]] == stored.values  # infinite proxy KL is "inf"
            assert json.loads(next(a["value"] for a in sent["user_attrs"] if a["key"] == "hw_metrics")) == \
                stored.user_attrs["hw_metrics"]
