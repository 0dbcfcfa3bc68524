"""The on-disk cache of what compression computes deterministically.

Everything lives under ``<cache root>/compress/<model fingerprint>/`` as safetensors files written
atomically (several Ray workers share it):

* ``layers/<key>.safetensors``: one compressed layer (:class:`PackedWeight` parts; codes packed
  four (<= 2 bits) or two (<= 4 bits) per byte, the N:M mask one bit per weight), ``key`` = hash of (model fingerprint, layer name, choice, method, calibration key);
* ``hessians/<calibration key>.safetensors``: the dense model's input Gram matrices, shared
  inputs stored once;
* ``mlgru/<key>.safetensors``: a distilled MLGRU mixer's state and statistics;
* ``reference/<proxy key>.safetensors``: the dense model's next-token log-probabilities on a
  proxy set.

:func:`model_fingerprint` identifies the base model by content: its config (not the directory it was loaded from)
and the SHA-256 of every weight's bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dse.textio import replacing
from evaluators.compress.packed import PackedWeight, pack_containers, unpack_containers
from evaluators.paths import cache_dir

CACHE_VERSION = 4
"""4: FP16 scales and the 16-bit base model (:mod:`.storage`). Bump when a method's numerics change so old entries are not reused."""
PACKING = "containers-v1"
"""Storage layout of a layer entry's codes (:func:`~evaluators.compress.packed.pack_containers`)."""


LOCATION_KEYS = ("_name_or_path",)
"""Config entries that say where the model was loaded from, not what it is (left out of the fingerprint)."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits of the SHA-256 of the model's content: its config (without :data:`LOCATION_KEYS`, so the same
    weights loaded from another directory share the cache) and every tensor of its state dict (name, dtype, shape
    and all its bytes, so copies that differ in a single weight do not; a tied tensor is hashed once). About 0.3 s
    for the 135M default model in float32 on one CPU core."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in LOCATION_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    first: dict[tuple, str] = {}  # tensor identity -> the first name it had
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        same = first.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()), name)
        if same != name:
            digest.update(f"= {same}".encode())
            continue
        digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def entry_key(*parts: object) -> str:
    """24 hex digits of the SHA-256 of the JSON of ``parts`` (plus :data:`CACHE_VERSION`)."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read once."""
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


class CompressionCache:
    """Cache files of one model (see the module docstring); ``root`` defaults to the service cache."""

    def __init__(self, fingerprint: str, root: Path | None = None):
        self.fingerprint = fingerprint
        self.root = Path(root) if root is not None else cache_dir("compress")
        self.dir = self.root / fingerprint

    # -------------------------------------------------------------- compressed layers
    def layer_path(self, key: str) -> Path:
        return self.dir / "layers" / f"{key}.safetensors"

    def load_layer(self, key: str) -> PackedWeight | None:
        path = self.layer_path(key)
        if not path.exists():
            return None
        tensors, metadata = _load(path)
        if metadata.get("packing") != PACKING:
            return None  # written by another storage layout: computed again and overwritten
        rows, cols = (int(x) for x in metadata["shape"].split(","))
        if "mask_bits" in tensors:
            bits = np.unpackbits(tensors.pop("mask_bits").numpy())[: rows * cols]
            tensors["mask"] = torch.from_numpy(bits.reshape(rows, cols).astype(bool))
        if "code_stream" in tensors:
            codes = unpack_containers(tensors.pop("code_stream"), int(metadata["code_bits"]), rows * cols)
            tensors["codes"] = codes.reshape(rows, cols)
        return PackedWeight.from_tensors(tensors, metadata)

    def save_layer(self, key: str, packed: PackedWeight, info: dict[str, str]) -> None:
        tensors = packed.tensors()
        rows, cols = packed.shape
        metadata = {**packed.metadata(), **info, "shape": f"{rows},{cols}", "packing": PACKING}
        mask = tensors.pop("mask", None)
        if mask is not None:
            tensors["mask_bits"] = torch.from_numpy(np.packbits(mask.numpy().astype(bool).reshape(-1)))
        codes = tensors.pop("codes", None)
        if codes is not None:  # INT4 and narrower: two or four codes per byte on disk
            tensors["code_stream"] = pack_containers(codes, packed.code_bits)
            metadata["code_bits"] = str(packed.code_bits)
        _save(self.layer_path(key), tensors, metadata)

    # -------------------------------------------------------------- dense Hessians
    def hessian_path(self, calib_key: str) -> Path:
        return self.dir / "hessians" / f"{calib_key}.safetensors"

    def load_hessians(self, calib_key: str) -> dict[str, torch.Tensor] | None:
        path = self.hessian_path(calib_key)
        if not path.exists():
            return None
        stored, metadata = _load(path)
        alias = json.loads(metadata.get("alias", "{}"))
        return {**stored, **{name: stored[owner] for name, owner in alias.items()}}

    def save_hessians(self, calib_key: str, hessians: dict[str, torch.Tensor]) -> None:
        stored: dict[str, torch.Tensor] = {}
        alias: dict[str, str] = {}
        owner_of: dict[int, str] = {}
        for name, h in hessians.items():
            owner = owner_of.setdefault(id(h), name)
            if owner == name:
                stored[name] = h
            else:
                alias[name] = owner
        _save(self.hessian_path(calib_key), stored, {"alias": json.dumps(alias)})

    # -------------------------------------------------------------- MLGRU mixers, references
    def blob_path(self, kind: str, key: str) -> Path:
        return self.dir / kind / f"{key}.safetensors"

    def load_blob(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        path = self.blob_path(kind, key)
        if not path.exists():
            return None
        return _load(path)

    def save_blob(self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        _save(self.blob_path(kind, key), tensors, metadata)
