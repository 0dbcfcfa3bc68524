"""Study identity (dse.identity): resuming a stored study with a spec that changes what a trial means is refused
with one line naming the field, before any trial and with the SQLite file byte-identical; the fields that may
change are accepted and recorded per run, and ``dse status`` shows the budget in force and the storage read.

The studies are hardware-only (no objective needs the model: no Ray, no weights), so each start takes a
second; the tiny model directory is built here with transformers (config only matters)."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from dse.cli import main
from dse.identity import budget, differences, runs

BOARD = {"vendor": "amd", "part": "test-part", "lut": 230_400, "ff": 460_800, "dsp": 1_728, "dsp_kind": "dsp48e2",
         "bram_blocks": 312, "bram_block_kbits": 36, "uram": 96, "memories": {"ddr4": {"gbps": 38.4, "gb": 8}},
         "static_w": 5.0}
"""A board of the user's devices file (not in the catalog)."""


def hardware_spec(storage: str, study: str = "ident", **overrides) -> dict:
    """A hardware-only spec: 3 trials on the default model's config, decode speed and energy objectives."""
    data = {"study": study, "model": "smollm2-135m", "storage": storage, "trials": 3,
            "tasks": [{"name": "shakespeare_lastword", "metric": "acc", "limit": 4}],
            "space": {"tie": "group", "groups": [{"name": "all", "targets": r"model\.layers\.\d+\..*",
                                                  "formats": [8, 4]}]},
            "hardware": {"device": ["kria-kv260", "my-board"], "clock_mhz": 300, "devices_file": "boards.yaml"},
            "objectives": ["decode_tokens_per_s", "j_per_token"], "sampler": {"name": "random", "seed": 1}}
    data.update(overrides)
    return data


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(folder: Path, data: dict, capsys, *extra: str) -> tuple[int, str]:
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["start", str(spec), "--no-progress", *extra])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A folder with the devices file and a SQLite file holding study 'ident' (3 trials of hardware_spec)."""
    folder = tmp_path_factory.mktemp("ident")
    (folder / "boards.yaml").write_text(yaml.safe_dump({"devices": {"my-board": BOARD}}))
    data = hardware_spec(f"sqlite:///{folder / 'studies.db'}")
    (folder / "spec.yaml").write_text(yaml.safe_dump(data))
    assert main(["start", str(folder / "spec.yaml"), "--no-progress"]) == 0
    return folder


def tiny_llama(folder: Path) -> Path:
    """A random two-block Llama (vocabulary 128, hidden 32) saved by transformers as a model directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def copy_of(stored, tmp_path):
    """A fresh copy of the stored study's folder: (folder, its spec dict, the SQLite file)."""
    folder = tmp_path / "copy"
    shutil.copytree(stored, folder)
    db = folder / "studies.db"
    return folder, hardware_spec(f"sqlite:///{db}"), db


def changed(data: dict, path: str, value) -> dict:
    """``data`` with the dotted ``path`` (list indices as numbers) set to ``value``."""
    out = copy.deepcopy(data)
    node, keys = out, path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return out


REFUSED = [
    ("hardware.device", "alveo-u280", "hardware.device: stored ['kria-kv260', 'my-board'], this spec 'alveo-u280'"),
    ("hardware.clock_mhz", [200, 300], "hardware.clock_mhz: stored 300, this spec [200, 300]"),
    ("hardware.batch", 4, "hardware.batch: stored 1, this spec 4"),
    ("space.groups.0.formats", [8, 4, 3], "space.groups[0].formats: stored ['8', '4'], this spec ['8', '4', '3']"),
    ("space.tie", "block", "space.tie: stored 'group', this spec 'block'"),
    ("model", "TINY", "model.name: stored 'smollm2-135m', this spec '"),
    ("tasks.0.metric", "perplexity", "tasks[0].metric: stored 'acc', this spec 'perplexity'"),
    ("tasks.0.limit", 8, "tasks[0].limit: stored 4, this spec 8"),
    ("task_seed", 2, "task_seed: stored 0, this spec 2"),
    ("objectives", ["decode_tokens_per_s", "power_w"], "objectives[1].name: stored 'j_per_token', this spec 'power_w'"),
    ("constraints", ["decode_tokens_per_s >= 10"], "constraints: stored [], this spec ['decode_tokens_per_s >= 10']"),
    ("sampler", {"name": "random", "seed": 2}, "sampler.seed: stored 1, this spec 2"),
    ("proxy", {"windows": 2, "seq_len": 64}, "proxy.windows: stored 8, this spec 2"),
    ("compression", {"mode": "dense"}, "compression.mode: stored 'sequential', this spec 'dense'"),
]


@pytest.mark.parametrize("path,value,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_change_of_what_a_trial_means_is_refused_with_one_line(copy_of, capsys, path, value, message, tiny_model):
    folder, data, db = copy_of
    before = sha256(db)
    code, err = start(folder, changed(data, path, str(tiny_model) if value == "TINY" else value), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {message}"), err
    assert "use another study name" in err and f"study 'ident' in sqlite:///{db}" in err
    assert sha256(db) == before  # refused before any trial was asked: not even a RUNNING one


def test_a_changed_board_of_the_devices_file_is_refused(copy_of, capsys):
    """The boards the device may name are compared by content (the study stores them), not by the file's path."""
    folder, data, db = copy_of
    before = sha256(db)
    (folder / "boards.yaml").write_text(yaml.safe_dump({"devices": {"my-board": {**BOARD, "dsp": 3_456}}}))
    code, err = start(folder, data, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: hardware.devices_file.my-board.dsp: stored 1728, this spec 3456;"), err
    assert sha256(db) == before


def test_a_changed_space_never_reaches_optuna(copy_of, capsys):
    """A new choice for an existing parameter would be Optuna's 'CategoricalDistribution does not support dynamic
    value space' traceback on the first ask; the identity check refuses it first."""
    folder, data, db = copy_of
    data["space"]["groups"][0]["formats"] = [8, 2]
    code, err = start(folder, data, capsys)
    assert code == 2 and "dynamic value space" not in err and err.startswith("error: space.groups[0].formats:")
    trials = optuna.load_study(study_name="ident", storage=f"sqlite:///{db}").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3


def test_allowed_changes_resume_and_are_recorded(stored, copy_of, capsys, monkeypatch):
    """Budget, workers, threads, heartbeat, batch size, promotion, warm start, Ray address and the storage's
    address form (relative instead of absolute path) may change: the study resumes to the new budget, each run
    is recorded, and the status header shows the latest budget and the storage URL given."""
    folder, data, db = copy_of
    monkeypatch.chdir(folder)
    relative = "sqlite:///studies.db"
    data = {**data, "storage": relative, "trials": 5, "workers": 3, "heartbeat_s": 4, "batch_size": 2,
            "ray": {"address": "127.0.0.1:6379", "threads_per_worker": 2}, "promotion": {"every": 0},
            "warm_start": {"baselines": False}}
    code, err = start(folder, data, capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="ident", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    first, second = runs(study.user_attrs)
    assert (first["trials"], first["workers"], first["storage"]) == (3, 2, f"sqlite:///{stored / 'studies.db'}")
    assert second == {"time": second["time"], "trials": 5, "workers": 3, "threads_per_worker": 2, "storage": relative,
                      "ray_address": "127.0.0.1:6379", "heartbeat_s": 4, "batch_size": 2,
                      "promotion": {"every": 0, "final": True}, "warm_start": {"baselines": False, "sensitivity": None}}
    assert study.user_attrs["spec"]["trials"] == 3 and budget(study.user_attrs) == 5  # the creation spec is kept
    assert main(["status", "ident", "--storage", relative]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"study ident in {relative}: model smollm2-135m, device kria-kv260 | my-board, "
                             "budget 5 trials"), header


def test_an_old_stored_spec_without_newer_fields_resumes(copy_of, capsys):
    """A spec stored before some fields existed (here: proxy, compression.distill_lr, the groups' symmetric and
    quant, task_seed, the tasks' limit) compares as this version's defaults, so the same spec resumes; a
    missing field whose value this spec changes is still refused."""
    folder, data, db = copy_of
    study = optuna.load_study(study_name="ident", storage=f"sqlite:///{db}")
    old = copy.deepcopy(study.user_attrs["spec"])
    for key in ("proxy", "task_seed"):
        del old[key]
    del old["compression"]["distill_lr"], old["space"]["groups"][0]["symmetric"], old["space"]["groups"][0]["quant"]
    data["tasks"] = [{"name": "shakespeare_lastword", "metric": "acc"}]
    del old["tasks"][0]["limit"]
    study.set_user_attr("spec", old)
    before = sha256(db)
    code, err = start(folder, {**data, "task_seed": 1}, capsys)
    assert code == 2 and err.startswith("error: task_seed: stored 0, this spec 1;"), err
    assert sha256(db) == before
    code, err = start(folder, {**data, "trials": 4}, capsys)
    assert code == 0, err
    assert len(optuna.load_study(study_name="ident", storage=f"sqlite:///{db}").trials) == 4


def test_differences_name_dotted_paths():
    stored = {"a": {"b": 1, "c": [1, 2]}, "l": [{"x": 1}, {"x": 2}], "s": [1]}
    current = {"a": {"b": 2, "c": [1, 2], "d": 0}, "l": [{"x": 1}, {"x": 3}], "s": [1, 2]}
    assert differences(stored, current) == [("a.b", 1, 2), ("a.d", "(absent)", 0), ("l[1].x", 2, 3), ("s", [1], [1, 2])]
    assert differences({"model": {"workload": {"h": 1, "old": 3}}}, {"model": {"workload": {"h": 1}}}) == []


def test_every_spec_field_is_identity_or_may_change():
    """A field added to the spec must be classified (dse.identity's docstring says why each is where it is)."""
    from dse.identity import IDENTITY, MAY_CHANGE
    from dse.spec import parse_spec

    fields = set(parse_spec(hardware_spec("sqlite:///s.db", hardware={"device": "kria-kv260"})).to_dict())
    assert fields - {"study"} == set(IDENTITY) | set(MAY_CHANGE) and not set(IDENTITY) & set(MAY_CHANGE)


def test_a_changed_spec_is_refused_on_postgresql(stored, tmp_path, capsys):
    """The same refusal on the real PostgreSQL server: nothing asked, the trials and study attributes unchanged."""
    import uuid

    from helpers import PG_URL

    shutil.copy(stored / "boards.yaml", tmp_path / "boards.yaml")
    name = f"ident-{uuid.uuid4().hex[:8]}"
    data = hardware_spec(PG_URL, name)
    try:
        assert start(tmp_path, data, capsys)[0] == 0
        study = optuna.load_study(study_name=name, storage=PG_URL)
        before = (len(study.trials), study.user_attrs)
        code, err = start(tmp_path, changed(data, "space.groups.0.formats", [8, 4, 2]), capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: space.groups[0].formats: stored ['8', '4'], this spec ['8', '4', '2'];"), err
        study = optuna.load_study(study_name=name, storage=PG_URL)
        assert (len(study.trials), study.user_attrs) == before
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)
