"""Compression transforms on small matrices, checked against brute-force references and hand-worked values."""

from __future__ import annotations

import itertools

import pytest
import torch

from dse.plan import LayerPlan, ModelPlan, Sparsity, WeightFormat
from evaluators.compress import (PlanApplier, PlanApplyError, compress_weight, nm_mask_magnitude, quantize_rtn,
                                 ternarize_absmean)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (3, 5), (1, 2)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    torch.manual_seed(n * 10 + m)
    w = torch.randn(6, m * 7)
    mask = nm_mask_magnitude(w, Sparsity(n, m))
    groups = mask.reshape(6, -1, m)
    assert (groups.sum(dim=2) == n).all()
    # brute force: in each group the kept set is the one with the largest total magnitude
    mag = w.abs().reshape(6, -1, m)
    for r, g in itertools.product(range(6), range(7)):
        best = max(itertools.combinations(range(m), n), key=lambda idx: mag[r, g, list(idx)].sum().item())
        assert set(torch.nonzero(groups[r, g]).flatten().tolist()) == set(best)


def test_nm_mask_partial_trailing_group():
    w = torch.tensor([[5.0, -1.0, 0.5, 3.0, 9.0, -2.0]])  # 2:4 -> one full group of 4, one group of 2
    mask = nm_mask_magnitude(w, Sparsity(2, 4))
    assert mask.tolist() == [[True, False, False, True, True, True]]


def test_rtn_hand_worked_group():
    # 4-bit, group of 4: maxq 15, scale = 2*max|w|/15 = 2*1.5/15 = 0.2, zero 8
    w = torch.tensor([[1.5, -0.31, 0.05, -1.5]])
    q = quantize_rtn(w, bits=4, group_size=4)
    # codes: round(w/0.2)+8 = 15.5->16 clamp 15, -1.55->-2 ->6, 0.25->0 ->8, -7.5->-8 ->0
    expected = torch.tensor([[7 * 0.2, -2 * 0.2, 0.0, -8 * 0.2]])
    assert torch.allclose(q, expected, atol=1e-6)


@pytest.mark.parametrize("bits,group", [(8, 32), (6, 16), (4, 64), (3, 128), (2, 8)])
def test_rtn_values_on_the_grid_of_each_group(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(5, 256)
    q = quantize_rtn(w, bits, group)
    maxq = 2**bits - 1
    for g in range(256 // group):
        block_w, block_q = w[:, g * group:(g + 1) * group], q[:, g * group:(g + 1) * group]
        scale = 2 * block_w.abs().amax(dim=1, keepdim=True) / maxq
        codes = block_q / scale + (maxq + 1) / 2
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().min() >= 0 and codes.round().max() <= maxq
        assert ((block_q - block_w).abs() <= scale * 0.5 + 1e-5).all()  # round-to-nearest: at most half a step


def test_rtn_keeps_pruned_zeros_and_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    layer = LayerPlan("x", Sparsity(2, 4), WeightFormat("4", 32))
    out = compress_weight(w, layer)
    mask = nm_mask_magnitude(w, Sparsity(2, 4))
    assert (out[~mask] == 0).all()
    errors = [((quantize_rtn(w, b, 32) - w) ** 2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_ternary_values_and_absmean_scale():
    w = torch.tensor([[0.9, -0.2, 0.05, -1.3], [0.4, 0.0, -0.6, 0.3]])
    gamma = w.abs().mean()  # 0.46875
    t = ternarize_absmean(w)
    assert set((t / gamma).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    expected = torch.tensor([[1, 0, 0, -1], [1, 0, -1, 1]]) * gamma
    assert torch.allclose(t, expected)


def test_ternary_with_nm_uses_kept_weights_for_the_scale():
    w = torch.tensor([[4.0, 0.1, -2.0, 0.2]])
    layer = LayerPlan("x", Sparsity(2, 4), WeightFormat("ternary"))
    out = compress_weight(w, layer)
    gamma = (4.0 + 2.0) / 2
    assert torch.allclose(out, torch.tensor([[gamma, 0.0, -gamma, 0.0]]))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_applier_restores_dense_and_unties_lm_head():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        dense_logits = model(ids).logits.clone()
    embedding = model.get_input_embeddings().weight.detach().clone()
    applier = PlanApplier(model)
    plan = ModelPlan((LayerPlan("lm_head", None, WeightFormat("4", 16)),
                      LayerPlan("model.layers.0.mlp.up_proj", Sparsity(2, 4), WeightFormat("8", 16))))
    applied = applier.apply(plan)
    assert applied == {"lm_head": "int4/g16", "model.layers.0.mlp.up_proj": "2:4 int8/g16"}
    assert torch.equal(model.get_input_embeddings().weight, embedding), "embeddings stay full precision"
    up = model.model.layers[0].mlp.up_proj.weight
    assert (up.reshape(up.shape[0], -1, 4) != 0).sum(dim=2).max() <= 2
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense_logits)
    applier.apply(ModelPlan())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits)


def test_applier_rejects_unknown_layers_and_methods():
    applier = PlanApplier(tiny_llama())
    with pytest.raises(PlanApplyError, match="not a linear layer"):
        applier.apply(ModelPlan((LayerPlan("model.layers.9.mlp.up_proj", Sparsity(2, 4)),)))
    with pytest.raises(PlanApplyError, match="not available yet"):
        applier.apply(ModelPlan((LayerPlan("lm_head", Sparsity(2, 4), prune="sparsegpt"),)))
