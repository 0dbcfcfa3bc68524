"""Study identity: which spec fields a resumed study must keep, compared field by field, and which may change.

A study means one spec (DESIGN.md): its trials are compared with each other on one Pareto front, so starting
a stored study again with a spec that changes what a trial means is refused, before any trial is asked, with
one line naming every differing field by its dotted path and the way out (another study name)::

    hardware.device: stored 'kria-kv260', this spec 'alveo-u280'; study 'demo' in sqlite:///s.db was run with
    the stored values (they define its trials); use another study name to change them

Identity (:data:`IDENTITY`, refused when it differs):

``model``, and the architecture read from its config (``model.workload.<field>``, the study attribute
``workload``): what is compressed. ``tasks`` (name, metric, limit) and ``task_seed``: what accuracy means.
``task_paths``, the user's task directories: their task files (YAMLs and the Python they may name), compared by
content (``task_paths[i].files.<file>``: sha256 stored with the study's spec next to each directory's absolute
path), not by path, so moving the directory keeps the study while an edited, added or removed task file is
refused; the data files a task YAML reads are not digested (edit them and the study's trials mix two datasets).
``space`` (groups, tie, mlgru_blocks, ignore): the Optuna parameters; a changed space would also meet Optuna's
``CategoricalDistribution does not support dynamic value space``. ``hardware``, fixed and searched fields
(an absent field counts as the Accelerator's default, so spelling out a default is no change), and the
boards of ``devices_file`` the device may name (``hardware.devices_file``: the entries stored with the study,
not the file's path, so moving the spec keeps the study). ``objectives`` and ``constraints``: the values and
the feasibility of every trial. ``compression`` and ``proxy``: how a plan is applied and scored. ``sampler``:
the strategy whose budget the study measures.

May change (:data:`MAY_CHANGE`, allowed and recorded per run as a study attribute ``run:<time>``, see
:func:`run_record`): ``trials`` (the budget in force is the latest run's), ``workers``,
``threads_per_worker``, ``storage`` (its address form: relative or absolute SQLite path, password),
``ray_address``, ``heartbeat_s``, ``batch_size`` (lm-eval requests per forward pass: right-padded, causal,
so the scores are the same up to float rounding), ``promotion`` (when the Pareto set is evaluated in full:
scheduling, not meaning) and ``warm_start`` (read only when the study is created; a resume enqueues none).

Old stored specs: a field the stored spec lacks (written before the field existed) is compared as this
version's default of that field, so an old study resumes when it is otherwise equal.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime, timezone
from typing import Any

IDENTITY = ("model", "tasks", "task_seed", "task_paths", "space", "hardware", "objectives", "constraints",
            "compression", "proxy", "sampler")
"""Top-level spec fields (:meth:`dse.spec.StudySpec.to_dict`) that define what a trial means."""
MAY_CHANGE = ("trials", "workers", "threads_per_worker", "storage", "ray_address", "heartbeat_s", "batch_size",
              "promotion", "warm_start")
"""Top-level spec fields a resumed study may change (recorded per run)."""
RUN_PREFIX = "run:"
ABSENT = "(absent)"
MAX_SHOWN = 4
"""Differences named in the refusal (the rest are counted)."""


def _plain(value: Any) -> Any:
    """``value`` as it reads back from the storage (JSON: tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _defaults() -> dict:
    """This version's defaults of the identity fields, from the smallest valid spec (no file is read)."""
    from dse.spec import parse_spec

    spec = parse_spec({"study": "defaults", "model": "m", "tasks": ["t"], "space": {"groups": [{"targets": "x"}]},
                       "hardware": {"device": "kria-kv260"}, "objectives": ["decode_tokens_per_s"]})
    return _plain(spec.to_dict())


def _fill(stored: Any, default: Any) -> Any:
    """``stored`` with the keys it lacks taken from ``default`` (in mappings, and in every mapping of a list,
    whose default is the first of ``default``'s list)."""
    if isinstance(stored, dict) and isinstance(default, dict):
        return {**default, **{k: _fill(v, default.get(k)) for k, v in stored.items()}}
    if isinstance(stored, list) and isinstance(default, list) and default:
        return [_fill(item, default[0]) for item in stored]
    return stored


def _hardware(hardware: dict) -> dict:
    """A ``hardware:`` block with every Accelerator field (an absent one at its default), less the devices
    file's path (its boards are compared as ``devices_file``)."""
    from hwcost.accelerator import Accelerator

    given = {k: v for k, v in hardware.items() if k != "devices_file"}
    out = {f.name: given.get(f.name, f.default) for f in dataclasses.fields(Accelerator)
           if f.name in given or f.default is not dataclasses.MISSING}
    return {**out, **given}


def comparable(spec: dict, workload: dict | None, devices: dict | None) -> dict:
    """The identity fields of a spec dict (stored or new, defaults filled), with the model's architecture
    (``workload``, the study attribute) and the user boards the device may name (``devices``: devices-file
    entries by name, the study attribute)."""
    filled = _fill(_plain({k: spec[k] for k in IDENTITY if k in spec}), {k: v for k, v in _defaults().items()
                                                                          if k in IDENTITY and k != "hardware"})
    out = {k: filled.get(k, ABSENT) for k in IDENTITY}
    out["model"] = {"name": out["model"], "workload": _plain(workload or {})}
    out["hardware"] = {**_hardware(out["hardware"] if isinstance(out["hardware"], dict) else {}),
                       "devices_file": _plain(devices or {})}
    out["constraints"] = sorted(out["constraints"]) if isinstance(out["constraints"], list) else out["constraints"]
    if isinstance(out["task_paths"], list):  # their content, not where they are
        out["task_paths"] = [{"files": d.get("files")} if isinstance(d, dict) else d for d in out["task_paths"]]
    return out


def differences(stored: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, stored value, current value)`` of every leaf that differs; mappings are compared key by
    key, lists of mappings of one length item by item, anything else as a whole. A key one side lacks is
    :data:`ABSENT` there; the architecture compares only the keys both sides have."""
    if isinstance(stored, dict) and isinstance(current, dict):
        keys = list(dict.fromkeys([*stored, *current]))
        if path == "model.workload":
            keys = [k for k in keys if k in stored and k in current]
        return [d for k in keys for d in differences(stored.get(k, ABSENT), current.get(k, ABSENT),
                                                     f"{path}.{k}" if path else str(k))]
    if (isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current)
            and all(isinstance(x, dict) for x in [*stored, *current])):
        return [d for i, (s, c) in enumerate(zip(stored, current)) for d in differences(s, c, f"{path}[{i}]")]
    return [] if stored == current else [(path, stored, current)]


def _shown(value: Any) -> str:
    text = value if value is ABSENT else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refusal(diffs: list[tuple[str, Any, Any]], study: str, storage: str):
    """The one-line :class:`~dse.spec.SpecError` refusing to resume ``study`` with these differences."""
    from dse.spec import SpecError

    named = [f"{path}: stored {_shown(s)}, this spec {_shown(c)}" for path, s, c in diffs[:MAX_SHOWN]]
    more = f" (and {len(diffs) - MAX_SHOWN} more)" if len(diffs) > MAX_SHOWN else ""
    first, rest = named[0].split(": ", 1)
    return SpecError(first, "; ".join([rest, *named[1:]]) + f"{more}; study '{study}' in {storage} was run with "
                     "the stored values (they define its trials); use another study name to change them")


def check_identity(stored: dict, stored_attrs: dict, spec, workload: dict) -> None:
    """Refuse (:func:`refusal`) ``spec`` (a :class:`~dse.spec.StudySpec`) for a study whose stored spec is
    ``stored`` and study attributes ``stored_attrs``; ``workload``: the new spec's model architecture."""
    old = comparable(stored, stored_attrs.get("workload"), stored_attrs.get("devices"))
    new = comparable(spec.to_dict(), workload, spec.hardware_space.user_device_entries())
    diffs = differences(old, new)
    if diffs:
        raise refusal(diffs, spec.study, spec.storage_display)


def run_record(spec) -> tuple[str, dict]:
    """The study attribute recording one ``dse start`` of ``spec``: key ``run:<UTC time>:<id>`` (one per run, so
    drivers starting at once keep theirs) and the fields that may change (:data:`MAY_CHANGE`; storage masked)."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    values = spec.to_dict()
    return f"{RUN_PREFIX}{stamp}:{uuid.uuid4().hex[:6]}", _plain({"time": stamp, **{k: values[k] for k in MAY_CHANGE}})


def runs(user_attrs: dict) -> list[dict]:
    """The recorded runs of a study (its user attributes), oldest first."""
    return [user_attrs[k] for k in sorted(k for k in user_attrs if k.startswith(RUN_PREFIX))]


def budget(user_attrs: dict) -> int | None:
    """The trial budget in force: the latest run's, else (a study stored before runs were recorded) its spec's."""
    recorded = runs(user_attrs)
    return recorded[-1]["trials"] if recorded else (user_attrs.get("spec") or {}).get("trials")
