"""Search space: units of choice per tie mode, and Optuna parameters -> ModelPlan."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dse.plan import Sparsity, WeightFormat
from dse.arch import block_index
from dse.space import build_units, distributions, plan_from_params, suggest_plan, unit_params
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


def test_type_tie_shares_one_choice_per_layer_type_across_blocks():
    built = build_units(space("type"), NAMES)
    assert [u.key for u in built] == ["attn.self_attn.q_proj", "attn.self_attn.k_proj", "attn.self_attn.v_proj",
                                      "attn.self_attn.o_proj", "mlp.mlp.gate_proj", "mlp.mlp.up_proj",
                                      "mlp.mlp.down_proj", "head.lm_head"]
    down = next(u for u in built if u.key == "mlp.mlp.down_proj")
    assert down.layers == tuple(f"model.layers.{b}.mlp.down_proj" for b in range(30))


def test_ignored_layers_stay_out_of_the_plan_and_dense():
    spec = load_spec(EXAMPLE)
    groups = tuple(g for g in spec.space.groups if g.name != "head") + (
        spec.space.groups[0].__class__("all", r".*", formats=(WeightFormat("4", 64),)),)
    ignoring = spec.space.__class__(groups[-1:], "group", (), (r"lm_head", r"model\.layers\.0\..*"))
    built = build_units(ignoring, NAMES)
    layers = {n for u in built for n in u.layers}
    assert "lm_head" not in layers and not any(n.startswith("model.layers.0.") for n in layers)
    assert len(layers) == 211 - 1 - 7
    plan = suggest_plan(optuna.trial.FixedTrial({}), built)
    assert plan.layer("lm_head").is_identity and plan.layer("model.layers.0.mlp.up_proj").is_identity
    with pytest.raises(SpecError, match=r"space.ignore\[0\]: 'embed' matches no linear layer"):
        build_units(spec.space.__class__(groups[-1:], "group", (), ("embed",)), NAMES)


def test_distributions_and_plans_round_trip():
    built = build_units(space("block"), NAMES)
    dists = distributions(built, (3, 4))
    assert len(dists) == 30 * 2 + 30 * 2 + 1 + 2 and dists["b3.mixer"].choices == ("attention", "mlgru")
    assert dists["mlp.b5.format"].choices == ("8", "4", "3")
    params = {"mlp.b5.format": "3", "mlp.b5.sparsity": "4:8", "b4.mixer": "mlgru", "head.format": "8"}
    params.update(unit_params(built[0], sparsity="4:8", format="4"))
    plan = plan_from_params(params, built, (3, 4))
    assert plan.layer("model.layers.5.mlp.gate_proj").label == "4:8 int3/g64"
    assert plan.layer("model.layers.0.self_attn.v_proj").label == "4:8 int4/g64"
    assert plan.layer("model.layers.6.mlp.gate_proj").label == "int8/g64"  # unset: the group's first choice
    assert [(b.index, b.mixer) for b in plan.blocks] == [(4, "mlgru")]
    trial = optuna.trial.FixedTrial({**{n: d.choices[0] for n, d in dists.items()}, **params})
    assert suggest_plan(trial, built, (3, 4)) == plan
    with pytest.raises(ValueError, match=r"attn.b0: format 'ternary' is not allowed"):
        unit_params(built[0], format="ternary")
