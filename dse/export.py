"""Exporting a chosen trial: plan YAML, accelerator YAML, the per-layer kernel table (``kernels.json`` and the C++
header ``kernels.hpp``, :mod:`hwcost.kernel_table`), hardware report JSON, evaluation JSON, a short summary, and
optionally the compressed model (compressed-tensors/BitNet, :mod:`evaluators.hf_export`, or dse-packed,
:mod:`evaluators.checkpoint`). The plan, the accelerator and
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

A screened-out trial (refused by the hardware screen, never evaluated) may be exported with ``--trial N``: a user
may want the plan of a design that does not fit; :func:`screened_out` gives the warning ``dse export`` prints on
stderr, and ``summary.txt``, ``evaluation.json`` and ``bundle.json`` say so.

The bundle directory
--------------------
Everything (plan.yaml, accelerator.yaml, kernels.json, kernels.hpp, hw_report.json, evaluation.json, summary.txt,
checkpoint/ when asked)
is written into a new sibling directory, ``bundle.json`` last, which then takes the place of ``--out``
(:func:`dse.textio.replacing_directory`): ``--out`` holds a whole bundle or what it held before, never a mix, and
nothing is left behind when writing fails or is interrupted. ``bundle.json`` names the study, the trial, its plan
hash and every file with its size and sha256 (``sha256sum`` of the file gives the same hex digest).
``--out`` may be a new directory, an empty one, or one holding the bundle of the same trial (replaced); one
holding another trial's or another study's bundle is refused unless ``force`` (then replaced whole: no file of
the old bundle survives next to the new one); a file, or a directory holding anything that is not part of a
bundle, is always refused (``--force`` never deletes files that are not a bundle's).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import optuna
import yaml

from dse.errors import UserError
from dse.pareto import bounds, is_feasible, losses, study_front
from dse.plan import ModelPlan
from dse.records import TrialRecords
from dse.report import hw_metrics, trial_row
from dse.textio import replacing_directory, sha256_of

PICKS = ("knee", "max-accuracy", "min-latency", "min-energy")
WHERE_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
BUNDLE = "bundle.json"
BUNDLE_FORMAT = "dse-export-bundle"
BUNDLE_FILES = ("plan.yaml", "accelerator.yaml", "kernels.json", "kernels.hpp", "hw_report.json", "evaluation.json",
                "summary.txt", "checkpoint")
"""What a bundle holds besides ``bundle.json`` (the names of bundles written before it)."""


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


def screened_out(trial: optuna.trial.FrozenTrial) -> str | None:
    """The warning for a trial the hardware screen refused (never evaluated), naming the constraints it breaks;
    None for any other trial."""
    if trial.user_attrs.get("evaluated") is not False:
        return None
    broken = ", ".join("fits the device" if k == "fits" else k
                       for k, v in (trial.user_attrs.get("constraints") or {}).items() if v > 0) or "a constraint"
    return (f"trial {trial.number} was screened out by the hardware screen (it breaks {broken}) and never "
            "evaluated: the bundle has its plan and hardware report, no accuracy")


def bundle_identity(out: Path) -> dict | None:
    """What the directory ``out`` holds: ``{study, trial, plan_hash, files}`` of the bundle there (its
    ``bundle.json``; for a bundle written before it, ``plan.yaml``'s header and :data:`BUNDLE_FILES`), or None when
    it holds no bundle. ``files``: the top-level names that belong to it."""
    manifest = out / BUNDLE
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            return {"study": data["study"], "trial": data["trial"], "plan_hash": data.get("plan_hash"),
                    "files": {BUNDLE} | {name.split("/", 1)[0] for name in data["files"]}}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None
    try:
        header = yaml.safe_load((out / "plan.yaml").read_text())
        return {"study": header["study"], "trial": header["trial"],
                "plan_hash": ModelPlan.from_dict(header["plan"]).hash, "files": set(BUNDLE_FILES)}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def check_out(out: Path, study_name: str, number: int, plan_hash: str | None, force: bool = False) -> None:
    """Refuse (:class:`ExportError`, one line) an ``--out`` the bundle of trial ``number`` of ``study_name`` (plan
    ``plan_hash``) may not replace (module docstring): a file, a directory with anything but a bundle, or one with
    another trial's bundle unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file, not a directory; give a new or empty directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    held = bundle_identity(out)
    foreign = [name for name in entries if held is None or name not in held["files"]]
    if foreign:
        raise ExportError(f"--out: {out} holds '{foreign[0]}', which is not part of a bundle; give a new or empty "
                          "directory (--force replaces only a bundle)")
    same = (held["study"], held["trial"]) == (study_name, number) and held["plan_hash"] in (None, plan_hash)
    if not (same or force):
        other = "" if (held["study"], held["trial"]) != (study_name, number) else " of another storage (another plan)"
        raise ExportError(f"--out: {out} holds the bundle of study '{held['study']}' trial {held['trial']}{other}; "
                          "give another --out, or --force to replace it")


def _in_bundle(filename, out: Path) -> bool:
    """Whether an OSError's ``filename`` is ``out``, in it, or in the sibling directories written for it."""
    if not filename:
        return False
    parts = Path(os.path.abspath(filename)).parts
    top = parts[:len(out.parts)]
    return len(top) == len(out.parts) and top[:-1] == out.parts[:-1] and (
        top[-1] == out.name or top[-1].startswith(f".{out.name}."))


def export_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, out: Path, checkpoint: bool = False,
                 progress=None, records: TrialRecords | None = None, force: bool = False,
                 checkpoint_format: str = "compressed-tensors", verify: bool = True) -> list[Path]:
    """Write the bundle for ``trial`` into the directory ``out``, atomically (module docstring; ``force``: replace
    another trial's bundle); with ``checkpoint`` also the compressed model in ``out/checkpoint`` in
    ``checkpoint_format`` (:data:`dse.plan.CHECKPOINT_FORMATS`: transformers loads a compressed-tensors one as it
    is; :func:`evaluators.checkpoint.load_checkpoint` loads both; ``verify``: reload it with transformers and
    compare logits first). Returns the files, ``bundle.json`` last. ``records``: the
    study's (default: found through the storage the study was loaded from). :class:`ExportError` for an ``--out``
    that may not be replaced or cannot be written."""
    records = records or TrialRecords.of(study)
    plan = records.plan(trial)
    plan_hash = ModelPlan.from_dict(plan).hash if plan else None
    out = Path(os.path.abspath(out))
    check_out(out, study.study_name, trial.number, plan_hash, force)
    ancestor = next(p for p in out.parents if p.exists())
    if not ancestor.is_dir():
        raise ExportError(f"--out: {ancestor} is a file, not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"--out: cannot create {out.parent}: {err.strerror or err}") from None
    try:
        with replacing_directory(out) as tmp:
            names = _write_bundle(study, trial, tmp, records, checkpoint and checkpoint_format, progress, verify)
            _write_manifest(tmp, names, study.study_name, trial, plan_hash)
    except OSError as err:  # about the bundle's own paths: --out; anything else (a model file) is not ours
        if not _in_bundle(err.filename, out):
            raise
        raise ExportError(f"--out: cannot write {out}: {err.strerror or err}") from None
    return [out / name for name in names] + [out / BUNDLE]


def _write_bundle(study: optuna.Study, trial: optuna.trial.FrozenTrial, out: Path, records: TrialRecords,
                  checkpoint: str | bool, progress, verify: bool = True) -> list[str]:
    """The bundle's files (not ``bundle.json``) in the new directory ``out``; their paths relative to it.
    ``checkpoint``: the checkpoint format, or False for none."""
    from dse.study import full_result
    from hwcost.kernel_table import bundle_files_of_records

    plan, hw = records.plan(trial), records.report(trial) or {}
    accelerator = trial_accelerator(study, trial, records)
    spec = study.user_attrs.get("spec", {})
    full = full_result(study, trial)
    header = {"study": study.study_name, "trial": trial.number, "model": spec.get("model"),
              "device": (accelerator or spec.get("hardware", {})).get("device")}
    evaluation = dict(trial.user_attrs.get("eval", {"evaluated": False}))
    if screened_out(trial):
        evaluation["screened_out"] = screened_out(trial)
    if full is not None:
        evaluation["full"] = full
    files = {
        "plan.yaml": yaml.safe_dump({**header, "plan": plan}, sort_keys=False),
        **({"accelerator.yaml": accelerator_yaml(study, accelerator)} if accelerator else {}),
        **(bundle_files_of_records(plan, study.user_attrs.get("workload"), accelerator, hw,
                                   study.user_attrs.get("devices")) if plan and accelerator else {}),
        "hw_report.json": json.dumps(hw, indent=1),
        "evaluation.json": json.dumps(evaluation, indent=1),
        "summary.txt": summary_text(study, trial, full, hw),
    }
    for name, text in files.items():
        (out / name).write_text(text)
    written = list(files)
    if checkpoint:
        from evaluators.settings import CompressionSpec
        from evaluators.checkpoint import write_checkpoint

        compression = CompressionSpec(**spec.get("compression", {}))
        paths = write_checkpoint(spec["model"], ModelPlan.from_dict(plan), compression, out / "checkpoint",
                                 progress=progress, format=checkpoint, verify=verify)
        written += [path.relative_to(out).as_posix() for path in paths]
    return written


def _write_manifest(out: Path, names: list[str], study_name: str, trial: optuna.trial.FrozenTrial,
                    plan_hash: str | None) -> None:
    """``bundle.json``: what the bundle is and every file's bytes and sha256."""
    manifest = {"format": BUNDLE_FORMAT, "version": 1, "study": study_name, "trial": trial.number,
                "plan_hash": plan_hash, "screened_out": bool(screened_out(trial)),
                "files": {name: {"bytes": (out / name).stat().st_size, "sha256": sha256_of(out / name)}
                          for name in names}}
    (out / BUNDLE).write_text(json.dumps(manifest, indent=1) + "\n")


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
    if screened_out(trial):
        lines.insert(1, f"  SCREENED OUT, NOT EVALUATED: {screened_out(trial)}")
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
