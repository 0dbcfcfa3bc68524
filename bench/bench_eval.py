"""Evaluation speed and proxy fidelity, side by side in one run (ratios count; timings are noisy).

    .venv/bin/python bench/bench_eval.py [--threads 2] [--skip-tau] [--tau-limit 200] [--large-vocab only|skip]

First, on a tiny randomly initialised model with Gemma 3's 262,144-token vocabulary (hidden 128, 2 layers):
the dense forward over 8 x 256 tokens against a proxy evaluation (target: at most 1.3x), the dense
reference's memory (target: under 100 MB) and the proxy KL against the exact full-vocabulary KL.

Then, on the default model (SmolLM2-135M) and the default proxy set (8 x 256 validation tokens):

1. the floor: the dense model's forward pass over the proxy tokens;
2. a proxy evaluation (apply the plan + KL/perplexity) of a plan whose layers are all in the
   layer cache (GPTQ attention, SparseGPT+GPTQ MLP, computed once beforehand);
3. the same for a plan computed cold (magnitude 4:8 + round-to-nearest INT4, empty cache).
   Target: (2) at most 1.5x (1). The three are measured alternately, fastest of ``--repeats`` each.

Then the rank correlation (Kendall tau, scipy) between the proxy (-KL) and full lm-eval scores
over 14 varied plans: the default study's accuracy objective (mean of shakespeare_lastword acc
and shakespeare_cloze acc_norm, ``--tau-limit`` documents each) and, separately, the word
perplexity of shakespeare_ppl. Target: tau >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the evaluator actors (dse.workers.WORKER_ENV)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat  # noqa: E402
from dse.spec import CompressionSpec, TaskSpec  # noqa: E402
from evaluators.compress import PlanApplier  # noqa: E402
from evaluators.compress.cache import CompressionCache  # noqa: E402
from evaluators.fidelity import DenseReference, ProxySet, dense_reference, full_eval, proxy_eval  # noqa: E402
from evaluators.lm import TorchLM  # noqa: E402
from evaluators.models import linear_layer_names, load_model  # noqa: E402
from evaluators.tasks import task_manager  # noqa: E402

ATTN, MLP = r".self_attn.", r".mlp."


def plan(names: list[str], *rules: tuple[str, LayerPlan]) -> ModelPlan:
    """Each layer takes the first rule whose substring its name contains (rules give the choice)."""
    layers = []
    for name in names:
        for needle, choice in rules:
            if needle in name:
                layers.append(LayerPlan(name, choice.sparsity, choice.fmt, choice.prune, choice.quant))
                break
    return ModelPlan(tuple(layers))


def lp(sparsity=None, fmt="16", group=128, prune="magnitude", quant="rtn") -> LayerPlan:
    return LayerPlan("x", Sparsity.parse(sparsity), WeightFormat(fmt, group), prune, quant)


def varied_plans(names: list[str]) -> dict[str, ModelPlan]:
    blocks = [n for n in names if n.startswith("model.layers.")]
    return {
        "dense": ModelPlan(),
        "int8 rtn": plan(blocks, ("", lp(fmt="8"))),
        "int4/g64 gptq": plan(blocks, ("", lp(fmt="4", group=64, quant="gptq"))),
        "int4/g128 rtn": plan(blocks, ("", lp(fmt="4"))),
        "int3/g128 gptq": plan(blocks, ("", lp(fmt="3", quant="gptq"))),
        "int3/g128 rtn": plan(blocks, ("", lp(fmt="3"))),
        "mlp 4:8 sparsegpt": plan(blocks, (MLP, lp("4:8", prune="sparsegpt"))),
        "mlp 4:8 magnitude": plan(blocks, (MLP, lp("4:8"))),
        "mlp 2:4 wanda": plan(blocks, (MLP, lp("2:4", prune="wanda"))),
        "all 2:4 sparsegpt+gptq int4": plan(blocks, ("", lp("2:4", "4", prune="sparsegpt", quant="gptq"))),
        "mlp 2:4 magnitude": plan(blocks, (MLP, lp("2:4"))),
        "attn ternary refit": plan(blocks, (ATTN, lp(fmt="ternary", quant="refit"))),
        "mlp ternary absmean": plan(blocks, (MLP, lp(fmt="ternary"))),
        "2 MLGRU blocks + int4 gptq": ModelPlan(plan(blocks, ("", lp(fmt="4", quant="gptq"))).layers,
                                                 (BlockPlan(10, "mlgru"), BlockPlan(20, "mlgru"))),
    }


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


LARGE_VOCAB = 262_144


def large_vocab(threads: int, repeats: int) -> None:
    """The proxy on a tiny randomly initialised Gemma-3-style model with Gemma 3's 262,144-token vocabulary
    (hidden 128, 2 layers, float32) and 8 x 256 seeded random tokens: its time against the dense forward, the
    reference's memory, and its KL against the exact full-vocabulary KL (float64 log-softmax, window by window)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=LARGE_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=128,
                              max_position_embeddings=512, initializer_range=0.2, final_logit_softcapping=None)
    model = Gemma3ForCausalLM(config).eval()  # initializer_range 0.2: peaked next-token distributions
    proxy = ProxySet(torch.randint(0, LARGE_VOCAB, (8, 256), generator=torch.Generator().manual_seed(0)))
    reference, ref_s = timed(lambda: dense_reference(model, proxy))
    dense_head = model.lm_head.weight.detach().clone()

    def hidden():
        with torch.inference_mode():
            return [model.model(input_ids=row[None], use_cache=False).last_hidden_state[0, :-1]
                    for row in proxy.input_ids]

    dense_hidden = hidden()

    def exact_kl() -> float:
        kl = 0.0
        with torch.inference_mode():
            for hd, h in zip(dense_hidden, hidden()):
                lp = torch.log_softmax((hd @ dense_head.T).double(), -1)
                lq = torch.log_softmax((h @ model.lm_head.weight.T).double(), -1)
                kl += float((lp.exp() * (lp - lq)).sum())
        return kl / proxy.predicted_tokens

    def forward():
        with torch.inference_mode():
            for row in proxy.input_ids:
                model(row[None, :])

    with torch.inference_mode():  # a "compressed" body: relative noise 0.3 on every down_proj
        for block in model.model.layers:
            w = block.mlp.down_proj.weight
            w.add_(0.3 * w.std() * torch.randn_like(w))
    floors, proxies = [], []
    forward()  # warm-up
    for _ in range(repeats):  # alternating, fastest of each kept (shared-machine noise)
        floors.append(timed(forward)[1])
        result, seconds = timed(lambda: proxy_eval(model, proxy, reference))
        proxies.append(seconds)
    kl, exact_body = result.metric("proxy", "kl"), exact_kl()
    scale = dense_head.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7  # the head compressed too: INT4 RTN per row
    model.lm_head.weight = torch.nn.Parameter((dense_head / scale).round().clamp(-8, 7) * scale)
    estimate, exact_head = proxy_eval(model, proxy, reference).metric("proxy", "kl"), exact_kl()
    started = time.perf_counter()  # the actors' path: the dense head weight given, the dense distribution recomputed
    recomputed = proxy_eval(model, proxy, reference, dense_head).metric("proxy", "kl")
    recompute_s = time.perf_counter() - started
    buckets_only = DenseReference({**reference.windows, "tail_embed": None})  # what a non-linear head gets
    bound = proxy_eval(model, proxy, buckets_only).metric("proxy", "kl")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied again
    tail = float(torch.cat(reference.windows["tail_mass"]).mean())
    floor, proxy_s, positions = min(floors), min(proxies), proxy.predicted_tokens
    print(f"tiny Gemma-3-style model, vocab {LARGE_VOCAB:,}, hidden 128, 2 layers, float32; 8 x 256 random tokens "
          f"({positions:,} positions), {threads} torch threads, fastest of {repeats} alternating runs")
    print(f"{'':48}{'seconds':>9}{'x floor':>9}")
    print(f"{'dense forward over the proxy tokens (floor)':48}{floor:9.2f}{1.0:9.2f}")
    print(f"{'proxy eval (KL + perplexity), body compressed':48}{proxy_s:9.2f}{proxy_s / floor:9.2f}   "
          f"target <= 1.3x -> {'met' if proxy_s <= 1.3 * floor else 'NOT met'}")
    print(f"dense reference: {reference.nbytes / 1e6:.1f} MB (top-{reference.top_k}; target < 100 MB -> "
          f"{'met' if reference.nbytes < 100e6 else 'NOT met'}), built in {ref_s:.1f} s; full-vocabulary "
          f"FP16 log-probabilities would be {positions * LARGE_VOCAB * 2 / 1e6:,.0f} MB")
    print(f"KL, body compressed (exact method): proxy {kl:.6f}, exact {exact_body:.6f} nats/token, "
          f"relative error {abs(kl - exact_body) / exact_body:.1e}")
    print(f"KL, head INT4 too, dense head weight given (as the actors do; {recompute_s:.2f} s, "
          f"{recompute_s / floor:.2f}x floor): proxy {recomputed:.6f}, exact {exact_head:.6f}, relative error "
          f"{abs(recomputed - exact_head) / exact_head:.1e}")
    print(f"KL, head INT4 too, no dense head weight (tail through the dense head; top-{reference.top_k}, mean tail "
          f"mass {tail:.3f}): proxy {estimate:.6f}, exact {exact_head:.6f}, relative error "
          f"{(estimate - exact_head) / exact_head:+.2%}; bucket lower bound alone {bound:.6f} "
          f"({(bound - exact_head) / exact_head:+.1%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-tau", action="store_true", help="only the timing comparison")
    parser.add_argument("--tau-limit", type=int, default=200, help="documents per lm-eval task for the tau")
    parser.add_argument("--repeats", type=int, default=3, help="timing repetitions (fastest kept)")
    parser.add_argument("--large-vocab", choices=("also", "only", "skip"), default="also",
                        help="the 262,144-token vocabulary section (before the SmolLM2 ones)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.large_vocab != "skip":
        large_vocab(args.threads, args.repeats)
        if args.large_vocab == "only":
            return 0
        print()
    model, tokenizer = load_model()
    names = linear_layer_names(model)
    proxy = ProxySet.build(tokenizer)
    applier = PlanApplier(model, tokenizer, CompressionSpec())
    reference = dense_reference(model, proxy, applier.cache)

    def forward():
        with torch.inference_mode():
            for row in proxy.input_ids:
                model(row[None, :])

    blocks = [n for n in names if n.startswith("model.layers.")]
    cached_plan = plan(blocks, (ATTN, lp(fmt="4", group=64, quant="gptq")),
                       (MLP, lp("2:4", "4", 64, prune="sparsegpt", quant="gptq")))
    applier.apply(cached_plan)  # fills the layer cache (once per cache)
    cold_plan = plan(blocks, ("", lp("4:8", "4")))

    def evaluate(a: PlanApplier, p: ModelPlan):
        report = a.apply(p)
        return report, proxy_eval(model, proxy, reference)

    # Alternate the three measurements and keep each one's fastest of --repeats (shared-machine noise).
    floors, cached_runs, cold_runs = [], [], []
    forward()  # warm-up
    for _ in range(args.repeats):
        applier.restore()
        floors.append(timed(forward)[1])
        (report_c, result_c), seconds = timed(lambda: evaluate(applier, cached_plan))
        cached_runs.append(seconds)
        applier.restore()  # the cold applier keeps the weights it finds as the dense ones
        with tempfile.TemporaryDirectory() as tmp:
            cold_applier = PlanApplier(model, tokenizer, CompressionSpec(),
                                       cache=CompressionCache(applier.cache.fingerprint, Path(tmp)))
            (report_x, result_x), seconds = timed(lambda: evaluate(cold_applier, cold_plan))
            cold_runs.append(seconds)
            cold_applier.restore()
    floor, cached, cold = min(floors), min(cached_runs), min(cold_runs)
    print(f"proxy set: {proxy.input_ids.shape[0]} x {proxy.input_ids.shape[1]} validation tokens, "
          f"{args.threads} torch threads, fastest of {args.repeats} alternating runs")
    print(f"{'':44}{'seconds':>9}{'x floor':>9}")
    print(f"{'dense forward over the proxy tokens (floor)':44}{floor:9.2f}{1.0:9.2f}")
    print(f"{'proxy eval, all layers cached':44}{cached:9.2f}{cached / floor:9.2f}   "
          f"apply {report_c.seconds:.2f} s, {report_c.count('cache')} layers loaded, KL {result_c.metric('proxy', 'kl'):.4f}")
    print(f"{'proxy eval, cold (magnitude 4:8 + RTN int4)':44}{cold:9.2f}{cold / floor:9.2f}   "
          f"apply {report_x.seconds:.2f} s, {report_x.count('computed')} layers computed, "
          f"KL {result_x.metric('proxy', 'kl'):.4f}")
    print(f"target: cached <= 1.5x floor -> {'met' if cached <= 1.5 * floor else 'NOT met'}")
    if args.skip_tau:
        return 0
    from scipy.stats import kendalltau

    tasks = (TaskSpec("shakespeare_lastword", "acc", args.tau_limit),
             TaskSpec("shakespeare_cloze", "acc_norm", args.tau_limit),
             TaskSpec("shakespeare_ppl", "word_perplexity", max(20, args.tau_limit // 4)))
    lm = TorchLM(model, tokenizer, batch_size=8, disable_tqdm=True)
    manager = task_manager(0)
    rows = []
    print(f"\n{'plan':32}{'KL':>9}{'proxy ppl':>11}{'accuracy':>10}{'word ppl':>10}{'s':>7}")
    for label, p in varied_plans(names).items():
        start = time.perf_counter()
        applier.apply(p)
        kl = proxy_eval(model, proxy, reference)
        full = full_eval(lm, tasks, manager)
        acc = (full.metric("shakespeare_lastword", "acc") + full.metric("shakespeare_cloze", "acc_norm")) / 2
        word_ppl = full.metric("shakespeare_ppl", "word_perplexity")
        rows.append((label, kl.metric("proxy", "kl"), kl.metric("proxy", "ppl"), acc, word_ppl))
        print(f"{label:32}{rows[-1][1]:9.4f}{rows[-1][2]:11.4g}{acc:10.3f}{word_ppl:10.4g}"
              f"{time.perf_counter() - start:7.0f}", flush=True)
    applier.restore()
    tau_acc = kendalltau([-r[1] for r in rows], [r[3] for r in rows]).statistic
    tau_ppl = kendalltau([r[1] for r in rows], [r[4] for r in rows]).statistic
    print(f"\nKendall tau over {len(rows)} plans: proxy (-KL) vs accuracy {tau_acc:.3f}; "
          f"proxy KL vs word perplexity {tau_ppl:.3f}  (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
