"""The main job (`make demo`): the shipped default spec, run as a user runs it, in a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from dse.report import pareto_trials
from dse.study import full_results

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_study_runs_to_budget_on_two_workers(tmp_path):
    storage = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "dse.cli", "start", str(ROOT / "examples" / "default.yaml"),
         "--storage", storage, "--no-progress"],
        capture_output=True, text=True, timeout=3000, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "Pareto set (proxy_kl minimize, decode_tokens_per_s maximize, j_per_token minimize):" in proc.stdout

    study = optuna.load_study(study_name="smollm2-kv260-demo", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 16
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL))
    evaluated = [t for t in complete if t.user_attrs["evaluated"]]
    assert len(evaluated) >= 8
    assert len({t.user_attrs["worker"] for t in evaluated}) == 2, "both Ray evaluator actors took trials"
    pareto = pareto_trials(study)
    assert pareto
    full = full_results(study)
    for t in pareto:  # every Pareto trial is printed in the table, with its full-fidelity (promoted) accuracy
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{t.number} "))
        assert f"{full[t.number]['accuracy']:.4g}" in line.split()
    assert "hypervolume" in proc.stdout
    # Rerunning resumes the finished study: no new trials, the same table.
    again = subprocess.run([sys.executable, "-m", "dse.cli", "start", str(ROOT / "examples" / "default.yaml"),
                            "--storage", storage, "--no-progress"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert len(optuna.load_study(study_name="smollm2-kv260-demo", storage=storage).trials) == len(study.trials)
