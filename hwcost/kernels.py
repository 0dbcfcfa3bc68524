"""Datapath models per layer format: storage, MAC lanes, LUT/FF/DSP per lane and energy per MAC.

One function per figure, FINN ``*_estimation()`` style; every constant is ``C[...]`` from
``data/constants.yaml``. The functions taking ``in_features``, ``n``, ``m`` or ``fan_in`` work on
Python numbers and on numpy arrays alike, so that :mod:`hwcost.model` evaluates a batch of plans
with the same formulas as a single one.

Kernel classes: ``fp16``, ``int8`` .. ``int2`` (every width from 8 down to 2 bits), ``ternary``
(:data:`KERNELS`). Sparsity is N:M with ``n`` kept of every ``m`` weights along the input
dimension; dense is ``n = m = 1`` in the array forms (no index bits, no operand mux).

Storage of one linear layer (in x out), bits
    kept_per_row = min(in, ceil(in / M) * N)               (dense: in)
    values       = kept_per_row * out * value_bits         (16 fp16, k for INT-k, 2 ternary codes)
                   ceil(kept_per_row / 5) * 8 * out       (ternary base-3 packed: 5 trits per byte, 3^5 = 243
                                                            <= 256, i.e. 1.6 bits/weight)
    scales       = ceil(kept_per_row / group) * out * C[scale_bits]   (INT-k, groups of kept values)
                   C[scale_bits]                                    (ternary: one per-tensor scale)
    zeros        = ceil(kept_per_row / group) * out * k             (asymmetric INT-k: a k-bit zero point
                                                                     per group, as GPTQ's packed qzeros)
    index        = ceil(in / M) * out * N * ceil(log2 M)            (N:M index metadata)
e.g. 2:4 INT4: per 4 weights 2*4 value + 2*2 index bits = 3 bits/weight.

Lanes of a matrix-vector engine (one MAC per lane per cycle)
    MAC lanes per DSP     C[macs_per_dsp][dsp_kind][class]           (activations <= 8 bits)
                          C[macs_per_dsp_a16][dsp_kind][class]       (16-bit activations)
    LUT per lane (DSP)    C[lane_lut][dsp_kind][fp16|int]
    LUT per lane (ternary) A + ceil(log2 max(fan_in, 2)), no DSP     (add/subtract tree)
    LUT per lane (ternary, table lookup, g = C[ternary_table.group] weights per lookup; one lane = one
      MAC/cycle, a lookup unit is g lanes)
                          (table + adder) / g with table = (A + ceil(log2 g)) * ceil(ceil(3^g / 2) / 64)
                          LUTRAM (64x1 per LUT6, sign symmetry halves the 3^g entries) and
                          adder = A + ceil(log2 g) + ceil(log2 max(fan_in / g, 2))
    N:M extra LUT/lane    A * ceil((M-1) / (C[nm_mux_inputs_per_lut6]-1))   (M:1 operand mux)
                          + ceil(log2 M) * C[nm_index_decode_lut_per_index_bit]
    FF per lane           C[ff_per_lut] * LUT per lane + C[lane_ff_extra][fp16|int|ternary]
A = activation bits: 16 for fp16, else ``act_bits`` (the accelerator's) or C[activation_bits].
Table building (table lookup): per g activations (3^g - 1) / 2 adds, once per input group and
token, on the same lanes (:func:`table_build_macs`).

Power is not per MAC: :mod:`hwcost.power` charges the resources these lanes use (XPE style).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from dse.plan import Sparsity, WeightFormat
from hwcost.devices import constants

KERNELS = ("fp16", "int8", "int7", "int6", "int5", "int4", "int3", "int2", "ternary")
"""Kernel classes in a fixed order (array code = index)."""


# ---------------------------------------------------------------------------- classes
@lru_cache(maxsize=None)
def kernel_class(fmt: WeightFormat) -> str:
    """``fp16``, ``int8`` .. ``int2`` or ``ternary``."""
    return "fp16" if fmt.is_float else ("ternary" if fmt.is_ternary else f"int{fmt.bits}")


def activation_bits(cls: str, act_bits: int | None = None) -> int:
    """Bits of the activation operand of a kernel class: 16 for fp16; ``act_bits`` or C[activation_bits]."""
    if cls == "fp16":
        return int(constants()["activation_bits"]["fp16"])
    if act_bits is not None:
        return int(act_bits)
    return int(constants()["activation_bits"]["ternary" if cls == "ternary" else "int"])


def _packing(dsp_kind: str, act_bits: int | None) -> dict:
    c = constants()
    return c["macs_per_dsp_a16" if activation_bits("int8", act_bits) > 8 else "macs_per_dsp"][dsp_kind]


def macs_per_dsp(cls: str, dsp_kind: str, act_bits: int | None = None) -> float:
    """MAC lanes one DSP block gives a lane of class ``cls`` (0 for ternary: no DSP)."""
    return 0.0 if cls == "ternary" else float(_packing(dsp_kind, act_bits)[cls])


@lru_cache(maxsize=None)
def engine_class(cls: str, dsp_kind: str, act_bits: int | None = None) -> str:
    """The kernel class whose engine runs layers of class ``cls``: the widest INT class with the same
    DSP packing for INT-k (int7, int6, int5 -> int8, int3 and int2 -> int4 on DSP48E2 with 8-bit activations;
    narrower weights are sign-extended into the same lanes); fp16 and ternary run on their own."""
    if cls in ("fp16", "ternary"):
        return cls
    packing = _packing(dsp_kind, act_bits)
    same = [k for k in packing if k.startswith("int") and packing[k] == packing[cls]]
    return max(same, key=lambda k: int(k[3:]))


# ---------------------------------------------------------------------------- lanes
def nm_lut_per_lane(cls: str, m, act_bits: int | None = None):
    """Extra LUTs per lane for N:M (M = ``m``; 1 = dense gives 0): A * ceil((M-1)/3) operand mux + ceil(log2 M)."""
    c = constants()
    per_lut = int(c["nm_mux_inputs_per_lut6"]) - 1
    m = np.asarray(m, dtype=float)
    return (activation_bits(cls, act_bits) * np.ceil((m - 1) / per_lut)
            + np.ceil(np.log2(m)) * c["nm_index_decode_lut_per_index_bit"])


def ternary_table_group() -> int:
    """Weights per table lookup of the table-lookup ternary engine (C[ternary_table.group])."""
    return int(constants()["ternary_table"]["group"])


def table_lut_per_lane(fan_in, act_bits: int | None = None):
    """LUTs per MAC lane of the table-lookup ternary engine (module docstring): (table + adder) / g."""
    g = ternary_table_group()
    a = activation_bits("ternary", act_bits)
    grow = math.ceil(math.log2(g))
    table = (a + grow) * math.ceil(math.ceil(3 ** g / 2) / 64)
    adder = a + grow + np.ceil(np.log2(np.maximum(np.asarray(fan_in, dtype=float) / g, 2)))
    return (table + adder) / g


def table_build_macs(in_features) -> np.ndarray:
    """Adds that build one token's lookup tables for a layer of ``in_features`` inputs: ceil(in / g) * (3^g - 1) / 2."""
    g = ternary_table_group()
    return np.ceil(np.asarray(in_features, dtype=float) / g) * (3 ** g - 1) / 2


def lane_lut(cls: str, m, fan_in, dsp_kind: str, act_bits: int | None = None, table_lookup: bool = False):
    """LUTs per MAC lane: the class's base (ternary: adder tree A + ceil(log2 fan_in), or the table-lookup
    engine's share) plus the N:M mux."""
    if cls == "ternary" and table_lookup:
        base = table_lut_per_lane(fan_in, act_bits)
    elif cls == "ternary":
        base = activation_bits(cls, act_bits) + np.ceil(np.log2(np.maximum(np.asarray(fan_in, dtype=float), 2)))
    else:
        base = float(constants()["lane_lut"][dsp_kind]["fp16" if cls == "fp16" else "int"])
    return base + nm_lut_per_lane(cls, m, act_bits)


def lane_ff(cls: str, lut):
    """Flip-flops per lane: C[ff_per_lut] * LUT per lane + C[lane_ff_extra][class]."""
    c = constants()
    extra = c["lane_ff_extra"]["fp16" if cls == "fp16" else ("ternary" if cls == "ternary" else "int")]
    return c["ff_per_lut"] * np.asarray(lut, dtype=float) + extra


# ---------------------------------------------------------------------------- storage
TERNARY_CODE_BITS = 2.0
"""Bits of one ternary weight stored as a 2-bit code."""
TRITS_PER_BYTE = 5
"""Ternary weights per byte with base-3 packing (3^5 = 243 <= 256)."""


def value_bits(fmt: WeightFormat, ternary_storage: str = "2bit") -> float:
    """Bits of one stored kept weight: 16 (fp16), k (INT-k), 2 (ternary codes) or 1.6 (ternary base-3)."""
    if fmt.is_ternary:
        return TERNARY_CODE_BITS if ternary_storage == "2bit" else 8.0 / TRITS_PER_BYTE
    return float(fmt.bits)


SCALES_NONE, SCALES_TENSOR, SCALES_GROUP = 0, 1, 2
"""How a format stores scales (codes for the array forms): none (fp16), one per tensor (ternary), per group (INT)."""


def storage_bits_arrays(in_features, out_features, n, m, bits, group, scales_per, zero_points=False,
                        base3=False):
    """Storage bits of layers given as arrays: (values, scales, index, total, kept weights per row).

    ``bits``: value bits per kept weight; ``group``: weights per scale (INT); ``scales_per``:
    :data:`SCALES_NONE`, :data:`SCALES_TENSOR` or :data:`SCALES_GROUP` (or an array of them);
    ``zero_points``: a ``bits``-wide zero point per group (asymmetric INT); ``base3``: values packed
    5 per byte (ternary base-3). ``scales`` includes the zero points.
    """
    scale_bits = float(constants()["scale_bits"])
    in_features = np.asarray(in_features, dtype=float)
    out_features = np.asarray(out_features, dtype=float)
    m = np.asarray(m)
    n = np.asarray(n, dtype=float)
    groups = np.ceil(in_features / m)  # groups of M along the input (the last one may be partial)
    kept = np.minimum(in_features, groups * n)
    values = kept * out_features * bits
    if np.any(base3):
        values = np.where(base3, np.ceil(kept / TRITS_PER_BYTE) * 8 * out_features, values)
    scales_per = np.asarray(scales_per)
    per_group = scale_bits + np.where(zero_points, bits, 0.0) if np.any(zero_points) else scale_bits
    scales = np.where(scales_per == SCALES_GROUP, np.ceil(kept / group) * out_features * per_group,
                      (scales_per == SCALES_TENSOR) * scale_bits)
    select_bits = np.ceil(np.log2(np.arange(1, int(m.max()) + 1)))  # ceil(log2 M) by table: M takes few values
    index = groups * out_features * n * select_bits[m - 1]
    return values, scales, index, values + scales + index, kept


def scales_kind(fmt: WeightFormat) -> int:
    """How a format stores scales: :data:`SCALES_GROUP` (INT-k), :data:`SCALES_TENSOR` (ternary), :data:`SCALES_NONE` (fp16)."""
    return SCALES_NONE if fmt.is_float else (SCALES_TENSOR if fmt.is_ternary else SCALES_GROUP)


def storage_bits(in_features: int, out_features: int, sparsity: Sparsity | None,
                 fmt: WeightFormat, ternary_storage: str = "2bit") -> dict[str, float]:
    """Bits of one linear layer's stored weights: ``values``, ``scales`` (zero points included), ``index``
    and ``total``."""
    n, m = (1, 1) if sparsity is None else (sparsity.n, sparsity.m)
    parts = storage_bits_arrays(in_features, out_features, n, m, value_bits(fmt, ternary_storage), fmt.group_size,
                                scales_kind(fmt), zero_points=not fmt.is_float and not fmt.is_ternary
                                and not fmt.symmetric, base3=fmt.is_ternary and ternary_storage == "base3")
    return dict(zip(("values", "scales", "index", "total"), (float(x) for x in parts[:4])))
