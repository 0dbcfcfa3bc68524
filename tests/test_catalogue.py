"""The catalogue of bad inputs (issue 14, item 7): every mistake a user can make in the study spec, the command
line, plan files, devices and accelerator files, model directories, storage URLs and checkpoints, driven end to
end through ``dse.cli.main`` as a user types it.

Each case asserts the promise of DESIGN.md: exactly one stderr line ``error: ...`` that names the field (the
case's expected text appears in it), exit status 2, no traceback, no password, and the SQLite study database
holding an existing study byte-identical (sha256 before and after). Commands that take a storage are pointed
at that database; the others run next to it and must leave it alone too.

The tables are grouped by area: ``SPEC`` (a hardware-only spec changed one field at a time), ``RESUME`` (the
stored study started again with a spec that changes what a trial means), ``CHECKED_BEFORE_WORK`` (checks that
must come before Ray: they run with a Ray address that refuses connections, so a missing check fails fast
naming ``ray.address``), ``CLI``, ``PLAN``, ``DEVICES``, ``ACCEL``, ``MODEL``, ``STORAGE`` and ``CHECKPOINT``
(no command loads a checkpoint: ``load_checkpoint`` behind the same ``error:`` handler as ``dse``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from dse.cli import main
from dse.errors import UserError
from helpers import PG_URL, ROOT

EXAMPLE = ROOT / "examples" / "default.yaml"
STUDY = "catalogue"
PASSWORD = "s3cret"
"""In every storage URL that carries a password: it must never reach the terminal."""
TRIPWIRE_RAY = "127.0.0.1:1"
"""A Ray address that refuses connections at once: a check missing before Ray shows up as a ``ray.address`` line."""
BOARD = {"vendor": "amd", "part": "test-part", "lut": 230_400, "ff": 460_800, "dsp": 1_728, "dsp_kind": "dsp48e2",
         "bram_blocks": 312, "bram_block_kbits": 36, "uram": 96, "memories": {"ddr4": {"gbps": 38.4, "gb": 8}},
         "static_w": 5.0}
ESTIMATE = ["hwcost", "estimate", "--model-config", "smollm2-135m", "--device", "kria-kv260"]
PG_BASE = PG_URL.rsplit("/", 1)[0]
PG_HOST = PG_BASE.rsplit("@", 1)[1]


def hardware_only(url: str, study: str = STUDY) -> dict:
    """The default spec with cost-model objectives only (the driver runs it on SQLite, no Ray, no weights)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(study=study, storage=url, trials=6, heartbeat_s=1, workers=1,
                objectives=[{"name": "decode_tokens_per_s"}, {"name": "j_per_token"}],
                constraints=["decode_tokens_per_s >= 100"], sampler={"name": "nsga2", "population": 4, "seed": 1},
                promotion={"every": 0, "final": False})
    data["tasks"] = [{"name": "shakespeare_lastword", "metric": "acc", "limit": 12}]
    return data


def model_spec(url: str, study: str = "catalogue-model") -> dict:
    """A spec whose proxy objective needs the model and Ray (at the tripwire address)."""
    data = hardware_only(url, study)
    data.update(objectives=[{"name": "proxy_kl"}, {"name": "decode_tokens_per_s"}], trials=1,
                ray={"address": TRIPWIRE_RAY}, proxy={"windows": 1, "seq_len": 32})
    return data


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- fixtures
class World:
    """Everything the cases refer to: the study database (``db``, ``url``), the good spec, an exported bundle,
    a plain file, a busy port, the tiny model directory and a checkpoint."""

    def __init__(self, root: Path):
        self.root = root
        self.db = root / "studies.db"
        self.url = f"sqlite:///{self.db}"
        self.spec = root / "spec.yaml"
        self.bundle = root / "bundle"
        self.plain_file = root / "plain.txt"
        self.busy_port = 0
        self.trials: list[int] = []

    def fields(self, tmp: Path) -> dict:
        """The placeholders of the case tables."""
        return {"url": self.url, "spec": str(self.spec), "bundle": str(self.bundle), "file": str(self.plain_file),
                "busy_port": str(self.busy_port), "tmp": str(tmp), "trial_a": str(self.trials[0]),
                "trial_b": str(self.trials[1]), "pg": PG_BASE, "pg_host": PG_HOST, "study": STUDY}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A hardware-only study of 6 trials on SQLite, run once by ``dse start``; one trial exported to ``bundle``;
    a listening socket on ``busy_port``."""
    from evaluators.models import DEFAULT_MODEL, load_config

    load_config(DEFAULT_MODEL)  # convert the built-in model first (its one-time conversion logs a line)
    w = World(tmp_path_factory.mktemp("catalogue"))
    w.spec.write_text(yaml.safe_dump(hardware_only(w.url), sort_keys=False))
    assert main(["start", str(w.spec), "--no-progress"]) == 0
    import optuna

    from dse.pareto import is_feasible

    study = optuna.load_study(study_name=STUDY, storage=w.url)
    w.trials = [t.number for t in study.trials if is_feasible(t)]
    assert len(w.trials) >= 2
    assert main(["export", STUDY, "--storage", w.url, "--trial", str(w.trials[0]), "--out", str(w.bundle)]) == 0
    w.plain_file.write_text("not a directory\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        w.busy_port = busy.getsockname()[1]
        yield w


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-block Llama (hidden 64) with the default model's tokenizer, as a Hugging Face directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evaluators.models import DEFAULT_MODEL, resolve_model_path

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """A checkpoint of the tiny model with one INT4 layer (written with a cache of its own)."""
    from dse.plan import LayerPlan, ModelPlan, WeightFormat
    from evaluators.checkpoint import write_checkpoint
    from evaluators.compress.cache import CompressionCache, model_fingerprint
    from evaluators.models import load_model
    from evaluators.settings import CompressionSpec

    root = tmp_path_factory.mktemp("ckpt")
    model, _ = load_model(str(tiny_model))
    cache = CompressionCache(model_fingerprint(model), root / "cache")
    plan = ModelPlan((LayerPlan("model.layers.0.mlp.up_proj", None, WeightFormat("4", 32)),))
    write_checkpoint(str(tiny_model), plan, CompressionSpec(windows=1, seq_len=32), root / "ckpt", cache=cache,
                     format="dse-packed")
    return root / "ckpt"


# ---------------------------------------------------------------------------------------------- the check
def exit_status(call: Callable[[], int]) -> int:
    """``call()``'s exit status as the interpreter would give it: argparse's ``SystemExit`` code, or 1 with the
    traceback on stderr for an exception that escapes."""
    try:
        return call()
    except SystemExit as exc:  # argparse exits from inside parse_args
        return exc.code
    except Exception:  # noqa: BLE001 (what `python -m dse.cli` would print)
        traceback.print_exc()
        return 1


def refused(capsys, world: World, call: Callable[[], int], field: str | tuple[str, ...]) -> str:
    """Run ``call`` and assert the promise: one stderr line ``error: ...`` naming ``field``, exit 2, no traceback,
    no password, the study database byte-identical. Returns the line."""
    before = sha256(world.db)
    capsys.readouterr()
    code = exit_status(call)
    out, err = capsys.readouterr()
    after = sha256(world.db)
    lines = err.splitlines() or [""]
    shown = f"exit {code}, {len(lines)} stderr lines, first {lines[0][:300]!r}, last {lines[-1][:300]!r}"
    assert "Traceback" not in err, shown
    assert PASSWORD not in err + out, shown
    assert err.endswith("\n") and err.count("\n") == 1, shown
    line = err.rstrip("\n")
    assert line.startswith("error: "), line
    for text in (field,) if isinstance(field, str) else field:
        assert text in line, f"{text!r} not named in: {line}"
    assert code == 2, (code, line)
    assert before == after, "the study database changed"
    return line


def fill(value: Any, fields: dict) -> Any:
    """``value`` with ``{placeholder}`` replaced in every string (lists and mappings too)."""
    if isinstance(value, str):
        return value.format(**fields)
    if isinstance(value, list):
        return [fill(v, fields) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, fields) for k, v in value.items()}
    return value


DELETE = object()


def edit(data: dict, changes: dict) -> dict:
    """``data`` with ``{'a.b.0.c': value}`` set (``DELETE`` removes the key)."""
    data = copy.deepcopy(data)
    for path, value in changes.items():
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = data
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return data


def ids(table) -> list[str]:
    names = [case[0] for case in table]
    assert len(set(names)) == len(names), "case ids must be unique"
    return names


# ---------------------------------------------------------------------------------------------- the spec
# (id, change: {dotted path: value} on the hardware-only spec, or a function of its YAML text; expected field)
SPEC = [
    ("trials-zero", {"trials": 0}, "trials"),
    ("trials-float", {"trials": 2.5}, "trials"),
    ("workers-text", {"workers": "two"}, "workers"),
    ("heartbeat-tiny", {"heartbeat_s": 0.1}, "heartbeat_s"),
    ("batch-size-zero", {"batch_size": 0}, "batch_size"),
    ("task-seed-negative", {"task_seed": -1}, "task_seed"),
    ("unknown-top-key", {"trails": 5}, ("trails: unknown field; allowed: study, model, tasks", "did you mean 'trials'?")),
    ("unknown-group-key", {"space.groups.1.group_sizes": 32},
     ("space.groups[1].group_sizes: unknown field", "did you mean 'group_size'?")),
    ("duplicate-yaml-key", lambda text: text + "trials: 7\n", "duplicate key 'trials'"),
    ("unquoted-2-4", lambda text: text.replace("- '2:4'", "- 2:4", 1), ("space.groups[0].sparsity[1]", "quote it: '2:4'")),
    ("empty-file", lambda text: "", "the file is empty"),
    ("comment-only-file", lambda text: "# nothing here\n", "the file is empty"),
    ("not-yaml", lambda text: text + "space: [unclosed\n", "not valid YAML at line"),
    ("top-level-list", lambda text: "- study: x\n", "expected a mapping at the top"),
    ("tab-indent", lambda text: text.replace("  tie: block", "\ttie: block"), "not valid YAML"),
    ("bad-regex-targets", {"space.groups.0.targets": "model.(layers"}, "space.groups[0].targets"),
    ("bad-regex-ignore", {"space.ignore": ["lm_(head"]}, "space.ignore[0]"),
    ("targets-match-nothing", {"space.groups.0.targets": r"model\.layers\.\d+\.attn\.wq"},
     "space.groups[0].targets"),
    ("sparsity-n-ge-m", {"space.groups.1.sparsity.1": "4:4"}, "space.groups[1].sparsity[1]"),
    ("sparsity-m-not-dividing", {"space.groups.1.sparsity.1": "3:7"}, "space.groups[1].sparsity[1]"),
    ("format-unknown", {"space.groups.2.formats.1": 1}, "space.groups[2].formats[1]"),
    ("tie-unknown", {"space.tie": "model"}, "space.tie"),
    ("mlgru-block-outside", {"space.mlgru_blocks": [30]}, "space.mlgru_blocks[0]"),
    ("groups-empty", {"space.groups": []}, "space.groups"),
    ("unknown-device", {"hardware.device": "alveo-u999"}, "hardware.device"),
    ("device-missing", {"hardware.device": DELETE}, "hardware.device"),
    ("device-choice-unknown", {"hardware.device": ["kria-kv260", "vcu999"]}, "hardware.device[1]"),
    ("clock-choice-out-of-range", {"hardware.clock_mhz": [200, 5000]}, "hardware.clock_mhz[1]"),
    ("batch-choice-twice", {"hardware.batch": [1, 4, 1]}, "hardware.batch[2]"),
    ("hardware-choices-empty", {"hardware.clock_mhz": []}, "hardware.clock_mhz"),
    ("hardware-unknown-key", {"hardware.clock": 200}, "hardware.clock"),
    ("hardware-memory-unknown", {"hardware.memory": "hbm2"}, "hardware.memory"),
    ("hardware-not-mapping", {"hardware": "kria-kv260"}, "hardware"),
    ("batch-beyond-the-model", {"hardware.batch": 10**30}, "hardware.batch"),
    ("context-choice-beyond-the-model", {"hardware.context_length": [512, 2**40]}, "hardware.context_length[1]"),
    ("devices-file-missing", {"hardware.devices_file": "nowhere.yaml"}, "hardware.devices_file"),
    ("devices-file-broken-board", {"hardware.devices_file": "broken-boards.yaml", "hardware.device": "my-board"},
     "hardware.devices_file"),
    ("constraint-syntax", {"constraints": ["decode_tokens_per_s > 100"]}, "constraints[0]"),
    ("constraint-unknown-metric", {"constraints": ["speed >= 3"]}, "constraints[0]"),
    ("constraint-not-number", {"constraints": ["decode_tokens_per_s >= fast"]}, "constraints[0]"),
    ("objective-unknown", {"objectives.0.name": "latency"}, "objectives[0].name"),
    ("objective-direction", {"objectives.1.direction": "lower"}, "objectives[1].direction"),
    ("objective-twice", {"objectives": ["j_per_token", "j_per_token"]}, "objectives"),
    ("objectives-empty", {"objectives": []}, "objectives"),
    ("two-model-objectives", {"objectives": ["accuracy", "proxy_kl"]}, "objectives"),
    ("sampler-unknown", {"sampler.name": "cmaes"}, "sampler.name"),
    ("nsga3-one-objective", {"sampler.name": "nsga3", "objectives": ["j_per_token"]}, "sampler.name"),
    ("population-one", {"sampler.population": 1}, "sampler.population"),
    ("study-name-spaces", {"study": "my study"}, "study"),
    ("model-missing", {"model": DELETE}, "model"),
    ("tasks-empty", {"tasks": []}, "tasks"),
    ("task-limit-zero", {"tasks.0.limit": 0}, "tasks[0].limit"),
    ("task-unknown", {"tasks.0.name": "hellaswagg"}, "hellaswagg"),
    ("task-twice", {"tasks": ["shakespeare_lastword", "shakespeare_lastword"]}, "tasks"),
    ("storage-scheme", {"storage": "mongodb://localhost/x"}, "storage"),
    ("storage-in-memory", {"storage": "sqlite://"}, "storage"),
    ("storage-not-url", {"storage": "studies.db"}, "storage"),
    ("promotion-final-text", {"promotion.final": "yes"}, "promotion.final"),
    ("warm-start-sensitivity-missing", {"warm_start.sensitivity": "nowhere.json"}, "warm_start.sensitivity"),
    ("compression-mode", {"compression.mode": "parallel"}, "compression.mode"),
    ("proxy-windows-zero", {"proxy.windows": 0}, "proxy.windows"),
    ("ray-threads-zero", {"ray.threads_per_worker": 0}, "ray.threads_per_worker"),
]


@pytest.mark.parametrize("case, change, field", SPEC, ids=ids(SPEC))
def test_spec(world, tmp_path, capsys, case, change, field):
    (tmp_path / "broken-boards.yaml").write_text(yaml.safe_dump({"devices": {"my-board": {
        k: v for k, v in BOARD.items() if k != "dsp"}}}))
    data = hardware_only(world.url, "catalogue-new")
    spec = tmp_path / "spec.yaml"
    if callable(change):
        spec.write_text(change(yaml.safe_dump(data, sort_keys=False)))
    else:
        spec.write_text(yaml.safe_dump(edit(data, change), sort_keys=False))
    refused(capsys, world, lambda: main(["start", str(spec), "--no-progress"]), field)


# ---------------------------------------------------------------------------------------------- resuming
# (id, change to the stored study's own spec, the field the refusal names): the study exists in the database
RESUME = [
    ("changed-objectives", {"objectives": ["decode_tokens_per_s", "power_w"]}, "objectives"),
    ("changed-device", {"hardware.device": "alveo-u280"}, "hardware.device"),
    ("changed-clock", {"hardware.clock_mhz": 250}, "hardware.clock_mhz"),
    ("changed-space", {"space.groups.1.formats": [8, 4]}, "space"),
    ("changed-constraints", {"constraints": ["decode_tokens_per_s >= 50"]}, "constraints"),
    ("changed-sampler", {"sampler.name": "random"}, "sampler"),
    ("changed-model", {"model": "{tiny}"}, "model"),
]


@pytest.mark.parametrize("case, change, field", RESUME, ids=ids(RESUME))
def test_resume_with_another_spec(world, tiny_model, tmp_path, capsys, case, change, field):
    spec = tmp_path / "spec.yaml"
    change = fill(change, {**world.fields(tmp_path), "tiny": str(tiny_model)})
    spec.write_text(yaml.safe_dump(edit(hardware_only(world.url), change), sort_keys=False))
    refused(capsys, world, lambda: main(["start", str(spec), "--no-progress"]), field)


# ---------------------------------------------------------------------------------------------- before work
# (id, change to a spec with a model objective and Ray at the tripwire address, expected field)
CHECKED_BEFORE_WORK = [
    ("metric-not-reported", {"tasks.0.metric": "accuracy"}, "tasks[0].metric"),
    ("task-data-unreachable", {"tasks": [{"name": "hellaswag", "limit": 4}]}, "hellaswag"),
    ("storage-missing-dir", {"storage": "sqlite:///{tmp}/missing/dir/studies.db"}, "storage"),
    ("storage-refused", {"storage": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:1/test"}, "storage"),
    ("truncated-weights", {"model": "{truncated}"}, "model.safetensors"),
]


@pytest.mark.parametrize("case, change, field", CHECKED_BEFORE_WORK, ids=ids(CHECKED_BEFORE_WORK))
def test_checked_before_ray(world, tiny_model, tmp_path, capsys, case, change, field):
    truncated = tmp_path / "truncated-model"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    spec = tmp_path / "spec.yaml"
    fields = {**world.fields(tmp_path), "truncated": str(truncated)}
    spec.write_text(yaml.safe_dump(edit(model_spec(world.url), fill(change, fields)), sort_keys=False))
    refused(capsys, world, lambda: main(["start", str(spec), "--no-progress"]), field)


def test_a_budget_no_plan_can_meet_stops_with_one_line(world, tmp_path, capsys):
    """Every trial screened out by a constraint: one line naming it (the study is created in a scratch
    database; the catalogue's database is untouched)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(edit(hardware_only(f"sqlite:///{tmp_path / 'scratch.db'}", "unmeetable"),
                                        {"constraints": ["decode_tokens_per_s >= 1e9"], "trials": 4}),
                                   sort_keys=False))
    refused(capsys, world, lambda: main(["start", str(spec), "--no-progress"]), "decode_tokens_per_s")


# ---------------------------------------------------------------------------------------------- arguments
# (id, argv with {placeholders}, expected field)
CLI = [
    ("no-command", [], "command"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("start-no-spec", ["start"], "spec"),
    ("start-missing-spec", ["start", "{tmp}/nowhere.yaml"], "nowhere.yaml"),
    ("start-spec-is-directory", ["start", "{tmp}"], "spec file"),
    ("start-trials-zero", ["start", "{spec}", "--trials", "0"], "trials"),
    ("start-trials-negative", ["start", "{spec}", "--trials", "-4"], "trials"),
    ("start-trials-text", ["start", "{spec}", "--trials", "many"], "--trials"),
    ("start-workers-zero", ["start", "{spec}", "--workers", "0"], "workers"),
    ("start-unknown-flag", ["start", "{spec}", "--trails", "3"], "--trails"),
    ("status-unknown-study", ["status", "nope", "--storage", "{url}"], "STUDY"),
    ("status-no-study", ["status", "--storage", "{url}"], "study"),
    ("export-unknown-study", ["export", "nope", "--storage", "{url}", "--out", "{tmp}/o"], "STUDY"),
    ("export-no-out", ["export", "{study}", "--storage", "{url}"], "--out"),
    ("export-trial-missing", ["export", "{study}", "--storage", "{url}", "--trial", "999", "--out", "{tmp}/o"],
     "--trial"),
    ("export-trial-negative", ["export", "{study}", "--storage", "{url}", "--trial", "-1", "--out", "{tmp}/o"],
     "--trial"),
    ("export-trial-text", ["export", "{study}", "--storage", "{url}", "--trial", "first", "--out", "{tmp}/o"],
     "--trial"),
    ("export-pick-unknown", ["export", "{study}", "--storage", "{url}", "--pick", "best", "--out", "{tmp}/o"],
     "--pick"),
    ("export-trial-and-pick", ["export", "{study}", "--storage", "{url}", "--trial", "0", "--pick", "min-energy",
                               "--out", "{tmp}/o"], "--pick"),
    ("export-where-syntax", ["export", "{study}", "--storage", "{url}", "--where", "decode_tokens_per_s >> 3",
                             "--out", "{tmp}/o"], "--where"),
    ("export-where-unknown-metric", ["export", "{study}", "--storage", "{url}", "--where", "speed>=3",
                                     "--out", "{tmp}/o"], "--where"),
    ("export-where-unmet", ["export", "{study}", "--storage", "{url}", "--where", "decode_tokens_per_s>=1e12",
                            "--out", "{tmp}/o"], "--where"),
    ("export-out-is-file", ["export", "{study}", "--storage", "{url}", "--trial", "{trial_a}", "--out", "{file}"],
     "--out"),
    ("export-out-unwritable", ["export", "{study}", "--storage", "{url}", "--trial", "{trial_a}",
                               "--out", "/proc/dse-catalogue/out"], "--out"),
    ("export-out-other-bundle", ["export", "{study}", "--storage", "{url}", "--trial", "{trial_b}",
                                 "--out", "{bundle}"], "--out"),
    ("dashboard-port-zero", ["dashboard", "--storage", "{url}", "--port", "0"], "--port"),
    ("dashboard-port-too-big", ["dashboard", "--storage", "{url}", "--port", "70000"], "--port"),
    ("dashboard-port-text", ["dashboard", "--storage", "{url}", "--port", "http"], "--port"),
    ("dashboard-port-busy", ["dashboard", "--storage", "{url}", "--port", "{busy_port}"], "--port"),
    ("dashboard-address-invalid", ["dashboard", "--storage", "{url}", "--address", "999.1.1.1"], "--address"),
    ("dashboard-address-unknown-host", ["dashboard", "--storage", "{url}", "--address", "no-such-host.invalid"],
     "--address"),
    ("evaluate-no-plan", ["evaluate", "{spec}"], "--plan"),
    ("evaluate-missing-plan", ["evaluate", "{spec}", "--plan", "{tmp}/nowhere.yaml"], "--plan"),
    ("evaluate-threads-zero", ["evaluate", "{spec}", "--plan", "{tmp}/p.yaml", "--threads", "0"], "--threads"),
    ("evaluate-fidelity-unknown", ["evaluate", "{spec}", "--plan", "{tmp}/p.yaml", "--fidelity", "exact"],
     "--fidelity"),
    ("sensitivity-windows-zero", ["sensitivity", "{spec}", "--windows", "0"], "--windows"),
    ("sensitivity-seq-len-negative", ["sensitivity", "{spec}", "--seq-len", "-8"], "--seq-len"),
    ("sensitivity-missing-spec", ["sensitivity", "{tmp}/nowhere.yaml"], "nowhere.yaml"),
    ("hwcost-no-subcommand", ["hwcost"], "hwcost"),
    ("hwcost-estimate-no-model", ["hwcost", "estimate", "--weights", "int4", "--device", "zcu102"],
     "--model-config"),
    ("hwcost-estimate-device-unknown", ["hwcost", "estimate", "--model-config", "llama2-7b", "--weights", "int8",
                                        "--device", "u280"], "--device"),
    ("hwcost-estimate-context-text", [*ESTIMATE, "--weights", "int8", "--context", "long"], "--context"),
    ("hwcost-estimate-prompt-negative", [*ESTIMATE, "--weights", "int8", "--prompt", "-3"], "--prompt"),
    ("hwcost-estimate-batch-beyond-the-model", [*ESTIMATE, "--weights", "int8", "--batch", "99999999"], "--batch"),
    ("hwcost-estimate-sparsity-with-plan", [*ESTIMATE, "--plan", "{tmp}/p.yaml", "--mixer", "mlgru"], "--mixer"),
]


@pytest.mark.parametrize("case, argv, field", CLI, ids=ids(CLI))
def test_arguments(world, tmp_path, capsys, case, argv, field):
    (tmp_path / "p.yaml").write_text("layers: []\n")
    refused(capsys, world, lambda: main(fill(argv, world.fields(tmp_path))), field)


# ---------------------------------------------------------------------------------------------- plan files
Q = "model.layers.0.self_attn.q_proj"
# (id, command: estimate (dse hwcost estimate --plan, SmolLM2 on the KV260) or evaluate (dse evaluate SPEC --plan),
#  the plan file (a mapping, or raw YAML text), expected field)
PLAN = [
    ("unknown-layer-key", "estimate", {"layers": [{"name": Q, "format": "4", "groupsize": 32}]},
     ("groupsize", "did you mean 'group_size'?")),
    ("unknown-layer-key-evaluate", "evaluate", {"layers": [{"name": Q, "format": "4", "groupsize": 32}]},
     ("groupsize", "did you mean 'group_size'?")),
    ("unknown-top-key", "estimate", {"layers": [], "blocs": []}, "blocs"),
    ("layers-not-list", "estimate", {"layers": {"name": Q}}, "layers"),
    ("layer-not-mapping", "estimate", {"layers": [Q]}, "layers[0]"),
    ("layer-name-missing", "evaluate", {"layers": [{"format": "4"}]}, "layers[0].name"),
    ("layer-of-a-bigger-model", "estimate", {"layers": [{"name": "model.layers.31.mlp.up_proj", "format": "4"}]},
     "model.layers.31.mlp.up_proj"),
    ("layer-unknown-name", "evaluate", {"layers": [{"name": "model.layers.0.mlp.fc1", "format": "4"}]},
     "model.layers.0.mlp.fc1"),
    ("unquoted-sparsity", "estimate", "layers:\n  - {name: " + Q + ", sparsity: 2:4}\n", "quote it"),
    ("sparsity-text", "evaluate", {"layers": [{"name": Q, "sparsity": "half"}]}, "sparsity"),
    ("format-bits", "estimate", {"layers": [{"name": Q, "format": "12"}]}, "format"),
    ("group-size-negative", "evaluate", {"layers": [{"name": Q, "format": "4", "group_size": -64}]}, "group_size"),
    ("prune-unknown", "estimate", {"layers": [{"name": Q, "sparsity": "2:4", "prune": "random"}]}, "prune"),
    ("block-index-missing", "estimate", {"blocks": [{"mixer": "mlgru"}]}, "blocks[0].index"),
    ("block-mixer-unknown", "evaluate", {"blocks": [{"index": 0, "mixer": "rwkv"}]}, "mixer"),
    ("duplicate-yaml-key", "estimate", "layers: []\nlayers: []\n", "duplicate key 'layers'"),
    ("empty-plan-file", "estimate", "", "the file is empty"),
    ("plan-is-list", "evaluate", "- name: lm_head\n", "expected a mapping at the top"),
]


@pytest.mark.parametrize("case, command, plan, field", PLAN, ids=ids(PLAN))
def test_plan_file(world, tmp_path, capsys, case, command, plan, field):
    path = tmp_path / "plan.yaml"
    path.write_text(plan if isinstance(plan, str) else yaml.safe_dump(plan, sort_keys=False))
    argv = ([*ESTIMATE, "--plan", str(path)] if command == "estimate" else
            ["evaluate", str(world.spec), "--plan", str(path)])
    line = refused(capsys, world, lambda: main(argv), field)
    assert line.startswith("error: --plan: "), line


# ---------------------------------------------------------------------------------------------- devices files
# (id, the devices file (a mapping of boards, or raw YAML text), expected field)
DEVICES = [
    ("board-lut-zero", {"my-board": {**BOARD, "lut": 0}}, "devices.my-board.lut"),
    ("board-ff-text", {"my-board": {**BOARD, "ff": "many"}}, "devices.my-board.ff"),
    ("board-unknown-field", {"my-board": {**BOARD, "luts": 5}}, ("devices.my-board.luts", "did you mean 'lut'?")),
    ("board-not-mapping", {"my-board": "xczu7ev"}, "devices.my-board"),
    ("board-no-memories", {"my-board": {**BOARD, "memories": {}}}, "devices.my-board.memories"),
    ("memory-kind-unknown", {"my-board": {**BOARD, "memories": {"m0": {"kind": "sram", "gbps": 1, "gb": 1}}}},
     "devices.my-board.memories.m0.kind"),
    ("memory-port-bits", {"my-board": {**BOARD, "memories": {"ddr4": {"gbps": 1, "gb": 1, "port_bits": 100}}}},
     "devices.my-board.memories.ddr4.port_bits"),
    ("default-memory-unknown", {"my-board": {**BOARD, "default_memory": "hbm"}}, "devices.my-board.default_memory"),
    ("alm-without-ratio", {"my-board": {**{k: v for k, v in BOARD.items() if k != "lut"}, "alm": 1000}},
     "devices.my-board.lut_equiv_per_alm"),
    ("static-w-negative", {"my-board": {**BOARD, "static_w": -1}}, "devices.my-board.static_w"),
    ("duplicate-board", "devices:\n  b1: {lut: 1}\n  b1: {lut: 2}\n", "duplicate key 'b1'"),
    ("top-level-unknown", "boards: {}\n", "boards"),
    ("empty-devices-file", "", "the file is empty"),
    ("not-yaml", "devices: {b1: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("case, boards, field", DEVICES, ids=ids(DEVICES))
def test_devices_file(world, tmp_path, capsys, case, boards, field):
    path = tmp_path / "boards.yaml"
    path.write_text(boards if isinstance(boards, str) else yaml.safe_dump({"devices": boards}, sort_keys=False))
    line = refused(capsys, world, lambda: main(["hwcost", "devices", "--devices-file", str(path)]), field)
    assert line.startswith("error: --devices-file: "), line


def test_devices_file_missing(world, tmp_path, capsys):
    refused(capsys, world, lambda: main(["hwcost", "devices", "--devices-file", str(tmp_path / "none.yaml")]),
            "--devices-file")


# ---------------------------------------------------------------------------------------------- accelerator files
# (id, the --accel file (a mapping, or raw YAML text), expected field); with --weights int4 on SmolLM2
ACCEL = [
    ("unknown-field", {"device": "kria-kv260", "clock": 200}, ("clock", "did you mean 'clock_mhz'?")),
    ("clock-text", {"device": "kria-kv260", "clock_mhz": "fast"}, "hardware.clock_mhz"),
    ("device-unknown", {"device": "kv999"}, "device"),
    ("device-missing", {"clock_mhz": 200}, "--device"),
    ("batch-zero", {"device": "kria-kv260", "batch": 0}, "hardware.batch"),
    ("prompt-negative", {"device": "kria-kv260", "prompt_length": -1}, "hardware.prompt_length"),
    ("dsp-share-above-one", {"device": "kria-kv260", "dsp_share": 1.5}, "hardware.dsp_share"),
    ("batch-beyond-the-model", {"device": "kria-kv260", "batch": 10**30}, "hardware.batch"),
    ("lanes-beyond-the-model", {"device": "kria-kv260", "lanes": {"int4": 10**21}}, "hardware.lanes"),
    ("hardware-section-not-mapping", {"hardware": ["kria-kv260"]}, "hardware"),
    ("hardware-section-empty", "hardware:\n", "hardware"),
    ("hardware-section-unknown", {"hardware": {"device": "kria-kv260", "kvbits": 8}}, "kvbits"),
    ("devices-section-broken", {"device": "my-board", "devices": {"my-board": {**BOARD, "dsp": -1}}},
     "devices.my-board.dsp"),
    ("duplicate-key", "device: kria-kv260\nbatch: 1\nbatch: 2\n", "duplicate key 'batch'"),
    ("accel-is-list", "- device: kria-kv260\n", "expected a mapping at the top"),
]


@pytest.mark.parametrize("case, accel, field", ACCEL, ids=ids(ACCEL))
def test_accelerator_file(world, tmp_path, capsys, case, accel, field):
    path = tmp_path / "accel.yaml"
    path.write_text(accel if isinstance(accel, str) else yaml.safe_dump(accel, sort_keys=False))
    argv = ["hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int4", "--accel", str(path)]
    refused(capsys, world, lambda: main(argv), field)


# ---------------------------------------------------------------------------------------------- model directories
def _model_dir(kind: str, tiny: Path, tmp: Path) -> str:
    """A model reference of the broken kind ``kind`` built under ``tmp`` (from the tiny model)."""
    target = tmp / f"model-{kind}"
    if kind == "empty-dir":
        target.mkdir()
    elif kind == "a-file":
        target = tmp / "weights.bin"
        target.write_bytes(b"\0" * 16)
    elif kind == "missing":
        return str(tmp / "no-such-model")
    elif kind == "broken-config":
        target.mkdir()
        (target / "config.json").write_text("{broken")
    elif kind == "unsupported-config":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    elif kind == "truncated-weights":
        shutil.copytree(tiny, target)
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:4096])
    elif kind == "garbage-weights":
        shutil.copytree(tiny, target)
        (target / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    elif kind == "hub-id-three-parts":
        return "org/name/extra"
    elif kind == "hub-id-with-suffix":
        return "weights.safetensors"
    elif kind == "hub-id-unknown":  # neither cached nor (offline) reachable; online the hub has no such repository
        return "dse-catalogue-nobody/no-such-model"
    return str(target)


# (id, command: start (the hardware-only spec), evaluate (dse evaluate SPEC --plan {layers: []}) or estimate
#  (dse hwcost estimate --model-config), the broken model, expected field)
MODEL = [
    ("start-no-config", "start", "empty-dir", "model"),
    ("start-not-a-directory", "start", "a-file", "model"),
    ("start-missing-dir", "start", "missing", "model"),
    ("start-hub-id-form", "start", "hub-id-three-parts", "model"),
    ("start-hub-id-suffix", "start", "hub-id-with-suffix", "model"),
    ("start-hub-id-unreachable", "start", "hub-id-unknown", "model"),
    ("start-broken-config", "start", "broken-config", "model"),
    ("start-unsupported-model-type", "start", "unsupported-config", "model"),
    ("evaluate-truncated-weights", "evaluate", "truncated-weights", "model.safetensors"),
    ("evaluate-garbage-weights", "evaluate", "garbage-weights", "model.safetensors"),
    ("evaluate-no-config", "evaluate", "empty-dir", "model"),
    ("estimate-no-config", "estimate", "empty-dir", "--model-config"),
    ("estimate-missing-dir", "estimate", "missing", "--model-config"),
    ("estimate-broken-config", "estimate", "broken-config", "--model-config"),
]


@pytest.mark.parametrize("case, command, kind, field", MODEL, ids=ids(MODEL))
def test_model(world, tiny_model, tmp_path, capsys, case, command, kind, field):
    model = _model_dir(kind, tiny_model, tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**hardware_only(world.url, "catalogue-model"), "model": model}, sort_keys=False))
    (tmp_path / "plan.yaml").write_text("layers: []\n")
    argv = {"start": ["start", str(spec), "--no-progress"],
            "evaluate": ["evaluate", str(spec), "--plan", str(tmp_path / "plan.yaml")],
            "estimate": ["hwcost", "estimate", "--model-config", model, "--weights", "int4", "--device", "zcu102"],
            }[command]
    refused(capsys, world, lambda: main(argv), field)


# ---------------------------------------------------------------------------------------------- storage URLs
def _not_a_database(tmp: Path) -> str:
    path = tmp / "notes.db"
    path.write_text("these are notes, not a database\n" * 100)
    return f"sqlite:///{path}"


STORAGE_URLS = {
    "bad-scheme": "mongodb://localhost:27017/studies",
    "not-a-url": "studies.db",
    "in-memory-sqlite": "sqlite://",
    "sqlite-missing-dir": "sqlite:///{tmp}/missing/dir/studies.db",
    "not-a-database": "{notes}",
    "pg-refused-port": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:1/test",
    "pg-unknown-role": "postgresql://dse_catalogue_no_role@{pg_host}/test",
    "pg-missing-database": "{pg}/dse_catalogue_no_database",
    "pg-non-numeric-port": "postgresql://postgres@127.0.0.1:port5432/test",
}
# (id, command, the storage URL (a key of STORAGE_URLS)): every line names the storage
STORAGE = [(f"{command}-{url}", command, url) for command in ("start", "status", "export", "dashboard")
           for url in STORAGE_URLS]


@pytest.mark.parametrize("case, command, url", STORAGE, ids=ids(STORAGE))
def test_storage_url(world, tmp_path, capsys, case, command, url):
    storage = fill(STORAGE_URLS[url], {**world.fields(tmp_path), "notes": _not_a_database(tmp_path)})
    argv = {"start": ["start", str(world.spec), "--no-progress"],
            "status": ["status", STUDY],
            "export": ["export", STUDY, "--out", str(tmp_path / "out")],
            "dashboard": ["dashboard", "--port", str(world.busy_port + 1)]}[command]
    refused(capsys, world, lambda: main([*argv, "--storage", storage]), "storage")


# ---------------------------------------------------------------------------------------------- checkpoints
def _flip(path: Path, offset_from_end: int, count: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) - offset_from_end
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def _broken_checkpoint(kind: str, good: Path, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "no-checkpoint"
    if kind == "a-file":
        (tmp / "ckpt.bin").write_bytes(b"\0" * 8)
        return tmp / "ckpt.bin"
    path = tmp / "ckpt"
    shutil.copytree(good, path)
    manifest = path / "checkpoint.json"
    if kind == "no-manifest":
        manifest.unlink()
    elif kind == "manifest-not-json":
        manifest.write_text("{not json")
    elif kind in ("format-version", "format-name"):
        data = json.loads(manifest.read_text())
        data.update({"format_version": 99} if kind == "format-version" else {"format": "gguf"})
        manifest.write_text(json.dumps(data))
    elif kind == "no-weights":
        (path / "dse-packed.safetensors").unlink()
    elif kind == "truncated-weights":
        weights = path / "dse-packed.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "flipped-bytes":
        _flip(path / "dse-packed.safetensors", offset_from_end=64 * 1024)
    return path


# (id, what is broken, expected field)
CHECKPOINT = [
    ("not-a-directory", "a-file", "ckpt.bin"),
    ("missing", "missing", "no-checkpoint"),
    ("no-checkpoint-json", "no-manifest", "checkpoint.json"),
    ("checkpoint-json-not-json", "manifest-not-json", "checkpoint.json"),
    ("format-version", "format-version", "format version"),
    ("format-name", "format-name", "checkpoint.json"),
    ("no-weights", "no-weights", "dse-packed.safetensors"),
    ("truncated-weights", "truncated-weights", "dse-packed.safetensors"),
    ("flipped-bytes", "flipped-bytes", "dse-packed.safetensors"),
]


def load_checkpoint_command(path: Path) -> int:
    """What a command loading a checkpoint does with it: ``dse``'s handler of a :class:`UserError`."""
    from evaluators.checkpoint import load_checkpoint

    try:
        load_checkpoint(path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


@pytest.mark.parametrize("case, kind, field", CHECKPOINT, ids=ids(CHECKPOINT))
def test_checkpoint(world, checkpoint, tmp_path, capsys, case, kind, field):
    path = _broken_checkpoint(kind, checkpoint, tmp_path)
    refused(capsys, world, lambda: load_checkpoint_command(path), field)


def test_the_catalogue_has_at_least_60_cases():
    tables = (SPEC, RESUME, CHECKED_BEFORE_WORK, CLI, PLAN, DEVICES, ACCEL, MODEL, STORAGE, CHECKPOINT)
    assert sum(map(len, tables)) + 2 >= 60  # + the unmeetable budget and the missing devices file
