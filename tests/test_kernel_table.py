"""The per-layer kernel table (hwcost.kernel_table): its JSON against hand-worked figures of a mixed plan, the
C++ header compiled with Debian's g++ (-std=c++17) and, compiled into a program that prints every value, equal
to the JSON table; named constants used as template arguments; ``dse hwcost kernels``.

The export side (kernels.json and kernels.hpp in a ``dse export`` bundle) is tested in test_export_bundle.py."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dse.cli import main
from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, Workload, estimate
from hwcost.devices import parse_devices, user_devices
from hwcost.kernel_table import (bundle_files, bundle_files_of_records, cpp_header, cpp_identifiers, cpp_string,
                                 kernel_table)

CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1024, "tie_word_embeddings": False}
"""A small Llama shape: q/o 256x256, k/v 128x256 (2 KV heads of 64), gate/up 512x256, down 256x512, lm_head
1024x256; an MLGRU's projections 256x256."""
B0, B1 = "model.layers.0", "model.layers.1"
RESIDENT = r"model\.layers\.0\..*"


def lp(name: str, fmt: str, group: int = 128, sparsity: Sparsity | None = None, symmetric: bool = True):
    return LayerPlan(name, sparsity, WeightFormat(fmt, group, symmetric))


PLAN = ModelPlan(layers=(
    lp(f"{B0}.self_attn.q_proj", "8"),
    lp(f"{B0}.self_attn.k_proj", "4", 32),
    lp(f"{B0}.self_attn.v_proj", "4", 128, symmetric=False),
    lp(f"{B0}.self_attn.o_proj", "4", 128, Sparsity(2, 4)),
    lp(f"{B0}.mlp.gate_proj", "8", 64, Sparsity(4, 8)),
    lp(f"{B0}.mlp.up_proj", "ternary"),
    lp(f"{B1}.self_attn.k_proj", "4", 128),           # block 1 is an MLGRU: c_proj inherits this
    lp(f"{B1}.self_attn.o_proj", "4", 32, Sparsity(2, 4)),  # and o_proj this
    lp(f"{B1}.mlgru.f_proj", "ternary"),
    lp(f"{B1}.mlp.gate_proj", "3", 64),
), blocks=(BlockPlan(1, "mlgru"),))
"""INT8, INT4 with groups 32 and 128 (one asymmetric), 2:4 and 4:8, ternary, INT3, MLGRU projections named and
inherited, lm_head left FP16."""

# name, kind, block, format, bits, group, symmetric, n, m, rows, cols, weight bytes; worked by hand from
# hwcost.kernels' storage formula (16-bit scales, k-bit zero points, ceil(log2 M) index bits per kept weight)
EXPECTED = [
    # 256x256 INT8 g128: 65536 values + 2 groups x 256 rows x 2 B
    (f"{B0}.self_attn.q_proj", "q", 0, "int", 8, 128, True, 1, 1, 256, 256, 65536 + 1024),
    # 128x256 INT4 g32: 16384 + 8 x 128 x 2
    (f"{B0}.self_attn.k_proj", "k", 0, "int", 4, 32, True, 1, 1, 128, 256, 16384 + 2048),
    # asymmetric: 2 groups x 128 rows x (16 + 4) bits = 640 B of scales and zero points
    (f"{B0}.self_attn.v_proj", "v", 0, "int", 4, 128, False, 1, 1, 128, 256, 16384 + 640),
    # 2:4: 128 kept per row: 16384 values + 1 x 256 x 2 scales + 64 x 256 x 2 x 2 bits index
    (f"{B0}.self_attn.o_proj", "o", 0, "int", 4, 128, True, 2, 4, 256, 256, 16384 + 512 + 8192),
    # 4:8 INT8 g64, 512x256: 128 kept per row: 65536 + 2 x 512 x 2 + 32 x 512 x 4 x 3 bits
    (f"{B0}.mlp.gate_proj", "gate", 0, "int", 8, 64, True, 4, 8, 512, 256, 65536 + 2048 + 24576),
    # ternary 2-bit codes + one FP16 scale
    (f"{B0}.mlp.up_proj", "up", 0, "ternary", 2, 0, True, 1, 1, 512, 256, 32768 + 2),
    (f"{B0}.mlp.down_proj", "down", 0, "fp16", 16, 0, True, 1, 1, 256, 512, 262144),
    (f"{B1}.mlgru.f_proj", "mlgru_f", 1, "ternary", 2, 0, True, 1, 1, 256, 256, 16384 + 2),
    (f"{B1}.mlgru.c_proj", "mlgru_c", 1, "int", 4, 128, True, 1, 1, 256, 256, 32768 + 1024),
    (f"{B1}.mlgru.g_proj", "mlgru_g", 1, "fp16", 16, 0, True, 1, 1, 256, 256, 131072),
    (f"{B1}.mlgru.o_proj", "mlgru_o", 1, "int", 4, 32, True, 2, 4, 256, 256, 16384 + 2048 + 8192),
    # INT3 g64, 512x256: 49152 + 4 x 512 x 2
    (f"{B1}.mlp.gate_proj", "gate", 1, "int", 3, 64, True, 1, 1, 512, 256, 49152 + 4096),
    (f"{B1}.mlp.up_proj", "up", 1, "fp16", 16, 0, True, 1, 1, 512, 256, 262144),
    (f"{B1}.mlp.down_proj", "down", 1, "fp16", 16, 0, True, 1, 1, 256, 512, 262144),
    ("lm_head", "head", -1, "fp16", 16, 0, True, 1, 1, 1024, 256, 524288),
]


@pytest.fixture(scope="module")
def costed():
    """(workload, accelerator, report, table) of PLAN on a KV260 decoding 2 sequences, block 0 resident."""
    workload = Workload.from_hf_config(CONFIG)
    accel = Accelerator("kria-kv260", batch=2, resident=RESIDENT)
    report = estimate(PLAN, workload, accel)
    return workload, accel, report, kernel_table(PLAN, workload, accel, report)


def test_rows_match_hand_worked_figures(costed):
    _, _, _, table = costed
    keys = ("name", "kind", "block", "format", "bits", "group_size", "symmetric", "n", "m", "rows", "cols",
            "weight_bytes")
    assert [tuple(row[k] for k in keys) for row in table["layers"]] == [row for row in EXPECTED]
    for row, (*_, n, m, rows, cols, _) in zip(table["layers"], EXPECTED):
        assert row["kept_macs"] == rows * cols * n // m, row["name"]
        assert row["act_bits"] == (16 if row["format"] == "fp16" else 8)  # the default INT8 activations
        assert row["resident"] == row["name"].startswith(f"{B0}.")
        assert row["on_fpga"] and (row["memory_cycles"] == 0) == row["resident"]
    assert table["format"] == "dse-kernel-table" and table["version"] == 1
    assert table["model"] == {"model_type": "llama", "family": "llama", "layers": 2, "hidden": 256, "heads": 4,
                              "kv_heads": 2, "head_dim": 64, "intermediate": 512, "vocab": 1024}
    assert table["accelerator"] == {"device": "kria-kv260", "clock_mhz": 300.0, "act_bits": 8,
                                    "ternary_engine": "adder_tree", "ternary_storage": "2bit", "batch": 2,
                                    "context_length": 512, "kv_bits": 16, "resident": RESIDENT, "memory": "ddr4"}


def test_rows_carry_the_cost_models_figures_and_engines(costed):
    """Every figure is the report's (per step of 2 sequences: kept MACs twice the per-token figure), and each
    row names the engine that runs it: INT4 g32, INT4 g128 and INT3 share the dense int4 lanes (DSP48E2 packs
    int3 like int4), 2:4 INT4 is another engine, INT8 and 4:8 INT8 two more."""
    _, _, report, table = costed
    cost = {row.name: row for row in report.layers}
    for row in table["layers"]:
        c = cost[row["name"]]
        assert (row["label"], row["weight_bytes"], row["resident"], row["bound"]) == (
            c.kernel, c.weight_bytes, c.resident, c.bound)
        assert (row["compute_cycles"], row["memory_cycles"], row["decode_cycles"]) == (
            c.compute_cycles, c.memory_cycles, c.cycles)
        assert 2 * row["kept_macs"] == c.kept_macs
        engine = report.engines[row["engine"]]
        assert (row["lanes"], row["engine_class"]) == (engine.lanes, engine.kernel) and row["lanes"] > 0
        assert engine.sparsity == ("dense" if row["m"] == 1 else f"{row['n']}:{row['m']}")
    by = {row["name"]: row for row in table["layers"]}
    dense_int4 = {by[f"{B0}.self_attn.k_proj"]["engine"], by[f"{B0}.self_attn.v_proj"]["engine"],
                  by[f"{B1}.mlgru.c_proj"]["engine"], by[f"{B1}.mlp.gate_proj"]["engine"]}
    assert len(dense_int4) == 1 and by[f"{B1}.mlp.gate_proj"]["engine_class"] == "int4"
    assert by[f"{B0}.self_attn.o_proj"]["engine"] == by[f"{B1}.mlgru.o_proj"]["engine"] not in dense_int4
    assert len({by[f"{B0}.self_attn.q_proj"]["engine"], by[f"{B0}.mlp.gate_proj"]["engine"]}) == 2
    assert [(e["kernel"], e["n"], e["m"], e["lanes"]) for e in table["engines"]] == [
        (e.kernel, *((1, 1) if e.sparsity == "dense" else map(int, e.sparsity.split(":"))), e.lanes)
        for e in report.engines]


def test_host_lm_head_has_no_fpga_kernel():
    workload = Workload.from_hf_config(CONFIG)
    accel = Accelerator("kria-kv260", lm_head="host")
    head = kernel_table(PLAN, workload, accel, estimate(PLAN, workload, accel))["layers"][-1]
    assert (head["name"], head["on_fpga"], head["engine"], head["engine_class"], head["lanes"]) == (
        "lm_head", False, -1, "host", 0)
    assert head["kept_macs"] == 1024 * 256 and head["weight_bytes"] == 524288  # the layer's own figures


def test_a_report_of_another_plan_is_refused(costed):
    workload, accel, _, _ = costed
    other = estimate(ModelPlan(), workload, accel)
    with pytest.raises(ValueError, match=r"does not belong to this plan: layer model\.layers\.0\.self_attn\.q_proj"):
        kernel_table(PLAN, workload, accel, other)


def test_identifiers_and_strings():
    assert cpp_identifiers(["model.layers.0.q", "model_layers_0_q", "model..layers.0.q", "9x", "..."]) == [
        "layer_model_layers_0_q", "layer_model_layers_0_q_2", "layer_model_layers_0_q_3", "layer_9x",
        "layer_unnamed"]
    assert cpp_string('a"b\\c?d\n\té') == '"a\\"b\\\\c\\?d\\012\\011\\303\\251"'


GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

PRINTER = r"""
#include "kernels.hpp"

#include <array>
#include <cstdio>
#include <type_traits>

using namespace dse_kernels;

// named constants as template arguments and in constant expressions (worked by hand from the plan)
template <uint32_t G> struct GroupTag { static constexpr uint32_t value = G; };
static_assert(GroupTag<layer_model_layers_0_self_attn_k_proj::kGroupSize>::value == 32, "k_proj group");
static_assert(std::integral_constant<uint8_t, layer_model_layers_0_self_attn_k_proj::kBits>::value == 4, "bits");
static_assert(layer_model_layers_0_self_attn_o_proj::kN == 2 && layer_model_layers_0_self_attn_o_proj::kM == 4, "");
static_assert(layer_model_layers_0_self_attn_o_proj::kKeptMacs == 256ULL * 256 * 2 / 4, "kept MACs");
static_assert(layer_model_layers_1_mlgru_f_proj::kFormat == Format::TERNARY, "ternary");
static_assert(!layer_model_layers_0_self_attn_v_proj::kSymmetric, "asymmetric");
static_assert(layer_lm_head::kFormat == Format::FP16 && layer_lm_head::kBlock == -1, "fp16 head");
static_assert(kLayers[layer_lm_head::kIndex].rows == 1024, "lm_head rows");
static_assert(kNumLayers == 15 && kHidden == 256, "shape");
static std::array<int, layer_model_layers_0_mlp_gate_proj::kM> eight_wide{};
static_assert(eight_wide.size() == 8, "4:8");

static void str(const char* s) {
  std::putchar('"');
  for (const unsigned char* p = reinterpret_cast<const unsigned char*>(s); *p; ++p) {
    if (*p == '"' || *p == '\\') std::printf("\\%c", *p);
    else if (*p < 0x20) std::printf("\\u%04x", *p);
    else std::putchar(*p);
  }
  std::putchar('"');
}
static void key(const char* k) { str(k); std::printf(": "); }
static void s(const char* k, const char* v) { key(k); str(v); std::printf(", "); }
static void u(const char* k, unsigned long long v) { key(k); std::printf("%llu, ", v); }
static void i(const char* k, long long v) { key(k); std::printf("%lld, ", v); }
static void b(const char* k, bool v) { key(k); std::printf("%s, ", v ? "true" : "false"); }
static void d(const char* k, double v) { key(k); std::printf("%.17g, ", v); }
static const char* format_name(Format f) {
  switch (f) {
    case Format::FP16: return "fp16";
    case Format::INT: return "int";
    case Format::TERNARY: return "ternary";
  }
  return "?";
}
static const char* bound_name(Bound x) { return x == Bound::MEMORY ? "memory" : "compute"; }

int main() {
  // one JSON object (a trailing ", " before each closing brace is removed by the test)
  std::printf("{");
  s("format", "dse-kernel-table"); u("version", kTableVersion);
  key("model"); std::printf("{");
  s("model_type", kModelType); s("family", "llama"); u("layers", kNumBlocks); u("hidden", kHidden);
  u("heads", kHeads); u("kv_heads", kKvHeads); u("head_dim", kHeadDim); u("intermediate", kIntermediate);
  u("vocab", kVocab); std::printf("}, ");
  key("accelerator"); std::printf("{");
  s("device", kDevice); d("clock_mhz", kClockMHz); u("act_bits", kActBits); s("ternary_engine", kTernaryEngine);
  s("ternary_storage", kTernaryStorage); u("batch", kBatch); u("context_length", kContextLength);
  u("kv_bits", kKvBits); s("resident", kResidentPattern); s("memory", kMemory); std::printf("}, ");
  key("engines"); std::printf("[");
  for (std::size_t e = 0; e < kNumEngines; ++e) {
    const Engine& x = kEngines[e];
    std::printf("{"); s("label", x.label); s("kernel", x.kernel); u("n", x.n); u("m", x.m); u("lanes", x.lanes);
    u("attention_lanes", x.attention_lanes); std::printf("}, ");
  }
  std::printf("], ");
  key("layers"); std::printf("[");
  for (std::size_t l = 0; l < kNumLayers; ++l) {
    const Layer& x = kLayers[l];
    std::printf("{");
    s("name", x.name); s("kind", x.kind); s("label", x.label); i("block", x.block); s("format", format_name(x.format));
    u("bits", x.bits); u("group_size", x.group_size); b("symmetric", x.symmetric); u("n", x.n); u("m", x.m);
    u("rows", x.rows); u("cols", x.cols); u("kept_macs", x.kept_macs); u("act_bits", x.act_bits);
    i("engine", x.engine); s("engine_class", x.engine_class); u("lanes", x.lanes); b("on_fpga", x.on_fpga);
    b("resident", x.resident); u("weight_bytes", x.weight_bytes); d("compute_cycles", x.compute_cycles);
    d("memory_cycles", x.memory_cycles); d("decode_cycles", x.decode_cycles); s("bound", bound_name(x.bound));
    std::printf("}, ");
  }
  std::printf("], ");
  std::printf("}\n");
  return 0;
}
"""


def compile_header(tmp: Path, header: str) -> Path:
    """``kernels.hpp`` in ``tmp``, checked with g++ -std=c++17 -fsyntax-only (warnings are errors)."""
    path = tmp / "kernels.hpp"
    path.write_text(header)
    proc = subprocess.run([GXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-pedantic", "-Werror", "-x",
                           "c++", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return path


def printed_table(tmp: Path, header: str) -> dict:
    """Every value of ``header`` as the program PRINTER prints it, read back as JSON."""
    compile_header(tmp, header)
    (tmp / "main.cpp").write_text(PRINTER)
    exe = tmp / "print_kernels"
    proc = subprocess.run([GXX, "-std=c++17", "-Wall", "-Wextra", "-o", str(exe), str(tmp / "main.cpp")],
                          capture_output=True, text=True, timeout=120, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, timeout=60)
    assert run.returncode == 0
    return json.loads(run.stdout.decode("utf-8").replace(", }", "}").replace(", ]", "]"))


@needs_gxx
def test_header_compiles_and_its_values_equal_the_json_table(costed, tmp_path):
    _, _, _, table = costed
    header = cpp_header(table)
    assert header == cpp_header(copy.deepcopy(table))  # deterministic
    assert header.splitlines()[2:4] == ["#ifndef DSE_KERNELS_HPP_", "#define DSE_KERNELS_HPP_"]
    assert printed_table(tmp_path, header) == json.loads(json.dumps(table))


@needs_gxx
def test_strings_are_escaped_in_the_header(costed, tmp_path):
    """A device name with quotes, backslashes, question marks (no trigraphs), a tab and UTF-8 reads back whole."""
    table = copy.deepcopy(costed[3])
    table["accelerator"]["device"] = 'board "x" \\ y??= z\té'
    assert printed_table(tmp_path, cpp_header(table))["accelerator"]["device"] == 'board "x" \\ y??= z\té'


def test_hwcost_kernels_command(costed, tmp_path, capsys):
    workload, accel, report, table = costed
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(PLAN.to_dict()))
    out = tmp_path / "out" / "kernels"
    code = main(["hwcost", "kernels", "--model-config", str(tmp_path / "config.json"), "--plan",
                 str(tmp_path / "plan.yaml"), "--device", "kria-kv260", "--batch", "2", "--resident", RESIDENT,
                 "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out.split() == [str(out / "kernels.json"), str(out / "kernels.hpp")]
    assert json.loads((out / "kernels.json").read_text()) == table
    assert (out / "kernels.hpp").read_text() == bundle_files(table)["kernels.hpp"]
    (tmp_path / "afile").write_text("x")
    code = main(["hwcost", "kernels", "--model-config", str(tmp_path / "config.json"), "--weights", "int4",
                 "--device", "kria-kv260", "--out", str(tmp_path / "afile")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: --out: {tmp_path / 'afile'} is a file, not a directory\n"


BOARD = {"vendor": "amd", "part": "xczu7ev-ffvc1156-2-e", "lut": 230400, "ff": 460800, "dsp": 1728,
         "dsp_kind": "dsp48e2", "bram_blocks": 312, "bram_block_kbits": 36, "uram": 96,
         "memories": {"ddr4": {"gbps": 19.2, "gb": 4}}, "static_w": 5, "shell_overhead": 0.05}


def test_files_of_a_trials_records_on_a_user_board():
    """What ``dse export`` writes from a trial's records (JSON forms): the stored report's figures on a board of
    the study's devices file; a report without per-layer rows is re-estimated; no workload, no files."""
    workload = Workload.from_hf_config(CONFIG)
    with user_devices(parse_devices({"devices": {"my-board": BOARD}})):
        accel = Accelerator("my-board", clock_mhz=250)
        report = estimate(PLAN, workload, accel)
        expected = bundle_files(kernel_table(PLAN, workload, accel, report))
        accel_dict = json.loads(json.dumps(accel.to_dict()))
        stored = json.loads(json.dumps(report.to_dict()))
    records = (PLAN.to_dict(), workload.to_dict(), accel_dict)
    assert bundle_files_of_records(*records, stored, {"my-board": BOARD}) == expected
    assert json.loads(expected["kernels.json"])["accelerator"]["device"] == "my-board"
    assert bundle_files_of_records(*records, {**stored, "layers": []}, {"my-board": BOARD}) == expected
    assert bundle_files_of_records(PLAN.to_dict(), None, accel_dict, stored, {"my-board": BOARD}) == {}
