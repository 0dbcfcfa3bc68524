"""Warm starts: the dense plan, the published uniform plans where the space allows them, and plans
from a sensitivity scan (a hand-worked price sweep)."""

from __future__ import annotations

from dse.plan import Sparsity, WeightFormat
from dse.space import build_units, distributions, plan_from_params
from dse.spec import parse_spec
from dse.warmstart import baselines, from_sensitivity

NAMES = [f"model.layers.{b}.self_attn.{p}_proj" for b in range(4) for p in "qkvo"]
NAMES += [f"model.layers.{b}.mlp.{p}_proj" for b in range(4) for p in ("gate", "up", "down")]
NAMES.append("lm_head")


def units_of(groups, tie="block", mlgru=()):
    spec = parse_spec({"study": "w", "model": "m", "tasks": ["t"], "hardware": {"device": "kria-kv260"},
                       "objectives": ["proxy_kl"], "space": {"tie": tie, "groups": groups,
                                                             "mlgru_blocks": list(mlgru)}})
    return build_units(spec.space, NAMES), spec.space.mlgru_blocks


FULL = [
    {"name": "attn", "targets": r"model\.layers\.\d+\.self_attn\..*", "sparsity": ["dense", "2:4", "4:8"],
     "formats": [8, 4, "ternary"], "prune": ["wanda", "magnitude"], "quant": ["gptq", "rtn"]},
    {"name": "mlp", "targets": r"model\.layers\.\d+\.mlp\..*", "sparsity": ["dense", "2:4"],
     "formats": [16, 4, "ternary"]},
    {"name": "head", "targets": "lm_head", "formats": [16, 8, 4]},
]


def test_dense_and_published_uniform_plans():
    units, mlgru = units_of(FULL, mlgru=[1, 3])
    for ws in baselines(units, mlgru):  # every parameter set: nothing left for the sampler to draw
        assert set(ws.params) == set(distributions(units, mlgru)), ws.label
    starts = {ws.label: plan_from_params(ws.params, units, mlgru) for ws in baselines(units, mlgru)}
    assert list(starts) == ["dense", "uniform 2:4+int4", "uniform ternary+mlgru"]
    dense = starts["dense"]
    assert dense.layer("model.layers.0.self_attn.q_proj").fmt == WeightFormat("8", 128)  # least compressed allowed
    assert dense.layer("model.layers.0.mlp.up_proj").is_identity and dense.layer("lm_head").is_identity
    nm = starts["uniform 2:4+int4"]
    for lp in nm.layers:
        if lp.name == "lm_head":  # outside the blocks: INT4 where allowed, 2:4 is not
            assert lp.sparsity is None and lp.fmt.name == "4"
        else:  # magnitude pruning and RTN, as the published system
            assert (lp.sparsity, lp.fmt.name, lp.prune, lp.quant) == (Sparsity(2, 4), "4", "magnitude", "rtn")
    ternary = starts["uniform ternary+mlgru"]
    assert {lp.fmt.name for lp in ternary.layers if lp.name != "lm_head"} == {"ternary"}
    assert all(lp.sparsity is None and lp.quant == "rtn" for lp in ternary.layers)
    assert ternary.layer("lm_head").is_identity
    assert [(b.index, b.mixer) for b in ternary.blocks] == [(1, "mlgru"), (3, "mlgru")]


def test_a_uniform_plan_the_space_does_not_allow_is_not_enqueued():
    groups = [dict(FULL[0], formats=[8, 4]), FULL[1], FULL[2]]  # no ternary attention
    units, mlgru = units_of(groups)
    assert [ws.label for ws in baselines(units, mlgru)] == ["dense", "uniform 2:4+int4"]
    groups = [dict(FULL[0], sparsity=["dense", "4:8"]), FULL[1], FULL[2]]  # no 2:4 attention
    units, mlgru = units_of(groups)
    assert [ws.label for ws in baselines(units, mlgru)] == ["dense", "uniform ternary+mlgru"]


def test_sensitivity_plans_follow_the_price_sweep():
    """Two units, hand-made KL and decode-time figures: cheap prices keep accurate choices, high prices
    take the fastest; the plans in between trade the less sensitive unit first."""
    groups = [{"name": "a", "targets": r"model\.layers\.0\.self_attn\..*", "formats": [16, 4, 2]},
              {"name": "b", "targets": r"model\.layers\.1\.self_attn\..*", "formats": [16, 4, 2]},
              {"name": "rest", "targets": r".*(mlp|layers\.[23]\.self_attn).*"}]
    units, mlgru = units_of(groups, tie="group")
    kl = {("a", "4"): 0.01, ("a", "2"): 0.5, ("b", "4"): 0.2, ("b", "2"): 3.0}
    rows = [{"unit": u, "block": None, "mixer": "attention", "sparsity": "dense", "format": f, "prune": "magnitude",
             "quant": "rtn", "kl": v} for (u, f), v in kl.items()]
    ms = {"16": 4.0, "4": 1.0, "2": 0.5}

    def cost_ms(params):
        return ms[params.get("a.format", "16")] + ms[params.get("b.format", "16")]

    plans = [ws.params for ws in from_sensitivity(rows, units, mlgru, cost_ms, count=10)]
    # every distinct plan of the sweep, cheapest price first (the all-FP16 base itself is not enqueued)
    assert plans == [{"a.format": "4", "b.format": "16"}, {"a.format": "4", "b.format": "4"},
                     {"a.format": "2", "b.format": "4"}, {"a.format": "2", "b.format": "2"}]
    assert len(from_sensitivity(rows, units, mlgru, cost_ms, count=2)) == 2
