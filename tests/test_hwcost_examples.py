"""Hand-worked examples of the FPGA cost model, one layer per format, and its input validation.

Every expected number is computed here by explicit arithmetic (comments show the numbers), not by
calling hwcost's formulas; each line names the formula of the ``hwcost/model.py`` docstring it checks.
Published figures are written as literals (shared published_fpga.yaml: 2 INT8 MACs and 4 INT4 MACs
per DSP48E2, FP16 scales, FP16 KV cache); the model's documented assumptions (LUTs per lane, vector
unit) are read from ``constants.yaml`` into named variables, with today's values in the comments.

Setup chosen so that the arithmetic is tractable:

* workload: Llama-shaped, 1 block, hidden 256, 4 heads of 64 (4 KV heads), intermediate 512,
  vocab 512, untied lm_head; the example layer is ``model.layers.0.mlp.gate_proj`` (256 -> 512).
* device: ZCU102 (DSP48E2, no shell, 2520 DSP, 274080 LUT, DDR4 19.2 GB/s).
* accelerator: 96 MHz, mem_efficiency 0.5, so 19.2e9 * 0.5 / 96e6 = 100 bytes per cycle;
  dsp_share 0.5 -> DSP budget 1260; lut_share 0.5 -> LUT budget 137040; batch 1; context 64.
* single-format plans (every linear layer in the format) with the block's mixer an MLGRU, so that
  there is one engine and it gets the whole budget: lanes = min(DSP budget * MACs/DSP,
  LUT budget / LUT per lane) (docstring "Datapath": one engine gets min(D / dsp_e, L / lut_e)).
"""

from __future__ import annotations

import math

import pytest

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, Workload, estimate
from hwcost.devices import constants

TINY = Workload.from_hf_config({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 256,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 512,
                                "vocab_size": 512, "tie_word_embeddings": False})
ACCEL = Accelerator("zcu102", clock_mhz=96, mem_efficiency=0.5, dsp_share=0.5, lut_share=0.5,
                    weights="streamed", batch=1, context_length=64, prompt_length=16)
LAYER = "model.layers.0.mlp.gate_proj"
IN, OUT = 256, 512
BYTES_PER_CYCLE = 19.2e9 * 0.5 / 96e6  # = 100.0 (docstring: memory_cycles = bytes / (GB/s * 1e9 * eff / Hz))
DSP_BUDGET = 2520 * 0.5                # = 1260 DSP48E2 (ZCU102 has no shell: available = data sheet)
LUT_BUDGET = 274080 * 0.5              # = 137040 LUT

C = constants()
LUT_FP16 = C["lane_lut"]["dsp48e2"]["fp16"]   # 80 (assumption: FP16 alignment/normalisation logic)
LUT_INT = C["lane_lut"]["dsp48e2"]["int"]     # 6  (assumption: adder tree share of packed INT lanes)
FF_PER_LUT = C["ff_per_lut"]                  # 1.0
FF_FP16 = C["lane_ff_extra"]["fp16"]          # 48
FF_INT = C["lane_ff_extra"]["int"]            # 8
FF_TERNARY = C["lane_ff_extra"]["ternary"]    # 0
A_INT = C["activation_bits"]["int"]           # 8 (INT8 activations of INT kernels)
A_TERNARY = C["activation_bits"]["ternary"]   # 8 (BitLinear 8-bit activations)
SFU_LANES = C["special_function_unit"]["lanes"]  # 16
SFU_DSP = C["special_function_unit"]["dsp"]      # 32 (fixed vector unit)
SOFTMAX_OPS = C["softmax_ops_per_score"]         # 3
MLGRU_OPS = C["mlgru_ops_per_channel"]           # 7


def single_format_plan(sparsity: Sparsity | None, fmt: WeightFormat) -> ModelPlan:
    """Every linear layer of TINY (MLGRU projections, MLP, lm_head) in one format; block 0 is an MLGRU."""
    names = [layer.name for layer in TINY.linear_layers({0})]
    assert names == ["model.layers.0.mlgru.f_proj", "model.layers.0.mlgru.c_proj", "model.layers.0.mlgru.g_proj",
                     "model.layers.0.mlgru.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.0.mlp.down_proj", "lm_head"]
    return ModelPlan(layers=tuple(LayerPlan(n, sparsity, fmt) for n in names), blocks=(BlockPlan(0, "mlgru"),))


def run(sparsity: Sparsity | None, fmt: WeightFormat):
    report = estimate(single_format_plan(sparsity, fmt), TINY, ACCEL)
    assert len(report.engines) == 1  # one engine: all lanes belong to it
    row = next(r for r in report.layers if r.name == LAYER)
    return report, report.engines[0], row


def check(report, engine, row, *, kept, value_bits, scale_bits, index_bits, lanes, dsp, lut_per_lane, ff_per_lane):
    """Compare one row and its engine with hand-computed figures (bytes, MACs, lanes, DSP/LUT/FF, cycles)."""
    bits = value_bits + scale_bits + index_bits
    nbytes = math.ceil(bits / 8)                             # storage_bytes = ceil(total bits / 8)
    assert row.macs == IN * OUT == 131072                     # linear: macs = B*in*out
    assert row.kept_macs == kept                              # kept = B*kept_per_row*out
    assert row.weight_bytes == nbytes
    assert row.memory_bytes == nbytes                         # streamed: memory bytes = weight bytes
    assert engine.lanes == lanes
    assert engine.dsp == dsp                                  # dsp = ceil(lanes / macs_per_dsp)
    assert engine.lut == math.ceil(lanes * lut_per_lane)      # LUT per lane x lanes
    assert engine.ff == math.ceil(lanes * ff_per_lane)        # FF per lane = ff_per_lut*LUT + extra
    assert row.compute_cycles == pytest.approx(kept / lanes, rel=1e-12)          # kept / lanes_e
    assert row.memory_cycles == pytest.approx(nbytes / BYTES_PER_CYCLE, rel=1e-12)
    assert row.bound == ("compute" if kept / lanes > nbytes / BYTES_PER_CYCLE else "memory")
    assert report.resources["dsp"] == dsp + SFU_DSP            # + fixed vector unit, infrastructure has 0 DSP
    return nbytes


# ------------------------------------------------------------------ one layer per format
def test_fp16_dense():
    report, engine, row = run(None, WeightFormat("16"))
    # values: 256*512 kept weights * 16 bits = 2,097,152 bits; no scales, no index -> 262,144 bytes
    # lanes: FP16 MAC = 2 DSP48E2 (0.5 MACs/DSP): 1260 * 0.5 = 630; LUT 630*80 = 50,400 <= 137,040 -> DSP-bound
    # compute 131072 / 630 = 208.05 cycles; memory 262144 / 100 = 2621.44 cycles -> memory-bound
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 16, scale_bits=0, index_bits=0,
                   lanes=630, dsp=1260, lut_per_lane=LUT_FP16, ff_per_lane=FF_PER_LUT * LUT_FP16 + FF_FP16)
    assert nbytes == 262144 and row.bound == "memory" and engine.kernel == "fp16"
    # the whole decode step, every row memory-bound except the MLGRU recurrence (compute on the vector unit):
    # embedding row 256*2 = 512 B -> 5.12; f,c,g,o 256*256*2 = 131,072 B -> 4 * 1310.72; recurrence
    # 256*7/16 = 112; gate, up, down 262,144 B -> 3 * 2621.44; lm_head 256*512*2 = 262,144 B -> 2621.44
    step = 5.12 + 4 * 1310.72 + 256 * MLGRU_OPS / SFU_LANES + 4 * 2621.44   # = 15,845.76 cycles
    assert report.decode_ms_per_token == pytest.approx(step / 96e6 * 1e3, rel=1e-12)  # = 0.16506 ms
    assert report.decode_tokens_per_s == pytest.approx(96e6 / step, rel=1e-12)         # = 6058.4 tokens/s


def test_int8_dense():
    report, engine, row = run(None, WeightFormat("8", 128))
    # values 131,072 * 8 = 1,048,576 bits; scales ceil(256/128) = 2 per row * 512 rows * 16 = 16,384 bits
    # -> 1,064,960 bits = 133,120 bytes (8.125 bits/weight)
    # lanes: 2 INT8 MACs per DSP48E2 (WP486): 1260 * 2 = 2520; LUT 2520*6 = 15,120 -> DSP-bound
    # compute 131072 / 2520 = 52.01; memory 133120 / 100 = 1331.2 -> memory-bound
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 8, scale_bits=2 * 512 * 16, index_bits=0,
                   lanes=2520, dsp=1260, lut_per_lane=LUT_INT, ff_per_lane=FF_PER_LUT * LUT_INT + FF_INT)
    assert nbytes == 133120 and row.bound == "memory"


def test_int4_g128_dense():
    report, engine, row = run(None, WeightFormat("4", 128))
    # values 131,072 * 4 = 524,288 bits; scales 2 * 512 * 16 = 16,384 bits -> 540,672 bits = 67,584 bytes
    # lanes: 4 INT4 MACs per DSP48E2 (FINN mvu_4sx4u): 1260 * 4 = 5040; LUT 5040*6 = 30,240 -> DSP-bound
    # compute 131072 / 5040 = 26.006; memory 67584 / 100 = 675.84 -> memory-bound
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 4, scale_bits=2 * 512 * 16, index_bits=0,
                   lanes=5040, dsp=1260, lut_per_lane=LUT_INT, ff_per_lane=FF_PER_LUT * LUT_INT + FF_INT)
    assert nbytes == 67584 and row.bound == "memory"


def test_int3_and_int2_share_the_int4_lanes():
    # constants.yaml: int3 and int2 use the int4 packing (sign-extended), so they run on the same engine
    for bits in ("3", "2"):
        report, engine, row = run(None, WeightFormat(bits, 128))
        assert engine.kernel == "int4" and engine.lanes == 5040 and engine.dsp == 1260
        # values 131,072 * k bits + scales 16,384 bits
        assert row.weight_bytes == (131072 * int(bits) + 16384) // 8
        assert row.kernel == f"int{bits}/g128"


def test_int4_with_16_bit_activations():
    # --act-bits 16 (W4A16): constants.yaml macs_per_dsp_a16 packs two 4-bit weights per DSP48E2 against a
    # 16-bit activation (assumption there), so the INT4 engine gets 1260 * 2 = 2520 lanes; LUT 2520*6 = 15,120
    # -> still DSP-bound. Storage is unchanged (67,584 bytes, as in test_int4_g128_dense).
    a16 = Accelerator("zcu102", clock_mhz=96, mem_efficiency=0.5, dsp_share=0.5, lut_share=0.5,
                      weights="streamed", batch=1, context_length=64, prompt_length=16, act_bits=16)
    report = estimate(single_format_plan(None, WeightFormat("4", 128)), TINY, a16)
    engine, row = report.engines[0], next(r for r in report.layers if r.name == LAYER)
    check(report, engine, row, kept=131072, value_bits=131072 * 4, scale_bits=2 * 512 * 16, index_bits=0,
          lanes=2520, dsp=1260, lut_per_lane=LUT_INT, ff_per_lane=FF_PER_LUT * LUT_INT + FF_INT)
    # energy per INT4 MAC (Horowitz, before the FPGA overhead): mul8 * 4 * A / 64 + add32
    e = C["energy_pj_45nm"]
    assert engine.pj_per_mac == pytest.approx(e["mul8"] * 4 * 16 / 64 + e["add32"])   # 0.2 + 0.1 = 0.3 pJ
    # 2:4 INT4 with A = 16: the 4:1 operand mux is 16 bits wide: 16 * ceil(3/3) + ceil(log2 4) = 18 extra LUTs
    report = estimate(single_format_plan(Sparsity(2, 4), WeightFormat("4", 128)), TINY, a16)
    assert report.engines[0].lut_per_lane == LUT_INT + 16 + 2


def test_2_4_int4_g128():
    report, engine, row = run(Sparsity(2, 4), WeightFormat("4", 128))
    # kept per row = 256/4 * 2 = 128 -> kept = 128 * 512 = 65,536 MACs (half of 131,072)
    # values 65,536 * 4 = 262,144 bits; scales ceil(128/128) = 1 per row * 512 * 16 = 8,192 bits;
    # index: 64 groups per row * 512 rows * N=2 * ceil(log2 4)=2 bits = 131,072 bits
    # -> 401,408 bits = 50,176 bytes (3 bits/weight of values + index, + 0.0625 of scales)
    # LUT per lane: 6 + A*ceil((M-1)/3) = 8*1 (operand mux) + ceil(log2 4) = 2 (index decode) = 16
    # lanes: min(1260 * 4 = 5040, 137040 / 16 = 8565) = 5040 -> DSP-bound
    # compute 65536 / 5040 = 13.003; memory 50176 / 100 = 501.76 -> memory-bound
    lut = LUT_INT + A_INT * math.ceil(3 / 3) + math.ceil(math.log2(4))
    nbytes = check(report, engine, row, kept=65536, value_bits=65536 * 4, scale_bits=512 * 16,
                   index_bits=64 * 512 * 2 * 2, lanes=5040, dsp=1260, lut_per_lane=lut,
                   ff_per_lane=FF_PER_LUT * lut + FF_INT)
    assert nbytes == 50176 and row.bound == "memory" and lut == 16


def test_ternary_dense():
    report, engine, row = run(None, WeightFormat("ternary"))
    # values 131,072 * 2-bit codes = 262,144 bits + one FP16 per-tensor scale = 16 -> 262,160 bits = 32,770 bytes
    # LUT per lane: A + ceil(log2 fan_in), fan_in = the widest kept row of the engine = down_proj's 512
    #   -> 8 + 9 = 17; no DSP
    # lanes: 137040 / 17 = 8061.2 -> 8061; LUT ceil(8061 * 17) = 137,037
    # compute 131072 / 8061 = 16.26; memory 32770 / 100 = 327.70 -> memory-bound
    lut = A_TERNARY + math.ceil(math.log2(512))
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 2, scale_bits=16, index_bits=0,
                   lanes=8061, dsp=0, lut_per_lane=lut, ff_per_lane=FF_PER_LUT * lut + FF_TERNARY)
    assert nbytes == 32770 and engine.dsp == 0 and engine.macs_per_dsp == 0 and lut == 17


def test_2_4_ternary():
    report, engine, row = run(Sparsity(2, 4), WeightFormat("ternary"))
    # kept = 128 per row * 512 = 65,536; values 65,536 * 2 = 131,072 bits; scale 16;
    # index 64 * 512 * 2 * 2 = 131,072 bits -> 262,160 bits = 32,770 bytes: exactly dense ternary, since
    # N*ceil(log2 M) = 2*2 = 4 index bits equal the (M-N)*b = 2*2 = 4 value bits saved per group
    # LUT per lane: 8 + ceil(log2 256) = 16 (fan_in = 512/2 kept), + N:M 8*ceil(3/3) + 2 = 10 -> 26
    # lanes: 137040 / 26 = 5270.8 -> 5270; compute 65536 / 5270 = 12.44; memory 327.70 -> memory-bound
    lut = A_TERNARY + math.ceil(math.log2(256)) + A_TERNARY * math.ceil(3 / 3) + math.ceil(math.log2(4))
    nbytes = check(report, engine, row, kept=65536, value_bits=65536 * 2, scale_bits=16,
                   index_bits=64 * 512 * 2 * 2, lanes=5270, dsp=0, lut_per_lane=lut,
                   ff_per_lane=FF_PER_LUT * lut + FF_TERNARY)
    assert nbytes == 32770 and lut == 26
    _, _, dense_row = run(None, WeightFormat("ternary"))
    assert nbytes == dense_row.weight_bytes  # the boundary case of "dense -> N:M never increases bytes"


def test_3_4_int4_costs_more_bytes_than_dense_int4():
    # the exception to "more sparsity never increases bytes": 3:4 INT4 values + index
    # = 3*(4+2)/4 = 4.5 bits/weight > 4. Per row: kept 192, values 192*4 = 768, index 64*3*2 = 384,
    # scales ceil(192/128) = 2 * 16 = 32 -> 1184 bits; dense INT4: 1024 + 32 = 1056 bits
    _, _, nm = run(Sparsity(3, 4), WeightFormat("4", 128))
    _, _, dense = run(None, WeightFormat("4", 128))
    assert nm.weight_bytes == 1184 * 512 // 8 == 75776
    assert dense.weight_bytes == 1056 * 512 // 8 == 67584
    assert nm.weight_bytes > dense.weight_bytes


# ------------------------------------------------------------------ MLGRU block vs attention block
def test_mlgru_block_vs_attention_block():
    fp16_attn = estimate(ModelPlan(), TINY, ACCEL)  # everything FP16, block 0 attention
    fp16_mlgru = estimate(ModelPlan(blocks=(BlockPlan(0, "mlgru"),)), TINY, ACCEL)
    att = next(r for r in fp16_attn.layers if r.name == "model.layers.0.self_attn")
    rec = next(r for r in fp16_mlgru.layers if r.name == "model.layers.0.mlgru")

    # attention lanes, bandwidth-matched (docstring "Datapath"): bytes/cycle * heads / (kv_heads * 2 bytes)
    #   = 100 * 4 / (4 * 2) = 50 lanes, under the cap 0.5 * min(1260 * 0.5, 137040 / 80) = 315;
    # the linear FP16 layers get the rest: min((1260 - 50/0.5) * 0.5, (137040 - 50*80) / 80) = min(580, 1663)
    #   = 580 -> the FP16 engine has 630 lanes, 1260 DSP
    (engine,) = fp16_attn.engines
    assert engine.attention_lanes == 50 and engine.lanes == 630 and engine.dsp == 1260
    # attention row per decode step, L = 64: macs = B*2*heads*head_dim*L = 2*4*64*64 = 32,768;
    # compute = 32768 / 630 + softmax B*heads*L*3/16 = 52.01 + 48 = 100.01 cycles
    # KV read = B*L*2*kv_heads*head_dim*2 bytes = 64*2*4*64*2 = 65,536 bytes -> 655.36 cycles -> memory-bound
    assert att.macs == att.kept_macs == 32768
    assert att.compute_cycles == pytest.approx(32768 / 630 + 4 * 64 * SOFTMAX_OPS / SFU_LANES, rel=1e-12)
    assert att.kv_bytes == att.memory_bytes == 65536
    assert att.memory_cycles == pytest.approx(655.36, rel=1e-12) and att.bound == "memory"
    # MLGRU recurrence: no KV cache, state on chip; compute = B*hidden*7/16 = 256*7/16 = 112 cycles
    assert rec.kv_bytes == rec.memory_bytes == 0 and rec.macs == 0
    assert rec.compute_cycles == 256 * MLGRU_OPS / SFU_LANES == 112 and rec.bound == "compute"
    # the four projections have the same shapes (q,k,v,o and f,c,g,o are all 256 x 256 here), so the
    # decode steps differ by exactly the mixer rows: 655.36 - 112 = 543.36 cycles = 5.66 us at 96 MHz
    delta_ms = (655.36 - 112) / 96e6 * 1e3
    assert fp16_attn.decode_ms_per_token - fp16_mlgru.decode_ms_per_token == pytest.approx(delta_ms, rel=1e-9)
    # twice the context: attention's KV read and compute double (lanes do not change), the recurrence does not
    long = Accelerator(**{**ACCEL.to_dict(), "context_length": 128})
    att2 = next(r for r in estimate(ModelPlan(), TINY, long).layers if r.name == "model.layers.0.self_attn")
    assert att2.memory_bytes == 2 * 65536 and att2.compute_cycles == pytest.approx(2 * att.compute_cycles)
    rec2 = next(r for r in estimate(ModelPlan(blocks=(BlockPlan(0, "mlgru"),)), TINY, long).layers
                if r.name == "model.layers.0.mlgru")
    assert rec2.compute_cycles == rec.compute_cycles


# ------------------------------------------------------------------ input validation
def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unknown_layer_is_named():
    plan = ModelPlan(layers=(LayerPlan("model.layers.5.mlp.up_proj", None, WeightFormat("4")),))
    with pytest.raises(ValueError) as err:
        estimate(plan, TINY, ACCEL)  # TINY has one block (0)
    assert _one_line(err).startswith("plan layer 'model.layers.5.mlp.up_proj' is not a linear layer")


def test_m_not_dividing_in_features_is_rejected():
    plan = ModelPlan(layers=(LayerPlan(LAYER, Sparsity(2, 3), WeightFormat("4")),))
    with pytest.raises(ValueError) as err:
        estimate(plan, TINY, ACCEL)
    assert _one_line(err) == "layer model.layers.0.mlp.gate_proj: M=3 does not divide in_features 256"
    plan = ModelPlan(layers=(LayerPlan("model.layers.0.mlp.down_proj", Sparsity(5, 6), WeightFormat("ternary")),))
    with pytest.raises(ValueError, match=r"^layer model\.layers\.0\.mlp\.down_proj: M=6 does not divide "
                                         r"in_features 512$"):
        estimate(plan, TINY, ACCEL)


def test_m_not_dividing_an_inherited_mlgru_projection_is_rejected():
    # 4 heads of 48: o_proj has in_features 192, the MLGRU o_proj replacing it 256; M = 96 divides only 192
    w = Workload.from_hf_config({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 256,
                                 "num_attention_heads": 4, "head_dim": 48, "intermediate_size": 512,
                                 "vocab_size": 512})
    plan = ModelPlan(layers=(LayerPlan("model.layers.0.self_attn.o_proj", Sparsity(1, 96), WeightFormat("4")),))
    estimate(plan, w, ACCEL)  # attention block: 96 divides 192
    with pytest.raises(ValueError) as err:
        estimate(ModelPlan(layers=plan.layers, blocks=(BlockPlan(0, "mlgru"),)), w, ACCEL)
    assert _one_line(err).startswith("layer model.layers.0.mlgru.o_proj: M=96 does not divide in_features 256")


@pytest.mark.parametrize("clock", [0, -5, 0.0, float("nan")])
def test_non_positive_clock_is_rejected(clock):
    with pytest.raises(ValueError) as err:
        Accelerator("zcu102", clock_mhz=clock)
    assert _one_line(err).startswith("hardware.clock_mhz: ")
    with pytest.raises(ValueError, match=r"^hardware\.clock_mhz: "):
        Accelerator.from_dict({"device": "zcu102", "clock_mhz": clock})


def test_estimate_rejects_a_clock_that_bypassed_validation():
    accel = Accelerator("zcu102")
    object.__setattr__(accel, "clock_mhz", 0)  # a frozen Accelerator changed behind its back
    with pytest.raises(ValueError) as err:
        estimate(ModelPlan(), TINY, accel)
    assert _one_line(err) == "hardware.clock_mhz: 0 is not a positive number of MHz"
