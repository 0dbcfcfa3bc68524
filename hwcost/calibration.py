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

``residual = predicted / reported - 1``. The all-in prediction uses the stored constants (which are
the fit over every design); the leave-one-out prediction (``loo_*``) refits the fitted constants
without the design and predicts it with those. A row with a tolerance passes when ``|residual| <=
tolerance`` and ``|loo_residual| <= loo_tolerance``.

:func:`fit` recomputes the fitted global constants of ``constants.yaml`` (section ``fit`` of
calibration.yaml, in its order): each is the bounded minimum over its range of
sum_d log(predicted_d / reported_d)^2 over its designs (a log-spaced grid, then golden-section
search), with the constants fitted before it applied; a constant with no design left (leave-one-out)
takes its ``prior``. ``also`` lists constants that take the same value (memory kinds of one family).
Candidate constants are evaluated with :func:`override_constants`. Like the rest of hwcost this
module needs only numpy, pyyaml, the standard library and dse.plan.
"""

from __future__ import annotations

import json
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
LOO_TOLERANCE = {"decode_tokens_per_s": 0.25, "power_w": 0.30}
"""Leave-one-out tolerance of a metric whose all-in check has a tolerance (the calibration issue's targets)."""


@dataclass
class CalibrationRow:
    """One reported figure of one design next to the model's prediction.

    ``residual = predicted / reported - 1`` (None without a prediction); ``tolerance``: relative, None when
    the row is printed but not tested; ``loo_*``: the same with the fitted constants refitted without this
    design; ``passed``: both residuals within their tolerances (None when not tested).
    """

    design: str
    metric: str
    reported: float | str
    predicted: float | None
    residual: float | None
    tolerance: float | None
    passed: bool | None
    note: str = ""
    loo_predicted: float | None = None
    loo_residual: float | None = None
    loo_tolerance: float | None = None

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


def fit_spec() -> dict[str, dict]:
    """calibration.yaml ``fit``: constant path -> {designs, metric, range, prior, also, source}, in fit order."""
    return calibration_spec()["fit"]


def fitted_keys() -> list[str]:
    """The constants.yaml entries :func:`fit` recomputes (dotted paths), ``also`` entries included."""
    return [k for key, how in fit_spec().items() for k in (key, *how.get("also", ()))]


def _get(path: str) -> Any:
    d: Any = constants()
    for key in path.split("."):
        d = d[key]
    return d


def stored_constants() -> dict[str, float]:
    """The current values of the fitted constants (:func:`fit_spec` keys) in constants.yaml."""
    return {path: float(_get(path)) for path in fit_spec()}


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


def _accelerator(design_id: str, pub: dict, spec: dict) -> Accelerator:
    fields = dict(spec["accelerator"])
    for key, value in (("device", pub.get("device")), ("clock_mhz", pub.get("clock_mhz"))):
        if value is not None and fields.get(key) != value:
            raise ValueError(f"{design_id}: accelerator {key} {fields.get(key)!r} differs from the published {value!r}")
    accel = Accelerator.from_dict(fields, prefix=f"{design_id}.accelerator")
    kind = (pub.get("memory") or {}).get("type")
    if kind is not None and kind not in {m.kind for m in accel.memories}:
        raise ValueError(f"{design_id}: accelerator memory {accel.memory_names} is not of the published kind {kind!r}")
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
        accel = _accelerator(design_id, pub, spec)
    return Design(design_id, pub, spec, workload, plan, accel)


@lru_cache(maxsize=None)
def _designs() -> dict[str, Design]:
    return {design_id: build_design(design_id) for design_id in design_ids()}


# ---------------------------------------------------------------------------- predictions
def _streamed_weight_bytes(report: HwReport) -> float:
    return float(report.weight_bytes_breakdown["linear"] + report.weight_bytes_breakdown["lm_head"])


def _peak_bytes_per_s(report: HwReport) -> float:
    dev = get_device(report.device)
    return sum(dev.memory(name).bytes_per_s for name in report.memory.split("+"))


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
         note: str, loo_predicted: float | None = None) -> CalibrationRow:
    reported = reported if isinstance(reported, str) else float(reported)

    def residual(value):
        return None if value is None or isinstance(reported, str) else value / reported - 1.0

    res, loo_res = residual(predicted), residual(loo_predicted)
    loo_tol = None if tolerance is None else LOO_TOLERANCE.get(metric, tolerance)
    passed = None
    if tolerance is not None:
        passed = (res is not None and abs(res) <= tolerance
                  and (loo_res is None or abs(loo_res) <= loo_tol))
    return CalibrationRow(design, metric, reported, None if predicted is None else float(predicted), res,
                          None if tolerance is None else float(tolerance), passed, note,
                          None if loo_predicted is None else float(loo_predicted), loo_res,
                          None if loo_tol is None else float(loo_tol))


def _not_modelled(metric: str, design: Design) -> str | None:
    """The reason calibration.yaml gives for not predicting ``metric`` of ``design`` (None: it is predicted)."""
    reason = (design.spec.get("not_modelled_metrics") or {}).get(metric) or design.spec.get("not_modelled")
    return None if reason is None else str(reason).strip()


def _note(metric: str, design: Design, report: HwReport | None) -> str:
    reason = _not_modelled(metric, design)
    if reason is not None:
        return NOT_MODELLED + reason
    if metric in GPU_METRICS:
        return GPU_NOTE
    notes = [f"in the fit of {key}" for key, how in fit_spec().items()
             if how["metric"] == metric and design.id in how["designs"]]
    if design.spec.get("derived_from_rate") and metric == "decode_tokens_per_s":
        notes.append(f"not independent: {design.spec['derived_from_rate']}")
    if metric == "power_w" and report is not None:
        w = report.power_breakdown_w
        notes.append("power: " + ", ".join(f"{k} {v:.3g} W" for k, v in w.items() if v > 0))
    if metric == "decode_tokens_per_s" and report is not None:
        bound = sum(row.cycles for row in report.layers if row.bound == "memory") / max(
            sum(row.cycles for row in report.layers), 1e-300)
        notes.append(f"{bound:.0%} of cycles memory-bound")
        if not report.fits:
            notes.append("model: infeasible (" + ", ".join(report.violations) + ")")
    return "; ".join(notes)


def _estimate(design: Design) -> HwReport | None:
    return estimate(design.plan, design.workload, design.accel) if design.accel is not None else None


def _predictions(design: Design, report: HwReport | None) -> dict[str, float | None]:
    """The model's prediction of every reported figure of ``design`` from its ``report`` (:func:`_estimate`
    under the current constants)."""
    reported = dict(design.published.get("reported", {}))
    reported.update(design.spec.get("derived_reported") or {})
    storage = storage_figures(design.workload, design.spec["storage"]) if design.spec.get("storage") else {}
    out: dict[str, float | None] = {}
    for metric, value in reported.items():
        if metric in GPU_METRICS or _not_modelled(metric, design) is not None:
            out[metric] = None
        elif isinstance(value, str):
            raise ValueError(f"{design.id}: reported {metric} is text; list it under not_modelled_metrics")
        elif metric in storage:
            out[metric] = storage[metric]
        elif metric in REPORT_METRICS and report is not None:
            out[metric] = REPORT_METRICS[metric](report)
        else:
            raise ValueError(f"{design.id}: no prediction for metric '{metric}'")
    return out


def _in_a_fit(design_id: str) -> bool:
    return any(design_id in how["designs"] for how in fit_spec().values())


def design_rows(design: Design, loo: bool = True) -> list[CalibrationRow]:
    """The rows of one design: every reported figure (and derived_reported), in calibration.yaml check order;
    with ``loo`` also the leave-one-out predictions (constants refitted without this design)."""
    reported = dict(design.published.get("reported", {}))
    reported.update(design.spec.get("derived_reported") or {})
    checks = design.spec.get("checks") or {}
    missing = [m for m in reported if m not in checks]
    if missing:
        raise ValueError(f"{design.id}: reported {', '.join(missing)} has no entry under checks in {CALIBRATION_FILE}")
    report = _estimate(design)
    predicted = _predictions(design, report)
    left_out = predicted
    if loo and _in_a_fit(design.id):
        with override_constants(_expand(fit(exclude=design.id))):
            left_out = _predictions(design, _estimate(design))
    rows = []
    for metric, tolerance in checks.items():
        if metric not in reported:
            raise ValueError(f"{design.id}: check '{metric}' is not a reported figure")
        if _not_modelled(metric, design) is not None and tolerance is not None:
            raise ValueError(f"{design.id}: '{metric}' is not modelled and cannot have a tolerance")
        rows.append(_row(design.id, metric, reported[metric], predicted[metric], tolerance,
                         _note(metric, design, report), left_out[metric] if loo else None))
    return rows


def calibration_rows(loo: bool = True) -> list[CalibrationRow]:
    """One row per reported figure of every design of published_fpga.yaml (stored constants; ``loo``: with the
    leave-one-out predictions)."""
    return [row for design in _designs().values() for row in design_rows(design, loo)]


# ---------------------------------------------------------------------------- table
def _num(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return "(text)"
    return f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1%}"


TABLE_HEADERS = ["design", "metric", "reported", "predicted", "residual", "LOO predicted", "LOO residual",
                 "tolerance", "result", "note"]
TABLE_RIGHT = {2, 3, 4, 5, 6, 7}
"""Columns of :func:`table_cells` and which of them are right-aligned."""


def table_cells(rows: list[CalibrationRow]) -> list[list[str]]:
    """Text cells per row under :data:`TABLE_HEADERS`: residuals in %, PASS/FAIL (— when not tested)."""
    return [[r.design, r.metric, _num(r.reported), _num(r.predicted), _pct(r.residual), _num(r.loo_predicted),
             _pct(r.loo_residual),
             "—" if r.tolerance is None else f"{r.tolerance:.0%}" + (
                 f" / {r.loo_tolerance:.0%}" if r.loo_tolerance is not None else ""),
             "—" if r.passed is None else ("PASS" if r.passed else "FAIL"), r.note] for r in rows]


def summary(rows: list[CalibrationRow]) -> str:
    """``'6/6 toleranced checks pass'``."""
    tested = [r for r in rows if r.passed is not None]
    return f"{sum(r.passed for r in tested)}/{len(tested)} toleranced checks pass (all-in and leave-one-out)"


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


def _expand(values: dict[str, float]) -> dict[str, float]:
    """Fitted values with each constant's ``also`` entries set to the same value."""
    out = {}
    for key, value in values.items():
        for path in (key, *fit_spec()[key].get("also", ())):
            out[path] = value
    return out


def log_loss(designs: list[Design], metric: str, path: str) -> Callable[[float], float]:
    """x -> sum over ``designs`` of log(predicted / reported ``metric``)^2 with constant ``path`` (and its
    ``also`` entries) set to x."""
    def loss(x: float) -> float:
        with override_constants(_expand({path: x})):
            return sum(math.log(REPORT_METRICS[metric](estimate(d.plan, d.workload, d.accel)) / _reported(d, metric))
                       ** 2 for d in designs)
    return loss


def minimise_bounded(loss: Callable[[float], float], lo: float, hi: float, grid: int = 25, steps: int = 40) -> float:
    """The minimum of ``loss`` over [lo, hi]: a log-spaced grid, then golden-section search between the best
    point's neighbours (the best of grid and search is returned)."""
    xs = [lo * (hi / lo) ** (i / (grid - 1)) for i in range(grid)]
    values = [loss(x) for x in xs]
    best = min(range(grid), key=values.__getitem__)
    a, b = xs[max(best - 1, 0)], xs[min(best + 1, grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return min([(values[best], xs[best]), (fc, c), (fd, d)])[1]


_FITS: dict[tuple, dict[str, float]] = {}
""":func:`fit` results by (left-out design, the constants they were fitted under): a table and its
leave-one-out column reuse them; a change of any constant (override_constants) misses the cache."""


def fit(exclude: str | None = None) -> dict[str, float]:
    """Recompute the fitted constants (calibration.yaml ``fit``, in order) from their designs, leaving out the
    design ``exclude``; each fit sees the earlier ones rounded to 3 significant digits, as they are stored.
    Returns unrounded values keyed by the :func:`fit_spec` paths (``also`` entries take the same values)."""
    key = (exclude, json.dumps(constants(), sort_keys=True, default=str))
    if key not in _FITS:
        _FITS[key] = _fit(exclude)
    return dict(_FITS[key])


def _fit(exclude: str | None) -> dict[str, float]:
    fitted: dict[str, float] = {}
    for path, how in fit_spec().items():
        designs = [_designs()[d] for d in how["designs"] if d != exclude]
        if not designs:
            fitted[path] = float(how["prior"])
            continue
        with override_constants(_expand({k: round_sig(v, 3) for k, v in fitted.items()})):
            lo, hi = map(float, how["range"])
            fitted[path] = minimise_bounded(log_loss(designs, how["metric"], path), lo, hi)
    return fitted
