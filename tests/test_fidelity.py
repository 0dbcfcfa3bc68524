"""The proxy fidelity on the default model: KL against the dense model and perplexity.

References: the dense model against itself has KL 0 (up to the FP16 storage of the reference);
perplexity equals exp of the mean cross-entropy transformers itself computes (``labels=input_ids``);
pruning every MLP layer 2:4 moves the distribution (KL > 0) and raises perplexity.
"""

from __future__ import annotations

import math

import pytest
import torch

from dse.plan import LayerPlan, ModelPlan, Sparsity
from evaluators.compress import PlanApplier
from evaluators.compress.cache import CompressionCache
from evaluators.corpus import split_works
from evaluators.fidelity import ProxySet, dense_reference, proxy_eval
from evaluators.models import linear_layer_names, load_model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer = load_model()
    proxy = ProxySet.build(tokenizer, windows=2, seq_len=64)
    return model, proxy, dense_reference(model, proxy)


def test_proxy_set_comes_from_validation_works_only(setup):
    _, proxy, _ = setup
    splits = split_works()
    assert proxy.split == "validation" and set(splits["validation"]).isdisjoint(splits["calibration"])
    assert tuple(proxy.input_ids.shape) == (2, 64) and proxy.predicted_tokens == 126


def test_dense_model_against_itself(setup):
    model, proxy, reference = setup
    result = proxy_eval(model, proxy, reference)
    assert result.fidelity == "proxy" and result.tokens_evaluated == 128
    assert abs(result.metric("proxy", "kl")) < 1e-3  # FP16 reference rounding only
    with torch.inference_mode():
        losses = [float(model(row[None], labels=row[None]).loss) for row in proxy.input_ids]
    expected = math.exp(sum(losses) / len(losses))  # equal window lengths: mean of means = overall mean
    assert result.metric("proxy", "ppl") == pytest.approx(expected, rel=1e-4)


def test_pruning_moves_the_distribution(setup):
    model, proxy, reference = setup
    dense = proxy_eval(model, proxy, reference)
    mlp = [name for name in linear_layer_names(model) if ".mlp." in name]
    applier = PlanApplier(model)
    applier.apply(ModelPlan(layers=tuple(LayerPlan(name, Sparsity(2, 4)) for name in mlp)))
    try:
        pruned = proxy_eval(model, proxy, reference)
    finally:
        applier.restore()
    print(f"dense kl {dense.metric('proxy', 'kl'):.4f} ppl {dense.metric('proxy', 'ppl'):.2f}; "
          f"2:4 MLP kl {pruned.metric('proxy', 'kl'):.4f} ppl {pruned.metric('proxy', 'ppl'):.2f}")
    assert pruned.metric("proxy", "kl") > 0.05
    assert pruned.metric("proxy", "ppl") > dense.metric("proxy", "ppl")
    assert proxy_eval(model, proxy, reference).metric("proxy", "kl") < 1e-3  # restored


def test_dense_reference_is_cached_on_disk(setup, tmp_path):
    model, proxy, reference = setup
    cache = CompressionCache("fp", tmp_path)
    first = dense_reference(model, proxy, cache)
    stored = cache.load_blob("reference", proxy.key)[0]["log_probs"]
    with torch.inference_mode():  # the stored reference is what the model computes (FP16)
        expected = torch.log_softmax(model(proxy.input_ids[:1]).logits[0, :-1].float(), dim=-1).half()
    assert torch.equal(stored[0], expected)
    second = dense_reference(torch.nn.Identity(), proxy, cache)  # no model call: read from disk
    for ref in (second, reference):
        assert all(torch.equal(a, b) for a, b in zip(first.probs, ref.probs))
    assert ProxySet.build(load_model()[1], windows=2, seq_len=64).key == proxy.key  # the same tokens, same key


def test_kl_equals_the_direct_formula(setup):
    """KL from the reference's dot-product form equals sum p (log p - log q) on log-softmax tensors."""
    model, proxy, reference = setup
    with torch.inference_mode():  # the dense reference as stored: FP16 log-probabilities
        dense = [torch.log_softmax(model(row[None]).logits[0, :-1].float(), dim=-1).half().double()
                 for row in proxy.input_ids]
    applier = PlanApplier(model)
    mlp = [name for name in linear_layer_names(model) if ".mlp." in name]
    applier.apply(ModelPlan(layers=tuple(LayerPlan(name, Sparsity(2, 4)) for name in mlp)))
    try:
        result = proxy_eval(model, proxy, reference)
        with torch.inference_mode():
            kl = 0.0
            for ref, row in zip(dense, proxy.input_ids):
                lp = torch.log_softmax(model(row[None]).logits[0, :-1].double(), dim=-1)
                kl += float((ref.exp() * (ref - lp)).sum())
    finally:
        applier.restore()
    assert result.metric("proxy", "kl") == pytest.approx(kl / proxy.predicted_tokens, rel=1e-4)
