"""Exporting a chosen trial: plan YAML, accelerator YAML, hardware report JSON, evaluation JSON, a short
summary, and optionally the compressed model (:mod:`evaluators.checkpoint`). The plan, the accelerator and
the report are the trial's records (:mod:`dse.records`; the user attributes in studies written before them,
and the spec's one accelerator for trials written before the accelerator record).

``accelerator.yaml`` is the whole accelerator the trial was costed on (:meth:`hwcost.Accelerator.to_dict`)
and, when its device came from the spec's ``hardware.devices_file``, a ``devices:`` mapping with that board
in devices-file form, so ``dse hwcost estimate --accel accelerator.yaml --plan plan.yaml --model-config ...``
reproduces ``hw_report.json`` without the study or the devices file.

Choosing: ``--trial N``, or ``--pick`` among the Pareto trials that pass every ``--where``
condition (``metric >= value`` or ``<=`` on a hardware metric, ``proxy_kl``, ``proxy_ppl`` or
``full_accuracy``):

* ``max-accuracy``: the highest full-fidelity accuracy among promoted trials (the lowest proxy KL
  when none was promoted yet);
* ``min-latency``: the fewest decode ms per token;
* ``min-energy``: the fewest joules per token;
* ``knee``: the trial nearest (Euclidean) to the ideal point once each objective is normalised
  to [0, 1] between the best and worst candidate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import yaml

from dse.errors import UserError
from dse.pareto import bounds, is_feasible, losses, study_front
from dse.records import TrialRecords
from dse.report import hw_metrics, trial_row

PICKS = ("knee", "max-accuracy", "min-latency", "min-energy")
WHERE_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


class ExportError(UserError, ValueError):
    """The requested trial cannot be exported (one-line message)."""


def _metric(trial, full: dict | None, name: str) -> float | None:
    """A trial's value of ``name``: hardware metric, proxy or full-fidelity figure."""
    hw = hw_metrics(trial.user_attrs)
    proxy = trial.user_attrs.get("eval", {}).get("proxy", {})
    if name in ("proxy_kl", "proxy_ppl"):
        return proxy.get(name[len("proxy_"):])
    if name in ("full_accuracy", "accuracy"):
        return None if full is None else full.get("accuracy")
    value = hw.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_where(conditions: list[str]) -> list[tuple[str, str, float]]:
    out = []
    for text in conditions or []:
        match = WHERE_RE.match(text)
        if not match:
            raise ExportError(f"--where: {text!r} is not '<metric> <=|>= <number>', e.g. 'decode_tokens_per_s>=30'")
        metric, op, number = match.groups()
        try:
            out.append((metric, op, float(number)))
        except ValueError:
            raise ExportError(f"--where: {number!r} is not a number") from None
    return out


def choose_trial(study: optuna.Study, number: int | None = None, pick: str = "knee",
                 where: list[str] | None = None, records: TrialRecords | None = None):
    """Trial ``number`` if given, else the Pareto trial ``pick`` selects among those meeting ``where``.
    ``records``: the study's (default: found through the storage the study was loaded from)."""
    from dse.study import full_results

    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            raise ExportError(f"--trial: study '{study.study_name}' has no trial {number}")
        trial = trials[0]
        records = records or TrialRecords.of(study)
        if trial.state != optuna.trial.TrialState.COMPLETE or records.plan(trial) is None:
            raise ExportError(f"--trial: trial {number} is {trial.state.name}, not a completed trial with a plan")
        return trial
    if pick not in PICKS:
        raise ExportError(f"--pick: '{pick}' is not one of {', '.join(PICKS)}")
    conditions = parse_where(where)
    full = full_results(study)
    feasible = [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    if not feasible:
        raise ExportError(f"study '{study.study_name}' has no evaluated feasible trial to export yet")
    for metric, op, value in conditions:
        known = [t for t in feasible if _metric(t, full.get(t.number), metric) is not None]
        if not known:
            raise ExportError(f"--where: no trial records '{metric}' (hardware metrics, proxy_kl, proxy_ppl, "
                              "full_accuracy)")
        feasible = [t for t in known if (_metric(t, full.get(t.number), metric) >= value if op == ">="
                                         else _metric(t, full.get(t.number), metric) <= value)]
        if not feasible:
            raise ExportError(f"--where: no feasible trial of study '{study.study_name}' has {metric} {op} {value:g}")
    front = study_front(study, feasible)
    if pick == "knee":
        loss = losses([t.values for t in front], study.directions)
        lo, hi = bounds(loss)
        scaled = (loss - lo) / np.where(hi > lo, hi - lo, 1.0)
        return front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]
    if pick == "max-accuracy":
        promoted = [t for t in front if full.get(t.number)]
        if promoted:
            return max(promoted, key=lambda t: full[t.number]["accuracy"])
        return min(front, key=lambda t: _metric(t, None, "proxy_kl") or float("inf"))
    key = "decode_ms_per_token" if pick == "min-latency" else "j_per_token"
    return min(front, key=lambda t: _metric(t, None, key))


def trial_accelerator(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                      records: TrialRecords | None = None) -> dict | None:
    """The accelerator ``trial`` was costed on (:meth:`hwcost.Accelerator.to_dict`): its record; for a trial
    written before that record, the accelerator of its study's spec (which then searched no field); else None."""
    from dse.hardware import searched_hardware

    records = records or TrialRecords.of(study)
    stored = records.accelerator(trial)
    hardware = study.user_attrs.get("spec", {}).get("hardware")
    if stored is not None or not hardware or searched_hardware(hardware):
        return stored
    from hwcost.accelerator import Accelerator

    try:
        return json.loads(json.dumps(Accelerator.from_dict(hardware).to_dict()))  # as a record reads back
    except ValueError:  # fields of an older Accelerator, or a board this process does not know: as stored
        return {k: v for k, v in hardware.items() if k != "devices_file"}


def accelerator_yaml(study: optuna.Study, accelerator: dict) -> str:
    """``accelerator.yaml``: the accelerator's fields, then ``devices:`` with its board when the board came from
    the spec's devices file (the study's ``devices`` attribute, :mod:`dse.hardware`)."""
    doc = dict(accelerator)
    boards = study.user_attrs.get("devices") or {}
    if accelerator.get("device") in boards:
        doc["devices"] = {accelerator["device"]: boards[accelerator["device"]]}
    return yaml.safe_dump(doc, sort_keys=False)


def export_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, out: Path, checkpoint: bool = False,
                 progress=None, records: TrialRecords | None = None) -> list[Path]:
    """Write the bundle for ``trial`` into ``out``; with ``checkpoint`` also the compressed model in
    ``out/checkpoint`` (loadable with :func:`evaluators.checkpoint.load_checkpoint`). Returns the files.
    ``records``: the study's (default: found through the storage the study was loaded from)."""
    from dse.study import full_result

    records = records or TrialRecords.of(study)
    plan, hw = records.plan(trial), records.report(trial) or {}
    accelerator = trial_accelerator(study, trial, records)
    out.mkdir(parents=True, exist_ok=True)
    spec = study.user_attrs.get("spec", {})
    full = full_result(study, trial)
    header = {"study": study.study_name, "trial": trial.number, "model": spec.get("model"),
              "device": (accelerator or spec.get("hardware", {})).get("device")}
    evaluation = dict(trial.user_attrs.get("eval", {"evaluated": False}))
    if full is not None:
        evaluation["full"] = full
    files = {
        "plan.yaml": yaml.safe_dump({**header, "plan": plan}, sort_keys=False),
        **({"accelerator.yaml": accelerator_yaml(study, accelerator)} if accelerator else {}),
        "hw_report.json": json.dumps(hw, indent=1),
        "evaluation.json": json.dumps(evaluation, indent=1),
        "summary.txt": summary_text(study, trial, full, hw),
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    if checkpoint:
        from dse.plan import ModelPlan
        from evaluators.settings import CompressionSpec
        from evaluators.checkpoint import write_checkpoint

        compression = CompressionSpec(**spec.get("compression", {}))
        written += write_checkpoint(spec["model"], ModelPlan.from_dict(plan), compression,
                                    out / "checkpoint", progress=progress)
    return written


def summary_text(study: optuna.Study, trial: optuna.trial.FrozenTrial, full: dict | None = None,
                 hw: dict | None = None) -> str:
    """A few lines a person reads first: objectives, hardware (``hw``: the trial's report), fidelity results,
    plan summary."""
    row = trial_row(study, trial, full)
    hw = hw or {}
    lines = [f"study {study.study_name}, trial {trial.number}"
             + (f" ({trial.user_attrs['warm_start']})" if trial.user_attrs.get("warm_start") else "")]
    lines += [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in row.items()
              if k not in ("trial", "warm_start")]
    if full is None and trial.user_attrs.get("evaluated") and "eval" in trial.user_attrs:
        lines.append("  full fidelity: not promoted (only the proxy was measured)")
    if hw:
        lines.append(f"  fits: {hw.get('fits')}  utilisation: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in hw.get("utilisation", {}).items()))
    return "\n".join(lines) + "\n"


def bundle_zip(study: optuna.Study, trial: optuna.trial.FrozenTrial, records: TrialRecords | None = None) -> bytes:
    """The bundle :func:`export_trial` writes (without the checkpoint), as the bytes of a zip file: what the
    dashboard's export button downloads."""
    import io
    import tempfile
    import zipfile

    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in export_trial(study, trial, Path(tmp), records=records):
            archive.write(path, path.name)
    return buffer.getvalue()
