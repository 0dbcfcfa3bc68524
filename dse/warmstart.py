"""Warm starts: plans enqueued before the sampler proposes any.

* ``dense``: every unit at its least compressed allowed choice (FP16 dense where allowed).
* The uniform plans of the published systems, where the space allows them in every
  transformer block; a unit outside the blocks (lm_head) takes each part of the choice its
  group allows and its least compressed value for the rest:

  - ``uniform 2:4+int4`` (Hsieh et al., arXiv 2512.24713): magnitude 2:4 pruning and
    symmetric round-to-nearest INT4 in every block layer;
  - ``uniform ternary+mlgru`` (Zhu et al., arXiv 2406.02528): every block layer ternary
    (BitLinear absmean, ``quant: rtn``) and attention replaced by MLGRU in every block
    ``space.mlgru_blocks`` allows.

* ``sensitivity``: from a ``dse sensitivity`` result, per unit the choice minimising
  ``kl + lam * extra_ms`` (its measured proxy KL when compressed alone, plus a price on the
  decode time it adds over the cheapest plan, from the cost model), for a sweep of prices
  ``lam``; up to :data:`SENSITIVITY_PLANS` distinct plans spread over the sweep.

Each warm start is an Optuna parameter dict (:func:`dse.space.unit_params`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dse.arch import block_index
from dse.space import Unit, plan_from_params, unit_params

log = logging.getLogger(__name__)

SENSITIVITY_PLANS = 4


@dataclass(frozen=True)
class WarmStart:
    label: str
    params: dict


def _precision(fmt_name: str) -> float:
    """Bits of a format name, for ordering (ternary ~ 1.58 bits)."""
    return 1.58 if fmt_name == "ternary" else float(fmt_name)


def _least_compressed(unit: Unit) -> dict[str, str]:
    group = unit.group
    sparsity = max(group.sparsity, key=lambda s: 1.0 if s is None else s.density)
    fmt = max(group.formats, key=lambda f: _precision(f.name))
    return {"sparsity": "dense" if sparsity is None else str(sparsity), "format": fmt.name,
            "prune": group.prune[0], "quant": group.quant[0]}


def _prefer(allowed: tuple[str, ...], value: str) -> str:
    return value if value in allowed else allowed[0]


def baselines(units: list[Unit], mlgru_blocks: tuple[int, ...]) -> list[WarmStart]:
    """The dense plan and each published uniform plan the space allows (module docstring)."""
    dense = {f"b{i}.mixer": "attention" for i in mlgru_blocks}  # every parameter set: none left to the sampler
    for unit in units:
        dense.update(unit_params(unit, **_least_compressed(unit)))
    out = [WarmStart("dense", dense)]
    targets = {
        "uniform 2:4+int4": ({"sparsity": "2:4", "format": "4"}, {"prune": "magnitude", "quant": "rtn"}, False),
        "uniform ternary+mlgru": ({"sparsity": "dense", "format": "ternary"}, {"quant": "rtn"}, True),
    }
    for label, (required, preferred, mlgru) in targets.items():
        params = dict(dense)
        try:
            for unit in units:
                g = unit.group
                choice = {**_least_compressed(unit), "prune": _prefer(g.prune, preferred.get("prune", g.prune[0])),
                          "quant": _prefer(g.quant, preferred.get("quant", g.quant[0]))}
                allowed = {"sparsity": ["dense" if s is None else str(s) for s in g.sparsity],
                           "format": [f.name for f in g.formats]}
                if block_index(unit.layers[0]) is None:
                    choice.update({k: v for k, v in required.items() if v in allowed[k]})
                else:
                    choice.update(required)
                params.update(unit_params(unit, **choice))
        except ValueError as err:
            log.info("warm start '%s' skipped: %s", label, err)
            continue
        if mlgru:
            params.update({f"b{i}.mixer": "mlgru" for i in mlgru_blocks})
        out.append(WarmStart(label, params))
    return out


def from_sensitivity(rows: list[dict], units: list[Unit], mlgru_blocks: tuple[int, ...], cost_ms,
                     count: int = SENSITIVITY_PLANS) -> list[WarmStart]:
    """Plans from sensitivity rows (module docstring); ``cost_ms(params)`` is a plan's decode ms/token."""
    by_unit: dict[str, list[tuple[dict, float]]] = {}
    keys = {u.key: u for u in units}
    for row in rows:
        if row.get("mixer") == "mlgru":
            block = row["block"]
            if block in mlgru_blocks:
                by_unit.setdefault(f"b{block}.mixer", []).append(({f"b{block}.mixer": "mlgru"}, row["kl"]))
            continue
        unit = keys.get(row["unit"])
        if unit is None:
            continue
        g = unit.group
        allowed = {"sparsity": ["dense" if s is None else str(s) for s in g.sparsity],
                   "format": [f.name for f in g.formats], "prune": list(g.prune), "quant": list(g.quant)}
        choice = {f: row[f] if row[f] in allowed[f] else allowed[f][0] for f in allowed}
        try:
            by_unit.setdefault(unit.key, []).append((unit_params(unit, **choice), row["kl"]))
        except ValueError:
            continue
    if not by_unit:
        return []
    # Every unit may also stay at its least compressed choice (KL 0 by definition of the scan).
    base = {f"b{i}.mixer": "attention" for i in mlgru_blocks}
    for unit in units:
        base.update(unit_params(unit, **_least_compressed(unit)))
    for key, options in by_unit.items():
        unit = keys.get(key)
        stay = {k: v for k, v in base.items() if k.startswith(f"{key}.")} if unit else {key: "attention"}
        options.append((stay, 0.0))
    # Extra decode time of each option: cost of the plan with only that unit changed, minus the base plan's.
    base_ms = cost_ms(base)
    priced = {key: [(p, kl, cost_ms({**base, **p}) - base_ms) for p, kl in options] for key, options in by_unit.items()}
    kl_scale = np.median([kl for opts in priced.values() for _, kl, _ in opts if kl > 0] or [1.0])
    ms_scale = np.median([abs(ms) for opts in priced.values() for _, _, ms in opts if ms != 0] or [1.0])
    plans: list[dict] = []
    for lam in np.geomspace(1e-3, 1e3, 31) * kl_scale / ms_scale:
        params = dict(base)
        for opts in priced.values():
            params.update(min(opts, key=lambda o: o[1] + lam * o[2])[0])
        if params not in plans:
            plans.append(params)
    plans = [p for p in plans if p != base]
    if len(plans) > count:
        plans = [plans[i] for i in np.linspace(0, len(plans) - 1, count).round().astype(int)]
    return [WarmStart(f"sensitivity {i + 1}/{len(plans)}", p) for i, p in enumerate(plans)]


def default_sensitivity_path(study: str) -> Path:
    """Where ``dse sensitivity`` writes its result for a study by default."""
    return Path(f"sensitivity-{study}") / "sensitivity.json"


def warm_starts(spec, units: list[Unit], workload, accelerator) -> list[WarmStart]:
    """Every warm start the spec asks for, in the order they are enqueued (duplicates dropped)."""
    from hwcost import estimate

    out = baselines(units, spec.space.mlgru_blocks) if spec.warm_start.baselines else []
    path = Path(spec.warm_start.sensitivity) if spec.warm_start.sensitivity else default_sensitivity_path(spec.study)
    if path.is_file():
        rows = json.loads(path.read_text()).get("rows", [])

        def cost_ms(params: dict) -> float:
            plan = plan_from_params(params, units, spec.space.mlgru_blocks)
            return float(estimate(plan, workload, accelerator).metric("decode_ms_per_token"))

        out += from_sensitivity(rows, units, spec.space.mlgru_blocks, cost_ms)
    unique, seen = [], []
    for ws in out:
        if ws.params not in seen:
            seen.append(ws.params)
            unique.append(ws)
    return unique
