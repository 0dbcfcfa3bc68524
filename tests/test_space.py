"""Search space: units of choice per tie mode, and Optuna parameters -> ModelPlan."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dse.plan import Sparsity, WeightFormat
from dse.space import block_index, build_units, suggest_plan
from dse.spec import SpecError, load_spec

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"

# SmolLM2-135M's linear layers, written out by hand: 30 blocks x 7 projections + lm_head.
NAMES = [f"model.layers.{b}.self_attn.{p}_proj" for b in range(30) for p in "qkvo"]
NAMES += [f"model.layers.{b}.mlp.{p}_proj" for b in range(30) for p in ("gate", "up", "down")]
NAMES.append("lm_head")


def space(tie: str):
    spec = load_spec(EXAMPLE)
    return spec.space.__class__(spec.space.groups, tie, ())


@pytest.mark.parametrize("tie,units,params", [("block", 30 + 30 + 1, 30 * 2 + 30 * 2 + 1),
                                              ("layer", 210 + 1, 120 * 2 + 90 * 2 + 1),
                                              ("group", 3, 2 + 2 + 1)])
def test_units_and_parameters_per_tie_mode(tie, units, params):
    built = build_units(space(tie), NAMES)
    assert len(built) == units
    assert sorted(n for u in built for n in u.layers) == sorted(NAMES)
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    plan = suggest_plan(trial, built)
    assert len(trial.params) == params
    assert len(plan.layers) == 211


def test_block_tie_gives_one_choice_per_group_and_block():
    built = build_units(space("block"), NAMES)
    params = {}
    for unit in built:
        if unit.key.startswith("attn."):
            params[f"{unit.key}.sparsity"] = "4:8" if unit.key == "attn.b7" else "dense"
            params[f"{unit.key}.format"] = "4"
        elif unit.key.startswith("mlp."):
            params[f"{unit.key}.sparsity"] = "4:8"
            params[f"{unit.key}.format"] = "3"
        else:
            params[f"{unit.key}.format"] = "16"
    plan = suggest_plan(optuna.trial.FixedTrial(params), built)
    q7 = plan.layer("model.layers.7.self_attn.q_proj")
    assert q7.sparsity == Sparsity(4, 8) and q7.fmt == WeightFormat("4", 64)
    assert plan.layer("model.layers.8.self_attn.o_proj").sparsity is None
    assert plan.layer("model.layers.8.mlp.down_proj").fmt == WeightFormat("3", 64)
    assert plan.layer("lm_head").is_identity
    assert plan.summary() == {"int4/g64": 116, "4:8 int3/g64": 90, "4:8 int4/g64": 4, "fp16": 1}


def test_block_index():
    assert block_index("model.layers.12.mlp.up_proj") == 12
    assert block_index("transformer.h.3.attn.c_attn") == 3
    assert block_index("lm_head") is None


def test_unmatched_group_is_a_spec_error():
    with pytest.raises(SpecError, match=r"space.groups\[1\].targets: .* matches no linear layer"):
        build_units(space("block"), [n for n in NAMES if ".mlp." not in n])
