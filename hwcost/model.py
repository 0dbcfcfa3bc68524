"""The analytical accelerator model: ``estimate(plan, workload, accel) -> HwReport``.

Every figure is a formula below applied to a device entry (``data/devices.yaml`` or a user devices
file), a field of the :class:`~hwcost.accelerator.Accelerator` design, or a constant
(``data/constants.yaml``, written ``C[...]``). Per-format figures (storage bits with N:M index
metadata and zero points, MAC lanes per DSP, LUT/FF per lane) are in :mod:`hwcost.kernels`, the
power coefficients in :mod:`hwcost.power`; this module combines them into engines, rows and totals.

Storage (monotonicity notes, tested in tests/test_hwcost_properties.py)
* fewer weight bits never increase a layer's bytes (16 > 8 > ... > 2 > ternary), more sparsity with
  the same M never does; dense -> N:M does not iff N*ceil(log2 M) <= (M-N)*value_bits; across M
  density does not order bytes (7:16 INT4 3.5 bits/weight > 1:2 INT4 2.5).
* compressing a *tied* FP16 lm_head stores a compressed copy next to the FP16 embedding table.
* ternary values: 2-bit codes, or base-3 packing (``ternary_storage: base3``, 5 per byte, 1.6 bits);
  asymmetric INT formats add a k-bit zero point per group.

Datapath: one matrix-vector engine per distinct datapath (engine class, N:M pattern) in the plan,
time-multiplexed over the layers that use it. INT-k layers run on the engine of the widest INT
class with the same DSP packing (int6 on the int8 lanes; int3, int2 on the int4 lanes). Ternary
engines are LUT-only: an add/subtract tree per lane, or table lookup (``ternary_engine:
table_lookup``: g = C[ternary_table.group] weights per lookup into tables built per token,
(3^g - 1)/2 adds per g inputs, on the same lanes). Budgets D, L = ``dsp_share``, ``lut_share`` of
the device after the shell; classes listed in ``lanes`` get exactly those lanes (split over their
N:M variants by sqrt(kept MACs)) and are paid first. Attention's QK^T and AV run on the FP16 dense
engine, whose attention lanes are bandwidth-matched to an FP16 cache,
    att = ceil(bytes_per_cycle * heads / (kv_heads * 2)),
capped at C[attention_budget_cap] of either budget: they depend neither on the context nor on the
KV bits, so fewer KV bits only remove memory cycles. The other engines share the rest by
    lanes_e = floor(s * sqrt(kept_e / p_e)),  p_e = theta * dsp_e / D + (1 - theta) * lut_e / L
(Lagrange minimum of the step's compute sum_e kept_e / lanes_e; theta by nested grids,
s the largest scale both budgets allow; at least 1 lane).

Memories: the accelerator uses one or more of the device's memories (``memory: a+b``); memory i
delivers bw_i = min(peak_i * eff_i, channels_i * port_bits_i / 8 * clock) bytes/s (eff_i:
``mem_efficiency`` or C[mem_efficiency][kind]; the second term is the fabric side: AXI ports move
port_bits per accelerator cycle), traffic is interleaved over them in proportion to bw_i, so
    bytes_per_cycle = sum_i bw_i / clock,  memory_cycles = bytes / bytes_per_cycle.
Capacity: sum of the memories' capacities * C[offchip_capacity_cap].

Weight placement: layers matching ``resident`` (none, all, or a regex on layer names) are held in
the on-chip weight buffer (URAM first, then BRAM; at most ``weight_buffer_bytes`` or the
``uram_share``/``bram_share`` of the device) and read no off-chip bytes; the others stream every
step. Resident bytes over the buffer make the design infeasible (``weight_buffer``). The embedding
(``embedding: host``) and the LM head (``lm_head: host``) may run on the host: the host sends or
receives B * hidden FP16 values over ``host_gbps`` and computes the head at ``host_gmacs``; host
seconds add to the step, ``host_w`` * host seconds to its energy; the head then takes no FPGA
storage, traffic or lanes (its bytes still count in ``weight_bytes``).

Timing per decode step (batch B sequences, one token each). Every row r has compute cycles
C_r = work_r / lanes_e (work = B * kept weights, + table builds), memory cycles M_r = off-chip
bytes / bytes_per_cycle, and a fixed C[timing.row_overhead_cycles] (pipeline fill and drain between
dependent rows); the overlap model (C[timing.overlap] = o, 1: double-buffered weight streaming)
    row cycles = max(C_r, M_r) + (1 - o) * min(C_r, M_r) + fixed_r.
    linear     kept = B * kept_per_row * out; bytes = stored bytes unless resident
    attention  per block with window W_b = min(context, attention_window, the model's sliding window
               for its sliding blocks): macs = B * 2 * heads * head_dim * W_b on the FP16 lanes,
               kv bytes = B * W_b * kv_token, kv_token = 2 * kv_heads * (head_dim * kv_bits / 8 + s)
               (s = 2 bytes of FP16 scale per head when kv_bits < 16); softmax on the vector unit
               B * heads * W_b * C[vector_unit.softmax_ops_per_score] / lanes, after the row
    mlgru      no KV cache (state on chip): B * hidden * C[vector_unit.mlgru_ops_per_channel] / lanes
    vector     per block, the element-wise ops the matrix rows do not do, on C[vector_unit.lanes]:
               norms (norms_per_block * hidden * norm ops), the MLP activation (intermediate *
               (activation ops + 1 for a GLU product)), rotary embedding ((heads + kv_heads) * head_dim
               * rope ops, none for learned positions), plus C[vector_unit.op_latency_cycles] per op
    embedding  B * embedding row values * 2 bytes (FPGA), or host link time (host)
    decode_ms_per_token = (step cycles / clock + host s) * 1e3; tokens/s = B / step seconds
Prefill of P = prompt_length tokens: weights read once, P times the compute (the LM head once),
attention over sum_t min(t, W_b) causal keys, the KV cache written once.

Resources: engines + C[infrastructure] + C[vector_unit]; BRAM36 for two ping-pong activation
buffers of B * max(in_features) FP16 values and the MLGRU states; the weight buffer.
utilisation = used / (available after the shell); fits = every utilisation <= C[utilisation_caps],
resident bytes <= buffer, off-chip bytes (embedding, KV cache, streamed weights) <= capacity cap.
constraint_violation = max(0, util_r / cap_r - 1, resident / buffer - 1, offchip / cap - 1).

Power (:mod:`hwcost.power`): static_w of the device + dynamic W of the used LUT, FF, DSP, BRAM,
URAM and clock tree at the clock and ``toggle_rate`` (XPE style) * C[power.dynamic_scale]; energy
per step = watts * step seconds + off-chip bits * pJ/bit of each memory kind + on-chip bits read
(resident weights, activations) * pJ/bit of URAM/BRAM + host energy; j_per_token = step energy / B,
power_w = step energy / step seconds. More lanes or a higher clock cost watts even when the step
is memory-bound.

What is monotone in decode latency (tested): lowering bits within one engine class leaves compute
unchanged; across engine classes only memory-bound plans are guaranteed not to slow down (a new
engine takes lanes from the others); an MLGRU-only plan's latency does not depend on the context;
fewer KV bits never slow decode; a window bounds the KV traffic.

Batches: :func:`estimate_batch` evaluates P plans of one workload at once, on one accelerator or
one per plan (grouped by design). A :class:`PlanBatch` holds each plan as arrays over the
workload's :class:`Layout` rows (kernel class, N, M, group size, zero points) and blocks (MLGRU or
attention). :func:`estimate` is the same core on a batch of one, plus the per-row and per-engine
tables of :class:`HwReport`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache

import numpy as np

from dse.arch import LinearLayer, Workload, check_plan
from dse.plan import FP16, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import kernels, power
from hwcost.accelerator import Accelerator
from hwcost.devices import BRAM36_BITS, URAM_BITS, constants
from hwcost.kernels import KERNELS

RESOURCES = ("lut", "ff", "dsp", "bram36", "uram")
_CAP_KEY = {"lut": "lut", "ff": "ff", "dsp": "dsp", "bram36": "bram", "uram": "uram"}
_FP16 = KERNELS.index("fp16")
_TERNARY = KERNELS.index("ternary")
_VALUE_BITS = np.array([16.0] + [float(k[3:]) for k in KERNELS[1:-1]] + [kernels.TERNARY_CODE_BITS])
_SCALES = np.array([kernels.SCALES_NONE] + [kernels.SCALES_GROUP] * (len(KERNELS) - 2) + [kernels.SCALES_TENSOR])
FP16_KV_BYTES = 2
"""Bytes of an FP16 KV value (and of a KV scale); attention lanes are sized on an FP16 cache."""

METRICS: dict[str, dict[str, str]] = {
    "decode_tokens_per_s": {"unit": "tokens/s", "direction": "maximize"},
    "decode_ms_per_token": {"unit": "ms", "direction": "minimize"},
    "j_per_token": {"unit": "J", "direction": "minimize"},
    "power_w": {"unit": "W", "direction": "minimize"},
    "prefill_ms": {"unit": "ms", "direction": "minimize"},
    "weight_bytes": {"unit": "bytes", "direction": "minimize"},
    "lut_util": {"unit": "fraction", "direction": "minimize"},
    "dsp_util": {"unit": "fraction", "direction": "minimize"},
    "bram_util": {"unit": "fraction", "direction": "minimize"},
    "uram_util": {"unit": "fraction", "direction": "minimize"},
}
"""Hardware metrics :meth:`HwReport.metric` returns: name -> unit and natural direction."""
METRIC_NAMES = tuple(METRICS)


# ---------------------------------------------------------------------------- layout and plan arrays
@dataclass(frozen=True)
class Layout:
    """Every linear layer a plan of ``workload`` can activate, in model order, as arrays (one per workload).

    ``kind``: 0 always present (MLP, lm_head, OPT project_in/out), 1 an attention projection of
    ``block``, 2 an MLGRU projection of ``block`` (present when that block's mixer is an MLGRU).
    ``inherit``: for a substituted MLGRU projection, the row of the attention layer whose plan it
    takes when the plan does not name it; -1 otherwise.
    ``slot_attention``, ``slot_mlgru``, ``slot_block``: the rows one plan can have, in model order: a
    slot is one row outside the mixers, or the j-th projection of block ``slot_block``'s mixer, the
    attention row or the MLGRU row by that block's mixer (``len(layers)``: no such projection).
    """

    layers: tuple[LinearLayer, ...]
    in_f: np.ndarray
    out_f: np.ndarray
    block: np.ndarray
    kind: np.ndarray
    inherit: np.ndarray
    row: dict[str, int]
    lm_head: int
    has_attention: bool
    slot_attention: np.ndarray
    slot_mlgru: np.ndarray
    slot_block: np.ndarray


@lru_cache(maxsize=64)
def layout(workload: Workload) -> Layout:
    """The :class:`Layout` of ``workload`` (cached)."""
    layers: list[LinearLayer] = []
    kind: list[int] = []
    slots: list[tuple[int, int, int]] = []  # (attention row, MLGRU row, block); -1: no such projection
    has_attention = workload.token_mixer == "attention"

    def extend(items: list[LinearLayer], k: int) -> list[int]:
        rows = list(range(len(layers), len(layers) + len(items)))
        layers.extend(items)
        kind.extend([k] * len(items))
        if k == 0:
            slots.extend((r, r, 0) for r in rows)
        return rows

    extend(workload.pre_block_layers(), 0)
    for i in range(workload.num_layers):
        attn = extend(workload.attention_layers(i), 1) if has_attention else []
        mlgru = extend(workload.mlgru_layers(i), 2)
        slots.extend((attn[j] if j < len(attn) else -1, mlgru[j] if j < len(mlgru) else -1, i)
                     for j in range(max(len(attn), len(mlgru))))
        extend(workload.mlp_layers(i), 0)
    extend(workload.post_block_layers(), 0)
    extend([workload.lm_head()], 0)
    row = {layer.name: r for r, layer in enumerate(layers)}
    inherit = [row[workload.mlgru_counterpart(layer.name)] if k == 2 and has_attention else -1
               for layer, k in zip(layers, kind)]
    slots = [tuple(len(layers) if r < 0 else r for r in slot[:2]) + slot[2:] for slot in slots]
    slot_attention, slot_mlgru, slot_block = (np.array(x) for x in zip(*slots))
    return Layout(layers=tuple(layers), in_f=np.array([x.in_features for x in layers], dtype=float),
                  out_f=np.array([x.out_features for x in layers], dtype=float),
                  block=np.array([-1 if x.block is None else x.block for x in layers]),
                  kind=np.array(kind), inherit=np.array(inherit), row=row, lm_head=row["lm_head"],
                  has_attention=has_attention, slot_attention=slot_attention, slot_mlgru=slot_mlgru,
                  slot_block=slot_block)


@dataclass
class PlanBatch:
    """``P`` plans of one workload as arrays over the :class:`Layout` rows ``R`` and blocks.

    ``kernel`` [P, R]: index into :data:`hwcost.kernels.KERNELS`; ``n``, ``m`` [P, R]: N:M
    (dense 1, 1), integers; ``group`` [P, R]: INT group size (float array; :meth:`empty` makes small dtypes,
    int8/int16/float32, which keeps the batch path's gathers fast); ``mlgru`` [P, blocks]: the block's mixer is an
    MLGRU; ``zero`` [P, R]: asymmetric INT (a zero point per group; default none). An MLGRU projection's entries are used only when its block is an MLGRU, an attention
    projection's only when it is not. Build one with :meth:`from_plans`, or fill the arrays directly
    (a search can map its choices to them without building :class:`ModelPlan` objects).
    """

    workload: Workload
    kernel: np.ndarray
    n: np.ndarray
    m: np.ndarray
    group: np.ndarray
    mlgru: np.ndarray
    zero: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.zero is None:
            self.zero = np.zeros(self.kernel.shape, dtype=bool)

    def __len__(self) -> int:
        return self.kernel.shape[0]

    @staticmethod
    def empty(workload: Workload, size: int) -> "PlanBatch":
        """``size`` plans with every layer FP16 dense and the model's own mixer in every block."""
        lay = layout(workload)
        shape = (size, len(lay.layers))
        return PlanBatch(workload, np.full(shape, _FP16, dtype=np.int8), np.ones(shape, dtype=np.int16),
                         np.ones(shape, dtype=np.int16), np.full(shape, float(FP16.group_size), dtype=np.float32),
                         np.full((size, workload.num_layers), not lay.has_attention))

    @staticmethod
    def from_plans(plans: list[ModelPlan], workload: Workload) -> "PlanBatch":
        """Arrays of ``plans``; ValueError naming the layer or block a plan gets wrong."""
        batch = PlanBatch.empty(workload, len(plans))
        lay = layout(workload)
        for p, plan in enumerate(plans):
            check_plan(plan, workload)  # one-line PlanMismatch naming the layer or block
            if plan.layers:
                rows = [lay.row[lp.name] for lp in plan.layers]
                codes = np.array([_layer_codes(lp.sparsity, lp.fmt) for lp in plan.layers]).T
                (batch.kernel[p, rows], batch.n[p, rows], batch.m[p, rows], batch.group[p, rows],
                 batch.zero[p, rows]) = codes
            for bp in plan.blocks:
                batch.mlgru[p, bp.index] = bp.mixer == "mlgru"
            if lay.has_attention:  # substituted MLGRU projections the plan does not name inherit
                named = {lay.row[lp.name] for lp in plan.layers}
                for r in np.flatnonzero((lay.kind == 2) & batch.mlgru[p][lay.block]):
                    if r not in named:
                        src = lay.inherit[r]
                        for arr in (batch.kernel, batch.n, batch.m, batch.group, batch.zero):
                            arr[p, r] = arr[p, src]
        return batch



@lru_cache(maxsize=None)
def _layer_codes(sparsity: Sparsity | None, fmt: WeightFormat) -> tuple[int, int, int, int, bool]:
    """(kernel index, N, M, group size, zero points) of a layer plan; dense is N = M = 1."""
    n, m = (1, 1) if sparsity is None else (sparsity.n, sparsity.m)
    cls = kernels.kernel_class(fmt)
    return KERNELS.index(cls), n, m, fmt.group_size, cls.startswith("int") and not fmt.symmetric


# ---------------------------------------------------------------------------- report types
@dataclass
class EngineCost:
    """One matrix-vector engine: ``lanes`` MACs/cycle and the resources they take.

    ``kept_macs``: MACs per decode step it computes (attention over the context included);
    ``attention_lanes``: lanes of the FP16 engine reserved for attention; ``lut_per_lane``/``ff_per_lane``
    in LUT/FF; ``macs_per_dsp`` 0 for LUT-only (ternary) engines; ``fixed``: lanes set by the design
    (``Accelerator.lanes``) rather than sized in the budget.
    """

    label: str
    kernel: str
    sparsity: str
    lanes: int = 0
    kept_macs: float = 0.0
    macs_per_dsp: float = 0.0
    lut_per_lane: float = 0.0
    ff_per_lane: float = 0.0
    fan_in: int = 0
    attention_lanes: int = 0
    dsp: int = 0
    lut: int = 0
    ff: int = 0
    fixed: bool = False

    @property
    def uses_dsp(self) -> bool:
        return self.macs_per_dsp > 0


@dataclass(slots=True)
class LayerCost:
    """One row of the per-layer breakdown, per decode step (batch B).

    ``macs`` dense-equivalent MACs, ``kept_macs`` computed MACs; ``weight_bytes`` the
    layer's stored weights; ``kv_bytes`` KV cache read; ``memory_bytes`` off-chip bytes
    read; ``compute_cycles`` / ``memory_cycles`` datapath cycles, ``fixed_cycles`` the row's fixed cost
    and ``overlap`` the overlap of compute and memory (``cycles`` combines them); ``bound``
    compute|memory; ``resident``: held in the on-chip weight buffer; ``where``: fpga or host.
    """

    name: str
    kernel: str
    block: int | None
    macs: float = 0.0
    kept_macs: float = 0.0
    weight_bytes: int = 0
    kv_bytes: int = 0
    memory_bytes: float = 0.0
    compute_cycles: float = 0.0
    memory_cycles: float = 0.0
    bound: str = "memory"
    fixed_cycles: float = 0.0
    overlap: float = 1.0
    resident: bool = False
    where: str = "fpga"

    @property
    def cycles(self) -> float:
        """max(compute, memory) + (1 - overlap) * min(compute, memory) + fixed cycles."""
        hi, lo = max(self.compute_cycles, self.memory_cycles), min(self.compute_cycles, self.memory_cycles)
        return hi + (1.0 - self.overlap) * lo + self.fixed_cycles


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _metric_field(name: str) -> tuple[str, str | None]:
    """Where a :data:`METRICS` scalar lives in a report: (field, key in that field's dict or None)."""
    if name == "weight_bytes":
        return "weight_bytes_total", None
    if name.endswith("_util"):
        return "utilisation", "bram36" if name == "bram_util" else name[:-len("_util")]
    return name, None


@dataclass
class HwReport:
    """Cost of one plan on one accelerator. Units in the field names or docs:

    resources/available: LUT, FF, DSP counts, BRAM in BRAM36 (36 Kib) equivalents, URAM blocks;
    utilisation: used / available-after-shell; bytes; ms; tokens/s; W; J. ``weights`` is the
    accelerator's ``resident`` choice; ``memory`` the memories used ('a+b'); ``power_breakdown_w`` the
    mean W per part over a decode step; ``memory_bytes_per_s`` what each memory delivers.
    """

    device: str
    clock_mhz: float
    weights: str
    memory: str
    batch: int
    context_length: int
    prompt_length: int
    resources: dict[str, float]
    available: dict[str, float]
    utilisation: dict[str, float]
    caps: dict[str, float]
    fits: bool
    violations: list[str]
    constraint_violation: float
    offchip_bytes: int
    offchip_capacity_bytes: int
    weight_bytes_total: int
    weight_bytes_breakdown: dict[str, int]
    lm_head_shares_embedding: bool
    decode_ms_per_token: float
    decode_tokens_per_s: float
    prefill_ms: float
    power_w: float
    j_per_token: float
    energy_breakdown_j: dict[str, float]
    engines: list[EngineCost] = field(default_factory=list)
    layers: list[LayerCost] = field(default_factory=list)
    kv_bits: int = 16
    resident_bytes: int = 0
    weight_buffer_bytes: int = 0
    host_ms: float = 0.0
    bytes_per_cycle: float = 0.0
    memory_bytes_per_s: dict[str, float] = field(default_factory=dict)
    power_breakdown_w: dict[str, float] = field(default_factory=dict)

    def metric(self, name: str) -> float:
        """A scalar among :data:`METRICS` (units there); ValueError listing them otherwise."""
        if name not in METRICS:
            raise ValueError(f"'{name}' is not a hardware metric; allowed: {', '.join(METRIC_NAMES)}")
        field, key = _metric_field(name)
        value = getattr(self, field)
        return float(value if key is None else value[key])

    @staticmethod
    def metrics_of(report: dict) -> dict[str, float]:
        """The :data:`METRICS` scalars of a report in :meth:`to_dict` form (units there), those it holds: the
        small summary stored beside the report, and read from reports stored by older versions."""
        out = {}
        for name in METRIC_NAMES:
            field, key = _metric_field(name)
            value = report.get(field)
            value = value if key is None or not isinstance(value, dict) else value.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value)
        return out

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "HwReport":
        """From :meth:`to_dict` output (also of earlier versions: fields they lack take their defaults,
        fields this version dropped are ignored)."""
        d = _known(HwReport, d)
        d["engines"] = [EngineCost(**_known(EngineCost, e)) for e in d.get("engines", [])]
        d["layers"] = [LayerCost(**_known(LayerCost, row)) for row in d.get("layers", [])]
        return HwReport(**d)

    def summary(self) -> str:
        """A few lines for humans."""
        util = ", ".join(f"{k} {v:.1%}" for k, v in self.utilisation.items())
        bounds = sum(1 for row in self.layers if row.bound == "memory")
        return "\n".join([
            f"{self.device} @ {self.clock_mhz:g} MHz, weights {self.weights}, {self.memory}, batch {self.batch}",
            f"decode {self.decode_tokens_per_s:.2f} tokens/s ({self.decode_ms_per_token:.3f} ms/step), "
            f"prefill {self.prefill_ms:.1f} ms, {self.power_w:.2f} W, {self.j_per_token:.4f} J/token",
            f"weights {self.weight_bytes_total / 1e6:.1f} MB, {bounds}/{len(self.layers)} rows memory-bound",
            f"fits {self.fits} (violations: {', '.join(self.violations) or 'none'}); utilisation {util}",
            "engines: " + ", ".join(f"{e.label} x{e.lanes}" for e in self.engines),
        ])


@dataclass
class BatchReport:
    """The scalar figures of :class:`HwReport` for ``P`` plans, as arrays of length P (same units)."""

    decode_ms_per_token: np.ndarray
    decode_tokens_per_s: np.ndarray
    prefill_ms: np.ndarray
    power_w: np.ndarray
    j_per_token: np.ndarray
    weight_bytes_total: np.ndarray
    fits: np.ndarray
    constraint_violation: np.ndarray
    resources: dict[str, np.ndarray]
    utilisation: dict[str, np.ndarray]

    def metric(self, name: str) -> np.ndarray:
        """The array of a :data:`METRICS` name; ValueError listing them otherwise."""
        if name == "weight_bytes":
            return self.weight_bytes_total
        if name.endswith("_util") and name in METRICS:
            return self.utilisation["bram36" if name == "bram_util" else name[:-5]]
        if name in METRICS:
            return getattr(self, name)
        raise ValueError(f"'{name}' is not a hardware metric; allowed: {', '.join(METRIC_NAMES)}")


# ---------------------------------------------------------------------------- lane sizing
_LANE_GUARD = 1e-9  # relative: a lane count a budget affords exactly is not lost to float rounding
_GRID_POINTS, _GRID_LEVELS = 9, 6
"""theta search of :func:`size_lanes`: 6 nested 9-point grids, each 4x finer (theta to 1/8192)."""


def _sqrt_lanes(sqrt_kept, dsp_price, lut_price, theta):
    """Continuous lanes x = s * sqrt(kept / p) for the price p = theta*dsp/D + (1-theta)*lut/L, scaled by s
    so that both budgets hold, and the compute sum_e kept_e / x_e, for K values of theta per plan.

    ``sqrt_kept`` = sqrt(kept), ``dsp_price`` = dsp/D, ``lut_price`` = lut/L: [P, E]; ``theta`` [P, K].
    Returns lanes [P, K, E] and compute [P, K]. With raw = sqrt(kept / p) and use = the larger budget
    share of raw, x = raw / use and kept / x = use * sqrt(kept) * sqrt(p) (0 for engines without MACs).
    """
    sqrt_kept, dsp_price, lut_price, theta = sqrt_kept[:, None, :], dsp_price[:, None, :], lut_price[:, None, :], \
        theta[:, :, None]
    sqrt_price = np.sqrt(np.maximum(theta * dsp_price + (1.0 - theta) * lut_price, 1e-300))
    raw = sqrt_kept / sqrt_price  # sqrt(kept / price) without overflow when the price is ~0
    use = np.maximum((dsp_price * raw).sum(-1), (lut_price * raw).sum(-1))
    return raw / np.where(use > 0, use, 1.0)[..., None], use * (sqrt_kept * sqrt_price).sum(-1)


def size_lanes(kept: np.ndarray, dsp_cost: np.ndarray, lut_cost: np.ndarray,
               dsp_budget: np.ndarray, lut_budget: np.ndarray) -> np.ndarray:
    """Integer lanes [P, E] minimising the compute cycles of one decode step, sum_e kept_e / lanes_e.

    The rows of a decode step run one after another, each on its engine, so the engines are
    time-multiplexed in sequence and the step's compute is sum_e kept_e / lanes_e. Minimising it
    under sum_e lanes_e * dsp_e <= D and sum_e lanes_e * lut_e <= L (dsp_e = 1 / macs_per_dsp,
    0 for ternary; lut_e = lut_per_lane) gives lanes_e = s * sqrt(kept_e / p_e) with the price
    p_e = theta * dsp_e / D + (1 - theta) * lut_e / L (Lagrange); theta in [0, 1] by six nested
    9-point grids (theta = 0 when no DSP engine is used), s the largest scale
    both budgets allow. One engine gets min(D / dsp_e, L / lut_e). lanes_e = max(1, floor(x_e))
    for engines with kept MACs, 0 for the others. Every plan (row) is sized independently.
    """
    dsp_price = dsp_cost / np.maximum(dsp_budget, 1e-9)[:, None] * np.ones_like(kept)
    lut_price = lut_cost / np.maximum(lut_budget, 1e-9)[:, None]
    sqrt_kept = np.sqrt(kept)
    active = kept > 0
    uses_dsp = (active & (dsp_cost > 0)).any(-1)
    rows = np.arange(len(kept))

    def cost(theta: np.ndarray) -> np.ndarray:
        return _sqrt_lanes(sqrt_kept, dsp_price, lut_price, theta)[1]

    lo, hi = np.zeros(len(kept)), np.ones(len(kept))
    steps = np.linspace(0.0, 1.0, _GRID_POINTS)
    for _ in range(_GRID_LEVELS):  # nested grids: each level spans the best point's neighbours of the last
        thetas = lo[:, None] + (hi - lo)[:, None] * steps
        best = cost(thetas).argmin(1)
        width = (hi - lo) / (_GRID_POINTS - 1)
        theta = thetas[rows, best]
        lo, hi = np.maximum(theta - width, 0.0), np.minimum(theta + width, 1.0)
    theta = np.where(uses_dsp, theta, 0.0)
    lanes = _sqrt_lanes(sqrt_kept, dsp_price, lut_price, theta[:, None])[0][:, 0, :]
    return np.where(active, np.maximum(1, np.floor(np.where(active, lanes, 0.0) * (1 + _LANE_GUARD))), 0).astype(int)


def attention_lanes(workload: Workload, bytes_per_cycle: float, kv_bytes_per_value: int) -> float:
    """FP16 lanes that read the KV cache at the memory bandwidth: bytes/cycle * heads / (kv_heads * bytes/value).

    Decode attention (QK^T and AV) is a matrix-vector product over the cache: per cached token and
    sequence 2*heads*head_dim MACs on 2*kv_heads*head_dim cached values, so more lanes than this
    cannot make it faster, whatever the context length.
    """
    return bytes_per_cycle * workload.heads / (workload.kv_heads * kv_bytes_per_value)


# ---------------------------------------------------------------------------- the vectorised core
@dataclass
class _Engines:
    """The distinct engines of a batch: per engine e its (class, n, m) and per plan its lanes and costs."""

    cls: list[str]
    n: np.ndarray
    m: np.ndarray
    of_row: np.ndarray          # [P, S] engine of each slot (-1: no row in it)
    kept: np.ndarray            # [P, E] MACs per decode step (attention included after sizing)
    fan_in: np.ndarray          # [P, E] widest kept row
    macs_per_dsp: np.ndarray    # [E]
    lut_per_lane: np.ndarray    # [P, E]
    ff_per_lane: np.ndarray     # [P, E]
    lanes: np.ndarray           # [P, E]
    attention: np.ndarray       # [P] FP16 lanes reserved for attention
    fp16: int                   # the dense FP16 engine (attention) or -1
    dsp: np.ndarray = None      # [P, E]
    lut: np.ndarray = None
    ff: np.ndarray = None


@dataclass
class _Core:
    """Everything :func:`estimate` and :func:`estimate_batch` report, as arrays over the batch."""

    rows: np.ndarray            # [P, S] the layout row in each slot (len(layout.layers): none)
    present: np.ndarray         # [P, S] the slot holds a row on the FPGA
    kept: np.ndarray            # [P, S] kept MACs per decode step (batch B)
    nbytes: np.ndarray          # [P, S] stored bytes
    compute: np.ndarray         # [P, S] cycles
    memory_bytes: np.ndarray    # [P, S] off-chip bytes read
    resident: np.ndarray        # [P, S] held in the on-chip weight buffer
    fixed: np.ndarray           # [P, S] fixed cycles of the row
    engines: _Engines
    attention: dict             # per distinct window: macs, kv bytes, compute, fixed, count [P]
    mlgru_cycles: float         # one MLGRU recurrence row
    vector_cycles: dict         # cycles of one block's vector-unit row, by mixer
    embedding_bytes: float      # off-chip bytes of the embedding row (0 on the host)
    n_attention: np.ndarray     # [P]
    n_mlgru: np.ndarray         # [P]
    step_cycles: np.ndarray
    prefill_cycles: np.ndarray
    host_s: np.ndarray          # [P] host time per decode step (embedding and/or lm_head on the host)
    prefill_host_s: np.ndarray
    bytes_per_cycle: float
    memory_bytes_per_s: dict[str, float]
    used: dict[str, np.ndarray]
    available: dict[str, float]
    caps: dict[str, float]
    util: dict[str, np.ndarray]
    violation: np.ndarray
    offchip: np.ndarray
    capacity: int
    over_capacity: np.ndarray
    resident_bytes: np.ndarray
    buffer_bytes: float
    over_buffer: np.ndarray
    breakdown: dict[str, np.ndarray]
    lm_shares: np.ndarray
    energy: dict[str, np.ndarray]
    power: dict[str, np.ndarray]
    step_s: np.ndarray


def _fixed_lanes(accel: Accelerator, cls: list[str], kept: np.ndarray) -> np.ndarray:
    """Lanes [P, E] of the engines whose class ``accel.lanes`` fixes (0 elsewhere): a class's lanes are
    split over its N:M variants in proportion to sqrt(kept MACs), as the budget split does."""
    fixed = np.zeros(kept.shape)
    if not accel.lanes:
        return fixed
    dsp_kind = accel.dev.dsp_kind
    for name, total in accel.lanes.items():
        mine = np.array([k == kernels.engine_class(name, dsp_kind, accel.act_bits) for k in cls])
        if not mine.any():
            continue
        weight = np.sqrt(kept) * mine
        share = weight / np.maximum(weight.sum(1, keepdims=True), 1e-300)
        fixed = np.where(mine & (kept > 0), np.maximum(1, np.floor(total * share * (1 + _LANE_GUARD))), fixed)
    return fixed


def _engines(batch: PlanBatch, kernel: np.ndarray, n: np.ndarray, m: np.ndarray, present: np.ndarray,
             kept: np.ndarray, kept_row: np.ndarray, accel: Accelerator, has_attn: np.ndarray) -> _Engines:
    """Group the rows of each plan ([P, S] arrays) into engines (engine class, N:M) and size their lanes."""
    c = constants()
    dev = accel.dev
    A = accel.act_bits
    table = accel.ternary_engine == "table_lookup"
    eng_of_kernel = np.array([KERNELS.index(kernels.engine_class(k, dev.dsp_kind, A)) for k in KERNELS])
    ecls = eng_of_kernel[kernel]
    big = int(max(m.max(), 1)) + 1
    code = (ecls * big + n) * big + m  # one integer per (engine class, N, M)
    used = np.zeros(len(KERNELS) * big * big, dtype=bool)
    used[code[present]] = True
    fp16_code = (_FP16 * big + 1) * big + 1
    used[fp16_code] |= bool(has_attn.any())
    codes = np.flatnonzero(used)
    E = len(codes)
    engine_of_code = np.full(len(used), -1)
    engine_of_code[codes] = np.arange(E)
    of_row = np.where(present, engine_of_code[code], -1)
    P = len(batch)
    flat = (np.arange(P)[:, None] * E + of_row)[present]
    kept = np.bincount(flat, weights=kept[present], minlength=P * E).reshape(P, E)
    fan_in = np.zeros(P * E)
    np.maximum.at(fan_in, flat, kept_row[present])
    fan_in = fan_in.reshape(P, E)
    cls = [KERNELS[int(x) // (big * big)] for x in codes]
    eng_n, eng_m = codes // big % big, codes % big
    mpd = np.array([kernels.macs_per_dsp(k, dev.dsp_kind, A) for k in cls])
    lut = np.stack([kernels.lane_lut(k, eng_m[e], fan_in[:, e], dev.dsp_kind, A, table) * np.ones(P)
                    for e, k in enumerate(cls)], axis=1)
    ff = np.stack([kernels.lane_ff(k, lut[:, e]) for e, k in enumerate(cls)], axis=1)
    fp16 = int(engine_of_code[fp16_code])
    if fp16 >= 0:
        fan_in[:, fp16] = np.maximum(fan_in[:, fp16], np.where(kept[:, fp16] > 0, 0, batch.workload.head_dim))

    avail = dev.available()
    dsp_budget = np.full(P, accel.dsp_share * avail["dsp"])
    lut_budget = np.full(P, accel.lut_share * avail["lut"])
    dsp_cost = np.where(mpd > 0, 1.0 / np.where(mpd > 0, mpd, 1.0), 0.0)
    fixed = _fixed_lanes(accel, cls, kept)  # lanes the design fixes: taken from the budgets first
    dsp_budget = dsp_budget - (fixed * dsp_cost).sum(1)
    lut_budget = lut_budget - (fixed * lut).sum(1)
    att = np.zeros(P, dtype=int)
    if fp16 >= 0:  # bandwidth-matched attention lanes, reserved first: the same for every context length
        mpd16, lut16 = mpd[fp16], lut[:, fp16]
        cap = float(c["attention_budget_cap"]) * np.minimum(np.maximum(dsp_budget, 0) * mpd16,
                                                            np.maximum(lut_budget, 0) / lut16)
        want = math.ceil(attention_lanes(batch.workload, accel.bytes_per_cycle, FP16_KV_BYTES))
        att = np.where(has_attn, np.maximum(1, np.minimum(want, np.floor(cap))), 0).astype(int)
        dsp_budget = dsp_budget - att / mpd16
        lut_budget = lut_budget - att * lut16
    sized = np.where(fixed > 0, 0.0, kept)
    lanes = size_lanes(sized, dsp_cost[None, :], lut, np.maximum(dsp_budget, 1e-9), np.maximum(lut_budget, 1e-9))
    lanes = np.where(fixed > 0, fixed, lanes).astype(int)
    if fp16 >= 0:
        lanes[:, fp16] += att
    e = _Engines(cls=cls, n=eng_n, m=eng_m, of_row=of_row, kept=kept, fan_in=fan_in, macs_per_dsp=mpd,
                 lut_per_lane=lut, ff_per_lane=ff, lanes=lanes, attention=att, fp16=fp16)
    e.dsp = np.where(mpd > 0, np.ceil(lanes / np.where(mpd > 0, mpd, 1.0)), 0).astype(int)
    e.lut = np.ceil(lanes * lut).astype(int)
    e.ff = np.ceil(lanes * ff).astype(int)
    return e


def kv_bytes_per_token(workload: Workload, kv_bits: int) -> float:
    """K and V bytes one token adds to one attention block: 2 * kv_heads * head_dim * kv_bits / 8, plus one
    FP16 scale per head for K and for V when kv_bits < 16 (0 for models without a KV cache)."""
    if not workload.has_kv_cache:
        return 0.0
    scale = 0 if kv_bits >= 16 else FP16_KV_BYTES
    return 2.0 * workload.kv_heads * (workload.head_dim * kv_bits / 8 + scale)


def attention_windows(workload: Workload, accel: Accelerator) -> np.ndarray:
    """Tokens each block's attention reads per decode step: min(context, the accelerator's window, the
    block's own sliding window)."""
    window = np.full(workload.num_layers, accel.context_length, dtype=float)
    if accel.attention_window is not None:
        window = np.minimum(window, accel.attention_window)
    if workload.sliding_window:
        sliding = np.zeros(workload.num_layers, dtype=bool)
        sliding[list(workload.sliding_blocks)] = True
        window = np.where(sliding, np.minimum(window, workload.sliding_window), window)
    return window


def causal_keys(prompt: int, window: float) -> float:
    """Keys attended over a causal prompt of ``prompt`` tokens with at most ``window`` keys per query."""
    w = min(float(prompt), float(window))
    return w * (w + 1) / 2 + (prompt - w) * w


def _row_cycles(compute, memory, fixed, overlap: float):
    """The overlap model: max(compute, memory) + (1 - overlap) * min(compute, memory) + fixed cycles."""
    return np.maximum(compute, memory) + (1.0 - overlap) * np.minimum(compute, memory) + fixed


@lru_cache(maxsize=256)
def _resident_rows(workload: Workload, resident: str) -> np.ndarray:
    """Layout rows held on chip: none, all, or the layers whose name the regex matches in full."""
    lay = layout(workload)
    if resident in ("none", "all"):
        return np.full(len(lay.layers), resident == "all")
    pattern = re.compile(resident)
    return np.array([bool(pattern.fullmatch(layer.name)) for layer in lay.layers])


def vector_ops(workload: Workload) -> dict[str, float]:
    """Element-wise operations per token on the vector unit (formulas in the module docstring)."""
    c = constants()["vector_unit"]
    w = workload
    act = w.intermediate * (c["activation_ops_per_channel"] + (1 if w.mlp_kind == "glu" else 0))
    norms = w.norms_per_block * w.hidden * c["norm_ops_per_channel"]
    rope = 0 if w.max_positions else (w.heads + w.kv_heads) * w.head_dim * c["rope_ops_per_value"]
    # an MLGRU block's gates (mlgru_ops_per_channel) are its own row (the recurrence), not counted here again
    return {"attention": norms + act + rope, "mlgru": norms + act, "final": w.hidden * c["norm_ops_per_channel"]}


def _core(batch: PlanBatch, accel: Accelerator) -> _Core:
    """The cost model on a batch of plans (formulas in the module docstring)."""
    clock = accel.clock_mhz
    if isinstance(clock, bool) or not isinstance(clock, (int, float)) or not 0 < clock < math.inf:
        raise ValueError(f"hardware.clock_mhz: {clock!r} is not a positive number of MHz")
    c = constants()
    timing = c["timing"]
    vu = c["vector_unit"]
    w = batch.workload
    lay = layout(w)
    dev = accel.dev
    mems = accel.memories
    mem_bps = {m.name: accel.memory_bytes_per_s(m) for m in mems}
    clock_hz = accel.clock_mhz * 1e6
    bpc = sum(mem_bps.values()) / clock_hz
    B, P = accel.batch, accel.prompt_length
    act_bytes = int(c["activation_bytes"])
    vu_lanes = float(vu["lanes"])
    overlap = float(timing["overlap"])
    nP = len(batch)

    # -- the rows of each plan (one per layout slot: the mixer's by its block's mixer), their choices
    R = len(lay.layers)
    in_mlgru = batch.mlgru[:, lay.slot_block]
    rows = np.where(in_mlgru, lay.slot_mlgru, lay.slot_attention)  # [P, S]; R: no row
    present = rows < R
    rows_c = np.minimum(rows, R - 1)
    att_c, mlgru_c = np.minimum(lay.slot_attention, R - 1), np.minimum(lay.slot_mlgru, R - 1)
    kernel, n, m, group = (np.where(in_mlgru, a[:, mlgru_c], a[:, att_c])  # column gathers, then a select
                           for a in (batch.kernel, batch.n, batch.m, batch.group))
    zero = np.where(in_mlgru, batch.zero[:, mlgru_c], batch.zero[:, att_c]) if batch.zero.any() else False
    in_f, out_f = (np.append(x, 0.0)[rows] for x in (lay.in_f, lay.out_f))
    bad = (np.mod(in_f, m) != 0) & present  # M does not divide in_features
    if bad.any():
        p, r = np.argwhere(bad)[0]
        raise ValueError(f"layer {lay.layers[rows[p, r]].name}: M={m[p, r]} does not divide in_features "
                         f"{int(in_f[p, r])} (plan {p} of the batch)")
    # -- kept MACs and storage
    ternary = kernel == _TERNARY
    base3 = ternary & (accel.ternary_storage == "base3")
    bits = _VALUE_BITS[kernel]
    *_, total_bits, kept_row = kernels.storage_bits_arrays(in_f, out_f, n, m, bits, group, _SCALES[kernel],
                                                           zero_points=zero, base3=base3)
    kept = B * kept_row * out_f
    nbytes = np.where(present, np.ceil(total_bits / 8), 0.0)
    lm = lay.lm_head
    lm_slot = int(np.flatnonzero(lay.slot_attention == lm)[0])
    lm_bytes = nbytes[:, lm_slot].copy()
    lm_kept = kept[:, lm_slot].copy()
    on_fpga = present.copy()
    if accel.lm_head == "host":
        on_fpga[:, lm_slot] = False
    kept = np.where(on_fpga, kept, 0.0)
    n_mlgru = batch.mlgru.sum(1)
    n_attn = w.num_layers - n_mlgru
    has_attn = n_attn > 0

    eng = _engines(batch, kernel, n, m, on_fpga, kept, kept_row, accel, has_attn)
    lanes_row = eng.lanes[np.arange(nP)[:, None], np.maximum(eng.of_row, 0)]
    work = kept
    if accel.ternary_engine == "table_lookup":  # the lookup tables are built on the same lanes
        work = kept + np.where(ternary & on_fpga, B * kernels.table_build_macs(in_f), 0.0)
    compute = work / np.maximum(lanes_row, 1)  # 0 in empty slots (no kept MACs)
    resident = _resident_rows(w, accel.resident)[rows_c] & on_fpga if accel.resident != "none" \
        else np.zeros(rows.shape, dtype=bool)
    read = np.where(resident | ~on_fpga, 0.0, nbytes)
    row_fixed = float(timing["row_overhead_cycles"])
    fixed = np.where(on_fpga, row_fixed, 0.0)
    rows_cycles = _row_cycles(compute, read / bpc, fixed, overlap).sum(1)
    prompt_compute = compute * P
    prompt_compute[:, lm_slot] = compute[:, lm_slot]  # only the last prompt token needs the LM head
    prefill = _row_cycles(prompt_compute, read / bpc, fixed, overlap).sum(1)

    # -- weight bytes
    lm_shares = np.full(nP, w.tied_embeddings) & (batch.kernel[:, lm] == _FP16) & (batch.m[:, lm] == 1)
    embed_bytes = w.embedding_params() * 2
    breakdown = {"linear": nbytes.sum(1) - lm_bytes, "lm_head": np.where(lm_shares, 0.0, lm_bytes),
                 "embedding": np.full(nP, float(embed_bytes))}

    # -- host (PS or CPU): the embedding lookup and/or the LM head
    host_bps = accel.host_gbps * 1e9
    hidden_bytes = B * w.embed_width * act_bytes
    host_s = np.zeros(nP)
    prefill_host_s = np.zeros(nP)
    if accel.embedding == "host":
        host_s = host_s + hidden_bytes / host_bps
        prefill_host_s = prefill_host_s + P * hidden_bytes / host_bps
    if accel.lm_head == "host":
        lm_s = lm_kept / (accel.host_gmacs * 1e9) + hidden_bytes / host_bps
        host_s, prefill_host_s = host_s + lm_s, prefill_host_s + lm_s

    # -- embedding, attention, MLGRU and vector-unit rows
    row_bytes = w.embedding_row_values() * 2
    embedding_bytes = float(B * row_bytes) if accel.embedding == "fpga" else 0.0
    embed_cycles = _row_cycles(0.0, embedding_bytes / bpc, row_fixed if embedding_bytes else 0.0, overlap)
    kv_token = kv_bytes_per_token(w, accel.kv_bits)
    lanes16 = np.maximum(eng.lanes[:, eng.fp16] if eng.fp16 >= 0 else np.ones(nP), 1)
    sm = float(vu["softmax_ops_per_score"]) / vu_lanes
    op_cycles = float(vu["op_latency_cycles"])
    windows = attention_windows(w, accel)
    attention: dict[float, dict] = {}
    attn_cycles = np.zeros(nP)
    attn_prefill = np.zeros(nP)
    attn_macs_total = np.zeros(nP)
    kv_read_total = np.zeros(nP)
    kv_capacity = np.zeros(nP)
    for window in np.unique(windows):
        count = (~batch.mlgru[:, windows == window]).sum(1)  # attention blocks with this window, per plan
        macs = B * 2 * w.heads * w.head_dim * window
        kv_read = B * window * kv_token
        a_compute = macs / lanes16
        a_fixed = row_fixed + op_cycles
        softmax = B * w.heads * window * sm
        cycles = _row_cycles(a_compute, kv_read / bpc, a_fixed, overlap) + softmax
        keys = causal_keys(P, window)
        pre = (_row_cycles(B * 2 * w.heads * w.head_dim * keys / lanes16, B * P * kv_token / bpc, a_fixed, overlap)
               + B * w.heads * keys * sm)
        attention[float(window)] = {"macs": macs, "kv_bytes": kv_read, "compute": a_compute, "fixed": a_fixed,
                                    "softmax": softmax, "count": count}
        attn_cycles += count * cycles
        attn_prefill += count * pre
        attn_macs_total += count * macs
        kv_read_total += count * kv_read
        kv_capacity += count * B * window * kv_token
    ops = vector_ops(w)
    vector_cycles = {mixer: B * ops[mixer] / vu_lanes + op_cycles * vu["ops_per_block"] for mixer in
                     ("attention", "mlgru")}
    final_cycles = B * ops["final"] / vu_lanes + op_cycles
    mlgru_cycles = B * w.hidden * vu["mlgru_ops_per_channel"] / vu_lanes
    vector_step = n_attn * vector_cycles["attention"] + n_mlgru * (vector_cycles["mlgru"] + mlgru_cycles) \
        + final_cycles
    step_cycles = embed_cycles + rows_cycles + attn_cycles + vector_step
    prefill_cycles = (P * embed_cycles + prefill + attn_prefill
                      + P * (n_attn * vector_cycles["attention"] + n_mlgru * (vector_cycles["mlgru"] + mlgru_cycles))
                      + final_cycles)
    if eng.fp16 >= 0:
        eng.kept[:, eng.fp16] += attn_macs_total
    step_s = step_cycles / clock_hz + host_s

    # -- resources
    max_in = in_f.max(1)
    buffer_bits = 2 * B * max_in * act_bytes * 8 + B * n_mlgru * w.hidden * act_bytes * 8
    infra, vunit = c["infrastructure"], c["vector_unit"]
    used = {"lut": eng.lut.sum(1) + infra["lut"] + vunit["lut"], "ff": eng.ff.sum(1) + infra["ff"] + vunit["ff"],
            "dsp": eng.dsp.sum(1) + infra["dsp"] + vunit["dsp"],
            "bram36": infra["bram36"] + np.ceil(buffer_bits / BRAM36_BITS), "uram": np.zeros(nP)}
    avail = dev.available()
    resident_bytes = (resident * nbytes).sum(1)
    uram_bits = accel.uram_share * avail["uram"] * URAM_BITS
    bram_bits = accel.bram_share * avail["bram36"] * BRAM36_BITS
    buffer_cap = float(accel.weight_buffer_bytes) if accel.weight_buffer_bytes is not None \
        else (uram_bits + bram_bits) / 8
    in_uram = np.minimum(resident_bytes * 8, uram_bits)  # URAM first, the rest in BRAM
    used["uram"] = used["uram"] + np.ceil(in_uram / URAM_BITS)
    used["bram36"] = used["bram36"] + np.ceil((resident_bytes * 8 - in_uram) / BRAM36_BITS)
    used = {r: np.asarray(v, dtype=float) * np.ones(nP) for r, v in used.items()}
    caps = {r: float(c["utilisation_caps"][_CAP_KEY[r]]) for r in RESOURCES}
    util = {r: (used[r] / avail[r] if avail[r] > 0 else np.where(used[r] == 0, 0.0, 1e9)) for r in RESOURCES}
    violation = np.max(np.stack([np.zeros(nP)] + [util[r] / caps[r] - 1.0 for r in RESOURCES]), axis=0)
    over_buffer = resident_bytes > buffer_cap
    violation = np.maximum(violation, np.where(resident_bytes > 0, resident_bytes / max(buffer_cap, 1e-300) - 1, 0))

    # streamed weights live off-chip; a tied FP16 lm_head streams from the embedding table already there
    shared = lm_shares & (accel.embedding == "fpga")
    streamed = read.sum(1) - np.where(shared, read[:, lm_slot], 0.0)
    offchip = (embed_bytes if accel.embedding == "fpga" else 0.0) + kv_capacity + streamed
    capacity = sum(mem.capacity_bytes for mem in mems)
    cap_off = capacity * float(c["offchip_capacity_cap"])
    over = offchip > cap_off
    violation = np.maximum(violation, offchip / cap_off - 1.0)

    # -- power and energy per decode step
    # block RAM and URAM are charged per bit read (on-chip energy below), not by an enable rate, so not twice
    dynamic = power.dynamic_power_w(used, accel.clock_mhz, accel.toggle, dev.fabric, enable_rate=0.0)
    scale = float(c["power"]["dynamic_scale"])
    watts = {"static": np.full(nP, float(dev.static_w)),
             "dynamic": sum(np.asarray(v, dtype=float) for v in dynamic.values()) * scale * np.ones(nP)}
    offchip_bytes = embedding_bytes + read.sum(1) + kv_read_total
    total_bps = sum(mem_bps.values())
    offchip_j = sum(power.offchip_energy_j(offchip_bytes * mem_bps[mem.name] / total_bps, mem.kind) for mem in mems)
    act_traffic = (B * act_bytes * (in_f + out_f) * on_fpga).sum(1)
    onchip_j = (power.onchip_energy_j(in_uram, "uram", dev.fabric)  # the resident weights, read once per step
                + power.onchip_energy_j(resident_bytes * 8 - in_uram + act_traffic * 8, "bram36", dev.fabric))
    energy = {"static": watts["static"] * step_s, "dynamic": watts["dynamic"] * step_s,
              "offchip": offchip_j * np.ones(nP), "onchip": onchip_j * np.ones(nP),
              "host": accel.host_w * host_s}

    return _Core(rows=rows, present=on_fpga, kept=kept, nbytes=nbytes, compute=compute, memory_bytes=read,
                 resident=resident, fixed=fixed, engines=eng, attention=attention, mlgru_cycles=mlgru_cycles,
                 vector_cycles=vector_cycles, embedding_bytes=embedding_bytes, n_attention=n_attn, n_mlgru=n_mlgru,
                 step_cycles=step_cycles, prefill_cycles=prefill_cycles, host_s=host_s, prefill_host_s=prefill_host_s,
                 bytes_per_cycle=bpc, memory_bytes_per_s=mem_bps, used=used, available=avail, caps=caps, util=util,
                 violation=violation, offchip=offchip, capacity=capacity, over_capacity=over,
                 resident_bytes=resident_bytes, buffer_bytes=buffer_cap, over_buffer=over_buffer,
                 breakdown=breakdown, lm_shares=lm_shares, energy=energy, power=watts, step_s=step_s)


# ---------------------------------------------------------------------------- public entry points
def _fits(core: _Core) -> np.ndarray:
    return (np.all([core.util[r] <= core.caps[r] for r in RESOURCES], axis=0) & ~core.over_capacity
            & ~core.over_buffer)


def _batch_report(core: _Core, accel: Accelerator) -> BatchReport:
    step_j = sum(core.energy.values())
    B = accel.batch
    return BatchReport(
        decode_ms_per_token=core.step_s * 1e3, decode_tokens_per_s=B / core.step_s,
        prefill_ms=(core.prefill_cycles / (accel.clock_mhz * 1e6) + core.prefill_host_s) * 1e3,
        power_w=step_j / core.step_s, j_per_token=step_j / B, weight_bytes_total=sum(core.breakdown.values()),
        fits=_fits(core), constraint_violation=core.violation, resources=core.used, utilisation=core.util)


def _subset(batch: PlanBatch, index: np.ndarray) -> PlanBatch:
    return PlanBatch(batch.workload, batch.kernel[index], batch.n[index], batch.m[index], batch.group[index],
                     batch.mlgru[index], batch.zero[index])


def estimate_batch(batch: PlanBatch, accel: Accelerator | list[Accelerator]) -> BatchReport:
    """Cost of every plan of ``batch`` on ``accel`` (one design for all, or one per plan), vectorised over
    the plans: the same code, formulas and numbers as :func:`estimate` plan by plan
    (``PlanBatch.from_plans(plans, workload)`` builds a batch). Plans sharing a design run together."""
    if isinstance(accel, Accelerator):
        return _batch_report(_core(batch, accel), accel)
    if len(accel) != len(batch):
        raise ValueError(f"estimate_batch: {len(accel)} accelerators for {len(batch)} plans")
    key_of: dict[int, str] = {}  # one key per distinct object: equal designs built separately group together
    groups: dict[str, list[int]] = {}
    for p, a in enumerate(accel):
        if id(a) not in key_of:
            key_of[id(a)] = json.dumps(a.to_dict(), sort_keys=True)
        groups.setdefault(key_of[id(a)], []).append(p)
    parts = [(np.array(index), _batch_report(_core(_subset(batch, np.array(index)), accel[index[0]]),
                                             accel[index[0]])) for index in groups.values()]
    out = {}
    for name in ("decode_ms_per_token", "decode_tokens_per_s", "prefill_ms", "power_w", "j_per_token",
                 "weight_bytes_total", "fits", "constraint_violation"):
        arr = np.empty(len(batch), dtype=getattr(parts[0][1], name).dtype)
        for index, rep in parts:
            arr[index] = getattr(rep, name)
        out[name] = arr
    for name in ("resources", "utilisation"):
        out[name] = {}
        for r in RESOURCES:
            arr = np.empty(len(batch))
            for index, rep in parts:
                arr[index] = getattr(rep, name)[r]
            out[name][r] = arr
    return BatchReport(**out)


def estimate(plan: ModelPlan, workload: Workload, accel: Accelerator) -> HwReport:
    """Cost of ``plan`` for ``workload`` on ``accel`` (formulas in the module docstring).

    Raises ValueError (one line naming the field) when the plan names a layer or block the workload
    does not have, when an N:M pattern's M does not divide a layer's in_features, or when the
    accelerator's clock is not a positive number of MHz.
    """
    batch = PlanBatch.from_plans([plan], workload)
    core = _core(batch, accel)
    return _report(core, batch, accel)


@lru_cache(maxsize=None)
def _layer_label(cls: str, n: int, m: int, group: int, asym: bool = False) -> str:
    name = "16" if cls == "fp16" else ("ternary" if cls == "ternary" else cls[3:])
    return LayerPlan("x", None if m == 1 else Sparsity(n, m), WeightFormat(name, group, symmetric=not asym)).label


def _report(core: _Core, batch: PlanBatch, accel: Accelerator) -> HwReport:
    """The detailed :class:`HwReport` of plan 0 of a core evaluation."""
    w = batch.workload
    lay = layout(w)
    dev = accel.dev
    eng = core.engines
    B = accel.batch
    bpc = core.bytes_per_cycle
    overlap = float(constants()["timing"]["overlap"])

    rows: list[LayerCost] = []

    def add(row: LayerCost) -> None:
        row.memory_cycles = row.memory_bytes / bpc
        row.overlap = overlap
        row.bound = "compute" if row.compute_cycles > row.memory_cycles else "memory"
        rows.append(row)

    kernel, n, m, group, zero = (x[0].tolist() for x in (batch.kernel, batch.n, batch.m, batch.group, batch.zero))
    kept, nbytes, read, compute, fixed, resident, present = (
        x[0].tolist() for x in (core.kept, core.nbytes, core.memory_bytes, core.compute, core.fixed, core.resident,
                                core.present))
    row_fixed = float(constants()["timing"]["row_overhead_cycles"])

    def add_linear(s: int, r: int) -> None:
        layer = lay.layers[r]
        add(LayerCost(layer.name, _layer_label(KERNELS[kernel[r]], n[r], m[r], int(group[r]), bool(zero[r])),
                      layer.block, macs=B * layer.in_features * layer.out_features, kept_macs=kept[s],
                      weight_bytes=int(nbytes[s]), memory_bytes=read[s], compute_cycles=compute[s],
                      fixed_cycles=fixed[s], resident=bool(resident[s]), where="fpga" if present[s] else "host"))

    add(LayerCost(w.embedding_name, "embedding fp16", None, memory_bytes=core.embedding_bytes,
                  fixed_cycles=row_fixed if core.embedding_bytes else 0.0,
                  where="fpga" if accel.embedding == "fpga" else "host"))
    windows = attention_windows(w, accel)
    slots = [(s, r) for s, r in enumerate(core.rows[0].tolist()) if r < len(lay.layers)]
    for k, (s, r) in enumerate(slots):
        add_linear(s, r)
        block = lay.layers[r].block
        last_of_mixer = lay.kind[r] != 0 and (k + 1 == len(slots) or lay.kind[slots[k + 1][1]] == 0)
        if not last_of_mixer:
            continue
        if batch.mlgru[0, block]:  # the token mixer's own row after its projections, then the vector unit
            add(LayerCost(w.mlgru_module(block), "mlgru", block, compute_cycles=float(core.mlgru_cycles)))
            vector = core.vector_cycles["mlgru"]
        else:
            a = core.attention[float(windows[block])]
            add(LayerCost(w.attention_module(block), "attention fp16", block, macs=a["macs"], kept_macs=a["macs"],
                          kv_bytes=int(a["kv_bytes"]), memory_bytes=a["kv_bytes"],
                          compute_cycles=float(a["compute"][0]), fixed_cycles=a["fixed"] + a["softmax"]))
            vector = core.vector_cycles["attention"]
        add(LayerCost(f"{w.block_name(block)}.vector", "vector unit", block, compute_cycles=float(vector)))

    engines: list[EngineCost] = []
    of_row = eng.of_row[0].tolist()
    order = list(dict.fromkeys(of_row[s] for s, _ in slots if of_row[s] >= 0))
    if eng.fp16 >= 0 and core.n_attention[0] > 0 and eng.fp16 not in order:
        order.append(eng.fp16)
    fixed_classes = {kernels.engine_class(k, dev.dsp_kind, accel.act_bits) for k in (accel.lanes or {})}
    for e in order:
        cls, n_, m_ = eng.cls[e], int(eng.n[e]), int(eng.m[e])
        sp = "dense" if m_ == 1 else f"{n_}:{m_}"
        engines.append(EngineCost(
            label=cls if m_ == 1 else f"{sp} {cls}", kernel=cls, sparsity=sp, lanes=int(eng.lanes[0, e]),
            kept_macs=float(eng.kept[0, e]), macs_per_dsp=float(eng.macs_per_dsp[e]),
            lut_per_lane=float(eng.lut_per_lane[0, e]), ff_per_lane=float(eng.ff_per_lane[0, e]),
            fan_in=int(eng.fan_in[0, e]), attention_lanes=int(eng.attention[0]) if e == eng.fp16 else 0,
            dsp=int(eng.dsp[0, e]), lut=int(eng.lut[0, e]), ff=int(eng.ff[0, e]), fixed=cls in fixed_classes))

    violations = [r for r in RESOURCES if core.util[r][0] > core.caps[r]]
    if core.over_buffer[0]:
        violations.append("weight_buffer")
    if core.over_capacity[0]:
        violations.append("offchip_capacity")
    step_s = float(core.step_s[0])
    energy = {k: float(v[0]) for k, v in core.energy.items()}
    step_j = sum(energy.values())
    return HwReport(
        device=dev.name, clock_mhz=float(accel.clock_mhz), weights=accel.resident, memory="+".join(accel.memory_names),
        batch=B, context_length=accel.context_length, prompt_length=accel.prompt_length,
        resources={r: float(core.used[r][0]) for r in RESOURCES},
        available={r: float(core.available[r]) for r in RESOURCES},
        utilisation={r: float(core.util[r][0]) for r in RESOURCES}, caps=core.caps, fits=not violations,
        violations=violations, constraint_violation=float(core.violation[0]), offchip_bytes=int(core.offchip[0]),
        offchip_capacity_bytes=int(core.capacity),
        weight_bytes_total=int(sum(v[0] for v in core.breakdown.values())),
        weight_bytes_breakdown={k: int(v[0]) for k, v in core.breakdown.items()},
        lm_head_shares_embedding=bool(core.lm_shares[0]),
        decode_ms_per_token=step_s * 1e3, decode_tokens_per_s=B / step_s,
        prefill_ms=(float(core.prefill_cycles[0]) / (accel.clock_mhz * 1e6) + float(core.prefill_host_s[0])) * 1e3,
        power_w=step_j / step_s, j_per_token=step_j / B, energy_breakdown_j=energy,
        engines=engines, layers=rows, kv_bits=accel.kv_bits, resident_bytes=int(core.resident_bytes[0]),
        weight_buffer_bytes=int(core.buffer_bytes), host_ms=float(core.host_s[0]) * 1e3, bytes_per_cycle=float(bpc),
        memory_bytes_per_s=dict(core.memory_bytes_per_s),
        power_breakdown_w={k: v / step_s for k, v in energy.items()},
    )
