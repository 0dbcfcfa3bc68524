"""Reading a stored study: state counts, the Pareto set, and a plain-text table of it."""

from __future__ import annotations

from collections import Counter

import optuna

STATES = ("COMPLETE", "RUNNING", "FAIL", "PRUNED", "WAITING")


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, plus ``infeasible``: completed trials screened out by the cost model."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    out = {state: counts.get(state, 0) for state in STATES}
    out["infeasible"] = sum(1 for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated") is False)
    return out


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Evaluated, feasible trials on the Pareto front, best first on the first objective."""
    front = [t for t in study.best_trials if t.user_attrs.get("evaluated")]
    reverse = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(front, key=lambda t: t.values[0], reverse=reverse)


def trial_row(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    """One trial as a flat dict: objectives, hardware figures, task metrics, plan summary."""
    names = study.metric_names or [f"objective{i}" for i in range(len(study.directions))]
    hw = trial.user_attrs.get("hw", {})
    row = {"trial": trial.number}
    if trial.values:
        row.update({name: value for name, value in zip(names, trial.values)})
    for key in ("decode_tokens_per_s", "j_per_token", "power_w"):
        if key not in row and key in hw:
            row[key] = hw[key]
    if "weight_bytes_total" in hw:
        row["weight_MB"] = hw["weight_bytes_total"] / 1e6
    for task, metrics in trial.user_attrs.get("eval", {}).get("metrics", {}).items():
        for metric, value in metrics.items():
            row[f"{task}.{metric}"] = value
    row["plan"] = ", ".join(f"{n}x {label}" for label, n in trial.user_attrs.get("plan_summary", {}).items())
    return row


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A fixed-width text table; floats get 4 significant digits."""
    if not rows:
        return "(no trials)"
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def pareto_table(study: optuna.Study) -> str:
    """The Pareto set as text: objectives first, then weight MB, the accuracy tasks' metrics and the plan."""
    rows = [trial_row(study, t) for t in pareto_trials(study)]
    spec = study.user_attrs.get("spec", {})
    names = list(study.metric_names or [])
    task_cols = [f"{t['name']}.{t['metric']}" for t in spec.get("tasks", []) if len(spec.get("tasks", [])) > 1]
    return format_table(rows, ["trial", *names, "weight_MB", *task_cols, "plan"])
