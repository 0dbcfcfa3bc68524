"""``dse list`` and ``dse status --json`` as a user runs them (the ``dse`` executable in a subprocess), on SQLite
studies made for the purpose and on the real PostgreSQL server: the JSON holds what was stored, a storage that
does not exist is one ``error:`` line (exit 2) and stays missing, and a reader that goes away (``| head``) ends
the command quietly (exit 141, nothing on stderr).

The reference values are the ones the tests put in (hand-made studies) or a brute-force reading of the stored
trials (the Pareto set of the real hardware-only study); the hypervolume of the hand-made front is worked out
below by hand."""

from __future__ import annotations

import json
import subprocess
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from helpers import PG_URL, ROOT
from test_catalogue import hardware_only

DSE = str(ROOT / ".venv" / "bin" / "dse")
RUN_TIME = "2024-05-06T07:08:09+00:00"


def dse(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DSE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def dse_json(*args: str):
    done = dse(*args)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return json.loads(done.stdout)


def columns(table: str) -> list[dict]:
    """A ``dse`` text table read back by the column spans of its dashes line: one dict per row."""
    header, dashes, *rows = table.splitlines()
    spans, start = [], 0
    for run in dashes.split("  "):
        spans.append((start, start + len(run)))
        start += len(run) + 2
    names = [header[a:b].strip() for a, b in spans]
    return [{n: row[a:b].strip() for n, (a, b) in zip(names, spans)} for row in rows]


SPEC = {"model": "tiny-test-model", "trials": 9, "constraints": ["decode_tokens_per_s >= 50"],
        "objectives": [{"name": "decode_tokens_per_s", "direction": "maximize"},
                       {"name": "j_per_token", "direction": "minimize"}],
        "hardware": {"device": "kria-kv260", "clock_mhz": [200, 300]}}
# (number, values, state, evaluated, constraint decode_tokens_per_s >= 50). With (tps max, J min): trial 2 is
# dominated by 0; 3 breaks the constraint; 4 was screened out by the cost model (not evaluated), so neither counts
# even though both would dominate. Front: 0 (100, 0.5), 1 (80, 0.3), 5 (60, 0.2), best tps first.
TRIALS = [(0, (100.0, 0.5), TrialState.COMPLETE, True, -0.5), (1, (80.0, 0.3), TrialState.COMPLETE, True, -0.3),
          (2, (90.0, 0.6), TrialState.COMPLETE, True, -0.4), (3, (120.0, 0.1), TrialState.COMPLETE, True, 1.0),
          (4, (200.0, 0.05), TrialState.COMPLETE, False, -1.0), (5, (60.0, 0.2), TrialState.COMPLETE, True, -0.1),
          (6, None, TrialState.FAIL, False, None), (7, None, TrialState.FAIL, False, None),
          (8, None, TrialState.PRUNED, False, None)]
FRONT = [0, 1, 5]
HYPERVOLUME = 0.71
"""Feasible losses (-tps, J): 0 (-100, .5), 1 (-80, .3), 2 (-90, .6), 5 (-60, .2); best (-100, .2), worst (-60, .6),
so normalised 0 (0, .75), 1 (.5, .25), 2 (.25, 1), 5 (1, 0). Front 0, 1, 5 against (1.1, 1.1):
.5 x (1.1 - .75) + .5 x (1.1 - .25) + .1 x 1.1 = .175 + .425 + .11 = .71."""
FULL = {"metrics": {"shakespeare_lastword": {"acc": 0.25, "acc_stderr": float("nan")}}, "accuracy": 0.25}
"""Trial 1's promotion; lm-eval's NaN must reach the JSON as null."""


def hand_made(storage, name: str) -> None:
    """A study as ``dse start`` leaves one, built from :data:`TRIALS`, plus one running and one waiting trial."""
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    with warnings.catch_warnings():  # as dse.study names them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["decode_tokens_per_s", "j_per_token"])
    study.set_user_attr("spec", SPEC)
    study.set_user_attr(f"run:{RUN_TIME}:abcdef", {"time": RUN_TIME, "trials": 11})  # the budget now in force
    study.set_user_attr("full:1", FULL)
    for number, values, state, evaluated, constraint in TRIALS:
        attrs = {"evaluated": evaluated}
        if values:
            attrs.update(hw_metrics={"decode_tokens_per_s": values[0], "j_per_token": values[1],
                                     "weight_bytes": 1e6 * (number + 1)},
                         plan_summary={"int4/g64": number + 1}, accelerator={"clock_mhz": 200 + 100 * (number % 2)})
        study.add_trial(create_trial(state=state, values=values, user_attrs=attrs,
                                     constraints=None if constraint is None else {"decode_tokens_per_s >= 50":
                                                                                  constraint, "fits": 0.0}))
    study.ask()  # running
    study.enqueue_trial({})  # waiting


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A SQLite storage holding a real hardware-only study (``dse start``, 6 trials), the hand-made study and a
    bare Optuna study; returns its URL."""
    root = tmp_path_factory.mktemp("list")
    url = f"sqlite:///{root / 'studies.db'}"
    spec = root / "hw.yaml"
    spec.write_text(yaml.safe_dump(hardware_only(url, "hw"), sort_keys=False))
    started = dse("start", str(spec), "--no-progress", cwd=root)
    assert started.returncode == 0, started.stderr[-3000:]
    hand_made(url, "hand")
    optuna.create_study(study_name="bare", storage=url)
    return url


def test_list_json_and_table_hold_what_was_stored(studies):
    listed = {s["name"]: s for s in dse_json("list", "--storage", studies, "--json")}
    assert list(listed) == ["hw", "hand", "bare"]
    assert all(list(s) == ["name", "model", "objectives", "trials", "budget", "created", "last_update"]
               for s in listed.values())
    hand = listed["hand"]
    assert hand["model"] == "tiny-test-model" and hand["budget"] == 11 and hand["created"] == RUN_TIME
    assert hand["objectives"] == SPEC["objectives"]
    assert hand["trials"] == {"complete": 6, "running": 1, "fail": 2, "pruned": 1, "waiting": 1}
    assert hand["last_update"].endswith("+00:00")
    bare = listed["bare"]
    assert bare == {"name": "bare", "model": None, "objectives": [{"name": "objective0", "direction": "minimize"}],
                    "trials": {"complete": 0, "running": 0, "fail": 0, "pruned": 0, "waiting": 0}, "budget": None,
                    "created": None, "last_update": None}
    hw = listed["hw"]
    stored = optuna.load_study(study_name="hw", storage=studies)
    assert hw["model"] == "smollm2-135m" and hw["budget"] == 6 and hw["trials"]["complete"] == 6
    assert hw["objectives"] == [{"name": "decode_tokens_per_s", "direction": "maximize"},
                                {"name": "j_per_token", "direction": "minimize"}]
    assert hw["created"] == next(v["time"] for k, v in stored.user_attrs.items() if k.startswith("run:"))

    done = dse("list", "--storage", studies)
    assert done.returncode == 0 and done.stderr == ""
    rows = {r["study"]: r for r in columns(done.stdout)}
    assert list(rows) == ["hw", "hand", "bare"]
    assert rows["hand"] == {"study": "hand", "model": "tiny-test-model",
                            "objectives": "decode_tokens_per_s max, j_per_token min", "complete": "6",
                            "running": "1", "fail": "2", "pruned": "1", "waiting": "1", "budget": "11",
                            "created": RUN_TIME, "last update": hand["last_update"]}
    assert rows["bare"]["model"] == "" and rows["bare"]["budget"] == "" and rows["bare"]["complete"] == "0"


def test_status_json_of_the_hand_made_study(studies):
    status = dse_json("status", "hand", "--storage", studies, "--json")
    assert status["study"] == "hand" and status["storage"] == studies and status["model"] == "tiny-test-model"
    assert status["device"] == "kria-kv260" and status["budget"] == 11
    assert status["objectives"] == SPEC["objectives"] and status["constraints"] == SPEC["constraints"]
    assert status["searched"] == {"clock_mhz": [200, 300]}
    assert status["trials"] == {"complete": 6, "running": 1, "fail": 2, "pruned": 1, "waiting": 1, "infeasible": 1}
    assert [p["trial"] for p in status["pareto"]] == FRONT
    by_number = {t[0]: t for t in TRIALS}
    for entry in status["pareto"]:
        number, (tps, joules) = entry["trial"], by_number[entry["trial"]][1]
        assert entry["values"] == {"decode_tokens_per_s": tps, "j_per_token": joules}
        assert entry["hw_metrics"] == {"decode_tokens_per_s": tps, "j_per_token": joules,
                                       "weight_bytes": 1e6 * (number + 1)}
        assert entry["accelerator"] == {"clock_mhz": 200 + 100 * (number % 2)}
        assert entry["constraints"] == {"decode_tokens_per_s >= 50": by_number[number][4], "fits": 0.0}
        assert entry["plan"] == f"{number + 1}x int4/g64" and entry["proxy"] is None and entry["warm_start"] is None
    promoted = {"metrics": {"shakespeare_lastword": {"acc": 0.25, "acc_stderr": None}}, "accuracy": 0.25}
    assert status["pareto"][1]["full"] == promoted and status["pareto"][0]["full"] is None
    assert status["full_results"] == {"1": promoted}
    assert status["hypervolume"]["feasible"] == 4
    assert status["hypervolume"]["value"] == pytest.approx(HYPERVOLUME)
    text = dse("status", "hand", "--storage", studies)  # the text output is still there
    assert text.returncode == 0 and text.stdout.startswith("study hand in ") and "hypervolume 0.7100" in text.stdout


def brute_force_front(trials, directions) -> list[int]:
    """The feasible trials no other feasible trial dominates (one per distinct value vector), by pairs."""
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("evaluated")
                and all(v <= 0 for v in t.constraints.values())]
    sign = [-1 if d == optuna.study.StudyDirection.MAXIMIZE else 1 for d in directions]

    def loss(t):
        return [s * v for s, v in zip(sign, t.values)]

    def dominated(t):
        return any(all(a <= b for a, b in zip(loss(o), loss(t))) and loss(o) != loss(t) for o in feasible)

    front, seen = [], set()
    for t in sorted(feasible, key=lambda t: t.number):
        if not dominated(t) and tuple(t.values) not in seen:
            seen.add(tuple(t.values))
            front.append(t)
    return [t.number for t in sorted(front, key=lambda t: loss(t)[0])]


def test_status_json_of_the_real_study(studies):
    stored = optuna.load_study(study_name="hw", storage=studies)
    trials = stored.get_trials()
    status = dse_json("status", "hw", "--storage", studies, "--json")
    assert [p["trial"] for p in status["pareto"]] == brute_force_front(trials, stored.directions)
    by_number = {t.number: t for t in trials}
    for entry in status["pareto"]:
        trial = by_number[entry["trial"]]
        assert list(entry["values"].values()) == trial.values
        assert entry["hw_metrics"] == trial.user_attrs["hw_metrics"]
        assert entry["constraints"] == trial.constraints and entry["full"] is None
    infeasible = sum(t.state == TrialState.COMPLETE and not t.user_attrs["evaluated"] for t in trials)
    assert status["trials"]["complete"] == 6 and status["trials"]["infeasible"] == infeasible
    assert status["constraints"] == ["decode_tokens_per_s >= 100"] and status["full_results"] == {}


def test_an_empty_storage_lists_no_studies(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(url)  # Optuna's tables, no study
    done = dse("list", "--storage", url)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"no studies in {url}\n", "")
    assert dse_json("list", "--storage", url, "--json") == []


@pytest.mark.parametrize("args,message", [
    (["list", "--storage", "sqlite:///{tmp}/missing.db"], "error: --storage: SQLite file '{tmp}/missing.db' does not "
                                                          "exist"),
    (["list", "--json"], "error: --storage: SQLite file 'dse-studies.db' does not exist"),  # the default storage
    (["list", "--storage", "mysql://x@localhost/db"], "error: --storage: scheme 'mysql' is not one of"),
    (["status", "nope", "--json", "--storage", "sqlite:///{tmp}/missing.db"], "error: --storage: SQLite file"),
], ids=["missing-file", "default", "scheme", "status"])
def test_a_storage_that_does_not_exist_is_one_line_and_stays_missing(tmp_path, args, message):
    done = dse(*(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(message.format(tmp=tmp_path)), done.stderr
    assert list(tmp_path.iterdir()) == []  # no database file was created


def test_list_on_postgresql():
    name = f"dse-list-{uuid.uuid4().hex[:12]}"
    try:
        hand_made(PG_URL, name)
        listed = [s for s in dse_json("list", "--storage", PG_URL, "--json") if s["name"] == name]
        assert len(listed) == 1 and listed[0]["model"] == "tiny-test-model" and listed[0]["budget"] == 11
        assert listed[0]["trials"] == {"complete": 6, "running": 1, "fail": 2, "pruned": 1, "waiting": 1}
        assert listed[0]["created"] == RUN_TIME and listed[0]["objectives"] == SPEC["objectives"]
        text = dse("list", "--storage", PG_URL)
        assert text.returncode == 0 and text.stderr == ""
        row = next(r for r in columns(text.stdout) if r["study"] == name)
        assert (row["complete"], row["fail"], row["budget"]) == ("6", "2", "11")
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A storage with 500 long-named studies: ``dse list`` prints far more than a pipe holds (64 KiB), so a
    reader that stops after one line must break the pipe while ``dse`` is still writing."""
    url = f"sqlite:///{tmp_path_factory.mktemp('many') / 'many.db'}"
    storage = optuna.storages.RDBStorage(url)
    for i in range(500):
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], f"study-{i:03d}-" + "x" * 150)
    storage.engine.dispose()
    return url


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["text", "json"])
def test_a_reader_that_goes_away_ends_list_quietly(many, extra):
    command = " ".join([DSE, "list", "--storage", many, *extra])
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 141 and done.stderr == "", done.stderr
    assert done.stdout.count("\n") == 1


def test_status_json_into_head_ends_quietly(studies):
    command = f"set -o pipefail; {DSE} status hand --storage {studies} --json | head -1"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 141) and done.stderr == "" and done.stdout == "{\n"


def test_status_json_is_strict_json(studies):
    """No NaN or Infinity literals (lm-eval's NaN stderr of the promotion is null): a strict parser takes it."""
    def refuse(constant):
        raise ValueError(f"{constant} in the JSON")

    assert json.loads(dse("status", "hand", "--storage", studies, "--json").stdout, parse_constant=refuse)


@pytest.mark.slow
def test_evaluate_says_each_stage_on_stderr_and_prints_only_the_result(tmp_path):
    """``dse evaluate --fidelity both`` on the default model: one stderr line per stage, in order, and stdout is
    the JSON result alone."""
    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    data.update(storage=f"sqlite:///{tmp_path / 'studies.db'}", proxy={"windows": 1, "seq_len": 32},
                tasks=[{"name": "shakespeare_lastword", "metric": "acc", "limit": 3},
                       {"name": "shakespeare_cloze", "metric": "acc_norm", "limit": 2}])
    spec, plan = tmp_path / "spec.yaml", tmp_path / "plan.yaml"
    spec.write_text(yaml.safe_dump(data))
    plan.write_text(yaml.safe_dump({"layers": [{"name": f"model.layers.{b}.mlp.up_proj", "format": "4"}
                                               for b in range(30)]}))
    done = dse("evaluate", str(spec), "--plan", str(plan), "--fidelity", "both", "--threads", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # nothing but the result on stdout
    assert set(result) == {"plan", "compression", "proxy", "full"}
    stages = ["loading model smollm2-135m", "proxy: building 1 window of 32 tokens and the dense model's reference",
              "applying the plan: 30 layers", "proxy: scoring the compressed model on 1 window of 32 tokens",
              "full: task 1/2 shakespeare_lastword (limit 3)", "full: task 2/2 shakespeare_cloze (limit 2)"]
    lines = done.stderr.splitlines()
    assert all(stage in lines for stage in stages), done.stderr[-3000:]
    assert [lines.index(stage) for stage in stages] == sorted(lines.index(stage) for stage in stages)


@pytest.mark.slow
def test_promotions_name_the_trial_and_tasks_and_their_result(tmp_path):
    """``dse start`` with its progress bar: every promotion of the final Pareto set is announced with its tasks
    before it runs and reported with the accuracy the study stored for it."""
    from dse.study import full_results
    from helpers import small_spec

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    spec = tmp_path / "promote.yaml"
    spec.write_text(yaml.safe_dump(small_spec(url, "promote"), sort_keys=False))
    done = subprocess.run([DSE, "start", str(spec)], capture_output=True, text=True, cwd=tmp_path, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    promoted = {n: r for n, r in full_results(optuna.load_study(study_name="promote", storage=url)).items()
                if "worker" in r}  # promotions (the study's attributes), not trials evaluated in full
    assert promoted
    lines = done.stderr.replace("\r", "\n").splitlines()
    for number, result in promoted.items():
        start = lines.index(f"promoting trial {number} to full fidelity "
                            "(tasks: shakespeare_lastword, shakespeare_cloze)")
        end = next(i for i, line in enumerate(lines) if line.startswith(f"trial {number} full: accuracy "))
        assert start < end
        assert lines[end] == f"trial {number} full: accuracy {result['accuracy']:.4g} " \
                             f"({result['timings_s']['full']:.0f} s)"
