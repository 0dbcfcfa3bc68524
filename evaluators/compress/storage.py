"""The widths values are stored at, so the evaluated model is the model an export holds.

The cost model counts every quantisation scale as FP16 (2 bytes) and every tensor a plan leaves uncompressed
(embeddings, norms, biases, FP16 layers) at 16 bits. The evaluation uses exactly those values, held in float32:

* :func:`fp16_scales`: a grid's scales rounded to FP16 (called where grids are made, :mod:`.grid`, :mod:`.ternary`),
  so an exported FP16 scale times its integer code, computed in float32, is the evaluated weight bit for bit;
* :func:`round_to_storage`: every floating tensor of the model rounded once to :func:`storage_dtype` (BF16 for a
  model whose config says bfloat16, or whose values do not fit FP16; FP16 otherwise), by
  :class:`~evaluators.compress.PlanApplier` before anything is measured, so the dense reference and every plan
  start from the 16-bit model.
"""

from __future__ import annotations

import torch

FP16_TINY = 2.0 ** -24
"""Smallest positive FP16 value (subnormal): a scale never rounds to zero."""
FP16_MAX = 65504.0


def fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest FP16 value (at least :data:`FP16_TINY`), as float32. Non-finite and
    too-large scales become inf or NaN, as FP16 storage would make them."""
    return scale.to(torch.float16).float().clamp_min(FP16_TINY)


def storage_dtype(model: torch.nn.Module) -> torch.dtype:
    """16-bit dtype the model's uncompressed tensors are stored and evaluated at: bfloat16 when its config's dtype
    is bfloat16 or a value exceeds FP16's range (65504), else float16."""
    config = getattr(model, "config", None)
    declared = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    if declared.replace("torch.", "") == "bfloat16":
        return torch.bfloat16
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.numel() and float(tensor.detach().abs().max()) > FP16_MAX:
            return torch.bfloat16
    return torch.float16


@torch.no_grad()
def round_to_storage(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Round every floating parameter and buffer of ``model`` in place to ``dtype``'s values (keeping its own
    dtype); returns how many tensors changed. Rotary frequency buffers are left alone: they are computed, not
    stored."""
    changed = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or tensor.dtype == dtype or "inv_freq" in name:
            continue
        rounded = tensor.to(dtype).to(tensor.dtype)
        if not torch.equal(rounded, tensor):
            tensor.copy_(rounded)
            changed += 1
    return changed
