"""The dashboard on a 2,000-trial study: how long the study view takes to render (target: under 3 s).

    .venv/bin/python bench/bench_dashboard.py [--trials 2000] [--db PATH] [--no-browser]

The study: ``--trials`` plans drawn at random from the default spec's space (``examples/default.yaml``:
SmolLM2-135M, 211 linear layers, Kria KV260), each with its real hardware report from ``hwcost.estimate``
and its constraint values from the driver's ``screen``, stored as the driver stores them (the scalar
user attributes of ``dse.study.trial_record``, and the plan and full report with its 242 per-layer rows
as ``dse_trial_records`` rows, about 100 kB of JSON), so a trial weighs what a real one does. Accuracy is the one thing not measured: 2,000
proxy evaluations take hours here, so every screened-in plan gets a stand-in ``proxy_kl`` (a smooth
function of the plan's bits and kept fraction) and the stand-in's 8 best plans a stand-in full result
(``full:<n>``). The database is kept at ``--db`` (default ``bench-dashboard.db``) and reused when it
already holds the study.

Measured side by side in one run, each against the 3 s target and beside the same measurement on a
``--reference-trials`` (10) study built the same way (the cost that does not grow with the study):

1. Optuna's ``study.get_trials()`` (every attribute of every trial): what the study view would pay
   without :mod:`dse.reader`;
2. ``dse.reader.TrialReader.trials()``: the first read, and a second one (the refresh path: finished
   trials are kept, only new ones read);
3. the study view in Streamlit's ``AppTest`` (the page script, every figure and table built and
   serialised): the first run in a fresh process, and a refresh;
4. with Chromium (``make browser``): ``dse dashboard`` served as users run it, the time from asking for
   the page to the Pareto chart's markers being drawn: the first load (a fresh server and browser
   profile: Streamlit's script and JavaScript start cold), a second new browser profile on the running
   server (a user opening the dashboard), and the median of 10 reloads (the page users keep open).
"""

from __future__ import annotations

import argparse
import statistics
import os
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STUDY = "bench-dashboard"
TARGET_S = 3.0


def stand_in_kl(plan) -> float:
    """Not a measurement: grows as layers lose bits and weights (so the front has a realistic shape)."""
    loss = 0.0
    for layer in plan.layers:
        kept = 1.0 if layer.sparsity is None else layer.sparsity.density
        loss += 0.004 * (16 - layer.fmt.bits) ** 1.5 / 16 + 0.02 * (1 - kept)
    return loss


def build_study(url: str, trials: int, seed: int = 0) -> None:
    import yaml

    from dse.records import TrialRecords, study_key
    from dse.space import suggest_plan
    from dse.spec import parse_spec
    from dse.study import objective_values, open_study, prepare, screen, trial_record, trial_records
    from hwcost import estimate

    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    spec = parse_spec({**data, "study": STUDY, "storage": url, "trials": trials})
    setup = prepare(spec)
    study = open_study(setup)  # as the driver creates it: spec, workload, warm starts enqueued (waiting)
    existing = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + existing),
                                  directions=spec.directions)
    started = time.perf_counter()
    storage = optuna.storages.RDBStorage(url)
    store = TrialRecords(storage.engine, study_key(study), create=True)
    records, heavy, kls = [], [], {}
    for i in range(existing, trials):
        plan = suggest_plan(sampler.ask(), setup.units, spec.space.mlgru_blocks)
        report = estimate(plan, setup.workload, setup.accelerator)
        constraints = screen(spec, report)
        attrs = trial_record(plan, report, constraints)
        feasible = max(constraints.values()) <= 0
        evaluation = None
        if feasible:
            kl = stand_in_kl(plan)
            evaluation = {"proxy": {"kl": kl, "ppl": float(np.exp(2.5 + kl)), "tokens_evaluated": 2048},
                          "worker": "bench stand-in", "timings_s": {"apply": 0.0, "proxy": 0.0}}
            kls[i] = kl
        attrs.update({"evaluated": feasible, "fidelity": "proxy", "timings_s": {"hwcost": 0.001}}
                     | ({"eval": evaluation, "worker": "bench stand-in"} if evaluation else {}))
        system = {f"constraints:{k}": v for k, v in constraints.items()}
        records.append(optuna.trial.create_trial(values=objective_values(spec, report, evaluation),
                                                 user_attrs=attrs, system_attrs=system))
        heavy.append(trial_records(plan, report))
        if len(records) == 100 or i == trials - 1:
            study.add_trials(records)
            added = sorted(t.number for t in study.get_trials(deepcopy=False))[-len(records):]
            for number, kinds in zip(added, heavy):  # the plan and per-layer report, as the driver stores them
                store.put(number, **kinds)
            records, heavy = [], []
            print(f"  {i + 1}/{trials} trials stored ({time.perf_counter() - started:.0f} s)", flush=True)
    for number in sorted(kls, key=kls.get)[:8]:
        acc = max(0.0, 0.3 - kls[number])
        study.set_user_attr(f"full:{number}", {"accuracy": acc, "metrics": {
            "shakespeare_lastword": {"acc": acc}, "shakespeare_cloze": {"acc_norm": acc}},
            "tokens_evaluated": 0, "worker": "bench stand-in"})


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def browser_times(url: str, reloads: int = 10) -> tuple[float, float, float]:
    """Seconds from asking for the study page to the Pareto chart's markers being drawn: the first load on a
    freshly started ``dse dashboard`` (new browser profile), the first load of a second new browser profile
    on that running server, and the median of ``reloads`` reloads."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import chromium, free_port, start_dashboard, stop
    from test_dashboard_browser import pareto_chart_drawn, wait_for

    port = free_port()
    server = start_dashboard(url, port, Path(tempfile.gettempdir()) / "bench-dashboard-server.log")

    def load(browser) -> float:
        started = time.perf_counter()
        browser.get(f"http://127.0.0.1:{port}/?view=Study&study={STUDY}")
        time.sleep(0.2)  # the previous page's chart must not count
        wait_for(lambda: pareto_chart_drawn(browser), 120, "the Pareto chart", interval=0.05)
        return time.perf_counter() - started

    try:
        first = chromium()
        cold = load(first)
        first.quit()
        browser = chromium()
        try:
            new_browser = load(browser)
            return cold, new_browser, statistics.median(load(browser) for _ in range(reloads))
        finally:
            browser.quit()
    finally:
        stop(server)


def ensure_study(db: Path, trials: int) -> str:
    url = f"sqlite:///{db.resolve()}"
    try:
        have = len(optuna.load_study(study_name=STUDY, storage=url).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    except KeyError:
        have = 0
    if have < trials:
        print(f"building {trials} trials in {url} (have {have})", flush=True)
        build_study(url, trials)
    print(f"study {STUDY}: {trials} trials, database {db.stat().st_size / 1e6:.0f} MB", flush=True)
    return url


def measure(url: str, trials: int, browser: bool) -> dict[str, float]:
    from streamlit.testing.v1 import AppTest
    from streamlit.runtime.caching import cache_resource

    from dse.reader import TrialReader

    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    out = {"optuna study.get_trials() (all attributes)": timed(lambda: study.get_trials(deepcopy=False))}
    reader = TrialReader(storage, STUDY)
    out["dse.reader TrialReader.trials(), first read"] = timed(reader.trials)
    out["dse.reader TrialReader.trials(), refresh"] = timed(reader.trials, repeat=3)
    cache_resource.clear()  # the page's own reader starts cold
    os.environ["DSE_STORAGE"] = url
    app = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=300)
    out["study view script (AppTest), first run"] = timed(app.run)
    assert not app.exception, app.exception
    assert [m.value for m in app.metric if m.label == "complete"] == [str(trials)]
    out["study view script (AppTest), refresh"] = timed(app.run, repeat=3)
    if browser:
        cold, new_browser, again = browser_times(url)
        out["browser: Pareto chart drawn, first load (server, browser new)"] = cold
        out["browser: Pareto chart drawn, a new browser on the running server"] = new_browser
        out["browser: Pareto chart drawn, reload (median of 10)"] = again
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--reference-trials", type=int, default=10, help="the small study measured beside it")
    parser.add_argument("--db", default="bench-dashboard.db")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = Path(args.db)
    large = ensure_study(db, args.trials)
    small = ensure_study(db.with_name(db.stem + f"-{args.reference_trials}" + db.suffix), args.reference_trials)
    big = measure(large, args.trials, not args.no_browser)
    ref = measure(small, args.reference_trials, not args.no_browser)
    width = max(map(len, big))
    print(f"\n{'measurement':<{width}}  {args.trials:>7} tr  {'/ 3 s':>6}  {args.reference_trials:>7} tr  "
          f"{'ratio':>6}")
    for name, seconds in big.items():
        print(f"{name:<{width}}  {seconds:8.3f}s  {seconds / TARGET_S:6.2f}  {ref[name]:8.3f}s  "
              f"{seconds / ref[name]:6.1f}")
    print(f"\noptuna get_trials / dse.reader first read on {args.trials} trials: "
          f"{big[next(iter(big))] / big['dse.reader TrialReader.trials(), first read']:.1f}x")


if __name__ == "__main__":
    main()
