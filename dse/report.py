"""Reading a stored study: state counts, the Pareto set (with full-fidelity results), and text tables."""

from __future__ import annotations

from collections import Counter

import optuna

from dse.textio import format_table as text_table

STATES = ("COMPLETE", "RUNNING", "FAIL", "PRUNED", "WAITING")


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, plus ``infeasible``: completed trials screened out by the cost model."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    out = {state: counts.get(state, 0) for state in STATES}
    out["infeasible"] = sum(1 for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated") is False)
    return out


def pareto_trials(study: optuna.Study, trials=None) -> list[optuna.trial.FrozenTrial]:
    """Evaluated, feasible trials on the Pareto front, best first on the first objective."""
    from dse.pareto import study_front

    front = study_front(study, trials)
    reverse = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(front, key=lambda t: t.values[0], reverse=reverse)


def hw_metrics(user_attrs: dict) -> dict[str, float]:
    """A trial's scalar hardware metrics (:data:`hwcost.METRICS`): the driver's ``hw_metrics`` attribute, or,
    for trials stored before it existed, those of its ``hw`` report that are there; {} without either."""
    if "hw_metrics" in user_attrs:
        return user_attrs["hw_metrics"]
    from hwcost import HwReport

    return HwReport.metrics_of(user_attrs.get("hw") or {})


def plan_label(user_attrs: dict) -> str:
    """A trial's plan in one line: layer counts per format, e.g. ``48x int4/g64, 38x 2:4 int8/g64``."""
    return ", ".join(f"{n}x {label}" for label, n in user_attrs.get("plan_summary", {}).items())


def searched_fields(spec: dict) -> list[str]:
    """The accelerator fields a stored spec searches (a list of two or more choices in its ``hardware:``)."""
    from dse.hardware import searched_hardware

    return list(searched_hardware(spec.get("hardware") or {}))


def hardware_line(spec: dict) -> str:
    """The searched accelerator fields of a stored spec in one line, e.g. ``hw.device (2 choices: kria-kv260,
    my-board), hw.clock_mhz (2 choices: 200, 300)``; '' when it searches none."""
    hardware = spec.get("hardware") or {}
    return ", ".join(f"hw.{k} ({len(hardware[k])} choices: {', '.join(map(str, hardware[k]))})"
                     for k in searched_fields(spec))


def device_label(spec: dict, user_attrs: dict | None = None) -> str | None:
    """A stored spec's device, or its device choices joined with `` | `` when the device is searched
    (``user_attrs``: the study's, whose ``device`` an old study without a spec still has)."""
    device = (spec.get("hardware") or {}).get("device") or (user_attrs or {}).get("device")
    return " | ".join(map(str, device)) if isinstance(device, (list, tuple)) else device


def accelerator_columns(user_attrs: dict) -> dict:
    """A trial's searched accelerator fields as ``hw.<field>`` cells (the ``accelerator`` attribute)."""
    from dse.hardware import encode_choice

    return {f"hw.{k}": encode_choice(v) for k, v in (user_attrs.get("accelerator") or {}).items()}


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names (``objective0``, ... where none were set); one storage query."""
    return study.metric_names or [f"objective{i}" for i in range(len(study.directions))]


def trial_row(study: optuna.Study, trial: optuna.trial.FrozenTrial, full: dict | None = None,
              names: list[str] | None = None) -> dict:
    """One trial as a flat dict: objectives, hardware figures, proxy and full-fidelity results (``full``:
    this trial's promotion result, if any), the searched accelerator fields (``hw.<field>``), plan summary.
    Reads only the trial's small attributes (``hw_metrics``, ``eval``, ``plan_summary``, ``accelerator``,
    ``warm_start``), so it works on :mod:`dse.reader`'s trials.
    ``names``: :func:`objective_names`, when many rows are built (each look-up queries the storage)."""
    names = names or objective_names(study)
    hw = hw_metrics(trial.user_attrs)
    evaluation = trial.user_attrs.get("eval", {})
    row = {"trial": trial.number}
    if trial.values:
        row.update({name: value for name, value in zip(names, trial.values)})
    for key in ("decode_tokens_per_s", "decode_ms_per_token", "j_per_token", "power_w"):
        if key not in row and key in hw:
            row[key] = hw[key]
    if "weight_bytes" in hw:
        row["weight_MB"] = hw["weight_bytes"] / 1e6
    for key, value in evaluation.get("proxy", {}).items():
        if key in ("kl", "ppl") and f"proxy_{key}" not in row:
            row[f"proxy_{key}"] = value
    full = full or evaluation.get("full")
    if full:
        if "accuracy" not in row:
            row["full_accuracy"] = full["accuracy"]
        for task, metrics in full.get("metrics", {}).items():
            for metric, value in metrics.items():
                row[f"{task}.{metric}"] = value
    row.update(accelerator_columns(trial.user_attrs))
    if trial.user_attrs.get("warm_start"):
        row["warm_start"] = trial.user_attrs["warm_start"]
    row["plan"] = plan_label(trial.user_attrs)
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

    return text_table([[cell(row.get(c)) for c in columns] for row in rows], columns, strip=False)


def pareto_table(study: optuna.Study, trials=None) -> str:
    """The Pareto set as text: objectives, the searched accelerator fields (``hw.<field>``), weight MB,
    full-fidelity accuracy and task metrics where the trial was promoted (blank where not yet), warm-start
    label and plan."""
    from dse.study import full_results

    names = list(study.metric_names or [])
    full = full_results(study)
    rows = [trial_row(study, t, full.get(t.number), names or None) for t in pareto_trials(study, trials)]
    spec = study.user_attrs.get("spec", {})
    tasks = spec.get("tasks", [])
    task_cols = [f"{t['name']}.{t['metric']}" for t in tasks] if len(tasks) > 1 else []
    extra = [] if "accuracy" in names else ["full_accuracy"]
    searched = [f"hw.{k}" for k in searched_fields(spec)]
    columns = ["trial", *names, *searched, "weight_MB", *extra, *task_cols, "warm_start", "plan"]
    return format_table(rows, [c for c in columns if any(row.get(c) is not None for row in rows)] or columns)


def hypervolume_of(study: optuna.Study, trials=None) -> tuple[float, int]:
    """The hypervolume of the feasible trials (normalised by their own bounds, reference point 1.1) and how
    many feasible trials it is computed from."""
    from dse.pareto import is_feasible, study_hypervolume

    trials = trials if trials is not None else study.get_trials(deepcopy=False)
    return study_hypervolume(study, trials), sum(is_feasible(t) for t in trials)


def hypervolume_line(study: optuna.Study, trials=None) -> str:
    """One line: the hypervolume of the feasible trials (normalised by their own bounds) and its basis."""
    volume, feasible = hypervolume_of(study, trials)
    return (f"hypervolume {volume:.4f} (objectives normalised to [0, 1] between "
            f"the best and worst of {feasible} feasible trials, reference point 1.1)")


def json_native(value):
    """``value`` as ``json.dumps(..., allow_nan=False)`` takes it: floats that are not finite (NaN, infinities)
    become None, tuples lists, datetimes ISO 8601 text (a naive one is taken as UTC), mapping keys text."""
    import math
    from datetime import datetime, timezone

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_native(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_native(v) for v in value]
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    return value


def _trial_counts(states: dict[str, int]) -> dict[str, int]:
    """Trials per state (lower-case state names, every state of :data:`STATES`) from counts by state name."""
    return {state.lower(): states.get(state, 0) for state in STATES}


def _objectives(names: list[str], directions: list[str]) -> list[dict]:
    return [{"name": n, "direction": d} for n, d in zip(names, directions)]


def study_listing(overview) -> dict:
    """One study as ``dse list`` shows it (``overview``: a :class:`dse.reader.StudyOverview`): ``name``,
    ``model`` (from the ``spec`` attribute), ``objectives`` (``[{name, direction}]``), ``trials`` (per state:
    ``complete``, ``running``, ``fail``, ``pruned``, ``waiting``), ``budget`` (the trial budget in force, or
    None), ``created`` (UTC time of the study's first ``dse start``, or None for a study not made by ``dse``)
    and ``last_update`` (UTC time of its latest trial start or finish, to the second, or None); times are
    ISO 8601 text."""
    from dse.identity import budget, runs

    spec = overview.user_attrs.get("spec") or {}
    names = overview.metric_names or [o["name"] for o in spec.get("objectives", [])] or [
        f"objective{i}" for i in range(len(overview.directions))]
    recorded = runs(overview.user_attrs)
    return {"name": overview.name, "model": spec.get("model") or overview.user_attrs.get("model"),
            "objectives": _objectives(names, overview.directions), "trials": _trial_counts(overview.states),
            "budget": budget(overview.user_attrs), "created": recorded[0].get("time") if recorded else None,
            "last_update": json_native(overview.last_update and overview.last_update.replace(microsecond=0))}


def listing_table(listings: list[dict]) -> str:
    """:func:`study_listing` rows as a text table, one line per study."""
    headers = ["study", "model", "objectives", *(s.lower() for s in STATES), "budget", "created", "last update"]
    rows = [[s["name"], s["model"] or "", ", ".join(f"{o['name']} {o['direction'][:3]}" for o in s["objectives"]),
             *(s["trials"][state.lower()] for state in STATES), "" if s["budget"] is None else s["budget"],
             s["created"] or "", s["last_update"] or ""] for s in listings]
    return text_table(rows, headers)


def pareto_entry(trial: optuna.trial.FrozenTrial, full: dict | None, names: list[str]) -> dict:
    """One Pareto trial for ``dse status --json``: ``trial`` (number), ``values`` (objective name -> value),
    ``hw_metrics`` (every scalar metric of its hardware report, :func:`hw_metrics`), ``accelerator`` (its
    searched accelerator fields, {} when none are searched), ``constraints`` (constraint name -> value, <= 0
    met), ``proxy`` (its proxy result, or None), ``full`` (its full-fidelity result, or None), ``warm_start``
    (the warm-start label, or None) and ``plan`` (:func:`plan_label`)."""
    return {"trial": trial.number, "values": dict(zip(names, trial.values or [])),
            "hw_metrics": hw_metrics(trial.user_attrs), "accelerator": trial.user_attrs.get("accelerator") or {},
            "constraints": dict(trial.constraints),
            "proxy": trial.user_attrs.get("eval", {}).get("proxy"), "full": full,
            "warm_start": trial.user_attrs.get("warm_start"), "plan": plan_label(trial.user_attrs)}


def status_dict(study: optuna.Study, storage: str, trials=None) -> dict:
    """What ``dse status`` prints, as one JSON-native object (:func:`json_native`; no NaN): ``study``,
    ``storage`` (the URL, password masked), ``model``, ``device``, ``budget``, ``objectives``
    (``[{name, direction}]``), ``constraints`` (the spec's, as written), ``searched`` (the searched accelerator
    fields and their choices), ``trials`` (per state, as in ``dse list``, plus ``infeasible``: completed trials
    screened out by the cost model), ``pareto`` (:func:`pareto_entry` of each Pareto trial, best first on the
    first objective), ``full_results`` (trial number as text -> full-fidelity result: promotions and trials
    evaluated in full) and ``hypervolume`` (``{value, feasible}``: see :func:`hypervolume_of`)."""
    from dse.identity import budget
    from dse.study import full_results

    spec = study.user_attrs.get("spec", {})
    trials = trials if trials is not None else study.get_trials(deepcopy=False)
    names = objective_names(study)
    full = full_results(study, trials)
    counts = state_counts(study)
    volume, feasible = hypervolume_of(study, trials)
    hardware = spec.get("hardware") or {}
    return json_native({
        "study": study.study_name, "storage": storage, "model": spec.get("model") or study.user_attrs.get("model"),
        "device": device_label(spec, study.user_attrs), "budget": budget(study.user_attrs),
        "objectives": _objectives(names, [d.name.lower() for d in study.directions]),
        "constraints": list(spec.get("constraints", [])),
        "searched": {k: hardware[k] for k in searched_fields(spec)},
        "trials": {**_trial_counts(counts), "infeasible": counts["infeasible"]},
        "pareto": [pareto_entry(t, full.get(t.number), names) for t in pareto_trials(study, trials)],
        "full_results": {str(n): full[n] for n in sorted(full)},
        "hypervolume": {"value": volume, "feasible": feasible}})
