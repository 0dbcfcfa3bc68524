"""The proxy fidelity on tiny randomly initialised models, down to Gemma 3's 262,144-token vocabulary.

References (computed here the slow way, one window at a time): the exact full-vocabulary KL
sum p (log p - log q) and the perplexity from float64 log-softmax of the head's logits
(``h @ W.T + b``, float32, the definition the proxy uses) and of the model's own logits.
Checked: the KL is exact while the head is dense (float32 and bfloat16, with and without a head
bias, cpu and cuda where present); the vocabulary blocks do not change the result; the reference's
memory does not grow with the vocabulary; with a compressed head or softcapped logits the bucketed
KL is a lower bound of the exact KL short of it by exactly P_tail * KL(p | tail || q | tail).
"""

from __future__ import annotations

import math

import pytest
import torch

import evaluators.fidelity as fidelity
from evaluators.fidelity import DenseReference, ProxySet, dense_reference, proxy_eval

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_llama(vocab: int = 3000, dtype=torch.float32, bias: bool = False, device: str = "cpu", layers: int = 2):
    """A Llama-architecture causal LM, hidden 32; initializer_range 0.2 gives peaked next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=0.2, tie_word_embeddings=not bias)
    model = LlamaForCausalLM(config)
    if bias:
        model.lm_head = torch.nn.Linear(32, vocab, bias=True)
        torch.nn.init.normal_(model.lm_head.weight, std=0.2)
        torch.nn.init.normal_(model.lm_head.bias, std=1.0)
    return model.to(device=device, dtype=dtype).eval()


def proxy_of(vocab: int, windows: int = 3, seq_len: int = 40, device: str = "cpu") -> ProxySet:
    ids = torch.randint(0, vocab, (windows, seq_len), generator=torch.Generator().manual_seed(1))
    return ProxySet(ids.to(device))


def head_log_probs(model, row):
    """float64 log-softmax of the head's float32 logits h @ W.T + b, [seq_len - 1, vocab]."""
    head = model.get_output_embeddings()
    with torch.inference_mode():
        h = model.base_model(input_ids=row[None], use_cache=False).last_hidden_state[0, :-1].float()
        z = h @ head.weight.float().T + (head.bias.float() if head.bias is not None else 0.0)
    return torch.log_softmax(z.double(), -1)


def model_log_probs(model, row):
    with torch.inference_mode():
        return torch.log_softmax(model(row[None]).logits[0, :-1].double(), -1)


def exact(dense, model, proxy, log_probs=head_log_probs):
    """(exact KL, perplexity) of ``model`` against the dense log-probabilities ``dense`` (per window)."""
    kl = nll = 0.0
    for lp, row in zip(dense, proxy.input_ids):
        lq = log_probs(model, row)
        kl += float((lp.exp() * (lp - lq)).sum())
        nll -= float(lq.gather(-1, row[1:, None])[:, 0].sum())
    n = proxy.predicted_tokens
    return kl / n, math.exp(nll / n)


def perturb_mlp(model, scale: float = 0.3):
    """A stand-in for compression before the head: relative noise on every MLP down projection."""
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            noise = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
            w.add_(scale * w.float().std().to(w.dtype) * noise)


def int4_head(model):
    """The head quantized INT4 round-to-nearest per row (untied from the embedding), as a compressed head."""
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
    head.weight = torch.nn.Parameter(((w / scale).round().clamp(-8, 7) * scale).to(head.weight.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_kl_is_exact_while_the_head_is_dense(device, dtype, bias):
    model = tiny_llama(dtype=dtype, bias=bias, device=device)
    proxy = proxy_of(3000, device=device)
    reference = dense_reference(model, proxy)
    assert reference.exact and reference.head_is_dense(model)
    dense = [head_log_probs(model, row) for row in proxy.input_ids]
    itself = proxy_eval(model, proxy, reference)
    assert abs(itself.metric("proxy", "kl")) < 1e-6
    perturb_mlp(model)
    result = proxy_eval(model, proxy, reference)
    kl, ppl = exact(dense, model, proxy)
    print(f"{device} {dtype} bias={bias}: proxy KL {result.metric('proxy', 'kl'):.8f}, exact {kl:.8f}")
    assert kl > 1e-3
    assert result.metric("proxy", "kl") == pytest.approx(kl, rel=1e-5)
    assert result.metric("proxy", "ppl") == pytest.approx(ppl, rel=1e-6)
    # Against the model's own logits (bfloat16: rounded to 8 bits), the same within that rounding.
    own_kl, own_ppl = exact(dense, model, proxy, model_log_probs)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert result.metric("proxy", "kl") == pytest.approx(own_kl, rel=tolerance)
    assert result.metric("proxy", "ppl") == pytest.approx(own_ppl, rel=tolerance)


def test_vocabulary_blocks_do_not_change_the_result(monkeypatch):
    model = tiny_llama()
    proxy = proxy_of(3000)
    reference = dense_reference(model, proxy)
    with monkeypatch.context() as patch:
        patch.setattr(fidelity, "_CHUNK_ELEMENTS", 97)  # blocks of 2 tokens x 39 positions, a ragged last block
        blocked = dense_reference(model, proxy)
    for name, a in reference.tensors().items():
        b = blocked.tensors()[name]
        assert torch.equal(a, b) if name in ("top_ids", "head_ids", "head_rows") else torch.allclose(a, b, rtol=1e-5)
    perturb_mlp(model)
    expected = proxy_eval(model, proxy, reference).metrics["proxy"]
    monkeypatch.setattr(fidelity, "_CHUNK_ELEMENTS", 97)
    got = proxy_eval(model, proxy, blocked).metrics["proxy"]
    assert got["kl"] == pytest.approx(expected["kl"], rel=1e-6)
    assert got["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)


def test_reference_memory_does_not_grow_with_the_vocabulary():
    proxy = proxy_of(1024)  # token ids valid in both vocabularies
    small, large = (dense_reference(tiny_llama(vocab, layers=1), proxy) for vocab in (1024, 262_144))
    assert large.nbytes == small.nbytes
    positions, k, hidden = proxy.predicted_tokens, fidelity.REFERENCE_TOP_K, 32
    # ids, log p, tail mass, tail embed, bias, dense hidden, dense logsumexp, mass, H
    per_position = 4 * k + 4 * k + 8 + 4 * hidden + 4 + 4 * hidden + 8 + 8 + 8
    assert large.nbytes <= positions * per_position + 64 * hidden * 4 + 64 * 8
    print(f"reference: {large.nbytes / 1e6:.2f} MB for {positions} positions at vocab 262,144 "
          f"(full FP16 log-probabilities: {positions * 262_144 * 2 / 1e6:.0f} MB)")


def bucket_gap(dense, model, proxy, reference):
    """sum over positions of P_tail * KL(p | tail || q | tail), per predicted token."""
    gap = 0.0
    for i, (lp, row) in enumerate(zip(dense, proxy.input_ids)):
        lq = head_log_probs(model, row)
        tail = torch.ones_like(lp, dtype=torch.bool).scatter_(-1, reference.windows["top_ids"][i].long(), False)
        lp_t = torch.where(tail, lp, -math.inf)
        lq_t = torch.where(tail, lq, -math.inf)
        p_tail = lp_t.logsumexp(-1, keepdim=True)
        cond_p, cond_q = lp_t - p_tail, lq_t - lq_t.logsumexp(-1, keepdim=True)
        inner = torch.where(tail, cond_p.exp() * (cond_p - cond_q), 0.0).sum(-1)
        gap += float((p_tail[:, 0].exp() * inner).sum())
    return gap / proxy.predicted_tokens


def test_compressed_head_bound_and_estimate():
    """Head INT4: the bucketed KL (forced by dropping the tail embedding) is a lower bound short of the exact KL by
    P_tail * KL(tail | tail); the proxy's value (max of the bound and the dense-head tail estimate) is close."""
    model = tiny_llama()
    proxy = proxy_of(3000)
    reference = dense_reference(model, proxy, top_k=64)
    dense = [head_log_probs(model, row) for row in proxy.input_ids]
    perturb_mlp(model)
    dense_weight = model.get_output_embeddings().weight.detach().clone()
    int4_head(model)
    assert not reference.head_is_dense(model)
    kl, ppl = exact(dense, model, proxy)
    buckets_only = DenseReference({**reference.windows, "tail_embed": None, "tail_bias": None})
    bound = proxy_eval(model, proxy, buckets_only).metric("proxy", "kl")
    result = proxy_eval(model, proxy, reference)
    recomputed = proxy_eval(model, proxy, reference, dense_weight)  # exact with the dense head weight
    gap = bucket_gap(dense, model, proxy, reference)
    tail = float(torch.cat(reference.windows["tail_mass"]).mean())
    print(f"head int4, top-64 (mean tail mass {tail:.3f}): exact {kl:.6f}, bound {bound:.6f} "
          f"({(kl - bound) / kl:.1%} below), proxy {result.metric('proxy', 'kl'):.6f} "
          f"({(result.metric('proxy', 'kl') - kl) / kl:+.2%})")
    assert bound <= kl and kl - bound == pytest.approx(gap, rel=1e-6, abs=1e-12)
    assert bound <= result.metric("proxy", "kl") and result.metric("proxy", "kl") == pytest.approx(kl, rel=0.05)
    assert result.metric("proxy", "ppl") == pytest.approx(ppl, rel=1e-6)  # perplexity stays exact
    assert recomputed.metric("proxy", "kl") == pytest.approx(kl, rel=1e-5)


def test_softcapped_logits_fall_back_to_the_bound():
    """Gemma 3 with final-logit softcapping: logits are not the head's output, so no tail embedding; the KL is the
    bucketed lower bound (from the model's own logits) and the perplexity exact."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              max_position_embeddings=128, initializer_range=0.2, final_logit_softcapping=5.0)
    model = Gemma3ForCausalLM(config).eval()
    proxy = proxy_of(3000)
    reference = dense_reference(model, proxy)
    assert not reference.exact
    dense = [model_log_probs(model, row) for row in proxy.input_ids]
    assert abs(proxy_eval(model, proxy, reference).metric("proxy", "kl")) < 1e-9
    perturb_mlp(model)
    result = proxy_eval(model, proxy, reference)
    kl, ppl = exact(dense, model, proxy, model_log_probs)
    print(f"softcapped: exact {kl:.6f}, bound {result.metric('proxy', 'kl'):.6f}")
    assert 0 < result.metric("proxy", "kl") <= kl
    assert result.metric("proxy", "ppl") == pytest.approx(ppl, rel=1e-6)


def test_reference_round_trips_through_the_cache(tmp_path):
    from evaluators.compress.cache import CompressionCache

    model = tiny_llama()
    proxy = proxy_of(3000)
    cache = CompressionCache("fp", tmp_path)
    first = dense_reference(model, proxy, cache)
    second = dense_reference(torch.nn.Identity(), proxy, cache)  # read from disk: no model call
    assert first.tensors().keys() == second.tensors().keys()
    assert all(torch.equal(a, b) for a, b in zip(first.tensors().values(), second.tensors().values()))
    perturb_mlp(model)
    assert proxy_eval(model, proxy, second).metrics == proxy_eval(model, proxy, first).metrics
