"""The proxy fidelity: how far a compressed model's next-token distribution moves from the dense model's.

On a fixed token set from the validation works (disjoint from the calibration works that
compression methods see, and from the test works the lm-eval tasks use):

* ``kl``: mean over predicted positions of KL(p_dense || p_compressed), nats per token;
* ``ppl``: perplexity of the compressed model on the same tokens, exp(mean negative log-likelihood).

The dense model's log-probabilities are computed once (:func:`dense_reference`) and kept as
FP16 in memory; each proxy evaluation is then one forward pass of the compressed model.

    proxy = ProxySet.build(tokenizer)
    reference = dense_reference(model, proxy)            # before compressing
    result = proxy_eval(model, proxy, reference)         # EvalResult, fidelity "proxy"
    result.metric("proxy", "kl"), result.metric("proxy", "ppl")
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from evaluators.corpus import token_windows
from evaluators.harness import EvalResult

PROXY_WINDOWS = 8
PROXY_SEQ_LEN = 256
"""Default proxy set: 8 windows of 256 tokens (2,040 predicted positions)."""


@dataclass(frozen=True)
class ProxySet:
    """``input_ids``: a [windows, seq_len] LongTensor of validation-split tokens (seeded, fixed)."""

    input_ids: "object"
    split: str = "validation"
    seed: int = 0

    @property
    def predicted_tokens(self) -> int:
        """Positions with a next-token prediction: windows * (seq_len - 1)."""
        windows, seq_len = self.input_ids.shape
        return windows * (seq_len - 1)

    @staticmethod
    def build(tokenizer, windows: int = PROXY_WINDOWS, seq_len: int = PROXY_SEQ_LEN, seed: int = 0) -> "ProxySet":
        import torch

        ids = token_windows(tokenizer, windows, seq_len, split="validation", seed=seed)
        return ProxySet(torch.tensor(ids, dtype=torch.long), "validation", seed)


def _log_probs(model, input_ids):
    """[windows, seq_len - 1, vocab] float32 log-probabilities of the next token, one window at a time."""
    import torch

    out = []
    with torch.inference_mode():
        for row in input_ids:
            logits = model(row[None, :]).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def dense_reference(model, proxy: ProxySet):
    """The dense model's next-token log-probabilities on the proxy set, FP16, per window."""
    return [lp.half() for lp in _log_probs(model, proxy.input_ids)]


def proxy_eval(model, proxy: ProxySet, reference) -> EvalResult:
    """KL(dense || model) and perplexity of ``model`` on the proxy set (formulas in the module docstring)."""
    import torch

    start = time.perf_counter()
    kl_sum = nll_sum = 0.0
    for row, ref, lp in zip(proxy.input_ids, reference, _log_probs(model, proxy.input_ids)):
        ref = ref.float()
        kl_sum += float((ref.exp() * (ref - lp)).sum())
        nll_sum -= float(lp.gather(-1, row[1:, None]).sum())
    n = proxy.predicted_tokens
    metrics = {"proxy": {"kl": kl_sum / n, "ppl": float(torch.exp(torch.tensor(nll_sum / n)))}}
    return EvalResult(metrics=metrics, fidelity="proxy", tokens_evaluated=int(proxy.input_ids.numel()),
                      wall_time_s=time.perf_counter() - start, samples={"proxy": int(proxy.input_ids.shape[0])},
                      seed=proxy.seed)
