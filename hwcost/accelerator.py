"""The accelerator configuration (:class:`Accelerator`): which device, clock, budgets and run shape.

The study spec's ``hardware:`` mapping is passed to :meth:`Accelerator.from_dict`;
bad values raise :class:`AcceleratorError` (a ``ValueError``) with one line naming the field and what is
allowed, e.g. ``hardware.weights: 'x' is not one of streamed, resident``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from pydantic import PlainValidator, model_validator

from dse.schema import Int, Number, Problem, SchemaError, parse, schema
from hwcost.devices import Device, constants, get_device, list_devices

CLOCK_RANGE_MHZ = (1.0, 1000.0)
Share = Number(0, 1, open_lo=True, bare=True)
"""A fraction in (0, 1]."""


class AcceleratorError(SchemaError):
    """An invalid accelerator field: ``'hardware.<field>: <problem and what is allowed>'``."""


def _device(name):
    devices = list_devices()
    if name not in devices:
        raise ValueError(f"{name!r} is not one of {', '.join(devices)}")
    return name


@schema(AcceleratorError, prefix="hardware", unknown="unknown key")
class Accelerator:
    """One accelerator built on a catalog device (fields are the study spec's ``hardware:`` keys)."""

    #: catalog name (see :func:`hwcost.list_devices`)
    device: Annotated[str, PlainValidator(_device)]
    #: datapath clock, MHz
    clock_mhz: Number(*CLOCK_RANGE_MHZ, unit="MHz") = 300.0
    #: fractions of the device's DSP, LUT, BRAM and URAM left after the shell that the matrix-vector
    #: datapath may use (DSP/LUT size the MAC lanes; BRAM/URAM hold resident weights)
    dsp_share: Share = 0.7
    lut_share: Share = 0.5
    bram_share: Share = 0.7
    uram_share: Share = 0.7
    #: streamed: read from off-chip memory every pass; resident: all compressed linear weights on chip
    weights: Literal["streamed", "resident"] = "streamed"
    #: off-chip memory kind used (default: the board's main memory)
    memory: str | None = None
    #: achieved fraction of peak off-chip bandwidth (None: constants.yaml mem_efficiency[<memory kind>])
    mem_efficiency: Share | None = None
    #: sequences decoded together (tokens per decode step)
    batch: Int(1) = 1
    #: tokens of KV cache read per decode step
    context_length: Int(0) = 512
    #: tokens of the prompt for the prefill latency
    prompt_length: Int(1) = 128
    #: activation width of the INT and ternary kernels (None: constants.yaml activation_bits; 16 for
    #: W4A16 designs); FP16 layers always take FP16 activations
    act_bits: Literal[8, 16] | None = None

    @model_validator(mode="after")
    def _memory(self):
        kinds = [m.kind for m in get_device(self.device).memories]
        if self.memory is not None and self.memory not in kinds:
            raise Problem(f"{self.memory!r} is not one of {', '.join(kinds)} (device {self.device})", "memory")
        return self

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
        """From a plain mapping (the spec's ``hardware:``); :class:`AcceleratorError` naming ``<prefix>.<field>``."""
        return parse(Accelerator, d, prefix)
