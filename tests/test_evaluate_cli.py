"""``dse evaluate`` and ``dse sensitivity`` on the default model: bad plans exit 2 with one line, before any
compression; the sensitivity scan measures, caches and plots (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dse.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "default.yaml"


def write_spec(tmp_path, **changes) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["storage"] = f"sqlite:///{tmp_path / 'studies.db'}"
    data.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD_PLANS = [
    ({"name": "model.layers.30.mlp.up_proj", "format": "4"},
     "--plan: layer 'model.layers.30.mlp.up_proj' is not in smollm2-135m (30 blocks)"),
    ({"name": "model.layers.0.mlp.up_proj", "sparsity": "4:4"},
     "--plan: layers[0] (model.layers.0.mlp.up_proj): sparsity: '4:4' is not N:M with 0 < N < M"),
    ({"name": "model.layers.0.mlp.down_proj", "sparsity": "2:7"},
     "--plan: layer 'model.layers.0.mlp.down_proj' sparsity 2:7: M=7 does not divide in_features 1536"),
    ({"name": "model.layers.0.mlp.up_proj", "format": "9"},
     "--plan: layers[0] (model.layers.0.mlp.up_proj): format: '9' is not a weight format; allowed: 16, 8, 7, 6, 5"),
    ({"name": "model.layers.0.mlp.up_proj", "format": "1"},
     "--plan: layers[0] (model.layers.0.mlp.up_proj): format: '1' is not a weight format"),
    ({"name": "model.layers.0.mlp.up_proj", "format": "4", "group_size": 0},
     "--plan: layers[0] (model.layers.0.mlp.up_proj): format: group_size 0 is not a positive integer"),
    ({"name": "model.layers.0.mlp.up_proj", "format": "4", "quant": "refit"},
     "--plan: layers[0] (model.layers.0.mlp.up_proj): layer model.layers.0.mlp.up_proj: quant method 'refit' "
     "needs format ternary"),
]


@pytest.fixture(scope="module", autouse=True)
def converted_model():
    """Convert the built-in model first (its one-time conversion logs a line of its own)."""
    from evaluators.models import DEFAULT_MODEL, load_config

    load_config(DEFAULT_MODEL)


@pytest.mark.parametrize("layer,message", BAD_PLANS, ids=[m.split(": ", 2)[1][:30] for _, m in BAD_PLANS])
def test_invalid_plans_exit_2_with_one_line(tmp_path, capsys, layer, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"layers": [layer]}))
    code = main(["evaluate", str(write_spec(tmp_path)), "--plan", str(plan)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: " + message), err
    assert not (tmp_path / "studies.db").exists()


EXPORTED = {"study": "s", "trial": 3, "model": "smollm2-135m", "device": "kria-kv260"}  # dse export's header
UP = {"name": "model.layers.0.mlp.up_proj", "format": "4"}
PLAN_FILES = [  # (plan file, the message after 'error: --plan: ')
    ({"layers": [{**UP, "groupsize": 32}]}, "layers[0].groupsize: unknown field; allowed: name, sparsity, format, "
     "group_size, symmetric, prune, quant; did you mean 'group_size'?"),
    ({**EXPORTED, "plan": {"layers": [{**UP, "groupsize": 32}]}}, "plan.layers[0].groupsize: unknown field; allowed: "
     "name, sparsity, format, group_size, symmetric, prune, quant; did you mean 'group_size'?"),
    ({**EXPORTED, "groupsize": 32, "plan": {"layers": [UP]}},
     "groupsize: unknown field; allowed: study, trial, model, device, plan"),
    ({**EXPORTED, "plan": {"layers": [UP], "blokcs": []}},
     "plan.blokcs: unknown field; allowed: version, layers, blocks; did you mean 'blocks'?"),
    ({**EXPORTED, "plan": {"layers": [UP], "blocks": [{"index": 1, "mixr": "mlgru"}]}},
     "plan.blocks[0].mixr: unknown field; allowed: index, mixer; did you mean 'mixer'?"),
    # a llama2-7b plan (32 blocks): the first layer SmolLM2 (30 blocks) lacks is named
    ({**EXPORTED, "model": "llama2-7b", "plan": {"layers": [
        {"name": f"model.layers.{b}.self_attn.q_proj", "format": "4"} for b in range(32)]}},
     "layer 'model.layers.30.self_attn.q_proj' is not in "),
]


@pytest.mark.parametrize("data,message", PLAN_FILES, ids=[m.split(":")[0] for _, m in PLAN_FILES])
def test_plan_file_keys_and_layers_checked_before_any_work(tmp_path, capsys, data, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    code = main(["evaluate", str(write_spec(tmp_path)), "--plan", str(plan)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --plan: " + message), err
    assert "Traceback" not in err and not (tmp_path / "studies.db").exists()


@pytest.mark.slow
def test_sensitivity_scan_measures_caches_and_plots(tmp_path, capsys, empty_compress_cache):
    space = {"tie": "block", "mlgru_blocks": [1], "groups": [
        {"name": "attn", "targets": r"model\.layers\.(0|1)\.self_attn\.(q|k|v|o)_proj", "sparsity": ["dense", "2:4"],
         "formats": [8], "group_size": 64, "prune": ["magnitude", "wanda"]}]}
    spec = write_spec(tmp_path, space=space, compression={"distill_steps": 40}, study="sens")
    out = tmp_path / "out"
    args = ["sensitivity", str(spec), "--windows", "2", "--seq-len", "128", "--out", str(out), "--no-progress",
            "--threads", "2"]
    assert main(args) == 0
    assert list(empty_compress_cache.glob("*/sensitivity/*"))  # the scan wrote to the fresh cache
    rows = json.loads((out / "sensitivity.json").read_text())["rows"]
    # 2 units x (int8 dense, 2:4 magnitude int8, 2:4 wanda int8) + the MLGRU of block 1
    assert len(rows) == 7 and {r["source"] for r in rows} == {"computed"}
    by = {(r["unit"], r["choice"], r["prune"]): r for r in rows}
    for unit in ("attn.b0", "attn.b1"):
        dense8 = by[(unit, "int8/g64", "magnitude")]["kl"]
        assert 0 <= dense8 < by[(unit, "2:4 int8/g64", "magnitude")]["kl"]
        assert 0 <= dense8 < by[(unit, "2:4 int8/g64", "wanda")]["kl"]
    assert by[("b1.mixer", "mlgru", "magnitude")]["kl"] > 0
    html = (out / "sensitivity.html").read_text()
    assert "plotly" in html.lower() and "attn.b0" in html
    capsys.readouterr()
    assert main(args) == 0  # everything again, now from the cache
    again = json.loads((out / "sensitivity.json").read_text())["rows"]
    assert {r["source"] for r in again} == {"cache"}
    assert [r["kl"] for r in again] == [r["kl"] for r in rows]
    assert "7 unit x choice measurements (7 from the cache)" in capsys.readouterr().out
