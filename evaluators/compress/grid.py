"""Quantisation grids in GPTQ's convention, and round-to-nearest onto them.

A grid is ``(scale, zero, maxq)``: a weight ``w`` gets the integer code
``q = clamp(round(w / scale) + zero, 0, maxq)`` and the value ``scale * (q - zero)``.

* INT-k symmetric: ``maxq = 2**k - 1``, ``scale = 2 * max|w| / maxq``, ``zero = (maxq + 1) / 2``
  (codes ``0..maxq``, values ``-zero*scale .. (maxq-zero)*scale``; zero stays exactly zero).
* INT-k asymmetric: ``xmin = min(w, 0)``, ``xmax = max(w, 0)``, ``scale = (xmax - xmin) / maxq``,
  ``zero = round(-xmin / scale)``.
* Ternary (BitLinear absmean): ``maxq = 2``, ``zero = 1``, ``scale = mean|w|``, so values are
  ``{-1, 0, +1} * scale``.

Scales are rounded to FP16 (:func:`~evaluators.compress.storage.fp16_scales`), the width the cost model counts and
exports store. Grid parameters are computed per row over the kept weights only: pruned weights are
passed as zeros, and zero always lies inside an INT grid's range, so they cannot widen it.
"""

from __future__ import annotations

import torch

from dse.plan import WeightFormat
from evaluators.compress.packed import PackedWeight
from evaluators.compress.storage import fp16_scales

TERNARY_MAXQ = 2
TERNARY_ZERO = 1.0


def maxq_of(fmt: WeightFormat) -> int:
    """Largest code of a format's grid: ``2**bits - 1`` for INT-k, 2 for ternary."""
    return TERNARY_MAXQ if fmt.is_ternary else 2**fmt.bits - 1


def int_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)``, each ``[rows, 1]`` float32, of the INT-``bits`` grid covering ``w`` [rows, cols]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits {bits}: integer grids support 2 to 8 bits")
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.amin(dim=1, keepdim=True).clamp_max(0)
    xmax = w.amax(dim=1, keepdim=True).clamp_min(0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = fp16_scales((xmax - xmin) / maxq)
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def ternary_scale(w: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """BitLinear's per-tensor absmean scale ``mean|w|`` over the kept weights, as a [1, 1] tensor."""
    mag = w.detach().float().abs()
    kept = mag if mask is None else mag[mask]
    return fp16_scales(kept.mean().clamp_min(eps).reshape(1, 1))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor) of ``w`` on the grid; broadcasting ``scale``/``zero`` against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn(weight: torch.Tensor, fmt: WeightFormat, mask: torch.Tensor | None = None) -> PackedWeight:
    """Round-to-nearest of ``weight`` [out, in] onto ``fmt``'s grid, per group of ``fmt.group_size`` inputs.

    With ``mask`` (N:M kept weights) the grid covers the kept weights only and pruned weights
    stay exactly zero. ``fmt`` ``"16"`` returns the (masked) float weights; ternary uses the
    per-tensor absmean scale.
    """
    w = weight.detach().float()
    if mask is not None:
        w = w * mask
    rows, cols = w.shape
    if fmt.is_float:
        return PackedWeight.dense(w, mask)
    if fmt.is_ternary:
        scale = ternary_scale(w, mask)
        codes = quantize(w, scale, TERNARY_ZERO, TERNARY_MAXQ)
        return PackedWeight(fmt=fmt, codes=codes.to(torch.uint8), scales=scale,
                            zeros=torch.full_like(scale, TERNARY_ZERO), group_size=cols, mask=mask)
    group = fmt.group_size
    pad = (-cols) % group
    padded = torch.nn.functional.pad(w, (0, pad)) if pad else w
    groups = padded.reshape(rows * (padded.shape[1] // group), group)
    scale, zero = int_grid(groups, fmt.bits, fmt.symmetric)
    codes = quantize(groups, scale, zero, maxq_of(fmt)).reshape(rows, -1)[:, :cols]
    n_groups = padded.shape[1] // group
    return PackedWeight(fmt=fmt, codes=codes.to(torch.uint8), scales=scale.reshape(rows, n_groups),
                        zeros=zero.reshape(rows, n_groups), group_size=group, mask=mask)
