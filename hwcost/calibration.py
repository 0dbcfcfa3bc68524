"""Calibration of the cost model against published FPGA designs (``dse hwcost calibrate``).

``data/published_fpga.yaml`` (a verbatim copy of the project's shared calibration file) holds what the
cited works reported; ``data/calibration.yaml`` says how each design is reproduced: its workload (a
Hugging Face-style config), its plan (per-layer weight formats as regex rules), its
:class:`~hwcost.accelerator.Accelerator` fields, and which reported figures are tested with which
relative tolerance. Every value there is marked published, assumption or fitted.

    rows = calibration_rows()          # one CalibrationRow per (design, reported metric)
    print(summary(rows))
    fit()                              # {'mem_efficiency.hbm2': ..., 'fpga_overhead': ...}

Predictions per metric:

* ``decode_tokens_per_s``, ``power_w``, ``j_per_token``: the :class:`~hwcost.model.HwReport` fields.
* ``hbm_bandwidth_utilisation``, ``model_bandwidth_utilisation``: off-chip bytes moved per token (weights,
  KV cache) * tokens/s / peak bytes/s.
* ``fraction_of_bandwidth_bound``: tokens/s divided by the pure weight-streaming bound at peak
  bandwidth, peak bytes/s / streamed weight bytes per token (linear layers and lm_head).
* ``weight_storage_reduction_vs_fp16``: 16 bits / value bits per weight of the design's format stored
  densely (:func:`hwcost.kernels.storage_bits` ``values``, scales excluded), over the real layers.
* ``nm_2of4_int4_bits_per_weight``: (values + N*ceil(log2 M) index bits) / weights of the design's
  N:M format, scales excluded, over the real layers.
* GPU measurements (``matmul_speedup_4096``, ``end_to_end_latency_speedup``, ``llama7b_throughput_per_token``):
  not modelled; no prediction.
* A design calibration.yaml marks ``not_modelled: <reason>`` (a board outside the device catalog, a model
  whose shape is not published) and a figure listed under ``not_modelled_metrics: {metric: reason}``: printed
  with the reason (``not modelled: ...``), no prediction. A reported figure may be text (a qualitative
  comparison); it is printed as ``(text)`` and never predicted.

``residual = predicted / reported - 1``; a row with a tolerance passes when ``|residual| <= tolerance``.

:func:`fit` recomputes the fitted global constants of ``constants.yaml`` (section ``fit`` of
calibration.yaml): ``mem_efficiency.hbm2`` by bisection so that the HBM2 design's predicted decode
rate equals the reported one, then (with that value, rounded to 3 significant digits)
``fpga_overhead`` by least squares on log(power) over the designs with a reported power.
Candidate constants are evaluated with :func:`override_constants`. Like the rest of hwcost this
module needs only numpy, pyyaml, the standard library and dse.plan.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost.accelerator import Accelerator
from hwcost.devices import constants, get_device, load_data_yaml
from hwcost.kernels import storage_bits
from hwcost.model import HwReport, estimate
from dse.arch import Workload

PUBLISHED_FILE = "published_fpga.yaml"
CALIBRATION_FILE = "calibration.yaml"
GPU_NOTE = "not modelled (GPU measurement)"
NOT_MODELLED = "not modelled: "
"""Prefix of the note of a figure the model cannot represent (followed by the reason from calibration.yaml)."""
FITTED_KEYS = ("mem_efficiency.hbm2", "fpga_overhead")
"""The constants.yaml entries :func:`fit` recomputes (dotted paths)."""


@dataclass
class CalibrationRow:
    """One reported figure of one design next to the model's prediction.

    ``residual = predicted / reported - 1`` (None without a prediction); ``tolerance``: relative, None when
    the row is printed but not tested; ``passed``: ``|residual| <= tolerance`` (None when not tested).
    """

    design: str
    metric: str
    reported: float | str
    predicted: float | None
    residual: float | None
    tolerance: float | None
    passed: bool | None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Design:
    """One design as calibration.yaml reproduces it (``accel`` None for a storage-only or not modelled design,
    ``workload`` None for a not modelled design whose model shape is not published)."""

    id: str
    published: dict
    spec: dict
    workload: Workload | None
    plan: ModelPlan | None
    accel: Accelerator | None


# ---------------------------------------------------------------------------- files
def published() -> dict:
    """``data/published_fpga.yaml`` (cached; do not mutate)."""
    return load_data_yaml(PUBLISHED_FILE)


def calibration_spec() -> dict:
    """``data/calibration.yaml`` (cached; do not mutate)."""
    return load_data_yaml(CALIBRATION_FILE)


def design_ids() -> list[str]:
    """Design ids of published_fpga.yaml, in file order."""
    return [d["id"] for d in published()["designs"]]


# ---------------------------------------------------------------------------- constants override
@contextmanager
def override_constants(values: dict[str, Any]) -> Iterator[dict]:
    """Temporarily replace entries of the constants dict (``hwcost.devices.constants()``) inside the block.

    ``values`` maps dotted paths of existing entries (``'fpga_overhead'``, ``'mem_efficiency.hbm2'``) to new
    values. :func:`~hwcost.devices.constants` returns one cached dict object, which every model function
    reads at call time, so the replacement is seen by :func:`~hwcost.model.estimate`; the old values are
    restored in ``finally``. Used by :func:`fit` to evaluate candidate constants; not thread-safe.
    """
    c = constants()
    saved: list[tuple[dict, str, Any]] = []
    try:
        for path, value in values.items():
            *parents, leaf = path.split(".")
            d = c
            for key in parents:
                d = d[key]
            if leaf not in d:
                raise KeyError(f"constants.yaml has no entry '{path}'")
            saved.append((d, leaf, d[leaf]))
            d[leaf] = value
        yield c
    finally:
        for d, leaf, old in reversed(saved):
            d[leaf] = old


def stored_constants() -> dict[str, float]:
    """The current values of :data:`FITTED_KEYS` in constants.yaml."""
    out = {}
    for path in FITTED_KEYS:
        d: Any = constants()
        for key in path.split("."):
            d = d[key]
        out[path] = float(d)
    return out


# ---------------------------------------------------------------------------- building designs
_MODEL_FIELDS = {"layers": "num_layers", "hidden": "hidden", "heads": "heads", "kv_heads": "kv_heads",
                 "intermediate": "intermediate", "vocab": "vocab"}
_FAMILY_TYPE = {"llama": "llama", "mmfreelm": "hgrn_bit"}


def _check_workload(design_id: str, model: dict, workload: Workload) -> None:
    """The config of calibration.yaml must have the shape published_fpga.yaml gives."""
    family = model.get("family")
    if family in _FAMILY_TYPE and workload.model_type != _FAMILY_TYPE[family]:
        raise ValueError(f"{design_id}: workload model_type '{workload.model_type}' does not match the published "
                         f"family '{family}' (expected {_FAMILY_TYPE[family]})")
    for key, attr in _MODEL_FIELDS.items():
        if key in model and int(model[key]) != getattr(workload, attr):
            raise ValueError(f"{design_id}: workload {attr} {getattr(workload, attr)} differs from the published "
                             f"{key} {model[key]}")


def build_plan(workload: Workload, spec: dict) -> ModelPlan:
    """A :class:`~dse.plan.ModelPlan` from calibration.yaml's ``plan``: ``weights`` regex rules (first match wins,
    every linear layer must match one), ``group_size``, ``sparsity`` and ``mixer`` for the whole model."""
    group = int(spec.get("group_size", 128))
    sparsity = Sparsity.parse(spec.get("sparsity"))
    mixer = spec.get("mixer", workload.token_mixer)
    blocks = tuple(BlockPlan(i, "mlgru") for i in range(workload.num_layers)) if mixer == "mlgru" else ()
    rules = [(re.compile(r["match"]), WeightFormat.parse(r["format"], group)) for r in spec["weights"]]
    layers = []
    for layer in workload.linear_layers(bp.index for bp in blocks):
        fmt = next((f for pattern, f in rules if pattern.search(layer.name)), None)
        if fmt is None:
            raise ValueError(f"plan: layer '{layer.name}' matches no weights rule")
        layers.append(LayerPlan(layer.name, sparsity, fmt))
    return ModelPlan(layers=tuple(layers), blocks=blocks)


def _engine_of(report: HwReport, kernel: str):
    engines = [e for e in report.engines if e.kernel == kernel]
    if len(engines) != 1:
        raise ValueError(f"expected one {kernel} engine, found {len(engines)}")
    return engines[0]


def _accelerator(design_id: str, pub: dict, spec: dict, workload: Workload, plan: ModelPlan) -> Accelerator:
    fields = dict(spec["accelerator"])
    for key, value in (("device", pub.get("device")), ("clock_mhz", pub.get("clock_mhz")),
                       ("memory", (pub.get("memory") or {}).get("type"))):
        if value is not None and fields.get(key) != value:
            raise ValueError(f"{design_id}: accelerator {key} {fields.get(key)!r} differs from the published {value!r}")
    accel = Accelerator.from_dict(fields, prefix=f"{design_id}.accelerator")
    lanes_spec = spec.get("datapath_lanes")
    if lanes_spec:  # fitted datapath width: the LUT share that gives the engine exactly this many lanes
        kernel, lanes = lanes_spec["engine"], int(lanes_spec["lanes"])
        lut_per_lane = _engine_of(estimate(plan, workload, accel), kernel).lut_per_lane
        fields["lut_share"] = lanes * lut_per_lane / accel.dev.available()["lut"]
        accel = Accelerator.from_dict(fields, prefix=f"{design_id}.accelerator")
        got = _engine_of(estimate(plan, workload, accel), kernel).lanes
        if got != lanes:
            raise ValueError(f"{design_id}: datapath_lanes {lanes} gave {got} {kernel} lanes")
    return accel


def build_design(design_id: str) -> Design:
    """Workload, plan and accelerator of one design of published_fpga.yaml as calibration.yaml describes it."""
    pubs = {d["id"]: d for d in published()["designs"]}
    specs = calibration_spec()["designs"]
    if design_id not in pubs:
        raise ValueError(f"'{design_id}' is not a design of {PUBLISHED_FILE}; allowed: {', '.join(pubs)}")
    if design_id not in specs:
        raise ValueError(f"{CALIBRATION_FILE} has no entry for design '{design_id}'")
    pub, spec = pubs[design_id], specs[design_id]
    if not spec.get("workload") and not spec.get("not_modelled"):
        raise ValueError(f"{design_id}: {CALIBRATION_FILE} gives neither a workload nor a not_modelled reason")
    if spec.get("not_modelled") and spec.get("accelerator"):
        raise ValueError(f"{design_id}: a not_modelled design has no accelerator")
    workload = None
    if spec.get("workload"):
        workload = Workload.from_hf_config(dict(spec["workload"]))
        _check_workload(design_id, pub.get("model", {}), workload)
    plan = accel = None
    if spec.get("accelerator"):
        plan = build_plan(workload, spec["plan"])
        accel = _accelerator(design_id, pub, spec, workload, plan)
    return Design(design_id, pub, spec, workload, plan, accel)


@lru_cache(maxsize=None)
def _designs() -> dict[str, Design]:
    return {design_id: build_design(design_id) for design_id in design_ids()}


# ---------------------------------------------------------------------------- predictions
def _streamed_weight_bytes(report: HwReport) -> float:
    return float(report.weight_bytes_breakdown["linear"] + report.weight_bytes_breakdown["lm_head"])


def _peak_bytes_per_s(report: HwReport) -> float:
    return get_device(report.device).memory(report.memory).bytes_per_s


def _bandwidth_utilisation(report: HwReport) -> float:
    """Off-chip bytes moved per token * tokens/s / peak bytes/s."""
    per_token = sum(row.memory_bytes for row in report.layers) / report.batch
    return per_token * report.decode_tokens_per_s / _peak_bytes_per_s(report)


def _fraction_of_bound(report: HwReport) -> float:
    """tokens/s / (peak bytes/s / streamed weight bytes per token)."""
    return report.decode_tokens_per_s / (_peak_bytes_per_s(report) / _streamed_weight_bytes(report))


REPORT_METRICS: dict[str, Callable[[HwReport], float]] = {
    "decode_tokens_per_s": lambda r: r.decode_tokens_per_s,
    "power_w": lambda r: r.power_w,
    "j_per_token": lambda r: r.j_per_token,
    "hbm_bandwidth_utilisation": _bandwidth_utilisation,
    "model_bandwidth_utilisation": _bandwidth_utilisation,
    "fraction_of_bandwidth_bound": _fraction_of_bound,
}
"""Metrics predicted from an :class:`~hwcost.model.HwReport`."""
GPU_METRICS = ("matmul_speedup_4096", "end_to_end_latency_speedup", "llama7b_throughput_per_token")


def storage_figures(workload: Workload, spec: dict) -> dict[str, float]:
    """Storage arithmetic over the workload's linear layers matching ``spec['layers']`` (scales excluded).

    ``weight_storage_reduction_vs_fp16`` = 16 * weights / value bits of the format stored densely;
    ``nm_2of4_int4_bits_per_weight`` = (value + index bits of the N:M format) / weights.
    """
    pattern = re.compile(spec["layers"])
    fmt = WeightFormat.parse(spec["format"], int(spec.get("group_size", 128)))
    sparsity = Sparsity.parse(spec["sparsity"])
    layers = [layer for layer in workload.linear_layers() if pattern.search(layer.name)]
    if not layers:
        raise ValueError(f"storage.layers '{spec['layers']}' matches no linear layer")
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    dense_values = sum(storage_bits(layer.in_features, layer.out_features, None, fmt)["values"] for layer in layers)
    nm = [storage_bits(layer.in_features, layer.out_features, sparsity, fmt) for layer in layers]
    nm_bits = sum(b["values"] + b["index"] for b in nm)
    return {"weight_storage_reduction_vs_fp16": 16.0 * weights / dense_values,
            "nm_2of4_int4_bits_per_weight": nm_bits / weights}


def _row(design: str, metric: str, reported: float | str, predicted: float | None, tolerance: float | None,
         note: str) -> CalibrationRow:
    reported = reported if isinstance(reported, str) else float(reported)
    residual = None if predicted is None or isinstance(reported, str) else predicted / reported - 1.0
    passed = None if tolerance is None or residual is None else abs(residual) <= tolerance
    if tolerance is not None and residual is None:
        passed = False
    return CalibrationRow(design, metric, reported, None if predicted is None else float(predicted),
                          residual, None if tolerance is None else float(tolerance), passed, note)


def _not_modelled(metric: str, design: Design) -> str | None:
    """The reason calibration.yaml gives for not predicting ``metric`` of ``design`` (None: it is predicted)."""
    reason = (design.spec.get("not_modelled_metrics") or {}).get(metric) or design.spec.get("not_modelled")
    return None if reason is None else str(reason).strip()


def _note(metric: str, design: Design, report: HwReport | None) -> str:
    reason = _not_modelled(metric, design)
    if reason is not None:
        return NOT_MODELLED + reason
    fit = calibration_spec().get("fit", {})
    for key, how in fit.items():
        if how.get("metric") == metric and how.get("design") == design.id:
            return f"fitted: {key} is fitted to this figure"
    if metric in GPU_METRICS:
        return GPU_NOTE
    lanes = design.spec.get("datapath_lanes")
    if lanes and metric == "decode_tokens_per_s":
        return f"fitted: datapath {lanes['lanes']} {lanes['engine']} lanes (lut_share {design.accel.lut_share:.4g})"
    if metric == "power_w" and report is not None:
        e = report.energy_breakdown_j
        step = sum(e.values())
        return "power: " + ", ".join(f"{k} {v / step:.0%}" for k, v in e.items())
    if metric == "decode_tokens_per_s" and report is not None and not report.fits:
        return "model: infeasible (" + ", ".join(report.violations) + ")"
    return ""


def design_rows(design: Design) -> list[CalibrationRow]:
    """The rows of one design: every reported figure (and derived_reported), in calibration.yaml check order."""
    reported = dict(design.published.get("reported", {}))
    reported.update(design.spec.get("derived_reported") or {})
    checks = design.spec.get("checks") or {}
    missing = [m for m in reported if m not in checks]
    if missing:
        raise ValueError(f"{design.id}: reported {', '.join(missing)} has no entry under checks in {CALIBRATION_FILE}")
    report = estimate(design.plan, design.workload, design.accel) if design.accel is not None else None
    storage = storage_figures(design.workload, design.spec["storage"]) if design.spec.get("storage") else {}
    rows = []
    for metric, tolerance in checks.items():
        if metric not in reported:
            raise ValueError(f"{design.id}: check '{metric}' is not a reported figure")
        not_modelled = _not_modelled(metric, design) is not None
        if not_modelled and tolerance is not None:
            raise ValueError(f"{design.id}: '{metric}' is not modelled and cannot have a tolerance")
        if metric in GPU_METRICS or not_modelled:
            predicted = None
        elif isinstance(reported[metric], str):
            raise ValueError(f"{design.id}: reported {metric} is text; list it under not_modelled_metrics")
        elif metric in storage:
            predicted = storage[metric]
        elif metric in REPORT_METRICS and report is not None:
            predicted = REPORT_METRICS[metric](report)
        else:
            raise ValueError(f"{design.id}: no prediction for metric '{metric}'")
        rows.append(_row(design.id, metric, reported[metric], predicted, tolerance, _note(metric, design, report)))
    return rows


def calibration_rows() -> list[CalibrationRow]:
    """One row per reported figure of every design of published_fpga.yaml (with the current constants)."""
    return [row for design in _designs().values() for row in design_rows(design)]


# ---------------------------------------------------------------------------- table
def _num(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return "(text)"
    return f"{value:.4g}"


TABLE_HEADERS = ["design", "metric", "reported", "predicted", "residual", "tolerance", "result", "note"]
TABLE_RIGHT = {2, 3, 4, 5}
"""Columns of :func:`table_cells` and which of them are right-aligned."""


def table_cells(rows: list[CalibrationRow]) -> list[list[str]]:
    """Text cells per row under :data:`TABLE_HEADERS`: residual in %, PASS/FAIL (— when not tested)."""
    return [[r.design, r.metric, _num(r.reported), _num(r.predicted),
             "—" if r.residual is None else f"{r.residual:+.1%}",
             "—" if r.tolerance is None else f"{r.tolerance:.0%}",
             "—" if r.passed is None else ("PASS" if r.passed else "FAIL"), r.note] for r in rows]


def summary(rows: list[CalibrationRow]) -> str:
    """``'6/6 toleranced checks pass'``."""
    tested = [r for r in rows if r.passed is not None]
    return f"{sum(r.passed for r in tested)}/{len(tested)} toleranced checks pass"


def all_pass(rows: list[CalibrationRow]) -> bool:
    """Every row with a tolerance passes."""
    return all(r.passed for r in rows if r.tolerance is not None)


# ---------------------------------------------------------------------------- fit
def round_sig(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _reported(design: Design, metric: str) -> float:
    return float(design.published["reported"][metric])


def fit_mem_efficiency(design_id: str, metric: str = "decode_tokens_per_s", lo: float = 0.01,
                       hi: float = 1.0) -> float:
    """The mem_efficiency in [lo, hi] for which ``design_id``'s predicted ``metric`` equals the reported one
    (bisection on ``Accelerator(mem_efficiency=...)``; the rate grows with the efficiency)."""
    design = _designs()[design_id]
    target = _reported(design, metric)

    def gap(eff: float) -> float:
        accel = Accelerator.from_dict({**design.accel.to_dict(), "mem_efficiency": eff})
        return REPORT_METRICS[metric](estimate(design.plan, design.workload, accel)) - target

    if gap(hi) < 0 or gap(lo) > 0:
        raise ValueError(f"{design_id}: the reported {metric} {target:g} is not reached for mem_efficiency in "
                         f"[{lo:g}, {hi:g}]")
    for _ in range(60):
        mid = (lo + hi) / 2
        if gap(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _power_loss(designs: list[Design], metric: str) -> Callable[[float], float]:
    def loss(overhead: float) -> float:
        with override_constants({"fpga_overhead": overhead}):
            return sum(math.log(REPORT_METRICS[metric](estimate(d.plan, d.workload, d.accel)) / _reported(d, metric))
                       ** 2 for d in designs)
    return loss


def fit_fpga_overhead(design_ids_: list[str], metric: str = "power_w", lo: float = 1.0,
                      hi: float = 100.0) -> float:
    """fpga_overhead in [lo, hi] minimising sum over the designs of log(predicted / reported power)^2:
    a 41-point log-spaced grid, then golden-section search between the best point's neighbours."""
    designs = [_designs()[d] for d in design_ids_]
    loss = _power_loss(designs, metric)
    with override_constants({"fpga_overhead": lo}):
        p_lo = [estimate(d.plan, d.workload, d.accel).power_w for d in designs]
    with override_constants({"fpga_overhead": hi}):
        p_hi = [estimate(d.plan, d.workload, d.accel).power_w for d in designs]
    if p_lo == p_hi:  # a cache inside the model would defeat override_constants
        raise RuntimeError("the predicted power does not depend on fpga_overhead; cannot fit it")
    grid = [lo * (hi / lo) ** (i / 40) for i in range(41)]
    values = [loss(x) for x in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
    return min(candidates)[1]


def fit() -> dict[str, float]:
    """Recompute the fitted constants (calibration.yaml ``fit``) from the designs.

    ``mem_efficiency.hbm2`` first (bisection on the HBM2 design's decode rate), then ``fpga_overhead``
    (least squares on log power) with that efficiency rounded to 3 significant digits, as it is stored.
    Returns unrounded values keyed by :data:`FITTED_KEYS`.
    """
    how = calibration_spec()["fit"]
    h = how["mem_efficiency.hbm2"]
    hbm2 = fit_mem_efficiency(h["design"], h["metric"], *map(float, h["range"]))
    o = how["fpga_overhead"]
    with override_constants({"mem_efficiency.hbm2": round_sig(hbm2, 3)}):
        overhead = fit_fpga_overhead(list(o["designs"]), o["metric"], *map(float, o["range"]))
    return {"mem_efficiency.hbm2": hbm2, "fpga_overhead": overhead}
