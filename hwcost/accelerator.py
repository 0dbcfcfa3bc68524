"""The accelerator configuration (:class:`Accelerator`): which device, clock, budgets and run shape.

The study spec's ``hardware:`` mapping is passed to :meth:`Accelerator.from_dict`;
bad values raise ``ValueError`` with one line naming the field and what is
allowed, e.g. ``hardware.weights: 'x' is not one of streamed, resident``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from hwcost.devices import Device, constants, get_device, list_devices

WEIGHT_MODES = ("streamed", "resident")
ACT_BITS = (8, 16)
CLOCK_RANGE_MHZ = (1.0, 1000.0)


@dataclass(frozen=True)
class Accelerator:
    """One accelerator built on a catalog device.

    * ``device``: catalog name (see :func:`hwcost.list_devices`).
    * ``clock_mhz``: datapath clock, MHz.
    * ``dsp_share``, ``lut_share``, ``bram_share``, ``uram_share``: fraction (0, 1]
      of the device's resources left after the shell that the matrix-vector
      datapath may use (DSP/LUT size the MAC lanes; BRAM/URAM hold resident weights).
    * ``weights``: ``streamed`` (read from off-chip memory every pass) or
      ``resident`` (all compressed linear weights held in on-chip BRAM/URAM).
    * ``memory``: off-chip memory kind used (default: the board's main memory).
    * ``mem_efficiency``: achieved fraction (0, 1] of peak off-chip bandwidth;
      ``None`` -> ``constants.yaml: mem_efficiency[<memory kind>]``.
    * ``batch``: sequences decoded together (tokens per decode step).
    * ``context_length``: tokens of KV cache read per decode step.
    * ``prompt_length``: tokens of the prompt for the prefill latency.
    * ``act_bits``: activation width of the INT and ternary kernels, 8 or 16 (W4A16 designs);
      ``None`` -> ``constants.yaml: activation_bits``. FP16 layers always take FP16 activations.
    """

    device: str
    clock_mhz: float = 300.0
    dsp_share: float = 0.7
    lut_share: float = 0.5
    bram_share: float = 0.7
    uram_share: float = 0.7
    weights: str = "streamed"
    memory: str | None = None
    mem_efficiency: float | None = None
    batch: int = 1
    context_length: int = 512
    prompt_length: int = 128
    act_bits: int | None = None

    def __post_init__(self) -> None:
        _check(self, "hardware")

    @property
    def dev(self) -> Device:
        """The catalog :class:`~hwcost.devices.Device`."""
        return get_device(self.device)

    @property
    def memory_kind(self) -> str:
        """The off-chip memory kind in use (hbm2|ddr4)."""
        return self.memory or self.dev.default_memory

    @property
    def efficiency(self) -> float:
        """Achieved fraction of peak off-chip bandwidth (explicit or the constants.yaml default)."""
        if self.mem_efficiency is not None:
            return float(self.mem_efficiency)
        return float(constants()["mem_efficiency"][self.memory_kind])

    @property
    def bytes_per_cycle(self) -> float:
        """Off-chip bytes delivered per datapath cycle: peak GB/s * 1e9 * efficiency / (clock MHz * 1e6)."""
        return self.dev.memory(self.memory_kind).bytes_per_s * self.efficiency / (self.clock_mhz * 1e6)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict, prefix: str = "hardware") -> "Accelerator":
        """From a plain mapping (the spec's ``hardware:``); ValueError naming ``<prefix>.<field>`` on bad input."""
        if not isinstance(d, dict):
            raise ValueError(f"{prefix}: expected a mapping with at least 'device'")
        allowed = [f.name for f in fields(Accelerator)]
        for key in d:
            if key not in allowed:
                raise ValueError(f"{prefix}.{key}: unknown key; allowed: {', '.join(allowed)}")
        if "device" not in d:
            raise ValueError(f"{prefix}.device: missing; allowed: {', '.join(list_devices())}")
        values = dict(d)
        for key in ("clock_mhz", "dsp_share", "lut_share", "bram_share", "uram_share", "mem_efficiency"):
            if values.get(key) is not None:
                values[key] = _number(values[key], f"{prefix}.{key}")
        for key in ("batch", "context_length", "prompt_length", "act_bits"):
            if values.get(key) is not None:
                values[key] = _integer(values[key], f"{prefix}.{key}")
        try:
            return Accelerator(**values)
        except ValueError as err:
            message = str(err)
            if message.startswith("hardware"):
                message = prefix + message[len("hardware"):]
            raise ValueError(message) from None


def _number(value, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: {value!r} is not a number")
    return float(value)


def _integer(value, path: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"{path}: {value!r} is not an integer")
    return int(value)


def _check(a: Accelerator, prefix: str) -> None:
    """Validate every field; ValueError('<prefix>.<field>: ...') on the first bad one."""
    devices = list_devices()
    if a.device not in devices:
        raise ValueError(f"{prefix}.device: '{a.device}' is not one of {', '.join(devices)}")
    lo, hi = CLOCK_RANGE_MHZ
    if not isinstance(a.clock_mhz, (int, float)) or not lo <= a.clock_mhz <= hi:
        raise ValueError(f"{prefix}.clock_mhz: {a.clock_mhz!r} is not in [{lo:g}, {hi:g}] MHz")
    for key in ("dsp_share", "lut_share", "bram_share", "uram_share"):
        value = getattr(a, key)
        if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{prefix}.{key}: {value!r} is not in (0, 1]")
    if a.weights not in WEIGHT_MODES:
        raise ValueError(f"{prefix}.weights: {a.weights!r} is not one of {', '.join(WEIGHT_MODES)}")
    kinds = [m.kind for m in get_device(a.device).memories]
    if a.memory is not None and a.memory not in kinds:
        raise ValueError(f"{prefix}.memory: {a.memory!r} is not one of {', '.join(kinds)} (device {a.device})")
    if a.mem_efficiency is not None and (
            not isinstance(a.mem_efficiency, (int, float)) or not 0.0 < a.mem_efficiency <= 1.0):
        raise ValueError(f"{prefix}.mem_efficiency: {a.mem_efficiency!r} is not in (0, 1]")
    for key, low in (("batch", 1), ("context_length", 0), ("prompt_length", 1)):
        value = getattr(a, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{prefix}.{key}: {value!r} is not an integer >= {low}")
    if a.act_bits is not None and (isinstance(a.act_bits, bool) or a.act_bits not in ACT_BITS):
        raise ValueError(f"{prefix}.act_bits: {a.act_bits!r} is not one of {', '.join(map(str, ACT_BITS))}")
