"""The project's lm-evaluation-harness model class: an in-memory torch causal LM.

:class:`TorchLM` wraps any ``transformers`` causal LM instance (possibly with
compressed / modified weights) and its tokenizer, so ``lm_eval.simple_evaluate``
can score it without reloading anything from disk or the hub.

It is written to give the same numbers as lm-eval's own ``HFLM`` on the same
model (``tests/test_lm_equivalence.py`` checks this to 1e-4):

* tokenisation is HFLM's: ``tok_encode`` uses the tokenizer's own
  ``add_special_tokens`` default unless ``add_bos_token`` is given, and
  switches special tokens off when the text already starts with the prefix
  token; ``TemplateLM._encode_pair`` moves trailing context spaces into the
  continuation and splits ``encode(context + continuation)``; an empty
  context becomes ``[prefix_token_id]`` (BOS, else EOS);
* a request longer than ``max_length + 1`` tokens is truncated from the left;
* rolling log-likelihoods use ``lm_eval.utils.get_rolling_token_windows`` with
  the prefix token and ``context_len=1`` (disjoint windows);
* requests are sorted longest first and batched with ``lm_eval.models.utils.Collator``
  (one-token continuations sharing a context are scored from one row), scored
  right-padded without an attention mask (causal, so padding cannot leak);
* ``generate_until`` is greedy with lm-eval's stop-sequence handling
  (``until`` plus the EOS string, cut at the first stop string).

It is faster than HFLM for scoring because it asks the model only for the
logits of the positions it scores (``logits_to_keep``) and applies the
log-softmax to those rows only. Rolling windows of all documents are sorted and
batched together (HFLM batches them in document order), which changes batch
composition and so float rounding, not the result.

Known, deliberate difference: when several requests share
``context + continuation[:-1]`` but have continuations of different lengths
(different context/continuation splits of the same text), HFLM gathers the
shorter continuation's log-probs from the *first* positions of the shared
logits; this class uses the trailing positions, which are the ones that
predict that continuation.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval / HFLM default
DEFAULT_LOGITS_BUDGET_BYTES = 2 * 1024**3  # split a batch's forward when its logits would exceed this


class TorchLM(TemplateLM):
    """lm-eval model backed by an in-memory ``transformers`` causal LM.

    Args:
        model: a causal LM (``transformers.PreTrainedModel`` or anything whose
            ``forward(input_ids=...)`` returns an object with ``.logits``).
            It is put in eval mode and moved to ``device``.
        tokenizer: the model's ``transformers`` tokenizer. Not modified.
        batch_size: requests (or rolling windows, or prompts) per forward pass.
        max_length: longest sequence fed to the model; ``None`` resolves it as
            HFLM does (``n_positions`` / ``max_position_embeddings`` / ``n_ctx``
            of the config, then the tokenizer's ``model_max_length``, then 2048).
        device: torch device for the inputs (and the model).
        max_gen_toks: default generation budget when a request does not set one.
        add_bos_token: as HFLM's ``add_bos_token``: ``None`` keeps the tokenizer's
            default, ``True``/``False`` forces ``add_special_tokens``.
        prefix_token_id: conditioning token for empty contexts and the first
            rolling window; ``None`` means BOS, else EOS (HFLM's rule).
        logits_cache: score one-token continuations that share a context from
            a single row (HFLM's ``logits_cache``).
        softmax_dtype: dtype of the log-softmax (``None``: the logits' dtype, as HFLM).
        disable_tqdm: never show progress bars (lm-eval calls the request
            methods without ``disable_tqdm``; set this in workers).
        use_kv_cache: generate with the model's KV cache; ``False`` re-runs the
            whole sequence per new token (for models whose modules cannot cache).
            A model holding a recurrent token mixer (``is_recurrent_mixer``) is always
            decoded that way, one unpadded row at a time.
        max_logits_bytes: split a batch's forward into row groups when its
            float logits would exceed this many bytes.

    Attributes:
        tokens_scored: tokens passed through the model (padding excluded),
            accumulated over all calls; reset it with :meth:`reset_counters`.
        forward_calls: model forward passes made.
    """

    backend = "causal"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        *,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        logits_cache: bool = True,
        softmax_dtype: torch.dtype | None = None,
        disable_tqdm: bool = False,
        use_kv_cache: bool = True,
        max_logits_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r} ('auto' is not supported)")
            batch_size = int(batch_size)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length: expected a positive integer or None, got {max_length!r}")
        if tokenizer is None:
            raise ValueError("tokenizer: a transformers tokenizer is required")

        self._device = torch.device(device)
        self._model = model
        if isinstance(model, torch.nn.Module):
            model.eval()
            try:
                first = next(model.parameters())
            except StopIteration:
                first = None
            if first is not None and first.device != self._device:
                model.to(self._device)
        self._config = getattr(model, "config", None)
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.logits_cache = logits_cache
        self.softmax_dtype = softmax_dtype
        self.disable_tqdm = disable_tqdm
        self.use_kv_cache = use_kv_cache
        self.max_logits_bytes = int(max_logits_bytes)
        self.tokens_scored = 0
        self.forward_calls = 0

        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "logits_to_keep" in params:
            self._keep_kwarg: str | None = "logits_to_keep"
        elif "num_logits_to_keep" in params:
            self._keep_kwarg = "num_logits_to_keep"
        else:
            self._keep_kwarg = None
        self._accepts_use_cache = "use_cache" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

        eos_ids: set[int] = set()
        if tokenizer.eos_token_id is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        gen_cfg = getattr(model, "generation_config", None)
        cfg_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if isinstance(cfg_eos, int):
            eos_ids.add(cfg_eos)
        elif isinstance(cfg_eos, (list, tuple)):
            eos_ids.update(int(t) for t in cfg_eos)
        self._stop_token_ids = eos_ids
        # Left padding for generation never reaches the model's outputs (masked), any valid id does.
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._gen_pad_id = int(pad)

    # ------------------------------------------------------------------ properties

    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._config

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self._config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def reset_counters(self) -> None:
        """Zero :attr:`tokens_scored` and :attr:`forward_calls`."""
        self.tokens_scored = 0
        self.forward_calls = 0

    def get_model_info(self) -> dict:
        """Model facts for lm-eval's results ``config`` (no network access)."""
        model = self._model
        n_params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else -1
        return {
            "model_num_parameters": n_params,
            "model_dtype": str(getattr(model, "dtype", "")),
            "model_class": type(model).__name__,
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------------ tokenisation

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs,
    ) -> list[int]:
        """Encode as HFLM does (see the module docstring)."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def _encode_prompts(self, strings: list[str]) -> list[list[int]]:
        """Encode generation prompts as HFLM's ``tok_batch_encode`` (special tokens decided on the first)."""
        if has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        return [self.tokenizer.encode(s, **special) for s in strings]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ------------------------------------------------------------------ model calls

    def _forward_logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions, ``[batch, keep, vocab]`` (more when the model cannot trim)."""
        kwargs: dict[str, Any] = {}
        if self._keep_kwarg is not None:
            kwargs[self._keep_kwarg] = keep
        if self._accepts_use_cache:
            kwargs["use_cache"] = False
        self.forward_calls += 1
        logits = self._model(input_ids=input_ids, **kwargs).logits
        return logits[:, -keep:] if logits.shape[1] > keep else logits

    def _row_groups(self, n_rows: int, keep: int) -> list[slice]:
        vocab = getattr(self._config, "vocab_size", None) or len(self.tokenizer)
        per_row = max(1, keep * int(vocab) * 4)
        rows = max(1, min(n_rows, self.max_logits_bytes // per_row))
        return [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]

    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is greedy)`` per ``(context, continuation)`` request."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.disable_tqdm)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """Score ``(request_key, context_tokens, continuation_tokens)`` triples.

        Returns ``(sum of continuation log-probs, continuation is the greedy decode)`` per triple,
        in the input order.
        """
        max_len = self.max_length

        def _sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _group_key(req):
            return req[1] + req[2][:-1]

        re_ord = Collator(
            requests,
            sort_fn=_sort_key,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_group_key,
        )
        res: list[tuple[float, bool]] = []
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.disable_tqdm,
            desc="Running loglikelihood requests",
        )
        with torch.inference_mode():
            for chunk in re_ord.get_batched(n=self.batch_size):
                inps: list[list[int]] = []
                for _, context_enc, continuation_enc in chunk:
                    if not context_enc or not continuation_enc:
                        raise ValueError("loglikelihood: context and continuation must each encode to >= 1 token")
                    if len(continuation_enc) > max_len:
                        raise ValueError(
                            f"loglikelihood: continuation of {len(continuation_enc)} tokens exceeds max_length {max_len}"
                        )
                    # feed context + continuation minus its last token; truncate on the left to max_length
                    inps.append((context_enc + continuation_enc)[-(max_len + 1) :][:-1])
                inplens = [len(x) for x in inps]
                contlens = [len(c) for _, _, c in chunk]
                padlen = max(inplens)
                batch = torch.zeros((len(inps), padlen), dtype=torch.long)  # right padding (never attended)
                for i, toks in enumerate(inps):
                    batch[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
                batch = batch.to(self._device)
                keep = padlen - min(il - cl for il, cl in zip(inplens, contlens))

                row_logits: list[torch.Tensor] = [None] * len(inps)  # type: ignore[list-item]
                for rows in self._row_groups(len(inps), keep):
                    logits = self._forward_logits(batch[rows], keep)
                    offset = padlen - logits.shape[1]
                    for j, i in enumerate(range(rows.start, rows.stop)):
                        row_logits[i] = logits[j, inplens[i] - contlens[i] - offset : inplens[i] - offset]
                self.tokens_scored += sum(inplens)

                for (req_key, ctx_toks, cont_toks), scored in zip(chunk, row_logits):
                    logprobs = F.log_softmax(scored, dim=-1, dtype=self.softmax_dtype)  # [contlen, vocab]
                    greedy = logprobs.argmax(dim=-1)
                    for key, member_cont, member_lp in re_ord.get_cache(
                        req_str=req_key, cxt_toks=ctx_toks, cont_toks=cont_toks, logits=logprobs.unsqueeze(0)
                    ):
                        n = len(member_cont)
                        target = torch.tensor(member_cont, dtype=torch.long, device=logprobs.device)
                        lp = member_lp[0, -n:].gather(-1, target.unsqueeze(-1)).sum()
                        answer = (float(lp), bool((greedy[-n:] == target).all()))
                        res.append(answer)
                        if key is not None:
                            self.cache_hook.add_partial("loglikelihood", key, answer)
                        pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Full-text log-likelihood per request, over disjoint windows of at most ``max_length`` tokens."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for idx, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for idx, (lp, _) in zip(owners, scores):
            totals[idx] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first ``until`` string (or EOS)."""
        res: list[str] = []

        def _sort_key(req):
            return -len(self.tok_encode(req[0])), req[0]

        re_ords = Collator(
            [req.args for req in requests],
            sort_fn=_sort_key,
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.disable_tqdm,
            desc="Running generate_until requests",
        )
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs = zip(*chunk)
            gen_kwargs = all_gen_kwargs[0]
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("generate_until: TorchLM decodes greedily; do_sample=True is not supported")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(
                    f"generate_until: max_gen_toks {max_gen_toks} must be less than max_length {self.max_length}"
                )
            prompts = [toks[-max_ctx_len:] for toks in self._encode_prompts(list(contexts))]
            generated = self._greedy(prompts, max_gen_toks, until)
            for toks, context in zip(generated, contexts):
                text = postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)

    def _has_recurrent_mixer(self) -> bool:
        """The model holds a module flagged ``is_recurrent_mixer`` (an MLGRU of ``evaluators.compress.mlgru``)."""
        return isinstance(self._model, torch.nn.Module) and any(
            getattr(m, "is_recurrent_mixer", False) for m in self._model.modules()
        )

    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy decode a left-padded batch; a row stops at an EOS id or once a stop string appears.

        A recurrent token mixer sees neither the attention mask (left padding would enter its state)
        nor the KV cache: with one in the model, each row is decoded on its own, unpadded, recomputing
        the whole sequence for every new token.
        """
        recurrent = self._has_recurrent_mixer()
        if recurrent and len(prompts) > 1:
            return [self._greedy([p], max_new, until)[0] for p in prompts]
        n = len(prompts)
        width = max(len(p) for p in prompts)
        if width == 0:
            raise ValueError("generate_until: a context encodes to no tokens")
        ids = torch.full((n, width), self._gen_pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        stops = [s for s in until if s]
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        past = None
        with torch.inference_mode():
            for _ in range(max_new):
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                if self.use_kv_cache and not recurrent:
                    step_ids = ids if past is None else ids[:, -1:]
                    kwargs: dict[str, Any] = {
                        "attention_mask": mask,
                        "position_ids": positions[:, -step_ids.shape[1] :],
                        "use_cache": True,
                    }
                    if past is not None:
                        kwargs["past_key_values"] = past
                    if self._keep_kwarg is not None:
                        kwargs[self._keep_kwarg] = 1
                    outputs = self._model(input_ids=step_ids, **kwargs)
                    past = outputs.past_key_values
                    self.tokens_scored += int(mask[:, -step_ids.shape[1] :].sum())
                else:
                    kwargs = {"attention_mask": mask, "position_ids": positions}
                    if self._accepts_use_cache:
                        kwargs["use_cache"] = False
                    if self._keep_kwarg is not None:
                        kwargs[self._keep_kwarg] = 1
                    outputs = self._model(input_ids=ids, **kwargs)
                    self.tokens_scored += int(mask.sum())
                self.forward_calls += 1
                next_tok = outputs.logits[:, -1, :].argmax(dim=-1)
                for i in range(n):
                    if done[i]:
                        next_tok[i] = self._gen_pad_id
                        continue
                    tok = int(next_tok[i])
                    out[i].append(tok)
                    if tok in self._stop_token_ids:
                        done[i] = True
                    elif stops:
                        text = self.tokenizer.decode(out[i], skip_special_tokens=False)
                        done[i] = any(s in text for s in stops)
                if all(done):
                    break
                ids = torch.cat([ids, next_tok.unsqueeze(-1)], dim=1)
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        return out
