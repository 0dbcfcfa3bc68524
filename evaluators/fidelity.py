"""The proxy fidelity: how far a compressed model's next-token distribution moves from the dense model's.

On a fixed token set from the validation works (disjoint from the calibration works that
compression methods see, and from the test works the lm-eval tasks use):

* ``kl``: mean over predicted positions of KL(p_dense || p_compressed), nats per token
  (p_dense from the FP16-stored reference);
* ``ppl``: perplexity of the compressed model on the same tokens, exp(mean negative log-likelihood).

The dense model's log-probabilities are computed once per model and proxy set
(:func:`dense_reference`, cached on disk as FP16 when given the compression cache) and kept in
memory; each proxy evaluation is then one forward pass of the compressed model.

    proxy = ProxySet.build(tokenizer)
    reference = dense_reference(model, proxy, cache)     # before compressing
    result = proxy_eval(model, proxy, reference)         # EvalResult, fidelity "proxy"
    result.metric("proxy", "kl"), result.metric("proxy", "ppl")

The full fidelity, :func:`full_eval`, runs the spec's lm-eval tasks on the project's
:class:`~evaluators.lm.TorchLM` and returns the same :class:`EvalResult` type (fidelity ``"full"``).
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
    def key(self) -> str:
        """16 hex digits identifying the token set (cache key of the dense reference)."""
        from evaluators.compress.calibration import token_key

        return token_key(self.input_ids)

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


class DenseReference:
    """The dense model's next-token distributions on a proxy set, ready for KL against another model.

    ``log_probs``: per window, [seq_len - 1, vocab] FP16 log-probabilities (what is stored on disk).
    Kept in memory as float32 probabilities ``p`` with each position's ``sum p`` and ``sum p log p``,
    so that for a compressed model's logits ``z`` (log-probabilities ``z - logsumexp z``)
    ``KL = sum p log p - (p . z - logsumexp(z) * sum p)``: one dot product per position, and no
    log-softmax tensor of the compressed model is materialised.
    """

    def __init__(self, log_probs):
        import torch

        self.probs, self.mass, self.neg_entropy = [], [], []
        for lp in log_probs:
            lp32 = lp.float()
            p = lp32.exp()
            self.probs.append(p)
            self.mass.append(p.sum(-1))
            self.neg_entropy.append(float(torch.linalg.vecdot(p, lp32).sum()))

    def __len__(self) -> int:
        return len(self.probs)


def dense_reference(model, proxy: ProxySet, cache=None) -> DenseReference:
    """The dense model's next-token distributions on the proxy set (stored as FP16 log-probabilities).

    With ``cache`` (a :class:`~evaluators.compress.cache.CompressionCache` of this model) they are
    read from disk when an earlier run stored them, else computed and stored.
    """
    stored = cache.load_blob("reference", proxy.key) if cache is not None else None
    if stored is not None:
        return DenseReference(stored[0]["log_probs"].unbind(0))
    log_probs = [lp.half() for lp in _log_probs(model, proxy.input_ids)]
    if cache is not None:
        import torch

        cache.save_blob("reference", proxy.key, {"log_probs": torch.stack(log_probs)},
                        {"windows": str(len(log_probs))})
    return DenseReference(log_probs)


def proxy_eval(model, proxy: ProxySet, reference: DenseReference) -> EvalResult:
    """KL(dense || model) and perplexity of ``model`` on the proxy set (formulas in the module docstring)."""
    import torch

    start = time.perf_counter()
    kl_sum = nll_sum = 0.0
    with torch.inference_mode():
        for i, row in enumerate(proxy.input_ids):
            logits = model(row[None, :]).logits[0, :-1].float()
            lse = torch.logsumexp(logits, dim=-1)
            # p . z per position; vecdot accumulates accurately (a float32 bmm here is off by ~1e-3 nats/token)
            cross = torch.linalg.vecdot(reference.probs[i], logits) - lse * reference.mass[i]
            kl_sum += reference.neg_entropy[i] - float(cross.sum())
            nll_sum += float((lse - logits.gather(-1, row[1:, None])[:, 0]).sum())
    n = proxy.predicted_tokens
    metrics = {"proxy": {"kl": kl_sum / n, "ppl": float(torch.exp(torch.tensor(nll_sum / n)))}}
    return EvalResult(metrics=metrics, fidelity="proxy", tokens_evaluated=int(proxy.input_ids.numel()),
                      wall_time_s=time.perf_counter() - start, samples={"proxy": int(proxy.input_ids.shape[0])},
                      seed=proxy.seed)


def full_eval(lm, tasks, task_manager) -> EvalResult:
    """The full fidelity: every task of ``tasks`` (``TaskSpec``: name, metric, limit) through lm-eval on ``lm``."""
    import contextlib

    from evaluators.harness import run_tasks
    from evaluators.tasks import LOCAL_NAMES, offline_datasets

    start = time.perf_counter()
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, int] = {}
    tokens = 0
    version = ""
    # Local tasks read only local files: keep `datasets` from trying a hub.
    local = all(t.name in LOCAL_NAMES for t in tasks)
    with offline_datasets() if local else contextlib.nullcontext():
        for task in tasks:
            result = run_tasks(lm, [task.name], task_manager, limit=task.limit)
            metrics.update(result.metrics)
            samples.update(result.samples)
            tokens += result.tokens_evaluated
            version = result.lm_eval_version
    missing = [f"{t.name}.{t.metric}" for t in tasks if t.metric not in metrics.get(t.name, {})]
    if missing:
        available = {name: sorted(m) for name, m in metrics.items()}
        raise ValueError(f"tasks: metric {missing[0]} not reported by lm-eval; available: {available}")
    return EvalResult(metrics=metrics, fidelity="full", tokens_evaluated=tokens,
                      wall_time_s=time.perf_counter() - start, limit=None, lm_eval_version=version,
                      samples=samples)
