"""The proxy fidelity: how far a compressed model's next-token distribution moves from the dense model's.

On a fixed token set from the validation works (disjoint from the calibration works that
compression methods see, and from the test works the lm-eval tasks use):

* ``kl``: mean over predicted positions of KL(p_dense || p_compressed), nats per token
  (p_dense: the dense model's softmax);
* ``ppl``: perplexity of the compressed model on the same tokens, exp(mean negative log-likelihood).

The dense reference (:func:`dense_reference`, cached on disk when given the compression cache) is
computed once per model and proxy set and holds no vocabulary-sized tensor: per position, the
``top_k`` most probable tokens with their log-probabilities, the remaining (tail) mass, and the
tail's probability-weighted sum of output-embedding rows (``hidden`` floats). With it the KL is
exact while the compressed model keeps the dense output head (everything before the head may be
compressed), since then p . z = sum over the top tokens of p_i z_i + h . (tail embedding). When the
head itself is compressed the reference's dense final hidden states and the dense head weight (kept
by the plan applier) give the dense distribution again, a vocabulary block at a time, and the KL
stays exact; without the dense head weight the tail goes through the dense head (a measured error,
kept above the lower bound that collapses both distributions onto {top tokens, tail}); logits that
are not a linear head's output (softcapping) get that lower bound (see :func:`proxy_eval`). Each proxy
evaluation is one forward pass of the compressed model's body, its head applied a vocabulary
block at a time with a running logsumexp: no window x vocabulary tensor is held, and the cost
stays that of the dense forward (``bench/bench_eval.py``). Memory: about
``positions x (8 top_k + 8 hidden)`` bytes whatever the vocabulary (8 x 255 positions, k = 256,
hidden 640: 15 MB).

    proxy = ProxySet.build(tokenizer)
    reference = dense_reference(model, proxy, cache)     # before compressing
    result = proxy_eval(model, proxy, reference, applier.dense_output_head())   # EvalResult, fidelity "proxy"
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


REFERENCE_TOP_K = 256
"""Tokens per position whose dense log-probability the reference stores exactly (the rest is the tail)."""

REFERENCE_FORMAT = 4
"""Version of the stored reference's fields (part of its cache key; a stored blob of another version is recomputed)."""

_CHUNK_ELEMENTS = 1 << 21
"""Elements of one block of logits (positions x vocabulary slice; 8 MB in float32): no temporary grows with the
vocabulary, and blocks are large enough that per-operation thread wake-ups (OMP_WAIT_POLICY=PASSIVE, as in the
evaluator actors) stay small against the work (measured in bench/bench_eval.py: 2 MB blocks cost 1.29x the
dense forward there, 8 MB blocks 0.89x)."""

_HEAD_CHECK_ROWS = 64
"""Rows of the dense output embedding kept to tell whether the model's head is still the dense one."""

_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of families whose logits are not the head's output as is (softcapping, scaling)."""


def _linear_head(model):
    """The output embedding (``weight`` [vocab, hidden], optional ``bias``) when the model has one, else None."""
    import torch

    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    weight = getattr(head, "weight", None)
    return head if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _hidden(model, row):
    """[n, hidden] final hidden states (the head's input) of one window, predicting positions only."""
    return model.base_model(input_ids=row[None, :], use_cache=False).last_hidden_state[0, :-1]


def _vocab_blocks(head, n: int):
    """(start, weight block as float32, bias block or None) over the vocabulary, ``_CHUNK_ELEMENTS`` logits each."""
    weight, bias = head.weight, getattr(head, "bias", None)
    step = max(1, _CHUNK_ELEMENTS // max(1, n))
    for v in range(0, weight.shape[0], step):
        yield v, weight[v:v + step].float(), (bias[v:v + step].float() if bias is not None else None)


def _head_logits(h, head):
    """float32 logits ``h @ W.T + b`` [n, vocab], filled a vocabulary block at a time."""
    import torch

    h32 = h.float()
    out = h32.new_empty(h.shape[0], head.weight.shape[0])
    for v, w, b in _vocab_blocks(head, h.shape[0]):
        torch.matmul(h32, w.T, out=out[:, v:v + w.shape[0]])
        if b is not None:
            out[:, v:v + w.shape[0]] += b
    return out


def _block_index(ids, step: int, blocks: int):
    """For ids [n, r] and vocabulary blocks of ``step`` tokens: per block, (rows, columns in the block, flat
    positions in ids) of the ids that fall in it."""
    import torch

    flat = ids.reshape(-1)
    sorted_ids, order = flat.sort()
    bounds = torch.searchsorted(sorted_ids, torch.arange(blocks + 1, device=ids.device) * step).tolist()
    rows, cols = order // ids.shape[1], sorted_ids % step
    return [(rows[a:b], cols[a:b], order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _head_reduce(h, head, top_ids, targets, tail: bool, dense=None):
    """Of the logits z = h @ W.T + b (float32), computed a vocabulary block at a time and never held whole:
    (logsumexp z, z on ``top_ids``, z on ``targets``, log sum of exp z off ``top_ids`` or None, sum p z or None),
    per position. ``dense``: (dense head weight W_d [vocab, hidden], dense final hidden states h_d [n, hidden],
    their logsumexp [n]) to also return sum over the vocabulary of p z with p = softmax(h_d @ W_d.T + b)."""
    import torch

    n, k = top_ids.shape
    vocab = head.weight.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, n))
    blocks = -(-vocab // step)
    top_at, target_at = _block_index(top_ids, step, blocks), _block_index(targets[:, None], step, blocks)
    h32 = h.float()
    m = torch.full((n,), float("-inf"), device=h.device)
    total = torch.zeros(n, dtype=torch.float64, device=h.device)
    rest = torch.zeros_like(total) if tail else None
    z_top = torch.empty(n * k, device=h.device)
    z_target = torch.empty(n, device=h.device)
    cross = torch.zeros_like(total) if dense is not None else None
    for j, (v, w, b) in enumerate(_vocab_blocks(head, n)):
        z = torch.nn.functional.linear(h32, w, b)
        if dense is not None:  # the dense model's probabilities on this block, from its own hidden states
            w_dense, h_dense, lse_dense = dense
            z_dense = torch.nn.functional.linear(h_dense, w_dense[v:v + w.shape[0]].float(), b)
            cross += (z_dense.double().sub_(lse_dense[:, None]).exp_() * z).sum(-1)
            del z_dense
        rows, cols, at = top_at[j]
        z_top[at] = z[rows, cols]
        t_rows, t_cols, t_at = target_at[j]
        z_target[t_at] = z[t_rows, t_cols]
        new_m = torch.maximum(m, z.amax(-1))
        scale = (m - new_m).exp().double()
        z.sub_(new_m[:, None]).exp_()
        total = total * scale + z.sum(-1).double()
        if tail:
            z[rows, cols] = 0.0
            rest = rest * scale + z.sum(-1).double()
        m = new_m
    lse = m.double() + total.log()
    log_rest = m.double() + rest.log() if tail else None
    return lse, z_top.view(n, k).double(), z_target.double(), log_rest, cross


def _logits_reduce(logits, top_ids, targets, tail: bool):
    """What :func:`_head_reduce` returns, from a model's full logits [n, vocab] (a block of positions at a time)."""
    import torch

    n, vocab = logits.shape
    step = max(1, _CHUNK_ELEMENTS // vocab)
    parts = []
    for s in range(0, n, step):
        z = logits[s:s + step].double()
        lse = torch.logsumexp(z, dim=-1)
        rest = torch.logsumexp(z.scatter(-1, top_ids[s:s + step], float("-inf")), dim=-1) if tail else None
        parts.append((lse, z.gather(-1, top_ids[s:s + step]).double(),
                      z.gather(-1, targets[s:s + step, None])[:, 0].double(), rest))
    return tuple(torch.cat([p[i] for p in parts]) if parts[0][i] is not None else None for i in range(4)) + (None,)


class DenseReference:
    """The dense model's next-token distributions on a proxy set, in memory bounded whatever the vocabulary.

    Per window (n = seq_len - 1 predicted positions; p = the dense model's softmax, taken in float64 from its
    float32 logits; T = the ``top_k`` most probable tokens of a position, the tail is every other token):

    * ``top_ids`` [n, k] int32 and ``top_logp`` [n, k] float32: T and log p on T;
    * ``tail_mass`` [n] float64: P_tail = sum of p over the tail;
    * ``tail_embed`` [n, hidden] float32: sum over the tail of p_i W_i (W [vocab, hidden]: the dense output
      embedding) and ``tail_bias`` [n] (sum over the tail of p_i b_i, zero without a bias);
    * ``dense_hidden`` [n, hidden] float32 and ``dense_lse`` [n] float64: the dense final hidden states h_d and
      the logsumexp of their logits, so that p can be recomputed from the dense head weight;
    * ``mass`` [n] float64 (sum p, 1 up to rounding) and ``neg_entropy`` (sum over positions of sum p log p).

    ``tail_embed`` is present (``exact``) when the model's logits are its head applied to the final hidden
    states h (z = W h + b, nothing after: no softcapping); the logits are then taken as that product in
    float32. While a compressed model keeps the dense head (anything before it may change),
    KL(p || q) = sum p log p - sum p z + logsumexp(z) sum p with sum p z = sum_T p_i z_i + h . tail_embed +
    tail_bias: exact, and one logsumexp over the logits is all the vocabulary-wide work. With a compressed
    head and the dense head weight at hand, sum p z = sum over the vocabulary of softmax(W h_d + b) z, taken a
    vocabulary block at a time: exact too, for one more head pass. Otherwise (no dense head weight, or no such
    head) the KL is that of p and q collapsed onto the buckets {T, tail}, a lower bound of the exact KL
    (data-processing inequality), short of it by P_tail * KL(p | tail || q | tail).
    """

    FIELDS = ("top_ids", "top_logp", "tail_mass", "tail_embed", "tail_bias", "dense_hidden", "dense_lse", "mass",
              "neg_entropy")

    def __init__(self, windows: dict, head_ids=None, head_rows=None, head_bias=None):
        self.windows = windows  # field -> list with one tensor per window (None: not stored)
        self.head_ids, self.head_rows, self.head_bias = head_ids, head_rows, head_bias

    def __len__(self) -> int:
        return len(self.windows["top_ids"])

    @property
    def top_k(self) -> int:
        return int(self.windows["top_ids"][0].shape[-1])

    @property
    def exact(self) -> bool:
        """Whether the KL is exact for models that keep the dense head (see the class docstring)."""
        return self.windows.get("tail_embed") is not None

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held."""
        tensors = [t for values in self.windows.values() if values is not None for t in values]
        tensors += [t for t in (self.head_ids, self.head_rows, self.head_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def head_is_dense(self, model) -> bool:
        """Whether ``model``'s head still holds the dense rows sampled when the reference was built."""
        import torch

        head = _linear_head(model)
        if not self.exact or head is None:
            return False
        weight, bias = head.weight, getattr(head, "bias", None)
        ids = self.head_ids.to(weight.device)
        if weight.shape[1] != self.head_rows.shape[1] or not torch.equal(weight[ids].cpu(), self.head_rows.cpu()):
            return False
        if (bias is None) != (self.head_bias is None):
            return False
        return bias is None or torch.equal(bias[ids].cpu(), self.head_bias.cpu())

    def tensors(self) -> dict:
        """The reference as named tensors, stacked over windows (what the disk cache stores)."""
        import torch

        out = {k: torch.stack(v) for k, v in self.windows.items() if v is not None}
        for name, t in (("head_ids", self.head_ids), ("head_rows", self.head_rows), ("head_bias", self.head_bias)):
            if t is not None:
                out[name] = t
        return out

    @staticmethod
    def from_tensors(stored: dict) -> "DenseReference":
        windows = {k: (list(stored[k].unbind(0)) if k in stored else None) for k in DenseReference.FIELDS}
        return DenseReference(windows, stored.get("head_ids"), stored.get("head_rows"), stored.get("head_bias"))

    @staticmethod
    def compute(model, input_ids, top_k: int = REFERENCE_TOP_K) -> "DenseReference":
        """One dense forward pass per window; the log-probabilities are reduced a block of positions at a time."""
        import torch

        head = _linear_head(model)
        fused = (head is not None and model.base_model is not model
                 and not any(getattr(model.config, f, None) not in (None, 1, 1.0) for f in _POST_HEAD))
        fields: dict[str, list] = {k: [] for k in DenseReference.FIELDS}
        with torch.inference_mode():
            for window, row in enumerate(input_ids):
                if fused:
                    h = _hidden(model, row)
                    if window == 0:  # the model's logits must be its head's output, nothing after
                        logits = model(row[None, :]).logits[0, :-1].float()
                        ours = _head_logits(h, head)
                        tol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
                        fused = torch.allclose(ours, logits, rtol=tol, atol=tol * float(logits.abs().amax()))
                        del logits, ours
                if not fused:
                    logits = model(row[None, :]).logits[0, :-1]
                n, vocab = (h.shape[0], head.weight.shape[0]) if fused else logits.shape
                k = min(top_k, vocab)
                parts: dict[str, list] = {name: [] for name in DenseReference.FIELDS}
                step = max(1, 2 * _CHUNK_ELEMENTS // vocab)
                for s in range(0, n, step):
                    z = _head_logits(h[s:s + step], head) if fused else logits[s:s + step].float()
                    lp = torch.log_softmax(z.double(), dim=-1)  # float32 sums over a large vocabulary drift
                    if fused:
                        parts["dense_hidden"].append(h[s:s + step].float())
                        parts["dense_lse"].append(z[:, 0].double() - lp[:, 0])  # logsumexp z = z_0 - log p_0
                    del z
                    p = lp.exp()
                    top_logp, top_ids = lp.topk(k, dim=-1)
                    parts["neg_entropy"].append(torch.linalg.vecdot(p, lp))
                    del lp
                    parts["mass"].append(p.sum(-1))
                    p.scatter_(-1, top_ids, 0.0)  # p on the tail only
                    parts["tail_mass"].append(p.sum(-1))
                    p = p.float()
                    parts["top_ids"].append(top_ids.int())
                    parts["top_logp"].append(top_logp.float())
                    if fused:
                        embed = torch.zeros(p.shape[0], head.weight.shape[1], device=p.device)
                        bias = torch.zeros(p.shape[0], device=p.device)
                        for v, wb, bb in _vocab_blocks(head, p.shape[0]):
                            embed += p[:, v:v + wb.shape[0]] @ wb
                            if bb is not None:
                                bias += p[:, v:v + wb.shape[0]] @ bb
                        parts["tail_embed"].append(embed)
                        parts["tail_bias"].append(bias)
                for name, values in parts.items():
                    if values:
                        fields[name].append(torch.cat(values))
        windows = {k: (v if v and (fused or k not in ("tail_embed", "tail_bias", "dense_hidden", "dense_lse"))
                       else None) for k, v in fields.items()}
        head_ids = head_rows = head_bias = None
        if fused:
            weight, bias = head.weight, getattr(head, "bias", None)
            gen = torch.Generator().manual_seed(0)
            head_ids = torch.randperm(weight.shape[0], generator=gen)[:_HEAD_CHECK_ROWS]
            head_rows = weight[head_ids.to(weight.device)].detach().cpu().clone()
            head_bias = bias[head_ids.to(bias.device)].detach().cpu().clone() if bias is not None else None
        return DenseReference(windows, head_ids, head_rows, head_bias)


def dense_reference(model, proxy: ProxySet, cache=None, top_k: int = REFERENCE_TOP_K) -> DenseReference:
    """The dense model's next-token distributions on the proxy set, compactly (see :class:`DenseReference`).

    With ``cache`` (a :class:`~evaluators.compress.cache.CompressionCache` of this model) they are
    read from disk when an earlier run stored them, else computed and stored.
    """
    key = f"{proxy.key}-top{top_k}-f{REFERENCE_FORMAT}"
    stored = cache.load_blob("reference-topk", key) if cache is not None else None
    if stored is not None and stored[1].get("format") == str(REFERENCE_FORMAT):
        return DenseReference.from_tensors(stored[0])
    reference = DenseReference.compute(model, proxy.input_ids, top_k)
    if cache is not None:
        cache.save_blob("reference-topk", key, {k: v.cpu() for k, v in reference.tensors().items()},
                        {"windows": str(len(reference)), "top_k": str(top_k), "format": str(REFERENCE_FORMAT)})
    return reference


def proxy_eval(model, proxy: ProxySet, reference: DenseReference, dense_head=None) -> EvalResult:
    """KL(dense || model) and perplexity of ``model`` on the proxy set, in nats per predicted token.

    ``dense_head``: the dense weight [vocab, hidden] of the model's output head when the plan compressed it
    (:meth:`~evaluators.compress.PlanApplier.dense_output_head`; None when the head is dense). Per position,
    with the compressed model's logits z = W' h + b' (log q = z - logsumexp z):

    * the head is the dense one (W' = W): the exact KL (:class:`DenseReference`);
    * the head is compressed and ``dense_head`` given: the exact KL, the dense distribution recomputed from
      the reference's dense hidden states a vocabulary block at a time (one more head pass);
    * the head is linear but compressed (W' != W) and no ``dense_head``: per window, the larger of the bucketed lower bound
      sum_T p_i log(p_i / q_i) + P_tail log(P_tail / Q_tail) and the estimate that takes the tail's
      sum p_i z_i through the dense head (h . tail_embed), off by sum over the tail of p_i (W'_i - W_i) . h
      (SmolLM2-135M, k = 256: about 3e-4 nats/token with an INT8 head, 1e-3 with INT4, tests/test_fidelity.py);
    * the logits are not a linear head's output (e.g. softcapped): the bucketed lower bound.

    The perplexity is exact: exp of the mean over positions of logsumexp(z) - z[next token]. With a linear
    head the logits are reduced a vocabulary block at a time (no window-by-vocabulary tensor is held).
    """
    import torch

    start = time.perf_counter()
    kl_sum = nll_sum = 0.0
    head = _linear_head(model)
    fused = reference.exact and head is not None and head.weight.shape[1] == reference.windows["tail_embed"][0].shape[1]
    exact = fused and reference.head_is_dense(model)
    recompute = (fused and not exact and dense_head is not None and reference.windows.get("dense_hidden") is not None
                 and tuple(dense_head.shape) == tuple(head.weight.shape))
    w = reference.windows
    with torch.inference_mode():
        for i, row in enumerate(proxy.input_ids):
            if fused:
                h = _hidden(model, row)
                dev = h.device
            else:
                logits = model(row[None, :]).logits[0, :-1]
                dev = logits.device
            top_ids, top_logp = w["top_ids"][i].to(dev).long(), w["top_logp"][i].to(dev).double()
            targets = row[1:].to(dev)
            if fused:
                dense = ((dense_head.to(dev), w["dense_hidden"][i].to(dev), w["dense_lse"][i].to(dev).double())
                         if recompute else None)
                lse, z_top, z_target, log_rest, cross = _head_reduce(h, head, top_ids, targets,
                                                                     tail=not (exact or recompute), dense=dense)
            else:
                lse, z_top, z_target, log_rest, cross = _logits_reduce(logits, top_ids, targets, tail=True)
                del logits
            nll_sum += float((lse - z_target).sum())
            p_top = top_logp.exp()
            kl = None
            if fused:  # sum p log p - sum p z + logsumexp(z) sum p (the tail's sum p z through the dense head)
                if cross is None:
                    tail = torch.linalg.vecdot(h.float(), w["tail_embed"][i].to(dev)).double()
                    cross = (p_top * z_top).sum(-1) + tail + w["tail_bias"][i].to(dev).double()
                kl = w["neg_entropy"][i].to(dev) - cross + lse * w["mass"][i].to(dev)
            if not (exact or recompute):  # the bucketed lower bound
                p_tail = w["tail_mass"][i].to(dev)
                # log Q_tail floored at -100 (float32 underflow): the bound only loosens
                tail_term = p_tail * (p_tail.clamp_min(1e-300).log() - (log_rest - lse).clamp_min(-100.0))
                bound = (p_top * (top_logp - z_top + lse[:, None])).sum(-1) + torch.where(p_tail > 0, tail_term, 0.0)
                kl = bound.sum() if kl is None else torch.maximum(kl.sum(), bound.sum())
            kl_sum += float(kl.sum())
    n = proxy.predicted_tokens
    metrics = {"proxy": {"kl": kl_sum / n, "ppl": float(torch.exp(torch.tensor(nll_sum / n)))}}
    return EvalResult(metrics=metrics, fidelity="proxy", tokens_evaluated=int(proxy.input_ids.numel()),
                      wall_time_s=time.perf_counter() - start, samples={"proxy": int(proxy.input_ids.shape[0])},
                      seed=proxy.seed)


def full_eval(lm, tasks, task_manager, progress=None) -> EvalResult:
    """The full fidelity: every task of ``tasks`` (``TaskSpec``: name, metric, limit) through lm-eval on ``lm``.
    ``progress``, when given, is called with one line as each task starts (``full: task 1/2 NAME (limit 12)``)."""
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
        for i, task in enumerate(tasks, 1):
            if progress:
                progress(f"full: task {i}/{len(tasks)} {task.name} "
                         f"({'all documents' if task.limit is None else f'limit {task.limit}'})")
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
