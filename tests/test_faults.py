"""Faults on real processes (``dse start`` subprocesses, real Ray, the real model, SQLite and PostgreSQL): an
evaluator actor killed mid-trial, an evaluation whose result is not finite, four drivers sharing one
PostgreSQL study on one Ray cluster, and the storage going away mid-study and coming back.

The driver SIGKILLed and restarted is ``tests/test_driver.py::test_killed_driver_resumes_to_the_exact_budget``;
an evaluation that raises for every plan (systematic: the study stops after three in a row) is
``tests/test_study_e2e.py::test_metric_lm_eval_does_not_report_stops_the_study_with_one_line``."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from dse.plan import ModelPlan
from dse.records import TrialRecords
from helpers import free_port
from test_driver import PG_URL, check_exact_and_unique, finish, start, trials_of, write_spec

TINY = {"windows": 1, "seq_len": 32}


def wait_for(what: str, condition, proc: subprocess.Popen, log: Path, timeout: float = 300, every: float = 0.2):
    """Poll ``condition()`` until it is truthy (returned) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the driver exited before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        try:
            found = condition()
        except Exception:  # the study or its tables do not exist yet
            found = None
        if found:
            return found
        time.sleep(every)


def states(name: str, url: str) -> list[str]:
    return [t.state.name for t in trials_of(name, url)]


def delete_study(name: str, url: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


# ---------------------------------------------------------------------------------------------- actor killed
def evaluating_actor(proc: subprocess.Popen):
    """The evaluator actor process of this driver's local Ray while it runs ``evaluate`` (Ray sets the process
    title to ``ray::Evaluator.evaluate`` for the duration of the call), else None."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith("ray::Evaluator.evaluate"):
                return child
        except psutil.Error:
            pass
    return None


@pytest.mark.slow
def test_killed_evaluator_actor_is_restarted_and_its_trial_retried(tmp_path, empty_compress_cache):
    """SIGKILL the evaluator actor's worker process while it evaluates a trial (one actor, so the one RUNNING
    trial is that one): Ray restarts the actor (the model reloaded in a new process) and retries the evaluation
    (``max_restarts``/``max_task_retries`` of :data:`dse.workers.EvaluatorActor`). The study reaches its budget
    exactly with no trial failed or left running, the interrupted trial completed on the new process, and every
    trial after it ran there."""
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    spec = write_spec(tmp_path, study="actorkill", storage=db, trials=6, workers=1, proxy=TINY, constraints=[],
                      warm_start={"baselines": False})
    log = tmp_path / "driver.log"
    proc = start(spec, log)
    try:
        wait_for("a completed trial", lambda: "COMPLETE" in states("actorkill", db), proc, log)
        actor = wait_for("an evaluation", lambda: evaluating_actor(proc), proc, log, every=0.05)
        killed = actor.pid
        actor.kill()
        running = [t for t in trials_of("actorkill", db) if t.state.name == "RUNNING"]
        finish(proc, log, timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(running) == 1, [t.state.name for t in running]
    trials = trials_of("actorkill", db)
    check_exact_and_unique(trials, 6)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6  # the evaluation was retried, not failed
    pids = [int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials]
    interrupted = running[0].number
    assert pids[interrupted] != killed and trials[interrupted].user_attrs["evaluated"]
    assert killed in pids[:interrupted], "trials before the kill ran on the killed process"
    assert set(pids[interrupted:]) == {pids[interrupted]}, "trials from the kill on ran on the restarted actor"


# ---------------------------------------------------------------------------------------------- NaN result
POISONED = "model.layers.1.mlp.down_proj"


def overflowing_model(path: Path) -> Path:
    """A tiny Llama (2 blocks, hidden 64, random weights, the default model's tokenizer) saved with
    ``save_pretrained``, whose ``model.layers.1.mlp.down_proj`` has one weight of 3e38 in an input column that is
    always zero (row 7 of ``up_proj`` is zero, so the MLP's intermediate feature 7 is exactly 0).

    The dense model is finite: 3e38 * 0 = 0. Symmetric INT-k quantisation of that layer is not: the grid of the
    weight's group spans ``2 * max|w|`` = 6e38, beyond float32 (3.4e38), so its scale is inf and every value of
    the group dequantises to inf * 0 = NaN (:mod:`evaluators.compress.grid`); NaN then reaches every logit, and the
    proxy KL is NaN. Ternary fails the same way since scales are stored FP16 (:mod:`evaluators.compress.storage`):
    its per-tensor absmean scale (3e38 / 8192) is beyond FP16's 65504. FP16 (held in BF16 here, the storage dtype
    of a model with values beyond FP16's range) keeps the weight."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evaluators.models import DEFAULT_MODEL, builtin_model_dir, load_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[7, :] = 0.0
        model.model.layers[1].mlp.down_proj.weight[0, 7] = 3e38
    model.save_pretrained(path)
    load_config(DEFAULT_MODEL)  # the default model's converted directory holds its tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_model_dir(DEFAULT_MODEL) / name, path / name)
    return path


@pytest.mark.slow
def test_a_plan_that_overflows_the_model_fails_its_trial_and_the_study_goes_on(tmp_path, empty_compress_cache):
    """A real study on :func:`overflowing_model`: the plans quantising the poisoned layer (INT8, ternary) give a NaN proxy
    KL. Each such trial is FAIL with ``error: proxy_kl is nan`` (``not_finite``), a later trial of the same plan
    is failed as its copy without an evaluation, every other trial completes with finite values, and the study
    ends at exactly its budget (failed trials do not count, and a plan's NaN is not a systematic failure)."""
    model = overflowing_model(tmp_path / "tiny-llama")
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    others = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up)_proj)|model\.layers\.0\.mlp\.down_proj"
    space = {"tie": "block", "groups": [
        {"name": "poisoned", "targets": POISONED.replace(".", r"\."), "formats": [16, "ternary", 8],
         "group_size": 32},
        {"name": "rest", "targets": others, "sparsity": ["dense", "2:4"], "formats": [16, 8], "group_size": 32}]}
    spec = write_spec(tmp_path, study="overflow", storage=db, model=str(model), trials=6, workers=1, proxy=TINY,
                      space=space, constraints=[], warm_start={"baselines": False},
                      sampler={"name": "random", "seed": 5})  # 11 plans: 5 with INT8 there, one of them twice
    log = tmp_path / "driver.log"
    finish(start(spec, log), log, timeout=600)
    study = optuna.load_study(study_name="overflow", storage=db)
    trials = study.get_trials()
    check_exact_and_unique(trials, 6)
    records = TrialRecords.of(study)
    failed = [t for t in trials if t.state.name == "FAIL"]
    copies = [t for t in failed if "duplicate_of" in t.user_attrs]
    assert failed and copies, "seed 5 samples the overflowing format, and one such plan twice"
    for t in trials:
        fmt = ModelPlan.from_dict(records.plan(t)).layer(POISONED).fmt.name
        if t.state.name == "FAIL":
            assert t.user_attrs["error"] == "proxy_kl is nan" and t.user_attrs["not_finite"] is True
            assert fmt in ("8", "ternary") and t.values is None  # nothing non-finite was told to Optuna
        else:
            assert t.state.name == "COMPLETE" and fmt == "16"
            assert t.user_attrs["evaluated"] and all(math.isfinite(v) for v in t.values)
            assert t.values[0] == t.user_attrs["eval"]["proxy"]["kl"]
    hashes = [t.user_attrs["plan_hash"] for t in failed if t not in copies]
    assert len(hashes) == len(set(hashes)), "a plan with a NaN result was evaluated twice"
    for t in copies:  # a copy of an evaluated NaN plan: the same plan, no worker (not evaluated)
        source = trials[t.user_attrs["duplicate_of"]]
        assert source.user_attrs["plan_hash"] == t.user_attrs["plan_hash"] and "worker" not in t.user_attrs
        assert "worker" in source.user_attrs and source.state.name == "FAIL"
    assert log.read_text().count("proxy_kl is nan") == len(failed)


# ---------------------------------------------------------------------------------------------- four drivers
def ray_head(port: int) -> tuple[subprocess.Popen, Path, dict]:
    """A Ray head (4 CPUs, no dashboard, no auth token) in its own process group; returns it once it runs."""
    temp = Path("/tmp") / f"dse-ray-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while not list(temp.glob("session_*/logs/raylet.out")):
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(0.5)
    return head, temp, env


@pytest.mark.slow
def test_four_drivers_share_one_postgresql_study_and_one_ray_cluster(tmp_path):
    """Four ``dse start`` processes with the same spec (1 worker each) on one PostgreSQL study, all on one Ray
    head started here: each exits 0, the study has exactly its budget of completed trials, none left running,
    and no plan was evaluated twice (copies point at a completed evaluation of the same plan)."""
    name = f"four-{uuid.uuid4().hex[:8]}"
    port = free_port()
    head, temp, env = ray_head(port)
    procs = []
    try:
        spec = write_spec(tmp_path, study=name, storage=PG_URL, trials=8, workers=1, proxy=TINY, constraints=[],
                          ray={"address": f"127.0.0.1:{port}", "threads_per_worker": 1})
        procs = [(start(spec, tmp_path / f"driver{i}.log", env), tmp_path / f"driver{i}.log") for i in range(4)]
        for proc, log in procs:
            finish(proc, log, timeout=600)
        evaluated = check_exact_and_unique(trials_of(name, PG_URL), 8)
        assert len({t.user_attrs["worker"] for t in evaluated}) >= 2, "several drivers should have evaluated plans"
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
        delete_study(name, PG_URL)


# ---------------------------------------------------------------------------------------------- storage outage
class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target`` (thread per direction). :meth:`cut` drops every connection
    and stops listening (a client then sees its connection closed, and new ones refused, as when the database
    server goes away); :meth:`restore` listens again on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            dropped, self.sockets = self.sockets, []
        for sock in [listener, *dropped]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:  # cut meanwhile
                    client.close(), upstream.close()
                    return
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.slow
def test_storage_outage_mid_study_is_waited_out(tmp_path):
    """A driver on PostgreSQL through a TCP proxy; while a trial is being evaluated every connection is cut and
    new ones refused for 12 s, then the proxy listens again. The driver prints one line for the outage
    (``storage unreachable (...); retrying every 5 s``), keeps the result that arrived meanwhile and tells it
    once the storage is back, and ends with exit 0: exactly the budget completed, none left running, no plan
    evaluated twice, and every trial completed before the cut still there with the same values."""
    from urllib.parse import urlsplit

    target = urlsplit(PG_URL)
    proxy = TcpProxy((target.hostname, target.port or 5432))
    url = PG_URL.replace(f"{target.hostname}:{target.port or 5432}", f"127.0.0.1:{proxy.port}")
    name = f"outage-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, study=name, storage=url, trials=8, workers=1, proxy=TINY, constraints=[],
                      warm_start={"baselines": False})
    log = tmp_path / "driver.log"
    proc = start(spec, log)
    try:
        def dispatched():  # a running trial with all its hardware attributes is on the actor: "constraints" is the
            # last attribute written before the dispatch ("plan_hash" the first: a cut between them abandons the start)
            trials = trials_of(name, PG_URL)
            done = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING" and "constraints" in t.user_attrs]
            return (done, running) if len(done) >= 2 and running else None

        before, in_flight = wait_for("a trial on the actor", dispatched, proc, log, every=0.05)
        proxy.cut()
        time.sleep(12)
        proxy.restore()
        finish(proc, log, timeout=600)
        trials = trials_of(name, PG_URL)
        check_exact_and_unique(trials, 8)
        for old in before:  # nothing finished was lost
            assert trials[old.number].state.name == "COMPLETE" and trials[old.number].values == old.values
        for t in in_flight:  # the result that arrived during the outage was told afterwards
            assert trials[t.number].state.name == "COMPLETE" and trials[t.number].user_attrs["evaluated"]
        lines = [line for line in log.read_text().splitlines() if "storage unreachable" in line]
        assert len(lines) == 1 and lines[0].endswith("; retrying every 5 s"), log.read_text()[-3000:]
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proxy.cut()
        delete_study(name, PG_URL)


def test_storage_outage_is_recognised_in_the_exception_chain():
    """:func:`dse.driver.storage_outage` on real errors: a refused PostgreSQL connection through Optuna (its
    StorageInternalError wraps SQLAlchemy's OperationalError) is an outage with psycopg's reason; an integrity
    error (a bug, not an outage) is not."""
    import sqlalchemy as sa

    from dse.driver import storage_outage

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(Exception) as refused:
        optuna.storages.RDBStorage(dead)
    reason = storage_outage(refused.value)
    assert reason is not None and "Connection refused" in reason and "\n" not in reason
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    with pytest.raises(sa.exc.IntegrityError) as duplicate:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    assert storage_outage(duplicate.value) is None
    assert json.dumps(reason)  # plain text for the one stderr line
