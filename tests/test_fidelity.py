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
