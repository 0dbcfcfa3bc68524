"""Every sampler the spec offers drives the real space and cost model, seeded and reproducible, and sees
the hardware constraints (no model needed: the objectives here are the cost model's)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from dse.spec import SamplerSpec, load_spec
from dse.study import make_sampler, prepare, screen
from dse.space import suggest_plan
from hwcost import estimate

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"


def run(name: str, seed: int, trials: int = 12) -> optuna.Study:
    spec = load_spec(EXAMPLE)
    spec = replace(spec, sampler=SamplerSpec(name, 4, seed))
    setup = prepare(spec)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
    for _ in range(trials):
        trial = study.ask()
        plan = suggest_plan(trial, setup.units)
        report = estimate(plan, setup.workload, setup.accelerator)
        for key, value in screen(spec, report).items():
            trial.set_constraint(key, value)
        study.tell(trial, [report.metric("decode_tokens_per_s"), report.metric("weight_bytes")])
    return study


@pytest.fixture
def one_torch_thread():
    """GPSampler fits its Gaussian process with torch; on a loaded machine torch's intra-op threads fight
    the other processes for the cores and one proposal takes ~15x longer than on a single thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["nsga2", "nsga3", "tpe", pytest.param("gp", marks=pytest.mark.slow), "random"])
def test_each_sampler_is_seeded_and_sees_constraints(name, request):
    if name == "gp":
        request.getfixturevalue("one_torch_thread")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first, again, other = run(name, 7), run(name, 7), run(name, 8)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert [t.params for t in first.trials] != [t.params for t in other.trials]
    assert all(t.state.name == "COMPLETE" for t in first.trials)
    # the constraint (decode >= 165 tokens/s) is recorded, and the best trials are the feasible ones
    assert all(set(t.constraints) == {"fits", "decode_tokens_per_s >= 165"} for t in first.trials)
    feasible = {t.number for t in first.trials if max(t.constraints.values()) <= 0}
    assert {t.number for t in first.best_trials} <= feasible


GP_STARTUP = 10
"""Optuna's GPSampler default ``n_startup_trials``: the trials before it are its independent (random) sampler's."""


def test_gp_sampler_proposes_valid_plans(one_torch_thread):
    """The fast GP case: the spec's ``gp`` is Optuna's GPSampler, and its first GP proposal (after the
    random startup) is a valid, reproducible plan the cost model and the constraints accept. The full
    seeded-and-constrained check of 12 trials is the slow ``[gp]`` case above."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = replace(load_spec(EXAMPLE), sampler=SamplerSpec("gp", 4, 7))
    assert isinstance(make_sampler(spec), optuna.samplers.GPSampler)
    first, again = run("gp", 7, GP_STARTUP + 1), run("gp", 7, GP_STARTUP + 1)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert all(t.state.name == "COMPLETE" for t in first.trials)
    assert all(set(t.constraints) == {"fits", "decode_tokens_per_s >= 165"} for t in first.trials)
    proposed = first.trials[GP_STARTUP]
    assert proposed.params.keys() == first.trials[0].params.keys()
    assert all(value > 0 for value in proposed.values)
