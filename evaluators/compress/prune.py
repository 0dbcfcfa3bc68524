"""N:M masks from per-weight saliency scores: magnitude and Wanda.

Both keep the ``n`` highest-scoring of every ``m`` consecutive input weights of each
output row (the N:M groups run along the input dimension, as sparse tensor cores and
the N:M FPGA datapaths consume them):

* magnitude: score ``|W_ij|``;
* Wanda (Sun et al., 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2``, the weight
  magnitude times the L2 norm of input feature ``j`` over the calibration tokens; with the
  layer's input Gram matrix ``H = X^T X`` that norm is ``sqrt(H_jj)``.

SparseGPT chooses its mask inside the reconstruction (:mod:`evaluators.compress.obs`).
"""

from __future__ import annotations

import torch

from dse.plan import Sparsity


def nm_mask(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest ``scores`` of every ``m`` consecutive inputs per row.

    ``scores`` is ``[out_features, in_features]``. A trailing partial group (``in_features``
    not a multiple of ``m``) keeps ``min(n, len)`` weights.
    """
    out_f, in_f = scores.shape
    n, m = sparsity.n, sparsity.m
    pad = (-in_f) % m
    s = scores.detach().float()
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=-float("inf"))  # padding is never preferred
    groups = s.reshape(out_f, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out_f, -1)[:, :in_f]


def nm_mask_magnitude(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """N:M mask by weight magnitude."""
    return nm_mask(weight.abs(), sparsity)


def nm_mask_wanda(weight: torch.Tensor, sparsity: Sparsity, hessian: torch.Tensor) -> torch.Tensor:
    """N:M mask by Wanda's ``|W| * ||X_j||``, with ``||X_j||^2 = H_jj`` from the input Gram matrix ``hessian``."""
    return nm_mask(weight.abs() * hessian.diagonal().float().clamp_min(0).sqrt()[None, :], sparsity)
