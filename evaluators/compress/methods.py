"""One layer plan -> the compression method it names -> a :class:`~evaluators.compress.packed.PackedWeight`.

====================  =================================================================
plan                  method
====================  =================================================================
prune ``magnitude``   N:M mask by ``|W|`` (no calibration)
prune ``wanda``       N:M mask by ``|W| * ||X_j||`` (Wanda)
prune ``sparsegpt``   N:M mask chosen inside SparseGPT's reconstruction
quant ``rtn``         round-to-nearest per group (ternary: BitLinear absmean), on kept weights
quant ``gptq``        GPTQ on kept weights; with ``sparsegpt`` the joint SparseGPT+GPTQ pass
quant ``refit``       ternary absmean codes, per-channel scales refitted by least squares
====================  =================================================================

Methods marked by :func:`needs_calibration` take the layer's input Gram matrix
``H = X^T X`` over the calibration tokens (:mod:`evaluators.compress.calibration`).
"""

from __future__ import annotations

import torch

from dse.plan import FP16, LayerPlan
from evaluators.compress import grid, obs, prune, ternary
from evaluators.compress.packed import PackedWeight


def needs_calibration(layer: LayerPlan) -> bool:
    """True when the layer's method reads calibration statistics (Wanda, SparseGPT, GPTQ, refit)."""
    prunes = layer.sparsity is not None and layer.prune in ("wanda", "sparsegpt")
    quantises = not layer.fmt.is_float and layer.quant in ("gptq", "refit")
    return prunes or quantises


def compress_layer(weight: torch.Tensor, layer: LayerPlan, hessian: torch.Tensor | None = None) -> PackedWeight:
    """Compress one dense ``weight`` [out, in] as ``layer`` says; ``hessian`` [in, in] when calibration is needed."""
    if needs_calibration(layer) and hessian is None:
        raise ValueError(f"layer {layer.name}: {layer.prune}/{layer.quant} needs calibration statistics")
    sparsity, fmt = layer.sparsity, layer.fmt
    inside = sparsity is not None and layer.prune == "sparsegpt"
    mask = None
    if sparsity is not None and not inside:
        mask = (prune.nm_mask_wanda(weight, sparsity, hessian) if layer.prune == "wanda"
                else prune.nm_mask_magnitude(weight, sparsity))
    if inside:
        packed = obs.obs_compress(weight, hessian, fmt if layer.quant == "gptq" else FP16, sparsity=sparsity)
        if layer.quant == "gptq" or fmt.is_float:
            return packed
        weight, mask = packed.values, packed.mask  # SparseGPT's reconstruction, then round it below
    if not fmt.is_float and layer.quant == "gptq":
        return obs.obs_compress(weight, hessian, fmt, mask=mask)
    packed = grid.rtn(weight, fmt, mask)
    if layer.quant == "refit":
        packed = ternary.refit_scales(weight, packed, hessian)
    return packed
