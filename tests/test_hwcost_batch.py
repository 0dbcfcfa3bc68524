"""The vectorised estimate: a batch of plans gives, plan by plan, the numbers of single estimates.

The batch mixes plans with different engine sets (formats, N:M patterns), MLGRU blocks and a
fully FP16 plan, so the engines of the batch are the union of the plans' engines and each plan
must be sized and summed only over its own; a plan's figures must not depend on its neighbours.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from hwcost import Accelerator, PlanBatch, Workload, estimate, estimate_batch
from hwcost.kernels import KERNELS
from hwcost.model import layout

FIELDS = ("decode_tokens_per_s", "decode_ms_per_token", "prefill_ms", "power_w", "j_per_token",
          "constraint_violation")


def random_plans(workload: Workload, count: int, seed: int) -> list[ModelPlan]:
    rng = random.Random(seed)
    names = sorted(workload.layer_names())
    in_features = {layer.name: layer.in_features for layer in
                   workload.linear_layers() + workload.linear_layers(range(workload.num_layers))}
    plans = [ModelPlan()]  # all FP16 dense
    for _ in range(count - 1):
        if workload.token_mixer == "mlgru":
            blocks = tuple(BlockPlan(i, "mlgru") for i in range(workload.num_layers))
        else:
            blocks = tuple(BlockPlan(i, "mlgru") for i in range(workload.num_layers) if rng.random() < 0.3)
        mlgru = {bp.index for bp in blocks}
        layers = []
        for name in names:
            if ".mlgru." in name and workload.block_of(name) not in mlgru:
                continue  # a substituted MLGRU projection exists only in a block whose mixer is mlgru
            if rng.random() < 0.7:
                sp = rng.choice([None, Sparsity(2, 4), Sparsity(1, 4), Sparsity(4, 8)])
                if sp is not None and in_features[name] % sp.m:
                    sp = None
                layers.append(LayerPlan(name, sp, WeightFormat(rng.choice(["16", "8", "6", "4", "3", "2", "ternary"]),
                                                               rng.choice([64, 128]))))
        plans.append(ModelPlan(layers=tuple(layers), blocks=blocks))
    return plans


@pytest.mark.parametrize("model, accel", [
    ("smollm2-135m", Accelerator("kria-kv260", clock_mhz=300, context_length=512)),
    ("llama2-7b", Accelerator("alveo-u280", clock_mhz=225, batch=4, context_length=1024)),
    ("llama2-7b", Accelerator("alveo-u250", clock_mhz=200, resident="all", act_bits=16)),
    ("mmfreelm-1.3b", Accelerator("intel-d5005", clock_mhz=60)),
])
def test_batch_equals_single_estimates(model, accel):
    workload = Workload.resolve(model)
    plans = random_plans(workload, 12, seed=len(model))
    batch = estimate_batch(PlanBatch.from_plans(plans, workload), accel)
    assert len(batch.decode_tokens_per_s) == len(plans)
    for p, plan in enumerate(plans):
        single = estimate(plan, workload, accel)
        for name in FIELDS:
            assert getattr(batch, name)[p] == pytest.approx(getattr(single, name), rel=1e-12, abs=1e-12), (p, name)
        assert batch.weight_bytes_total[p] == single.weight_bytes_total
        assert bool(batch.fits[p]) == single.fits
        for r, used in single.resources.items():
            assert batch.resources[r][p] == used and batch.utilisation[r][p] == pytest.approx(single.utilisation[r])
        for metric in ("decode_tokens_per_s", "j_per_token", "weight_bytes", "lut_util", "bram_util"):
            assert batch.metric(metric)[p] == pytest.approx(single.metric(metric), rel=1e-12)
    # the reverse order gives the same per-plan numbers (no dependence on neighbours)
    reverse = estimate_batch(PlanBatch.from_plans(plans[::-1], workload), accel)
    np.testing.assert_allclose(reverse.decode_tokens_per_s[::-1], batch.decode_tokens_per_s, rtol=1e-12)


def test_batch_filled_from_arrays_matches_plans():
    """A search can fill the arrays directly (kernel index, N, M, group, MLGRU flags) without ModelPlans."""
    workload = Workload.resolve("smollm2-135m")
    accel = Accelerator("kria-kv260", clock_mhz=300)
    batch = PlanBatch.empty(workload, 2)
    mlp = [i for i, name in enumerate(layer.name for layer in layout(workload).layers) if ".mlp." in name]
    batch.kernel[1, mlp] = KERNELS.index("int4")
    batch.n[1, mlp], batch.m[1, mlp] = 2, 4
    batch.group[1, mlp] = 64
    batch.mlgru[1, 3] = True
    plan = ModelPlan(layers=tuple(LayerPlan(layer.name, Sparsity(2, 4), WeightFormat("4", 64))
                                  for layer in workload.linear_layers() if ".mlp." in layer.name),
                     blocks=(BlockPlan(3, "mlgru"),))
    result = estimate_batch(batch, accel)
    assert result.decode_tokens_per_s[0] == pytest.approx(estimate(ModelPlan(), workload, accel).decode_tokens_per_s)
    single = estimate(plan, workload, accel)
    assert result.decode_tokens_per_s[1] == pytest.approx(single.decode_tokens_per_s, rel=1e-12)
    assert result.weight_bytes_total[1] == single.weight_bytes_total


def test_batch_rejects_a_bad_plan_by_name():
    workload = Workload.resolve("smollm2-135m")
    bad = ModelPlan(layers=(LayerPlan("model.layers.0.mlp.gate_proj", Sparsity(2, 5), WeightFormat("4")),))
    with pytest.raises(ValueError, match="layer model.layers.0.mlp.gate_proj: M=5 does not divide in_features 576"):
        PlanBatch.from_plans([ModelPlan(), bad], workload)
