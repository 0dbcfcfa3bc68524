"""BitLinear ternary weights and 8-bit activations (MatMul-free LM, Zhu et al., 2024, arXiv 2406.02528).

* Weights: ``W~ = scale * round(clip(W / scale, -1, 1))`` with the per-tensor absmean
  ``scale = mean|W|`` (:func:`evaluators.compress.grid.rtn` with format ``ternary``).
* Activations: per token, ``x~ = round(x * 127 / max|x|) * max|x| / 127`` clipped to
  ``[-128, 127]`` codes (absmax, 8 bits; :func:`quantize_activations`), computed the way BitLinear does
  (:class:`BitLinearForward`, installed on the ternary layer).
* Optional post-training recovery (:func:`refit_scales`): keep the ternary codes and choose
  per-output-channel scales minimising the layer's output error on calibration inputs,
  ``min_a ||X w_i - a X t_i||^2``, whose solution is ``a_i = (w_i^T H t_i) / (t_i^T H t_i)``
  with ``H = X^T X``.
"""

from __future__ import annotations

import torch

from evaluators.compress.packed import PackedWeight
from evaluators.compress.storage import fp16_scales

ACT_BITS = 8


def quantize_activations(x: torch.Tensor, bits: int = ACT_BITS, eps: float = 1e-5) -> torch.Tensor:
    """Per-token absmax fake quantisation of ``x`` [..., features] to signed ``bits``-bit codes."""
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    return torch.clamp(torch.round(x * scale), -qmax - 1, qmax) / scale


class BitLinearForward:
    """The forward of a ternary layer, installed on its ``nn.Linear`` (:meth:`install`): the arithmetic of
    transformers' ``BitLinear`` and of an integer datapath. Per token, ``s = 127 / max|x|`` and
    ``q = clamp(round(x * s), -128, 127)``; then ``y = (q @ codes^T) / (s * (1 / scale))`` (+ bias), where the
    integer sums are exact in float32. This equals ``quantize_activations(x) @ W^T`` with ``W = scale * codes`` up to
    float rounding, and is bit for bit what a BitNet checkpoint (:mod:`evaluators.hf_export`) computes after reload,
    so the rounding of later layers' activations never flips between the evaluated and the exported model. The
    module's ``weight`` keeps ``W`` for everything that reads it."""

    def __init__(self, module: torch.nn.Module, packed: PackedWeight):
        codes = packed.codes.float() - packed.zeros
        if packed.mask is not None:
            codes = codes * packed.mask
        weight = module.weight
        self.module = module
        self.codes = codes.to(device=weight.device, dtype=weight.dtype)
        self.inv_scale = (1.0 / packed.scales.reshape(-1).float())  # [1] or per output channel [rows].to(device=weight.device, dtype=weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2 ** (ACT_BITS - 1) - 1
        scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        q = (x * scale).round().clamp(-qmax - 1, qmax)
        y = torch.nn.functional.linear(q.to(self.codes.dtype), self.codes) / (scale * self.inv_scale)
        bias = self.module.bias
        return y if bias is None else y + bias.view(1, -1).expand_as(y)

    @staticmethod
    def install(module: torch.nn.Module, packed: PackedWeight) -> "BitLinearForward":
        """Make ``module`` compute as the ternary layer ``packed`` (:meth:`remove` undoes it)."""
        forward = BitLinearForward(module, packed)
        module.forward = forward
        return forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward


def refit_scales(weight: torch.Tensor, packed: PackedWeight, hessian: torch.Tensor) -> PackedWeight:
    """Least-squares per-output-channel scales for fixed ternary codes (formula in the module docstring).

    Channels whose codes are all zero keep the original scale.
    """
    codes = packed.codes.float() - packed.zeros
    if packed.mask is not None:
        codes = codes * packed.mask
    h = hessian.double()
    w = weight.detach().double()
    if packed.mask is not None:
        w = w * packed.mask
    t = codes.double()
    th = t @ h
    num = (th * w).sum(dim=1)
    den = (th * t).sum(dim=1)
    old = packed.scales.double().expand(t.shape[0], 1)[:, 0]
    scale = torch.where(den > 0, num / den.clamp_min(1e-30), old).clamp_min(1e-8)
    return PackedWeight(fmt=packed.fmt, codes=packed.codes, scales=fp16_scales(scale.float()[:, None]),
                        zeros=packed.zeros.expand(t.shape[0], 1).clone(), group_size=packed.group_size,
                        mask=packed.mask)
