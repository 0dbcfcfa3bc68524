"""The optimal-brain-surgeon column loop of GPTQ and SparseGPT, as one function.

GPTQ (Frantar et al. 2022, arXiv 2210.17323) and SparseGPT (Frantar & Alistarh 2023,
arXiv 2301.00774) compress a linear weight ``W`` [out, in] so that ``X W^T`` stays close for the
layer's calibration inputs ``X`` [tokens, in], given ``H = X^T X`` [in, in] (unnormalised; the
result is invariant to its scale). Columns (inputs) are processed left to right; column ``j`` is
rounded onto its grid and/or pruned to ``q_j``, and the error is spread over the columns not yet
done, ``W_F -= (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j,F}``, ``F = {j+1, ...}``. With ``U`` the upper
Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), row ``j`` of ``U`` is that row of ``H_F^-1`` divided by
``sqrt([H_F^-1]_jj)``, so the whole loop needs one factorisation. Updates are applied lazily,
``blocksize`` columns at a time (the reference implementations IST-DASLab/gptq ``fasterquant`` and
IST-DASLab/sparsegpt ``fasterprune``).

* Dead inputs (``H_jj = 0``): ``H_jj = 1`` and weight column zeroed; damping ``percdamp * mean(diag H)``.
* ``sparsity`` N:M chosen inside (SparseGPT): per row, prune the ``m - n`` of each ``m`` consecutive
  columns with the smallest ``w^2 / U_jj^2`` (current weights). Integer formats decide every m-block
  starting inside a quantisation group when the group starts, so the group's grid covers kept weights.
* ``mask`` (fixed, e.g. magnitude or Wanda): pruned weights go to 0 in the loop, errors propagated.
* Integer grids (GPTQ): per row and group of ``fmt.group_size`` inputs, from the current weights of
  the group (pruned ones zeroed) at its first column. Ternary: one absmean scale fixed at the start.
"""

from __future__ import annotations

import math

import torch

from dse.plan import Sparsity, WeightFormat
from evaluators.compress.grid import TERNARY_ZERO, int_grid, maxq_of, quantize, ternary_scale
from evaluators.compress.packed import PackedWeight
from evaluators.compress.prune import nm_mask, nm_mask_magnitude


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: upper Cholesky factor of the damped ``H^-1`` (float32) and the dead-input flags."""
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(f"hessian is not positive definite after damping (percdamp={percdamp}); raise percdamp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float(), dead


def obs_compress(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, *,
                 sparsity: Sparsity | None = None, mask: torch.Tensor | None = None,
                 blocksize: int = 128, percdamp: float = 0.01) -> PackedWeight:
    """GPTQ / SparseGPT / joint compression of ``weight`` [out, in] with input Gram matrix ``hessian`` [in, in].

    ``fmt`` ``"16"`` keeps float values (pure SparseGPT); ``sparsity`` chooses the N:M mask inside the
    loop, ``mask`` [out, in] (True = kept) fixes it; at most one of the two. Inputs are not modified.
    ``PackedWeight.dequantize()`` of the result is the loop's reconstruction.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight in_features {cols}")
    if sparsity is not None and mask is not None:
        raise ValueError("give sparsity (mask chosen inside) or a fixed mask, not both")
    if mask is not None and tuple(mask.shape) != (rows, cols):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {(rows, cols)}")
    if blocksize <= 0:
        raise ValueError(f"blocksize {blocksize} is not positive")
    if fmt.is_float and sparsity is None and mask is None:
        return PackedWeight.dense(weight.detach().float().clone())

    dev = weight.device
    hinv, dead = (t.to(dev) for t in _inverse_cholesky(hessian, percdamp))
    W = weight.detach().float().clone()
    W[:, dead] = 0
    keep = mask.detach().bool().to(dev, copy=True) if mask is not None else \
        torch.ones(rows, cols, dtype=torch.bool, device=dev)
    is_int = not (fmt.is_float or fmt.is_ternary)
    group = fmt.group_size if is_int else cols
    maxq = 0 if fmt.is_float else maxq_of(fmt)
    n_groups = math.ceil(cols / group)
    scales = torch.zeros(rows, n_groups, device=dev)
    zeros = torch.zeros(rows, n_groups, device=dev)
    if fmt.is_ternary:
        kept0 = nm_mask_magnitude(W, sparsity) if sparsity is not None else mask
        scales = ternary_scale(W, kept0)
        zeros = torch.full_like(scales, TERNARY_ZERO)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)
    Q = torch.zeros(rows, cols, device=dev)
    d2 = hinv.diagonal() ** 2

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros(rows, i2 - i1, device=dev)
        U1 = hinv[i1:i2, i1:i2]

        def current(a: int, b: int, j: int) -> torch.Tensor:
            """Weights of columns [a, b) (a >= j) as they stand at column j, with this block's pending updates."""
            parts = [W1[:, a - i1:min(b, i2) - i1]]
            if b > i2:
                lo = max(a, i2)
                parts.append(W[:, lo:b] - Err1[:, :j - i1] @ hinv[i1:j, lo:b])
            return torch.cat(parts, dim=1)

        for j in range(i1, i2):
            i = j - i1
            if sparsity is not None:
                m = sparsity.m
                if is_int:
                    a, b = -(-j // m) * m, min(cols, -(-min(j + group, cols) // m) * m)
                    due = j % group == 0 and a < b
                else:
                    a, b, due = j, min(j + m, cols), j % m == 0
                if due:
                    keep[:, a:b] = nm_mask(current(a, b, j) ** 2 / d2[a:b], sparsity)
            if is_int and j % group == 0:
                g1 = min(j + group, cols)
                s, z = int_grid(current(j, g1, j) * keep[:, j:g1], fmt.bits, fmt.symmetric)
                scales[:, j // group], zeros[:, j // group] = s[:, 0], z[:, 0]

            w = W1[:, i]
            if fmt.is_float:
                q = torch.where(keep[:, j], w, 0.0)
            else:
                s, z = scales[:, j // group], zeros[:, j // group]  # ternary: group = cols, one scale
                c = torch.where(keep[:, j], quantize(w, s, z, maxq), z.expand(rows))
                codes[:, j] = c.to(torch.uint8)
                q = s * (c - z)
            Q[:, j] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]

    out_mask = None if mask is None and sparsity is None else keep
    if fmt.is_float:
        return PackedWeight.dense(Q, out_mask)
    return PackedWeight(fmt=fmt, codes=codes, scales=scales, zeros=zeros, group_size=group, mask=out_mask)
