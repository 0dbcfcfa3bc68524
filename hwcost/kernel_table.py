"""The per-layer kernel table of a costed plan, as JSON and as a C++17 header an HLS kernel includes.

``kernel_table(plan, workload, accel, report)`` lists every linear layer of the model as the plan builds it (in
model order: MLGRU projections of replaced blocks in place of their attention, ``lm_head`` last, whether
compressed or not) with the figures of ``report`` (:func:`hwcost.estimate` of that plan, workload and
accelerator, e.g. the ``hw_report.json`` of a ``dse export`` bundle): nothing is recomputed here, and a report
whose rows do not belong to the plan is refused. ``cpp_header(table)`` writes the same values as ``constexpr``
data. Attention, MLGRU recurrence, vector-unit and embedding rows are not linear kernels and are not listed.

Table (``format`` ``dse-kernel-table``, ``version`` 1): ``model`` (the workload's shape), ``accelerator`` (the
design fields a kernel depends on), ``engines`` (the matrix-vector engines of the report, in its order) and
``layers``, one row each:

* ``name`` module path; ``kind`` q k v o qkv | gate up gate_up down | mlgru_f mlgru_c mlgru_g mlgru_o (an MLGRU
  substituted for attention) | mlgru_i mlgru_f mlgru_g mlgru_o (hgrn_bit's own) | head | project_in project_out;
  ``block`` its block, -1 outside the blocks;
* ``rows`` out features, ``cols`` in features; ``format`` fp16 | int | ternary; ``bits`` of a stored value (16,
  k, 2 for ternary codes; base-3 packing is ``accelerator.ternary_storage``); ``group_size`` weights per scale
  of an INT format, 0 for fp16 and ternary (one per-tensor scale); ``symmetric`` (false: a zero point per
  group); ``label`` the plan's label (``2:4 int4/g128``);
* ``n``, ``m``: N:M sparsity, ``n`` kept of every ``m`` weights along the input; dense is ``n = m = 1`` (the cost
  model's convention), so ``kept_macs = rows * cols * n / m`` holds for every row;
* ``kept_macs`` MACs per token (one sequence); ``act_bits`` bits of the activation operand;
* ``engine`` index into ``engines`` (-1 on the host), ``engine_class`` the kernel class of that engine (int6
  runs on the int8 lanes, ...), ``lanes`` its MAC lanes (of the FP16 engine: its attention lanes included, as
  the cost model divides by them); ``on_fpga`` false for an ``lm_head`` the host computes;
* ``resident`` weights held in the on-chip buffer (else streamed from off-chip memory every step);
  ``weight_bytes`` stored bytes (values, scales, zero points, N:M indices);
* ``compute_cycles``, ``memory_cycles``, ``decode_cycles`` (the row's cycles with overlap and fixed cost) of
  one decode step of ``accelerator.batch`` sequences, one token each; ``bound`` memory | compute.

The header (namespace ``dse_kernels``): ``enum class Format``, ``enum class Bound``, ``struct Engine``, ``struct
Layer`` (the row's fields, strings as ``const char*``), ``kEngines``, ``kLayers``, ``kNumEngines``,
``kNumLayers``, the model and accelerator constants, and per layer a namespace ``layer_<name>`` (the name
with every run of other characters than letters and digits as ``_``; ``_2``, ``_3`` ... when two names meet)
with ``kIndex`` and one ``constexpr`` constant per field read from ``kLayers[kIndex]``, usable as template
arguments (``std::integral_constant<uint8_t, layer_lm_head::kBits>``).
"""

from __future__ import annotations

import json
import math
import re

from dse.arch import MLGRU_PROJ, Workload
from dse.plan import LayerPlan, ModelPlan
from hwcost import kernels
from hwcost.accelerator import Accelerator
from hwcost.devices import DeviceFileError, parse_devices, user_devices
from hwcost.model import HwReport, LayerCost, estimate

TABLE_FORMAT = "dse-kernel-table"
TABLE_VERSION = 1
NAMESPACE = "dse_kernels"
FORMATS = ("fp16", "int", "ternary")
"""``format`` values, in the order of the header's ``enum class Format``."""
BOUNDS = ("memory", "compute")
"""``bound`` values, in the order of the header's ``enum class Bound``."""

LAYER_FIELDS = (  # (table key, C++ type); the order of struct Layer's members
    ("name", "const char*"), ("kind", "const char*"), ("label", "const char*"), ("block", "int32_t"),
    ("format", "Format"), ("bits", "uint8_t"), ("group_size", "uint32_t"), ("symmetric", "bool"),
    ("n", "uint16_t"), ("m", "uint16_t"), ("rows", "uint64_t"), ("cols", "uint64_t"), ("kept_macs", "uint64_t"),
    ("act_bits", "uint8_t"), ("engine", "int32_t"), ("engine_class", "const char*"), ("lanes", "uint32_t"),
    ("on_fpga", "bool"), ("resident", "bool"), ("weight_bytes", "uint64_t"), ("compute_cycles", "double"),
    ("memory_cycles", "double"), ("decode_cycles", "double"), ("bound", "Bound"),
)
ENGINE_FIELDS = (("label", "const char*"), ("kernel", "const char*"), ("n", "uint16_t"), ("m", "uint16_t"),
                 ("lanes", "uint32_t"), ("attention_lanes", "uint32_t"))
MODEL_CONSTANTS = (("kNumBlocks", "layers", "uint32_t"), ("kHidden", "hidden", "uint32_t"),
                   ("kHeads", "heads", "uint32_t"), ("kKvHeads", "kv_heads", "uint32_t"),
                   ("kHeadDim", "head_dim", "uint32_t"), ("kIntermediate", "intermediate", "uint32_t"),
                   ("kVocab", "vocab", "uint32_t"), ("kModelType", "model_type", "const char*"))
ACCEL_CONSTANTS = (("kDevice", "device", "const char*"), ("kClockMHz", "clock_mhz", "double"),
                   ("kActBits", "act_bits", "uint8_t"), ("kTernaryEngine", "ternary_engine", "const char*"),
                   ("kTernaryStorage", "ternary_storage", "const char*"), ("kBatch", "batch", "uint32_t"),
                   ("kContextLength", "context_length", "uint32_t"), ("kKvBits", "kv_bits", "uint8_t"),
                   ("kResidentPattern", "resident", "const char*"), ("kMemory", "memory", "const char*"))


# ---------------------------------------------------------------------------- the table
def layer_kinds(workload: Workload, mlgru_blocks: frozenset[int]) -> dict[str, str]:
    """Layer name -> ``kind`` (module docstring) of every linear layer of ``workload`` with MLGRU mixers in
    ``mlgru_blocks`` (and in every block of a model whose own mixer is one)."""
    arch = workload.arch
    kinds = {layer.name: layer.name.rsplit(".", 1)[-1]
             for layer in workload.pre_block_layers() + workload.post_block_layers()}
    for i in range(workload.num_layers):
        if workload.token_mixer == "mlgru":
            mixer = [(layer, "mlgru_o" if role == "mo" else f"mlgru_{role}")
                     for layer, (_, role) in zip(workload.mlgru_layers(i), arch.mixer_proj)]
        elif i in mlgru_blocks:
            mixer = [(layer, f"mlgru_{proj[0]}") for layer, proj in zip(workload.mlgru_layers(i), MLGRU_PROJ)]
        else:
            mixer = [(layer, role) for layer, (_, role) in zip(workload.attention_layers(i), arch.mixer_proj)]
        mlp = [(layer, role) for layer, (_, role) in zip(workload.mlp_layers(i), arch.mlp_proj)]
        kinds.update((layer.name, kind) for layer, kind in mixer + mlp)
    kinds[workload.lm_head().name] = "head"
    return kinds


def _format_of(lp: LayerPlan) -> str:
    return "fp16" if lp.fmt.is_float else ("ternary" if lp.fmt.is_ternary else "int")


def _nm(sparsity: str) -> tuple[int, int]:
    """(N, M) of an engine's ``sparsity`` (``dense`` is 1, 1)."""
    if sparsity == "dense":
        return 1, 1
    n, m = sparsity.split(":")
    return int(n), int(m)


def _mismatch(name: str, what: str) -> ValueError:
    return ValueError(f"kernel table: the report does not belong to this plan: layer {name} {what}")


def _row(layer, kind: str, lp: LayerPlan, cost: LayerCost, engines: list[dict], accel: Accelerator) -> dict:
    """One table row from the plan of a layer and its row of the report (checked against each other)."""
    n, m = (1, 1) if lp.sparsity is None else (lp.sparsity.n, lp.sparsity.m)
    rows, cols = layer.out_features, layer.in_features
    kept = rows * cols * n // m  # check_plan: M divides in_features
    if cost.kernel != lp.label:
        raise _mismatch(layer.name, f"is '{cost.kernel}' in the report, '{lp.label}' in the plan")
    on_fpga = cost.where == "fpga"
    if on_fpga and cost.kept_macs != accel.batch * kept:
        raise _mismatch(layer.name, f"has {cost.kept_macs:g} kept MACs per step in the report, "
                                    f"{accel.batch} x {kept} by its plan")
    cls = kernels.kernel_class(lp.fmt)
    engine_class = kernels.engine_class(cls, accel.dev.dsp_kind, accel.act_bits)
    engine = next((e for e, eng in enumerate(engines) if (eng["kernel"], eng["n"], eng["m"]) == (engine_class, n, m)),
                  -1) if on_fpga else -1
    if on_fpga and engine < 0:
        raise _mismatch(layer.name, f"has no {lp.sparsity or 'dense'} {engine_class} engine in the report")
    fmt = _format_of(lp)
    return {
        "name": layer.name, "kind": kind, "label": lp.label, "block": -1 if layer.block is None else layer.block,
        "format": fmt, "bits": lp.fmt.bits, "group_size": lp.fmt.group_size if fmt == "int" else 0,
        "symmetric": lp.fmt.symmetric, "n": n, "m": m, "rows": rows, "cols": cols, "kept_macs": kept,
        "act_bits": kernels.activation_bits(cls, accel.act_bits), "engine": engine,
        "engine_class": engine_class if on_fpga else "host", "lanes": engines[engine]["lanes"] if on_fpga else 0,
        "on_fpga": on_fpga, "resident": bool(cost.resident), "weight_bytes": int(cost.weight_bytes),
        "compute_cycles": float(cost.compute_cycles), "memory_cycles": float(cost.memory_cycles),
        "decode_cycles": float(cost.cycles), "bound": cost.bound,
    }


def kernel_table(plan: ModelPlan, workload: Workload, accel: Accelerator, report: HwReport) -> dict:
    """The kernel table (module docstring) of ``plan`` for ``workload`` on ``accel``, with the figures of
    ``report`` (:func:`hwcost.estimate` of the three). JSON-ready. ValueError (one line) when ``report`` does
    not belong to the plan (a layer missing from it, another format or kept MACs)."""
    effective = workload.effective_plan(plan)
    mlgru = frozenset(bp.index for bp in plan.blocks if bp.mixer == "mlgru")
    kinds = layer_kinds(workload, mlgru)
    costs = {row.name: row for row in report.layers}
    engines = [{"label": e.label, "kernel": e.kernel, **dict(zip("nm", _nm(e.sparsity))), "lanes": int(e.lanes),
                "attention_lanes": int(e.attention_lanes)} for e in report.engines]
    layers = []
    for layer in workload.linear_layers(mlgru):
        if layer.name not in costs:
            raise _mismatch(layer.name, "has no row in the report")
        layers.append(_row(layer, kinds[layer.name], effective[layer.name], costs[layer.name], engines, accel))
    w = workload
    return {
        "format": TABLE_FORMAT, "version": TABLE_VERSION,
        "model": {"model_type": w.model_type or w.family, "family": w.family, "layers": w.num_layers,
                  "hidden": w.hidden, "heads": w.heads, "kv_heads": w.kv_heads, "head_dim": w.head_dim,
                  "intermediate": w.intermediate, "vocab": w.vocab},
        "accelerator": {"device": accel.device, "clock_mhz": float(accel.clock_mhz),
                        "act_bits": kernels.activation_bits("int8", accel.act_bits),
                        "ternary_engine": accel.ternary_engine, "ternary_storage": accel.ternary_storage,
                        "batch": accel.batch, "context_length": accel.context_length, "kv_bits": accel.kv_bits,
                        "resident": accel.resident, "memory": "+".join(accel.memory_names)},
        "engines": engines,
        "layers": layers,
    }


def table_json(table: dict) -> str:
    """``kernels.json``: the table, indented, keys in table order."""
    return json.dumps(table, indent=1) + "\n"


# ---------------------------------------------------------------------------- the C++ header
def cpp_string(text: str) -> str:
    """A C++ string literal of ``text`` (UTF-8): printable ASCII as is, backslash, quote and question mark
    escaped, every other byte as a three-digit octal escape (which, unlike ``\\x``, ends after three digits)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append("\\" + char if char in '"\\?' else char if 0x20 <= byte < 0x7F else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def cpp_value(value, ctype: str) -> str:
    """``value`` as a C++ literal of type ``ctype`` (a double with the digits that read back to the same
    double; enums as ``Format::INT``, ``Bound::MEMORY``)."""
    if ctype == "const char*":
        return cpp_string(str(value))
    if ctype == "bool":
        return "true" if value else "false"
    if ctype == "double":
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"kernel table: {value!r} is not a finite number")
        return repr(value)
    if ctype in ("Format", "Bound"):
        return f"{ctype}::{str(value).upper()}"
    suffix = "ULL" if ctype.startswith("uint64") else ("U" if ctype.startswith("uint") else "")
    return f"{int(value)}{suffix}"


def cpp_identifiers(names: list[str], prefix: str = "layer_") -> list[str]:
    """One C++ identifier per name, in order: ``prefix`` + the name with every run of characters other than
    ASCII letters and digits as one ``_`` (no leading, trailing or double underscore), ``_2``, ``_3`` ... added
    to a name an earlier one already took."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = prefix + (re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "unnamed")
        ident, k = base, 1
        while ident in taken:
            k += 1
            ident = f"{base}_{k}"
        taken.add(ident)
        out.append(ident)
    return out


def _initializer(row: dict, fields) -> str:
    return "{" + ", ".join(cpp_value(row[key], ctype) for key, ctype in fields) + "}"


def _struct(name: str, fields) -> list[str]:
    return [f"struct {name} {{"] + [f"  {ctype} {key};" for key, ctype in fields] + ["};", ""]


def _constants(values: dict, spec) -> list[str]:
    return [f"inline constexpr {ctype} {const} = {cpp_value(values[key], ctype)};" for const, key, ctype in spec]


def _camel(key: str) -> str:
    return "k" + "".join(part.capitalize() for part in key.split("_"))


def cpp_header(table: dict) -> str:
    """``kernels.hpp``: the table as C++17 ``constexpr`` data (module docstring). Deterministic: the same
    table gives the same text."""
    model, accel, engines, layers = table["model"], table["accelerator"], table["engines"], table["layers"]
    guard = "DSE_KERNELS_HPP_"
    lines = [
        f"// {TABLE_FORMAT} version {table['version']}: per-layer kernel parameters of a costed plan",
        "// (written by dse; the same values as kernels.json). C++17.",
        f"#ifndef {guard}", f"#define {guard}", "", "#include <cstddef>", "#include <cstdint>", "",
        f"namespace {NAMESPACE} {{", "",
        f"inline constexpr uint32_t kTableVersion = {int(table['version'])}U;",
        "enum class Format : uint8_t { " + ", ".join(f.upper() for f in FORMATS) + " };",
        "enum class Bound : uint8_t { " + ", ".join(b.upper() for b in BOUNDS) + " };", "",
        "// model shape", *_constants(model, MODEL_CONSTANTS), "",
        "// accelerator (cycles below are per decode step of kBatch sequences, one token each)",
        *_constants(accel, ACCEL_CONSTANTS), "",
        *_struct("Engine", ENGINE_FIELDS),
        *_struct("Layer", LAYER_FIELDS),
        "inline constexpr Engine kEngines[] = {",
        *(f"  {_initializer(e, ENGINE_FIELDS)}," for e in engines), "};",
        f"inline constexpr std::size_t kNumEngines = {len(engines)};", "",
        "inline constexpr Layer kLayers[] = {",
        *(f"  {_initializer(row, LAYER_FIELDS)}," for row in layers), "};",
        f"inline constexpr std::size_t kNumLayers = {len(layers)};", "",
        "// one namespace per layer: its index in kLayers and every field as a constant",
    ]
    for index, ident in enumerate(cpp_identifiers([row["name"] for row in layers])):
        lines.append(f"namespace {ident} {{")
        lines.append(f"inline constexpr std::size_t kIndex = {index};")
        lines += [f"inline constexpr {ctype} {_camel(key)} = kLayers[kIndex].{key};" for key, ctype in LAYER_FIELDS]
        lines.append(f"}}  // namespace {ident}")
    lines += ["", f"}}  // namespace {NAMESPACE}", "", f"#endif  // {guard}", ""]
    return "\n".join(lines)


def bundle_files(table: dict) -> dict[str, str]:
    """The two files of a ``dse export`` bundle: ``kernels.json`` and ``kernels.hpp``."""
    return {"kernels.json": table_json(table), "kernels.hpp": cpp_header(table)}


def bundle_files_of_records(plan: dict, workload: dict | None, accelerator: dict, report: dict | None,
                            devices: dict | None = None) -> dict[str, str]:
    """:func:`bundle_files` of a trial's records (``dse export``): its plan (:meth:`ModelPlan.to_dict`), the
    study's workload (:meth:`Workload.to_dict`), the accelerator it was costed on (:meth:`Accelerator.to_dict`),
    its stored report (:meth:`HwReport.to_dict`) and the study's user boards (devices-file form, name ->
    fields). The figures are the stored report's; a report without per-layer rows, or one this version reads
    otherwise than it was written, is replaced by :func:`hwcost.estimate` of the records. Empty when the
    workload is missing or the workload or accelerator cannot be rebuilt (a study of an older version)."""
    if not workload:
        return {}
    try:
        boards = parse_devices({"devices": devices}) if devices else {}
    except DeviceFileError:
        return {}
    with user_devices(boards):
        try:
            shape, accel = Workload.from_dict(workload), Accelerator.from_dict(accelerator)
        except (TypeError, ValueError):
            return {}
        model_plan = ModelPlan.from_dict(plan)
        if report and report.get("layers"):
            try:
                return bundle_files(kernel_table(model_plan, shape, accel, HwReport.from_dict(report)))
            except (TypeError, ValueError, KeyError):  # a report of an older version, or not of this plan
                pass
        return bundle_files(kernel_table(model_plan, shape, accel, estimate(model_plan, shape, accel)))
