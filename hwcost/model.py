"""The analytical accelerator model: ``estimate(plan, workload, accel) -> HwReport``.

First version. Every figure is a formula below applied to a catalog entry
(``data/devices.yaml``) or a constant (``data/constants.yaml``, written ``C[...]``).

Weight storage of a linear layer (in x out, N:M sparsity, format), bits
    kept_per_row = in / M * N                         (dense: in; M must divide in, else ValueError)
    values       = kept_per_row * out * value_bits    (16 fp16, k for INT-k,
                                                        C[ternary.bits_per_weight] = 2 for ternary)
    scales       = ceil(kept_per_row / group_size) * out * 16   (INT-k, groups of kept values
                                                        along the input dim); 16 per tensor (ternary)
    index        = in / M * out * N * ceil(log2 M)              (N:M index metadata)
    e.g. 2:4 INT4: per 4 weights 2*4 value + 2*2 index bits = 3 bits/weight.
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
    MAC lanes per DSP      C[macs_per_dsp][dsp_kind][class] (FP16 0.5, INT8/6 2, INT<=4 4)
    LUT per lane (DSP)     C[lane_lut][dsp_kind][fp16|int]
    LUT per lane (ternary) A + ceil(log2 fan_in), no DSP (A = C[activation_bits.ternary])
    N:M extra LUT per lane A * ceil((M-1)/3) (M:1 operand mux, a LUT6 is a 4:1 mux)
                           + ceil(log2 M)     (index decode)
    FF per lane            C[ff_per_lut] * LUT per lane + C[lane_ff_extra][class]
Budgets D, L = share * DSP, LUT after the shell.
Attention lanes (reserved first, on the FP16 engine): decode attention is a matrix-vector product
over the KV cache, heads / (kv_heads * C[kv_bytes_per_value]) MACs per cache byte, so it gets the
lanes that consume the cache at the memory bandwidth,
    att = ceil(bytes_per_cycle * heads / (kv_heads * C[kv_bytes_per_value])),
capped at ATTENTION_BUDGET_CAP (0.5, assumption) of either budget and at least 1. They do not
depend on the context length, so one accelerator serves every context with the same lanes.
Linear engines share what is left. The rows of a decode step run one after another, so the
step's compute is sum_e kept_e / lanes_e; lanes minimise it under sum_e lanes_e * dsp_e <= D and
sum_e lanes_e * lut_e <= L (dsp_e = 1 / macs_per_dsp_e, 0 for ternary; lut_e = LUT per lane):
    lanes_e = floor(s * sqrt(kept_e / p_e)),  p_e = theta * dsp_e / D + (1 - theta) * lut_e / L
(Lagrange; theta in [0, 1] by grid + golden-section search, s the largest scale both budgets
allow; at least 1 lane). One engine alone gets min(D / dsp_e, L / lut_e) lanes.
(Until this version lanes were split in proportion to kept MACs, lanes_e = kept_e / T, which
is right for engines running concurrently but not for rows summed in sequence: a plan adding
one INT3 layer to an FP16 LLaMA-7B gave the INT3 engine 1 lane, 16.7 M cycles for that layer.)

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from dse.plan import FP16, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost.accelerator import Accelerator
from hwcost.devices import BRAM36_BITS, URAM_BITS, constants
from hwcost.workload import Workload

RESOURCES = ("lut", "ff", "dsp", "bram36", "uram")
_DENSE_FP16 = LayerPlan("", None, FP16)  # what an unnamed layer gets
ATTENTION_BUDGET_CAP = 0.5
"""Assumption: attention's bandwidth-matched lanes take at most this share of the DSP and LUT budgets."""
_CAP_KEY = {"lut": "lut", "ff": "ff", "dsp": "dsp", "bram36": "bram", "uram": "uram"}

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


# ---------------------------------------------------------------------------- storage
def index_bits_per_group(sparsity: Sparsity | None) -> int:
    """N:M index metadata bits per group of M weights: N * ceil(log2 M) (0 when dense)."""
    return 0 if sparsity is None else sparsity.n * math.ceil(math.log2(sparsity.m))


def value_bits(fmt: WeightFormat) -> float:
    """Bits of one stored kept weight: 16 (fp16), k (INT-k), C[ternary.bits_per_weight] (ternary)."""
    if fmt.is_ternary:
        return float(constants()["ternary"]["bits_per_weight"])
    return float(fmt.bits)


def kept_per_row(in_features: int, sparsity: Sparsity | None) -> int:
    """Kept weights per output row: ceil(in / M) * N, capped at in (dense: in)."""
    if sparsity is None:
        return in_features
    return min(in_features, math.ceil(in_features / sparsity.m) * sparsity.n)


def storage_bits(in_features: int, out_features: int, sparsity: Sparsity | None,
                 fmt: WeightFormat) -> dict[str, float]:
    """Bits of one linear layer's stored weights: ``values``, ``scales``, ``index`` and ``total``."""
    kept = kept_per_row(in_features, sparsity)
    values = kept * out_features * value_bits(fmt)
    scale_bits = constants()["scale_bits"]
    if fmt.is_float:
        scales = 0
    elif fmt.is_ternary:
        scales = scale_bits
    else:
        scales = math.ceil(kept / fmt.group_size) * out_features * scale_bits
    index = 0
    if sparsity is not None:
        index = math.ceil(in_features / sparsity.m) * out_features * index_bits_per_group(sparsity)
    return {"values": values, "scales": scales, "index": index, "total": values + scales + index}


@lru_cache(maxsize=4096)
def storage_bytes(in_features: int, out_features: int, sparsity: Sparsity | None, fmt: WeightFormat) -> int:
    """Bytes of one linear layer's stored weights: ceil(total bits / 8)."""
    return math.ceil(storage_bits(in_features, out_features, sparsity, fmt)["total"] / 8)


# ---------------------------------------------------------------------------- kernels
@lru_cache(maxsize=None)
def kernel_class(fmt: WeightFormat) -> str:
    """``fp16``, ``int8`` .. ``int2`` or ``ternary``."""
    return "fp16" if fmt.is_float else ("ternary" if fmt.is_ternary else f"int{fmt.bits}")


@lru_cache(maxsize=None)
def engine_class(cls: str, dsp_kind: str) -> str:
    """The kernel class whose engine runs layers of class ``cls``: the widest INT class with the same
    DSP packing (C[macs_per_dsp][dsp_kind]) for INT-k, e.g. int6 -> int8, int3 and int2 -> int4 on
    DSP48E2 (narrower weights sign-extended into the same lanes); fp16 and ternary run on their own."""
    if cls in ("fp16", "ternary"):
        return cls
    packing = constants()["macs_per_dsp"][dsp_kind]
    same = [k for k in packing if k.startswith("int") and packing[k] == packing[cls]]
    return max(same, key=lambda k: int(k[3:]))


def activation_bits(cls: str) -> int:
    """Bits of the activation operand of a kernel class (C[activation_bits])."""
    key = cls if cls in ("fp16", "ternary") else "int"
    return int(constants()["activation_bits"][key])


def pj_per_mac(cls: str) -> float:
    """Energy of one MAC at 45 nm (Horowitz ISSCC 2014), pJ, before C[fpga_overhead].

    fp16: fmul16 + fadd16; INT-k: mul8 * (k * A) / 64 + add32 (array multiplier energy
    ~ product of operand widths, A = activation bits); ternary: add8 (no multiply).
    """
    e = constants()["energy_pj_45nm"]
    if cls == "fp16":
        return e["fmul16"] + e["fadd16"]
    if cls == "ternary":
        return e["add8"]
    bits = int(cls[3:])
    return e["mul8"] * bits * activation_bits(cls) / 64.0 + e["add32"]


def nm_lut_per_lane(cls: str, sparsity: Sparsity | None) -> float:
    """Extra LUTs per lane for N:M: A * ceil((M-1)/3) operand-mux LUT6 + ceil(log2 M) index decode."""
    if sparsity is None:
        return 0.0
    c = constants()
    per_lut = int(c["nm_mux_inputs_per_lut6"]) - 1
    select_bits = math.ceil(math.log2(sparsity.m))
    return (activation_bits(cls) * math.ceil((sparsity.m - 1) / per_lut)
            + select_bits * c["nm_index_decode_lut_per_index_bit"])


@lru_cache(maxsize=None)
def _label(sparsity: Sparsity | None, fmt: WeightFormat) -> str:
    return LayerPlan("x", sparsity, fmt).label


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


def _engine(cls: str, sparsity: Sparsity | None, fan_in: int, dsp_kind: str) -> EngineCost:
    c = constants()
    sp = "dense" if sparsity is None else str(sparsity)
    label = cls if sparsity is None else f"{sparsity} {cls}"
    if cls == "ternary":
        mpd = 0.0
        base = activation_bits(cls) + math.ceil(math.log2(max(fan_in, 2)))
    else:
        mpd = float(c["macs_per_dsp"][dsp_kind][cls])
        base = float(c["lane_lut"][dsp_kind]["fp16" if cls == "fp16" else "int"])
    lut = base + nm_lut_per_lane(cls, sparsity)
    extra = c["lane_ff_extra"]["fp16" if cls == "fp16" else ("ternary" if cls == "ternary" else "int")]
    return EngineCost(label=label, kernel=cls, sparsity=sp, macs_per_dsp=mpd, lut_per_lane=lut,
                      ff_per_lane=c["ff_per_lut"] * lut + extra, pj_per_mac=pj_per_mac(cls), fan_in=fan_in)


_LANE_GUARD = 1e-9  # relative: a lane count a budget affords exactly is not lost to float rounding


def _sqrt_lanes(kept: list[float], dsp_cost: list[float], lut_cost: list[float],
                dsp_budget: float, lut_budget: float, theta: float) -> tuple[list[float], float]:
    """Continuous lanes x_e = s * sqrt(kept_e / p_e) for the price p_e = theta*dsp_e/D + (1-theta)*lut_e/L,
    scaled by s so that both budgets hold; returns (lanes, sum_e kept_e / x_e)."""
    raw = [math.sqrt(k / max(theta * d / dsp_budget + (1.0 - theta) * lu / lut_budget, 1e-300))
           for k, d, lu in zip(kept, dsp_cost, lut_cost)]
    use = max(sum(d * r for d, r in zip(dsp_cost, raw)) / dsp_budget,
              sum(lu * r for lu, r in zip(lut_cost, raw)) / lut_budget)
    lanes = [r / use for r in raw]
    return lanes, sum(k / x for k, x in zip(kept, lanes))


def size_engines(engines: list[EngineCost], dsp_budget: float, lut_budget: float) -> float:
    """Lanes minimising the compute cycles of one decode step, sum_e kept_e / lanes_e; returns that sum.

    The rows of a decode step run one after another, each on its engine, so the engines are
    time-multiplexed in sequence and the step's compute is sum_e kept_e / lanes_e. Minimising it
    under sum_e lanes_e * dsp_e <= D and sum_e lanes_e * lut_e <= L (dsp_e = 1 / macs_per_dsp,
    0 for ternary; lut_e = lut_per_lane) gives lanes_e = s * sqrt(kept_e / p_e) with the price
    p_e = theta * dsp_e / D + (1 - theta) * lut_e / L (Lagrange); theta in [0, 1] by a grid and
    golden-section search, s the largest scale both budgets allow. One engine gets
    min(D / dsp_e, L / lut_e) lanes. lanes_e = max(1, floor(x_e)); fills ``lanes``,
    ``dsp`` = ceil(lanes / macs_per_dsp), ``lut``, ``ff`` in place.
    """
    active = [e for e in engines if e.kept_macs > 0]
    if active:
        kept = [e.kept_macs for e in active]
        dsp_cost = [1.0 / e.macs_per_dsp if e.uses_dsp else 0.0 for e in active]
        lut_cost = [e.lut_per_lane for e in active]
        dsp_budget, lut_budget = max(dsp_budget, 1e-9), max(lut_budget, 1e-9)

        def cost(theta: float) -> float:
            return _sqrt_lanes(kept, dsp_cost, lut_cost, dsp_budget, lut_budget, theta)[1]

        if any(dsp_cost):
            grid = [i / 16 for i in range(17)]
            values = [cost(t) for t in grid]
            best = min(range(len(grid)), key=values.__getitem__)
            lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
            ratio = (math.sqrt(5) - 1) / 2
            for _ in range(30):
                a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
                if cost(a) <= cost(b):
                    hi = b
                else:
                    lo = a
            theta = min((lo, hi, grid[best]), key=cost)
        else:
            theta = 0.0  # no DSP engine: the LUT budget alone
        lanes, _ = _sqrt_lanes(kept, dsp_cost, lut_cost, dsp_budget, lut_budget, theta)
        for e, x in zip(active, lanes):
            e.lanes = max(1, int(x * (1 + _LANE_GUARD)))
    for e in engines:
        _fill_resources(e)
    return sum(e.kept_macs / e.lanes for e in active)


def _fill_resources(e: EngineCost) -> None:
    e.dsp = math.ceil(e.lanes / e.macs_per_dsp) if e.uses_dsp else 0
    e.lut = math.ceil(e.lanes * e.lut_per_lane)
    e.ff = math.ceil(e.lanes * e.ff_per_lane)


def attention_lanes(workload: Workload, bytes_per_cycle: float, kv_bytes_per_value: int) -> float:
    """FP16 lanes that read the KV cache at the memory bandwidth: bytes/cycle * heads / (kv_heads * bytes/value).

    Decode attention (QK^T and AV) is a matrix-vector product over the cache: per cached token and
    sequence 2*heads*head_dim MACs on 2*kv_heads*head_dim cached values, so more lanes than this
    cannot make it faster, whatever the context length.
    """
    return bytes_per_cycle * workload.heads / (workload.kv_heads * kv_bytes_per_value)


# ---------------------------------------------------------------------------- report
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
        if name == "weight_bytes":
            return float(self.weight_bytes_total)
        if name.endswith("_util") and name in METRICS:
            return float(self.utilisation["bram36" if name == "bram_util" else name[:-5]])
        if name in METRICS:
            return float(getattr(self, name))
        raise ValueError(f"'{name}' is not a hardware metric; allowed: {', '.join(METRIC_NAMES)}")

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


# ---------------------------------------------------------------------------- estimate
@lru_cache(maxsize=64)
def _layer_names(workload: Workload) -> frozenset[str]:
    return frozenset(workload.layer_names())


@lru_cache(maxsize=64)
def _in_features(workload: Workload) -> dict[str, int]:
    """in_features of every layer a plan may name (attention, MLGRU and MLP projections, lm_head)."""
    layers = workload.linear_layers() + workload.linear_layers(range(workload.num_layers))
    return {layer.name: layer.in_features for layer in layers}


def _check_m_divides(name: str, sparsity: Sparsity | None, in_features: int, inherited: str = "") -> None:
    if sparsity is not None and in_features % sparsity.m:
        suffix = f" (plan inherited from '{inherited}')" if inherited else ""
        raise ValueError(f"layer {name}: M={sparsity.m} does not divide in_features {in_features}{suffix}")


@lru_cache(maxsize=256)
def _structure(workload: Workload, mlgru: frozenset[int]) -> tuple:
    """(all linear layers, per-block (mixer layers, mlp layers)) for a set of MLGRU blocks (cached)."""
    blocks = tuple((workload.mlgru_layers(i) if i in mlgru else workload.attention_layers(i), workload.mlp_layers(i))
                   for i in range(workload.num_layers))
    return tuple(workload.linear_layers(mlgru)), blocks


def _check_plan(plan: ModelPlan, workload: Workload) -> None:
    names = _layer_names(workload)
    for lp in plan.layers:
        if lp.name not in names:
            example = workload.linear_layers()[0].name
            raise ValueError(f"plan layer '{lp.name}' is not a linear layer of the workload "
                             f"(e.g. '{example}', 'lm_head')")
        _check_m_divides(lp.name, lp.sparsity, _in_features(workload)[lp.name])
    for bp in plan.blocks:
        if not 0 <= bp.index < workload.num_layers:
            raise ValueError(f"plan block {bp.index} is not in 0..{workload.num_layers - 1}")


def estimate(plan: ModelPlan, workload: Workload, accel: Accelerator) -> HwReport:
    """Cost of ``plan`` for ``workload`` on ``accel`` (formulas in the module docstring).

    Raises ValueError (one line naming the field) when the plan names a layer or block the workload
    does not have, when an N:M pattern's M does not divide a layer's in_features, or when the
    accelerator's clock is not a positive number of MHz.
    """
    _check_plan(plan, workload)
    clock = accel.clock_mhz
    if isinstance(clock, bool) or not isinstance(clock, (int, float)) or not 0 < clock < math.inf:
        raise ValueError(f"hardware.clock_mhz: {clock!r} is not a positive number of MHz")
    c = constants()
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

    named = {lp.name: lp for lp in plan.layers}
    mlgru = {bp.index for bp in plan.blocks if bp.mixer == "mlgru"}

    def plan_of(name: str) -> LayerPlan:
        if name in named:
            return named[name]
        if ".mlgru." in name:
            return named.get(workload.mlgru_counterpart(name), _DENSE_FP16)
        return _DENSE_FP16

    # -- linear layers: storage and the engine each uses
    layers, blocks = _structure(workload, frozenset(mlgru))
    info: dict[str, tuple] = {}  # name -> (plan, kept weights, storage bytes, engine key)
    fan_in: dict[tuple, int] = {}
    for layer in layers:
        lp = plan_of(layer.name)
        if lp.sparsity is not None and lp.name != layer.name:  # an MLGRU projection inheriting a plan
            _check_m_divides(layer.name, lp.sparsity, layer.in_features, inherited=lp.name)
        key = (engine_class(kernel_class(lp.fmt), dev.dsp_kind), lp.sparsity)
        row_kept = kept_per_row(layer.in_features, lp.sparsity)
        nbytes = storage_bytes(layer.in_features, layer.out_features, lp.sparsity, lp.fmt)
        info[layer.name] = (lp, row_kept * layer.out_features, nbytes, key)
        fan_in[key] = max(fan_in.get(key, 0), row_kept)
    attn_blocks = [i for i in range(workload.num_layers) if i not in mlgru]
    attn_macs = B * 2 * workload.heads * workload.head_dim * L  # per attention block per decode step
    fp16_key = ("fp16", None)
    if attn_blocks:  # QK^T and AV run on the FP16 dense engine
        fan_in.setdefault(fp16_key, workload.head_dim)
    engines = {key: _engine(key[0], key[1], fi, dev.dsp_kind) for key, fi in fan_in.items()}
    for lp, kept, nbytes, key in info.values():
        engines[key].kept_macs += B * kept
    avail = dev.available()
    dsp_budget, lut_budget = accel.dsp_share * avail["dsp"], accel.lut_share * avail["lut"]
    att_lanes = 0
    if attn_blocks:  # bandwidth-matched attention lanes, reserved first: the same for every context length
        e16 = engines[fp16_key]
        cap = ATTENTION_BUDGET_CAP * min(dsp_budget * e16.macs_per_dsp, lut_budget / e16.lut_per_lane)
        att_lanes = max(1, min(math.ceil(attention_lanes(workload, bpc, kv_value)), math.floor(cap)))
        dsp_budget -= att_lanes / e16.macs_per_dsp
        lut_budget -= att_lanes * e16.lut_per_lane
    size_engines(list(engines.values()), dsp_budget, lut_budget)
    if attn_blocks:
        e16.lanes += att_lanes
        e16.attention_lanes = att_lanes
        e16.kept_macs += attn_macs * len(attn_blocks)
        _fill_resources(e16)

    # -- weight bytes
    lm_shares = workload.tied_embeddings and plan_of("lm_head").is_identity
    lm_bytes = info["lm_head"][2]
    block_bytes = sum(nbytes for _, _, nbytes, _ in info.values()) - lm_bytes
    embed_bytes = workload.embedding_params() * 2
    breakdown = {"linear": block_bytes, "lm_head": 0 if lm_shares else lm_bytes, "embedding": embed_bytes}
    weight_total = sum(breakdown.values())

    # -- per-row decode cycles (rows) and prefill cycles, in model order
    rows: list[LayerCost] = []
    prefill_cycles = 0.0

    def add(row: LayerCost, prefill_compute: float, prefill_bytes: float) -> None:
        nonlocal prefill_cycles
        row.memory_cycles = row.memory_bytes / bpc
        row.bound = "compute" if row.compute_cycles > row.memory_cycles else "memory"
        rows.append(row)
        prefill_cycles += max(prefill_compute, prefill_bytes / bpc)

    def add_linear(layer) -> None:
        lp, kept, nbytes, key = info[layer.name]
        lanes = engines[key].lanes
        read = nbytes if streamed else 0
        add(LayerCost(layer.name, _label(lp.sparsity, lp.fmt), layer.block,
                      macs=B * layer.in_features * layer.out_features, kept_macs=B * kept, weight_bytes=nbytes,
                      memory_bytes=read, compute_cycles=B * kept / lanes),
            B * P * kept / lanes, read)

    row_bytes = workload.embedding_row_values() * 2
    add(LayerCost(workload.embedding_name, "embedding fp16", None, memory_bytes=B * row_bytes), 0.0, B * P * row_bytes)
    kv_token = workload.kv_bytes_per_token(kv_value)
    lanes16 = engines[fp16_key].lanes if attn_blocks else 1
    causal = P * (P + 1) / 2  # keys attended over a causal prompt of P tokens
    sm = c["softmax_ops_per_score"] / sfu_lanes
    for i, (mixer_layers, mlp_layers) in enumerate(blocks):
        for layer in mixer_layers:
            add_linear(layer)
        if i in mlgru:
            ops = B * workload.hidden * c["mlgru_ops_per_channel"] / sfu_lanes
            add(LayerCost(f"{workload.block_prefix}.{i}.mlgru", "mlgru", i, compute_cycles=ops), P * ops, 0.0)
        else:
            kv = B * L * kv_token
            add(LayerCost(workload.attention_name.format(i=i), "attention fp16", i, macs=attn_macs,
                          kept_macs=attn_macs, kv_bytes=kv, memory_bytes=kv,
                          compute_cycles=attn_macs / lanes16 + B * workload.heads * L * sm),
                B * 2 * workload.heads * workload.head_dim * causal / lanes16 + B * workload.heads * causal * sm,
                B * P * kv_token)
        for layer in mlp_layers:
            add_linear(layer)
    add_linear(workload.lm_head())
    step_cycles = sum(row.cycles for row in rows)
    step_s = step_cycles / clock_hz

    # -- resources
    max_in = max(layer.in_features for layer in layers)
    buffer_bits = 2 * B * max_in * act_bytes * 8 + B * len(mlgru) * workload.hidden * act_bytes * 8
    infra = c["infrastructure"]
    used = {
        "lut": sum(e.lut for e in engines.values()) + infra["lut"] + sfu["lut"],
        "ff": sum(e.ff for e in engines.values()) + infra["ff"] + sfu["ff"],
        "dsp": sum(e.dsp for e in engines.values()) + infra["dsp"] + sfu["dsp"],
        "bram36": infra["bram36"] + math.ceil(buffer_bits / BRAM36_BITS),
        "uram": 0,
    }
    resident_bytes = 0 if streamed else block_bytes + lm_bytes
    if resident_bytes:
        bits = resident_bytes * 8
        uram_budget = accel.uram_share * avail["uram"] * URAM_BITS
        bram_budget = accel.bram_share * avail["bram36"] * BRAM36_BITS
        frac_uram = uram_budget / (uram_budget + bram_budget) if uram_budget + bram_budget > 0 else 0.0
        used["uram"] = math.ceil(bits * frac_uram / URAM_BITS)
        used["bram36"] += math.ceil(bits * (1 - frac_uram) / BRAM36_BITS)
    caps = {r: float(c["utilisation_caps"][_CAP_KEY[r]]) for r in RESOURCES}
    util = {r: (used[r] / avail[r] if avail[r] > 0 else (0.0 if used[r] == 0 else 1e9)) for r in RESOURCES}
    violations = [r for r in RESOURCES if util[r] > caps[r]]
    violation = max([0.0] + [util[r] / caps[r] - 1.0 for r in RESOURCES])

    kv_capacity = B * len(attn_blocks) * L * kv_token
    offchip = embed_bytes + kv_capacity + (0 if not streamed else breakdown["linear"] + breakdown["lm_head"])
    capacity = mem.capacity_bytes
    cap_off = float(c["offchip_capacity_cap"])
    if offchip > capacity * cap_off:
        violations.append("offchip_capacity")
    violation = max(violation, offchip / (capacity * cap_off) - 1.0)

    # -- energy per decode step
    overhead = float(c["fpga_overhead"])
    sram_pj_per_byte = c["energy_pj_45nm"]["sram_read32"] / 4.0
    pj_attention = engines[fp16_key].pj_per_mac if attn_blocks else 0.0
    compute_pj = sum(B * kept * pj_per_mac(kernel_class(lp.fmt)) for lp, kept, _, _ in info.values())
    compute_j = (compute_pj + attn_macs * len(attn_blocks) * pj_attention) * overhead * 1e-12
    offchip_j = sum(row.memory_bytes for row in rows) * 8 * c["offchip_pj_per_bit"][mem.kind] * 1e-12
    act_traffic = sum(B * (layer.in_features + layer.out_features) * act_bytes for layer in layers)
    onchip_j = (resident_bytes + act_traffic) * sram_pj_per_byte * overhead * 1e-12
    static_j = dev.static_w * step_s
    step_j = static_j + compute_j + offchip_j + onchip_j

    return HwReport(
        device=dev.name, clock_mhz=float(accel.clock_mhz), weights=accel.weights, memory=mem.kind,
        batch=B, context_length=L, prompt_length=P,
        resources={r: float(used[r]) for r in RESOURCES}, available={r: float(avail[r]) for r in RESOURCES},
        utilisation=util, caps=caps, fits=not violations, violations=violations,
        constraint_violation=float(violation), offchip_bytes=int(offchip), offchip_capacity_bytes=int(capacity),
        weight_bytes_total=int(weight_total), weight_bytes_breakdown={k: int(v) for k, v in breakdown.items()},
        lm_head_shares_embedding=bool(lm_shares),
        decode_ms_per_token=step_s * 1e3, decode_tokens_per_s=B / step_s,
        prefill_ms=prefill_cycles / clock_hz * 1e3,
        power_w=step_j / step_s, j_per_token=step_j / B,
        energy_breakdown_j={"static": static_j, "compute": compute_j, "offchip": offchip_j, "onchip": onchip_j},
        engines=list(engines.values()), layers=rows,
    )
