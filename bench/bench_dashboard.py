"""The dashboard on a 2,000-trial study: how long the study view takes to render (target: under 3 s).

    .venv/bin/python bench/bench_dashboard.py [--trials 2000] [--db PATH] [--no-browser]

The study: ``--trials`` plans drawn at random from the default spec's space (``examples/default.yaml``:
SmolLM2-135M, 211 linear layers, Kria KV260), each with its real hardware report from ``hwcost.estimate``
and its constraint values from the driver's ``screen``, stored with the driver's own record
(``dse.study.trial_record``: plan, full report with its 242 per-layer rows, scalar metrics), so a
trial weighs what a real one does (about 100 kB of JSON). Accuracy is the one thing not measured: 2,000
proxy evaluations take hours here, so every screened-in plan gets a stand-in ``proxy_kl`` (a smooth
function of the plan's bits and kept fraction) and the stand-in's 8 best plans a stand-in full result
(``full:<n>``). The database is kept at ``--db`` (default ``bench-dashboard.db``) and reused when it
already holds the study.

Measured side by side in one run, each against the 3 s target:

1. Optuna's ``study.get_trials()`` (every attribute of every trial): what the study view would pay
   without :mod:`dse.reader`;
2. ``dse.reader.TrialReader.trials()``: the first read, and a second one (the refresh path: finished
   trials are kept, only new ones read);
3. the study view in Streamlit's ``AppTest`` (the page script, every figure and table built and
   serialised): the first run in a fresh process, and a refresh;
4. with Chromium (``make browser``): ``dse dashboard`` served as users run it, the time from asking for
   the page to the Pareto chart's markers being drawn, first load and reload.
"""

from __future__ import annotations

import argparse
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

    from dse.space import suggest_plan
    from dse.spec import parse_spec
    from dse.study import objective_values, open_study, prepare, screen, trial_record
    from hwcost import estimate

    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    spec = parse_spec({**data, "study": STUDY, "storage": url, "trials": trials})
    setup = prepare(spec)
    study = open_study(setup)  # as the driver creates it: spec, workload, warm starts enqueued (waiting)
    existing = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + existing),
                                  directions=spec.directions)
    started = time.perf_counter()
    records, kls = [], {}
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
        if len(records) == 100 or i == trials - 1:
            study.add_trials(records)
            records = []
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


def browser_times(url: str) -> tuple[float, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import chromium, free_port, start_dashboard, stop
    from test_dashboard_browser import pareto_chart_drawn, wait_for

    port = free_port()
    server = start_dashboard(url, port, Path(tempfile.gettempdir()) / "bench-dashboard-server.log")
    browser = chromium()
    try:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            browser.get(f"http://127.0.0.1:{port}/?view=Study&study={STUDY}")
            time.sleep(0.2)  # the previous page's chart must not count
            wait_for(lambda: pareto_chart_drawn(browser), 120, "the Pareto chart", interval=0.05)
            times.append(time.perf_counter() - started)
        return times[0], times[1]
    finally:
        browser.quit()
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--db", default="bench-dashboard.db")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(args.db).resolve()}"
    try:
        have = len(optuna.load_study(study_name=STUDY, storage=url).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    except KeyError:
        have = 0
    if have < args.trials:
        print(f"building {args.trials} trials in {url} (have {have})", flush=True)
        build_study(url, args.trials)
    size = Path(args.db).stat().st_size
    print(f"study {STUDY}: {args.trials} trials, database {size / 1e6:.0f} MB\n")

    from streamlit.testing.v1 import AppTest

    from dse.reader import TrialReader

    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    rows = [("optuna study.get_trials() (all attributes)", timed(lambda: study.get_trials(deepcopy=False)))]
    reader = TrialReader(storage, study._study_id)
    rows.append(("dse.reader TrialReader.trials(), first read", timed(reader.trials)))
    rows.append(("dse.reader TrialReader.trials(), refresh", timed(reader.trials, repeat=3)))

    os.environ["DSE_STORAGE"] = url
    app = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=300)
    rows.append(("study view (AppTest), first run", timed(app.run)))
    assert not app.exception, app.exception
    assert [m.value for m in app.metric if m.label == "complete"] == [str(args.trials)]
    rows.append(("study view (AppTest), refresh", timed(app.run, repeat=3)))
    if not args.no_browser:
        first, again = browser_times(url)
        rows.append(("browser: page asked -> Pareto chart drawn, first load", first))
        rows.append(("browser: page asked -> Pareto chart drawn, reload", again))
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'seconds':>8}  {'/ 3 s target':>12}")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:8.3f}  {seconds / TARGET_S:12.2f}")
    print(f"\nratio optuna get_trials / reader first read: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
