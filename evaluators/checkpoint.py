"""Exported compressed checkpoints: a plan applied to a model, written packed for hardware and reloadable.

:func:`write_checkpoint` loads the model, applies the plan with :class:`~evaluators.compress.PlanApplier`
(so every compressed layer is the very :class:`~evaluators.compress.packed.PackedWeight` the study
evaluated, read from the same layer cache) and writes one directory; :func:`load_checkpoint` rebuilds
the compressed torch model from that directory alone, with logits equal to the evaluated model's.

Directory
---------
* ``model.safetensors``: all tensors (layout below); its metadata (string -> string) holds
  ``format`` = ``pt``, ``dse_checkpoint`` = :data:`FORMAT_VERSION` and, per compressed layer,
  ``layer:<name>`` = the JSON of that layer's record (as in ``checkpoint.json``);
* ``config.json`` (+ ``generation_config.json``): the Hugging Face config of the base model, with
  ``tie_word_embeddings`` false when ``lm_head`` is compressed (it is then a separate matrix);
* tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...), as ``save_pretrained`` writes them;
* ``checkpoint.json``: ``format``, ``format_version``, the model name and fingerprint, the plan
  (``ModelPlan.to_dict``), the compression settings (``CompressionSpec``), the MLGRU mixers
  (block, lower bound, norm eps), ``tied_embeddings``, byte counts, ``layers``: one record per
  compressed layer (below), and ``tensor_sha256``: tensor name -> sha256 (hex) of its bytes as stored (C order,
  little-endian), for every tensor of ``model.safetensors``. Written last: a directory without it is not a
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

* ``<L>.qweight``: uint8 ``[ceil(rows*cols*bits/8)]`` bytes, the integer codes at ``bits`` bits each
  (INT-k: ``k``; ternary: 2-bit codes ``{0, 1, 2}`` for ``{-1, 0, +1}``). Pruned weights hold a code too
  (the zero point); the mask below zeroes them.
* ``<L>.scales``: float32 ``[rows, groups]`` (4 bytes each), ``groups = ceil(cols / scale_group)``; ternary:
  ``[1, 1]`` (absmean, per tensor) or ``[rows, 1]`` (refit, per output channel).
* ``<L>.zeros``: uint8 ``[rows, groups]`` zero points (1 byte each), for asymmetric formats; symmetric
  INT-k has the implicit zero ``2**(k-1)`` and ternary ``1`` (``zero_point`` in the record, no tensor).
* ``<L>.nm_mask``: uint8 ``[ceil(rows*cols/8)]`` bytes, one bit per weight, 1 = kept (N:M layers only).
* ``<L>.values``: float32 ``[kept]`` (4 bytes each), only for format ``16`` with N:M sparsity: the kept
  weights in stream order (``kept`` = number of 1 bits of the mask); no ``qweight``/``scales`` then.

The weight is ``W[r, c] = scales[r, c // scale_group] * (code[r, c] - zero[r, c // scale_group]) * mask[r, c]``
in float32 (:meth:`PackedWeight.dequantize`). Scales are stored in float32, not the FP16 the cost model
counts, so the reloaded model runs on exactly the values that were evaluated. Inputs of ternary layers are
quantised to 8 bits per token at run time (absmax, ``act_bits`` in the record; not stored).

A layer record: ``name``, ``format`` (``"2"``..``"8"``, ``"ternary"``, ``"16"``), ``bits`` (code bits),
``group_size`` (plan), ``scale_group`` (inputs per scale column, as stored), ``symmetric``, ``zero_point``
(symmetric only), ``sparsity`` (``"2:4"`` or ``"dense"``), ``prune``, ``quant``, ``shape`` ``[rows, cols]``,
``act_bits`` (ternary: 8, else null), ``inherited_from`` (an MLGRU projection the plan did not name: the
attention layer whose plan it took, else null), ``tensors`` (part -> tensor name) and ``bytes`` (stored).

Everything else (embeddings, norms, uncompressed linear layers, MLGRU ``g_norm.weight`` and
``lower_bound``, a bias of a compressed layer) is an ordinary float32 tensor under its ``state_dict``
name. With tied embeddings and an uncompressed ``lm_head`` only ``model.embed_tokens.weight`` is stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dse.errors import UserError
from dse.plan import LayerPlan, ModelPlan, WeightFormat
from dse.textio import replacing
from evaluators.settings import CompressionSpec
from evaluators.compress import mlgru as mlgru_mod
from evaluators.compress.apply import PlanApplier
from evaluators.compress.modules import weight_of
from evaluators.compress.cache import CompressionCache
from evaluators.compress.grid import TERNARY_ZERO
from evaluators.compress.packed import PackedWeight
from evaluators.compress.ternary import ACT_BITS, activation_hook

FORMAT = "dse-compressed-checkpoint"
FORMAT_VERSION = 2
"""2: version 1 plus ``tensor_sha256`` (version 1 is refused: no sums to check)."""
WEIGHTS = "model.safetensors"
MANIFEST = "checkpoint.json"
CONFIG = "config.json"

__all__ = ["write_checkpoint", "load_checkpoint", "save_applied", "read_manifest", "CheckpointError",
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
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy()).hexdigest()


# ---------------------------------------------------------------------------------------------- one layer

def implicit_zero(fmt: WeightFormat) -> float | None:
    """The zero point a symmetric INT-k (``2**(k-1)``) or ternary (1) grid implies; None when asymmetric."""
    if fmt.is_ternary:
        return TERNARY_ZERO
    if fmt.is_float or not fmt.symmetric:
        return None
    return float(2 ** (fmt.bits - 1))


def encode_layer(lp: LayerPlan, packed: PackedWeight, inherited_from: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """One compressed layer -> (tensors by part name, its record); the module docstring gives the layout."""
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
        parts["values"] = packed.values.float()[packed.mask.bool()].contiguous()
    else:
        parts["qweight"] = pack_codes(packed.codes, fmt.bits)
        parts["scales"] = packed.scales.float().contiguous()
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


def decode_layer(record: dict, parts: dict[str, torch.Tensor]) -> PackedWeight:
    """Inverse of :func:`encode_layer` (``parts`` by part name)."""
    rows, cols = (int(x) for x in record["shape"])
    fmt = WeightFormat(str(record["format"]), int(record["group_size"]), bool(record["symmetric"]))
    mask = unpack_mask(parts["nm_mask"], rows * cols).reshape(rows, cols) if "nm_mask" in parts else None
    if "values" in parts:
        values = torch.zeros(rows, cols, dtype=torch.float32)
        values[mask] = parts["values"].float()
        return PackedWeight(fmt=fmt, values=values, mask=mask)
    codes = unpack_codes(parts["qweight"], fmt.bits, rows * cols).reshape(rows, cols)
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


def save_applied(applier: PlanApplier, plan: ModelPlan, out: Path, *, model_name: str | None = None,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Apply ``plan`` with ``applier`` (loading from its cache what it computed before) and write the checkpoint
    directory ``out`` (module docstring). ``applier.model`` is left with the plan applied. Returns the files
    written. :func:`write_checkpoint` is this on a freshly loaded model."""
    say = progress or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-written directory must not pass for a checkpoint
    model = applier.model
    applier.restore()
    dense_bytes = _dense_fp32_bytes(model)
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

    tensors: dict[str, torch.Tensor] = {}
    records: list[dict] = []
    compressed_weights: set[str] = set()
    for lp in applier.effective_layers(plan):
        packed = applier.cache.load_layer(keys[lp.name])
        if packed is None:
            raise RuntimeError(f"checkpoint: layer {lp.name}: no cache entry after apply (key {keys[lp.name]})")
        inherited = None
        if ".mlgru." in lp.name and lp.name not in named:
            inherited = applier.workload.mlgru_counterpart(lp.name)
        parts, record = encode_layer(lp, packed, inherited)
        module = model.get_submodule(lp.name)
        if not torch.equal(decode_layer(record, parts).dequantize(), weight_of(module).detach().float()):
            raise RuntimeError(f"checkpoint: layer {lp.name}: the packed weight differs from the applied one")
        record["tensors"] = {part: f"{lp.name}.{part}" for part in parts}
        tensors.update({f"{lp.name}.{part}": t for part, t in parts.items()})
        records.append(record)
        compressed_weights.add(f"{lp.name}.weight")
    for name, t in model.state_dict().items():
        if name in compressed_weights or (tied and name == head_weight):
            continue
        tensors[name] = t.detach().float().contiguous().clone()
    mixers = [{"block": b, "type": "mlgru", "hidden": int(applier.blocks[b].mlgru.hidden),
               "lower_bound": float(applier.blocks[b].mlgru.lower_bound),
               "eps": float(applier.blocks[b].mlgru.g_norm.eps)}
              for b in mlgru_mod.installed_blocks(model)]

    metadata = {"format": "pt", "dse_checkpoint": str(FORMAT_VERSION)}
    metadata.update({f"layer:{r['name']}": json.dumps(r, sort_keys=True) for r in records})
    written: list[Path] = []
    from safetensors.torch import save_file

    say(f"checkpoint: writing {WEIGHTS} ({len(records)} packed layers, {len(tensors)} tensors)")
    with replacing(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    written.append(out / WEIGHTS)

    config = copy.deepcopy(model.config)
    if not tied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # lm_head was untied to be compressed: a matrix of its own
    config.save_pretrained(out)
    written.append(out / CONFIG)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
        written.append(out / "generation_config.json")
    if applier.tokenizer is not None:
        saved = applier.tokenizer.save_pretrained(str(out))
        written.extend(Path(p) for p in saved if Path(p).exists() and Path(p) not in written)

    file_bytes = (out / WEIGHTS).stat().st_size
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": model_name or getattr(model.config, "_name_or_path", None),
        "model_fingerprint": applier.cache.fingerprint,
        "plan": plan.to_dict(), "plan_hash": plan.hash,
        "compression": asdict(applier.settings),
        "mixers": mixers,
        "tied_embeddings": tied,
        "output_embeddings": head_weight,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": "float32",
        "sizes": {"model_safetensors_bytes": file_bytes, "dense_fp32_bytes": dense_bytes,
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
                     cache: CompressionCache | None = None) -> list[Path]:
    """Load ``model`` (:func:`evaluators.models.load_model`), apply ``plan`` with
    ``PlanApplier(model, tokenizer, compression)`` (layers from the cache the study's evaluation filled; ``cache``
    chooses another one, e.g. in tests) and write into ``out``: ``model.safetensors``, ``config.json``, the
    tokenizer files and ``checkpoint.json`` (module docstring). Returns the files written."""
    from evaluators.models import load_model

    say = progress or (lambda message: None)
    say(f"checkpoint: loading {model}")
    net, tokenizer = load_model(model)
    applier = PlanApplier(net, tokenizer, compression, cache=cache, progress=progress)
    return save_applied(applier, plan, Path(out), model_name=model, progress=progress)


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {manifest_path}: format version {manifest.get('format_version')!r} "
                              f"is not supported (this package reads {FORMAT_VERSION})")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint: {path / name} is missing")
    return manifest


def check_sums(stored: dict[str, torch.Tensor], manifest: dict, weights: Path) -> None:
    """Every tensor read from ``weights`` against the manifest's ``tensor_sha256`` (module docstring): one-line
    :class:`CheckpointError` naming the file and the first tensor that differs, has no sum, or is missing."""
    sums = manifest.get("tensor_sha256")
    if not isinstance(sums, dict):
        raise CheckpointError(f"checkpoint: {weights.with_name(MANIFEST)}: tensor_sha256 is missing")
    for name, tensor in stored.items():
        if name not in sums:
            raise CheckpointError(f"checkpoint: {weights}: tensor {name} has no sha256 in {MANIFEST}")
        if tensor_sha256(tensor) != sums[name]:
            raise CheckpointError(f"checkpoint: {weights}: tensor {name} does not match its sha256 in {MANIFEST} "
                                  f"(the file is damaged or was changed)")
    absent = sorted(set(sums) - set(stored))
    if absent:
        raise CheckpointError(f"checkpoint: {weights}: tensor {absent[0]} named in {MANIFEST} is missing")


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, object]:
    """Rebuild the compressed model from a directory written by :func:`write_checkpoint`, without the original
    model or cache: the model from ``config.json`` (``AutoModelForCausalLM.from_config``), MLGRU mixers in the
    blocks the checkpoint names, dense tensors loaded, each compressed layer's weight set to its unpacked
    ``PackedWeight.dequantize()``, the 8-bit activation pre-hook on ternary layers. Every tensor is checked
    against its sha256 first (:func:`check_sums`). Returns ``(model, tokenizer)``,
    the model in eval mode (tokenizer None when the directory has none)."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint: {path / CONFIG}: {str(err).splitlines()[0]}") from None
    weights = path / WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint: {weights}: not a readable safetensors file "
                              f"({str(err).splitlines()[0]})") from None
    if metadata.get("dse_checkpoint") != str(FORMAT_VERSION):
        raise CheckpointError(f"checkpoint: {weights}: dse_checkpoint version {metadata.get('dse_checkpoint')!r} "
                              f"is not {FORMAT_VERSION}")
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
            weight, target = decode_layer(record, parts).dequantize(), weight_of(module)
            if tuple(weight.shape) != tuple(target.shape):
                raise CheckpointError(f"checkpoint: {weights}: layer {record['name']} has shape "
                                      f"{tuple(weight.shape)}, the model {tuple(target.shape)}")
            target.copy_(weight.to(target.dtype))
            if record["format"] == "ternary":
                module.register_forward_pre_hook(activation_hook)
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
