"""Cost-model speed, side by side in one run (timings on a shared machine are noisy; ratios are what count).

    .venv/bin/python bench/bench_hwcost.py [--plans 1000] [--singles 200] [--no-proxy]

Prints, for a 32-block LLaMA2-7B on an Alveo U280 at 225 MHz with random per-layer plans
(FP16/INT8/INT4/INT3/ternary, dense or 2:4, 20 % of blocks MLGRU):

* plans/s of single ``hwcost.estimate`` calls (full report with per-layer rows);
* plans/s of one ``hwcost.estimate_batch`` call on arrays a search fills directly, and with the
  arrays built from ``ModelPlan`` objects (``PlanBatch.from_plans``);
* the same batch with one accelerator per plan, drawn from 12 designs that vary the clock, the DSP/LUT
  budgets, the resident layers, the KV bits and the ternary engine (a co-search's batch);
* one proxy evaluation of the default model (``evaluators.fidelity``: KL and perplexity on 8 x 256
  validation tokens, one torch thread as in a study's workers) against one single estimate of the
  default study's plan on the KV260.

Targets (issues 3 and 13): batched >= 50x the plans/s of single calls, also when the accelerator varies;
a single estimate within 2 ms on the SmolLM2 and LLaMA-7B plans; < 1/1000 of a proxy evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat  # noqa: E402
from hwcost import Accelerator, PlanBatch, Workload, estimate, estimate_batch  # noqa: E402
from hwcost.kernels import KERNELS  # noqa: E402
from hwcost.model import layout  # noqa: E402

FORMATS = ("fp16", "int8", "int4", "int3", "ternary")
NM = ((1, 1), (2, 4))


def random_batch(workload: Workload, size: int, seed: int) -> PlanBatch:
    """``size`` random plans written straight into the arrays, as a search maps its choices."""
    rng = np.random.default_rng(seed)
    batch = PlanBatch.empty(workload, size)
    rows = len(layout(workload).layers)
    batch.kernel[:] = np.array([KERNELS.index(f) for f in FORMATS])[rng.integers(len(FORMATS), size=(size, rows))]
    nm = np.array(NM)[rng.integers(len(NM), size=(size, rows))]
    batch.n[:], batch.m[:] = nm[..., 0], nm[..., 1]
    batch.mlgru[:] = rng.random((size, workload.num_layers)) < 0.2
    return batch


def plans_of(batch: PlanBatch) -> list[ModelPlan]:
    """The same plans as :class:`ModelPlan` objects (MLGRU projections named only in MLGRU blocks)."""
    lay = layout(batch.workload)
    names = {"fp16": "16", "int8": "8", "int4": "4", "int3": "3", "ternary": "ternary"}
    plans = []
    for p in range(len(batch)):
        layers = []
        for r, layer in enumerate(lay.layers):
            block_mlgru = layer.block is not None and batch.mlgru[p, layer.block]
            if (lay.kind[r] == 2 and not block_mlgru) or (lay.kind[r] == 1 and block_mlgru):
                continue
            n, m = int(batch.n[p, r]), int(batch.m[p, r])
            layers.append(LayerPlan(layer.name, None if m == 1 else Sparsity(n, m),
                                    WeightFormat(names[KERNELS[batch.kernel[p, r]]], int(batch.group[p, r]))))
        blocks = tuple(BlockPlan(i, "mlgru") for i in np.flatnonzero(batch.mlgru[p]).tolist())
        plans.append(ModelPlan(layers=tuple(layers), blocks=blocks))
    return plans


def designs(size: int, seed: int) -> list[Accelerator]:
    """One accelerator per plan, drawn from 12 U280 designs (clock x budgets x resident/KV/engine choices)."""
    choices = [Accelerator.from_dict({"device": "alveo-u280", "clock_mhz": clock, "dsp_share": share,
                                      "lut_share": share, **extra})
               for clock in (150, 225, 300) for share in (0.2, 0.7)
               for extra in ({}, {"resident": r"model\.layers\.[0-3]\..*", "kv_bits": 8,
                                  "ternary_engine": "table_lookup"})]
    rng = np.random.default_rng(seed)
    return [choices[i] for i in rng.integers(len(choices), size=size)]


def per_call(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def proxy_seconds() -> tuple[float, int]:
    """Wall seconds of one proxy evaluation of the default model (one torch thread) and its tokens."""
    import torch

    from evaluators.fidelity import ProxySet, dense_reference, proxy_eval
    from evaluators.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    proxy = ProxySet.build(tokenizer)
    reference = dense_reference(model, proxy)
    times = [proxy_eval(model, proxy, reference).wall_time_s for _ in range(3)]
    return statistics.median(times), int(proxy.input_ids.numel())


def default_study_plan() -> tuple[ModelPlan, Workload, Accelerator]:
    """The default study's model on its accelerator, with a plan from its space (MLP 4:8 INT4, attention INT8)."""
    from dse.spec import load_spec
    from evaluators.models import load_config

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "default.yaml")
    workload, accel = Workload.from_hf_config(load_config(spec.model)), Accelerator.from_dict(spec.hardware)
    layers = tuple(LayerPlan(layer.name, Sparsity(4, 8) if ".mlp." in layer.name else None,
                             WeightFormat("4" if ".mlp." in layer.name else "8", 64))
                   for layer in workload.linear_layers() if layer.name != "lm_head")
    return ModelPlan(layers=layers), workload, accel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=1000, help="plans in the batch")
    parser.add_argument("--singles", type=int, default=200, help="single estimate calls")
    parser.add_argument("--no-proxy", action="store_true", help="skip the proxy evaluation (no torch needed)")
    args = parser.parse_args(argv)

    workload = Workload.resolve("llama2-7b")
    accel = Accelerator("alveo-u280", clock_mhz=225)
    batch = random_batch(workload, args.plans, seed=0)
    plans = plans_of(batch)
    estimate_batch(batch, accel)  # warm the caches (layout, constants)
    singles = plans[:args.singles]
    start = time.perf_counter()
    reports = [estimate(plan, workload, accel) for plan in singles]
    single_s = (time.perf_counter() - start) / len(singles)
    batch_s = per_call(lambda: estimate_batch(batch, accel), 5) / len(batch)
    convert_s = per_call(lambda: PlanBatch.from_plans(plans, workload), 3) / len(batch)
    result = estimate_batch(batch, accel)
    worst = max(abs(result.decode_tokens_per_s[i] / r.decode_tokens_per_s - 1) for i, r in enumerate(reports))
    accels = designs(args.plans, seed=1)
    varied_s = per_call(lambda: estimate_batch(batch, accels), 3) / len(batch)
    varied = estimate_batch(batch, accels)
    worst_varied = max(abs(varied.decode_tokens_per_s[i] / estimate(plan, workload, accels[i]).decode_tokens_per_s - 1)
                       for i, plan in enumerate(singles[:50]))

    print(f"LLaMA2-7B (32 blocks, {len(layout(workload).layers)} layout rows) on alveo-u280 @ 225 MHz, "
          f"{args.plans} random plans")
    print(f"{'':38}{'plans/s':>12}{'us/plan':>12}{'vs single':>12}")
    for label, seconds in (("single estimate()", single_s), ("estimate_batch() on arrays", batch_s),
                           ("from_plans() + estimate_batch()", batch_s + convert_s),
                           ("estimate_batch(), 12 designs mixed", varied_s)):
        print(f"{label:38}{1 / seconds:12,.0f}{seconds * 1e6:12,.1f}{single_s / seconds:11.1f}x")
    print(f"batched vs single tokens/s, worst relative difference over {len(singles)} plans: {worst:.1e}; "
          f"with the designs mixed, over 50 plans: {worst_varied:.1e}")
    ok = single_s / batch_s >= 50 and single_s / varied_s >= 50
    print(f"target batched >= 50x single: {single_s / batch_s:.0f}x one design, {single_s / varied_s:.0f}x designs "
          f"mixed {'PASS' if ok else 'FAIL'}")
    ok = ok and single_s < 2e-3
    print(f"target single estimate <= 2 ms (LLaMA2-7B): {single_s * 1e3:.2f} ms {'PASS' if single_s < 2e-3 else 'FAIL'}")

    if not args.no_proxy:
        plan, small, kv260 = default_study_plan()
        estimate(plan, small, kv260)
        small_s = per_call(lambda: estimate(plan, small, kv260), 50)
        proxy_s, tokens = proxy_seconds()
        ratio = small_s / proxy_s
        print(f"\nproxy evaluation of the default model ({tokens} tokens, 1 torch thread): {proxy_s:.2f} s")
        print(f"single estimate of the default study's plan (SmolLM2-135M on {kv260.device}): {small_s * 1e3:.2f} ms "
              f"{'PASS' if small_s < 2e-3 else 'FAIL'} (target <= 2 ms)")
        ok = ok and small_s < 2e-3
        print(f"single estimate of a LLaMA2-7B plan: {single_s * 1e3:.2f} ms")
        worst_ratio = max(small_s, single_s) / proxy_s
        ok = ok and worst_ratio < 1e-3
        print(f"target single estimate < 1/1000 of a proxy evaluation: 1/{1 / ratio:,.0f} (default model), "
              f"1/{proxy_s / single_s:,.0f} (LLaMA2-7B plan) {'PASS' if worst_ratio < 1e-3 else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
