"""The ``dse hwcost`` commands (also ``python -m hwcost.cli``): the cost model without a study.

    dse hwcost devices  [--devices-file F] [--json]            the device catalog (+ user devices)
    dse hwcost estimate --model-config PATH|NAME
                        (--plan PLAN.yaml | --weights FMT [--sparsity N:M] [--group-size G] [--mixer M])
                        --device ID [--clock-mhz F] [--accel ACCEL.yaml]
                        [--act-bits 8|16] [--batch B] [--context C] [--prompt P] [--devices-file F]
                        [--json] [--all-layers]
    dse hwcost kernels  --model-config PATH|NAME (--plan PLAN.yaml | --weights ...) [accelerator flags as
                        estimate] --out DIR                    kernels.json and kernels.hpp (hwcost.kernel_table)
    dse hwcost calibrate [--json] [--fit]                       the published designs next to the model's
                                                                predictions (exit 1 if a toleranced check fails);
                                                                --fit also refits the fitted constants
    dse hwcost test [-- PYTEST ARGS]                            rerun the cost-model tests

A mistake in the input raises :class:`HwcostError` whose one-line message starts
with the flag it concerns (``--sparsity: '4:4' is not N:M with 0 < N < M``);
``dse.cli`` prints it as ``error: <message>`` and exits 2. Like the rest of
hwcost this module imports neither torch nor optuna.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dse.errors import USER_ERROR, OneLineParser, UserError
from dse.plan import BlockPlan, LayerPlan, ModelPlan, PlanError, Sparsity, WeightFormat
from dse.schema import SchemaError, plan_from_file, read_yaml
from dse.textio import format_table
from hwcost.accelerator import Accelerator, AcceleratorError
from hwcost.devices import (DeviceFileError, catalog_names, get_device, list_devices, load_devices_file,
                            parse_devices, user_devices)
from dse.arch import BUILTIN_CONFIGS, PlanMismatch, Workload, check_plan, compact_names, left_out

WEIGHT_CHOICES = {"fp16": "16", **{f"int{b}": str(b) for b in range(8, 1, -1)}, "ternary": "ternary"}
"""``--weights`` value -> :class:`~dse.plan.WeightFormat` name."""
SUITE_ENV = "HWCOST_SUITE_RUNNING"
"""Set in the environment of the pytest process ``dse hwcost test`` starts (its own test skips itself)."""
TEST_GLOBS = ("test_hwcost*.py", "test_workload_families.py")
ACCEL_FLAGS = {"clock_mhz": ("--clock-mhz", "clock_mhz", float), "batch": ("--batch", "batch", int),
               "context_length": ("--context", "context", int), "prompt_length": ("--prompt", "prompt", int),
               "act_bits": ("--act-bits", "act_bits", int), "dsp_share": ("--dsp-share", "dsp_share", float),
               "lut_share": ("--lut-share", "lut_share", float), "resident": ("--resident", "resident", str),
               "memory": ("--memory", "memory", str), "kv_bits": ("--kv-bits", "kv_bits", int),
               "attention_window": ("--window", "window", int),
               "ternary_engine": ("--ternary-engine", "ternary_engine", str),
               "ternary_storage": ("--ternary-storage", "ternary_storage", str),
               "embedding": ("--embedding", "embedding", str), "lm_head": ("--lm-head", "lm_head", str)}
"""Accelerator field -> (flag, argparse dest, type); the Accelerator checks the values."""


class HwcostError(UserError, ValueError):
    """A mistake in a ``dse hwcost`` command's input: one line ``<flag>: <problem and what is allowed>``."""


# ---------------------------------------------------------------------------- argparse
def add_hwcost_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hwcost`` and its subcommands on ``subparsers`` (``dse``'s); each sets ``func(args) -> int``."""
    p = subparsers.add_parser("hwcost", help="the FPGA cost model alone: devices, estimate, kernels, calibrate, test",
                              description="The analytical FPGA cost model without a study.")
    add_subcommands(p)
    return p


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="hwcost_command", required=True, parser_class=OneLineParser,
                                metavar="{devices,estimate,kernels,calibrate,test}")

    p = sub.add_parser("devices", help="list the device catalog (and devices from --devices-file)")
    p.add_argument("--devices-file", metavar="FILE.yaml", help="user devices to add to the catalog")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("estimate", help="cost of a plan for a model on a device",
                       description="Cost of a uniform plan (--weights ...) or a plan file (--plan) for a model "
                                   "shape on an FPGA accelerator.")
    add_costing_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all-layers", action="store_true", help="every row of the per-layer table")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("kernels", help="the per-layer kernel table of a plan: kernels.json and kernels.hpp",
                       description="Write the per-layer kernel table (hwcost.kernel_table) of a plan costed on an "
                                   "accelerator: kernels.json and the C++17 header kernels.hpp an HLS kernel "
                                   "includes, as 'dse export' writes them into a bundle.")
    add_costing_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write kernels.json and kernels.hpp "
                                                               "into (created; other files are left alone)")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("calibrate", help="the published FPGA designs next to the model's predictions",
                       description="Reproduce the published designs (hwcost/data/published_fpga.yaml, as "
                                   "hwcost/data/calibration.yaml describes them) and compare the model's "
                                   "predictions with the reported figures. Exit 0 when every toleranced check "
                                   "passes, 1 otherwise.")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--fit", action="store_true", help="also refit the fitted constants (constants.yaml) and print "
                                                      "them next to the stored ones")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("test", help="rerun the cost-model test suite (pytest) and print its summary")
    p.add_argument("pytest_args", nargs="*", metavar="PYTEST_ARG", help="extra pytest arguments (after --)")
    p.set_defaults(func=cmd_test)


def add_costing_flags(p: argparse.ArgumentParser) -> None:
    """The model, plan and accelerator flags of ``estimate`` and ``kernels``."""
    p.add_argument("--model-config", required=True, metavar="PATH|NAME",
                   help=f"config.json, a model directory, or one of {', '.join(BUILTIN_CONFIGS)}")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--plan", metavar="PLAN.yaml", help="plan.yaml written by 'dse export', or a ModelPlan mapping")
    source.add_argument("--weights", metavar="FMT", help=f"uniform weight format: {', '.join(WEIGHT_CHOICES)}")
    p.add_argument("--sparsity", metavar="N:M", help="uniform N:M sparsity (default dense)")
    p.add_argument("--group-size", metavar="G", help="quantisation group size of INT formats (default 128)")
    p.add_argument("--mixer", metavar="MIXER", help="token mixer of every block: attention or mlgru "
                                                    "(default: the model's own)")
    p.add_argument("--keep-lm-head", action="store_true", help="leave lm_head FP16 dense in a uniform plan")
    p.add_argument("--device", metavar="ID", help="device name (dse hwcost devices lists them)")
    p.add_argument("--clock-mhz", metavar="F", help="datapath clock, MHz")
    p.add_argument("--accel", metavar="ACCEL.yaml", help="Accelerator fields (the spec's hardware: keys, or the "
                                                         "accelerator.yaml of 'dse export' with its devices:); "
                                                         "flags override them")
    p.add_argument("--act-bits", metavar="8|16", help="activation width of the INT and ternary kernels "
                                                      "(default 8; 16 for W4A16-style designs)")
    p.add_argument("--dsp-share", metavar="F", help="fraction of the DSPs the matrix engines may use (default 0.7)")
    p.add_argument("--lut-share", metavar="F", help="fraction of the LUTs the matrix engines may use (default 0.5)")
    p.add_argument("--resident", metavar="none|all|REGEX", help="linear layers held on chip (default none)")
    p.add_argument("--memory", metavar="NAME[+NAME]", help="device memories used (default: the board's main one)")
    p.add_argument("--kv-bits", metavar="16|8|4", help="bits of a KV-cache value (default 16)")
    p.add_argument("--window", metavar="TOKENS", help="attention window: tokens an attention block reads at most")
    p.add_argument("--ternary-engine", metavar="adder_tree|table_lookup", help="ternary datapath (default adder_tree)")
    p.add_argument("--ternary-storage", metavar="2bit|base3", help="ternary weight packing (default 2bit)")
    p.add_argument("--embedding", metavar="fpga|host", help="where the embedding lookup runs (default fpga)")
    p.add_argument("--lm-head", metavar="fpga|host", help="where the LM head runs (default fpga)")
    p.add_argument("--batch", metavar="B", help="sequences decoded together")
    p.add_argument("--context", metavar="C", help="tokens of KV cache per decode step")
    p.add_argument("--prompt", metavar="P", help="prompt tokens for the prefill latency")
    p.add_argument("--devices-file", metavar="FILE.yaml", help="user devices to add to the catalog")


# ---------------------------------------------------------------------------- value parsing
def _number(text: str, kind: type):
    """A numeric flag's text as ``kind`` (the text itself when it is not one: the Accelerator names the flag)."""
    try:
        return kind(str(text).strip())
    except ValueError:
        return text


def _read_yaml(path: str, flag: str) -> dict:
    try:
        return read_yaml(path)
    except SchemaError as err:
        raise HwcostError(f"{flag}: {err}") from None


def load_user_devices(path: str | None) -> dict:
    """Devices of ``--devices-file`` (empty without one)."""
    if not path:
        return {}
    try:
        return load_devices_file(path)
    except DeviceFileError as err:
        raise HwcostError(f"--devices-file: {err}") from None


def load_workload(ref: str) -> Workload:
    try:
        return Workload.resolve(ref)
    except ValueError as err:
        raise HwcostError(f"--model-config: {err}") from None


def read_accel_file(path: str) -> tuple[dict, dict]:
    """``--accel``: (Accelerator fields, devices). The fields are the file's top level (``dse export``'s
    accelerator.yaml) or its ``hardware:`` mapping; an optional top-level ``devices:`` holds boards in
    devices-file form (as ``--devices-file``), known while the accelerator is built and costed."""
    data = _read_yaml(path, "--accel")
    devices = {}
    if "devices" in data:
        try:
            devices = parse_devices({"devices": data["devices"]}, source=f"--accel {Path(path).name}")
        except DeviceFileError as err:
            raise HwcostError(f"--accel: {err}") from None
        data = {k: v for k, v in data.items() if k != "devices"}
    fields = data["hardware"] if set(data) == {"hardware"} else data
    if not isinstance(fields, dict):
        raise HwcostError(f"--accel: hardware: expected a mapping of Accelerator fields; got {type(fields).__name__}")
    return fields, devices


def accel_devices(path: str | None) -> dict:
    """The boards of ``--accel``'s ``devices:`` section (empty without one)."""
    return read_accel_file(path)[1] if path else {}


def build_accelerator(args) -> Accelerator:
    """Accelerator from ``--accel`` overridden by the flags; errors name the flag or ``--accel: hardware.<field>``.
    Boards of ``--accel``'s ``devices:`` section must be known (:func:`accel_devices`; ``cmd_estimate`` does it)."""
    values: dict = {}
    if args.accel:
        values.update(read_accel_file(args.accel)[0])
    flags = {field: _number(getattr(args, dest), kind) for field, (_, dest, kind) in ACCEL_FLAGS.items()
             if getattr(args, dest) is not None}
    devices = list_devices()
    if args.device is not None and args.device not in devices:
        raise HwcostError(f"--device: '{args.device}' is not a known device; allowed: {', '.join(devices)} "
                          "(or add it with --devices-file FILE.yaml)")
    if args.device is None and "device" not in values:
        raise HwcostError(f"--device: is required (or 'device' in --accel); allowed: {', '.join(devices)}")
    values.update(flags, **({"device": args.device} if args.device else {}))
    try:
        return Accelerator.from_dict(values)
    except AcceleratorError as err:
        field = err.path.removeprefix("hardware.")
        if field in flags and err.message.startswith(repr(flags[field])):
            flag, dest, kind = ACCEL_FLAGS[field]
            text = getattr(args, dest)
            shown = repr(text) if kind is int else text  # as typed: integers quoted, the clock as is
            raise HwcostError(f"{flag}: {shown}{err.message[len(repr(flags[field])):]}") from None
        raise HwcostError(f"--accel: {err}") from None


# ---------------------------------------------------------------------------- plans
def _mixer_blocks(workload: Workload, mixer: str | None, flag: str) -> tuple[BlockPlan, ...]:
    if mixer is None:
        mixer = workload.token_mixer
    if mixer not in ("attention", "mlgru"):
        raise HwcostError(f"{flag}: {mixer!r} is not one of attention, mlgru")
    if mixer == "attention" and workload.token_mixer == "mlgru":
        raise HwcostError(f"{flag}: model_type {workload.model_type} has no attention blocks; allowed: mlgru")
    if mixer == "mlgru":
        return tuple(BlockPlan(i, "mlgru") for i in range(workload.num_layers))
    return ()


def uniform_plan(workload: Workload, args) -> ModelPlan:
    """The plan ``--weights/--sparsity/--group-size/--mixer`` describe, on every linear layer."""
    if args.weights is None:
        raise HwcostError(f"--weights: give --weights ({', '.join(WEIGHT_CHOICES)}) or --plan PLAN.yaml")
    key = str(args.weights).strip().lower()
    if key not in WEIGHT_CHOICES:
        raise HwcostError(f"--weights: '{args.weights}' is not one of {', '.join(WEIGHT_CHOICES)}")
    group = None if args.group_size is None else _number(args.group_size, int)
    if isinstance(group, str) or (group is not None and group < 1):
        raise HwcostError(f"--group-size: {args.group_size!r} is not an integer >= 1")
    try:
        sparsity = Sparsity.parse(args.sparsity)
    except PlanError as err:
        raise HwcostError(f"--sparsity: {err}") from None
    blocks = _mixer_blocks(workload, args.mixer, "--mixer")
    fmt = WeightFormat(WEIGHT_CHOICES[key], **({"group_size": group} if group else {}))
    layers = workload.linear_layers(bp.index for bp in blocks)
    return ModelPlan(layers=tuple(LayerPlan(layer.name, sparsity, fmt) for layer in layers
                                  if not (args.keep_lm_head and layer.name == "lm_head")), blocks=blocks)


def load_plan(path: str, workload: Workload) -> ModelPlan:
    """A plan file: ``dse export``'s plan.yaml (top-level ``plan``) or a bare ModelPlan mapping, every key at
    every level checked (:func:`dse.schema.plan_from_file`); the blocks of a model whose own mixer is an MLGRU
    are added as such (check it with :func:`check_plan_from`)."""
    data = _read_yaml(path, "--plan")
    try:
        plan = plan_from_file(data)
    except PlanError as err:
        raise HwcostError(f"--plan: {err}") from None
    native = workload.native_mlgru_blocks()
    if native:  # the model's own MLGRU blocks are MLGRU whatever the plan says
        given = {bp.index for bp in plan.blocks}
        plan = ModelPlan(layers=plan.layers, version=plan.version,
                         blocks=plan.blocks + tuple(BlockPlan(i, "mlgru") for i in sorted(native - given)))
    return plan


def check_plan_from(plan: ModelPlan, workload: Workload, flag: str, model: str | None = None) -> None:
    """:func:`dse.arch.check_plan` (layer names, blocks, mixers, M dividing every input width, MLGRU projections
    inheriting their counterpart's plan included), as one line naming the flag the plan came from and ``model``
    (the name the user gave). Layers a plan for another model leaves out (:func:`dse.arch.left_out`: a layer
    type the plan sets in some blocks but not in these) are a warning on stderr, not an error: they stay FP16
    dense, which a partial plan may mean (:func:`left_out_warning`)."""
    try:
        check_plan(plan, workload, model)
    except PlanMismatch as err:
        if err.layer is None:
            where = f"block {err.block} mixer 'attention': " if err.field == "mixer" else ""
        elif err.field == "sparsity":
            where = f"layer '{err.layer}' sparsity {err.sparsity}: " if flag == "--plan" else ""
        else:
            where = f"layer '{err.layer}' "
        raise HwcostError(f"{flag}: {where}{err.problem}") from None
    warning = left_out_warning(plan, workload, model)
    if warning:
        print(f"warning: {flag}: {warning}", file=sys.stderr)


def left_out_warning(plan: ModelPlan, workload: Workload, model: str | None = None) -> str | None:
    """``14 linear layers of llama2-7b are not in the plan and stay FP16 dense: model.layers.30.*, ...`` for the
    layers :func:`dse.arch.left_out` finds, None when there are none."""
    missing = left_out(plan, workload)
    if not missing:
        return None
    mlgru = [bp.index for bp in plan.blocks if bp.mixer == "mlgru"]
    many = len(missing) > 1
    return (f"{len(missing)} linear layer{'s' if many else ''} of {model or 'the model'} ({workload.num_layers} "
            f"blocks) {'are' if many else 'is'} not in the plan and stay{'' if many else 's'} FP16 dense, though the "
            f"plan sets {'them' if many else 'it'} in other blocks: {compact_names(missing, workload, mlgru)}")


# ---------------------------------------------------------------------------- output
def _n(value: float) -> str:
    return f"{value:,.0f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def device_rows(user: dict) -> list[dict]:
    """One dict per known device (catalog then user), with ``origin`` and ``overrides_catalog``."""
    catalog = set(catalog_names())
    out = []
    for name in list_devices():
        dev = get_device(name)
        d = dev.to_dict()
        d.update(bram36=dev.bram36, origin="user" if name in user else "catalog",
                 overrides_catalog=name in user and name in catalog)
        out.append(d)
    return out


def devices_text(rows: list[dict]) -> str:
    table = []
    for d in rows:
        dev = get_device(d["name"])
        logic = f"{_n(dev.alm)} ALM" if dev.alm else f"{_n(dev.lut)} LUT"
        bram = f"{_n(dev.bram_blocks)} " + ("BRAM36" if dev.bram_block_kbits == 36 else
                                           "M20K" if dev.bram_block_kbits == 20 else f"x{dev.bram_block_kbits}Kib")
        mems = sorted(dev.memories, key=lambda m: m.name != dev.default_memory)  # the default first
        source = d["source"] + (" (overrides the catalog entry)" if d["overrides_catalog"] else "")
        table.append([d["name"], logic, _n(dev.ff), _n(dev.dsp), bram, _n(dev.uram),
                      "+".join(m.name + (f" ({m.kind})" if m.kind != m.name else "") for m in mems),
                      "/".join(f"{m.gbps:g}" for m in mems), "/".join(f"{m.gb:g}" for m in mems),
                      "/".join(f"{m.channels}x{m.port_bits}" for m in mems), f"{dev.static_w:g}", source])
    headers = ["device", "LUT/ALM", "FF", "DSP", "BRAM36/M20K", "URAM", "memory", "GB/s", "GiB", "ports x bits",
               "static W", "source"]
    text = format_table(table, headers, right={1, 2, 3, 4, 5, 7, 8, 9, 10})
    overrides = [d["name"] for d in rows if d["overrides_catalog"]]
    if overrides:
        text += "\n" + "\n".join(f"note: '{name}' from --devices-file overrides the catalog entry" for name in overrides)
    return text


def report_json(report, workload: Workload, plan: ModelPlan, accel: Accelerator, meta: dict) -> dict:
    """The ``--json`` object: every HwReport field, ``weight_bytes``, ``resources`` per resource
    (used, available, utilisation, cap) and ``layers`` rows with their ``cycles``."""
    d = report.to_dict()
    used, avail = d.pop("resources"), d.pop("available")
    util, caps = d.pop("utilisation"), d.pop("caps")
    layers = d.pop("layers")
    out = {
        "model": {"ref": meta["model"], "model_type": workload.model_type, "family": workload.family,
                  "blocks": workload.num_layers, "parameters": workload.param_count()},
        "plan": {"source": meta["plan"], "hash": plan.hash, "summary": plan.summary(),
                 "mlgru_blocks": sum(1 for bp in plan.blocks if bp.mixer == "mlgru")},
        "accelerator": accel.to_dict(),
        **d,
        "weight_bytes": report.weight_bytes_total,
        "resources": {r: {"used": used[r], "available": avail.get(r), "utilisation": util.get(r),
                          "cap": caps.get(r)} for r in used},
        "layers": [{**row, "cycles": cost.cycles} for row, cost in zip(layers, report.layers)],
    }
    return out


def report_text(report, workload: Workload, plan: ModelPlan, accel: Accelerator, meta: dict,
                all_layers: bool = False) -> str:
    dev = get_device(report.device)
    mlgru = sum(1 for bp in plan.blocks if bp.mixer == "mlgru")
    mixers = (f"MLGRU in all {workload.num_layers} blocks" if mlgru == workload.num_layers else
              f"attention in {workload.num_layers - mlgru} blocks" + (f", MLGRU in {mlgru}" if mlgru else ""))
    summary = ", ".join(f"{n} x {label}" for label, n in plan.summary().items()) or "all FP16 dense"
    lines = [
        f"model    {meta['model']}: {workload.model_type or workload.family}, {workload.num_layers} blocks, "
        f"hidden {workload.hidden}, {workload.param_count() / 1e6:.1f} M parameters",
        f"plan     {meta['plan']}: {summary}; {mixers} (hash {plan.hash})",
        f"device   {dev.name} ({dev.part}), " + ", ".join(
            f"{m.name} ({m.kind}) {m.gbps:g} GB/s peak, {report.memory_bytes_per_s[m.name] / 1e9:.3g} GB/s used, "
            f"{m.gb:g} GiB" for m in accel.memories),
        f"accel    {report.clock_mhz:g} MHz, resident {report.weights} ({_bytes(report.resident_bytes)} of a "
        f"{_bytes(report.weight_buffer_bytes)} buffer), KV {report.kv_bits} bit, batch {report.batch}, "
        f"context {report.context_length}, prompt {report.prompt_length}"
        + (f", host {report.host_ms:.3f} ms/step" if report.host_ms else ""),
        "",
    ]
    rows = [[r, _n(report.resources[r]), _n(report.available[r]), f"{report.utilisation[r]:.1%}",
             f"{report.caps[r]:.0%}", "over cap" if r in report.violations else ""] for r in report.resources]
    rows.append(["off-chip", _bytes(report.offchip_bytes), _bytes(report.offchip_capacity_bytes),
                 f"{report.offchip_bytes / max(report.offchip_capacity_bytes, 1):.1%}", "",
                 "over cap" if "offchip_capacity" in report.violations else ""])
    lines.append(format_table(rows, ["resource", "used", "available", "util", "cap", ""], right={1, 2, 3, 4}))
    lines += [
        "",
        f"fits     {'yes' if report.fits else 'NO'} (violations: {', '.join(report.violations) or 'none'})",
        f"decode   {report.decode_ms_per_token:.3f} ms/token, {report.decode_tokens_per_s:.2f} tokens/s",
        f"prefill  {report.prefill_ms:.1f} ms for {report.prompt_length} prompt tokens",
        f"power    {report.power_w:.2f} W, {report.j_per_token:.4f} J/token ("
        + ", ".join(f"{k} {v:.3g} W" for k, v in report.power_breakdown_w.items() if v) + ")",
        f"weights  {_bytes(report.weight_bytes_total)} ("
        + ", ".join(f"{k} {_bytes(v)}" for k, v in report.weight_bytes_breakdown.items()) + ")"
        + (", lm_head read from the tied embedding" if report.lm_head_shares_embedding else ""),
        "engines  " + ", ".join(f"{e.label} x{e.lanes} lanes" for e in report.engines),
        "",
    ]
    shown = report.layers if all_layers else [row for row in report.layers if row.block in (None, 0)]
    table = [[row.name, row.kernel + (" (resident)" if row.resident else "") + (" (host)" if row.where == "host"
                                                                                  else ""),
              _n(row.kept_macs), _n(row.weight_bytes), _n(row.memory_bytes), _n(row.compute_cycles),
              _n(row.memory_cycles), row.bound, f"{row.cycles / report.clock_mhz:.2f}"] for row in shown]
    lines.append(format_table(table, ["layer", "kernel", "kept MACs", "weight B", "off-chip B", "compute cyc",
                                      "memory cyc", "bound", "us"], right={2, 3, 4, 5, 6, 8}))
    if not all_layers and len(shown) < len(report.layers):
        lines.append(f"({len(report.layers) - len(shown)} more rows of blocks 1..{workload.num_layers - 1}; "
                     "--all-layers shows every row)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- commands
def cmd_devices(args) -> int:
    user = load_user_devices(args.devices_file)
    with user_devices(user):
        rows = device_rows(user)
        print(json.dumps(rows, indent=1) if args.json else devices_text(rows))
    return 0


def costed_plan(args):
    """(workload, accelerator, plan, plan source, report) of ``estimate``'s and ``kernels``' flags; call it inside
    ``user_devices`` of :func:`command_devices`."""
    from hwcost.model import estimate

    workload = load_workload(args.model_config)
    accel = build_accelerator(args)
    if args.plan:
        for flag, value in (("--sparsity", args.sparsity), ("--group-size", args.group_size),
                            ("--mixer", args.mixer), ("--keep-lm-head", args.keep_lm_head or None)):
            if value is not None:
                raise HwcostError(f"{flag}: applies to a uniform plan (--weights), not to --plan")
        plan, flag, source = load_plan(args.plan, workload), "--plan", args.plan
    else:
        plan, flag = uniform_plan(workload, args), "--sparsity"
        source = "uniform " + (f"{args.sparsity} " if args.sparsity and args.sparsity != "dense" else "") \
            + str(plan.layers[0].fmt if plan.layers else "fp16")
    check_plan_from(plan, workload, flag, args.model_config)
    try:
        report = estimate(plan, workload, accel)
    except ValueError as err:
        raise HwcostError(f"{'--plan' if args.plan else '--weights'}: {err}") from None
    return workload, accel, plan, source, report


def command_devices(args) -> dict:
    """The boards of ``--accel``'s ``devices:`` and of ``--devices-file`` (which wins)."""
    return {**accel_devices(args.accel), **load_user_devices(args.devices_file)}


def cmd_estimate(args) -> int:
    with user_devices(command_devices(args)):
        workload, accel, plan, source, report = costed_plan(args)
        meta = {"model": args.model_config, "plan": source}
        if args.json:
            print(json.dumps(report_json(report, workload, plan, accel, meta), indent=1))
        else:
            print(report_text(report, workload, plan, accel, meta, all_layers=args.all_layers))
    return 0


def cmd_kernels(args) -> int:
    from hwcost.kernel_table import bundle_files, kernel_table

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HwcostError(f"--out: {out} is a file, not a directory")
    with user_devices(command_devices(args)):
        workload, accel, plan, _, report = costed_plan(args)
        files = bundle_files(kernel_table(plan, workload, accel, report))
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
    except OSError as err:
        raise HwcostError(f"--out: cannot write {out}: {err.strerror or err}") from None
    for name in files:
        print(out / name)
    return 0


def cmd_calibrate(args) -> int:
    from hwcost import calibration

    try:
        rows = calibration.calibration_rows()
        fitted = calibration.fit() if args.fit else None
    except (ValueError, KeyError) as err:
        raise HwcostError(f"calibrate: {err}") from None
    stored = calibration.stored_constants()
    if args.json:
        if fitted is None:
            print(json.dumps([row.to_dict() for row in rows], indent=1))
        else:
            print(json.dumps({"rows": [row.to_dict() for row in rows],
                              "fit": {key: {"fitted": value, "fitted_3sig": calibration.round_sig(value, 3),
                                            "stored": stored[key]} for key, value in fitted.items()}}, indent=1))
    else:
        print(format_table(calibration.table_cells(rows), calibration.TABLE_HEADERS, right=calibration.TABLE_RIGHT))
        print()
        print(calibration.summary(rows))
        if fitted is not None:
            table = [[key, f"{value:.6g}", f"{calibration.round_sig(value, 3):g}", f"{stored[key]:g}",
                      f"{stored[key] / value - 1:+.2%}"] for key, value in fitted.items()]
            print()
            print(format_table(table, ["constant", "fitted", "fitted (3 sig.)", "stored (constants.yaml)",
                                       "stored/fitted - 1"], right={1, 2, 3, 4}))
    return 0 if calibration.all_pass(rows) else 1


def tests_location() -> tuple[Path, list[Path]]:
    """The repository root of the installed package and its cost-model test files."""
    root = Path(__file__).resolve().parent.parent
    tests = root / "tests"
    files = sorted({p for pattern in TEST_GLOBS for p in tests.glob(pattern)}) if tests.is_dir() else []
    return root, files


def cmd_test(args) -> int:
    root, files = tests_location()
    if not files:
        raise HwcostError(f"test: no cost-model tests at {root / 'tests'} (they ship with the source repository, "
                          "not with an installed package)")
    # the summary only (one line per failure); `dse hwcost test -- --tb=short` for the tracebacks
    command = [sys.executable, "-m", "pytest", "-q", "--tb=no", *map(str, files), *args.pytest_args]
    env = dict(os.environ, **{SUITE_ENV: "1"})
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "No module named pytest" in proc.stderr:
        raise HwcostError(f"test: pytest is not installed for {sys.executable} (pip install pytest)")
    print(proc.stdout, end="")
    if proc.stderr.strip():
        print(proc.stderr, end="", file=sys.stderr)
    if proc.returncode not in (0, 5) and "--tb" not in " ".join(args.pytest_args):
        print("tracebacks: dse hwcost test -- --tb=short", file=sys.stderr)
    return proc.returncode


# ---------------------------------------------------------------------------- standalone
def main(argv: list[str] | None = None) -> int:
    """``python -m hwcost.cli ...`` (the same commands as ``dse hwcost ...``)."""
    parser = OneLineParser(prog="hwcost", description="The analytical FPGA cost model (dse hwcost).")
    add_subcommands(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
