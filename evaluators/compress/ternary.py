"""BitLinear ternary weights and 8-bit activations (MatMul-free LM, Zhu et al., 2024, arXiv 2406.02528).

* Weights: ``W~ = scale * round(clip(W / scale, -1, 1))`` with the per-tensor absmean
  ``scale = mean|W|`` (:func:`evaluators.compress.grid.rtn` with format ``ternary``).
* Activations: per token, ``x~ = round(x * 127 / max|x|) * max|x| / 127`` clipped to
  ``[-128, 127]`` codes (absmax, 8 bits), applied to a ternary layer's input by a forward
  pre-hook (:func:`quantize_activations`).
* Optional post-training recovery (:func:`refit_scales`): keep the ternary codes and choose
  per-output-channel scales minimising the layer's output error on calibration inputs,
  ``min_a ||X w_i - a X t_i||^2``, whose solution is ``a_i = (w_i^T H t_i) / (t_i^T H t_i)``
  with ``H = X^T X``.
"""

from __future__ import annotations

import torch

from evaluators.compress.packed import PackedWeight

ACT_BITS = 8


def quantize_activations(x: torch.Tensor, bits: int = ACT_BITS, eps: float = 1e-5) -> torch.Tensor:
    """Per-token absmax fake quantisation of ``x`` [..., features] to signed ``bits``-bit codes."""
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    return torch.clamp(torch.round(x * scale), -qmax - 1, qmax) / scale


def activation_hook(module: torch.nn.Module, args: tuple) -> tuple:
    """``register_forward_pre_hook`` body: quantise a linear layer's input to 8-bit per token."""
    return (quantize_activations(args[0]),) + tuple(args[1:])


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
    return PackedWeight(fmt=packed.fmt, codes=packed.codes, scales=scale.float()[:, None],
                        zeros=packed.zeros.expand(t.shape[0], 1).clone(), group_size=packed.group_size,
                        mask=packed.mask)
