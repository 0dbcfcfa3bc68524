"""Calibration tokens and the input Gram matrices ("Hessians") the calibrated methods read.

The calibration set is ``windows`` token windows of ``seq_len`` tokens drawn (seeded) from the
*calibration* works of the corpus, disjoint from the proxy's validation works and the lm-eval
tasks' test works. For a linear layer with inputs ``X`` [tokens, in_features] over that set,
``H = X^T X`` (float32, unnormalised) is what Wanda (``sqrt(H_jj)``), SparseGPT, GPTQ and the
ternary scale refit use.

Two ways to get ``H``, both hooking the layers' inputs:

* :func:`collect_hessians`: one forward pass of the whole model (used on the dense model, whose
  statistics serve every plan and are cached once per model);
* :class:`BlockRunner`: pushes the calibration hidden states through the transformer blocks one at
  a time, so the statistics of block ``b`` see blocks ``< b`` as already compressed (layer-sequential
  processing, as the SparseGPT and GPTQ reference implementations do).

Layers fed the same tensor (q/k/v, gate/up) share one matrix: :class:`HessianHooks` notices the
repeated input and aliases the later layer to the first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from evaluators.corpus import token_windows

CALIBRATION_WINDOWS = 16
CALIBRATION_SEQ_LEN = 256
CHUNK = 4
"""Windows per forward call while collecting statistics (bounds activation memory)."""


def token_key(input_ids: torch.Tensor) -> str:
    """16 hex digits of the SHA-256 of a token-id tensor and its shape."""
    ids = input_ids.to(torch.int64).contiguous()
    return hashlib.sha256(str(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationSet:
    """``input_ids`` [windows, seq_len] from the calibration split; ``key`` identifies it in cache keys."""

    input_ids: torch.Tensor
    seed: int = 0

    @property
    def key(self) -> str:
        """16 hex digits of the SHA-256 of the token ids (and their shape)."""
        return token_key(self.input_ids)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    @staticmethod
    def build(tokenizer, windows: int = CALIBRATION_WINDOWS, seq_len: int = CALIBRATION_SEQ_LEN,
              seed: int = 0) -> "CalibrationSet":
        ids = token_windows(tokenizer, windows, seq_len, split="calibration", seed=seed)
        return CalibrationSet(torch.tensor(ids, dtype=torch.long), seed)


class HessianHooks:
    """Forward hooks accumulating ``X^T X`` of named linear layers' inputs (aliases for shared inputs).

    ``extra`` maps a name to a module whose *input* should be recorded under that name (e.g. a
    block's attention input, for the projections of an MLGRU that will replace it).
    """

    def __init__(self, linears: dict[str, torch.nn.Module], extra: dict[str, torch.nn.Module] | None = None):
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor | None, str | None] = (None, None)
        self._handles = []
        for name, module in {**linears, **(extra or {})}.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def record(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            last, owner = self._last
            if x is last and owner != name:
                self.alias.setdefault(name, self.alias.get(owner, owner))
                return
            self._last = (x, name)
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram = flat.T @ flat
            if name in self.sums:
                self.sums[name] += gram
            else:
                self.sums[name] = gram

        return record

    def reset_sharing(self) -> None:
        """Forget the last input seen (call between forward passes)."""
        self._last = (None, None)

    def remove(self) -> dict[str, torch.Tensor]:
        """Remove the hooks; return every name's matrix (aliases resolved to the shared tensor)."""
        for handle in self._handles:
            handle.remove()
        out = dict(self.sums)
        out.update({name: self.sums[owner] for name, owner in self.alias.items()})
        return out


def collect_hessians(model, calib: CalibrationSet, linears: dict[str, torch.nn.Module],
                     extra: dict[str, torch.nn.Module] | None = None, progress=None) -> dict[str, torch.Tensor]:
    """``H`` of each named layer over the calibration set, from full forward passes of ``model``."""
    hooks = HessianHooks(linears, extra)
    chunks = calib.input_ids.split(CHUNK)
    try:
        with torch.inference_mode():
            for i, chunk in enumerate(chunks):
                hooks.reset_sharing()
                model(chunk, use_cache=False)
                if progress:
                    progress(i + 1, len(chunks))
    finally:
        sums = hooks.remove()
    return sums


class BlockRunner:
    """The calibration hidden states at the input of block ``b``, advanced one block at a time.

    One dense pass captures, per chunk of windows, the hidden states entering block 0 and the
    keyword arguments the model passes each block (rotary embeddings, masks, positions: per block,
    since families such as Gemma 2/3 give sliding-window and global blocks their own masks and
    rotary tables). :meth:`run` calls one block on every chunk; hooks registered on the block's
    layers meanwhile see its inputs.
    """

    def __init__(self, model, blocks: torch.nn.ModuleList, calib: CalibrationSet):
        self.blocks = blocks
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict]] = [[] for _ in blocks]  # [block][chunk]
        self.index = 0

        def capture(block: int):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if block == 0:
                    self.hidden.append(hidden)
                self.kwargs[block].append(kwargs)
            return hook

        handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            with torch.inference_mode():
                for chunk in calib.input_ids.split(CHUNK):
                    model(chunk, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()

    def run(self, block: int, advance: bool = True, hooks: HessianHooks | None = None) -> None:
        """Call block ``block`` (the next one) on every chunk; keep its outputs as the next input if ``advance``."""
        if block != self.index:
            raise ValueError(f"BlockRunner: block {block} requested, at block {self.index}")
        out = []
        with torch.inference_mode():
            for hidden, kwargs in zip(self.hidden, self.kwargs[block]):
                if hooks is not None:
                    hooks.reset_sharing()
                result = self.blocks[block](hidden, **kwargs)
                out.append(result[0] if isinstance(result, tuple) else result)
        if advance:
            self.hidden = out
            self.index += 1
