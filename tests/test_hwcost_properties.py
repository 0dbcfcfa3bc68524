"""Property tests of the analytical FPGA cost model (hypothesis, no torch).

Each property must hold for every valid plan on SmolLM2-135M and LLaMA2-7B and every
accelerator drawn below: random per-layer N:M sparsity (M in 2, 4, 8, 16, any 0 < N < M;
every M divides every layer width of both models), weight format (16/8/6/4/3/2/ternary),
group size (32/64/128), token mixer per block (attention/mlgru), catalog device, clock
100-400 MHz, resident weights none, all or by a regex, KV cache 16/8/4 bits, ternary weights as
2-bit codes or base-3 packed, ternary engine adder tree or table lookup, batch 1-8, context 64-4096.
(The properties of the v2 design fields, power, KV bits, windows, batches, are in test_hwcost_v2.py.)

A failing property is a bug of ``hwcost/model.py``, not of the property. The properties, stated
exactly as the model docstring states what is monotone:

1. Lowering one layer's bits (16 > 8 > 6 > 4 > 3 > 2 > ternary, same sparsity and group size)
   never increases any layer's bytes, nor the total except by the compressed copy of a tied lm_head
   that was FP16; never increases the off-chip bytes of a step; within one engine class (8 -> 6,
   4 -> 3 -> 2) leaves every compute cycle unchanged and so never increases latency (memory-bound
   or not); across engine classes never increases latency when both plans are memory-bound (the
   MLGRU recurrence rows aside, which no format changes).
2. N:M -> N':M with N' < N never increases bytes; dense -> N:M never increases them iff
   N*ceil(log2 M) <= (M-N)*value_bits (else values + index grow); across M no order (7:16 vs 1:2).
3. Ternary engines have 0 DSP; an all-ternary all-MLGRU plan uses only the fixed vector-unit DSPs.
4. An all-MLGRU plan's decode rows do not change with context; with an attention block the step,
   every attention row's KV bytes and cycles grow strictly.
5. A plan marked fitting uses <= the available (and the data-sheet) amount of every resource,
   each utilisation <= its cap, resident bytes <= the weight buffer and off-chip bytes <= capacity.
6. Decode tokens/s <= B * peak bandwidth / off-chip bytes per step, with the bytes counted here
   (streamed layers only, the KV cache at kv_bits with its FP16 scales).
"""

from __future__ import annotations

import math
import os
import re

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, Workload, estimate, list_devices
from hwcost.devices import constants

SMOLLM2 = Workload.from_hf_config({
    "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
    "tie_word_embeddings": True})
LLAMA2_7B = Workload.from_hf_config({
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False})
WORKLOADS = (SMOLLM2, LLAMA2_7B)

FORMATS = ("16", "8", "6", "4", "3", "2", "ternary")  # from most to fewest weight bits (ternary: 2-bit codes)
ENGINE = {"16": "fp16", "8": "int8", "6": "int8", "4": "int4", "3": "int4", "2": "int4", "ternary": "ternary"}
"""Which datapath runs a format: INT formats with the same DSP packing share lanes (constants.yaml macs_per_dsp)."""
M_VALUES = (2, 4, 8, 16)
GROUPS = (32, 64, 128)
REL = 1e-9  # float tolerance on sums of cycles
RESIDENT = ("none", "all", r"model\.layers\.[0-9]\..*", r".*\.mlp\..*")
"""Weight placements drawn: none, all, the first ten blocks, every MLP projection."""

EXAMPLES = int(os.environ.get("HWCOST_PROPERTY_EXAMPLES", "100"))  # raise for a deeper search
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ strategies
sparsities = st.one_of(
    st.none(),
    st.sampled_from(M_VALUES).flatmap(lambda m: st.integers(1, m - 1).map(lambda n: Sparsity(n, m))))
choices = st.tuples(sparsities, st.sampled_from(FORMATS), st.sampled_from(GROUPS))


def _all_names(workload: Workload, plan: ModelPlan | None = None) -> list[str]:
    """Attention, MLP and lm_head names, then the MLGRU projection names of every block (of ``plan``'s MLGRU
    blocks when given: a plan may name both there, and a substituted MLGRU projection exists nowhere else)."""
    names = [layer.name for layer in workload.linear_layers()]
    blocks = range(workload.num_layers) if plan is None else [b.index for b in plan.blocks if b.mixer == "mlgru"]
    return names + [layer.name for i in blocks for layer in workload.mlgru_layers(i)]


@st.composite
def plans(draw, workload: Workload, mixers: str | None = None) -> ModelPlan:
    """A per-layer plan: each layer gets one of a small palette of choices or stays unnamed (FP16 dense)."""
    palette = draw(st.lists(choices, min_size=1, max_size=5))
    rnd = draw(st.randoms(use_true_random=False))
    name_mlgru = draw(st.booleans())
    mode = mixers or draw(st.sampled_from(("attention", "mlgru", "mixed")))
    if mode == "mixed":
        kinds = [rnd.choice(("attention", "mlgru")) for _ in range(workload.num_layers)]
    else:
        kinds = [mode] * workload.num_layers
    layers = []
    for name in _all_names(workload):
        if ".mlgru." in name and (not name_mlgru or kinds[workload.block_of(name)] != "mlgru"):
            continue  # MLGRU projections then inherit their attention counterpart's plan (or do not exist)
        k = rnd.randrange(len(palette) + 1)
        if k < len(palette):
            sp, fmt, group = palette[k]
            layers.append(LayerPlan(name, sp, WeightFormat(fmt, group)))
    blocks = tuple(BlockPlan(i, kind) for i, kind in enumerate(kinds))
    return ModelPlan(layers=tuple(layers), blocks=blocks)


accelerators = st.builds(
    Accelerator,
    device=st.sampled_from(list_devices()),
    clock_mhz=st.floats(100.0, 400.0),
    dsp_share=st.floats(0.05, 1.0),
    lut_share=st.floats(0.05, 1.0),
    bram_share=st.floats(0.05, 1.0),
    uram_share=st.floats(0.05, 1.0),
    resident=st.sampled_from(RESIDENT),
    mem_efficiency=st.one_of(st.none(), st.floats(0.3, 1.0)),
    kv_bits=st.sampled_from((16, 8, 4)),
    ternary_storage=st.sampled_from(("2bit", "base3")),
    ternary_engine=st.sampled_from(("adder_tree", "table_lookup")),
    batch=st.integers(1, 8),
    context_length=st.integers(64, 4096),
    prompt_length=st.integers(1, 512),
)

memory_bound_accelerators = st.builds(  # streamed weights, small batch, fast clock: rows mostly memory-bound
    Accelerator,
    device=st.sampled_from(list_devices()),
    clock_mhz=st.floats(250.0, 400.0),
    dsp_share=st.floats(0.5, 1.0),
    lut_share=st.floats(0.5, 1.0),
    resident=st.just("none"),
    batch=st.integers(1, 2),
    context_length=st.integers(64, 4096),
)


def _with(plan: ModelPlan, name: str, sparsity: Sparsity | None, fmt: WeightFormat) -> ModelPlan:
    """``plan`` with layer ``name`` set to (sparsity, fmt), named if it was not."""
    layers = [lp for lp in plan.layers if lp.name != name] + [LayerPlan(name, sparsity, fmt)]
    return ModelPlan(layers=tuple(layers), blocks=plan.blocks)


def _effective(plan: ModelPlan, workload: Workload, name: str) -> LayerPlan:
    """The plan a layer gets: its own, or for an unnamed MLGRU projection its attention counterpart's."""
    if ".mlgru." in name and name not in {lp.name for lp in plan.layers}:
        return plan.layer(workload.mlgru_counterpart(name))
    return plan.layer(name)


def _memory_bound(report) -> bool:
    """Every row memory-bound, but the vector-unit rows (MLGRU recurrences, norms and activations: no off-chip
    bytes, the same cycles in any plan)."""
    return all(row.bound == "memory" for row in report.layers if row.kernel not in ("mlgru", "vector unit"))


def _rows(report) -> dict:
    return {row.name: row for row in report.layers}


def _value_bits(fmt: WeightFormat, ternary_storage: str = "2bit") -> float:
    """Bits per kept weight: k for INT-k, 16 for FP16, ternary 2 (codes) or 8/5 (base-3, 5 per byte)."""
    if fmt.is_ternary:
        return 2.0 if ternary_storage == "2bit" else 8 / 5
    return float(fmt.bits)


def _tied_lm_head_untied(workload: Workload, plan: ModelPlan, name: str) -> bool:
    """True when changing ``name`` unties a tied lm_head that ``plan`` leaves FP16 dense (shared with the embedding)."""
    return name == "lm_head" and workload.tied_embeddings and plan.layer("lm_head").is_identity


# ------------------------------------------------------------------ 1. fewer weight bits
@SETTINGS
@given(data=st.data())
def test_fewer_bits_never_increase_bytes_or_memory_bound_latency(data):
    workload = data.draw(st.sampled_from(WORKLOADS))
    plan = data.draw(plans(workload))
    accel = data.draw(st.one_of(accelerators, memory_bound_accelerators))
    names = _all_names(workload, plan)
    name = data.draw(st.one_of(st.just("lm_head"), st.sampled_from(names)))  # lm_head: the tied exception
    old = _effective(plan, workload, name)
    if data.draw(st.booleans()):  # often start from a format with a narrower one on the same engine
        fmt = WeightFormat(data.draw(st.sampled_from(("8", "4", "3"))), data.draw(st.sampled_from(GROUPS)))
        plan = _with(plan, name, old.sparsity, fmt)
        old = _effective(plan, workload, name)
    assume(not old.fmt.is_ternary)
    lower_options = FORMATS[FORMATS.index(old.fmt.name) + 1:]
    same = [f for f in lower_options if ENGINE[f] == ENGINE[old.fmt.name]]  # 8 -> 6, 4 -> 3 -> 2
    lower = data.draw(st.sampled_from(same if same and data.draw(st.booleans()) else lower_options))
    group = old.fmt.group_size if not old.fmt.is_float else data.draw(st.sampled_from(GROUPS))
    new_plan = _with(plan, name, old.sparsity, WeightFormat(lower, group))

    r1, r2 = estimate(plan, workload, accel), estimate(new_plan, workload, accel)
    rows1, rows2 = _rows(r1), _rows(r2)
    assert rows1.keys() == rows2.keys()
    for key, row in rows2.items():  # every layer's stored bytes: never more
        assert row.weight_bytes <= rows1[key].weight_bytes, key
    if _tied_lm_head_untied(workload, plan, name):
        event("tied FP16 lm_head compressed")
        # The one exception (module docstring): compressing a tied lm_head stores a compressed copy
        # next to the FP16 embedding table, which the input lookup keeps; total grows by exactly that copy.
        assert r2.weight_bytes_total == r1.weight_bytes_total + rows2["lm_head"].weight_bytes
    else:
        assert r2.weight_bytes_total <= r1.weight_bytes_total
    assert sum(r.memory_bytes for r in r2.layers) <= sum(r.memory_bytes for r in r1.layers)
    if ENGINE[old.fmt.name] == ENGINE[lower]:
        # the datapath is unchanged: every row's compute cycles stay, its memory cycles do not grow,
        # so the step (sum of max(compute, memory)) never grows, memory-bound or not
        event("same engine")
        assert [x.compute_cycles for x in r1.layers] == [x.compute_cycles for x in r2.layers]
        assert r2.decode_ms_per_token <= r1.decode_ms_per_token * (1 + REL)
    elif _memory_bound(r1) and _memory_bound(r2):
        event("other engine, both plans memory-bound")
        assert r2.decode_ms_per_token <= r1.decode_ms_per_token * (1 + REL)


# ------------------------------------------------------------------ 2. more sparsity
@SETTINGS
@given(data=st.data())
def test_fewer_kept_weights_of_the_same_m_never_increase_bytes(data):
    workload = data.draw(st.sampled_from(WORKLOADS))
    plan = data.draw(plans(workload))
    accel = data.draw(accelerators)
    names = _all_names(workload, plan)
    name = names[data.draw(st.integers(0, len(names) - 1))]
    old = _effective(plan, workload, name)
    m = old.sparsity.m if old.sparsity else data.draw(st.sampled_from(M_VALUES))
    n_old = old.sparsity.n if old.sparsity else m - 1
    if old.sparsity is None:
        plan = _with(plan, name, Sparsity(n_old, m), old.fmt)
    assume(n_old > 1)
    n_new = data.draw(st.integers(1, n_old - 1))
    new_plan = _with(plan, name, Sparsity(n_new, m), old.fmt)

    r1, r2 = estimate(plan, workload, accel), estimate(new_plan, workload, accel)
    rows1 = _rows(r1)
    for key, row in _rows(r2).items():
        assert row.weight_bytes <= rows1[key].weight_bytes, key
    assert r2.weight_bytes_total <= r1.weight_bytes_total


@SETTINGS
@given(data=st.data())
def test_dense_to_nm_never_increases_bytes_when_index_fits_in_pruned_values(data):
    """Dense -> N:M saves bytes iff the index bits of the N kept weights fit in the value bits of the
    M-N pruned ones: N*ceil(log2 M) <= (M-N)*b. Otherwise values+index grow by
    (N*ceil(log2 M) - (M-N)*b)/M bits per weight (e.g. 3:4 INT4: 3*(4+2)/4 = 4.5 > 4)."""
    workload = data.draw(st.sampled_from(WORKLOADS))
    plan = data.draw(plans(workload))
    accel = data.draw(accelerators)
    names = _all_names(workload, plan)
    name = names[data.draw(st.integers(0, len(names) - 1))]
    fmt = _effective(plan, workload, name).fmt
    plan = _with(plan, name, None, fmt)
    sparsity = data.draw(sparsities.filter(lambda s: s is not None))
    new_plan = _with(plan, name, sparsity, fmt)
    n, m, b = sparsity.n, sparsity.m, _value_bits(fmt, accel.ternary_storage)
    index_fits = n * math.ceil(math.log2(m)) <= (m - n) * b

    r1, r2 = estimate(plan, workload, accel), estimate(new_plan, workload, accel)
    rows1, rows2 = _rows(r1), _rows(r2)
    changed = [key for key in rows2 if rows2[key].weight_bytes != rows1[key].weight_bytes]
    for key in changed:
        layer = next(x for x in workload.linear_layers(range(workload.num_layers)) + workload.linear_layers()
                     if x.name == key)
        dense_vi = layer.in_features * layer.out_features * b  # values, no index
        nm_vi = layer.in_features // m * layer.out_features * n * (b + math.ceil(math.log2(m)))
        assert (nm_vi <= dense_vi) == index_fits
        if index_fits:  # group scales only shrink with fewer kept weights
            assert rows2[key].weight_bytes <= rows1[key].weight_bytes, key
    if index_fits and not _tied_lm_head_untied(workload, plan, name):
        assert r2.weight_bytes_total <= r1.weight_bytes_total


def test_sparser_is_not_always_smaller_across_m():
    """Across different M, a lower density can need more bytes: 7:16 INT4 (7*(4+4)/16 = 3.5 bits/weight)
    vs 1:2 INT4 ((4+1)/2 = 2.5 bits/weight). So 'more sparsity' is ordered only within one M."""
    w, name = SMOLLM2, "model.layers.0.mlp.down_proj"  # 1536 -> 576
    fmt = WeightFormat("4", 128)
    accel = Accelerator("kria-kv260")
    r_7_16 = _rows(estimate(ModelPlan(layers=(LayerPlan(name, Sparsity(7, 16), fmt),)), w, accel))[name]
    r_1_2 = _rows(estimate(ModelPlan(layers=(LayerPlan(name, Sparsity(1, 2), fmt),)), w, accel))[name]
    assert 7 / 16 < 1 / 2 and r_7_16.weight_bytes > r_1_2.weight_bytes
    values_index = {"7:16": 1536 // 16 * 576 * 7 * (4 + 4) / 8, "1:2": 1536 // 2 * 576 * (4 + 1) / 8}
    scales = {"7:16": math.ceil(672 / 128) * 576 * 16 / 8, "1:2": math.ceil(768 / 128) * 576 * 16 / 8}
    assert r_7_16.weight_bytes == values_index["7:16"] + scales["7:16"]
    assert r_1_2.weight_bytes == values_index["1:2"] + scales["1:2"]


# ------------------------------------------------------------------ 3. ternary uses no DSPs
@SETTINGS
@given(data=st.data())
def test_ternary_layers_use_no_dsp(data):
    workload = data.draw(st.sampled_from(WORKLOADS))
    plan = data.draw(plans(workload))
    accel = data.draw(accelerators)
    r = estimate(plan, workload, accel)
    fixed = constants()["infrastructure"]["dsp"] + constants()["vector_unit"]["dsp"]
    for engine in r.engines:
        if engine.kernel == "ternary":
            assert engine.dsp == 0 and engine.macs_per_dsp == 0 and engine.lanes >= 1
    assert r.resources["dsp"] == sum(e.dsp for e in r.engines) + fixed
    # a plan with every linear layer ternary and every block MLGRU uses only the fixed vector-unit DSPs
    all_ternary = ModelPlan(
        layers=tuple(LayerPlan(x.name, lp.sparsity, WeightFormat("ternary")) for x in workload.linear_layers(
            range(workload.num_layers)) for lp in [plan.layer(x.name)]),
        blocks=tuple(BlockPlan(i, "mlgru") for i in range(workload.num_layers)))
    r_t = estimate(all_ternary, workload, accel)
    assert {e.kernel for e in r_t.engines} == {"ternary"}
    assert r_t.resources["dsp"] == fixed


# ------------------------------------------------------------------ 4. context length
@SETTINGS
@given(data=st.data())
def test_mlgru_latency_flat_in_context_attention_grows(data):
    workload = data.draw(st.sampled_from(WORKLOADS))
    accel = data.draw(accelerators)
    short, long = sorted(data.draw(st.lists(st.integers(64, 4096), min_size=2, max_size=2, unique=True)))
    a_short = Accelerator(**{**accel.to_dict(), "context_length": short})
    a_long = Accelerator(**{**accel.to_dict(), "context_length": long})

    mlgru_plan = data.draw(plans(workload, mixers="mlgru"))
    r1, r2 = estimate(mlgru_plan, workload, a_short), estimate(mlgru_plan, workload, a_long)
    assert r2.decode_ms_per_token == r1.decode_ms_per_token
    assert [(x.name, x.cycles, x.memory_bytes) for x in r1.layers] == [(x.name, x.cycles, x.memory_bytes)
                                                                       for x in r2.layers]

    plan = data.draw(plans(workload))
    assume(any(bp.mixer == "attention" for bp in plan.blocks))
    r1, r2 = estimate(plan, workload, a_short), estimate(plan, workload, a_long)
    assert r2.decode_ms_per_token > r1.decode_ms_per_token
    rows1 = _rows(r1)
    for row in r2.layers:
        if row.kernel == "mlgru":  # the recurrence itself: no KV cache, no context term
            assert row.cycles == rows1[row.name].cycles and row.memory_bytes == 0
        if row.kernel.startswith("attention"):
            assert row.kv_bytes > rows1[row.name].kv_bytes and row.cycles > rows1[row.name].cycles


# ------------------------------------------------------------------ 5. fitting plans fit the device
@SETTINGS
@given(data=st.data())
def test_fitting_plan_resources_within_device(data):
    workload = data.draw(st.sampled_from(WORKLOADS))
    plan = data.draw(plans(workload))
    accel = data.draw(accelerators)
    r = estimate(plan, workload, accel)
    dev = accel.dev
    keep = 1 - dev.shell_overhead
    device_total = {"lut": dev.lut, "ff": dev.ff, "dsp": dev.dsp, "bram36": dev.bram36, "uram": dev.uram}
    assert r.fits == (not r.violations) == (r.constraint_violation <= 0)
    for res, used in r.resources.items():
        assert used >= 0
        if r.fits:
            assert used <= r.available[res] == device_total[res] * keep
            assert r.utilisation[res] <= r.caps[res] <= 1
            assert used <= device_total[res]
    if r.fits:
        assert r.offchip_bytes <= r.offchip_capacity_bytes
        assert r.resident_bytes <= r.weight_buffer_bytes
    if accel.resident == "none":
        assert r.resident_bytes == 0 and "weight_buffer" not in r.violations


# ------------------------------------------------------------------ 6. memory roofline
def _offchip_bytes_per_step(workload: Workload, plan: ModelPlan, accel: Accelerator) -> float:
    """Off-chip bytes one decode step must move, computed here from the plan (not from the report)."""
    mlgru = {bp.index for bp in plan.blocks if bp.mixer == "mlgru"}
    B, L = accel.batch, accel.context_length
    total = B * workload.hidden * 2  # one FP16 embedding row per sequence
    # K and V: kv_heads * head_dim values of kv_bits, and one FP16 scale per head each below 16 bits
    kv_token = 2 * workload.kv_heads * (workload.head_dim * accel.kv_bits / 8 + (2 if accel.kv_bits < 16 else 0))
    total += B * L * kv_token * (workload.num_layers - len(mlgru))
    for layer in workload.linear_layers(mlgru):
        if accel.resident == "all" or (accel.resident != "none" and re.fullmatch(accel.resident, layer.name)):
            continue  # held in the on-chip weight buffer: no off-chip read
        lp = _effective(plan, workload, layer.name)
        kept = layer.in_features if lp.sparsity is None else layer.in_features // lp.sparsity.m * lp.sparsity.n
        if lp.fmt.is_ternary and accel.ternary_storage == "base3":
            bits = math.ceil(kept / 5) * 8 * layer.out_features  # 5 trits per byte in each output row
        else:
            bits = kept * layer.out_features * _value_bits(lp.fmt)
        if lp.fmt.is_ternary:
            bits += 16
        elif not lp.fmt.is_float:
            bits += math.ceil(kept / lp.fmt.group_size) * layer.out_features * 16
        if lp.sparsity is not None:
            bits += layer.in_features // lp.sparsity.m * layer.out_features * lp.sparsity.n * math.ceil(
                math.log2(lp.sparsity.m))
        total += math.ceil(bits / 8)
    return total


@SETTINGS
@given(data=st.data())
def test_decode_never_beats_the_memory_roofline(data):
    workload = data.draw(st.sampled_from(WORKLOADS))
    plan = data.draw(plans(workload))
    accel = data.draw(accelerators)
    r = estimate(plan, workload, accel)
    step_bytes = _offchip_bytes_per_step(workload, plan, accel)
    assert sum(row.memory_bytes for row in r.layers) == step_bytes
    mems = [accel.dev.memory(name) for name in accel.memory_names]
    peak = sum(m.gbps for m in mems) * 1e9
    roofline = accel.batch / (step_bytes / peak)
    assert r.decode_tokens_per_s <= roofline * (1 + REL)
    # and never beats the bandwidth it assumes: per memory min(peak * efficiency, channels * port bytes * clock)
    eff = [accel.mem_efficiency or constants()["mem_efficiency"][m.kind] for m in mems]
    achieved = sum(min(m.gbps * 1e9 * e, m.channels * m.port_bits / 8 * accel.clock_mhz * 1e6)
                   for m, e in zip(mems, eff))
    assert r.decode_tokens_per_s <= accel.batch / (step_bytes / achieved) * (1 + REL)
