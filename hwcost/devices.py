"""FPGA device catalog (``hwcost/data/devices.yaml``) and the model constants (``constants.yaml``).

A :class:`Device` holds the data-sheet resources of one board's FPGA and its
off-chip memory. Users add boards with a YAML file (:func:`load_devices_file`,
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
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import PlainValidator, field_validator, model_validator

from dse.schema import Int, Number, Problem, SchemaError, Text, parse, read_yaml, schema

DATA_DIR = Path(__file__).parent / "data"

BRAM36_BITS = 36 * 1024
"""Bits of one AMD BRAM36 block (UG573); the unit hwcost reports block RAM in."""
URAM_BITS = 288 * 1024
"""Bits of one AMD UltraRAM block (UG573)."""


@lru_cache(maxsize=None)
def load_data_yaml(name: str) -> dict:
    """A file of ``hwcost/data`` parsed (cached; do not mutate)."""
    with open(DATA_DIR / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def constants() -> dict:
    """The model constants of ``hwcost/data/constants.yaml`` (cached; do not mutate)."""
    return load_data_yaml("constants.yaml")


MEMORY_KINDS = ("hbm2", "ddr4")
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceFileError(SchemaError):
    """An invalid field in a devices file: ``'<field path>: <problem and what is allowed>'``."""


@schema(DeviceFileError)
class MemorySystem:
    """One off-chip memory of a board (in a devices file: ``memories: {<kind>: {gbps, gb}}``)."""

    kind: Literal[MEMORY_KINDS]
    #: peak bandwidth, GB/s (1e9 bytes/s)
    gbps: Number(0, open_lo=True)
    #: capacity, GiB (2**30 bytes)
    gb: Number(0, open_lo=True)

    @property
    def bytes_per_s(self) -> float:
        """Peak bandwidth in bytes/s."""
        return self.gbps * 1e9

    @property
    def capacity_bytes(self) -> int:
        """Capacity in bytes (GiB * 2**30)."""
        return int(self.gb * 2**30)


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
    #: block RAMs of bram_block_kbits Kib each
    bram_blocks: Int(0)
    #: Kib per block RAM: 36 for AMD BRAM36, 20 for Intel M20K
    bram_block_kbits: Int(1)
    #: UltraRAM blocks of 288 Kib
    uram: Int(0) = 0
    #: off-chip memories (in a file: kind -> {gbps, gb})
    memories: tuple[MemorySystem, ...]
    #: the memory used by default (default: the first listed)
    default_memory: str = ""
    #: W drawn while idle
    static_w: Number(0)
    #: fraction of every fabric resource taken by the vendor shell
    shell_overhead: Number(0, 1, open_hi=True) = 0.0
    #: where the figures come from
    source: Text = ""
    #: catalog name (in a file: the key of the entry)
    name: str = ""

    @field_validator("memories", mode="before")
    @classmethod
    def _memories(cls, value):
        if isinstance(value, tuple):
            return value
        _mapping_of(f"memory kind ({', '.join(MEMORY_KINDS)}) -> {{gbps, gb}}")(value)
        for kind in value:
            if kind not in MEMORY_KINDS:
                raise Problem(f"unknown memory kind; allowed: {', '.join(MEMORY_KINDS)}", kind)
        return tuple(parse(MemorySystem, {"kind": kind, **m} if isinstance(m, dict) else m, prefix=kind)
                     for kind, m in value.items())

    @model_validator(mode="after")
    def _logic_and_memory(self):
        if self.alm:
            if self.lut_equiv_per_alm is None:
                raise Problem("is required with alm (LUT6-equivalents per ALM, e.g. 2)", "lut_equiv_per_alm")
            lut = int(round(self.alm * self.lut_equiv_per_alm))
            if self.lut not in (None, lut):
                raise Problem("give either lut (AMD LUT6) or alm with lut_equiv_per_alm (Intel), not both", "alm")
            object.__setattr__(self, "lut", lut)
        elif self.lut is None:
            raise Problem("is required (or alm with lut_equiv_per_alm)", "lut")
        kinds = [m.kind for m in self.memories]
        if self.default_memory and self.default_memory not in kinds:
            raise Problem(f"{self.default_memory!r} is not one of {', '.join(kinds)}", "default_memory")
        object.__setattr__(self, "default_memory", self.default_memory or kinds[0])
        return self

    @property
    def bram_bits(self) -> int:
        """Total block-RAM bits."""
        return self.bram_blocks * self.bram_block_kbits * 1024

    @property
    def bram36(self) -> float:
        """Block RAM in BRAM36 (36 Kib) equivalents (= ``bram_blocks`` on AMD parts)."""
        return self.bram_bits / BRAM36_BITS

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
