"""The dashboard's tables, built from stored trials (pure functions: no Streamlit, no drawing).

Every frame is derived from what the driver stored (the trials' scalars; one trial's plan and hardware
report, :mod:`dse.records`) and from the
``dse`` functions that ``dse status`` and ``dse export`` use (Pareto front, hypervolume, table rows),
so the dashboard and the command line agree on every number.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from dse.arch import block_index, layer_type
from dse.pareto import hypervolume_history, is_feasible, losses, nondominated, study_front
from dse.plan import LayerPlan
from dse.report import accelerator_columns, hw_metrics, objective_names, plan_label, searched_fields, trial_row
from dse.study import full_results
from hwcost import METRICS

MODEL_AXES = {
    "proxy_kl": ("proxy KL from the dense model (nats/token)", "minimize"),
    "proxy_ppl": ("proxy perplexity", "minimize"),
    "accuracy": ("accuracy (full lm-eval tasks)", "maximize"),
    "full_accuracy": ("full-fidelity accuracy (promoted trials)", "maximize"),
}
HW_LABELS = {
    "decode_tokens_per_s": "decode tokens/s", "decode_ms_per_token": "decode ms/token", "j_per_token": "J/token",
    "power_w": "power (W)", "prefill_ms": "prefill (ms)", "weight_bytes": "weight bytes",
    "lut_util": "LUT share", "dsp_util": "DSP share", "bram_util": "BRAM share", "uram_util": "URAM share",
}
AXES = {**MODEL_AXES, **{name: (HW_LABELS.get(name, name), meta["direction"]) for name, meta in METRICS.items()}}
"""Every quantity a chart axis may show: name -> (label with unit, natural direction)."""

_STATE_STATUS = {TrialState.RUNNING: "running", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned",
                 TrialState.WAITING: "waiting"}


# ------------------------------------------------------------------ the study view
def status_of(trial: optuna.trial.FrozenTrial, front: set[int]) -> str:
    """``pareto``/``feasible``: evaluated, meets every constraint (on the study's front or not); ``infeasible``:
    screened out by the cost model or a constraint; ``unrecorded``: complete but without the driver's records
    (a study written by another tool or an old version); else the unfinished state (``running``, ...)."""
    if trial.state != TrialState.COMPLETE:
        return _STATE_STATUS.get(trial.state, trial.state.name.lower())
    if is_feasible(trial):
        return "pareto" if trial.number in front else "feasible"
    if trial.user_attrs.get("evaluated") is False or any(v > 0 for v in trial.constraints.values()):
        return "infeasible"
    return "unrecorded"


def trials_frame(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    """One row per trial (every state): ``trial``, ``status``, the objectives, ``promoted`` (a full result
    exists), the searched accelerator fields (``hw.<field>``, when the study searches some), proxy and
    full-fidelity results, every hardware metric, ``warm_start``, violated constraints, ``plan`` summary and
    ``finished`` time. Values a trial never measured (screened out) are NaN."""
    front = {t.number for t in study_front(study, trials)}
    full = full_results(study, trials)
    names = objective_names(study)
    rows = []
    for t in trials:
        row = trial_row(study, t, full.get(t.number), names) if t.state == TrialState.COMPLETE else {
            "trial": t.number, **accelerator_columns(t.user_attrs), "plan": plan_label(t.user_attrs)}
        row.update({k: v for k, v in hw_metrics(t.user_attrs).items() if k not in row})
        row = {k: (math.nan if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
        row["status"] = status_of(t, front)
        row["promoted"] = t.number in full
        row["warm_start"] = t.user_attrs.get("warm_start")
        row["violated"] = ", ".join(k for k, v in t.constraints.items() if v > 0)
        row["note"] = t.user_attrs.get("error") or t.user_attrs.get("pruned") or ""
        row["finished"] = t.datetime_complete
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for name in names:  # no trial has measured it yet
        if name not in frame.columns:
            frame[name] = math.nan
    first = ["trial", "status", *names, "promoted",
             *[f"hw.{k}" for k in searched_fields(study.user_attrs.get("spec", {}))]]
    last = ["warm_start", "violated", "note", "finished", "plan"]
    middle = [c for c in frame.columns if c not in first and c not in last]
    return frame[[c for c in first + middle + last if c in frame.columns]]


def axis_options(frame: pd.DataFrame, objectives=()) -> list[str]:
    """The :data:`AXES` quantities with at least one value in ``frame``, and the study's ``objectives``
    even before any trial measured them (so a page opened early keeps the objectives as its axes)."""
    return [name for name in AXES if name in objectives
            or (name in frame.columns and frame[name].notna().any())]


def front_2d(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The feasible rows no other feasible row beats on both ``x`` and ``y`` (each in its natural
    direction, :data:`AXES`), sorted by ``x``: the front drawn as a line for any pair of axes."""
    if x not in frame.columns or y not in frame.columns:
        return frame.iloc[:0]
    rows = frame[frame["status"].isin(("pareto", "feasible"))].dropna(subset=[x, y])
    if rows.empty:
        return rows
    mask = nondominated(losses(rows[[x, y]].to_numpy(dtype=float), [AXES[x][1], AXES[y][1]]))
    return rows[mask].sort_values(x)


def hypervolume_frame(study: optuna.Study, trials) -> pd.DataFrame:
    """``trial``, ``hypervolume``: the study's hypervolume after each feasible trial (:mod:`dse.pareto`)."""
    return pd.DataFrame(hypervolume_history(trials, study.directions), columns=["trial", "hypervolume"])


# ------------------------------------------------------------------ one trial
def layer_position(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.down_proj`` -> (3, ``mlp.down_proj``); a layer outside the blocks -> (None, name)."""
    return block_index(name), layer_type(name)


def _bits_per_weight(layer: LayerPlan, shapes: dict[str, tuple[int, int]]) -> float:
    """Stored bits per dense weight (values, scales and N:M index, as the cost model counts them)."""
    from hwcost.kernels import storage_bits

    in_f, out_f = shapes.get(layer.name, (0, 0))
    if not in_f:  # no shape recorded: the nominal value bits times the kept fraction
        return layer.fmt.bits * (1.0 if layer.sparsity is None else layer.sparsity.density)
    return storage_bits(in_f, out_f, layer.sparsity, layer.fmt)["total"] / (in_f * out_f)


def plan_grid(plan: dict, workload: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan map: rows are blocks (then layers outside blocks), columns layer types in model order,
    plus ``mixer``. Returns (labels, bits): the label of every cell (``2:4 int4/g64``, ``ternary``,
    ``fp16``; ``attention``/``MLGRU`` in ``mixer``) and its stored bits per dense weight (NaN for
    ``mixer`` and absent layers). Layers the plan does not name are the model's FP16 layers."""
    from dse.plan import ModelPlan

    model_plan = ModelPlan.from_dict(plan)
    shapes, names = {}, [lp.name for lp in model_plan.layers]
    if workload:
        from hwcost import Workload

        wl = Workload.from_dict(workload)
        mlgru = [bp.index for bp in model_plan.blocks if bp.mixer == "mlgru"]
        layers = wl.linear_layers(mlgru)
        shapes = {layer.name: (layer.in_features, layer.out_features) for layer in layers}
        names = [layer.name for layer in layers]
    labels: dict[str, dict[str, str]] = {}
    bits: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    blocks = sorted({b for b, _ in map(layer_position, names) if b is not None})
    for name in names:
        block, kind = layer_position(name)
        row = str(block) if block is not None else name
        if block is None:
            kind = "outside blocks"
        if kind not in columns:
            columns.append(kind)
        layer = model_plan.layer(name)
        labels.setdefault(row, {})[kind] = layer.label
        bits.setdefault(row, {})[kind] = _bits_per_weight(layer, shapes)
    for block in blocks:
        labels.setdefault(str(block), {})["mixer"] = "MLGRU" if model_plan.mixer(block) == "mlgru" else "attention"
    order = [str(b) for b in blocks] + [r for r in labels if not r.isdigit()]
    columns = columns + ["mixer"] if blocks else columns
    label_frame = pd.DataFrame.from_dict(labels, orient="index").reindex(index=order, columns=columns).fillna("")
    bits_frame = pd.DataFrame.from_dict(bits, orient="index").reindex(index=order, columns=columns)
    return label_frame, bits_frame.astype(float)


def layer_frame(hw: dict, clock_mhz: float | None = None) -> pd.DataFrame:
    """The per-layer hardware breakdown of one decode step: one row per report row, with ``cycles`` (the
    larger of compute and memory cycles), ``us`` at the report's clock and the ``bound``."""
    rows = pd.DataFrame(hw.get("layers", []))
    if rows.empty:
        return rows
    rows["cycles"] = np.maximum(rows.get("compute_cycles", 0.0), rows.get("memory_cycles", 0.0))
    clock = clock_mhz or hw.get("clock_mhz")
    if clock:
        rows["us"] = rows["cycles"] / float(clock)
    keep = ["name", "block", "kernel", "bound", "cycles", "us", "compute_cycles", "memory_cycles", "memory_bytes",
            "weight_bytes", "kv_bytes", "macs", "kept_macs"]
    return rows[[c for c in keep if c in rows.columns]]


def resource_frame(hw: dict) -> pd.DataFrame:
    """Per resource: ``used``, ``available`` (after the shell), ``utilisation`` and the datapath ``cap``."""
    used, available = hw.get("resources", {}), hw.get("available", {})
    util, caps = hw.get("utilisation", {}), hw.get("caps", {})
    rows = [{"resource": k, "used": used.get(k), "available": available.get(k), "utilisation": util.get(k),
             "cap": caps.get(k)} for k in available or util]
    return pd.DataFrame(rows, columns=["resource", "used", "available", "utilisation", "cap"])


def evaluation_frame(user_attrs: dict, full: dict | None) -> pd.DataFrame:
    """Evaluation results by fidelity and task: ``fidelity``, ``task``, ``metric``, ``value``."""
    rows = []
    for key, value in user_attrs.get("eval", {}).get("proxy", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append({"fidelity": "proxy", "task": "proxy tokens", "metric": key, "value": float(value)})
    if full:
        for task, metrics in full.get("metrics", {}).items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append({"fidelity": "full", "task": task, "metric": metric, "value": float(value)})
        if "accuracy" in full:
            rows.append({"fidelity": "full", "task": "(mean of the spec's metrics)", "metric": "accuracy",
                         "value": float(full["accuracy"])})
    return pd.DataFrame(rows, columns=["fidelity", "task", "metric", "value"])


def accelerator_frame(accelerator: dict | None, searched: list[str] = ()) -> pd.DataFrame:
    """The accelerator a trial was costed on, one row per field: ``field``, ``value`` (as text: values of
    every type share the column), ``searched`` (the study searches the field)."""
    from dse.hardware import encode_choice

    rows = [{"field": k, "value": "" if v is None else str(encode_choice(v)), "searched": k in searched}
            for k, v in (accelerator or {}).items()]
    return pd.DataFrame(rows, columns=["field", "value", "searched"])


def compare_frame(a: pd.Series, b: pd.Series) -> pd.DataFrame:
    """Two trial rows side by side on every number either has: ``metric``, A, B, ``B - A``."""
    names = [c for c in a.index if c in AXES or c.startswith(("proxy_", "full_")) or "." in c]
    rows = []
    for name in names:
        va, vb = a.get(name), b.get(name)
        if pd.isna(va) and pd.isna(vb):
            continue
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append({"metric": name, f"trial {a['trial']}": va, f"trial {b['trial']}": vb, "B - A": delta})
    return pd.DataFrame(rows)


def plan_diff(plan_a: dict, plan_b: dict) -> pd.DataFrame:
    """Layers and blocks whose choice differs between two plans: ``unit``, A, B (method names included)."""
    from dse.plan import ModelPlan

    pa, pb = ModelPlan.from_dict(plan_a), ModelPlan.from_dict(plan_b)

    def describe(layer: LayerPlan) -> str:
        if layer.is_identity:
            return layer.label
        methods = [] if layer.sparsity is None else [layer.prune]
        methods += [] if layer.fmt.is_float else [layer.quant]
        return f"{layer.label} ({'+'.join(methods)})"

    names = list(dict.fromkeys([lp.name for lp in pa.layers] + [lp.name for lp in pb.layers]))
    rows = [{"unit": n, "A": describe(pa.layer(n)), "B": describe(pb.layer(n))} for n in names
            if describe(pa.layer(n)) != describe(pb.layer(n))]
    blocks = sorted({bp.index for bp in pa.blocks} | {bp.index for bp in pb.blocks})
    rows += [{"unit": f"block {i} mixer", "A": pa.mixer(i), "B": pb.mixer(i)} for i in blocks
             if pa.mixer(i) != pb.mixer(i)]
    return pd.DataFrame(rows, columns=["unit", "A", "B"])
