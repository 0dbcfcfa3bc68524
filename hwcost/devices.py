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

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

DATA_DIR = Path(__file__).parent / "data"

BRAM36_BITS = 36 * 1024
"""Bits of one AMD BRAM36 block (UG573); the unit hwcost reports block RAM in."""
URAM_BITS = 288 * 1024
"""Bits of one AMD UltraRAM block (UG573)."""
MEMORY_KINDS = ("hbm2", "ddr4")


@lru_cache(maxsize=None)
def load_data_yaml(name: str) -> dict:
    """A file of ``hwcost/data`` parsed (cached; do not mutate)."""
    with open(DATA_DIR / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def constants() -> dict:
    """The model constants of ``hwcost/data/constants.yaml`` (cached; do not mutate)."""
    return load_data_yaml("constants.yaml")


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
    raw = load_data_yaml("devices.yaml")["devices"]
    return {name: _device_from_yaml(name, d) for name, d in raw.items()}


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


def active_user_devices() -> dict[str, Device]:
    """The user devices currently active (name -> Device)."""
    return dict(_USER)


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


# ---------------------------------------------------------------------------- user device files
DEVICE_FIELDS = ("vendor", "part", "lut", "alm", "lut_equiv_per_alm", "ff", "dsp", "dsp_kind", "bram_blocks",
                 "bram_block_kbits", "uram", "memories", "default_memory", "static_w", "shell_overhead", "source")
"""Fields of one device in a user devices file (the catalog's fields)."""
REQUIRED_DEVICE_FIELDS = ("ff", "dsp", "dsp_kind", "bram_blocks", "bram_block_kbits", "memories", "static_w")
"""Required besides ``lut`` or ``alm`` (with ``lut_equiv_per_alm``)."""
MEMORY_FIELDS = ("gbps", "gb")
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceFileError(ValueError):
    """An invalid field in a user devices file: ``'<field path>: <problem and what is allowed>'``."""


def dsp_kinds() -> list[str]:
    """DSP kinds the model has constants for (``constants.yaml`` macs_per_dsp and lane_lut)."""
    c = constants()
    return [kind for kind in c["macs_per_dsp"] if kind in c.get("lane_lut", {})]


def _field_int(value: Any, path: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DeviceFileError(f"{path}: {value!r} is not an integer >= {low}")
    return value


def _field_number(value: Any, path: str, low: float, high: float | None = None, *, open_low: bool = False,
                  open_high: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low)
        if high is not None:
            ok = ok and (value < high if open_high else value <= high)
    if not ok:
        lo = f"({low:g}" if open_low else f"[{low:g}"
        hi = "inf)" if high is None else (f"{high:g})" if open_high else f"{high:g}]")
        raise DeviceFileError(f"{path}: {value!r} is not a number in {lo}, {hi}")
    return float(value)


def _field_str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DeviceFileError(f"{path}: {value!r} is not a non-empty string")
    return value.strip()


def _mapping(value: Any, path: str, allowed: tuple[str, ...] | None, what: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise DeviceFileError(f"{path}: expected a mapping of {what}; got {type(value).__name__}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise DeviceFileError(f"{path}.{key}: unknown field; allowed: {', '.join(allowed)}")
    return value


def parse_device(name: Any, d: Any, source: str = "user file", prefix: str = "devices") -> Device:
    """Validate one user device mapping into a :class:`Device`; :class:`DeviceFileError` names the bad field."""
    if not isinstance(name, str) or not DEVICE_NAME_RE.match(name):
        raise DeviceFileError(f"{prefix}.{name}: the device name must be 1-64 letters, digits, '_', '.', '-'")
    path = f"{prefix}.{name}"
    d = _mapping(d, path, DEVICE_FIELDS, f"fields ({', '.join(DEVICE_FIELDS)})")
    for key in REQUIRED_DEVICE_FIELDS:
        if d.get(key) is None:
            raise DeviceFileError(f"{path}.{key}: is required")
    alm = 0
    if d.get("lut") is not None:
        if d.get("alm") is not None:
            raise DeviceFileError(f"{path}.alm: give either lut (AMD LUT6) or alm with lut_equiv_per_alm (Intel), "
                                  "not both")
        lut = _field_int(d["lut"], f"{path}.lut", 1)
    elif d.get("alm") is not None:
        alm = _field_int(d["alm"], f"{path}.alm", 1)
        if d.get("lut_equiv_per_alm") is None:
            raise DeviceFileError(f"{path}.lut_equiv_per_alm: is required with alm (LUT6-equivalents per ALM, "
                                  "e.g. 2)")
        per_alm = _field_number(d["lut_equiv_per_alm"], f"{path}.lut_equiv_per_alm", 0, open_low=True)
        lut = int(round(alm * per_alm))
    else:
        raise DeviceFileError(f"{path}.lut: is required (or alm with lut_equiv_per_alm)")
    kinds = dsp_kinds()
    if d["dsp_kind"] not in kinds:
        raise DeviceFileError(f"{path}.dsp_kind: {d['dsp_kind']!r} is not one of {', '.join(kinds)}")
    memories_raw = _mapping(d["memories"], f"{path}.memories", None,
                            f"memory kind ({', '.join(MEMORY_KINDS)}) -> {{gbps, gb}}")
    memories = []
    for kind, m in memories_raw.items():
        mpath = f"{path}.memories.{kind}"
        if kind not in MEMORY_KINDS:
            raise DeviceFileError(f"{mpath}: unknown memory kind; allowed: {', '.join(MEMORY_KINDS)}")
        m = _mapping(m, mpath, MEMORY_FIELDS, "gbps (peak GB/s) and gb (capacity GiB)")
        for key in MEMORY_FIELDS:
            if m.get(key) is None:
                raise DeviceFileError(f"{mpath}.{key}: is required")
        memories.append(MemorySystem(kind, _field_number(m["gbps"], f"{mpath}.gbps", 0, open_low=True),
                                     _field_number(m["gb"], f"{mpath}.gb", 0, open_low=True)))
    default_memory = d.get("default_memory", memories[0].kind)
    if default_memory not in [m.kind for m in memories]:
        raise DeviceFileError(f"{path}.default_memory: {default_memory!r} is not one of "
                              f"{', '.join(m.kind for m in memories)}")
    return Device(
        name=name,
        vendor=_field_str(d.get("vendor", "user"), f"{path}.vendor"),
        part=_field_str(d.get("part", "unspecified"), f"{path}.part"),
        lut=lut,
        ff=_field_int(d["ff"], f"{path}.ff", 0),
        dsp=_field_int(d["dsp"], f"{path}.dsp", 0),
        dsp_kind=d["dsp_kind"],
        bram_blocks=_field_int(d["bram_blocks"], f"{path}.bram_blocks", 0),
        bram_block_kbits=_field_int(d["bram_block_kbits"], f"{path}.bram_block_kbits", 1),
        uram=_field_int(d.get("uram", 0), f"{path}.uram", 0),
        memories=tuple(memories),
        default_memory=default_memory,
        static_w=_field_number(d["static_w"], f"{path}.static_w", 0),
        shell_overhead=_field_number(d.get("shell_overhead", 0.0), f"{path}.shell_overhead", 0, 1, open_high=True),
        source=_field_str(d.get("source", source), f"{path}.source"),
        alm=alm,
    )


def parse_devices(data: Any, source: str = "user file") -> dict[str, Device]:
    """Validate ``{'devices': {name: fields}}`` (as loaded from YAML) into name -> :class:`Device`."""
    if not isinstance(data, dict):
        raise DeviceFileError(f"devices: expected a mapping 'devices: {{<name>: {{<fields>}}}}'; "
                              f"got {type(data).__name__}")
    for key in data:
        if key != "devices":
            raise DeviceFileError(f"{key}: unknown field; allowed: devices")
    raw = _mapping(data.get("devices"), "devices", None, "device name -> fields")
    return {name: parse_device(name, d, source) for name, d in raw.items()}


def load_devices_file(path: str | Path) -> dict[str, Device]:
    """Read and validate a user devices YAML file; :class:`DeviceFileError` (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DeviceFileError(f"file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DeviceFileError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    return parse_devices(data, source=f"user file {path.name}")
