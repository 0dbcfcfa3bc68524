"""The ``dse hwcost`` commands: devices, estimate, test (in-process and in a real process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hwcost.cli
from dse.cli import main
from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, Workload, estimate, list_devices
from hwcost.cli import SUITE_ENV
from hwcost.devices import catalog_names

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ("alveo-u280", "alveo-u55c", "alveo-u250", "vcu118", "zcu102", "kria-kv260", "intel-d5005")
ESTIMATE = ["hwcost", "estimate", "--model-config", "smollm2-135m", "--device", "kria-kv260"]
BOARD = {
    "vendor": "amd", "part": "xczu7ev-ffvc1156-2-e", "lut": 230400, "ff": 460800, "dsp": 1728,
    "dsp_kind": "dsp48e2", "bram_blocks": 312, "bram_block_kbits": 36, "uram": 96,
    "memories": {"ddr4": {"gbps": 19.2, "gb": 4}}, "static_w": 5, "shell_overhead": 0.05,
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(capsys, argv: list[str], field: str) -> str:
    """Run argv expecting exit 2 and exactly one stderr line starting with 'error: <field>'."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {field}"), lines[0]
    return lines[0]


def smol() -> Workload:
    return Workload.resolve("smollm2-135m")


def uniform(workload: Workload, fmt: str, sparsity=None, group: int = 128, blocks=()) -> ModelPlan:
    return ModelPlan(layers=tuple(LayerPlan(layer.name, sparsity, WeightFormat(fmt, group))
                                  for layer in workload.linear_layers(bp.index for bp in blocks)), blocks=blocks)


def assert_same_report(data: dict, report) -> None:
    """The --json object carries exactly the numbers of a direct hwcost.estimate call."""
    for key in ("decode_tokens_per_s", "decode_ms_per_token", "prefill_ms", "power_w", "j_per_token", "fits"):
        assert data[key] == getattr(report, key), key
    assert data["weight_bytes"] == report.weight_bytes_total
    for r in ("lut", "ff", "dsp", "bram36", "uram"):
        assert data["resources"][r] == {"used": report.resources[r], "available": report.available[r],
                                        "utilisation": report.utilisation[r], "cap": report.caps[r]}
    assert [row["name"] for row in data["layers"]] == [row.name for row in report.layers]
    for row, ours in zip(data["layers"], report.layers):
        assert row["cycles"] == ours.cycles  # max(compute, memory) + (1 - overlap) * min + fixed cycles
        assert (row["weight_bytes"], row["memory_bytes"], row["bound"]) == (ours.weight_bytes, ours.memory_bytes,
                                                                           ours.bound)


# ------------------------------------------------------------------ devices
def test_devices_table_lists_the_catalog(capsys):
    code, out, err = run(capsys, "hwcost", "devices")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["device", "LUT/ALM", "FF", "DSP", "BRAM36/M20K", "URAM"]
    for name in set(CATALOG) | set(catalog_names()):
        assert any(line.startswith(name + " ") for line in lines), name
    kv260 = next(line for line in lines if line.startswith("kria-kv260"))
    assert "117,120 LUT" in kv260 and "144 BRAM36" in kv260 and "ddr4" in kv260 and "19.2" in kv260
    d5005 = next(line for line in lines if line.startswith("intel-d5005"))
    assert "933,120 ALM" in d5005 and "11,721 M20K" in d5005


def test_devices_json(capsys):
    rows = run_json(capsys, "hwcost", "devices")
    assert [row["name"] for row in rows] == list_devices()
    u280 = next(row for row in rows if row["name"] == "alveo-u280")
    assert u280["memories"]["hbm2"] == {"kind": "hbm2", "gbps": 460.0, "gb": 8.0, "channels": 32, "port_bits": 256}
    assert u280["origin"] == "catalog"
    assert all({"lut", "ff", "dsp", "bram36", "uram", "static_w", "source"} <= set(row) for row in rows)


def test_devices_file_adds_and_overrides(tmp_path, capsys):
    path = tmp_path / "boards.yaml"
    path.write_text(yaml.safe_dump({"devices": {"my-board": BOARD, "kria-kv260": {**BOARD, "static_w": 4}}}))
    code, out, _ = run(capsys, "hwcost", "devices", "--devices-file", str(path))
    assert code == 0
    assert any(line.startswith("my-board ") and "230,400 LUT" in line for line in out.splitlines())
    assert "note: 'kria-kv260' from --devices-file overrides the catalog entry" in out
    rows = run_json(capsys, "hwcost", "devices", "--devices-file", str(path))
    by_name = {row["name"]: row for row in rows}
    assert by_name["my-board"]["origin"] == "user" and not by_name["my-board"]["overrides_catalog"]
    assert by_name["kria-kv260"]["overrides_catalog"] and by_name["kria-kv260"]["lut"] == 230400
    assert "my-board" not in list_devices()  # the user devices are active only during the command

    data = run_json(capsys, "hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int4",
                    "--device", "my-board", "--devices-file", str(path))
    assert data["device"] == "my-board" and data["resources"]["dsp"]["available"] == pytest.approx(1728 * 0.95)
    assert data["accelerator"]["device"] == "my-board"


@pytest.mark.parametrize("change, field", [
    ({"dsp": -3}, "devices.my-board.dsp: -3 is not an integer >= 0"),
    ({"colour": "red"}, "devices.my-board.colour: unknown field; allowed: vendor, part, lut"),
    ({"dsp_kind": "dsp99"}, "devices.my-board.dsp_kind: 'dsp99' is not one of dsp48e2"),
    ({"memories": {"ddr6": {"gbps": 10, "gb": 2}}}, "devices.my-board.memories.ddr6.kind: is required"),
    ({"memories": {"ddr4": {"gbps": 0, "gb": 2}}}, "devices.my-board.memories.ddr4.gbps: 0 is not a number"),
    ({"static_w": None}, "devices.my-board.static_w: is required"),
    ({"shell_overhead": 1.5}, "devices.my-board.shell_overhead: 1.5 is not a number in [0, 1)"),
])
def test_devices_file_errors_name_the_field(tmp_path, capsys, change, field):
    path = tmp_path / "boards.yaml"
    path.write_text(yaml.safe_dump({"devices": {"my-board": {**BOARD, **change}}}))
    line = one_line_error(capsys, ["hwcost", "devices", "--devices-file", str(path)], "--devices-file: ")
    assert line.startswith(f"error: --devices-file: {field}"), line
    one_line_error(capsys, ESTIMATE + ["--weights", "int4", "--devices-file", str(path)], "--devices-file: ")


def test_devices_file_missing_or_not_yaml(tmp_path, capsys):
    one_line_error(capsys, ["hwcost", "devices", "--devices-file", str(tmp_path / "none.yaml")],
                   "--devices-file: file ")
    (tmp_path / "bad.yaml").write_text("devices: [unclosed")
    one_line_error(capsys, ["hwcost", "devices", "--devices-file", str(tmp_path / "bad.yaml")], "--devices-file: ")
    (tmp_path / "top.yaml").write_text("boards: {}")
    one_line_error(capsys, ["hwcost", "devices", "--devices-file", str(tmp_path / "top.yaml")],
                   "--devices-file: boards: unknown field; allowed: devices")


# ------------------------------------------------------------------ estimate
REQUIRED_KEYS = {"decode_tokens_per_s", "prefill_ms", "power_w", "j_per_token", "fits", "weight_bytes",
                 "resources", "layers"}


def test_estimate_json_equals_direct_estimate(capsys):
    data = run_json(capsys, *ESTIMATE, "--weights", "int4")
    assert REQUIRED_KEYS <= set(data)
    assert set(data["resources"]) == {"lut", "ff", "dsp", "bram36", "uram"}
    assert all({"used", "available", "utilisation"} <= set(v) for v in data["resources"].values())
    report = estimate(uniform(smol(), "4"), smol(), Accelerator("kria-kv260"))
    assert_same_report(data, report)
    assert data["model"]["parameters"] == 134_515_008 and data["plan"]["summary"] == {"int4/g128": 211}


def test_estimate_flags_map_to_plan_and_accelerator(capsys):
    data = run_json(capsys, "hwcost", "estimate", "--model-config", "llama2-7b", "--weights", "int2",
                    "--sparsity", "2:8", "--group-size", "64", "--mixer", "mlgru", "--device", "alveo-u280",
                    "--clock-mhz", "225", "--batch", "4", "--context", "1024", "--prompt", "64")
    w = Workload.resolve("llama2-7b")
    blocks = tuple(BlockPlan(i, "mlgru") for i in range(32))
    accel = Accelerator("alveo-u280", clock_mhz=225, batch=4, context_length=1024, prompt_length=64)
    assert_same_report(data, estimate(uniform(w, "2", Sparsity(2, 8), 64, blocks), w, accel))
    assert data["plan"]["mlgru_blocks"] == 32 and not any(row["kv_bytes"] for row in data["layers"])
    assert data["batch"] == 4 and data["clock_mhz"] == 225.0


def test_estimate_keep_lm_head(capsys):
    data = run_json(capsys, *ESTIMATE, "--weights", "ternary", "--keep-lm-head")
    w = smol()
    plan = ModelPlan(layers=tuple(LayerPlan(x.name, None, WeightFormat("ternary")) for x in w.linear_layers()
                                  if x.name != "lm_head"))
    assert_same_report(data, estimate(plan, w, Accelerator("kria-kv260")))
    assert data["lm_head_shares_embedding"]


def test_estimate_readable_report(capsys):
    code, out, err = run(capsys, *ESTIMATE, "--weights", "int4", "--sparsity", "2:4")
    assert code == 0 and err == ""
    report = estimate(uniform(smol(), "4", Sparsity(2, 4)), smol(), Accelerator("kria-kv260"))
    for text in ("model    smollm2-135m", "device   kria-kv260", "300 MHz", "fits     yes",
                 f"{report.decode_tokens_per_s:.2f} tokens/s", f"{report.decode_ms_per_token:.3f} ms/token",
                 f"prefill  {report.prefill_ms:.1f} ms", f"{report.power_w:.2f} W",
                 f"{report.j_per_token:.4f} J/token", "model.layers.0.mlp.down_proj", "lm_head", "--all-layers"):
        assert text in out, text
    for r in ("lut", "ff", "dsp", "bram36", "uram"):
        assert any(line.startswith(r + " ") for line in out.splitlines()), r
    assert "model.layers.1.self_attn.q_proj" not in out  # trimmed to block 0 + lm_head
    code, full, _ = run(capsys, *ESTIMATE, "--weights", "int4", "--sparsity", "2:4", "--all-layers")
    assert code == 0 and "model.layers.29.mlp.down_proj" in full and "more rows" not in full


def test_estimate_plan_file_export_format_and_bare(tmp_path, capsys):
    w = smol()
    plan = ModelPlan(layers=tuple(
        LayerPlan(x.name, Sparsity(2, 4) if x.name.endswith("up_proj") else None,
                  WeightFormat("3" if x.block is not None and x.block % 2 else "8", 64))
        for x in w.linear_layers() if x.name != "lm_head"), blocks=(BlockPlan(5, "mlgru"),))
    exported = tmp_path / "plan.yaml"  # what `dse export` writes
    exported.write_text(yaml.safe_dump({"study": "s", "trial": 3, "model": "smollm2-135m", "device": "kria-kv260",
                                        "plan": plan.to_dict()}, sort_keys=False))
    data = run_json(capsys, *ESTIMATE, "--plan", str(exported))
    assert_same_report(data, estimate(plan, w, Accelerator("kria-kv260")))
    assert data["plan"]["hash"] == plan.hash and data["plan"]["mlgru_blocks"] == 1
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(plan.to_dict()))
    assert run_json(capsys, *ESTIMATE, "--plan", str(bare))["decode_tokens_per_s"] == data["decode_tokens_per_s"]


def test_estimate_accel_file_and_flag_override(tmp_path, capsys):
    path = tmp_path / "accel.yaml"
    path.write_text(yaml.safe_dump({"hardware": {"device": "alveo-u280", "clock_mhz": 200, "weights": "streamed",
                                                 "memory": "ddr4", "dsp_share": 0.5, "batch": 2}}))
    data = run_json(capsys, "hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int8",
                    "--accel", str(path), "--clock-mhz", "250")
    accel = Accelerator("alveo-u280", clock_mhz=250, memory="ddr4", dsp_share=0.5, batch=2)
    assert_same_report(data, estimate(uniform(smol(), "8"), smol(), accel))
    assert data["memory"] == "ddr4" and data["clock_mhz"] == 250.0
    assert data["accelerator"]["resident"] == "none"  # the old 'weights: streamed' is 'resident: none'
    path.write_text(yaml.safe_dump({"device": "kria-kv260", "dsp_share": 1.5}))  # a bare mapping works too
    line = one_line_error(capsys, ["hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int8",
                                   "--accel", str(path)], "--accel: hardware.dsp_share: ")
    assert "(0, 1]" in line


def test_estimate_hgrn_bit_builtin(capsys):
    data = run_json(capsys, "hwcost", "estimate", "--model-config", "mmfreelm-1.3b", "--weights", "ternary",
                    "--device", "intel-d5005", "--clock-mhz", "60")
    w = Workload.resolve("mmfreelm-1.3b")
    blocks = tuple(BlockPlan(i, "mlgru") for i in range(24))
    assert_same_report(data, estimate(uniform(w, "ternary", blocks=blocks), w, Accelerator("intel-d5005",
                                                                                          clock_mhz=60)))
    names = [row["name"] for row in data["layers"]]
    assert "model.layers.0.attn.i_proj" in names and "model.layers.23.mlp.gate_proj" in names
    assert all(row["kv_bytes"] == 0 for row in data["layers"]) and data["model"]["family"] == "hgrn_bit"
    assert data["resources"]["dsp"]["used"] < 100  # ternary: no DSP MACs


def test_estimate_config_path_and_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 128,
                                                      "n_head": 4, "vocab_size": 500}))
    by_dir = run_json(capsys, "hwcost", "estimate", "--model-config", str(tmp_path), "--weights", "int4",
                      "--device", "zcu102")
    by_file = run_json(capsys, "hwcost", "estimate", "--model-config", str(tmp_path / "config.json"),
                       "--weights", "int4", "--device", "zcu102")
    assert by_dir["decode_tokens_per_s"] == by_file["decode_tokens_per_s"]
    assert by_dir["layers"][1]["name"] == "transformer.h.0.attn.c_attn"


BAD_ESTIMATES = [
    (["--weights", "int4", "--device", "x"], "--device: 'x' is not a known device; allowed: alveo-u280"),
    (["--weights", "int4", "--sparsity", "4:4"], "--sparsity: '4:4' is not N:M with 0 < N < M"),
    (["--weights", "int4", "--sparsity", "5:4"], "--sparsity: '5:4' is not N:M with 0 < N < M"),
    (["--weights", "int4", "--sparsity", "two:four"], "--sparsity: 'two:four' is not 'dense' or N:M"),
    (["--weights", "int4", "--sparsity", "2:5"],
     "--sparsity: M=5 does not divide in_features 576 of model.layers.0.self_attn.q_proj"),
    (["--weights", "int9"], "--weights: 'int9' is not one of fp16, int8, int7, int6, int5, int4, int3, int2, ternary"),
    (["--weights", "int4", "--clock-mhz", "-5"], "--clock-mhz: -5 is not a number in [1, 1000] MHz"),
    (["--weights", "int4", "--clock-mhz", "0"], "--clock-mhz: 0 is not a number in [1, 1000] MHz"),
    (["--weights", "int4", "--clock-mhz", "fast"], "--clock-mhz: fast is not a number"),
    (["--weights", "int4", "--batch", "0"], "--batch: '0' is not an integer >= 1"),
    (["--weights", "int4", "--act-bits", "12"], "--act-bits: '12' is not one of 8, 16"),
    (["--weights", "int4", "--context", "-1"], "--context: '-1' is not an integer >= 0"),
    (["--weights", "int4", "--group-size", "0"], "--group-size: '0' is not an integer >= 1"),
    (["--weights", "int4", "--mixer", "ssm"], "--mixer: 'ssm' is not one of attention, mlgru"),
    ([], "--weights: give --weights"),
    (["--weights", "int4", "--plan", "p.yaml"], "--plan: not allowed with argument --weights"),
    (["--weights", "int4", "--frobnicate"], "--frobnicate: unknown argument"),
]


@pytest.mark.parametrize("extra, message", BAD_ESTIMATES, ids=[m.split(":")[0] + str(i)
                                                                for i, (_, m) in enumerate(BAD_ESTIMATES)])
def test_estimate_bad_input_one_line(capsys, extra, message):
    line = one_line_error(capsys, ESTIMATE + extra, message.split(":")[0] + ":")
    assert line.startswith(f"error: {message}"), line


BAD_ACCEL_FIELDS = [  # (field: value in --accel, the message after 'error: --accel: hardware.<field>: ')
    ({"resident": "("}, "resident: '(' is not a regular expression"),
    ({"resident": 5}, "resident: 5 is not none, all or a regular expression of layer names"),
    ({"weights": "on_chip"}, "weights: 'on_chip' is not one of streamed, resident"),
    ({"kv_bits": 3}, "kv_bits: 3 is not one of 16, 8, 4"),
    ({"ternary_engine": "x"}, "ternary_engine: 'x' is not one of adder_tree, table_lookup"),
    ({"ternary_storage": "3bit"}, "ternary_storage: '3bit' is not one of 2bit, base3"),
    ({"memory": "hbm9"}, "memory: 'hbm9' is not one of ddr4 (device kria-kv260"),
    ({"memory": "ddr4+ddr4"}, "memory: 'ddr4+ddr4' names a memory twice"),
    ({"lanes": {"int4": 0}}, "lanes: int4: 0 is not an integer >= 1"),
    ({"lanes": {"int9": 4}}, "lanes: 'int9' is not one of fp16, int8"),
    ({"lanes": [4]}, "lanes: [4] is not a mapping of engine class"),
    ({"attention_window": 0}, "attention_window: 0 is not an integer >= 1"),
    ({"weight_buffer_bytes": -1}, "weight_buffer_bytes: -1 is not an integer >= 0"),
    ({"embedding": "cpu"}, "embedding: 'cpu' is not one of fpga, host"),
    ({"lm_head": "gpu"}, "lm_head: 'gpu' is not one of fpga, host"),
    ({"toggle_rate": 2}, "toggle_rate: 2 is not in (0, 1]"),
    ({"host_gbps": 0}, "host_gbps: 0 is not a number in (0, inf) GB/s"),
    ({"uram_share": 0}, "uram_share: 0 is not in (0, 1]"),
    ({"act_bits": 4}, "act_bits: 4 is not one of 8, 16"),
]


@pytest.mark.parametrize("field, message", BAD_ACCEL_FIELDS, ids=[m.split(":")[0] + str(i)
                                                                  for i, (_, m) in enumerate(BAD_ACCEL_FIELDS)])
def test_every_bad_accelerator_field_is_one_line(tmp_path, capsys, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"hardware": {"device": "kria-kv260", **field}}))
    line = one_line_error(capsys, ["hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int4",
                                   "--accel", str(path)], f"--accel: hardware.{message.split(':')[0]}: ")
    assert line.startswith(f"error: --accel: hardware.{message}"), line


BAD_ACCEL_FLAGS = [  # the flags of the same fields: the message names the flag
    (["--resident", "("], "--resident: ( is not a regular expression"),
    (["--kv-bits", "3"], "--kv-bits: '3' is not one of 16, 8, 4"),
    (["--ternary-engine", "x"], "--ternary-engine: x is not one of adder_tree, table_lookup"),
    (["--ternary-storage", "3bit"], "--ternary-storage: 3bit is not one of 2bit, base3"),
    (["--memory", "hbm9"], "--memory: hbm9 is not one of ddr4"),
    (["--window", "0"], "--window: '0' is not an integer >= 1"),
    (["--embedding", "cpu"], "--embedding: cpu is not one of fpga, host"),
    (["--lm-head", "gpu"], "--lm-head: gpu is not one of fpga, host"),
    (["--dsp-share", "0"], "--dsp-share: 0 is not in (0, 1]"),
]


@pytest.mark.parametrize("extra, message", BAD_ACCEL_FLAGS, ids=[m.split(":")[0] for _, m in BAD_ACCEL_FLAGS])
def test_every_bad_accelerator_flag_is_one_line(capsys, extra, message):
    line = one_line_error(capsys, ESTIMATE + ["--weights", "int4", *extra], message.split(":")[0] + ":")
    assert line.startswith(f"error: {message}"), line


def test_accelerator_file_v2_fields(tmp_path, capsys):
    """Every v2 field through --accel reaches the Accelerator the estimate uses."""
    fields = {"device": "kria-kv260", "lanes": {"int4": 256}, "resident": r".*\.mlp\..*", "weight_buffer_bytes": 10**6,
              "embedding": "host", "lm_head": "fpga", "kv_bits": 8, "attention_window": 128, "ternary_storage": "base3",
              "ternary_engine": "table_lookup", "toggle_rate": 0.2, "memory": "ddr4"}
    path = tmp_path / "accel.yaml"
    path.write_text(yaml.safe_dump({"hardware": fields}))
    data = run_json(capsys, "hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int4",
                    "--accel", str(path))
    assert_same_report(data, estimate(uniform(smol(), "4"), smol(), Accelerator.from_dict(fields)))
    assert data["kv_bits"] == 8 and data["weight_buffer_bytes"] == 10**6 and data["host_ms"] > 0
    assert data["accelerator"]["lanes"] == {"int4": 256}


def test_estimate_needs_model_config_and_device(capsys, tmp_path):
    one_line_error(capsys, ["hwcost", "estimate", "--weights", "int4", "--device", "kria-kv260"],
                   "--model-config: is required")
    one_line_error(capsys, ["hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int4"],
                   "--device: is required")
    one_line_error(capsys, ["hwcost", "estimate", "--model-config", "nope", "--weights", "int4", "--device",
                            "kria-kv260"], "--model-config: 'nope' is not a config.json, a model directory or a "
                                           "built-in name; built-in names: smollm2-135m")
    (tmp_path / "config.json").write_text("{broken")
    one_line_error(capsys, ["hwcost", "estimate", "--model-config", str(tmp_path), "--weights", "int4",
                            "--device", "kria-kv260"], "--model-config: model config ")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    line = one_line_error(capsys, ["hwcost", "estimate", "--model-config", str(tmp_path), "--weights", "int4",
                                   "--device", "kria-kv260"], "--model-config: model_type 'bert' is not supported")
    assert "llama" in line and "hgrn_bit" in line
    one_line_error(capsys, ["hwcost", "estimate", "--model-config", "mmfreelm-1.3b", "--weights", "ternary",
                            "--mixer", "attention", "--device", "intel-d5005"],
                   "--mixer: model_type hgrn_bit has no attention blocks; allowed: mlgru")
    one_line_error(capsys, ["hwcost"], "hwcost: a subcommand is required; allowed: devices, estimate")


def test_estimate_bad_plan_files(tmp_path, capsys):
    def plan_error(data, message, raw: str | None = None):
        path = tmp_path / "plan.yaml"
        path.write_text(raw if raw is not None else yaml.safe_dump(data))
        line = one_line_error(capsys, ESTIMATE + ["--plan", str(path)], "--plan: ")
        assert line.startswith(f"error: --plan: {message}"), line

    up40 = {"name": "model.layers.40.mlp.up_proj", "format": "4"}
    plan_error({"plan": {"layers": [up40]}}, "layer 'model.layers.40.mlp.up_proj' is not in smollm2-135m (30 blocks)")
    plan_error({"layers": [{"name": "model.layers.0.self_attn.q_proj", "sparsity": "2:5", "format": "4"}]},
               "layer 'model.layers.0.self_attn.q_proj' sparsity 2:5: M=5 does not divide in_features 576 of "
               "model.layers.0.self_attn.q_proj")
    plan_error({"layers": [{"name": "model.layers.0.self_attn.q_proj", "sparsity": "4:4"}]},
               "layers[0] (model.layers.0.self_attn.q_proj): sparsity: '4:4' is not N:M with 0 < N < M")
    plan_error({"layers": [{"name": "lm_head", "format": "9"}]}, "layers[0] (lm_head): format: '9' is not a weight format")
    plan_error({"layers": [{"format": "4"}]}, "layers[0].name: is required")
    plan_error({"blocks": [{"index": 30, "mixer": "mlgru"}]}, "block 30 is not in smollm2-135m (blocks 0..29)")
    plan_error({"blocks": [{"index": 1, "mixer": "ssm"}]}, "blocks[0]: mixer 'ssm'; allowed: attention, mlgru")
    plan_error({"layers": [{"name": "lm_head"}, {"name": "lm_head"}]}, "layer 'lm_head' appears more than once")
    plan_error({"study": "x"}, "expected a ModelPlan mapping")
    plan_error(None, "", raw="layers: [unclosed")
    one_line_error(capsys, ESTIMATE + ["--plan", str(tmp_path / "missing.yaml")], "--plan: file ")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"layers": []}))
    one_line_error(capsys, ESTIMATE + ["--plan", str(tmp_path / "ok.yaml"), "--sparsity", "2:4"],
                   "--sparsity: applies to a uniform plan")


def write_plan(tmp_path, plan: ModelPlan, **header) -> Path:
    """``plan`` as ``dse export``'s plan.yaml (``header``: its study, trial, model, device; more keys allowed)."""
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "trial": 0, "model": "smollm2-135m", "device": "kria-kv260",
                                    **header, "plan": plan.to_dict()}, sort_keys=False))
    return path


def test_plan_of_a_model_with_fewer_blocks_warns_what_stays_fp16(tmp_path, capsys):
    """A SmolLM2 plan (30 blocks) costed on llama2-7b (32 blocks): exit 0, the report of that very plan, and one
    warning naming the 14 layers of blocks 30-31 left FP16 dense."""
    plan = uniform(smol(), "4", Sparsity(2, 4), 64)
    code, out, err = run(capsys, "hwcost", "estimate", "--model-config", "llama2-7b", "--device", "alveo-u280",
                         "--plan", str(write_plan(tmp_path, plan)), "--json")
    assert code == 0
    assert err == ("warning: --plan: 14 linear layers of llama2-7b (32 blocks) are not in the plan and stay FP16 "
                   "dense, though the plan sets them in other blocks: model.layers.30.*, model.layers.31.*\n")
    seven = Workload.resolve("llama2-7b")
    assert_same_report(json.loads(out), estimate(plan, seven, Accelerator("alveo-u280")))
    names = {layer.name for layer in seven.linear_layers()} - {lp.name for lp in plan.layers}
    assert names == {f"model.layers.{b}.{t}" for b in (30, 31) for t in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}  # exactly the 14 the warning names (lm_head is in the plan)


def test_plan_left_out_layers_compact_and_partial_plans(tmp_path, capsys):
    w = smol()
    mlp_only = ModelPlan(tuple(LayerPlan(x.name, None, WeightFormat("4", 64)) for x in w.linear_layers()
                               if ".mlp." in x.name))
    code, _, err = run(capsys, *ESTIMATE, "--plan", str(write_plan(tmp_path, mlp_only)))
    assert code == 0 and err == ""  # attention set nowhere: kept dense on purpose, no warning
    odd = ModelPlan(tuple(LayerPlan(f"model.layers.{b}.mlp.up_proj", None, WeightFormat("4", 64))
                          for b in range(0, 30, 2)) + (LayerPlan("model.layers.0.self_attn.q_proj"),))
    code, _, err = run(capsys, *ESTIMATE, "--plan", str(write_plan(tmp_path, odd)))
    assert code == 0 and err == (
        "warning: --plan: 44 linear layers of smollm2-135m (30 blocks) are not in the plan and stay FP16 dense, "
        "though the plan sets them in other blocks: model.layers.1.self_attn.q_proj, model.layers.1.mlp.up_proj, "
        "model.layers.2.self_attn.q_proj, model.layers.3.self_attn.q_proj, model.layers.3.mlp.up_proj, "
        "model.layers.4.self_attn.q_proj, ... (38 more)\n")
    mlgru = ModelPlan(tuple(LayerPlan(x.name, None, WeightFormat("8", 64)) for x in w.linear_layers()),
                      blocks=(BlockPlan(4, "mlgru"),))  # block 4's MLGRU inherits the attention's plans
    code, _, err = run(capsys, *ESTIMATE, "--plan", str(write_plan(tmp_path, mlgru)))
    assert code == 0 and err == ""


def test_plan_of_a_model_with_more_blocks_names_the_first_missing_layer(tmp_path, capsys):
    plan = uniform(Workload.resolve("llama2-7b"), "4", Sparsity(2, 4), 64)
    line = one_line_error(capsys, ESTIMATE + ["--plan", str(write_plan(tmp_path, plan, model="llama2-7b"))],
                          "--plan: ")
    assert line == "error: --plan: layer 'model.layers.30.self_attn.q_proj' is not in smollm2-135m (30 blocks)"


def test_plan_file_unknown_keys_at_every_level(tmp_path, capsys):
    plan = ModelPlan((LayerPlan("model.layers.0.mlp.up_proj", None, WeightFormat("4", 32)),))
    path = write_plan(tmp_path, plan, groupsize=32)
    assert one_line_error(capsys, ESTIMATE + ["--plan", str(path)], "--plan: ") == (
        "error: --plan: groupsize: unknown field; allowed: study, trial, model, device, plan")
    data = yaml.safe_load(path.read_text())
    del data["groupsize"]
    data["plan"]["layers"][0]["groupsize"] = 32
    path.write_text(yaml.safe_dump(data))
    assert one_line_error(capsys, ESTIMATE + ["--plan", str(path)], "--plan: ") == (
        "error: --plan: plan.layers[0].groupsize: unknown field; allowed: name, sparsity, format, group_size, "
        "symmetric, prune, quant; did you mean 'group_size'?")
    path.write_text(yaml.safe_dump({"study": "s", "plan": [1]}))
    assert one_line_error(capsys, ESTIMATE + ["--plan", str(path)], "--plan: ") == (
        "error: --plan: plan: expected a mapping with version, layers, blocks")


# ------------------------------------------------------------------ test
@pytest.mark.skipif(os.environ.get(SUITE_ENV) == "1", reason="running inside 'dse hwcost test' (no recursion)")
def test_hwcost_test_runs_the_suite(capsys):
    # the suite's files collected, a few tests selected (the whole suite would run twice); extra args pass through
    code, out, _ = run(capsys, "hwcost", "test", "--", "-k", "test_estimate_is_fast or test_fp16_dense")
    summary = out.strip().splitlines()[-1]
    # pytest's own summary line, and its exit status passed through (the suite's health is its own tests' job)
    assert re.match(r"^=* ?\d+ (passed|failed)", summary) and " passed" in summary, out[-3000:]
    assert re.match(r"^=* ?2 passed, \d+ deselected", summary), summary
    assert (code == 0) == ("failed" not in summary and "error" not in summary), (code, summary)
    assert "test_hwcost.py" not in out or code != 0  # -q: file names only appear for failures


def test_hwcost_test_without_tests_directory(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(hwcost.cli, "tests_location", lambda: (tmp_path, []))
    one_line_error(capsys, ["hwcost", "test"], "test: no cost-model tests at ")


# ------------------------------------------------------------------ a real process
def test_subprocess_estimate_and_error():
    env = {k: v for k, v in os.environ.items() if k != SUITE_ENV}
    proc = subprocess.run([sys.executable, "-m", "dse.cli", *ESTIMATE, "--weights", "int4", "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert_same_report(data, estimate(uniform(smol(), "4"), smol(), Accelerator("kria-kv260")))
    proc = subprocess.run([sys.executable, "-m", "dse.cli", *ESTIMATE, "--weights", "int4", "--sparsity", "4:4"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: --sparsity: '4:4' is not N:M with 0 < N < M"]
    proc = subprocess.run([sys.executable, "-m", "dse.cli", "hwcost", "devices"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0 and all(name in proc.stdout for name in CATALOG)
