"""Co-design: the accelerator searched with the plan against the plan alone on the default accelerator.

    .venv/bin/python bench/bench_costsearch.py [--trials 40] [--population 8] [--seed 0] [--workdir DIR] [--quick]

Two real studies (``dse.study.run_study``: Ray actors, SQLite storage, proxy fidelity) of the default
study (``examples/default.yaml``: SmolLM2-135M on a Kria KV260, objectives proxy_kl / decode_tokens_per_s /
j_per_token), with the same trial budget, sampler (NSGA-II) and seed, and no user constraints (fitting the
device is always enforced):

(a) plan only: the spec's accelerator (300 MHz, DSP/LUT budgets 0.7/0.5, weights streamed);
(b) co-search: the same device, with the clock, the engine budgets and the resident layers searched
    together with the plan (``hardware:`` lists, :data:`COSEARCH`; each list starts with (a)'s value, so
    (a)'s design is one of (b)'s); the co-design sampler (``dse.codesign``) picks them for each plan.
    KV bits are not searched: the accuracy evaluation does not quantise the KV cache, so their accuracy
    cost would be missed.

Printed: per study trials, feasible trials, Pareto-front size, hypervolume and wall time, the ratio
(b)/(a) (target >= 1.2), and (b)'s Pareto set with the accelerator each trial chose. Both hypervolumes
use the same normalisation: ``dse.pareto.bounds`` of the losses of the feasible trials of BOTH studies.
The compressed-layer cache on disk is shared, so the second study loads what the first computed; the
metric is the hypervolume at equal trial budget, which the cache does not change. ``--quick`` is a smoke
test (8 trials, proxy 1 x 64 tokens), not a measurement.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dse.report import pareto_table  # noqa: E402
from dse.spec import SpecError, StudySpec, parse_spec  # noqa: E402
from bench_search import compare, run  # noqa: E402 (run or resume a study; print two side by side)

SPEC = Path(__file__).resolve().parents[1] / "examples" / "default.yaml"
TARGET_RATIO = 1.2
COSEARCH = {
    "clock_mhz": [300, 250, 200, 150],
    "dsp_share": [0.7, 0.35, 0.15, 0.05],
    "lut_share": [0.5, 0.25, 0.1, 0.04],
    "resident": ["none", r"model\.layers\.(0|1)\.self_attn\..*", r"model\.layers\.[0-3]\.self_attn\.(q|k|v)_proj"],
}
"""The searched accelerator fields of study (b); the first choice of each is study (a)'s value."""


def make_spec(base: dict, name: str, storage: str, args, cosearch: bool) -> StudySpec:
    d = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    d.update(study=name, storage=storage, trials=args.trials, constraints=[])
    d["sampler"] = {"name": "nsga2", "population": args.population, "seed": args.seed}
    d["promotion"] = {"every": 0, "final": False}
    if cosearch:
        d["hardware"] = {**d["hardware"], **COSEARCH}
    if args.quick:
        d["proxy"] = {"windows": 1, "seq_len": 64}
    return parse_spec(d)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="completed trials per study (default 40; 8 with --quick)")
    parser.add_argument("--population", type=int, default=8, help="NSGA-II population")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed of both studies")
    parser.add_argument("--workdir", help="directory of the SQLite database (default: a fresh temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke test, not a measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    args.trials = args.trials or (8 if args.quick else 40)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-costsearch-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{workdir / 'costsearch.db'}"
    tag = f"{'quick-' if args.quick else ''}t{args.trials}-p{args.population}-s{args.seed}"
    base = yaml.safe_load(SPEC.read_text())
    try:
        specs = {"plan": make_spec(base, f"costsearch-plan-{tag}", storage, args, cosearch=False),
                 "co": make_spec(base, f"costsearch-co-{tag}", storage, args, cosearch=True)}
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"workdir {workdir}  (storage {storage})")
    print(f"default study {SPEC.name}: {base['model']} on {base['hardware']['device']}, budget {args.trials} completed "
          f"trials each, nsga2 population {args.population}, seed {args.seed}; (b) searches "
          + ", ".join(f"{k} {v}" for k, v in COSEARCH.items()), flush=True)

    studies, walls = {}, {}
    for key, spec in specs.items():
        print(f"\n--- running {spec.study}", flush=True)
        try:
            studies[key], walls[key], _ = run(spec, progress=not args.no_progress)
        except Exception as err:  # a failed study fails the bench
            logging.exception("study %s failed", spec.study)
            print(f"error: study {spec.study} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1

    trials = {k: s.get_trials(deepcopy=False) for k, s in studies.items()}
    result = compare(studies, trials, walls, specs["plan"].directions,
                     {"plan": "(a) plan only", "co": "(b) co-search"})
    if result is None:
        return 1
    hv, fronts, both = result
    ratio = hv["co"] / hv["plan"] if hv["plan"] > 0 else float("inf")
    print(f"hypervolume ratio co-search / plan only: {ratio:.3f}  (target >= {TARGET_RATIO}: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    print(f"bounds: losses of the {both} feasible trials of both studies (maximised objectives negated), "
          f"normalised to [0, 1], reference point 1.1")
    print("\naccelerators on (b)'s Pareto front (trial: searched fields):")
    for t in fronts["co"]:
        chosen = {k[3:]: v for k, v in t.params.items() if k.startswith("hw.")}
        print(f"  trial {t.number}: " + ", ".join(f"{k} {v}" for k, v in chosen.items()))
    print(f"\nPareto set of (b) {specs['co'].study}:")
    print(pareto_table(studies["co"], trials["co"]))
    print(f"\n(dse status {specs['co'].study} --storage {storage})")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
