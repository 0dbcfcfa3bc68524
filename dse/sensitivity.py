"""Sensitivity scan: the proxy loss of compressing one unit of choice at a time, for every allowed choice.

For each unit of the spec's search space (a layer, a group within a block, or a group, as
``space.tie`` says) and each distinct choice its group allows (sparsity x format x prune x quant,
the dense FP16 choice excluded), the model is compressed in that unit only and the proxy
(KL from the dense model, perplexity) is measured; each block in ``space.mlgru_blocks`` is
scanned with its attention replaced by a distilled MLGRU. Calibrated methods use the dense
model's statistics, which is what sequential calibration gives when every other layer is dense.

Results are cached per (model, unit, choice, calibration, proxy set): a rerun, or a scan of a
grown space, only measures what is new. :func:`scan` returns rows
``{unit, group, block, layers, choice, sparsity, format, prune, quant, mixer, kl, ppl, seconds,
source}``, the input of warm starts and surrogate estimates in the search and of the plot
(:func:`write_plot`).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

from dse.arch import block_index
from dse.plan import BlockPlan, LayerPlan, ModelPlan
from dse.space import Unit
from dse.spec import StudySpec
from dse.textio import write_atomic
from evaluators.compress.cache import entry_key


def unit_choices(unit: Unit) -> list[LayerPlan]:
    """The distinct non-identity choices of a unit's group, as plans of its first layer."""
    group = unit.group
    seen: dict[str, LayerPlan] = {}
    for sparsity, fmt, prune, quant in product(group.sparsity, group.formats, group.prune, group.quant):
        if quant == "refit" and not fmt.is_ternary:
            continue
        lp = LayerPlan(unit.layers[0], sparsity, fmt, prune if sparsity else "magnitude",
                       "rtn" if fmt.is_float else quant)
        if not lp.is_identity:
            seen.setdefault(json.dumps(lp.to_dict(), sort_keys=True), lp)
    return list(seen.values())


def scan_plans(spec: StudySpec, units: list[Unit]) -> list[tuple[dict, ModelPlan]]:
    """(row description, one-unit plan) for every unit x choice, then every MLGRU-eligible block."""
    out = []
    for unit in units:
        for lp in unit_choices(unit):
            plan = ModelPlan(layers=tuple(replace(lp, name=name) for name in unit.layers))
            row = {"unit": unit.key, "group": unit.group.name, "block": block_index(unit.layers[0]),
                   "layers": len(unit.layers), "choice": lp.label, "sparsity": lp.to_dict()["sparsity"],
                   "format": lp.fmt.name, "prune": lp.prune, "quant": lp.quant, "mixer": "attention"}
            out.append((row, plan))
    for block in spec.space.mlgru_blocks:
        row = {"unit": f"b{block}.mixer", "group": "mixer", "block": block, "layers": 4, "choice": "mlgru",
               "sparsity": "dense", "format": "16", "prune": "magnitude", "quant": "rtn", "mixer": "mlgru"}
        out.append((row, ModelPlan(blocks=(BlockPlan(block, "mlgru"),))))
    return out


def scan(spec: StudySpec, units: list[Unit], model, tokenizer, proxy, progress=None, say=None) -> list[dict]:
    """Measure (or load) every row of :func:`scan_plans` (module docstring); ``progress(done, total, row)``
    after each row, ``say(message)`` for long steps (statistics, distillation)."""
    from evaluators.compress import PlanApplier
    from evaluators.fidelity import dense_reference, proxy_eval

    applier = PlanApplier(model, tokenizer, replace(spec.compression, mode="dense"), progress=say)
    cache = applier.cache
    reference = None
    results_dir = cache.dir / "sensitivity"
    results_dir.mkdir(parents=True, exist_ok=True)
    items = scan_plans(spec, units)
    rows = []
    for i, (row, plan) in enumerate(items):
        calib = spec.compression
        key = entry_key(cache.fingerprint, "sensitivity", plan.to_dict(), proxy.key, calib.windows,
                        calib.seq_len, calib.seed, calib.distill_steps, calib.distill_lr)
        path = results_dir / f"{key}.json"
        if path.exists():
            row = {**row, **json.loads(path.read_text()), "source": "cache"}
        else:
            if reference is None:
                applier.restore()
                reference = dense_reference(model, proxy, cache)
            started = time.perf_counter()
            applier.apply(plan)
            result = proxy_eval(model, proxy, reference, applier.dense_output_head())
            measured = {"kl": result.metric("proxy", "kl"), "ppl": result.metric("proxy", "ppl"),
                        "seconds": time.perf_counter() - started}
            write_atomic(path, json.dumps(measured))  # a scan interrupted mid-write leaves no half file
            row = {**row, **measured, "source": "computed"}
        rows.append(row)
        if progress:
            progress(i + 1, len(items), row)
    applier.restore()
    return rows


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    """A Plotly heatmap (HTML, self-contained): units down, choices across, colour log10 KL."""
    import math

    import plotly.graph_objects as go

    units = list(dict.fromkeys(r["unit"] for r in rows))
    choices = list(dict.fromkeys(r["choice"] for r in rows))
    kl = {(r["unit"], r["choice"]): r["kl"] for r in rows}
    z = [[math.log10(max(kl[(u, c)], 1e-6)) if (u, c) in kl else None for c in choices] for u in units]
    text = [[f"{kl[(u, c)]:.4f}" if (u, c) in kl else "" for c in choices] for u in units]
    fig = go.Figure(go.Heatmap(z=z, x=choices, y=units, text=text, texttemplate="%{text}",
                               colorscale="Viridis", colorbar={"title": "log10 KL"},
                               hovertemplate="%{y} %{x}: KL %{text} nats/token<extra></extra>"))
    fig.update_layout(title=title, height=max(400, 22 * len(units)), yaxis={"autorange": "reversed"},
                      xaxis_title="choice", yaxis_title="unit")
    fig.write_html(str(path), include_plotlyjs=True)
