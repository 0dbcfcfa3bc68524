"""The study spec: the shipped example validates, and each invalid field gives one line and exit status 2."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dse.cli import main
from dse.plan import Sparsity, WeightFormat
from dse.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "default.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_spec_validates():
    spec = load_spec(EXAMPLE)
    assert spec.study == "smollm2-kv260-demo"
    assert [o.name for o in spec.objectives] == ["proxy_kl", "decode_tokens_per_s", "j_per_token"]
    assert spec.directions == ["minimize", "maximize", "minimize"]
    mlp = spec.space.groups[1]
    assert mlp.sparsity == (None, Sparsity(2, 4), Sparsity(4, 8))
    assert spec.promotion.every == 8 and spec.promotion.final and spec.warm_start.baselines
    assert mlp.formats == (WeightFormat("8", 64), WeightFormat("4", 64), WeightFormat("3", 64))
    assert spec.constraints[0].violation(170.0) < 0 < spec.constraints[0].violation(160.0)
    assert spec.sampler.name == "nsga2" and spec.workers == 2 and spec.storage.startswith("sqlite:///")


def _set(d: dict, path: str, value):
    keys = path.replace("]", "").replace("[", ".").split(".")
    for key in keys[:-1]:
        d = d[int(key)] if isinstance(d, list) else d[key]
    last = keys[-1]
    if value is _DELETE:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


_DELETE = object()

# (field path to change, new value, expected one-line message)
INVALID = [
    ("space.groups.1.sparsity.1", "5:4", "space.groups[1].sparsity[1]: '5:4' is not N:M with 0 < N < M"),
    ("space.groups.1.sparsity.0", "half", "space.groups[1].sparsity[0]: 'half' is not 'dense' or N:M"),
    ("space.groups.0.formats.1", 9, "space.groups[0].formats[1]: 9 is not one of 16, 8, 7, 6, 5, 4, 3, 2, ternary"),
    ("space.groups.0.targets", "model.(layers", "space.groups[0].targets: invalid regular expression"),
    ("space.groups.0.group_size", 0, "space.groups[0].group_size: 0 is not an integer >= 1"),
    ("space.tie", "module", "space.tie: 'module' is not one of layer, block, type, group"),
    ("space.ignore", "lm_head", "space.ignore: expected a list of regexes such as ['lm_head']"),
    ("space.ignore", ["lm_(head"], "space.ignore[0]: invalid regular expression"),
    ("objectives.1", {"name": "accuracy"}, "objectives: give one of accuracy, proxy_kl (the proxy drives the search"),
    ("promotion.every", -1, "promotion.every: -1 is not an integer >= 0"),
    ("promotion.final", "yes", "promotion.final: 'yes' is not true or false"),
    ("warm_start.sensitivity", "nowhere.json", "warm_start.sensitivity: 'nowhere.json' is not a file"),
    ("heartbeat_s", 0, "heartbeat_s: 0 is not a number of seconds from 0.5 to 3600"),
    ("hardware.device", "alveo-u999", "hardware.device: 'alveo-u999'"),
    ("hardware.resident", "(", "hardware.resident: '(' is not a regular expression"),
    ("hardware.kv_bits", 3, "hardware.kv_bits: 3"),
    ("objectives.1.name", "speed", "objectives[1].name: 'speed' is not one of accuracy, proxy_kl, decode_tokens_per_s"),
    ("objectives.2.direction", "lower", "objectives[2].direction: 'lower' is not one of maximize, minimize"),
    ("constraints.0", "decode_tokens_per_s > 100", "constraints[0]: 'decode_tokens_per_s > 100' is not '<metric> <=|>= <number>'"),
    ("sampler.name", "cmaes", "sampler.name: 'cmaes' is not one of nsga2, nsga3, tpe, gp, random"),
    ("trials", 0, "trials: 0 is not an integer from 1 to"),
    ("workers", "two", "workers: 'two' is not an integer from 1 to"),
    ("storage", "mongodb://localhost/x", "storage: scheme 'mongodb' is not one of sqlite, postgresql"),
    ("tasks.1.limit", -3, "tasks[1].limit: -3 is not an integer >= 1"),
    ("study", "my study!", "study: 'my study!' must be 1-100 characters"),
    ("space.grups", [], "space.grups: unknown field; allowed: groups, tie, mlgru_blocks"),
    ("model", _DELETE, "model: is required"),
    ("tasks.0.name", "hellaswagg", "tasks: unknown lm-eval task name(s) 'hellaswagg'; local tasks: shakespeare_ppl"),
    ("space.groups.0.targets", r"model\.layers\.\d+\.attention\.wq",
     "space.groups[0].targets: 'model\\.layers\\.\\d+\\.attention\\.wq' matches no linear layer"),
    ("space.groups.2.targets", r"lm_head|model\.layers\.0\.mlp\.up_proj",
     "space.groups[2].targets: also matches 'model.layers.0.mlp.up_proj', already chosen by space.groups[1]"),
    ("space.groups.1.sparsity.1", "3:5", "space.groups[1].sparsity[1]: M=5 does not divide in_features 576 of "
                                         "model.layers.0.mlp.gate_proj"),
    ("space.mlgru_blocks", [3, 99], "space.mlgru_blocks[1]: block 99 is not in the model (blocks 0..29)"),
    ("space.mlgru_blocks", [3, 3], "space.mlgru_blocks: lists a block twice"),
    ("space.groups.0.prune", ["wanda", "obs"], "space.groups[0].prune[1]: 'obs' is not one of magnitude, wanda"),
    ("space.groups.0.quant", "refit", "space.groups[0].quant: refit applies to ternary weights only"),
    ("compression.mode", "parallel", "compression.mode: 'parallel' is not one of sequential, dense"),
    ("proxy.windows", 0, "proxy.windows: 0 is not an integer from 1 to 4096"),
]


@pytest.mark.parametrize("path,value,message", INVALID, ids=[case[0] for case in INVALID])
def test_invalid_spec_one_line_exit_2_no_storage(tmp_path, capsys, path, value, message):
    data = copy.deepcopy(example())
    _set(data, path, value)
    db = tmp_path / "studies.db"
    data["storage"] = data.get("storage") if path == "storage" else f"sqlite:///{db}"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))

    code = main(["start", str(spec_file), "--no-progress"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("error: " + message), err
    assert not db.exists(), "a rejected spec must not create or change the storage"


def test_spec_rejections_in_a_real_process(tmp_path):
    data = example()
    data["space"]["groups"][1]["sparsity"].append("5:4")
    data["storage"] = f"sqlite:///{tmp_path / 'x.db'}"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "broken.yaml").write_text("study: [unclosed\n")
    for name, expected in (("bad.yaml", "space.groups[1].sparsity[3]: '5:4' is not N:M with 0 < N < M"),
                           ("broken.yaml", "not valid YAML at line 2"),
                           ("missing.yaml", "spec file")):
        proc = subprocess.run([sys.executable, "-m", "dse.cli", "start", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.db").exists()


def test_stored_and_printed_storage_url_hides_the_password():
    spec = load_spec(EXAMPLE, {"storage": "postgresql://dse:s3cret@db.example:5432/studies"})
    assert spec.to_dict()["storage"] == "postgresql://dse:***@db.example:5432/studies"
    assert "s3cret" not in str(spec.to_dict())
