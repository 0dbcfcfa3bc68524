"""FPGA device catalog (``hwcost/data/devices.yaml``) and the model constants (``constants.yaml``).

A :class:`Device` holds the data-sheet resources of one board's FPGA and its
named off-chip memories (:class:`MemorySystem`: kind, bandwidth, capacity and the fabric-side
ports that reach it). Users add boards with a YAML file (:func:`load_devices_file`,
validated field by field like the study spec) and make them visible to
:func:`get_device` / :func:`list_devices` with :func:`user_devices`; a user
device with a catalog name overrides the catalog entry while it is active. Units: LUT/FF/DSP/URAM and block-RAM counts; block RAM also
as bits and as 36 Kib (BRAM36) equivalents so that AMD BRAM36 and Intel M20K
are compared in one unit; bandwidth in GB/s (1e9 bytes/s); capacity in GiB
(2**30 bytes); static power in W.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import PlainValidator, field_validator, model_validator

from dse.schema import Int, Number, Problem, SchemaError, Text, parse, read_yaml, schema

DATA_DIR = Path(__file__).parent / "data"

BRAM36_BITS = 36 * 1024
"""Bits of one AMD BRAM36 block (UG573); the unit hwcost reports block RAM in."""
URAM_BITS = 288 * 1024
"""Bits of one AMD UltraRAM block (UG573)."""


@lru_cache(maxsize=None)
def load_data_yaml(name: str) -> dict:
    """A file of ``hwcost/data`` parsed (cached; do not mutate); a key given twice in one mapping is an
    error naming the key and both lines (:func:`dse.schema.read_yaml`), not a silent override."""
    return read_yaml(DATA_DIR / name, SchemaError, noun="data file")


def constants() -> dict:
    """The model constants of ``hwcost/data/constants.yaml`` (cached; do not mutate)."""
    return load_data_yaml("constants.yaml")


MEMORY_KINDS = ("ddr4", "ddr5", "lpddr4", "lpddr5", "hbm2", "hbm2e")
"""Off-chip memory technologies; constants.yaml keys mem_efficiency and offchip_pj_per_bit on them."""
FABRICS = ("ultrascale_plus", "versal", "stratix10", "agilex")
"""FPGA fabric families; the power model (constants.yaml power.dynamic_uw_per_mhz) keys its coefficients on them."""
FABRIC_OF_DSP = {"dsp48e2": "ultrascale_plus", "dsp58": "versal", "s10_vp": "stratix10"}
"""The fabric a DSP kind implies (Device.fabric's default)."""
AXI_WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024)
"""Data widths, bits, an AXI (or Avalon) port may have (the powers of two of the AMBA AXI specification)."""
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MEMORY_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
"""A memory name: no '.' (it would read as a field path) and no '+' (Accelerator.memory joins names with it)."""


class DeviceFileError(SchemaError):
    """An invalid field in a devices file: ``'<field path>: <problem and what is allowed>'``."""


def _port_bits(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in AXI_WIDTHS:
        raise ValueError(f"{value!r} is not an AXI data width; allowed: {', '.join(map(str, AXI_WIDTHS))} (bits)")
    return value


@schema(DeviceFileError, kw_only=True)
class MemorySystem:
    """One named off-chip memory of a board. In a devices file ``memories: {<name>: {kind, gbps, gb, channels,
    port_bits}}``; ``kind`` may be left out when the name is itself a kind (``memories: {hbm2: {gbps, gb}}``)."""

    __schema_internal__ = ("name",)

    #: memory technology (constants.yaml mem_efficiency and offchip_pj_per_bit are keyed on it)
    kind: Literal[MEMORY_KINDS]
    #: peak bandwidth, GB/s (1e9 bytes/s)
    gbps: Number(0, open_lo=True)
    #: capacity, GiB (2**30 bytes)
    gb: Number(0, open_lo=True)
    #: independent controller ports the fabric reads in parallel: HBM pseudo-channel AXI ports, DDR
    #: controllers, or Zynq PS HP ports
    channels: Int(1) = 1
    #: AXI data width, bits, of one channel's fabric-side port at the accelerator clock
    port_bits: Annotated[int, PlainValidator(_port_bits)] = 512
    #: the memory's name on its board (in a file: the key of the entry)
    name: str = ""

    @property
    def bytes_per_s(self) -> float:
        """Peak bandwidth in bytes/s."""
        return self.gbps * 1e9

    @property
    def capacity_bytes(self) -> int:
        """Capacity in bytes (GiB * 2**30)."""
        return int(self.gb * 2**30)

    @property
    def fabric_bytes_per_cycle(self) -> float:
        """Bytes the fabric can move per accelerator cycle through all channels: channels * port_bits / 8."""
        return self.channels * self.port_bits / 8

    def to_dict(self) -> dict:
        """The devices-file fields (without the name, which is the key)."""
        return {"kind": self.kind, "gbps": self.gbps, "gb": self.gb, "channels": self.channels,
                "port_bits": self.port_bits}


def _memory_systems(value: Any) -> tuple[MemorySystem, ...]:
    """``{name: fields}`` (or MemorySystem objects, named by their kind when unnamed) -> named memories."""
    if isinstance(value, (tuple, list)) and value and all(isinstance(m, MemorySystem) for m in value):
        return tuple(m if m.name else replace(m, name=m.kind) for m in value)
    _mapping_of("memory name -> {kind, gbps, gb, channels, port_bits}")(value)
    out = []
    for name, entry in value.items():
        if not isinstance(name, str) or not MEMORY_NAME_RE.match(name):
            raise Problem("a memory name is 1-32 letters, digits, '_' or '-', starting with a letter", str(name))
        if isinstance(entry, dict) and entry.get("kind") is None:
            if name not in MEMORY_KINDS:
                raise Problem(f"is required (the name '{name}' is not a memory kind); allowed: "
                              f"{', '.join(MEMORY_KINDS)}", name, "kind")
            entry = {**entry, "kind": name}
        out.append(replace(parse(MemorySystem, entry, prefix=name), name=name))
    return tuple(out)


def dsp_kinds() -> list[str]:
    """DSP kinds the model has constants for (``constants.yaml`` macs_per_dsp and lane_lut)."""
    c = constants()
    return [kind for kind in c["macs_per_dsp"] if kind in c.get("lane_lut", {})]


def _dsp_kind(value: Any) -> str:
    if value not in dsp_kinds():
        raise ValueError(f"{value!r} is not one of {', '.join(dsp_kinds())}")
    return value


def _mapping_of(what: str):
    def check(value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError(f"expected a mapping of {what}; got {type(value).__name__}")
        return value
    return check


@schema(DeviceFileError, kw_only=True)
class Device:
    """An FPGA board: the catalog's entries (``data/devices.yaml``) and those of a user devices file."""

    __schema_internal__ = ("name",)

    vendor: Text = "user"
    part: Text = "unspecified"
    #: LUT6-equivalents (Intel: alm x lut_equiv_per_alm)
    lut: Int(1) | None = None
    #: Intel adaptive logic modules (0: an AMD part, give lut)
    alm: Int(0) = 0
    #: LUT6-equivalents per ALM (e.g. 2)
    lut_equiv_per_alm: Number(0, open_lo=True) | None = None
    ff: Int(0)
    dsp: Int(0)
    #: DSP block kind the constants know (constants.yaml macs_per_dsp)
    dsp_kind: Annotated[str, PlainValidator(_dsp_kind)]
    #: fabric family, for the power coefficients (default: from dsp_kind; dsp48e2 -> ultrascale_plus,
    #: dsp58 -> versal, s10_vp -> stratix10)
    fabric: Literal[FABRICS] | None = None
    #: block RAMs of bram_block_kbits Kib each
    bram_blocks: Int(0)
    #: Kib per block RAM: 36 for AMD BRAM36, 20 for Intel M20K
    bram_block_kbits: Int(1)
    #: UltraRAM blocks of 288 Kib
    uram: Int(0) = 0
    #: off-chip memories (in a file: name -> {kind, gbps, gb, channels, port_bits})
    memories: tuple[MemorySystem, ...]
    #: name of the memory used by default (default: the first listed)
    default_memory: str = ""
    #: W drawn while idle
    static_w: Number(0)
    #: fraction of every fabric resource taken by the vendor shell
    shell_overhead: Number(0, 1, open_hi=True) = 0.0
    #: where the figures come from
    source: Text = ""
    #: catalog name (in a file: the key of the entry)
    name: str = ""

    _memories = field_validator("memories", mode="before")(_memory_systems)

    @model_validator(mode="after")
    def _logic_memory_fabric(self):
        if self.alm:
            if self.lut_equiv_per_alm is None:
                raise Problem("is required with alm (LUT6-equivalents per ALM, e.g. 2)", "lut_equiv_per_alm")
            lut = int(round(self.alm * self.lut_equiv_per_alm))
            if self.lut not in (None, lut):
                raise Problem("give either lut (AMD LUT6) or alm with lut_equiv_per_alm (Intel), not both", "alm")
            object.__setattr__(self, "lut", lut)
        elif self.lut is None:
            raise Problem("is required (or alm with lut_equiv_per_alm)", "lut")
        names = [m.name for m in self.memories]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise Problem(f"the memory name '{twice}' is given twice", "memories")
        if self.default_memory and self.default_memory not in names:
            raise Problem(f"{self.default_memory!r} is not one of {', '.join(names)}", "default_memory")
        object.__setattr__(self, "default_memory", self.default_memory or names[0])
        if self.fabric is None:
            if self.dsp_kind not in FABRIC_OF_DSP:
                raise Problem(f"is required for dsp_kind {self.dsp_kind}; allowed: {', '.join(FABRICS)}", "fabric")
            object.__setattr__(self, "fabric", FABRIC_OF_DSP[self.dsp_kind])
        return self

    @property
    def bram_bits(self) -> int:
        """Total block-RAM bits."""
        return self.bram_blocks * self.bram_block_kbits * 1024

    @property
    def bram36(self) -> float:
        """Block RAM in BRAM36 (36 Kib) equivalents (= ``bram_blocks`` on AMD parts)."""
        return self.bram_bits / BRAM36_BITS

    @property
    def memory_names(self) -> list[str]:
        """Names of the board's memories, in file order."""
        return [m.name for m in self.memories]

    def memory(self, name: str | None = None) -> MemorySystem:
        """The off-chip memory ``name`` (default: :attr:`default_memory`); ValueError listing the names if absent."""
        name = name or self.default_memory
        for mem in self.memories:
            if mem.name == name:
                return mem
        raise ValueError(f"device '{self.name}' has no memory '{name}'; allowed: {', '.join(self.memory_names)}")

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
        """Every field, memories in the devices-file form: ``parse_devices({'devices': {name: d}})`` with ``d`` this
        mapping less ``name`` gives the device back."""
        d = {"name": self.name}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"})
        d["memories"] = {m.name: m.to_dict() for m in self.memories}
        return d


@lru_cache(maxsize=None)
def _catalog() -> dict[str, Device]:
    return parse_devices(load_data_yaml("devices.yaml"), source="catalog")


_USER: dict[str, Device] = {}
"""User devices currently active (see :func:`user_devices`); they take precedence over the catalog."""


def catalog_names() -> list[str]:
    """Names of the built-in catalog's devices (``data/devices.yaml``), in catalog order."""
    return list(_catalog())


def list_devices() -> list[str]:
    """Names of the known devices: the catalog's in catalog order, then active user devices not in it."""
    names = catalog_names()
    return names + [name for name in _USER if name not in names]


def get_device(name: str) -> Device:
    """The device ``name`` (an active user device first, then the catalog); ValueError listing the names otherwise."""
    try:
        return _USER.get(name) or _catalog()[name]
    except (KeyError, TypeError):
        raise ValueError(f"'{name}' is not a known device; allowed: {', '.join(list_devices())}") from None


@contextmanager
def user_devices(devices: dict[str, Device]) -> Iterator[dict[str, Device]]:
    """Make ``devices`` known to :func:`get_device`, :func:`list_devices` and Accelerator inside the block.

        with user_devices(load_devices_file("boards.yaml")):
            report = estimate(plan, workload, Accelerator("my-board"))
    """
    saved = dict(_USER)
    _USER.update(devices)
    try:
        yield devices
    finally:
        _USER.clear()
        _USER.update(saved)


# ---------------------------------------------------------------------------- device files
def _device_name(name: Any) -> str:
    if not isinstance(name, str) or not DEVICE_NAME_RE.match(name):
        raise ValueError("the device name must be 1-64 letters, digits, '_', '.', '-'")
    return name


@schema(DeviceFileError)
class DevicesFile:
    """A devices file: ``devices: {<name>: {<fields>}}``."""

    devices: dict[Annotated[str, PlainValidator(_device_name)], Device]

    _devices = field_validator("devices", mode="before")(_mapping_of("device name -> fields"))


def parse_devices(data: Any, source: str = "user file") -> dict[str, Device]:
    """Validate ``{'devices': {name: fields}}`` (as loaded from YAML) into name -> :class:`Device`."""
    return {name: replace(d, name=name, source=d.source or source)
            for name, d in parse(DevicesFile, data).devices.items()}


def load_devices_file(path: str | Path) -> dict[str, Device]:
    """Read and validate a user devices YAML file; :class:`DeviceFileError` (one line) on any problem."""
    return parse_devices(read_yaml(path, DeviceFileError), source=f"user file {Path(path).name}")
