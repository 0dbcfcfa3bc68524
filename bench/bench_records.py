"""Lean trial records: bytes per trial in the Optuna user attributes and in optuna-dashboard's trials API,
with the plan and the per-layer report in the trial attributes (before) and in ``dse_trial_records`` (now).

    .venv/bin/python bench/bench_records.py [--trials 6] [--db PATH] [--study URL NAME ...]

Built side by side in one SQLite file (``--db``, default a temporary one): two studies of ``--trials``
trials each with the same plans, drawn at random from the default spec's space
(``examples/default.yaml``: SmolLM2-135M, 211 linear layers, Kria KV260), each with its real hardware
report (``hwcost.estimate``), the sampler's parameters (one per searched unit, as a driver's trial has)
and constraint values (the driver's ``screen``); the screened-in plans get a
stand-in proxy evaluation of the driver's shape (accuracy is not what is measured here). ``old``: the user
attributes the driver wrote before :mod:`dse.records` (``trial_record`` plus ``plan`` and ``hw``); ``new``:
the driver's ``trial_record`` in the user attributes and ``trial_records`` in the records table. Each
``--study URL NAME`` measures a stored study as well (e.g. one the driver ran, either layout).

Per study: user-attribute JSON bytes per trial (the sum of the stored ``value_json`` of each attribute, as
Optuna's ``get_trials()`` reads it), record bytes per trial (``dse_trial_records``), and the bytes of
optuna-dashboard's trials API response (``GET /api/studies/<id>``, what its study page loads and reloads)
per trial, from a real ``optuna-dashboard`` server on the file, with the seconds its first response took
(it reads every trial from the database then).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(url: str, trials: int, seed: int = 0) -> tuple[str, str]:
    """The ``old`` and ``new`` studies of the module docstring in ``url`` (kept if ``url`` has them already);
    returns their names."""
    names = {layout: f"records-{layout}-{trials}" for layout in ("old", "new")}
    if set(names.values()) <= {s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False)}:
        return names["old"], names["new"]
    import yaml

    from dse.records import TrialRecords
    from dse.space import suggest_plan
    from dse.spec import parse_spec
    from dse.study import objective_values, prepare, screen, trial_record, trial_records
    from hwcost import estimate

    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    spec = parse_spec({**data, "study": "bench-records", "storage": url, "trials": trials})
    setup = prepare(spec)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=spec.directions)
    studies = {}
    for layout in ("old", "new"):
        studies[layout] = optuna.create_study(study_name=names[layout], storage=url, directions=spec.directions)
        studies[layout].set_metric_names([o.name for o in spec.objectives])
        studies[layout].set_user_attr("uid", uuid.uuid4().hex)
        studies[layout].set_user_attr("spec", spec.to_dict())
    records = TrialRecords(optuna.storages.RDBStorage(url).engine, studies["new"].user_attrs["uid"], create=True)
    for i in range(trials):
        asked = sampler.ask()
        plan = suggest_plan(asked, setup.units, spec.space.mlgru_blocks)
        report = estimate(plan, setup.workload, setup.accelerator)
        constraints = screen(spec, report)
        attrs = trial_record(plan, report, constraints)
        evaluation = None
        if max(constraints.values()) <= 0:
            evaluation = {"proxy": {"kl": 0.1 + 0.01 * i, "ppl": 14.0, "tokens_evaluated": 128, "windows": 2},
                          "compression": {"computed": 211, "cached": 0, "layers": 211}, "worker": "bench-0",
                          "timings_s": {"apply": 1.0, "proxy": 1.0, "reference": 0.5}}
        attrs.update({"evaluated": evaluation is not None, "timings_s": {"hwcost": 0.001}}
                     | ({"eval": evaluation, "fidelity": "proxy", "worker": "bench-0"} if evaluation else {}))
        values = objective_values(spec, report, evaluation)
        common = {"values": values, "params": asked.params, "distributions": asked.distributions,
                  "system_attrs": {f"constraints:{k}": v for k, v in constraints.items()}}
        studies["old"].add_trial(optuna.trial.create_trial(**common, user_attrs={**attrs,
                                                                                  **trial_records(plan, report)}))
        studies["new"].add_trial(optuna.trial.create_trial(**common, user_attrs=attrs))
        records.put(i, **trial_records(plan, report))
    return names["old"], names["new"]


def stored_bytes(url: str, name: str) -> dict[str, float]:
    """Trials, user-attribute bytes per trial (all, and ``plan`` + ``hw``), record bytes per trial, and the
    seconds of a first read of every trial by Optuna's ``get_trials()`` and by :class:`dse.reader.TrialReader`
    (the light trials: no parameters)."""
    import sqlalchemy as sa

    from dse.reader import TrialReader
    from dse.records import TABLE, study_key

    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    study = optuna.load_study(study_name=name, storage=storage)
    started = time.perf_counter()
    trials = study.get_trials(deepcopy=False)
    optuna_s = time.perf_counter() - started
    reader = TrialReader(optuna.storages.RDBStorage(url, skip_table_creation=True), name)
    started = time.perf_counter()
    reader.trials()
    reader_s = time.perf_counter() - started
    per_key: dict[str, int] = {}
    for t in trials:
        for key, value in t.user_attrs.items():
            per_key[key] = per_key.get(key, 0) + len(json.dumps(value))
    records = 0
    if sa.inspect(storage.engine).has_table(TABLE.name):
        with storage.engine.connect() as conn:
            records = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(TABLE.c.value_json)), 0))
                                   .where(TABLE.c.study == study_key(study))).scalar()
    n = max(len(trials), 1)
    return {"trials": len(trials), "user_attrs": sum(per_key.values()) / n,
            "plan_hw_attrs": (per_key.get("plan", 0) + per_key.get("hw", 0)) / n, "records": records / n,
            "get_trials_s": optuna_s, "reader_s": reader_s}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OptunaDashboard:
    """A real ``optuna-dashboard`` server on ``url`` (its console script, next to this interpreter)."""

    def __init__(self, url: str, log: Path | None = None):
        self.port = free_port()
        self.log = log or Path(tempfile.gettempdir()) / f"optuna-dashboard-{self.port}.log"
        exe = Path(sys.executable).with_name("optuna-dashboard")
        self.proc = subprocess.Popen([str(exe), url, "--port", str(self.port), "--host", "127.0.0.1"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def get(self, path: str, timeout_s: float = 120) -> bytes:
        """The body of ``GET path``, waiting for the server to answer first."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as answer:
                    return answer.read()
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"optuna-dashboard does not answer: {self.log.read_text()[-2000:]}")
                time.sleep(0.3)

    def study_ids(self) -> dict[str, int]:
        return {s["study_name"]: s["study_id"] for s in json.loads(self.get("/api/studies"))["study_summaries"]}

    def trials_payload(self, name: str) -> tuple[int, int, float]:
        """(bytes of the study's trials API response, trials in it, seconds the first response took)."""
        study_id = self.study_ids()[name]
        started = time.perf_counter()
        body = self.get(f"/api/studies/{study_id}")
        return len(body), len(json.loads(body)["trials"]), time.perf_counter() - started

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--db", help="SQLite file for the built studies (default: a temporary one)")
    parser.add_argument("--study", nargs=2, action="append", default=[], metavar=("URL", "NAME"),
                        help="also measure this stored study")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="bench-records-")) / "records.db"
    url = f"sqlite:///{db.resolve()}"
    old, new = build(url, args.trials)
    measured = [(url, old, "built, old layout"), (url, new, "built, new layout")]
    measured += [(u, n, Path(u.removeprefix("sqlite:///")).name) for u, n in args.study]
    rows = []
    for u, name, what in measured:
        server = OptunaDashboard(u)
        try:
            payload, listed, seconds = server.trials_payload(name)
        finally:
            server.close()
        b = stored_bytes(u, name)
        rows.append((f"{name} ({what})", b["trials"], b["user_attrs"], b["plan_hw_attrs"], b["records"],
                     payload, payload / max(listed, 1), seconds, b["get_trials_s"], b["reader_s"]))
    width = max(len(r[0]) for r in rows)
    print(f"{'study':<{width}}  trials  attrs B/trial  plan+hw in attrs  records B/trial  "
          f"optuna-dashboard B  B/trial  first s  get_trials s  TrialReader s")
    for name, n, attrs, big, rec, payload, per, seconds, optuna_s, reader_s in rows:
        print(f"{name:<{width}}  {n:6d}  {attrs:13.0f}  {big:16.0f}  {rec:15.0f}  {payload:18d}  {per:7.0f}  "
              f"{seconds:7.3f}  {optuna_s:12.3f}  {reader_s:13.3f}")
    print(f"\nbuilt old / new: user attributes {rows[0][2] / rows[1][2]:.0f}x, optuna-dashboard payload "
          f"{rows[0][6] / rows[1][6]:.2f}x per trial, its first response {rows[0][7] / rows[1][7]:.1f}x")


if __name__ == "__main__":
    main()
