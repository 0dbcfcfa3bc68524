"""Search quality: NSGA-II with warm starts against random search, same trial budget, side by side.

    .venv/bin/python bench/bench_search.py [--trials 60] [--population 12] [--seed 0]
        [--workdir DIR] [--sensitivity sensitivity-bench-search/sensitivity.json] [--quick]

Two real studies (``dse.study.run_study``: Ray actors, SQLite storage, proxy fidelity only) of the
space in ``bench/specs/search.yaml`` (SmolLM2-135M on a Kria KV260, no user constraints,
objectives proxy_kl / decode_tokens_per_s / j_per_token, ``tie: type``, MLGRU allowed in all 30
blocks), with the same budget of completed trials and the same sampler seed:

(a) ours: NSGA-II (``--population``) with warm starts: the dense plan, the published uniform plans
    ('uniform 2:4+int4', 'uniform ternary+mlgru') and, with ``--sensitivity``, the plans built from a
    ``dse sensitivity`` result;
(b) random search (``sampler: random``, ``warm_start: {baselines: false}``).

Printed: per study trials, feasible (evaluated) trials, Pareto-front size, hypervolume and wall time;
the hypervolume ratio ours/random (target >= 1.15). Both hypervolumes use the same normalisation:
``dse.pareto.bounds`` of the losses of the feasible trials of BOTH studies together. Then, for each
uniform baseline, its evaluated trial in (a) (the trial whose ``warm_start`` attribute is its label),
whether another feasible trial of (a) dominates it and which (target: every baseline dominated), and
whether (b) found a dominating plan. Last, study (a)'s Pareto table.

Order: ours runs first, random second. The compressed-layer and MLGRU caches on disk
(``$DSE_CACHE_DIR/compress``) are shared, so the second study loads from disk what the first
computed (the number of layers each study computed vs. loaded is printed). Running ours first gives
it the cold cache, so its wall time is the pessimistic one and a time comparison can only favour
random; the metric of the comparison is the hypervolume at equal trial budget, which the cache does
not change (a cached layer is bit-identical to a recomputed one). Evaluation is asynchronous over two
actors, so NSGA-II's generations (and hence its hypervolume) vary a little between runs.

The SQLite database stays in ``--workdir`` (default: a fresh temporary directory, printed first), so
``dse status <study> --storage sqlite:///<workdir>/search.db`` and ``dse dashboard`` can read both
studies afterwards. Study names carry the budget, seed (and population, sensitivity warm starts);
running again with the same workdir resumes (or, if complete, only re-reports) them. ``--quick`` is a smoke test (6 trials, population 4,
proxy 1 x 64 tokens, MLGRU in blocks 0-1 only, 5 distillation steps, calibration 4 x 64 tokens), not
a measurement.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.pareto import bounds, dominates, hypervolume, is_feasible, losses, study_front, trial_losses  # noqa: E402
from dse.report import pareto_table, plan_label  # noqa: E402
from dse.spec import SpecError, StudySpec, parse_spec  # noqa: E402
from dse.study import completed, prepare, run_study  # noqa: E402
from dse.warmstart import baselines, warm_starts  # noqa: E402

SPEC = Path(__file__).resolve().parent / "specs" / "search.yaml"
BASELINES = ("uniform 2:4+int4", "uniform ternary+mlgru")
TARGET_RATIO = 1.15
WALL_ATTR = "bench_wall_s"
"""Study user attribute: seconds this bench spent in run_study on the study (summed over resumptions)."""


def make_spec(base: dict, name: str, storage: str, args, ours: bool) -> StudySpec:
    d = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    d.update(study=name, storage=storage, trials=args.trials)
    d["sampler"] = {"name": "nsga2" if ours else "random", "population": args.population, "seed": args.seed}
    d["warm_start"] = {"baselines": ours, "sensitivity": args.sensitivity if ours else None}
    if args.quick:
        d["proxy"] = {"windows": 1, "seq_len": 64}
        d["space"]["mlgru_blocks"] = [0, 1]
        d["compression"] = {**d["compression"], "windows": 4, "seq_len": 64, "distill_steps": 5}
    return parse_spec(d)


def layer_sources(study) -> tuple[int, int]:
    """Layers the study's evaluations computed and loaded from the layer cache (all trials)."""
    computed = cached = 0
    for t in study.get_trials(deepcopy=False):
        summary = t.user_attrs.get("eval", {}).get("compression", {}) if "duplicate_of" not in t.user_attrs else {}
        computed += int(summary.get("computed", 0))
        cached += int(summary.get("cached", 0))
    return computed, cached


def mixers_text(study, trial) -> str:
    from dse.records import TrialRecords

    plan = TrialRecords.of(study).plan(trial) or {}
    blocks = [b["index"] for b in plan.get("blocks", []) if b.get("mixer") == "mlgru"]
    return f"{len(blocks)} MLGRU blocks" if blocks else "no MLGRU"


def values_text(values, names) -> str:
    return ", ".join(f"{n} {v:.4g}" for n, v in zip(names, values))


def run(spec: StudySpec, progress: bool):
    """Run (or resume) the study; returns it, this bench's total wall seconds on it (summed over
    resumptions) and this call's seconds. A study already complete is only loaded."""
    try:
        study = optuna.load_study(study_name=spec.study, storage=spec.storage)
    except KeyError:
        study = None
    if study is not None and completed(study) >= spec.trials:
        return study, float(study.user_attrs.get(WALL_ATTR, float("nan"))), 0.0
    started = time.perf_counter()
    study = run_study(spec, progress=progress)
    elapsed = time.perf_counter() - started
    wall = float(study.user_attrs.get(WALL_ATTR, 0.0)) + elapsed
    study.set_user_attr(WALL_ATTR, wall)
    return study, wall, elapsed


def compare(studies: dict, trials: dict, walls: dict, directions, headers: dict, extra_rows=()):
    """Print two studies side by side (trials, feasible trials, front size, hypervolume with the bounds of both
    studies' feasible trials, wall time, ``extra_rows``: (label, key -> cell)); returns (hypervolumes, fronts,
    number of feasible trials of both), or None (after the error line) when neither has a feasible trial."""
    feasible = {k: [t for t in ts if is_feasible(t)] for k, ts in trials.items()}
    both = trial_losses([t for k in studies for t in feasible[k]], directions)
    if len(both) == 0:
        print("error: no feasible trial in either study", file=sys.stderr)
        return None
    lo, hi = bounds(both)
    hv = {k: hypervolume(trial_losses(feasible[k], directions), lo, hi) for k in studies}
    fronts = {k: study_front(s, trials[k]) for k, s in studies.items()}
    keys = list(headers)
    print(f"\n{'':34}" + "".join(f"{headers[k]:>16}" for k in keys))
    rows = [
        ("completed trials", lambda k: str(sum(t.state.name == "COMPLETE" for t in trials[k]))),
        ("feasible (evaluated) trials", lambda k: str(len(feasible[k]))),
        ("Pareto front size", lambda k: str(len(fronts[k]))),
        ("hypervolume (shared bounds)", lambda k: f"{hv[k]:.4f}"),
        ("wall time, s", lambda k: f"{walls[k]:.0f}"),
        *extra_rows,
    ]
    for label, cell in rows:
        print(f"{label:34}" + "".join(f"{cell(k):>16}" for k in keys))
    return hv, fronts, len(both)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="completed trials per study (default 60; 6 with --quick)")
    parser.add_argument("--population", type=int, default=None, help="NSGA-II population (default 12; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed of both studies")
    parser.add_argument("--workdir", help="directory of the SQLite database (default: a fresh temporary directory)")
    parser.add_argument("--sensitivity", help="sensitivity.json for study (a)'s warm starts (dse sensitivity)")
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke test, not a measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    args.trials = args.trials or (6 if args.quick else 60)
    args.population = args.population or (4 if args.quick else 12)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.sensitivity:
        args.sensitivity = str(Path(args.sensitivity).resolve())

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-search-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{workdir / 'search.db'}"
    tag = f"{'quick-' if args.quick else ''}t{args.trials}-s{args.seed}"
    base = yaml.safe_load(SPEC.read_text())
    try:
        ours = make_spec(base, f"search-nsga2-p{args.population}{'-sens' if args.sensitivity else ''}-{tag}",
                         storage, args, ours=True)
        rand = make_spec(base, f"search-random-{tag}", storage, args, ours=False)
        setup_ours, setup_rand = prepare(ours), prepare(rand)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The random study must start without any warm start (a sensitivity-<study>/sensitivity.json in
    # the working directory would otherwise be picked up by default).
    extra = warm_starts(rand, setup_rand.units, setup_rand.workload, setup_rand.accelerator)
    if extra:
        print(f"error: the random study would get warm starts {[w.label for w in extra]}", file=sys.stderr)
        return 2
    labels = [w.label for w in warm_starts(ours, setup_ours.units, setup_ours.workload, setup_ours.accelerator)]
    print(f"workdir {workdir}  (storage {storage})")
    print(f"space {SPEC.relative_to(SPEC.parents[2])}{' (--quick)' if args.quick else ''}: {len(setup_ours.units)} "
          f"units, MLGRU allowed in {len(ours.space.mlgru_blocks)} blocks, proxy {ours.proxy.windows} x "
          f"{ours.proxy.seq_len} tokens, {ours.workers} actors x {ours.threads_per_worker} thread, device "
          f"{ours.hardware['device']}, no user constraints")
    print(f"budget {args.trials} completed trials each, sampler seed {args.seed}; (a) {ours.study}: nsga2 "
          f"population {args.population}, warm starts {labels}; (b) {rand.study}: random, no warm starts",
          flush=True)

    studies, walls = {}, {}
    for key, spec in (("ours", ours), ("random", rand)):
        print(f"\n--- running {spec.study}", flush=True)
        try:
            studies[key], walls[key], elapsed = run(spec, progress=not args.no_progress)
        except Exception as err:  # a failed study fails the bench
            logging.exception("study %s failed", spec.study)
            print(f"error: study {spec.study} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"{spec.study}: {elapsed:.0f} s in this run" if elapsed else
              f"{spec.study}: already complete in {storage}; reporting it", flush=True)

    names = list(studies["ours"].metric_names or [o.name for o in ours.objectives])
    directions = ours.directions
    trials = {k: s.get_trials(deepcopy=False) for k, s in studies.items()}
    feasible = {k: [t for t in ts if is_feasible(t)] for k, ts in trials.items()}
    for key, spec in (("ours", ours), ("random", rand)):
        done = sum(t.state.name == "COMPLETE" for t in trials[key])
        if done < spec.trials:
            print(f"error: {spec.study} holds {done} completed trials, not {spec.trials}", file=sys.stderr)
            return 1
    sources = {k: layer_sources(s) for k, s in studies.items()}
    result = compare(studies, trials, walls, directions, {"ours": "(a) nsga2+warm", "random": "(b) random"},
                     [("layers computed / from cache", lambda k: f"{sources[k][0]} / {sources[k][1]}")])
    if result is None:
        return 1
    hv, fronts, both = result
    ratio = hv["ours"] / hv["random"] if hv["random"] > 0 else float("inf")
    print(f"hypervolume ratio ours/random: {ratio:.3f}  (target >= {TARGET_RATIO}: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    print(f"bounds: losses of the {both} feasible trials of both studies (maximised objectives negated), "
          f"normalised to [0, 1], reference point 1.1")

    print("\nuniform baselines (study (a)'s evaluated warm starts):")
    known = {w.label: w for w in baselines(setup_ours.units, ours.space.mlgru_blocks)}
    all_dominated = True
    for label in BASELINES:
        if label not in known:
            print(f"  {label}: not allowed by this space")
            all_dominated = False
            continue
        base_trial = next((t for t in trials["ours"] if t.user_attrs.get("warm_start") == label), None)
        if base_trial is None or base_trial.values is None:
            print(f"  {label}: no completed trial in {ours.study}")
            all_dominated = False
            continue
        print(f"  {label}: trial {base_trial.number}, {values_text(base_trial.values, names)}; "
              f"{mixers_text(studies['ours'], base_trial)}; {plan_label(base_trial.user_attrs)}"
              f"{'' if is_feasible(base_trial) else '  (NOT feasible: ' + str(base_trial.constraints) + ')'}")
        filled = sorted(set(base_trial.params) - set(known[label].params))
        if filled:  # the warm start left these parameters to the sampler: not the uniform plan
            print(f"    WARNING: the sampler chose {len(filled)} parameter(s) the warm start does not set "
                  f"({', '.join(filled[:4])}{', ...' if len(filled) > 4 else ''}): "
                  f"{', '.join(f'{k}={base_trial.params[k]}' for k in filled[:4])}")
        if not is_feasible(base_trial):
            all_dominated = False
            continue
        for key in ("ours", "random"):
            better = [t for t in feasible[key] if t.number != base_trial.number or key != "ours"]
            better = [t for t in better if dominates(t.values, base_trial.values, directions)]
            who = "(a)" if key == "ours" else "(b)"
            if not better:
                print(f"    {who} no feasible trial dominates it")
                if key == "ours":
                    all_dominated = False
                continue
            best = min(better, key=lambda t: losses([t.values], directions)[0, 0])  # best on the first objective
            print(f"    {who} dominated by {len(better)} trial(s), e.g. trial {best.number}: "
                  f"{values_text(best.values, names)}; {mixers_text(studies[key], best)}; {plan_label(best.user_attrs)}")
    print(f"every uniform baseline dominated by another trial of (a): {'yes' if all_dominated else 'NO'}")

    print(f"\nPareto set of (a) {ours.study}:")
    print(pareto_table(studies["ours"], trials["ours"]))
    print(f"\n(dse status {ours.study} --storage {storage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
