"""Exporting a chosen trial: plan YAML, hardware report JSON, evaluation JSON and a short summary."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import yaml

from dse.report import pareto_trials, trial_row

PICKS = ("max-accuracy", "max-tokens-per-s", "min-energy")
_PICK_KEY = {"max-accuracy": ("accuracy", True), "max-tokens-per-s": ("decode_tokens_per_s", True),
             "min-energy": ("j_per_token", False)}


class ExportError(ValueError):
    """The requested trial cannot be exported (one-line message)."""


def choose_trial(study: optuna.Study, number: int | None = None, pick: str = "max-accuracy"):
    """Trial ``number`` if given, else the Pareto trial best on ``pick``."""
    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            raise ExportError(f"--trial: study '{study.study_name}' has no trial {number}")
        trial = trials[0]
        if trial.state != optuna.trial.TrialState.COMPLETE or "plan" not in trial.user_attrs:
            raise ExportError(f"--trial: trial {number} is {trial.state.name}, not a completed trial with a plan")
        return trial
    if pick not in PICKS:
        raise ExportError(f"--pick: '{pick}' is not one of {', '.join(PICKS)}")
    front = pareto_trials(study)
    if not front:
        raise ExportError(f"study '{study.study_name}' has no evaluated feasible trial to export yet")
    key, maximize = _PICK_KEY[pick]
    rows = {t.number: trial_row(study, t) for t in front}
    if key not in next(iter(rows.values())):
        raise ExportError(f"--pick: '{pick}' needs '{key}', which this study does not record")
    best = (max if maximize else min)(rows.values(), key=lambda r: r[key])
    return next(t for t in front if t.number == best["trial"])


def export_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, out: Path) -> list[Path]:
    """Write the bundle for ``trial`` into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    spec = study.user_attrs.get("spec", {})
    header = {"study": study.study_name, "trial": trial.number, "model": spec.get("model"),
              "device": spec.get("hardware", {}).get("device")}
    files = {
        "plan.yaml": yaml.safe_dump({**header, "plan": trial.user_attrs["plan"]}, sort_keys=False),
        "hw_report.json": json.dumps(trial.user_attrs.get("hw", {}), indent=1),
        "evaluation.json": json.dumps(trial.user_attrs.get("eval", {"evaluated": False}), indent=1),
        "summary.txt": summary_text(study, trial),
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


def summary_text(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    row = trial_row(study, trial)
    hw = trial.user_attrs.get("hw", {})
    lines = [f"study {study.study_name}, trial {trial.number}"]
    lines += [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in row.items() if k != "trial"]
    if hw:
        lines.append(f"  fits: {hw.get('fits')}  utilisation: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in hw.get("utilisation", {}).items()))
    return "\n".join(lines) + "\n"
