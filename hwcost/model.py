"""The analytical accelerator model: ``estimate(plan, workload, accel) -> HwReport``.

Every figure is a formula below applied to a catalog entry
(``data/devices.yaml``) or a constant (``data/constants.yaml``, written ``C[...]``).

Per-format figures (storage bits with N:M index metadata, MAC lanes per DSP, LUT/FF per lane,
pJ per MAC) are in :mod:`hwcost.kernels`; this module combines them into engines, rows and totals.
The embedding table stays FP16 off-chip (one row read per decoded token). A tied
``lm_head`` the plan leaves FP16 is read from the embedding table (FP16, no extra storage).

What is monotone in storage (tested in tests/test_hwcost_properties.py):
* fewer weight bits (16 > 8 > 6 > 4 > 3 > 2 > ternary, same sparsity and group size) never
  increase a layer's bytes. One exception in the total: compressing a *tied* lm_head that was
  FP16 (shared with the embedding) stores a compressed copy next to the FP16 embedding table,
  which the input lookup keeps (the evaluator unties it the same way), so ``weight_bytes_total``
  grows by that copy, while the bytes read per decode step still shrink.
* more sparsity with the same M (N:M -> N':M, N' < N) never increases bytes: values, scales
  and index all shrink with N.
* dense -> N:M never increases bytes iff N*ceil(log2 M) <= (M-N)*value_bits, i.e. the index
  bits of the N kept weights fit in the value bits of the M-N pruned ones (equality: 2:4
  ternary = dense ternary). Otherwise values + index grow by (N*ceil(log2 M) - (M-N)*b)/M
  bits per weight, which the (smaller) saving in group scales offsets only in part or not at
  all: 3:4 INT4 = 3*(4+2)/4 = 4.5 bits/weight > 4, 15:16 FP16 = 18.75 > 16, 3:4 ternary = 3 > 2.
* across different M density does not order bytes: 7:16 INT4 (7*(4+4)/16 = 3.5 bits/weight)
  is larger than the denser 1:2 INT4 ((4+1)/2 = 2.5).

Datapath: one matrix-vector engine per distinct datapath (engine class, N:M pattern) in the
plan, time-multiplexed over the layers that use it. INT-k layers run on the engine of the widest
INT class with the same DSP packing C[macs_per_dsp] (int6 on the int8 lanes; int3 and int2 on the
int4 lanes, narrower weights sign-extended): the lanes are identical hardware, so lowering
8 -> 6 or 4 -> 3 -> 2 bits leaves the datapath unchanged. Attention's QK^T and AV products run
on the FP16 dense engine.
MAC lanes per DSP, LUT and FF per lane of each engine: :mod:`hwcost.kernels` (e.g. DSP48E2 with
8-bit activations: FP16 0.5, INT8/6 2, INT<=4 4 MACs per DSP; ternary A + ceil(log2 fan_in) LUTs,
no DSP; N:M adds an M:1 operand mux and the index decode per lane).
Budgets D, L = share * DSP, LUT after the shell.
Attention lanes (reserved first, on the FP16 engine): decode attention is a matrix-vector product
over the KV cache, heads / (kv_heads * C[kv_bytes_per_value]) MACs per cache byte, so it gets the
lanes that consume the cache at the memory bandwidth,
    att = ceil(bytes_per_cycle * heads / (kv_heads * C[kv_bytes_per_value])),
capped at C[attention_budget_cap] (0.5, assumption) of either budget and at least 1. They do not
depend on the context length, so one accelerator serves every context with the same lanes.
Linear engines share what is left. The rows of a decode step run one after another, so the
step's compute is sum_e kept_e / lanes_e; lanes minimise it under sum_e lanes_e * dsp_e <= D and
sum_e lanes_e * lut_e <= L (dsp_e = 1 / macs_per_dsp_e, 0 for ternary; lut_e = LUT per lane):
    lanes_e = floor(s * sqrt(kept_e / p_e)),  p_e = theta * dsp_e / D + (1 - theta) * lut_e / L
(Lagrange; theta in [0, 1] by grid + golden-section search, s the largest scale both budgets
allow; at least 1 lane). One engine alone gets min(D / dsp_e, L / lut_e) lanes.

What is monotone in decode latency (tested):
* lowering a layer's bits within one engine class (8 -> 6, 4 -> 3 -> 2) leaves every row's
  compute cycles unchanged, so it never increases latency (memory-bound or not);
  across engine classes (16 -> 8, 6 -> 4, 2 -> ternary) the layer moves to another engine whose
  lanes come out of the same budgets, so latency is only guaranteed not to increase when both
  plans are memory-bound (MLGRU recurrence rows aside). A memory-bound plan can get slower,
  for two reasons: (1) a real area trade-off: a new engine needs its own bandwidth-matched
  lanes, taken from the others, when the budget is nearly used up (a datapath that ran narrow
  weights on the wider engine's lanes would avoid it; this model builds one engine per class);
  (2) the square-root split minimises the compute sum, not sum_rows max(compute, memory), so
  it leaves a small new engine compute-bound even when a memory-aware split would keep every
  row memory-bound (e.g. LLaMA2-7B all FP16 on U250 at 100 MHz, 5 % DSP/LUT shares, efficiency
  0.3: one k_proj FP16 -> INT6 gets a 15-lane INT8 engine and the step goes 573.5 -> 583.2 ms).
  A memory-aware split is left for later.
* context length: lanes do not depend on it, so an MLGRU-only plan's decode latency is constant
  and a plan with an attention block gets strictly slower (KV read and MACs grow with L).

Per decode step (batch B sequences, one token each), per row of the report
    linear     macs = B*in*out, kept = B*kept_per_row*out, compute_cycles = kept / lanes_e,
               memory bytes = weight bytes if streamed else 0
    attention  macs = B*2*heads*head_dim*L (L = context_length), on the FP16 engine,
               + softmax B*heads*L*C[softmax_ops_per_score] / C[special_function_unit.lanes];
               kv_bytes = B * 2*kv_heads*head_dim*L * C[kv_bytes_per_value]  (L counts the decoded
               token, whose K and V are written while the L-1 cached ones are read)
    mlgru      no KV cache (state on chip); B*hidden*C[mlgru_ops_per_channel] / SFU lanes cycles
    embedding  B * hidden * 2 bytes (one FP16 row per token)
    memory_cycles = bytes / (peak GB/s * 1e9 * mem_efficiency / (clock MHz * 1e6))
    row cycles = max(compute, memory), bound = the larger; step cycles = sum of rows
    decode_ms_per_token = step cycles / clock (ms per decode step); tokens/s = B / step seconds
Prefill of P = prompt_length tokens: weights read once (if streamed), P times the MACs
(attention: causal, sum_{t=1..P} t keys), KV written once; rows summed with the same max().

Resources: engines + C[infrastructure] + C[special_function_unit]; BRAM36 for two
ping-pong activation buffers of B*max(in_features) FP16 values and the MLGRU states;
resident weights spread over URAM and BRAM in proportion to the bits their shares
offer (URAM 288 Kib, BRAM36 36 Kib). utilisation = used / (available * (1 - shell_overhead));
fits = every utilisation <= C[utilisation_caps] and off-chip bytes (embedding, KV cache,
streamed weights) <= capacity * C[offchip_capacity_cap].
constraint_violation = max(0, max_r(util_r / cap_r - 1), offchip_util / cap - 1) (<= 0 feasible).

Energy per decode step, J: static_w * step_s
    + kept MACs * pJ/MAC(class) * C[fpga_overhead]      (Horowitz 45 nm: fp16 fmul16+fadd16,
                                                          INT-k mul8*(k*A/64)+add32, ternary add8;
                                                          the layer's own class, also on wider lanes)
    + off-chip bytes * 8 * C[offchip_pj_per_bit][memory]
    + on-chip bytes (resident weights, activation buffers) * sram_read32/4 * C[fpga_overhead];
j_per_token = step energy / B; power_w = step energy / step_s.
The special-function unit's energy is not modelled in this version.

Batches: :func:`estimate_batch` evaluates P plans of one workload at once. A :class:`PlanBatch`
holds each plan as arrays over the workload's :class:`Layout` rows (kernel class, N, M, group
size) and blocks (MLGRU or attention). The core picks each plan's rows into layout slots (a
block's mixer slots hold its attention or its MLGRU projections) and runs every formula above on
[P, slots] and [P, engines] arrays, lane sizing included. :func:`estimate` is the same core on a batch of one, plus the
per-row and per-engine tables of :class:`HwReport`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from dse.arch import LinearLayer, Workload, check_plan
from dse.plan import FP16, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import kernels
from hwcost.accelerator import Accelerator
from hwcost.devices import BRAM36_BITS, URAM_BITS, constants
from hwcost.kernels import KERNELS

RESOURCES = ("lut", "ff", "dsp", "bram36", "uram")
_CAP_KEY = {"lut": "lut", "ff": "ff", "dsp": "dsp", "bram36": "bram", "uram": "uram"}
_FP16 = KERNELS.index("fp16")

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
    (dense 1, 1), integers; ``group`` [P, R]: INT group size (float array); ``mlgru`` [P, blocks]: the block's mixer is an
    MLGRU. An MLGRU projection's entries are used only when its block is an MLGRU, an attention
    projection's only when it is not. Build one with :meth:`from_plans`, or fill the arrays directly
    (a search can map its choices to them without building :class:`ModelPlan` objects).
    """

    workload: Workload
    kernel: np.ndarray
    n: np.ndarray
    m: np.ndarray
    group: np.ndarray
    mlgru: np.ndarray

    def __len__(self) -> int:
        return self.kernel.shape[0]

    @staticmethod
    def empty(workload: Workload, size: int) -> "PlanBatch":
        """``size`` plans with every layer FP16 dense and the model's own mixer in every block."""
        lay = layout(workload)
        shape = (size, len(lay.layers))
        return PlanBatch(workload, np.full(shape, _FP16), np.ones(shape, dtype=int), np.ones(shape, dtype=int),
                         np.full(shape, float(FP16.group_size)),
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
                batch.kernel[p, rows], batch.n[p, rows], batch.m[p, rows], batch.group[p, rows] = codes
            for bp in plan.blocks:
                batch.mlgru[p, bp.index] = bp.mixer == "mlgru"
            if lay.has_attention:  # substituted MLGRU projections the plan does not name inherit
                named = {lay.row[lp.name] for lp in plan.layers}
                for r in np.flatnonzero((lay.kind == 2) & batch.mlgru[p][lay.block]):
                    if r not in named:
                        src = lay.inherit[r]
                        for arr in (batch.kernel, batch.n, batch.m, batch.group):
                            arr[p, r] = arr[p, src]
        return batch



@lru_cache(maxsize=None)
def _layer_codes(sparsity: Sparsity | None, fmt: WeightFormat) -> tuple[int, int, int, int]:
    """(kernel index, N, M, group size) of a layer plan; dense is N = M = 1."""
    n, m = (1, 1) if sparsity is None else (sparsity.n, sparsity.m)
    return KERNELS.index(kernels.kernel_class(fmt)), n, m, fmt.group_size


# ---------------------------------------------------------------------------- report types
@dataclass
class EngineCost:
    """One matrix-vector engine: ``lanes`` MACs/cycle and the resources they take.

    ``kept_macs``: MACs per decode step it computes (attention over the context included);
    ``attention_lanes``: lanes of the FP16 engine reserved for attention; ``lut_per_lane``/``ff_per_lane``
    in LUT/FF; ``macs_per_dsp`` 0 for LUT-only (ternary) engines; ``pj_per_mac`` in pJ at 45 nm.
    """

    label: str
    kernel: str
    sparsity: str
    lanes: int = 0
    kept_macs: float = 0.0
    macs_per_dsp: float = 0.0
    lut_per_lane: float = 0.0
    ff_per_lane: float = 0.0
    pj_per_mac: float = 0.0
    fan_in: int = 0
    attention_lanes: int = 0
    dsp: int = 0
    lut: int = 0
    ff: int = 0

    @property
    def uses_dsp(self) -> bool:
        return self.macs_per_dsp > 0


@dataclass
class LayerCost:
    """One row of the per-layer breakdown, per decode step (batch B).

    ``macs`` dense-equivalent MACs, ``kept_macs`` computed MACs; ``weight_bytes`` the
    layer's stored weights; ``kv_bytes`` KV cache read; ``memory_bytes`` off-chip bytes
    read; ``compute_cycles`` / ``memory_cycles`` datapath cycles; ``bound`` compute|memory.
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

    @property
    def cycles(self) -> float:
        return max(self.compute_cycles, self.memory_cycles)


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
    utilisation: used / available-after-shell; bytes; ms; tokens/s; W; J.
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
        d = dict(d)
        d["engines"] = [EngineCost(**e) for e in d.get("engines", [])]
        d["layers"] = [LayerCost(**row) for row in d.get("layers", [])]
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
_GOLDEN_STEPS = 30


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
    return raw / use[..., None], use * (sqrt_kept * sqrt_price).sum(-1)


def size_lanes(kept: np.ndarray, dsp_cost: np.ndarray, lut_cost: np.ndarray,
               dsp_budget: np.ndarray, lut_budget: np.ndarray) -> np.ndarray:
    """Integer lanes [P, E] minimising the compute cycles of one decode step, sum_e kept_e / lanes_e.

    The rows of a decode step run one after another, each on its engine, so the engines are
    time-multiplexed in sequence and the step's compute is sum_e kept_e / lanes_e. Minimising it
    under sum_e lanes_e * dsp_e <= D and sum_e lanes_e * lut_e <= L (dsp_e = 1 / macs_per_dsp,
    0 for ternary; lut_e = lut_per_lane) gives lanes_e = s * sqrt(kept_e / p_e) with the price
    p_e = theta * dsp_e / D + (1 - theta) * lut_e / L (Lagrange); theta in [0, 1] by a 17-point
    grid and golden-section search (theta = 0 when no DSP engine is used), s the largest scale
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

    grid = np.linspace(0.0, 1.0, 17)
    best = cost(np.broadcast_to(grid, (len(kept), len(grid)))).argmin(1)
    lo, hi = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(_GOLDEN_STEPS):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        ab = cost(np.stack([a, b], axis=1))
        left = ab[:, 0] <= ab[:, 1]
        hi, lo = np.where(left, b, hi), np.where(left, lo, a)
    candidates = np.stack([lo, hi, grid[best]], axis=1)
    theta = np.where(uses_dsp, candidates[rows, cost(candidates).argmin(1)], 0.0)
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
    present: np.ndarray         # [P, S] the slot holds a row
    kept: np.ndarray            # [P, S] kept MACs per decode step (batch B)
    nbytes: np.ndarray          # [P, S] stored bytes
    compute: np.ndarray         # [P, S] cycles
    memory_bytes: np.ndarray    # [P, S]
    engines: _Engines
    attention_row: tuple        # (macs, kv_bytes, compute cycles) of one attention block, per plan [P]
    mlgru_cycles: float         # one MLGRU recurrence row
    embedding_bytes: float      # off-chip bytes of the embedding row
    n_attention: np.ndarray     # [P]
    n_mlgru: np.ndarray         # [P]
    step_cycles: np.ndarray
    prefill_cycles: np.ndarray
    bytes_per_cycle: float
    used: dict[str, np.ndarray]
    available: dict[str, float]
    caps: dict[str, float]
    util: dict[str, np.ndarray]
    violation: np.ndarray
    offchip: np.ndarray
    capacity: int
    over_capacity: np.ndarray
    breakdown: dict[str, np.ndarray]
    lm_shares: np.ndarray
    energy: dict[str, np.ndarray]
    step_s: np.ndarray


def _engines(batch: PlanBatch, kernel: np.ndarray, n: np.ndarray, m: np.ndarray, present: np.ndarray,
             kept: np.ndarray, kept_row: np.ndarray, accel: Accelerator, has_attn: np.ndarray) -> _Engines:
    """Group the rows of each plan ([P, S] arrays) into engines (engine class, N:M) and size their lanes."""
    c = constants()
    dev = accel.dev
    A = accel.act_bits
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
    lut = np.stack([kernels.lane_lut(k, eng_m[e], fan_in[:, e], dev.dsp_kind, A) * np.ones(P)
                    for e, k in enumerate(cls)], axis=1)
    ff = np.stack([kernels.lane_ff(k, lut[:, e]) for e, k in enumerate(cls)], axis=1)
    fp16 = int(engine_of_code[fp16_code])
    if fp16 >= 0:
        fan_in[:, fp16] = np.maximum(fan_in[:, fp16], np.where(kept[:, fp16] > 0, 0, batch.workload.head_dim))

    avail = dev.available()
    dsp_budget = np.full(P, accel.dsp_share * avail["dsp"])
    lut_budget = np.full(P, accel.lut_share * avail["lut"])
    att = np.zeros(P, dtype=int)
    if fp16 >= 0:  # bandwidth-matched attention lanes, reserved first: the same for every context length
        mpd16, lut16 = mpd[fp16], lut[:, fp16]
        cap = float(c["attention_budget_cap"]) * np.minimum(dsp_budget * mpd16, lut_budget / lut16)
        want = math.ceil(attention_lanes(batch.workload, accel.bytes_per_cycle, int(c["kv_bytes_per_value"])))
        att = np.where(has_attn, np.maximum(1, np.minimum(want, np.floor(cap))), 0).astype(int)
        dsp_budget = dsp_budget - att / mpd16
        lut_budget = lut_budget - att * lut16
    dsp_cost = np.where(mpd > 0, 1.0 / np.where(mpd > 0, mpd, 1.0), 0.0)
    lanes = size_lanes(kept, dsp_cost[None, :], lut, dsp_budget, lut_budget)
    if fp16 >= 0:
        lanes[:, fp16] += att
    e = _Engines(cls=cls, n=eng_n, m=eng_m, of_row=of_row, kept=kept, fan_in=fan_in, macs_per_dsp=mpd,
                 lut_per_lane=lut, ff_per_lane=ff, lanes=lanes, attention=att, fp16=fp16)
    e.dsp = np.where(mpd > 0, np.ceil(lanes / np.where(mpd > 0, mpd, 1.0)), 0).astype(int)
    e.lut = np.ceil(lanes * lut).astype(int)
    e.ff = np.ceil(lanes * ff).astype(int)
    return e


def _core(batch: PlanBatch, accel: Accelerator) -> _Core:
    """The cost model on a batch of plans (formulas in the module docstring)."""
    clock = accel.clock_mhz
    if isinstance(clock, bool) or not isinstance(clock, (int, float)) or not 0 < clock < math.inf:
        raise ValueError(f"hardware.clock_mhz: {clock!r} is not a positive number of MHz")
    c = constants()
    w = batch.workload
    lay = layout(w)
    dev = accel.dev
    mem = dev.memory(accel.memory_kind)
    clock_hz = accel.clock_mhz * 1e6
    bpc = accel.bytes_per_cycle
    B, L, P = accel.batch, accel.context_length, accel.prompt_length
    streamed = accel.weights == "streamed"
    kv_value = int(c["kv_bytes_per_value"])
    act_bytes = int(c["activation_bytes"])
    sfu = c["special_function_unit"]
    sfu_lanes = float(sfu["lanes"])
    nP = len(batch)

    # -- the rows of each plan (one per layout slot: the mixer's by its block's mixer), their choices
    R = len(lay.layers)
    rows = np.where(batch.mlgru[:, lay.slot_block], lay.slot_mlgru, lay.slot_attention)  # [P, S]; R: no row
    present = rows < R
    rows_c = np.minimum(rows, R - 1)
    kernel, n, m, group = (np.take_along_axis(a, rows_c, 1) for a in (batch.kernel, batch.n, batch.m, batch.group))
    in_f, out_f = (np.append(x, 0.0)[rows] for x in (lay.in_f, lay.out_f))
    m_fails = lay.in_f % np.arange(1, int(m.max()) + 1)[:, None] != 0  # [M, R]: M does not divide in_features
    bad = m_fails[m - 1, rows_c] & present
    if bad.any():
        p, r = np.argwhere(bad)[0]
        raise ValueError(f"layer {lay.layers[rows[p, r]].name}: M={m[p, r]} does not divide in_features "
                         f"{int(in_f[p, r])} (plan {p} of the batch)")
    # -- kept MACs and storage
    bits = np.array([16.0] + [float(k[3:]) for k in KERNELS[1:-1]] + [float(c["ternary"]["bits_per_weight"])])[kernel]
    scales = np.array([kernels.SCALES_NONE] + [kernels.SCALES_GROUP] * (len(KERNELS) - 2)
                      + [kernels.SCALES_TENSOR])[kernel]
    *_, total_bits, kept_row = kernels.storage_bits_arrays(in_f, out_f, n, m, bits, group, scales)
    kept = B * kept_row * out_f
    nbytes = np.where(present, np.ceil(total_bits / 8), 0.0)
    n_mlgru = batch.mlgru.sum(1)
    n_attn = w.num_layers - n_mlgru
    has_attn = n_attn > 0

    eng = _engines(batch, kernel, n, m, present, kept, kept_row, accel, has_attn)
    lanes_row = np.take_along_axis(eng.lanes, np.maximum(eng.of_row, 0), axis=1)
    compute = kept / np.maximum(lanes_row, 1)  # 0 in empty slots (no kept MACs)
    read = nbytes if streamed else np.zeros_like(nbytes)
    rows_cycles = np.maximum(compute, read / bpc).sum(1)
    prefill = np.maximum(P * compute, read / bpc).sum(1)

    # -- weight bytes
    lm = lay.lm_head
    lm_shares = np.full(nP, w.tied_embeddings) & (batch.kernel[:, lm] == _FP16) & (batch.m[:, lm] == 1)
    lm_bytes = nbytes[:, int(np.flatnonzero(lay.slot_attention == lm)[0])]
    embed_bytes = w.embedding_params() * 2
    breakdown = {"linear": nbytes.sum(1) - lm_bytes, "lm_head": np.where(lm_shares, 0.0, lm_bytes),
                 "embedding": np.full(nP, float(embed_bytes))}

    # -- embedding, attention and MLGRU rows
    row_bytes = w.embedding_row_values() * 2
    embedding_bytes = float(B * row_bytes)
    kv_token = w.kv_bytes_per_token(kv_value)
    attn_macs = B * 2 * w.heads * w.head_dim * L  # per attention block per decode step
    lanes16 = eng.lanes[:, eng.fp16] if eng.fp16 >= 0 else np.ones(nP)
    sm = c["softmax_ops_per_score"] / sfu_lanes
    causal = P * (P + 1) / 2  # keys attended over a causal prompt of P tokens
    kv_read = float(B * L * kv_token)
    attn_compute = attn_macs / np.maximum(lanes16, 1) + B * w.heads * L * sm
    attn_cycles = np.maximum(attn_compute, kv_read / bpc)
    attn_prefill = np.maximum(B * 2 * w.heads * w.head_dim * causal / np.maximum(lanes16, 1)
                              + B * w.heads * causal * sm, B * P * kv_token / bpc)
    mlgru_cycles = B * w.hidden * c["mlgru_ops_per_channel"] / sfu_lanes
    step_cycles = embedding_bytes / bpc + rows_cycles + n_attn * attn_cycles + n_mlgru * mlgru_cycles
    prefill_cycles = B * P * row_bytes / bpc + prefill + n_attn * attn_prefill + n_mlgru * P * mlgru_cycles
    if eng.fp16 >= 0:
        eng.kept[:, eng.fp16] += attn_macs * n_attn
    step_s = step_cycles / clock_hz

    # -- resources
    max_in = in_f.max(1)
    buffer_bits = 2 * B * max_in * act_bytes * 8 + B * n_mlgru * w.hidden * act_bytes * 8
    infra = c["infrastructure"]
    used = {"lut": eng.lut.sum(1) + infra["lut"] + sfu["lut"], "ff": eng.ff.sum(1) + infra["ff"] + sfu["ff"],
            "dsp": eng.dsp.sum(1) + infra["dsp"] + sfu["dsp"],
            "bram36": infra["bram36"] + np.ceil(buffer_bits / BRAM36_BITS), "uram": np.zeros(nP)}
    avail = dev.available()
    resident = np.zeros(nP) if streamed else breakdown["linear"] + lm_bytes
    if not streamed:
        uram_budget = accel.uram_share * avail["uram"] * URAM_BITS
        bram_budget = accel.bram_share * avail["bram36"] * BRAM36_BITS
        frac_uram = uram_budget / (uram_budget + bram_budget) if uram_budget + bram_budget > 0 else 0.0
        used["uram"] = np.ceil(resident * 8 * frac_uram / URAM_BITS)
        used["bram36"] = used["bram36"] + np.ceil(resident * 8 * (1 - frac_uram) / BRAM36_BITS)
    used = {r: np.asarray(v, dtype=float) * np.ones(nP) for r, v in used.items()}
    caps = {r: float(c["utilisation_caps"][_CAP_KEY[r]]) for r in RESOURCES}
    util = {r: (used[r] / avail[r] if avail[r] > 0 else np.where(used[r] == 0, 0.0, 1e9)) for r in RESOURCES}
    violation = np.max(np.stack([np.zeros(nP)] + [util[r] / caps[r] - 1.0 for r in RESOURCES]), axis=0)

    kv_capacity = B * n_attn * L * kv_token
    offchip = embed_bytes + kv_capacity + (breakdown["linear"] + breakdown["lm_head"] if streamed else 0.0)
    cap_off = mem.capacity_bytes * float(c["offchip_capacity_cap"])
    over = offchip > cap_off
    violation = np.maximum(violation, offchip / cap_off - 1.0)

    # -- energy per decode step
    overhead = float(c["fpga_overhead"])
    sram_pj_per_byte = c["energy_pj_45nm"]["sram_read32"] / 4.0
    pj = np.array([kernels.pj_per_mac(k, accel.act_bits) for k in KERNELS])
    compute_pj = (kept * pj[kernel]).sum(1) + attn_macs * n_attn * pj[_FP16]
    offchip_bytes = embedding_bytes + read.sum(1) + n_attn * kv_read
    act_traffic = (B * act_bytes * (in_f + out_f)).sum(1)
    energy = {"static": dev.static_w * step_s, "compute": compute_pj * overhead * 1e-12,
              "offchip": offchip_bytes * 8 * c["offchip_pj_per_bit"][mem.kind] * 1e-12,
              "onchip": (resident + act_traffic) * sram_pj_per_byte * overhead * 1e-12}

    return _Core(rows=rows, present=present, kept=kept, nbytes=nbytes, compute=compute, memory_bytes=read, engines=eng,
                 attention_row=(attn_macs, kv_read, attn_compute), mlgru_cycles=mlgru_cycles,
                 embedding_bytes=embedding_bytes, n_attention=n_attn, n_mlgru=n_mlgru, step_cycles=step_cycles,
                 prefill_cycles=prefill_cycles, bytes_per_cycle=bpc, used=used, available=avail, caps=caps,
                 util=util, violation=violation, offchip=offchip, capacity=mem.capacity_bytes, over_capacity=over,
                 breakdown=breakdown, lm_shares=lm_shares, energy=energy, step_s=step_s)


# ---------------------------------------------------------------------------- public entry points
def estimate_batch(batch: PlanBatch, accel: Accelerator) -> BatchReport:
    """Cost of every plan of ``batch`` on ``accel``, vectorised over the plans: the same code, formulas
    and numbers as :func:`estimate` plan by plan (``PlanBatch.from_plans(plans, workload)`` builds a batch)."""
    core = _core(batch, accel)
    step_j = sum(core.energy.values())
    B = accel.batch
    return BatchReport(
        decode_ms_per_token=core.step_s * 1e3, decode_tokens_per_s=B / core.step_s,
        prefill_ms=core.prefill_cycles / (accel.clock_mhz * 1e6) * 1e3, power_w=step_j / core.step_s,
        j_per_token=step_j / B, weight_bytes_total=sum(core.breakdown.values()),
        fits=np.all([core.util[r] <= core.caps[r] for r in RESOURCES], axis=0) & ~core.over_capacity,
        constraint_violation=core.violation, resources=core.used, utilisation=core.util)


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
def _layer_label(cls: str, n: int, m: int, group: int) -> str:
    name = "16" if cls == "fp16" else ("ternary" if cls == "ternary" else cls[3:])
    return LayerPlan("x", None if m == 1 else Sparsity(n, m), WeightFormat(name, group)).label


def _report(core: _Core, batch: PlanBatch, accel: Accelerator) -> HwReport:
    """The detailed :class:`HwReport` of plan 0 of a core evaluation."""
    w = batch.workload
    lay = layout(w)
    dev = accel.dev
    eng = core.engines
    B = accel.batch
    bpc = core.bytes_per_cycle

    rows: list[LayerCost] = []

    def add(row: LayerCost) -> None:
        row.memory_cycles = row.memory_bytes / bpc
        row.bound = "compute" if row.compute_cycles > row.memory_cycles else "memory"
        rows.append(row)

    kernel, n, m, group = (x[0].tolist() for x in (batch.kernel, batch.n, batch.m, batch.group))
    kept, nbytes, read, compute = (x[0].tolist() for x in (core.kept, core.nbytes, core.memory_bytes, core.compute))

    def add_linear(s: int, r: int) -> None:
        layer = lay.layers[r]
        add(LayerCost(layer.name, _layer_label(KERNELS[kernel[r]], n[r], m[r], int(group[r])), layer.block,
                      macs=B * layer.in_features * layer.out_features, kept_macs=kept[s], weight_bytes=int(nbytes[s]),
                      memory_bytes=read[s], compute_cycles=compute[s]))

    attn_macs, kv_read, attn_compute = core.attention_row
    add(LayerCost(w.embedding_name, "embedding fp16", None, memory_bytes=core.embedding_bytes))
    slots = [(s, r) for s, r in enumerate(core.rows[0].tolist()) if r < len(lay.layers)]
    for k, (s, r) in enumerate(slots):
        add_linear(s, r)
        block = lay.layers[r].block
        last_of_mixer = lay.kind[r] != 0 and (k + 1 == len(slots) or lay.kind[slots[k + 1][1]] == 0)
        if not last_of_mixer:
            continue
        if batch.mlgru[0, block]:  # the token mixer's own row after its projections
            add(LayerCost(w.mlgru_module(block), "mlgru", block, compute_cycles=float(core.mlgru_cycles)))
        else:
            add(LayerCost(w.attention_module(block), "attention fp16", block, macs=attn_macs,
                          kept_macs=attn_macs, kv_bytes=int(kv_read), memory_bytes=kv_read,
                          compute_cycles=float(attn_compute[0])))

    engines: list[EngineCost] = []
    order = list(dict.fromkeys(int(eng.of_row[0, s]) for s, _ in slots))
    if eng.fp16 >= 0 and core.n_attention[0] > 0 and eng.fp16 not in order:
        order.append(eng.fp16)
    for e in order:
        cls, n, m = eng.cls[e], int(eng.n[e]), int(eng.m[e])
        sp = "dense" if m == 1 else f"{n}:{m}"
        engines.append(EngineCost(
            label=cls if m == 1 else f"{sp} {cls}", kernel=cls, sparsity=sp, lanes=int(eng.lanes[0, e]),
            kept_macs=float(eng.kept[0, e]), macs_per_dsp=float(eng.macs_per_dsp[e]),
            lut_per_lane=float(eng.lut_per_lane[0, e]), ff_per_lane=float(eng.ff_per_lane[0, e]),
            pj_per_mac=kernels.pj_per_mac(cls, accel.act_bits), fan_in=int(eng.fan_in[0, e]),
            attention_lanes=int(eng.attention[0]) if e == eng.fp16 else 0,
            dsp=int(eng.dsp[0, e]), lut=int(eng.lut[0, e]), ff=int(eng.ff[0, e])))

    violations = [r for r in RESOURCES if core.util[r][0] > core.caps[r]]
    if core.over_capacity[0]:
        violations.append("offchip_capacity")
    step_s = float(core.step_s[0])
    energy = {k: float(v[0]) for k, v in core.energy.items()}
    step_j = sum(energy.values())
    return HwReport(
        device=dev.name, clock_mhz=float(accel.clock_mhz), weights=accel.weights, memory=accel.memory_kind,
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
        prefill_ms=float(core.prefill_cycles[0]) / (accel.clock_mhz * 1e6) * 1e3,
        power_w=step_j / step_s, j_per_token=step_j / B, energy_breakdown_j=energy,
        engines=engines, layers=rows,
    )
