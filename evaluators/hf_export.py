"""Checkpoints stock loaders read as they are: compressed-tensors for integer plans, BitNet for ternary ones.

``AutoModelForCausalLM.from_pretrained(dir)`` (transformers, with the ``compressed-tensors`` package installed for
the first) rebuilds the evaluated model from these directories with no code of this package; vLLM reads the
compressed-tensors layout too (module docstring of :func:`ct_scheme` says which layers its kernels take).

compressed-tensors (``quantization_config.quant_method = "compressed-tensors"``)
---------------------------------------------------------------------------------
* One config group per distinct (bits, symmetry, strategy, group size); its ``targets`` are the exact module names.
  Top-level ``format`` ``pack-quantized`` when every group is, ``mixed-precision`` otherwise.
* Symmetric INT-k (k = 2..8): ``pack-quantized``: ``<L>.weight_packed`` int32 (32 codes in k words),
  ``<L>.weight_scale`` FP16 ``[rows, groups]``, ``<L>.weight_shape``. Codes are the signed ``q - 2**(k-1)`` of this
  package's unsigned codes (:mod:`evaluators.compress.grid`), so ``scale * q`` is the evaluated weight.
* Asymmetric INT-k: ``int-quantized`` (one int8 per weight plus an int8 ``weight_zero_point``): transformers 5.25
  with compressed-tensors 0.20 builds unpacked zero-point slots when it loads ``pack-quantized`` and then refuses
  the packed ones of the checkpoint (a size mismatch), so asymmetric layers take the unpacked layout and cost 8 bits
  a weight on disk instead of k (the hardware report still counts k).
* Strategy: ``channel`` when a layer has one scale per row, ``group`` when the group size divides the inputs,
  otherwise ``block`` ``[1, group]`` (compressed-tensors' ``group`` requires whole groups; ``block`` pads the last
  one, as this package's grid does).
* N:M layers: their quantized (or FP16) values with the pruned weights zero; the pattern of every layer is in
  ``config.json`` under ``dse_export.sparsity`` (compressed-tensors 0.20 writes no sparsity config).
* FP16 layers and ``lm_head`` when not quantized: plain ``weight`` tensors, named in ``ignore``.

BitNet (``quantization_config.quant_method = "bitnet"``, transformers' ``BitLinear``)
--------------------------------------------------------------------------------------
For a plan whose quantized layers are all ternary (the MatMul-free / BitNet b1.58 convention this package
evaluates: per-tensor absmean scale, 8-bit per-token absmax activations): ``<L>.weight`` uint8 ``[rows/4, cols]``
(2-bit codes ``{0, 1, 2}`` for ``{-1, 0, +1}``, four rows a byte, transformers' ``pack_weights``) and
``<L>.weight_scale`` float32 ``[1]`` = 1 / scale (BitLinear divides by it); every other linear layer is named in
``modules_to_not_convert``.

Refused (one line naming the reason and ``--format dse-packed``, which holds everything): MLGRU mixers (no stock
architecture has them), ternary layers next to integer ones, per-channel ternary scales (``refit``), BitNet layers
whose rows are not a multiple of 4, quantized layers that are not ``torch.nn.Linear`` (GPT-2's ``Conv1D``).

Every tensor the plan leaves uncompressed is stored at the storage dtype (FP16; BF16 for a bfloat16 model), which
holds the evaluated values exactly (:mod:`evaluators.compress.storage`), so the file's bytes are the hardware
report's ``weight_bytes`` plus headers. After writing, :func:`verify` loads the directory with plain
``from_pretrained`` and compares its logits with the applied model's; export refuses a directory that differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from dse.textio import replacing
from evaluators.checkpoint import (CONFIG, AppliedModel, CheckpointError, applied_model, tensor_sha256,
                                   write_model_files)
from evaluators.compress.apply import PlanApplier
from evaluators.compress.packed import PackedWeight
from evaluators.compress.modules import linear_modules

HF_WEIGHTS = "model.safetensors"
VERIFY_ATOL = 1e-4
"""Largest |logit difference| (float32) :func:`verify` accepts between the reloaded and the applied model."""
VERIFY_TOKENS = (2, 48)
"""Sequences x tokens :func:`verify` runs (fixed pseudo-random token ids, seed 0)."""


class ExportFormatError(CheckpointError):
    """The plan cannot be written in the asked format; the one-line message says why and what to use."""


def _refuse(why: str) -> ExportFormatError:
    return ExportFormatError(f"--format compressed-tensors: cannot write this plan: {why}; use --format dse-packed")


def plan_layout(plan) -> str:
    """``"compressed-tensors"`` or ``"bitnet"``: the stock layout that holds ``plan`` (a :class:`~dse.plan.ModelPlan`),
    judged from the plan alone before any model is loaded; :class:`ExportFormatError` when none does (module
    docstring)."""
    mlgru = [b.index for b in plan.blocks if b.mixer == "mlgru"]
    ternary = [lp for lp in plan.layers if lp.fmt.is_ternary]
    integer = [lp for lp in plan.layers if not lp.fmt.is_ternary and not lp.fmt.is_float]
    if mlgru:
        raise _refuse(f"blocks {', '.join(map(str, mlgru))} use MLGRU token mixers, which no stock transformers "
                      "architecture has")
    if ternary and integer:
        raise _refuse(f"it mixes ternary layers (8-bit per-token activations, BitNet) such as {ternary[0].name} "
                      f"with integer layers such as {integer[0].name}; no stock format holds both")
    refit = next((lp for lp in ternary if lp.quant == "refit"), None)
    if refit is not None:
        raise _refuse(f"layer {refit.name} has per-channel ternary scales (quant refit); BitNet holds one scale a "
                      "tensor")
    return "bitnet" if ternary else "compressed-tensors"


def layout_of(applied: AppliedModel, plan) -> str:
    """:func:`plan_layout`, then what only the model's shapes tell (BitNet packs four rows a byte)."""
    layout = plan_layout(plan)
    conv = next((lp for lp, packed, _ in applied.layers if packed.codes is not None
                 and not isinstance(applied.model.get_submodule(lp.name), torch.nn.Linear)), None)
    if conv is not None:
        kind = type(applied.model.get_submodule(conv.name)).__name__
        raise _refuse(f"layer {conv.name} is a {kind}, and {layout} quantizes torch.nn.Linear layers only")
    odd = next(((lp, packed.shape[0]) for lp, packed, _ in applied.layers
                if packed.fmt.is_ternary and packed.shape[0] % 4), None)
    if odd is not None:
        raise _refuse(f"layer {odd[0].name} has {odd[1]} output rows, not a multiple of 4 (BitNet packs 4 rows a "
                      "byte)")
    return layout


def ct_scheme(packed: PackedWeight) -> dict:
    """The compressed-tensors quantization args of one integer layer (module docstring) plus its ``format``.
    vLLM's integer kernels take ``group`` and ``channel``; ``block`` (ragged groups) is read by transformers."""
    rows, cols = packed.shape
    groups = packed.scales.shape[1]
    args = {"num_bits": packed.fmt.bits, "type": "int", "symmetric": packed.fmt.symmetric, "dynamic": False}
    if groups == 1:
        args["strategy"] = "channel"
    elif cols % packed.group_size == 0:
        args.update(strategy="group", group_size=packed.group_size)
    else:
        args.update(strategy="block", block_structure=[1, packed.group_size])
    return {"weights": args, "format": "pack-quantized" if packed.fmt.symmetric else "int-quantized"}


def ct_tensors(packed: PackedWeight, scheme) -> dict[str, torch.Tensor]:
    """One integer layer's compressed-tensors tensors (local names), made by compressed-tensors' own compressor
    from the evaluated weight, its FP16 scales and its signed zero points."""
    from compressed_tensors.compressors import BaseCompressor

    offset = 2 ** (packed.fmt.bits - 1)
    state = {"weight": packed.dequantize(), "weight_scale": packed.scales.to(torch.float16)}  # FP16 values already
    if not packed.fmt.symmetric:
        state["weight_zero_point"] = (packed.zeros - offset).round().to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return {k: v.contiguous() for k, v in compressor.compress(state, scheme).items()}


def bitnet_tensors(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """One ternary layer as transformers' ``BitLinear`` stores it (module docstring)."""
    from transformers.integrations.bitnet import pack_weights

    signed = (packed.codes.to(torch.int16) - 1)
    if packed.mask is not None:
        signed = signed * packed.mask.to(torch.int16)
    scale = packed.scales.reshape(1).float()
    return {"weight": pack_weights(signed.to(torch.int8).clone()).contiguous(), "weight_scale": (1.0 / scale)}


def _quantization_config(applied: AppliedModel, layout: str, schemes: dict[str, dict]) -> dict:
    """``config.json``'s ``quantization_config`` for ``layout``; ``schemes``: layer name -> :func:`ct_scheme`."""
    quantized = {lp.name for lp, packed, _ in applied.layers if packed.codes is not None}
    keep = [name for name in linear_modules(applied.model) if name not in quantized]
    if layout == "bitnet":
        return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                "modules_to_not_convert": keep}
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, dict] = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": [], "input_activations": None, "output_activations": None})
        groups[key]["targets"].append(name)
    config_groups = {f"group_{i}": group for i, group in enumerate(groups.values())}
    formats = {group["format"] for group in config_groups.values()}
    config = QuantizationConfig.model_validate({
        "config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "ignore": keep})
    import compressed_tensors

    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            **config.model_dump(exclude={"quant_method"}, mode="json")}


def save_hf(applier: PlanApplier, plan, out: Path, *, model_name: str | None = None,
            progress: Callable[[str], None] | None = None, verify_load: bool = True) -> list[Path]:
    """Apply ``plan`` with ``applier`` and write the compressed-tensors or BitNet directory ``out`` (module
    docstring): ``model.safetensors``, ``config.json`` with its ``quantization_config`` and ``dse_export`` (format,
    plan hash, per-layer N:M patterns, tensor sha256), generation config, tokenizer. With ``verify_load``, reload
    it with plain ``from_pretrained`` and check the logits (:func:`verify`). Returns the files written."""
    from safetensors.torch import save_file

    say = progress or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    applier.restore()
    applied = applied_model(applier, plan, say)
    layout = layout_of(applied, plan)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}
    for lp, packed, _ in applied.layers:
        if packed.codes is None:  # FP16 N:M: the masked weight as a plain tensor (below)
            continue
        if layout == "bitnet":
            parts = bitnet_tensors(packed)
        else:
            from compressed_tensors.quantization import QuantizationScheme

            schemes[lp.name] = ct_scheme(packed)
            parts = ct_tensors(packed, QuantizationScheme(targets=[lp.name], **schemes[lp.name]))
        tensors.update({f"{lp.name}.{part}": t for part, t in parts.items()})
    tensors.update(applied.uncompressed_tensors(
        include={f"{lp.name}.weight" for lp, packed, _ in applied.layers if packed.codes is None}))
    say(f"checkpoint: writing {HF_WEIGHTS} ({layout}, {len(applied.layers)} compressed layers)")
    with replacing(out / HF_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    export = {"format": layout, "model": model_name, "plan_hash": plan.hash,
              "sparsity": {lp.name: str(lp.sparsity) for lp, _, _ in applied.layers if lp.sparsity is not None},
              "tensor_sha256": {name: tensor_sha256(t) for name, t in tensors.items()}}
    written = [out / HF_WEIGHTS] + write_model_files(
        applied, out, {"quantization_config": _quantization_config(applied, layout, schemes), "dse_export": export})
    if verify_load:
        say(f"checkpoint: reloading {out} with transformers to check its logits")
        diff = verify(out, applied.model)
        say(f"checkpoint: {layout} directory reloads with max |logit difference| {diff:.2e}")
    return written


def hf_load(path: Path, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` (eval mode), plain transformers."""
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the CPU-unpacking notice of BitNet
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def verify(path: Path, model: torch.nn.Module, atol: float = VERIFY_ATOL) -> float:
    """Reload ``path`` with :func:`hf_load` and return the largest |logit difference| against ``model`` on
    :data:`VERIFY_TOKENS` fixed tokens; :class:`CheckpointError` when it exceeds ``atol`` or the load fails."""
    try:
        loaded = hf_load(path)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise CheckpointError(f"checkpoint: {path / CONFIG}: transformers cannot load the written directory "
                              f"({str(err).splitlines()[0]})") from None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, VERIFY_TOKENS, generator=generator)
    device = next(model.parameters()).device
    with torch.no_grad():
        want = model(ids.to(device)).logits.float().cpu()
        got = loaded(ids).logits.float()
    diff = float((got - want).abs().max())
    if not diff <= atol:
        raise CheckpointError(f"checkpoint: {path}: reloaded with transformers, its logits differ from the evaluated "
                              f"model's by {diff:.3g} (> {atol:g}); not exported")
    return diff
