"""The torch side of :mod:`dse.arch`: a loaded model's :class:`~dse.arch.Workload` (from its config), its linear modules by
module path, and their weights as ``[out_features, in_features]`` whatever the module type.

Most families use ``nn.Linear`` (weight ``[out, in]``); GPT-2 uses transformers' ``Conv1D``, whose weight
is stored ``[in, out]``: :func:`weight_of` returns a transposed view of it, so compression code and
``weight_of(module).copy_(w)`` see one orientation.
"""

from __future__ import annotations

import torch

from dse.arch import Workload


def config_workload(config) -> Workload:
    """The architecture of a Hugging Face model from its config object (``model.config``) alone; one-line
    ValueError when its ``model_type`` is not a supported family."""
    return Workload.from_hf_config(config.to_dict())


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


def is_linear(module: torch.nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (a linear layer with its weight stored transposed)."""
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> linear module, in model order (the names plans and spec regexes use)."""
    return {name: m for name, m in model.named_modules() if is_linear(m)}


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as ``[out_features, in_features]`` (a view: writing to it writes the weight)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def in_features(module: torch.nn.Module) -> int:
    return int(weight_of(module).shape[1])
