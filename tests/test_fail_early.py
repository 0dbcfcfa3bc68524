"""Every mistake ``dse start`` can see before work is one line, exit 2, before Ray starts and before the study is
created (dse.study.run_study's order: spec, storage, tasks and metrics and their data, model weights, Ray):
storage faults on the real PostgreSQL server and on SQLite (also in ``dse status``), a metric the task does not
report, task data and a hub model that cannot be reached, truncated or mismatched weights; and a budget whose
every trial is screened out ends in one line naming the constraint and the best value seen."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import optuna
import pytest
import ray
import yaml

from dse.cli import main
from helpers import free_port, small_spec
from test_identity import hardware_spec, tiny_model  # noqa: F401 (a fixture)

UNREACHABLE_HUB = "http://127.0.0.1:9"
"""A hub endpoint nothing listens on (the discard port), for the data and model reachability cases."""


def start(folder: Path, data: dict, capsys) -> tuple[int, str]:
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["start", str(spec), "--no-progress"])
    return code, capsys.readouterr().err


def one_line(code: int, err: str, prefix: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {prefix}"), err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_ray():
    """Ray is not running before the test, and the test asserts it is still not running after it."""
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "a check that can run before work let Ray start"


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The Hugging Face endpoint (``$HF_ENDPOINT``) pointed at a port nothing listens on."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)


def storage_faults(folder: Path) -> list[tuple[str, str, list[str]]]:
    """(case, URL, what its one line must contain) for every storage fault; the URLs carry a password where a
    server is involved, which must never be printed."""
    port = free_port()
    (folder / "junk.db").write_text("this is not a database\n")
    return [
        ("refused", f"postgresql://postgres:s3cret@127.0.0.1:{port}/test",
         [f"postgresql://postgres:***@127.0.0.1:{port}/test", "Connection refused"]),
        ("unknown-role", "postgresql://dse_nobody:s3cret@127.0.0.1:5432/test", ['role "dse_nobody" does not exist']),
        ("missing-database", "postgresql://postgres:s3cret@127.0.0.1:5432/dse_no_such_db",
         ['database "dse_no_such_db" does not exist']),
        ("missing-folder", f"sqlite:///{folder}/no/such/folder/s.db", [f"{folder}/no/such/folder"]),
        ("not-a-database", f"sqlite:///{folder}/junk.db", ["file is not a database"]),
        ("non-numeric-port", "postgresql://postgres:s3cret@127.0.0.1:abc/test", ["'abc'"]),
    ]


CASES = ["refused", "unknown-role", "missing-database", "missing-folder", "not-a-database", "non-numeric-port"]


@pytest.mark.parametrize("case", CASES)
def test_a_storage_fault_is_one_line_in_start_and_status(tmp_path, capsys, no_ray, case):
    """``dse start`` (a spec with a model objective, so Ray would start) and ``dse status``: one line naming the
    storage (password masked), exit 2, in seconds, nothing created (the folder's files unchanged)."""
    _, url, expected = next(f for f in storage_faults(tmp_path) if f[0] == case)
    files = {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file()}
    started = time.monotonic()
    code, err = start(tmp_path, small_spec(url, "fault"), capsys)
    one_line(code, err, "storage: ")
    assert all(text in err for text in expected) and "s3cret" not in err, err
    capsys.readouterr()
    code = main(["status", "fault", "--storage", url])
    status_err = capsys.readouterr().err
    one_line(code, status_err, "--storage: ")
    assert all(text in status_err for text in expected) and "s3cret" not in status_err, status_err
    assert "exceeding max length" not in status_err
    assert time.monotonic() - started < 30
    assert {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file() and p.name != "spec.yaml"} == files


def test_a_metric_the_task_does_not_report_is_one_line_before_any_trial(tmp_path, capsys, no_ray):
    db = tmp_path / "s.db"
    data = small_spec(f"sqlite:///{db}", "bad-metric")
    data["tasks"] = [{"name": "shakespeare_cloze", "metric": "acc_norm"}, {"name": "shakespeare_lastword",
                                                                         "metric": "accuracy"}]
    code, err = start(tmp_path, data, capsys)
    one_line(code, err, "tasks[1].metric: 'accuracy' is not a metric lm-eval reports for shakespeare_lastword; "
                        "it reports perplexity, acc\n")
    assert not db.exists()


def test_task_data_that_cannot_be_reached_is_one_line_before_any_trial(tmp_path, capsys, no_ray, unreachable_hub):
    """hellaswag's data is on the hub: with the hub unreachable (and the data not in the local datasets cache)
    the start stops at once naming the task, instead of after the proxy search."""
    db = tmp_path / "s.db"
    data = small_spec(f"sqlite:///{db}", "no-data")
    data["tasks"] = [{"name": "shakespeare_lastword", "metric": "acc"}, {"name": "hellaswag", "metric": "acc_norm"}]
    code, err = start(tmp_path, data, capsys)
    one_line(code, err, "tasks[1].name: the data of 'hellaswag' is not in the local datasets cache and the hub "
                        f"cannot be reached ({UNREACHABLE_HUB}: ")
    assert not db.exists()


def test_a_hub_model_that_cannot_be_reached_is_one_quick_line(tmp_path, capsys, no_ray, unreachable_hub):
    """No retry warnings over half a minute: the local cache is tried, then the hub asked once."""
    data = small_spec(f"sqlite:///{tmp_path / 's.db'}", "no-hub")
    data["model"] = "dse-test/no-such-model"
    started = time.monotonic()
    code, err = start(tmp_path, data, capsys)
    one_line(code, err, "model: hub id 'dse-test/no-such-model' is not in the local Hugging Face cache and the hub "
                        f"cannot be reached ({UNREACHABLE_HUB}: ")
    assert time.monotonic() - started < 10


def tiny_spec(folder: Path, model: Path) -> dict:
    data = small_spec(f"sqlite:///{folder / 's.db'}", "tiny")
    data["model"] = str(model)
    return data


def test_truncated_weights_are_one_line_before_any_trial(tmp_path, capsys, no_ray, tiny_model):  # noqa: F811
    model = shutil.copytree(tiny_model, tmp_path / "model")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    tensors = json.loads(weights.read_bytes()[8:header])
    assert header + max(v["data_offsets"][1] for k, v in tensors.items() if k != "__metadata__") == size
    code, err = start(tmp_path, tiny_spec(tmp_path, model), capsys)
    one_line(code, err, f"model: '{weights}' is {size // 2} bytes but its header describes {size} (truncated)\n")
    assert not (tmp_path / "s.db").exists()


def test_weights_that_do_not_match_the_config_are_one_line(tmp_path, capsys, no_ray, tiny_model):  # noqa: F811
    model = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    code, err = start(tmp_path, tiny_spec(tmp_path, model), capsys)
    one_line(code, err, f"model: tensor model.layers.0.mlp.gate_proj.weight of '{model}' has shape [64, 32]; its "
                        "config.json needs [128, 32]\n")
    assert not (tmp_path / "s.db").exists()


def test_a_budget_screened_out_entirely_is_one_line_naming_the_constraint(tmp_path, capsys):
    """Every trial breaks ``decode_tokens_per_s >= 1e6``: exit 2 with the best value the stored trials reached
    (read back independently), and the trials stay in the study (told infeasible, nothing running)."""
    db = f"sqlite:///{tmp_path / 's.db'}"
    data = hardware_spec(db, "nofit", hardware={"device": "kria-kv260"},
                         constraints=["decode_tokens_per_s >= 1e6", "j_per_token <= 10"])
    code, err = start(tmp_path, data, capsys)
    trials = optuna.load_study(study_name="nofit", storage=db).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    best = max(t.user_attrs["hw_metrics"]["decode_tokens_per_s"] for t in trials)
    assert all(t.constraints["j_per_token <= 10"] <= 0 for t in trials)  # met: not named
    one_line(code, err, f"constraints: no plan of 3 met 'decode_tokens_per_s >= 1e+06' (best seen {best:.4g}); ")
