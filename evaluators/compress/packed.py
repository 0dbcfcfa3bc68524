"""A compressed linear weight in its stored form: integer codes, scales, zero points and the N:M mask.

:class:`PackedWeight` is what every compression method returns and what the layer cache
stores; :meth:`PackedWeight.dequantize` gives the fake-quantised float32 weight the torch
model runs with (``scale * (code - zero)`` per group, times the mask), so accuracy is
measured on exactly the values a packed export holds.

* ``fmt`` ``"16"``: ``values`` holds the float weights (pruned ones zero); no codes.
* INT-k: ``codes`` uint8 in ``[0, 2**k - 1]``, ``scales``/``zeros`` float32 ``[out, groups]``.
* ternary: ``codes`` in ``{0, 1, 2}`` (value ``code - 1``), ``zeros`` 1, ``scales`` ``[1, 1]``
  (absmean, per tensor) or ``[out, 1]`` (least-squares refit, per output channel).

:func:`pack_containers` keeps codes in 2-, 4- or 8-bit byte-aligned containers, which unpack
fast (the layer cache); the dense ``bits``-per-weight stream of exported checkpoints is
:func:`evaluators.checkpoint.pack_codes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dse.plan import FP16, WeightFormat


@dataclass
class PackedWeight:
    """One layer's compressed weight (shapes in the module docstring); ``group_size`` is inputs per scale column."""

    fmt: WeightFormat
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0
    mask: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @staticmethod
    def dense(values: torch.Tensor, mask: torch.Tensor | None = None) -> "PackedWeight":
        """Float weights (optionally N:M masked) with no quantisation."""
        return PackedWeight(fmt=FP16, values=values.float() if mask is None else values.float() * mask, mask=mask)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple((self.values if self.codes is None else self.codes).shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the model runs with."""
        if self.codes is None:
            return self.values.float()
        rows, cols = self.codes.shape
        groups = self.scales.shape[1]
        if groups == 1:
            w = self.scales * (self.codes.float() - self.zeros)
        elif groups * self.group_size == cols:  # whole groups: broadcast [rows, groups, 1] scales
            codes = self.codes.float().reshape(rows, groups, self.group_size)
            w = (self.scales[:, :, None] * (codes - self.zeros[:, :, None])).reshape(rows, cols)
        else:
            scales = self.scales.repeat_interleave(self.group_size, dim=1)[:, :cols]
            zeros = self.zeros.repeat_interleave(self.group_size, dim=1)[:, :cols]
            w = scales * (self.codes.float() - zeros)
        return w if self.mask is None else w * self.mask

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty parts by name (for safetensors); :meth:`from_tensors` inverts it."""
        parts = {"codes": self.codes, "scales": self.scales, "zeros": self.zeros, "values": self.values,
                 "mask": None if self.mask is None else self.mask.to(torch.uint8)}
        return {k: v.contiguous() for k, v in parts.items() if v is not None}

    @property
    def code_bits(self) -> int:
        """Bits of one code: k for INT-k, 2 for ternary."""
        return self.fmt.bits

    def metadata(self) -> dict[str, str]:
        return {"format": self.fmt.name, "group_size": str(self.fmt.group_size),
                "symmetric": str(self.fmt.symmetric), "scale_group": str(self.group_size)}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "PackedWeight":
        fmt = WeightFormat(metadata["format"], int(metadata["group_size"]), metadata["symmetric"] == "True")
        mask = tensors.get("mask")
        return PackedWeight(fmt=fmt, codes=tensors.get("codes"), scales=tensors.get("scales"),
                            zeros=tensors.get("zeros"), group_size=int(metadata["scale_group"]),
                            mask=None if mask is None else mask.bool(), values=tensors.get("values"))


def container_bits(bits: int) -> int:
    """Bits of the byte-aligned container a ``bits``-bit code is stored in: 2, 4 or 8."""
    return 2 if bits <= 2 else (4 if bits <= 4 else 8)


def pack_containers(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in byte-aligned containers (:func:`container_bits`), first code in the low bits: fast to unpack."""
    width = container_bits(bits)
    per_byte = 8 // width
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    flat = np.pad(flat, (0, (-flat.size) % per_byte)).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)[None, :]
    return torch.from_numpy(np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8))


def unpack_containers(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_containers`: ``count`` codes as a uint8 tensor."""
    width = container_bits(bits)
    per_byte = 8 // width
    packed = stream.numpy()
    codes = np.empty((packed.size, per_byte), dtype=np.uint8)
    for j in range(per_byte):  # one strided pass per code position: much faster than a broadcast shift
        np.bitwise_and(np.right_shift(packed, j * width), (1 << width) - 1, out=codes[:, j])
    return torch.from_numpy(codes.reshape(-1)[:count])
