"""Hand-worked examples of the FPGA cost model, one layer per format, and its input validation.

Every expected number is computed here by explicit arithmetic (comments show the numbers), not by
calling hwcost's formulas; each line names the formula of the ``hwcost/model.py`` docstring it checks.
Published figures are written as literals (shared published_fpga.yaml: 2 INT8 MACs and 4 INT4 MACs
per DSP48E2, FP16 scales, FP16 KV cache); the model's documented assumptions (LUTs per lane, vector
unit, row overhead, power coefficients) are read from ``constants.yaml`` into named variables, with
today's values in the comments.

Setup chosen so that the arithmetic is tractable:

* workload: Llama-shaped, 1 block, hidden 256, 4 heads of 64 (4 KV heads), intermediate 512,
  vocab 512, untied lm_head; the example layer is ``model.layers.0.mlp.gate_proj`` (256 -> 512).
* device: ZCU102 (DSP48E2, no shell, 2520 DSP, 274080 LUT, 912 BRAM36, no URAM, DDR4 19.2 GB/s
  reached through four 128-bit S_AXI_HP ports).
* accelerator: 96 MHz, mem_efficiency 0.25, so min(19.2e9 * 0.25, 4 * 128 / 8 * 96e6 = 6.144e9) / 96e6
  = 50 bytes per cycle (the DRAM side binds; the fabric side is the two-memory example's);
  dsp_share 0.5 -> DSP budget 1260; lut_share 0.5 -> LUT budget 137040; batch 1; context 64.
* single-format plans (every linear layer in the format) with the block's mixer an MLGRU, so that
  there is one engine and it gets the whole budget: lanes = min(DSP budget * MACs/DSP,
  LUT budget / LUT per lane) (docstring "Datapath": one engine gets min(D / dsp_e, L / lut_e)).
* every row costs max(compute, memory) + (1 - overlap) * min(compute, memory) + its fixed cycles
  (docstring "Timing"; overlap 1 today: double-buffered weight streaming).
"""

from __future__ import annotations

import math

import pytest

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, Workload, estimate, get_device
from hwcost.devices import constants, parse_devices, user_devices

TINY = Workload.from_hf_config({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 256,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 512,
                                "vocab_size": 512, "tie_word_embeddings": False})
ACCEL = Accelerator("zcu102", clock_mhz=96, mem_efficiency=0.25, dsp_share=0.5, lut_share=0.5,
                    resident="none", batch=1, context_length=64, prompt_length=16)
LAYER = "model.layers.0.mlp.gate_proj"
IN, OUT = 256, 512
BYTES_PER_CYCLE = min(19.2e9 * 0.25, 4 * 128 / 8 * 96e6) / 96e6  # = 50.0 (docstring "Memories": bw / clock)
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
VU = C["vector_unit"]
SFU_LANES = VU["lanes"]                       # 16
SFU_DSP = VU["dsp"]                           # 32 (fixed vector unit)
SOFTMAX_OPS = VU["softmax_ops_per_score"]     # 3
MLGRU_OPS = VU["mlgru_ops_per_channel"]       # 7
NORM_OPS = VU["norm_ops_per_channel"]         # 4
ACT_OPS = VU["activation_ops_per_channel"]    # 4 (+ 1 for the GLU product)
ROPE_OPS = VU["rope_ops_per_value"]           # 3
OP_LATENCY = VU["op_latency_cycles"]          # 40 per vector operation
OPS_PER_BLOCK = VU["ops_per_block"]           # 4
ROW_FIXED = C["timing"]["row_overhead_cycles"]  # 64 per dependent row
OVERLAP = C["timing"]["overlap"]              # 1.0
INFRA = C["infrastructure"]                   # 8000 LUT, 12000 FF, 0 DSP, 8 BRAM36
ZCU102_BRAM36 = 912
# vector-unit rows of TINY (one block): 2 norms * 256 * 4, the SiLU GLU 512 * (4 + 1), rotary (4 + 4) * 64 * 3
VECTOR_MLGRU = (2 * 256 * NORM_OPS + 512 * (ACT_OPS + 1)) / SFU_LANES + OPS_PER_BLOCK * OP_LATENCY  # 288 + 160
VECTOR_ATTENTION = VECTOR_MLGRU + 8 * 64 * ROPE_OPS / SFU_LANES                                    # 448 + 96
FINAL_NORM = 256 * NORM_OPS / SFU_LANES + OP_LATENCY                                              # 64 + 40
RECURRENCE = 256 * MLGRU_OPS / SFU_LANES                                                         # 112


def cycles(compute: float, memory: float, fixed: float) -> float:
    """The overlap model of the docstring, typed here: max + (1 - overlap) * min + fixed."""
    return max(compute, memory) + (1 - OVERLAP) * min(compute, memory) + fixed


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
    assert row.fixed_cycles == ROW_FIXED                      # a fixed 64 cycles per row
    assert row.cycles == pytest.approx(cycles(kept / lanes, nbytes / BYTES_PER_CYCLE, ROW_FIXED), rel=1e-12)
    assert report.resources["dsp"] == dsp + SFU_DSP            # + fixed vector unit, infrastructure has 0 DSP
    return nbytes


# ------------------------------------------------------------------ one layer per format
def test_fp16_dense():
    report, engine, row = run(None, WeightFormat("16"))
    # values: 256*512 kept weights * 16 bits = 2,097,152 bits; no scales, no index -> 262,144 bytes
    # lanes: FP16 MAC = 2 DSP48E2 (0.5 MACs/DSP): 1260 * 0.5 = 630; LUT 630*80 = 50,400 <= 137,040 -> DSP-bound
    # compute 131072 / 630 = 208.05 cycles; memory 262144 / 50 = 5242.88 cycles -> memory-bound
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 16, scale_bits=0, index_bits=0,
                   lanes=630, dsp=1260, lut_per_lane=LUT_FP16, ff_per_lane=FF_PER_LUT * LUT_FP16 + FF_FP16)
    assert nbytes == 262144 and row.bound == "memory" and engine.kernel == "fp16"
    # the whole decode step, every matrix row memory-bound, each + 64 fixed cycles:
    #   embedding row 256*2 = 512 B -> 10.24 + 64
    #   f,c,g,o 256*256*2 = 131,072 B -> 4 * (2621.44 + 64) (compute 65536 / 630 = 104.0)
    #   MLGRU recurrence 256*7/16 = 112; the block's vector row (2*256*4 + 512*5) / 16 + 4*40 = 448
    #   gate, up, down 262,144 B -> 3 * (5242.88 + 64); final norm 256*4/16 + 40 = 104
    #   lm_head 256*512*2 = 262,144 B -> 5242.88 + 64
    f_compute, gate_compute = 65536 / 630, 131072 / 630
    rows = (cycles(0, 512 / 50, ROW_FIXED) + 4 * cycles(f_compute, 131072 / 50, ROW_FIXED)
            + 4 * cycles(gate_compute, 262144 / 50, ROW_FIXED))
    step = rows + RECURRENCE + VECTOR_MLGRU + FINAL_NORM
    assert (RECURRENCE, VECTOR_MLGRU, FINAL_NORM) == (112, 448, 104)
    assert step == pytest.approx(32707.52, rel=1e-12)  # 74.24 + 4 * 2685.44 + 4 * 5306.88 + 112 + 448 + 104
    assert report.decode_ms_per_token == pytest.approx(step / 96e6 * 1e3, rel=1e-12)  # = 0.34070 ms
    assert report.decode_tokens_per_s == pytest.approx(96e6 / step, rel=1e-12)         # = 2935.1 tokens/s
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.mlgru"].compute_cycles == 112
    assert by_name["model.layers.0.vector"].compute_cycles == 448 and by_name["model.layers.0.vector"].memory_bytes == 0
    # prefill of P = 16 tokens: weights read once, 16 x the compute (the LM head once), the embedding row,
    # the recurrence and the vector row per token, the final norm once:
    #   16 * 74.24 + 4 * max(16 * 104.0, 2621.44) + 3 * max(16 * 208.05, 5242.88) + 4 * 64 + (5242.88 + 64)
    #   + 16 * (112 + 448) + 104 = 42,221.12 cycles
    prefill = (16 * cycles(0, 512 / 50, ROW_FIXED) + 4 * cycles(16 * f_compute, 131072 / 50, ROW_FIXED)
               + 3 * cycles(16 * gate_compute, 262144 / 50, ROW_FIXED) + cycles(gate_compute, 262144 / 50, ROW_FIXED)
               + 16 * (RECURRENCE + VECTOR_MLGRU) + FINAL_NORM)
    assert prefill == pytest.approx(42221.12, rel=1e-12)
    assert report.prefill_ms == pytest.approx(prefill / 96e6 * 1e3, rel=1e-12)


def test_int8_dense():
    report, engine, row = run(None, WeightFormat("8", 128))
    # values 131,072 * 8 = 1,048,576 bits; scales ceil(256/128) = 2 per row * 512 rows * 16 = 16,384 bits
    # -> 1,064,960 bits = 133,120 bytes (8.125 bits/weight)
    # lanes: 2 INT8 MACs per DSP48E2 (WP486): 1260 * 2 = 2520; LUT 2520*6 = 15,120 -> DSP-bound
    # compute 131072 / 2520 = 52.01; memory 133120 / 50 = 2662.4 -> memory-bound
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 8, scale_bits=2 * 512 * 16, index_bits=0,
                   lanes=2520, dsp=1260, lut_per_lane=LUT_INT, ff_per_lane=FF_PER_LUT * LUT_INT + FF_INT)
    assert nbytes == 133120 and row.bound == "memory"


def test_int4_g128_dense():
    report, engine, row = run(None, WeightFormat("4", 128))
    # values 131,072 * 4 = 524,288 bits; scales 2 * 512 * 16 = 16,384 bits -> 540,672 bits = 67,584 bytes
    # lanes: 4 INT4 MACs per DSP48E2 (FINN mvu_4sx4u): 1260 * 4 = 5040; LUT 5040*6 = 30,240 -> DSP-bound
    # compute 131072 / 5040 = 26.006; memory 67584 / 50 = 1351.68 -> memory-bound
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
    a16 = Accelerator(**{**ACCEL.to_dict(), "act_bits": 16})
    report = estimate(single_format_plan(None, WeightFormat("4", 128)), TINY, a16)
    engine, row = report.engines[0], next(r for r in report.layers if r.name == LAYER)
    check(report, engine, row, kept=131072, value_bits=131072 * 4, scale_bits=2 * 512 * 16, index_bits=0,
          lanes=2520, dsp=1260, lut_per_lane=LUT_INT, ff_per_lane=FF_PER_LUT * LUT_INT + FF_INT)
    # (no energy per MAC any more: power is charged per used resource, see test_power_breakdown)
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
    # compute 65536 / 5040 = 13.003; memory 50176 / 50 = 1003.52 -> memory-bound
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
    # compute 131072 / 8061 = 16.26; memory 32770 / 50 = 655.40 -> memory-bound
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
    # lanes: 137040 / 26 = 5270.8 -> 5270; compute 65536 / 5270 = 12.44; memory 655.40 -> memory-bound
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

    # attention lanes, bandwidth-matched (docstring "Datapath"): ceil(bytes/cycle * heads / (kv_heads * 2 bytes))
    #   = ceil(50 * 4 / (4 * 2)) = 25 lanes, under the cap 0.5 * min(1260 * 0.5, 137040 / 80) = 315;
    # the linear FP16 layers get the rest: min((1260 - 25/0.5) * 0.5, (137040 - 25*80) / 80) = min(605, 1688)
    #   = 605 -> the FP16 engine has 630 lanes, 1260 DSP
    (engine,) = fp16_attn.engines
    assert engine.attention_lanes == 25 and engine.lanes == 630 and engine.dsp == 1260
    # attention row per decode step, L = 64: macs = B*2*heads*head_dim*L = 2*4*64*64 = 32,768 on the FP16 lanes,
    # compute 32768 / 630 = 52.01; fixed 64 + one vector op 40 + softmax B*heads*L*3/16 = 48 -> 152 cycles
    # KV read = B*L*2*kv_heads*head_dim*2 bytes = 64*2*4*64*2 = 65,536 bytes -> 1310.72 cycles -> memory-bound
    assert att.macs == att.kept_macs == 32768
    assert att.compute_cycles == pytest.approx(32768 / 630, rel=1e-12)
    assert att.fixed_cycles == ROW_FIXED + OP_LATENCY + 4 * 64 * SOFTMAX_OPS / SFU_LANES == 152
    assert att.kv_bytes == att.memory_bytes == 65536
    assert att.memory_cycles == pytest.approx(1310.72, rel=1e-12) and att.bound == "memory"
    # MLGRU recurrence: no KV cache, state on chip; compute = B*hidden*7/16 = 256*7/16 = 112 cycles, no fixed
    assert rec.kv_bytes == rec.memory_bytes == 0 and rec.macs == 0
    assert rec.compute_cycles == RECURRENCE == 112 and rec.bound == "compute"
    # the four projections have the same shapes (q,k,v,o and f,c,g,o are all 256 x 256 here), so the
    # decode steps differ by exactly the mixer rows and the vector rows (rotary only with attention):
    #   (1310.72 + 152) + 544 - (112 + 448) = 1446.72 cycles = 15.07 us at 96 MHz
    assert VECTOR_ATTENTION == 544
    delta = cycles(32768 / 630, 1310.72, 104) + 48 + VECTOR_ATTENTION - (RECURRENCE + VECTOR_MLGRU)
    assert delta == pytest.approx(1446.72, rel=1e-12)
    delta_ms = delta / 96e6 * 1e3
    assert fp16_attn.decode_ms_per_token - fp16_mlgru.decode_ms_per_token == pytest.approx(delta_ms, rel=1e-9)
    # twice the context: attention's KV read and compute double (lanes do not change), the recurrence does not
    long = Accelerator(**{**ACCEL.to_dict(), "context_length": 128})
    att2 = next(r for r in estimate(ModelPlan(), TINY, long).layers if r.name == "model.layers.0.self_attn")
    assert att2.memory_bytes == 2 * 65536 and att2.compute_cycles == pytest.approx(2 * att.compute_cycles)
    rec2 = next(r for r in estimate(ModelPlan(blocks=(BlockPlan(0, "mlgru"),)), TINY, long).layers
                if r.name == "model.layers.0.mlgru")
    assert rec2.compute_cycles == rec.compute_cycles


# ------------------------------------------------------------------ v2 design fields
def with_fields(**fields) -> Accelerator:
    return Accelerator(**{**ACCEL.to_dict(), **fields})


def gate_row(report):
    return next(r for r in report.layers if r.name == LAYER)


def test_resident_layer_in_the_weight_buffer():
    # resident: a regex holding gate_proj on chip (docstring "Weight placement"); every layer INT4 g128
    plan = single_format_plan(None, WeightFormat("4", 128))
    streamed = estimate(plan, TINY, ACCEL)
    report = estimate(plan, TINY, with_fields(resident=r"model\.layers\.0\.mlp\.gate_proj"))
    row = gate_row(report)
    # 67,584 bytes (test_int4_g128_dense) in the buffer: no off-chip read, the row costs its compute + 64
    assert row.resident and row.weight_bytes == 67584 and row.memory_bytes == 0 and row.memory_cycles == 0
    assert row.cycles == pytest.approx(131072 / 5040 + ROW_FIXED, rel=1e-12) and row.bound == "compute"
    assert all(r.memory_bytes == r.weight_bytes and not r.resident for r in report.layers
               if r.kernel == "int4/g128" and r.name != LAYER)
    assert report.resident_bytes == 67584
    # the buffer: bram_share 0.7 of 912 BRAM36 (ZCU102 has no URAM): 0.7 * 912 * 36 * 1024 / 8 = 2,941,747.2 B
    assert report.weight_buffer_bytes == int(0.7 * ZCU102_BRAM36 * 36 * 1024 / 8) == 2941747
    # BRAM36: infrastructure 8 + activation buffers ceil((2 * 512 + 256) * 2 B * 8 / 36864) = 1
    #   + the resident weights ceil(67584 * 8 / 36864) = ceil(14.67) = 15 -> 24; no URAM
    assert report.resources["bram36"] == INFRA["bram36"] + 1 + 15 == 24 and report.resources["uram"] == 0
    assert streamed.resources["bram36"] == INFRA["bram36"] + 1
    # decode: gate_proj's 1351.68 memory cycles become its 26.006 compute cycles
    saved = (67584 / 50 - 131072 / 5040) / 96e6 * 1e3
    assert streamed.decode_ms_per_token - report.decode_ms_per_token == pytest.approx(saved, rel=1e-9)
    assert report.fits and report.violations == []
    # a buffer of 65,536 bytes holds less than the 67,584 resident: infeasible, weight_buffer the only violation
    over = estimate(plan, TINY, with_fields(resident=r"model\.layers\.0\.mlp\.gate_proj", weight_buffer_bytes=65536))
    assert not over.fits and over.violations == ["weight_buffer"] and over.weight_buffer_bytes == 65536
    assert over.constraint_violation == pytest.approx(67584 / 65536 - 1, rel=1e-12)  # = 0.03125


def test_table_lookup_ternary_engine():
    # ternary_engine: table_lookup (kernels docstring): g weights per lookup, one lane = one MAC per cycle
    report = estimate(single_format_plan(None, WeightFormat("ternary")), TINY,
                      with_fields(ternary_engine="table_lookup"))
    (engine,) = report.engines
    g = C["ternary_table"]["group"]  # 4 (assumption: T-MAC / TeLLMe groups)
    # table = (A + ceil(log2 g)) * ceil(ceil(3^g / 2) / 64) = (8 + 2) * ceil(41 / 64) = 10 LUT (LUTRAM)
    # adder = A + ceil(log2 g) + ceil(log2 max(fan_in / g, 2)) = 8 + 2 + ceil(log2 128) = 17 (fan_in: down_proj 512)
    # LUT per lane = (10 + 17) / 4 = 6.75; lanes floor(137040 / 6.75) = floor(20302.2) = 20302, no DSP
    table = (A_TERNARY + math.ceil(math.log2(g))) * math.ceil(math.ceil(3 ** g / 2) / 64)
    adder = A_TERNARY + math.ceil(math.log2(g)) + math.ceil(math.log2(512 / g))
    lut = (table + adder) / g
    assert (table, adder, lut) == (10, 17, 6.75)
    assert engine.lut_per_lane == lut and engine.lanes == 20302 and engine.dsp == 0
    assert engine.lut == math.ceil(20302 * 6.75) == 137039                 # 137,038.5 -> 137,039
    assert engine.ff == math.ceil(20302 * (FF_PER_LUT * 6.75 + FF_TERNARY))  # every LUT output registered
    # compute: kept MACs + the table builds, per g inputs (3^g - 1) / 2 = 40 adds, on the same lanes
    #   gate_proj: (131072 + ceil(256 / 4) * 40 = 2560) / 20302 = 6.582; down_proj: (131072 + 128 * 40) / 20302
    row = gate_row(report)
    assert row.kept_macs == 131072
    assert row.compute_cycles == pytest.approx((131072 + 64 * (3 ** g - 1) / 2) / 20302, rel=1e-12)
    down = next(r for r in report.layers if r.name == "model.layers.0.mlp.down_proj")
    assert down.compute_cycles == pytest.approx((131072 + 128 * 40) / 20302, rel=1e-12)
    # storage is unchanged (32,770 bytes, test_ternary_dense): memory 655.40 cycles -> memory-bound
    assert row.weight_bytes == 32770 and row.bound == "memory"


def test_base3_ternary_packing():
    # ternary_storage: base3 (kernels docstring): 5 trits per byte in each output row, ceil(kept / 5) * 8 bits
    report = estimate(single_format_plan(None, WeightFormat("ternary")), TINY, with_fields(ternary_storage="base3"))
    row = gate_row(report)
    # gate_proj: ceil(256 / 5) = 52 bytes per row * 512 rows = 212,992 bits + 16 (one FP16 scale) -> 26,626 bytes
    #   (1.625 bits/weight: 52 bytes hold 260 trits, 4 unused; vs 32,770 bytes as 2-bit codes)
    assert row.weight_bytes == math.ceil((math.ceil(256 / 5) * 8 * 512 + 16) / 8) == 26626
    assert row.memory_cycles == pytest.approx(26626 / 50, rel=1e-12)  # = 532.52
    down = next(r for r in report.layers if r.name == "model.layers.0.mlp.down_proj")
    assert down.weight_bytes == math.ceil((math.ceil(512 / 5) * 8 * 256 + 16) / 8) == 26370  # 103 B per row
    assert report.engines[0].lanes == 8061  # the datapath is the 2-bit one (test_ternary_dense)
    # 2:4 base-3: kept 128 per row -> ceil(128 / 5) = 26 bytes * 8 * 512 = 106,496 bits + index 131,072 + 16
    nm = gate_row(estimate(single_format_plan(Sparsity(2, 4), WeightFormat("ternary")), TINY,
                           with_fields(ternary_storage="base3")))
    assert nm.weight_bytes == (26 * 8 * 512 + 64 * 512 * 2 * 2 + 16) // 8 == 29698


def test_asymmetric_int4_zero_points():
    # symmetric: false adds a k-bit zero point per group (kernels docstring, GPTQ's qzeros)
    report, engine, row = run(None, WeightFormat("4", 128, symmetric=False))
    # values 131,072 * 4 = 524,288; scales 2 groups * 512 rows * 16 = 16,384; zeros 2 * 512 * 4 = 4,096 bits
    # -> 544,768 bits = 68,096 bytes (512 more than symmetric); the lanes are the INT4 ones
    nbytes = check(report, engine, row, kept=131072, value_bits=131072 * 4, scale_bits=2 * 512 * (16 + 4),
                   index_bits=0, lanes=5040, dsp=1260, lut_per_lane=LUT_INT, ff_per_lane=FF_PER_LUT * LUT_INT + FF_INT)
    assert nbytes == 68096 == 67584 + 2 * 512 * 4 // 8 and row.kernel == "int4/g128/asym"
    assert row.memory_cycles == pytest.approx(1361.92, rel=1e-12)


TWO_MEMORIES = {"devices": {"two-mem": {
    "vendor": "amd", "part": "example", "lut": 274080, "ff": 548160, "dsp": 2520, "dsp_kind": "dsp48e2",
    "bram_blocks": 912, "bram_block_kbits": 36, "uram": 0, "static_w": 6, "shell_overhead": 0.0,
    "memories": {"pl": {"kind": "ddr4", "gbps": 17, "gb": 4, "channels": 1, "port_bits": 512},
                 "ps": {"kind": "lpddr4", "gbps": 8, "gb": 2, "channels": 4, "port_bits": 128}}}}}


def test_two_memories_interleaved():
    # memory: 'pl+ps' (docstring "Memories"): bw_i = min(peak_i * eff_i, channels_i * port_bits_i / 8 * clock),
    # eff_i the constants.yaml default of the memory's kind (fitted by calibration)
    eff_ddr4, eff_lpddr4 = C["mem_efficiency"]["ddr4"], C["mem_efficiency"]["lpddr4"]
    pl = min(17e9 * eff_ddr4, 1 * 512 / 8 * 200e6)    # one 512-bit AXI port at 200 MHz: 12.8e9
    ps = min(8e9 * eff_lpddr4, 4 * 128 / 8 * 200e6)   # four 128-bit ports, 12.8e9 > 8e9 * eff: the DRAM binds
    assert pl == 12.8e9 and eff_ddr4 > 12.8 / 17      # the port binds the PL DDR4 for any efficiency above 0.753
    assert ps == 8e9 * eff_lpddr4
    plan = single_format_plan(None, WeightFormat("4", 128))
    with user_devices(parse_devices(TWO_MEMORIES)):
        both = estimate(plan, TINY, Accelerator("two-mem", clock_mhz=200, memory="pl+ps", dsp_share=0.5, lut_share=0.5,
                                                context_length=64))
        one = estimate(plan, TINY, Accelerator("two-mem", clock_mhz=200, dsp_share=0.5, lut_share=0.5,
                                               context_length=64))  # default: the first listed, pl
    assert both.memory == "pl+ps" and one.memory == "pl"
    assert both.memory_bytes_per_s == {"pl": pl, "ps": pytest.approx(ps, rel=1e-12)}
    bpc = (pl + ps) / 200e6  # 64 + 40 * eff_lpddr4 bytes per cycle
    assert both.bytes_per_cycle == pytest.approx(bpc, rel=1e-12) and one.bytes_per_cycle == 64
    assert gate_row(both).memory_cycles == pytest.approx(67584 / bpc, rel=1e-12)
    assert gate_row(one).memory_cycles == 67584 / 64 == 1056
    assert both.offchip_capacity_bytes == (4 + 2) * 2 ** 30 and one.offchip_capacity_bytes == 4 * 2 ** 30
    # off-chip energy: the step's bytes split in proportion to bandwidth, each at its kind's pJ/bit
    #   bytes = embedding row 512 + f,c,g,o 4 * 33,792 + gate, up, down, lm_head 4 * 67,584 = 406,016
    step_bytes = 512 + 4 * (256 * 256 * 4 + 2 * 256 * 16) // 8 + 4 * 67584
    assert step_bytes == 406016 == sum(r.memory_bytes for r in both.layers)
    pj = C["offchip_pj_per_bit"]
    offchip = step_bytes * 8 * (pl * pj["ddr4"] + ps * pj["lpddr4"]) / (pl + ps) * 1e-12
    assert both.energy_breakdown_j["offchip"] == pytest.approx(offchip, rel=1e-9)
    assert one.energy_breakdown_j["offchip"] == pytest.approx(step_bytes * 8 * pj["ddr4"] * 1e-12, rel=1e-9)


def test_power_breakdown():
    # hwcost.power (XPE style): static W of the board + dynamic W of the used LUT, FF, DSP and the clock tree,
    # * dynamic_scale; energy adds off-chip bits * pJ/bit and on-chip bits read * pJ/bit. FP16 plan, toggle 0.25.
    report = estimate(single_format_plan(None, WeightFormat("16")), TINY, with_fields(toggle_rate=0.25))
    p = C["power"]
    coef = p["dynamic_uw_per_mhz"]["ultrascale_plus"]  # uW/MHz per LUT, FF, DSP, and per FF for the clock tree
    # used: FP16 engine 630 lanes (test_fp16_dense) + infrastructure + vector unit
    lut = 630 * LUT_FP16 + INFRA["lut"] + VU["lut"]                          # 50,400 + 8,000 + 6,000 = 64,400
    ff = 630 * (FF_PER_LUT * LUT_FP16 + FF_FP16) + INFRA["ff"] + VU["ff"]    # 80,640 + 12,000 + 9,000 = 101,640
    dsp = 1260 + INFRA["dsp"] + SFU_DSP                                      # 1,292
    assert (report.resources["lut"], report.resources["ff"], report.resources["dsp"]) == (lut, ff, dsp)
    assert (lut, ff, dsp) == (64400, 101640, 1292)
    activity = 0.25 / p["reference_toggle"]  # 0.25 / 0.125 = 2 on LUT, FF, DSP; none on the clock tree
    dynamic = ((lut * coef["lut"] + ff * coef["ff"] + dsp * coef["dsp"]) * 96 * 1e-6 * activity
               + ff * coef["clock_per_ff"] * 96 * 1e-6) * p["dynamic_scale"]
    static = get_device("zcu102").static_w  # 8 W (assumption: board idle with Linux)
    step_s = 32707.52 / 96e6  # the decode step of test_fp16_dense (the toggle rate changes no cycle)
    assert report.decode_ms_per_token == pytest.approx(step_s * 1e3, rel=1e-12)
    # off-chip: embedding row 512 + f,c,g,o 4 * 131,072 + gate, up, down, lm_head 4 * 262,144 = 1,573,376 bytes
    offchip = (512 + 4 * 131072 + 4 * 262144) * 8 * C["offchip_pj_per_bit"]["ddr4"] * 1e-12
    # on-chip: FP16 activations in and out of every linear row from BRAM (no resident weights):
    #   (4 * (256 + 256) + 2 * (256 + 512) + (512 + 256) + (256 + 512)) * 2 bytes = 10,240 bytes
    onchip = 10240 * 8 * p["onchip_pj_per_bit"]["ultrascale_plus"]["bram36"] * 1e-12
    expected = {"static": static, "dynamic": dynamic, "offchip": offchip / step_s, "onchip": onchip / step_s,
                "host": 0.0}
    assert report.power_breakdown_w.keys() == expected.keys()
    for key, watts in expected.items():
        assert report.power_breakdown_w[key] == pytest.approx(watts, rel=1e-9, abs=1e-12), key
    energy = (static + dynamic) * step_s + offchip + onchip
    assert report.j_per_token == pytest.approx(energy, rel=1e-9)           # batch 1
    assert report.power_w == pytest.approx(energy / step_s, rel=1e-9)
    # with the default toggle (the reference rate) only the LUT/FF/DSP part halves; the clock tree stays
    default = estimate(single_format_plan(None, WeightFormat("16")), TINY, ACCEL)
    clock_tree = ff * coef["clock_per_ff"] * 96 * 1e-6 * p["dynamic_scale"]
    assert default.power_breakdown_w["dynamic"] == pytest.approx((dynamic - clock_tree) / 2 + clock_tree, rel=1e-9)


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
