"""FPGA device catalog (``hwcost/data/devices.yaml``) and the model constants (``constants.yaml``).

A :class:`Device` holds the data-sheet resources of one board's FPGA and its
off-chip memory. Units: LUT/FF/DSP/URAM and block-RAM counts; block RAM also
as bits and as 36 Kib (BRAM36) equivalents so that AMD BRAM36 and Intel M20K
are compared in one unit; bandwidth in GB/s (1e9 bytes/s); capacity in GiB
(2**30 bytes); static power in W.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

DATA_DIR = Path(__file__).parent / "data"

BRAM36_BITS = 36 * 1024
"""Bits of one AMD BRAM36 block (UG573); the unit hwcost reports block RAM in."""
URAM_BITS = 288 * 1024
"""Bits of one AMD UltraRAM block (UG573)."""
MEMORY_KINDS = ("hbm2", "ddr4")


@lru_cache(maxsize=None)
def _load_yaml(name: str) -> dict:
    with open(DATA_DIR / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def constants() -> dict:
    """The model constants of ``hwcost/data/constants.yaml`` (cached; do not mutate)."""
    return _load_yaml("constants.yaml")


@dataclass(frozen=True)
class MemorySystem:
    """One off-chip memory of a board: ``kind`` (hbm2|ddr4), peak ``gbps`` (GB/s), capacity ``gb`` (GiB)."""

    kind: str
    gbps: float
    gb: float

    @property
    def bytes_per_s(self) -> float:
        """Peak bandwidth in bytes/s."""
        return self.gbps * 1e9

    @property
    def capacity_bytes(self) -> int:
        """Capacity in bytes (GiB * 2**30)."""
        return int(self.gb * 2**30)


@dataclass(frozen=True)
class Device:
    """An FPGA board from the catalog.

    ``lut`` is in LUT6-equivalents (Intel ALMs times ``lut_equiv_per_alm``);
    ``bram_blocks`` of ``bram_block_kbits`` Kib each; ``uram`` 288 Kib blocks;
    ``static_w`` in W; ``shell_overhead`` is the fraction of every fabric
    resource taken by the vendor shell.
    """

    name: str
    vendor: str
    part: str
    lut: int
    ff: int
    dsp: int
    dsp_kind: str
    bram_blocks: int
    bram_block_kbits: int
    uram: int
    memories: tuple[MemorySystem, ...]
    default_memory: str
    static_w: float
    shell_overhead: float
    source: str
    alm: int = 0

    @property
    def bram_bits(self) -> int:
        """Total block-RAM bits."""
        return self.bram_blocks * self.bram_block_kbits * 1024

    @property
    def bram36(self) -> float:
        """Block RAM in BRAM36 (36 Kib) equivalents (= ``bram_blocks`` on AMD parts)."""
        return self.bram_bits / BRAM36_BITS

    @property
    def uram_bits(self) -> int:
        """Total UltraRAM bits."""
        return self.uram * URAM_BITS

    def memory(self, kind: str | None = None) -> MemorySystem:
        """The off-chip memory ``kind`` (default: the board's main memory); ValueError if absent."""
        kind = kind or self.default_memory
        for mem in self.memories:
            if mem.kind == kind:
                return mem
        allowed = ", ".join(m.kind for m in self.memories)
        raise ValueError(f"device '{self.name}' has no '{kind}' memory; allowed: {allowed}")

    def available(self) -> dict[str, float]:
        """Resources left to the accelerator after the shell: lut, ff, dsp, bram36, uram."""
        keep = 1.0 - self.shell_overhead
        return {
            "lut": self.lut * keep,
            "ff": self.ff * keep,
            "dsp": self.dsp * keep,
            "bram36": self.bram36 * keep,
            "uram": self.uram * keep,
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name, "vendor": self.vendor, "part": self.part, "lut": self.lut, "ff": self.ff,
            "dsp": self.dsp, "dsp_kind": self.dsp_kind, "bram36": self.bram36, "uram": self.uram,
            "memories": {m.kind: {"gbps": m.gbps, "gb": m.gb} for m in self.memories},
            "default_memory": self.default_memory, "static_w": self.static_w,
            "shell_overhead": self.shell_overhead, "source": self.source,
        }


def _device_from_yaml(name: str, d: dict) -> Device:
    alm = int(d.get("alm", 0))
    lut = int(d["lut"]) if "lut" in d else int(round(alm * float(d["lut_equiv_per_alm"])))
    memories = tuple(MemorySystem(kind, float(m["gbps"]), float(m["gb"])) for kind, m in d["memories"].items())
    for mem in memories:
        if mem.kind not in MEMORY_KINDS:
            raise ValueError(f"devices.yaml: {name}: memory '{mem.kind}' is not one of {', '.join(MEMORY_KINDS)}")
    return Device(
        name=name, vendor=d["vendor"], part=d["part"], lut=lut, ff=int(d["ff"]), dsp=int(d["dsp"]),
        dsp_kind=d["dsp_kind"], bram_blocks=int(d["bram_blocks"]), bram_block_kbits=int(d["bram_block_kbits"]),
        uram=int(d["uram"]), memories=memories, default_memory=d["default_memory"],
        static_w=float(d["static_w"]), shell_overhead=float(d["shell_overhead"]), source=d["source"], alm=alm,
    )


@lru_cache(maxsize=None)
def _catalog() -> dict[str, Device]:
    raw = _load_yaml("devices.yaml")["devices"]
    return {name: _device_from_yaml(name, d) for name, d in raw.items()}


def list_devices() -> list[str]:
    """Names of the catalog's devices, in catalog order."""
    return list(_catalog())


def get_device(name: str) -> Device:
    """The catalog device ``name``; ValueError naming it and listing the allowed names otherwise."""
    try:
        return _catalog()[name]
    except (KeyError, TypeError):
        raise ValueError(f"'{name}' is not a known device; allowed: {', '.join(list_devices())}") from None
