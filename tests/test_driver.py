"""The driver as users run it (``dse start`` processes, real Ray, the real model, SQLite and PostgreSQL):
no evaluation on plans that do not fit, resume after a kill, and two drivers sharing one study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("DSE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DSE = [sys.executable, "-m", "dse.cli"]


def write_spec(path: Path, **overrides) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    data.update(trials=8, workers=2, heartbeat_s=1, proxy={"windows": 1, "seq_len": 64},
                promotion={"every": 0, "final": False},
                tasks=[{"name": "shakespeare_lastword", "metric": "acc", "limit": 4}])
    data.update(overrides)
    spec = path / f"{data['study']}.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec


def start(spec: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """``dse start`` in its own session, so killing its process group takes its local Ray with it."""
    handle = open(log, "w")
    return subprocess.Popen([*DSE, "start", str(spec), "--no-progress"], stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env, cwd=spec.parent)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-3000:]


def trials_of(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def check_exact_and_unique(trials, budget: int) -> list:
    """Exactly ``budget`` completed trials, none running, and no plan evaluated twice."""
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == budget and "RUNNING" not in states, states
    evaluated = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated")
                 and "duplicate_of" not in t.user_attrs]
    hashes = [t.user_attrs["plan_hash"] for t in evaluated]
    assert len(hashes) == len(set(hashes)), "a plan was evaluated twice"
    for t in trials:  # a copied result points at a completed evaluation of the same plan
        if t.state.name == "COMPLETE" and "duplicate_of" in t.user_attrs:
            source = next(s for s in trials if s.number == t.user_attrs["duplicate_of"])
            assert source.user_attrs["plan_hash"] == t.user_attrs["plan_hash"] and source.values == t.values
    return evaluated


def test_plans_that_do_not_fit_get_no_accuracy_evaluation(tmp_path, empty_compress_cache):
    """With a budget no plan meets, every trial is told from the cost model alone: no trial holds an
    evaluation, and the workers' layer cache stays empty (nothing was ever compressed); the run then stops with
    one line naming the constraint and the best value seen, exit 2. The same cache fills as soon as a study with
    feasible plans runs (so the empty cache is evidence, not a wrong path)."""
    env, compress = dict(os.environ), empty_compress_cache
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    spec = write_spec(tmp_path, study="nofit", storage=db, trials=10, constraints=["decode_tokens_per_s >= 1e6"])
    log = tmp_path / "nofit.log"
    proc = start(spec, log, env)
    assert proc.wait(timeout=900) == 2, log.read_text()[-3000:]
    trials = trials_of("nofit", db)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 10
    best = max(t.user_attrs["hw_metrics"]["decode_tokens_per_s"] for t in trials)
    assert log.read_text().strip().splitlines()[-1] == (
        f"error: constraints: no plan of 10 met 'decode_tokens_per_s >= 1e+06' (best seen {best:.4g}); relax the "
        "constraint or change the space or the hardware")
    for t in trials:
        assert t.user_attrs["evaluated"] is False and "eval" not in t.user_attrs
        assert t.user_attrs["constraints"]["decode_tokens_per_s >= 1e+06"] > 0
        assert set(t.user_attrs["timings_s"]) == {"hwcost"}
    assert not list(compress.glob("*/layers/*")), "a plan was compressed for evaluation"
    spec = write_spec(tmp_path, study="fits", storage=db, trials=2, workers=1, constraints=[],
                      warm_start={"baselines": False})
    finish(start(spec, tmp_path / "fits.log", env), tmp_path / "fits.log")
    assert all(t.user_attrs["evaluated"] for t in trials_of("fits", db))
    assert list(compress.glob("*/layers/*")), "evaluations write compressed layers to this cache"


def test_killed_driver_resumes_to_the_exact_budget(tmp_path):
    """Kill the driver (and its local Ray) while trials are running; ``dse start`` again finishes the study:
    exactly the budget completed, nothing left running, the killed trials failed and their plans retried."""
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    spec = write_spec(tmp_path, study="killed", storage=db)
    log = tmp_path / "first.log"
    proc = start(spec, log)
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first driver never got trials running"
            try:
                states = [t.state.name for t in trials_of("killed", db)]
            except Exception:  # the study or its tables do not exist yet
                states = []
            if states.count("COMPLETE") >= 2 and "RUNNING" in states:
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stale = [t for t in trials_of("killed", db) if t.state.name == "RUNNING"]
    assert stale
    finish(start(spec, tmp_path / "second.log"), tmp_path / "second.log")
    trials = trials_of("killed", db)
    check_exact_and_unique(trials, 8)
    for old in stale:  # failed as stale, and its plan enqueued again and completed
        assert trials[old.number].state.name == "FAIL"
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == old.number]
        # the same parameters (a trial killed while its parameters were being suggested has only some of them)
        assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and old.params.items() <= retry[0].params.items()


@pytest.mark.parametrize("backend", ["postgresql", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_two_drivers_share_one_study(tmp_path, backend):
    """Two ``dse start`` processes (each its own local Ray and actor) on one PostgreSQL study, or one SQLite
    file, started at once with the same spec and seed: the count is exact and no plan is evaluated twice."""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    url = PG_URL if backend == "postgresql" else f"sqlite:///{tmp_path / 'shared.db'}"
    spec = write_spec(tmp_path, study=name, storage=url, trials=10, workers=1)
    procs = [(start(spec, tmp_path / f"driver{i}.log"), tmp_path / f"driver{i}.log") for i in range(2)]
    try:
        for proc, log in procs:
            finish(proc, log)
        trials = trials_of(name, url)
        evaluated = check_exact_and_unique(trials, 10)
        assert len({t.user_attrs["worker"] for t in evaluated}) == 2, "both drivers should have evaluated plans"
    finally:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass


def test_driver_uses_an_existing_ray_cluster(tmp_path):
    """With RAY_ADDRESS set, the driver starts no Ray of its own: its actors run on the given cluster (a
    head started here with ``ray start``), whose session logs hold the evaluating worker's process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path("/tmp") / f"dse-ray-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # no cluster token: Ray would otherwise share one token file (~/.ray/auth_token) with every local Ray
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--block"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    try:
        db = f"sqlite:///{tmp_path / 'studies.db'}"
        spec = write_spec(tmp_path, study="cluster", storage=db, trials=2, workers=1, constraints=[],
                          warm_start={"baselines": False})
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not list(temp.glob("session_*/logs/raylet.out")):
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        finish(start(spec, tmp_path / "cluster.log", env), tmp_path / "cluster.log")
        trials = trials_of("cluster", db)
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
        pid = trials[0].user_attrs["worker"].rsplit(":", 1)[1]
        assert list(temp.glob(f"session_*/logs/worker-*-{pid}.*")), "the actor did not run on the given cluster"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def test_an_unreachable_ray_address_is_one_line_and_creates_no_study(tmp_path):
    db = tmp_path / "studies.db"
    spec = write_spec(tmp_path, study="noray", storage=f"sqlite:///{db}", ray={"address": "127.0.0.1:9"})
    proc = subprocess.run([*DSE, "start", str(spec), "--no-progress"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ray.address: cannot connect to the Ray cluster at '127.0.0.1:9'"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}")
