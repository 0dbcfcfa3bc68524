"""The dse-packed checkpoint: a plan applied to a model, written packed as the hardware stores it, and reloadable.

This is the format for what no stock loader holds (MLGRU mixers, ternary layers next to integer ones, per-channel
ternary scales) and the one whose N:M layers store only their kept weights plus a bit mask, as the accelerator
does; :mod:`evaluators.hf_export` writes the formats transformers and vLLM load. A plain
``AutoModelForCausalLM.from_pretrained`` of a dse-packed directory fails (no ``model.safetensors``); it never loads
random layers.

:func:`write_checkpoint` loads the model, applies the plan with :class:`~evaluators.compress.PlanApplier`
(so every compressed layer is the very :class:`~evaluators.compress.packed.PackedWeight` the study
evaluated, read from the same layer cache) and writes one directory; :func:`load_checkpoint` rebuilds
the compressed torch model from that directory alone, with logits equal to the evaluated model's.

Directory
---------
* ``dse-packed.safetensors`` (:data:`WEIGHTS`; ``model.safetensors`` in version 2): all tensors (layout below); its metadata (string -> string) holds
  ``format`` = ``pt``, ``dse_checkpoint`` = :data:`FORMAT_VERSION` and, per compressed layer,
  ``layer:<name>`` = the JSON of that layer's record (as in ``checkpoint.json``);
* ``config.json`` (+ ``generation_config.json``): the Hugging Face config of the base model, with
  ``tie_word_embeddings`` false when ``lm_head`` is compressed (it is then a separate matrix) and ``dtype`` the
  storage dtype;
* tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...), as ``save_pretrained`` writes them;
* ``checkpoint.json``: ``format``, ``format_version``, the model name and fingerprint, the plan
  (``ModelPlan.to_dict``), the compression settings (``CompressionSpec``), the MLGRU mixers
  (block, lower bound, norm eps), ``tied_embeddings``, byte counts, ``layers``: one record per
  compressed layer (below), and ``tensor_sha256``: tensor name -> sha256 (hex) of its bytes as stored (C order,
  little-endian), for every tensor of the weights file. Written last: a directory without it is not a
  checkpoint.

Integrity: :func:`load_checkpoint` hashes every tensor it reads (sha256, about 1 s per GB) and refuses, with one
line naming the file and the tensor, a tensor whose bytes differ from its recorded sum, a tensor without a sum and
a sum without its tensor: flipped or truncated bytes never load as a silently different model. Version 1
checkpoints (written before the sums) are refused with the way out: export them again (``dse export --trial N
--checkpoint``, which reads the compressed layers from the study's cache).

Tensors of a compressed linear layer ``<L>`` (weight ``[rows, cols]`` = ``[out_features, in_features]``)
------------------------------------------------------------------------------------------------------
Every stream is row-major over the weight (index ``i = row * cols + col``) and little-endian in bits:
element ``i`` of a ``b``-bit stream occupies bits ``i*b .. i*b+b-1`` of the stream, where bit ``t`` of
the stream is bit ``t % 8`` (least significant first) of byte ``t // 8``.

* ``<L>.qweight``: uint8 ``[ceil(n*bits/8)]`` bytes, the integer codes at ``bits`` bits each
  (INT-k: ``k``; ternary: 2-bit codes ``{0, 1, 2}`` for ``{-1, 0, +1}``) of the ``n`` kept weights in stream order:
  ``n = rows*cols`` for a dense layer, the number of 1 bits of the mask for an N:M one (version 2 stored a code for
  every weight).
* ``<L>.scales``: float16 ``[rows, groups]`` (2 bytes each; float32 in version 2), ``groups = ceil(cols / scale_group)``; ternary:
  ``[1, 1]`` (absmean, per tensor) or ``[rows, 1]`` (refit, per output channel).
* ``<L>.zeros``: uint8 ``[rows, groups]`` zero points (1 byte each), for asymmetric formats; symmetric
  INT-k has the implicit zero ``2**(k-1)`` and ternary ``1`` (``zero_point`` in the record, no tensor).
* ``<L>.nm_mask``: uint8 ``[ceil(rows*cols/8)]`` bytes, one bit per weight, 1 = kept (N:M layers only).
* ``<L>.values``: the storage dtype ``[kept]`` (2 bytes each), only for format ``16`` with N:M sparsity: the kept
  weights in stream order; no ``qweight``/``scales`` then.

The weight is ``W[r, c] = scales[r, c // scale_group] * (code[r, c] - zero[r, c // scale_group]) * mask[r, c]``
in float32 (:meth:`PackedWeight.dequantize`). Scales are FP16 (the evaluation rounds them so,
:mod:`evaluators.compress.storage`), so the reloaded model runs on exactly the values that were evaluated. Inputs of ternary layers are
quantised to 8 bits per token at run time (absmax, ``act_bits`` in the record; not stored).

A layer record: ``name``, ``format`` (``"2"``..``"8"``, ``"ternary"``, ``"16"``), ``bits`` (code bits),
``group_size`` (plan), ``scale_group`` (inputs per scale column, as stored), ``symmetric``, ``zero_point``
(symmetric only), ``sparsity`` (``"2:4"`` or ``"dense"``), ``prune``, ``quant``, ``shape`` ``[rows, cols]``,
``act_bits`` (ternary: 8, else null), ``inherited_from`` (an MLGRU projection the plan did not name: the
attention layer whose plan it took, else null), ``tensors`` (part -> tensor name) and ``bytes`` (stored).

Everything else (embeddings, norms, uncompressed linear layers, MLGRU ``g_norm.weight`` and
``lower_bound``, a bias of a compressed layer) is an ordinary tensor under its ``state_dict`` name, at the storage
dtype (FP16, or BF16 for a bfloat16 model) when that holds it exactly (always for the base model's tensors), else
float32 (distilled MLGRU weights). ``values`` of an FP16 N:M layer likewise. With tied embeddings and an uncompressed ``lm_head`` only ``model.embed_tokens.weight`` is stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dse.errors import UserError
from dse.plan import CHECKPOINT_FORMATS, LayerPlan, ModelPlan, WeightFormat
from dse.textio import replacing
from evaluators.settings import CompressionSpec
from evaluators.compress import mlgru as mlgru_mod
from evaluators.compress.apply import PlanApplier
from evaluators.compress.modules import weight_of
from evaluators.compress.cache import CompressionCache
from evaluators.compress.grid import TERNARY_ZERO
from evaluators.compress.packed import PackedWeight
from evaluators.compress.ternary import ACT_BITS, BitLinearForward

FORMAT = "dse-compressed-checkpoint"
FORMAT_VERSION = 3
"""2: version 1 plus ``tensor_sha256`` (version 1 is refused: no sums to check); 3: the weights file is
:data:`WEIGHTS`, not ``model.safetensors`` (so ``from_pretrained`` fails instead of loading random layers), scales
FP16 and uncompressed tensors at the storage dtype. Versions 2 and 3 are read."""
WEIGHTS = "dse-packed.safetensors"
WEIGHTS_OF_VERSION = {2: "model.safetensors", 3: WEIGHTS}
MANIFEST = "checkpoint.json"
CONFIG = "config.json"

__all__ = ["write_checkpoint", "load_checkpoint", "CHECKPOINT_FORMATS", "save_applied", "read_manifest", "CheckpointError",
           "pack_codes", "unpack_codes", "pack_mask", "unpack_mask", "tensor_sha256", "FORMAT_VERSION"]


class CheckpointError(UserError, ValueError):
    """A directory that is not a readable checkpoint; the one-line message names the file."""


# ---------------------------------------------------------------------------------------------- bit streams

_CHUNK = 1 << 20  # groups of 8 codes per numpy pass (bounds the uint64 temporaries to 64 MB)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer ``codes`` (< 2**bits) -> uint8 stream of ``ceil(n*bits/8)`` bytes, ``bits`` per code, little-endian
    (the layout of :func:`evaluators.compress.packed.pack_bits`, computed 8 codes -> ``bits`` bytes at a time)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits {bits} is not in 1..8")
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    n = flat.size
    if bits == 8:
        return torch.from_numpy(flat.copy())
    if n and int(flat.max()) >= 1 << bits:
        raise ValueError(f"pack_codes: a code {int(flat.max())} does not fit in {bits} bits")
    groups = np.pad(flat, (0, (-n) % 8)).reshape(-1, 8)
    out = np.empty((groups.shape[0], bits), dtype=np.uint8)
    for start in range(0, groups.shape[0], _CHUNK):
        part = groups[start:start + _CHUNK].astype(np.uint64)
        word = np.zeros(part.shape[0], dtype=np.uint64)
        for j in range(8):
            word |= part[:, j] << np.uint64(j * bits)
        out[start:start + _CHUNK] = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    return torch.from_numpy(out.reshape(-1)[: math.ceil(n * bits / 8)].copy())


def unpack_codes(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` codes as a uint8 tensor."""
    data = stream.reshape(-1).to(torch.uint8).numpy()
    if data.size != math.ceil(count * bits / 8):
        raise ValueError(f"unpack_codes: {data.size} bytes, expected {math.ceil(count * bits / 8)} for "
                         f"{count} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(data.copy())
    n_groups = math.ceil(count / 8)
    padded = np.zeros((n_groups, 8), dtype=np.uint8)
    padded[:, :bits] = np.pad(data, (0, n_groups * bits - data.size)).reshape(n_groups, bits)
    out = np.empty((n_groups, 8), dtype=np.uint8)
    word_all = padded.view("<u8").reshape(-1)
    low = np.uint64((1 << bits) - 1)
    for start in range(0, n_groups, _CHUNK):
        word = word_all[start:start + _CHUNK]
        for j in range(8):
            out[start:start + _CHUNK, j] = (word >> np.uint64(j * bits)) & low
    return torch.from_numpy(out.reshape(-1)[:count].copy())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``mask`` -> uint8 stream of ``ceil(n/8)`` bytes, one bit per weight, little-endian."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).bool().numpy(), bitorder="little"))


def unpack_mask(stream: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``count`` booleans."""
    return torch.from_numpy(np.unpackbits(stream.reshape(-1).numpy(), bitorder="little")[:count].astype(bool))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's bytes as safetensors stores them: C order, native (little-endian) byte order."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# ---------------------------------------------------------------------------------------------- one layer

def implicit_zero(fmt: WeightFormat) -> float | None:
    """The zero point a symmetric INT-k (``2**(k-1)``) or ternary (1) grid implies; None when asymmetric."""
    if fmt.is_ternary:
        return TERNARY_ZERO
    if fmt.is_float or not fmt.symmetric:
        return None
    return float(2 ** (fmt.bits - 1))


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype`` when that holds every value exactly, else as float32."""
    narrow = t.to(dtype)
    return (narrow if torch.equal(narrow.float(), t.float()) else t.float()).contiguous()


def encode_layer(lp: LayerPlan, packed: PackedWeight, inherited_from: str | None = None,
                 dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict]:
    """One compressed layer -> (tensors by part name, its record); the module docstring gives the layout.
    ``dtype``: the storage dtype of kept FP16 values."""
    rows, cols = packed.shape
    fmt = packed.fmt
    parts: dict[str, torch.Tensor] = {}
    record: dict = {"name": lp.name, "format": fmt.name, "bits": None if fmt.is_float else fmt.bits,
                    "group_size": fmt.group_size, "scale_group": None, "symmetric": fmt.symmetric,
                    "zero_point": None, "sparsity": "dense" if lp.sparsity is None else str(lp.sparsity),
                    "prune": lp.prune, "quant": lp.quant, "shape": [rows, cols],
                    "act_bits": ACT_BITS if fmt.is_ternary else None, "inherited_from": inherited_from}
    if packed.mask is not None:
        parts["nm_mask"] = pack_mask(packed.mask)
    if packed.codes is None:  # format 16 with N:M: kept values only
        if packed.mask is None:
            raise ValueError(f"layer {lp.name}: an unquantised layer without a mask is not compressed")
        parts["values"] = _narrow(packed.values.float()[packed.mask.bool()], dtype)
    else:
        kept = packed.codes if packed.mask is None else packed.codes[packed.mask.bool()]
        parts["qweight"] = pack_codes(kept, fmt.bits)
        parts["scales"] = _narrow(packed.scales.float(), torch.float16)
        record["scale_group"] = int(packed.group_size)
        zero = implicit_zero(fmt)
        zeros = packed.zeros.float()
        if zero is not None and bool((zeros == zero).all()):
            record["zero_point"] = zero
        else:
            if not bool(((zeros == zeros.round()) & (zeros >= 0) & (zeros <= 255)).all()):
                raise ValueError(f"layer {lp.name}: zero points are not integers in 0..255")
            parts["zeros"] = zeros.to(torch.uint8).contiguous()
    record["bytes"] = sum(t.numel() * t.element_size() for t in parts.values())
    return parts, record


def decode_layer(record: dict, parts: dict[str, torch.Tensor], version: int = FORMAT_VERSION) -> PackedWeight:
    """Inverse of :func:`encode_layer` (``parts`` by part name; ``version``: the checkpoint's format version)."""
    rows, cols = (int(x) for x in record["shape"])
    fmt = WeightFormat(str(record["format"]), int(record["group_size"]), bool(record["symmetric"]))
    mask = unpack_mask(parts["nm_mask"], rows * cols).reshape(rows, cols) if "nm_mask" in parts else None
    if "values" in parts:
        values = torch.zeros(rows, cols, dtype=torch.float32)
        values[mask] = parts["values"].float()
        return PackedWeight(fmt=fmt, values=values, mask=mask)
    if mask is None or version < 3:
        codes = unpack_codes(parts["qweight"], fmt.bits, rows * cols).reshape(rows, cols)
    else:  # kept weights only; pruned ones get code 0, which the mask zeroes
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        codes[mask] = unpack_codes(parts["qweight"], fmt.bits, int(mask.sum()))
    scales = parts["scales"].float()
    zeros = parts["zeros"].float() if "zeros" in parts else torch.full_like(scales, float(record["zero_point"]))
    return PackedWeight(fmt=fmt, codes=codes, scales=scales, zeros=zeros, group_size=int(record["scale_group"]),
                        mask=mask)


# ---------------------------------------------------------------------------------------------- writing

def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def _dense_fp32_bytes(model: torch.nn.Module) -> int:
    """Bytes of the dense model's state dict at 4 bytes a value, tied embeddings counted once (call it on the
    restored dense model: no MLGRU installed)."""
    head = _module_name(model, model.get_output_embeddings())
    skip = f"{head}.weight" if getattr(model.config, "tie_word_embeddings", False) and head else None
    seen: set = set()
    total = 0
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if name != skip and key not in seen:
            seen.add(key)
            total += t.numel() * 4
    return total


@dataclass
class AppliedModel:
    """A plan applied to a model, as every checkpoint format writes it (:func:`applied_model`)."""

    model: torch.nn.Module
    tokenizer: object
    storage_dtype: torch.dtype
    layers: list[tuple[LayerPlan, PackedWeight, str | None]]
    """Every compressed layer: its plan, the weight the evaluation used, the attention layer an MLGRU projection
    the plan did not name inherited its plan from (else None)."""
    tied: bool
    """Whether the output embedding is the input embedding (stored once)."""
    head_weight: str | None
    mixers: list[dict]
    """The installed MLGRU mixers: block, type, hidden, lower_bound, eps."""

    @property
    def compressed_weights(self) -> set[str]:
        return {f"{lp.name}.weight" for lp, _, _ in self.layers}

    def uncompressed_tensors(self, include: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Every other tensor of the state dict (not the tied head; the compressed weights named in ``include``
        too, as the module holds them) at :attr:`storage_dtype` where that holds its value exactly (all of the base
        model's, :mod:`evaluators.compress.storage`), else float32 (distilled MLGRU weights)."""
        skip = (self.compressed_weights - set(include)) | ({self.head_weight} if self.tied else set())
        out = {}
        for name, t in self.model.state_dict().items():
            if name in skip:
                continue
            t = t.detach().float()
            narrow = t.to(self.storage_dtype)
            out[name] = (narrow if torch.equal(narrow.float(), t) else t).contiguous().clone()
        return out


def applied_model(applier: PlanApplier, plan: ModelPlan, say: Callable[[str], None]) -> AppliedModel:
    """Apply ``plan`` with ``applier`` (loading from its cache what it computed before) and collect what a
    checkpoint stores; every compressed layer's weight is checked equal to the applied module's."""
    model = applier.model
    say(f"checkpoint: applying the plan ({len(plan.layers)} layer plans, {len(plan.blocks)} block plans)")
    applier.apply(plan)
    keys = applier.layer_keys(plan)
    named = {lp.name for lp in plan.layers}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    head_weight = f"{_module_name(model, head)}.weight" if head is not None else None
    tied = emb is not None and head is not None and (
        head.weight is emb.weight  # as loaded; or untied by an earlier plan on this applier, uncompressed now
        or (getattr(model.config, "tie_word_embeddings", False) and head_weight[:-len(".weight")] not in keys
            and head.weight.shape == emb.weight.shape and torch.equal(head.weight, emb.weight)))
    layers = []
    for lp in applier.effective_layers(plan):
        packed = applier.cache.load_layer(keys[lp.name])
        if packed is None:
            raise RuntimeError(f"checkpoint: layer {lp.name}: no cache entry after apply (key {keys[lp.name]})")
        if not torch.equal(packed.dequantize(), weight_of(model.get_submodule(lp.name)).detach().float()):
            raise RuntimeError(f"checkpoint: layer {lp.name}: the cached weight differs from the applied one")
        inherited = applier.workload.mlgru_counterpart(lp.name) if ".mlgru." in lp.name and lp.name not in named \
            else None
        layers.append((lp, packed, inherited))
    mixers = [{"block": b, "type": "mlgru", "hidden": int(applier.blocks[b].mlgru.hidden),
               "lower_bound": float(applier.blocks[b].mlgru.lower_bound),
               "eps": float(applier.blocks[b].mlgru.g_norm.eps)}
              for b in mlgru_mod.installed_blocks(model)]
    return AppliedModel(model, applier.tokenizer, applier.storage_dtype, layers, tied, head_weight, mixers)


def write_model_files(applied: AppliedModel, out: Path, config_updates: dict | None = None) -> list[Path]:
    """``config.json`` (the model's, untied when the head was compressed, ``dtype`` the storage dtype, plus
    ``config_updates``), ``generation_config.json`` and the tokenizer files into ``out``; returns them."""
    model = applied.model
    config = copy.deepcopy(model.config)
    if not applied.tied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # lm_head was untied to be compressed: a matrix of its own
    config.save_pretrained(out)
    data = json.loads((out / CONFIG).read_text())
    data["dtype"] = str(applied.storage_dtype).replace("torch.", "")
    data.pop("torch_dtype", None)
    data.update(config_updates or {})
    (out / CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    written = [out / CONFIG]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
        written.append(out / "generation_config.json")
    if applied.tokenizer is not None:
        saved = applied.tokenizer.save_pretrained(str(out))
        written.extend(Path(p) for p in saved if Path(p).exists() and Path(p) not in written)
    return written


def save_applied(applier: PlanApplier, plan: ModelPlan, out: Path, *, model_name: str | None = None,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Apply ``plan`` with ``applier`` (loading from its cache what it computed before) and write the dse-packed
    checkpoint directory ``out`` (module docstring). ``applier.model`` is left with the plan applied. Returns the
    files written. :func:`write_checkpoint` is this on a freshly loaded model."""
    say = progress or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-written directory must not pass for a checkpoint
    applier.restore()
    dense_bytes = _dense_fp32_bytes(applier.model)
    applied = applied_model(applier, plan, say)
    tensors: dict[str, torch.Tensor] = {}
    records: list[dict] = []
    for lp, packed, inherited in applied.layers:
        parts, record = encode_layer(lp, packed, inherited, applied.storage_dtype)
        if not torch.equal(decode_layer(record, parts).dequantize(), packed.dequantize()):
            raise RuntimeError(f"checkpoint: layer {lp.name}: the packed weight differs from the applied one")
        record["tensors"] = {part: f"{lp.name}.{part}" for part in parts}
        tensors.update({f"{lp.name}.{part}": t for part, t in parts.items()})
        records.append(record)
    tensors.update(applied.uncompressed_tensors())

    metadata = {"format": "pt", "dse_checkpoint": str(FORMAT_VERSION)}
    metadata.update({f"layer:{r['name']}": json.dumps(r, sort_keys=True) for r in records})
    from safetensors.torch import save_file

    say(f"checkpoint: writing {WEIGHTS} ({len(records)} packed layers, {len(tensors)} tensors)")
    with replacing(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    written = [out / WEIGHTS] + write_model_files(applied, out)

    model = applied.model
    file_bytes = (out / WEIGHTS).stat().st_size
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": model_name or getattr(model.config, "_name_or_path", None),
        "model_fingerprint": applier.cache.fingerprint,
        "plan": plan.to_dict(), "plan_hash": plan.hash,
        "compression": asdict(applier.settings),
        "mixers": applied.mixers,
        "tied_embeddings": applied.tied,
        "output_embeddings": applied.head_weight,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(applied.storage_dtype).replace("torch.", ""),
        "sizes": {"weights_file_bytes": file_bytes, "dense_fp32_bytes": dense_bytes,
                  "packed_layer_bytes": sum(r["bytes"] for r in records),
                  "ratio_dense_to_file": round(dense_bytes / file_bytes, 4)},
        "layers": records,
        "tensor_sha256": {name: tensor_sha256(t) for name, t in tensors.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    written.append(out / MANIFEST)
    say(f"checkpoint: {out} ({file_bytes / 1e6:.1f} MB of tensors; dense FP32 {dense_bytes / 1e6:.1f} MB)")
    return written


def write_checkpoint(model: str, plan: ModelPlan, compression: CompressionSpec | None, out: Path,
                     progress: Callable[[str], None] | None = None, *,
                     cache: CompressionCache | None = None, format: str = "compressed-tensors",
                     verify: bool = True) -> list[Path]:
    """Load ``model`` (:func:`evaluators.models.load_model`), apply ``plan`` with
    ``PlanApplier(model, tokenizer, compression)`` (layers from the cache the study's evaluation filled; ``cache``
    chooses another one, e.g. in tests) and write the checkpoint directory ``out`` in ``format``
    (:data:`CHECKPOINT_FORMATS`). Returns the files written. A plan the format cannot hold is refused
    (:class:`~evaluators.hf_export.ExportFormatError`) before the model is loaded. ``verify``: reload a
    compressed-tensors/BitNet directory with transformers and check its logits (a second copy of the model in
    memory; :func:`evaluators.hf_export.verify`)."""
    from evaluators import hf_export
    from evaluators.models import load_model

    if format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"--format: '{format}' is not one of {', '.join(CHECKPOINT_FORMATS)}")
    if format == "compressed-tensors":
        hf_export.plan_layout(plan)
    say = progress or (lambda message: None)
    say(f"checkpoint: loading {model}")
    net, tokenizer = load_model(model)
    applier = PlanApplier(net, tokenizer, compression, cache=cache, progress=progress)
    if format == "dse-packed":
        return save_applied(applier, plan, Path(out), model_name=model, progress=progress)
    return hf_export.save_hf(applier, plan, Path(out), model_name=model, progress=progress, verify_load=verify)


# ---------------------------------------------------------------------------------------------- reading

def _json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing (not a directory written by write_checkpoint)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint: {path} is not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint: {path} is not a JSON object")
    return data


def read_manifest(path: Path) -> dict:
    """``checkpoint.json`` of the checkpoint directory ``path``, checked for format and version
    (:class:`CheckpointError`, a ValueError naming the file, when it is not one this package reads)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory")
    manifest_path = path / MANIFEST
    manifest = _json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") == 1:
        raise CheckpointError(f"checkpoint: {manifest_path}: format version 1 has no tensor checksums and is not "
                              f"loaded; write the checkpoint again (dse export --trial N --checkpoint)")
    if manifest.get("format_version") not in WEIGHTS_OF_VERSION:
        raise CheckpointError(f"checkpoint: {manifest_path}: format version {manifest.get('format_version')!r} "
                              f"is not supported (this package reads {', '.join(map(str, WEIGHTS_OF_VERSION))})")
    for name in (WEIGHTS_OF_VERSION[manifest["format_version"]], CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint: {path / name} is missing")
    return manifest


def check_sums(stored: dict[str, torch.Tensor], manifest: dict, weights: Path, where: str = MANIFEST) -> None:
    """Every tensor read from ``weights`` against the ``tensor_sha256`` of ``manifest`` (read from the file named
    ``where``; module docstring): one-line :class:`CheckpointError` naming the file and the first tensor that
    differs, has no sum, or is missing."""
    sums = manifest.get("tensor_sha256")
    if not isinstance(sums, dict):
        raise CheckpointError(f"checkpoint: {weights.with_name(where)}: tensor_sha256 is missing")
    for name, tensor in stored.items():
        if name not in sums:
            raise CheckpointError(f"checkpoint: {weights}: tensor {name} has no sha256 in {where}")
        if tensor_sha256(tensor) != sums[name]:
            raise CheckpointError(f"checkpoint: {weights}: tensor {name} does not match its sha256 in {where} "
                                  f"(the file is damaged or was changed)")
    absent = sorted(set(sums) - set(stored))
    if absent:
        raise CheckpointError(f"checkpoint: {weights}: tensor {absent[0]} named in {where} is missing")


def _load_stock(path: Path) -> tuple[torch.nn.Module, object]:
    """A compressed-tensors or BitNet directory (:mod:`evaluators.hf_export`): plain ``from_pretrained`` in
    float32, after checking every tensor against ``dse_export.tensor_sha256``."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoTokenizer

    from evaluators.hf_export import HF_WEIGHTS, hf_load

    weights = path / HF_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = {k: handle.get_tensor(k) for k in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint: {weights}: not a readable safetensors file "
                              f"({str(err).splitlines()[0]})") from None
    check_sums(stored, _json(path / CONFIG)["dse_export"], weights, CONFIG)
    model = hf_load(path)
    return model, AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").exists() else None


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, object]:
    """Rebuild the compressed model from a directory written by :func:`write_checkpoint`, without the original
    model or cache. A compressed-tensors or BitNet directory is loaded by transformers (:func:`_load_stock`). A
    dse-packed one: the model from ``config.json`` (``AutoModelForCausalLM.from_config``), MLGRU mixers in the
    blocks the checkpoint names, dense tensors loaded, each compressed layer's weight set to its unpacked
    ``PackedWeight.dequantize()``, the 8-bit activation pre-hook on ternary layers. Every tensor is checked
    against its sha256 first (:func:`check_sums`). Returns ``(model, tokenizer)``,
    the model in eval mode (tokenizer None when the directory has none)."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / MANIFEST).exists() and (path / CONFIG).is_file() and "dse_export" in _json(path / CONFIG):
        return _load_stock(path)
    manifest = read_manifest(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint: {path / CONFIG}: {str(err).splitlines()[0]}") from None
    weights = path / WEIGHTS_OF_VERSION[manifest["format_version"]]
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint: {weights}: not a readable safetensors file "
                              f"({str(err).splitlines()[0]})") from None
    if metadata.get("dse_checkpoint") != str(manifest["format_version"]):
        raise CheckpointError(f"checkpoint: {weights}: dse_checkpoint version {metadata.get('dse_checkpoint')!r} "
                              f"is not {manifest['format_version']}")
    check_sums(stored, manifest, weights)

    kwargs = {"dtype": torch.float32}
    if manifest.get("attn_implementation"):
        kwargs["attn_implementation"] = manifest["attn_implementation"]
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval().requires_grad_(False)
    if not manifest.get("tied_embeddings", True):
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and emb is not None and head.weight is emb.weight:
            head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for mixer in manifest.get("mixers", []):
        block = int(mixer["block"])
        module = mlgru_mod.MLGRU(int(mixer["hidden"]), float(mixer["lower_bound"]), eps=float(mixer["eps"]))
        mlgru_mod.install(model, block, module.eval().requires_grad_(False))

    records = manifest.get("layers", [])
    packed_names = {t for r in records for t in r.get("tensors", {}).values()}
    missing_parts = sorted(packed_names - set(stored))
    if missing_parts:
        raise CheckpointError(f"checkpoint: {weights}: tensor {missing_parts[0]} named in {MANIFEST} is missing")
    dense = {k: v for k, v in stored.items() if k not in packed_names}
    result = model.load_state_dict(dense, strict=False)
    expected_missing = {f"{r['name']}.weight" for r in records}
    if manifest.get("tied_embeddings") and manifest.get("output_embeddings"):
        expected_missing.add(manifest["output_embeddings"])
    unexpected = sorted(result.unexpected_keys)
    missing = sorted(set(result.missing_keys) - expected_missing)
    if unexpected or missing:
        what = f"unexpected tensor {unexpected[0]}" if unexpected else f"no tensor for {missing[0]}"
        raise CheckpointError(f"checkpoint: {weights}: {what} (does {CONFIG} describe this model?)")
    with torch.no_grad():
        for record in records:
            module = model.get_submodule(record["name"])
            parts = {part: stored[name] for part, name in record["tensors"].items()}
            decoded = decode_layer(record, parts, manifest["format_version"])
            weight, target = decoded.dequantize(), weight_of(module)
            if tuple(weight.shape) != tuple(target.shape):
                raise CheckpointError(f"checkpoint: {weights}: layer {record['name']} has shape "
                                      f"{tuple(weight.shape)}, the model {tuple(target.shape)}")
            target.copy_(weight.to(target.dtype))
            if record["format"] == "ternary":
                BitLinearForward.install(module, decoded)
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
