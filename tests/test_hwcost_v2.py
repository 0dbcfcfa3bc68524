"""Properties of the hwcost v2 design fields (issue 13), with hypothesis; no torch.

Each property holds for every plan and design drawn below (catalog devices, clock, shares, resident
layers, KV bits, windows, ternary engine and storage, batch, context). The hand-worked numbers of the
same fields are in test_hwcost_examples.py; the v1 properties (bits, sparsity, roofline) in
test_hwcost_properties.py.

1. Power: at a fixed clock a design that uses more LUT, FF or DSP (none fewer) draws more dynamic power
   and more power; with fixed lanes (``Accelerator.lanes``) power rises strictly with the lanes; and it
   rises strictly with the clock.
2. ``resident: all`` reads no off-chip weight bytes: every linear row reads 0, the embedding row is the
   only weight read; a regex holds exactly the layers it matches; residency never slows decode.
3. Fewer KV bits (16 -> 8 -> 4) never slow decode and shrink every attention row's KV bytes.
4. ``attention_window`` W bounds the KV traffic (kv bytes per attention row <= B * W * kv bytes per
   token) and decode time does not grow as W shrinks.
5. An all-MLGRU plan's decode (and prefill) does not depend on the context, 0 to 131072 tokens.
6. ``estimate_batch`` gives exactly (==) the numbers of ``estimate`` plan by plan, on one design or
   one design per plan.
7. A compute-bound regime exists: small DSP/LUT shares (<= 5 %) with a batch of 32 or more make linear rows
   compute-bound (with batch 8, LUT-cheap table-lookup ternary lanes on a large fabric stay memory-bound),
   and a prefill is compute-bound where decode is memory-bound.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, PlanBatch, Workload, estimate, estimate_batch, list_devices

SMOLLM2 = Workload.resolve("smollm2-135m")
LLAMA2_7B = Workload.resolve("llama2-7b")
MMFREE = Workload.resolve("mmfreelm-1.3b")
ATTENTION_WORKLOADS = (SMOLLM2, LLAMA2_7B)

EXAMPLES = int(os.environ.get("HWCOST_PROPERTY_EXAMPLES", "100")) // 4 or 1  # 25: several estimates each
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-12
ROW_KINDS = ("embedding fp16", "attention fp16", "mlgru", "vector unit")
"""Kernel labels of the rows that are not linear layers."""
RESOURCES = ("lut", "ff", "dsp", "bram36", "uram")

# ------------------------------------------------------------------ strategies
formats = st.builds(WeightFormat, st.sampled_from(("16", "8", "6", "4", "3", "2", "ternary")),
                    st.sampled_from((64, 128)), st.booleans())
sparsities = st.sampled_from((None, Sparsity(2, 4), Sparsity(1, 4), Sparsity(4, 8)))  # M divides every width


@st.composite
def plans(draw, workload: Workload, mixers: str | None = None) -> ModelPlan:
    """Each layer one of a small palette of (sparsity, format) choices or FP16 dense; blocks attention,
    MLGRU or mixed (an MLGRU-only model keeps its MLGRU blocks)."""
    palette = draw(st.lists(st.tuples(sparsities, formats), min_size=1, max_size=4))
    rnd = draw(st.randoms(use_true_random=False))
    if workload.token_mixer == "mlgru":
        mixers = "mlgru"
    mode = mixers or draw(st.sampled_from(("attention", "mlgru", "mixed")))
    kinds = [rnd.choice(("attention", "mlgru")) if mode == "mixed" else mode for _ in range(workload.num_layers)]
    mlgru = [i for i, kind in enumerate(kinds) if kind == "mlgru"]
    layers = []
    for layer in workload.linear_layers(mlgru):
        k = rnd.randrange(len(palette) + 1)
        if k < len(palette):
            layers.append(LayerPlan(layer.name, *palette[k]))
    return ModelPlan(layers=tuple(layers), blocks=tuple(BlockPlan(i, kind) for i, kind in enumerate(kinds)))


def uniform(workload: Workload, fmt: WeightFormat, mlgru: bool = False) -> ModelPlan:
    blocks = tuple(BlockPlan(i, "mlgru") for i in range(workload.num_layers)) if mlgru else ()
    return ModelPlan(layers=tuple(LayerPlan(x.name, None, fmt) for x in workload.linear_layers(
        bp.index for bp in blocks)), blocks=blocks)


designs = st.fixed_dictionaries({
    "device": st.sampled_from(list_devices()),
    "clock_mhz": st.floats(100.0, 400.0),
    "dsp_share": st.floats(0.05, 1.0),
    "lut_share": st.floats(0.05, 1.0),
    "resident": st.sampled_from(("none", "all", r"model\.layers\.[0-9]\..*", r".*\.mlp\..*")),
    "kv_bits": st.sampled_from((16, 8, 4)),
    "ternary_engine": st.sampled_from(("adder_tree", "table_lookup")),
    "ternary_storage": st.sampled_from(("2bit", "base3")),
    "batch": st.integers(1, 8),
    "context_length": st.integers(1, 4096),
    "prompt_length": st.integers(1, 256),
})
"""Accelerator fields; ``Accelerator(**draw(designs))``, changed one field at a time by the tests."""


def linear_rows(report):
    return [row for row in report.layers if row.kernel not in ROW_KINDS]


def attention_rows(report):
    return [row for row in report.layers if row.kernel == "attention fp16"]


def kv_bytes_per_token(workload: Workload, kv_bits: int) -> float:
    """K and V of one token in one attention block: 2 * kv_heads * (head_dim * bits / 8 + 2-byte scale below 16)."""
    return 2 * workload.kv_heads * (workload.head_dim * kv_bits / 8 + (2 if kv_bits < 16 else 0))


# ------------------------------------------------------------------ 1. power
@SETTINGS
@given(data=st.data())
def test_power_rises_with_resources_used_at_a_fixed_clock(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    plan = data.draw(plans(workload))
    base = data.draw(designs)
    lo = (data.draw(st.floats(0.05, 0.9)), data.draw(st.floats(0.05, 0.9)))
    hi = (data.draw(st.floats(lo[0], 1.0)), data.draw(st.floats(lo[1], 1.0)))
    r_lo = estimate(plan, workload, Accelerator(**{**base, "dsp_share": lo[0], "lut_share": lo[1]}))
    r_hi = estimate(plan, workload, Accelerator(**{**base, "dsp_share": hi[0], "lut_share": hi[1]}))
    more = [r_hi.resources[r] - r_lo.resources[r] for r in ("lut", "ff", "dsp")]
    assume(min(more) >= 0 and max(more) > 0 and r_hi.resources["bram36"] == r_lo.resources["bram36"])
    event("dsp grew" if more[2] > 0 else "lut/ff grew")
    assert r_hi.power_breakdown_w["static"] == pytest.approx(r_lo.power_breakdown_w["static"], rel=REL)
    assert r_hi.power_breakdown_w["dynamic"] > r_lo.power_breakdown_w["dynamic"]
    assert r_hi.power_w > r_lo.power_w


@SETTINGS
@given(data=st.data())
def test_power_rises_strictly_with_fixed_lanes_and_with_the_clock(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    cls, name = data.draw(st.sampled_from((("fp16", "16"), ("int8", "8"), ("int4", "4"), ("ternary", "ternary"))))
    plan = uniform(workload, WeightFormat(name, 128), mlgru=True)  # one engine, no attention lanes
    base = data.draw(designs)
    few = data.draw(st.integers(1, 4000))
    many = data.draw(st.integers(few + 1, 8000))
    r_few = estimate(plan, workload, Accelerator(**base, lanes={cls: few}))
    r_many = estimate(plan, workload, Accelerator(**base, lanes={cls: many}))
    assert [e.lanes for e in r_few.engines] == [few] and [e.lanes for e in r_many.engines] == [many]
    assert r_many.resources["lut"] > r_few.resources["lut"] and r_many.resources["dsp"] >= r_few.resources["dsp"]
    assert r_many.power_breakdown_w["dynamic"] > r_few.power_breakdown_w["dynamic"]
    assert r_many.power_w > r_few.power_w
    assert r_many.decode_ms_per_token <= r_few.decode_ms_per_token * (1 + REL)  # more lanes never slower

    slow = data.draw(st.floats(100.0, 350.0))
    fast = data.draw(st.floats(slow * 1.01, 400.0))
    r_slow = estimate(plan, workload, Accelerator(**{**base, "clock_mhz": slow}, lanes={cls: few}))
    r_fast = estimate(plan, workload, Accelerator(**{**base, "clock_mhz": fast}, lanes={cls: few}))
    assert r_slow.resources == r_fast.resources
    assert r_fast.power_breakdown_w["dynamic"] > r_slow.power_breakdown_w["dynamic"]
    assert r_fast.power_w > r_slow.power_w


@SETTINGS
@given(data=st.data())
def test_power_rises_with_the_clock(data):
    """Any plan: the bandwidth-matched attention lanes shrink as the clock rises (fewer bytes per cycle),
    so the resources change a little, but the power still rises."""
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    plan = data.draw(plans(workload))
    base = data.draw(designs)
    slow = data.draw(st.floats(100.0, 350.0))
    fast = data.draw(st.floats(slow * 1.01, 400.0))
    r_slow = estimate(plan, workload, Accelerator(**{**base, "clock_mhz": slow}))
    r_fast = estimate(plan, workload, Accelerator(**{**base, "clock_mhz": fast}))
    assert r_fast.power_breakdown_w["dynamic"] > r_slow.power_breakdown_w["dynamic"]
    assert r_fast.power_w > r_slow.power_w


# ------------------------------------------------------------------ 2. resident weights
@SETTINGS
@given(data=st.data())
def test_resident_weights_read_no_offchip_weight_bytes(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    plan = data.draw(plans(workload))
    base = data.draw(designs)
    streamed = estimate(plan, workload, Accelerator(**{**base, "resident": "none"}))
    resident = estimate(plan, workload, Accelerator(**{**base, "resident": "all"}))
    rows = linear_rows(resident)
    assert rows and all(row.memory_bytes == 0 and row.resident for row in rows)
    assert resident.resident_bytes == sum(row.weight_bytes for row in rows)
    (embedding,) = [row for row in resident.layers if row.kernel == "embedding fp16"]
    assert embedding.memory_bytes == base["batch"] * workload.embedding_row_values() * 2  # FP16 rows
    weight_reads = sum(row.memory_bytes - row.kv_bytes for row in resident.layers)
    assert weight_reads == embedding.memory_bytes  # the only off-chip weight bytes of the step
    assert all(row.memory_bytes == row.kv_bytes for row in attention_rows(resident))
    assert resident.decode_ms_per_token <= streamed.decode_ms_per_token * (1 + REL)
    # streamed: every linear row reads its stored bytes
    assert all(row.memory_bytes == row.weight_bytes and not row.resident for row in linear_rows(streamed))
    assert streamed.resident_bytes == 0

    mlp = estimate(plan, workload, Accelerator(**{**base, "resident": r".*\.mlp\..*"}))
    for row in linear_rows(mlp):
        assert row.resident == (".mlp." in row.name)
        assert row.memory_bytes == (0 if ".mlp." in row.name else row.weight_bytes)
    if mlp.resident_bytes > mlp.weight_buffer_bytes:
        assert "weight_buffer" in mlp.violations and not mlp.fits


# ------------------------------------------------------------------ 3. KV bits
@SETTINGS
@given(data=st.data())
def test_fewer_kv_bits_never_slow_decode(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS))
    plan = data.draw(plans(workload))
    base = data.draw(designs)
    reports = [estimate(plan, workload, Accelerator(**{**base, "kv_bits": bits})) for bits in (16, 8, 4)]
    for wide, narrow in zip(reports, reports[1:]):
        assert narrow.decode_ms_per_token <= wide.decode_ms_per_token * (1 + REL)
        assert narrow.prefill_ms <= wide.prefill_ms * (1 + REL)
        for a, b in zip(attention_rows(wide), attention_rows(narrow)):
            assert b.kv_bytes < a.kv_bytes  # context >= 1
            assert b.compute_cycles == a.compute_cycles  # lanes sized on an FP16 cache, whatever the KV bits
    for bits, r in zip((16, 8, 4), reports):
        for row in attention_rows(r):
            assert row.kv_bytes == int(base["batch"] * base["context_length"] * kv_bytes_per_token(workload, bits))


# ------------------------------------------------------------------ 4. attention window
@SETTINGS
@given(data=st.data())
def test_attention_window_bounds_kv_traffic(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS))
    plan = data.draw(plans(workload, mixers=data.draw(st.sampled_from(("attention", "mixed")))))
    base = data.draw(designs)
    windows = sorted(data.draw(st.lists(st.integers(1, 8192), min_size=2, max_size=3, unique=True)), reverse=True)
    kv_token = kv_bytes_per_token(workload, base["kv_bits"])
    previous = estimate(plan, workload, Accelerator(**base))
    for window in windows:  # shrinking
        r = estimate(plan, workload, Accelerator(**base, attention_window=window))
        for row in attention_rows(r):
            assert row.kv_bytes <= base["batch"] * window * kv_token
            assert row.kv_bytes == int(base["batch"] * min(window, base["context_length"]) * kv_token)
        assert r.decode_ms_per_token <= previous.decode_ms_per_token * (1 + REL)
        assert r.prefill_ms <= previous.prefill_ms * (1 + REL)
        previous = r


# ------------------------------------------------------------------ 5. MLGRU and the context
@SETTINGS
@given(data=st.data())
def test_mlgru_decode_does_not_depend_on_context(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    plan = data.draw(plans(workload, mixers="mlgru"))
    base = data.draw(designs)
    contexts = [0, data.draw(st.integers(1, 8192)), 131072]
    reports = [estimate(plan, workload, Accelerator(**{**base, "context_length": c})) for c in contexts]
    for r in reports[1:]:
        assert r.decode_ms_per_token == reports[0].decode_ms_per_token
        assert r.prefill_ms == reports[0].prefill_ms and r.offchip_bytes == reports[0].offchip_bytes
        assert not attention_rows(r) and all(row.kv_bytes == 0 for row in r.layers)


# ------------------------------------------------------------------ 6. batched == single, exactly
FIELDS = ("decode_tokens_per_s", "decode_ms_per_token", "prefill_ms", "power_w", "j_per_token",
          "weight_bytes_total", "fits", "constraint_violation")


def assert_exact(batch, p: int, single) -> None:
    for name in FIELDS:
        assert getattr(batch, name)[p] == getattr(single, name), (p, name)
    for r in RESOURCES:
        assert batch.resources[r][p] == single.resources[r], (p, r)
        assert batch.utilisation[r][p] == single.utilisation[r], (p, r)


@SETTINGS
@given(data=st.data())
def test_batch_equals_single_estimates_exactly(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    plan_list = data.draw(st.lists(plans(workload), min_size=1, max_size=5))
    base = data.draw(designs)
    accel = Accelerator(**base)
    batch = estimate_batch(PlanBatch.from_plans(plan_list, workload), accel)
    for p, plan in enumerate(plan_list):
        assert_exact(batch, p, estimate(plan, workload, accel))
    # one design per plan: clock, resident, KV bits and ternary engine vary (plans sharing a design run together)
    per_plan = [Accelerator(**{**base, "clock_mhz": data.draw(st.sampled_from((150.0, 300.0))),
                               "resident": data.draw(st.sampled_from(("none", "all", r".*\.mlp\..*"))),
                               "kv_bits": data.draw(st.sampled_from((16, 8, 4))),
                               "ternary_engine": data.draw(st.sampled_from(("adder_tree", "table_lookup")))})
                for _ in plan_list]
    batch = estimate_batch(PlanBatch.from_plans(plan_list, workload), per_plan)
    for p, plan in enumerate(plan_list):
        assert_exact(batch, p, estimate(plan, workload, per_plan[p]))


def test_batch_needs_one_design_per_plan():
    batch = PlanBatch.from_plans([ModelPlan(), ModelPlan()], SMOLLM2)
    try:
        estimate_batch(batch, [Accelerator("kria-kv260")])
    except ValueError as err:
        assert str(err) == "estimate_batch: 1 accelerators for 2 plans"
    else:
        raise AssertionError("no error")


# ------------------------------------------------------------------ 7. a compute-bound regime
@SETTINGS
@given(data=st.data())
def test_small_budgets_and_a_batch_make_rows_compute_bound(data):
    workload = data.draw(st.sampled_from(ATTENTION_WORKLOADS + (MMFREE,)))
    fmt = data.draw(formats)
    plan = uniform(workload, fmt, mlgru=workload.token_mixer == "mlgru")
    base = data.draw(designs)
    # B * kept / lanes > bytes / (bytes per cycle) when B > lanes * bits / (8 * bytes per cycle): with 5 % of
    # the largest catalog fabric, LUT-cheap table-lookup ternary lanes on a 256-byte/cycle DDR4 need B > ~12
    accel = Accelerator(**{**base, "dsp_share": data.draw(st.floats(0.02, 0.05)),
                           "lut_share": data.draw(st.floats(0.02, 0.05)), "batch": data.draw(st.integers(32, 64)),
                           "resident": "none"})
    r = estimate(plan, workload, accel)
    bounds = {row.bound for row in linear_rows(r)}
    assert "compute" in bounds
    for row in linear_rows(r):
        assert row.bound == ("compute" if row.compute_cycles > row.memory_cycles else "memory")


def test_prefill_is_compute_bound_where_decode_is_memory_bound():
    """The same design: decode of one token streams every weight once per token (memory-bound), a prompt of
    512 tokens reads them once for 512 tokens of compute, so prefill costs far less than 512 decode steps."""
    plan = uniform(LLAMA2_7B, WeightFormat("4", 128))
    accel = Accelerator("kria-kv260", prompt_length=512, context_length=512)
    r = estimate(plan, LLAMA2_7B, accel)
    assert all(row.bound == "memory" for row in linear_rows(r))
    compute_ms = sum(row.compute_cycles for row in linear_rows(r)) / (accel.clock_mhz * 1e3)
    assert r.prefill_ms < 512 * r.decode_ms_per_token / 4
    assert r.prefill_ms > 511 * compute_ms * 0.99  # the prompt's compute (lm_head once) sets it


def test_design_fields_change_the_estimate():
    """Sanity: each v2 field moves the numbers the way its doc says, on one plan."""
    plan = uniform(SMOLLM2, WeightFormat("ternary"))
    base = Accelerator("kria-kv260")
    r = estimate(plan, SMOLLM2, base)
    packed = estimate(plan, SMOLLM2, Accelerator("kria-kv260", ternary_storage="base3"))
    assert packed.weight_bytes_total < r.weight_bytes_total
    host = estimate(plan, SMOLLM2, Accelerator("kria-kv260", lm_head="host", embedding="host"))
    assert host.host_ms > 0 and not any(row.memory_bytes for row in host.layers if row.name in ("lm_head",
                                                                                                 "model.embed_tokens"))
    toggled = estimate(plan, SMOLLM2, Accelerator("kria-kv260", toggle_rate=0.25))
    assert toggled.power_breakdown_w["dynamic"] > r.power_breakdown_w["dynamic"]
    assert toggled.decode_ms_per_token == r.decode_ms_per_token
    assert np.isfinite(r.power_w) and r.power_breakdown_w["static"] == pytest.approx(base.dev.static_w, rel=REL)
