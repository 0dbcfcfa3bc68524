"""Compression transforms applied to a model's linear layers as a :class:`~dse.plan.ModelPlan` says.

First versions (the evaluators issue adds Wanda, SparseGPT, GPTQ and MLGRU):

* ``nm_mask_magnitude``: N:M structured sparsity by weight magnitude, N kept
  in every M consecutive weights along the input dimension.
* ``quantize_rtn``: symmetric round-to-nearest per group of ``group_size``
  input weights, with GPTQ's quantiser convention (``maxq = 2**bits - 1``,
  ``scale = 2*max|w|/maxq``, ``zero = (maxq+1)/2``), so codes are integers in
  ``[0, maxq]`` and zero weights stay exactly zero.
* ``ternarize_absmean``: BitLinear weights, ``round(clip(W/mean|W|, -1, 1))``
  times the per-tensor absmean scale (over kept weights when N:M is applied).

Weights are fake-quantised (stored dequantised in float32) so that the torch
model runs unchanged; :class:`PlanApplier` restores the dense weights before
applying the next plan, so one loaded model serves every trial.
"""

from __future__ import annotations

import torch

from dse.plan import LayerPlan, ModelPlan, Sparsity, WeightFormat


class PlanApplyError(ValueError):
    """The plan names a layer or a method this model or version cannot apply."""


def nm_mask_magnitude(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-|w| of every ``m`` consecutive input weights.

    ``weight`` is ``[out_features, in_features]``. When ``in_features`` is not a
    multiple of ``m``, the trailing partial group keeps ``min(n, len)`` weights.
    """
    out_f, in_f = weight.shape
    n, m = sparsity.n, sparsity.m
    pad = (-in_f) % m
    mag = weight.detach().abs()
    if pad:
        mag = torch.nn.functional.pad(mag, (0, pad), value=-1.0)  # padding is never preferred
    groups = mag.reshape(out_f, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out_f, -1)[:, :in_f]


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantisation per group of ``group_size`` input weights.

    Returns the dequantised weights (same shape and dtype). A trailing partial
    group gets its own scale.
    """
    if not 2 <= bits <= 8:
        raise PlanApplyError(f"bits {bits}: round-to-nearest supports 2 to 8 bits")
    out_f, in_f = weight.shape
    maxq = 2**bits - 1
    zero = (maxq + 1) / 2
    w = weight.detach().float()
    pad = (-in_f) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    groups = w.reshape(out_f, -1, group_size)
    scale = 2 * groups.abs().amax(dim=2, keepdim=True) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(groups / scale) + zero, 0, maxq)
    deq = (scale * (codes - zero)).reshape(out_f, -1)[:, :in_f]
    return deq.to(weight.dtype)


def ternarize_absmean(weight: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """BitLinear ternary weights: ``gamma * round(clip(W/gamma, -1, 1))``, ``gamma = mean|W|`` (kept weights)."""
    w = weight.detach().float()
    kept = w.abs() if mask is None else w.abs()[mask]
    gamma = kept.mean().clamp_min(eps)
    tern = torch.clamp(torch.round(w / gamma), -1, 1) * gamma
    if mask is not None:
        tern = tern * mask
    return tern.to(weight.dtype)


def compress_weight(weight: torch.Tensor, layer: LayerPlan) -> torch.Tensor:
    """The fake-quantised weight for one layer plan (magnitude pruning, RTN or ternary)."""
    if layer.prune != "magnitude" or layer.quant != "rtn":
        raise PlanApplyError(
            f"layer {layer.name}: prune={layer.prune}, quant={layer.quant} not available yet; allowed: magnitude, rtn"
        )
    mask = nm_mask_magnitude(weight, layer.sparsity) if layer.sparsity else None
    w = weight.detach() if mask is None else weight.detach() * mask
    fmt: WeightFormat = layer.fmt
    if fmt.is_ternary:
        return ternarize_absmean(w, mask)
    if fmt.is_float:
        return w.clone()
    return quantize_rtn(w, fmt.bits, fmt.group_size)


class PlanApplier:
    """Applies plans to one loaded model in place, restoring dense weights between plans.

    The dense weights of every linear layer are kept once (float32 copies), and
    a tied ``lm_head`` is untied on first compression so that the input
    embedding stays full precision as the plan vocabulary promises.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self._dense: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()

    def apply(self, plan: ModelPlan) -> dict[str, str]:
        """Restore the dense model, then compress the layers the plan names. Returns name -> label applied."""
        unknown = [lp.name for lp in plan.layers if lp.name not in self.linears]
        if unknown:
            raise PlanApplyError(f"plan layer '{unknown[0]}' is not a linear layer of this model")
        if any(bp.mixer != "attention" for bp in plan.blocks):
            raise PlanApplyError("MLGRU token mixers are not available in this version (allowed: attention)")
        self.restore()
        applied = {}
        with torch.no_grad():
            for layer in plan.layers:
                if layer.is_identity:
                    continue
                module = self.linears[layer.name]
                self._untie(layer.name, module)
                dense = self._dense.setdefault(layer.name, module.weight.detach().clone())
                module.weight.copy_(compress_weight(dense, layer))
                self._touched.add(layer.name)
                applied[layer.name] = layer.label
        return applied

    def restore(self) -> None:
        """Put back the dense weights of every layer a previous plan changed."""
        with torch.no_grad():
            for name in self._touched:
                self.linears[name].weight.copy_(self._dense[name])
        self._touched.clear()

    def _untie(self, name: str, module: torch.nn.Linear) -> None:
        emb = self.model.get_input_embeddings()
        if emb is not None and module.weight is emb.weight:
            module.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
