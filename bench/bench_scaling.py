"""Search throughput: trials per hour with 1 and with 2 Ray evaluator actors, side by side in one run.

    .venv/bin/python bench/bench_scaling.py [--trials 16] [--repeats 1] [--proxy-windows 4] [--proxy-seq-len 256]

The study is ``examples/default.yaml`` (SmolLM2-135M on a Kria KV260, per-block N:M sparsity and
bit-widths, magnitude pruning + round-to-nearest) changed so that every trial costs the same kind
of work: random sampler with a fixed seed (``--seed``), no warm starts, no promotion to the lm-eval
tasks, no user constraints (every plan that fits the device is evaluated on the proxy), a budget of
``--trials`` completed trials, one torch thread per actor, proxy ``--proxy-windows`` x
``--proxy-seq-len`` tokens.

1. A warm-up study with the same seed and budget (hence the same plans) fills the on-disk layer
   cache with every layer those plans need and caches the dense reference, so the timed runs
   measure the steady state of a search (load cached layers, proxy forward pass), not compression.
2. Timed runs alternate 1, 2, 1, 2 actors (``--repeats`` pairs), each a new study in one temporary
   SQLite database. For each: start the actors (``dse.pool.start_actors``), wait until every
   actor answered ``ping()`` (model and proxy set loaded), then time only the search loop
   (``dse.driver.Driver.run``, built as ``run_study`` builds it), then kill the actors.
3. Trials/hour = completed trials / loop seconds x 3600; per setting the best of its repeats.
   Target: 2 actors >= 1.6x the trials/hour of 1 (2 vCPUs; the driver shares them).

Ray is initialised once, before the first run, with enough CPUs for 2 one-thread actors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.spec import StudySpec, parse_spec  # noqa: E402
from dse.driver import Driver  # noqa: E402
from dse.pool import start_actors  # noqa: E402
from dse.study import make_storage, open_study, prepare, run_study  # noqa: E402
from dse.warmstart import warm_starts  # noqa: E402

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "default.yaml"
TARGET = 1.6


def make_spec(base: dict, name: str, storage: str, workers: int, args) -> StudySpec:
    d = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    d.update(study=name, storage=storage, trials=args.trials, workers=workers, constraints=[])
    d["sampler"] = {"name": "random", "seed": args.seed}
    d["warm_start"] = {"baselines": False}
    d["promotion"] = {"every": 0, "final": False}
    d["proxy"] = {"windows": args.proxy_windows, "seq_len": args.proxy_seq_len}
    d["ray"] = {**(d.get("ray") or {}), "threads_per_worker": 1}
    return parse_spec(d)


def timed_run(spec: StudySpec) -> dict:
    """One study: actors started and loaded outside the clock, the driver loop on it."""
    import ray
    from tqdm import tqdm

    from dse.claims import Claims

    setup = prepare(spec)
    if warm_starts(spec, setup.units, setup.workload, setup.accelerator):
        raise RuntimeError(f"{spec.study}: unexpected warm starts (a sensitivity-{spec.study}/ directory here?)")
    storage = make_storage(spec)
    study = open_study(setup, storage)
    claims = Claims(spec.storage, study.user_attrs.get("uid", spec.study))
    bar = tqdm(total=spec.trials, disable=True)
    started = time.perf_counter()
    actors = start_actors(spec)
    try:
        workers = ray.get([actor.ping.remote() for actor in actors])
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        Driver(setup, study, storage, actors, claims, bar).run()
        loop_s = time.perf_counter() - started
    finally:
        bar.close()
        claims.close()
        for actor in actors:
            ray.kill(actor)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    evaluated = [t for t in done if t.user_attrs.get("evaluated") and "duplicate_of" not in t.user_attrs]
    evals = [t.user_attrs.get("timings_s", {}) for t in evaluated]
    per_eval = sum(e.get("apply", 0.0) + e.get("proxy", 0.0) for e in evals) / max(1, len(evals))
    used = {t.user_attrs.get("worker") for t in evaluated}
    return {"workers": spec.workers, "study": spec.study, "complete": len(done), "evaluated": len(evaluated),
            "loop_s": loop_s, "load_s": load_s, "per_hour": len(done) / loop_s * 3600, "per_eval_s": per_eval,
            "actors_used": len(used), "actors": len(workers), "plans": sorted(t.user_attrs.get("plan_hash", "")
                                                                             for t in done),
            "computed": sum(int(t.user_attrs.get("eval", {}).get("compression", {}).get("computed", 0))
                            for t in evaluated)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="completed trials per run")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of timed runs (1 actor, then 2)")
    parser.add_argument("--proxy-windows", type=int, default=4)
    parser.add_argument("--proxy-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="random sampler seed (the same plans in every run)")
    parser.add_argument("--skip-warmup", action="store_true", help="the layer cache already holds the plans' layers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import ray

    base = yaml.safe_load(DEFAULT_SPEC.read_text())
    workdir = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    storage = f"sqlite:///{workdir / 'scaling.db'}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{DEFAULT_SPEC.name} with random sampler seed {args.seed}, {args.trials} trials per run, no warm "
          f"starts/promotion/constraints, proxy {args.proxy_windows} x {args.proxy_seq_len} tokens, 1 torch "
          f"thread per actor; {os.cpu_count()} CPUs, load average {load:.2f}; storage {storage}", flush=True)
    # Enough CPUs for two one-thread actors whichever run comes first (start_actors leaves an
    # initialised Ray alone).
    ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    try:
        if not args.skip_warmup:
            started = time.perf_counter()
            warm = run_study(make_spec(base, "scaling-warmup", storage, 2, args), progress=False)
            computed = sum(int(t.user_attrs.get("eval", {}).get("compression", {}).get("computed", 0))
                           for t in warm.get_trials(deepcopy=False))
            print(f"warm-up study: {time.perf_counter() - started:.0f} s, {computed} layers computed into the "
                  "cache", flush=True)
        runs = []
        print(f"\n{'run':20}{'actors':>7}{'load s':>8}{'loop s':>8}{'trials':>7}{'evaluated':>10}"
              f"{'s/eval':>8}{'trials/h':>10}{'computed':>9}")
        for rep in range(args.repeats):
            for workers in (1, 2):
                r = timed_run(make_spec(base, f"scaling-w{workers}-r{rep}", storage, workers, args))
                runs.append(r)
                print(f"{r['study']:20}{r['actors_used']:>3}/{r['actors']:<3}{r['load_s']:8.1f}{r['loop_s']:8.1f}"
                      f"{r['complete']:7d}{r['evaluated']:10d}{r['per_eval_s']:8.2f}{r['per_hour']:10.0f}"
                      f"{r['computed']:9d}", flush=True)
    finally:
        ray.shutdown()
    same = all(r["plans"] == runs[0]["plans"] for r in runs)
    print(f"same plans in every timed run: {'yes' if same else 'NO (timings compare different work)'}")
    best = {w: max(r["per_hour"] for r in runs if r["workers"] == w) for w in (1, 2)}
    ratio = best[2] / best[1]
    print(f"\nbest of {args.repeats}: 1 actor {best[1]:.0f} trials/h, 2 actors {best[2]:.0f} trials/h, "
          f"ratio {ratio:.2f}x  (target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    print("(actors column: actors that evaluated a trial / actors started; computed: layers not found in the "
          "cache, should be 0 after the warm-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
