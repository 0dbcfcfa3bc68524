"""The accelerator design (:class:`Accelerator`): device, clock, datapath, weight buffer, memories and run shape.

An accelerator is a design, not a constant: every field below is a design choice with a documented default
and unit, and any of them may be searched together with the plan (a list of choices in the study spec's
``hardware:`` block). The study spec's ``hardware:`` mapping and an ``accelerator.yaml`` are passed to
:meth:`Accelerator.from_dict`; bad values raise :class:`AcceleratorError` (a ``ValueError``) with one line
naming the field and what is allowed, e.g. ``hardware.resident: '(' is not a regular expression ...``.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Annotated, Literal

from pydantic import PlainValidator, model_validator

from dse.schema import Int, Number, Problem, SchemaError, parse, schema
from hwcost.devices import Device, MemorySystem, constants, get_device, list_devices

CLOCK_RANGE_MHZ = (1.0, 1000.0)
Share = Number(0, 1, open_lo=True, bare=True)
"""A fraction in (0, 1]."""
ENGINE_CLASSES = ("fp16", "int8", "int7", "int6", "int5", "int4", "int3", "int2", "ternary")
"""Kernel classes a ``lanes`` entry may name (INT-k lanes go to the engine that runs INT-k)."""
RESIDENT_KEYWORDS = ("none", "all")
LIMITS = {"batch": 2**16, "context_length": 2**24, "prompt_length": 2**24, "attention_window": 2**24,
          "weight_buffer_bytes": 2**50}
"""Largest value of each integer field: the cost model counts cycles and bytes in 64-bit integers (numpy), which
these keep far from overflowing (65,536 sequences of 16 Mi tokens of Llama-2-7B's KV cache are 2**59 bytes)."""
MAX_LANES = 2**24
"""Largest ``lanes`` entry of an engine class (MAC lanes)."""


class AcceleratorError(SchemaError):
    """An invalid accelerator field: ``'hardware.<field>: <problem and what is allowed>'``."""


def _device(name):
    devices = list_devices()
    if name not in devices:
        raise ValueError(f"{name!r} is not one of {', '.join(devices)} (or add it with a devices file)")
    return name


def _resident(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not none, all or a regular expression of layer names")
    if value not in RESIDENT_KEYWORDS:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{value!r} is not a regular expression ({err}); allowed: none, all or a regex "
                             "matching layer names in full") from None
    return value


def _lanes(value):
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{value!r} is not a mapping of engine class ({', '.join(ENGINE_CLASSES)}) -> lanes")
    for key, n in value.items():
        if key not in ENGINE_CLASSES:
            raise ValueError(f"{key!r} is not one of {', '.join(ENGINE_CLASSES)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{key}: {n!r} is not an integer >= 1 (MAC lanes)")
        if n > MAX_LANES:
            raise ValueError(f"{key}: {n!r} is above {MAX_LANES:,}, the largest the cost model counts")
    return dict(value)


def _resident_of_weights(data: dict) -> dict:
    """``data`` with the old ``weights: streamed|resident`` as ``resident: none|all`` (kept when both are given)."""
    if "weights" not in data or "resident" in data:
        return data
    data = dict(data)
    old = data.pop("weights")
    if old not in ("streamed", "resident"):
        raise Problem(f"{old!r} is not one of streamed, resident (or use resident: none|all|<regex>)", "weights")
    data["resident"] = "none" if old == "streamed" else "all"
    return data


@schema(AcceleratorError, prefix="hardware", unknown="unknown key")
class Accelerator:
    """One accelerator design on a device (fields are the study spec's ``hardware:`` keys; units in the docs)."""

    #: device name (the catalog, :func:`hwcost.list_devices`, or a user devices file)
    device: Annotated[str, PlainValidator(_device)]
    #: datapath clock, MHz
    clock_mhz: Number(*CLOCK_RANGE_MHZ, unit="MHz") = 300.0
    # -- datapath
    #: fractions of the device's DSP and LUT (after the shell) the matrix-vector engines may use; the lanes
    #: are sized inside these budgets (``hwcost.model`` docstring)
    dsp_share: Share = 0.7
    lut_share: Share = 0.5
    #: fixed MAC lanes per engine class instead of a budget share, e.g. ``{ternary: 512}`` (a class's lanes
    #: are split over its N:M variants); the other classes share what is left of the budgets
    lanes: Annotated[dict | None, PlainValidator(_lanes)] = None
    #: activation width of the INT and ternary kernels, bits (None: constants.yaml activation_bits; 16 for
    #: W4A16 designs); FP16 layers always take FP16 activations
    act_bits: Literal[8, 16] | None = None
    #: ternary datapath: an add/subtract tree per lane, or table lookup (T-MAC/TeLLMe style: per group of
    #: C[ternary_table.group] weights one precomputed partial sum is looked up and added)
    ternary_engine: Literal["adder_tree", "table_lookup"] = "adder_tree"
    # -- weight storage and the on-chip weight buffer
    #: ternary weights as 2-bit codes, or base-3 packed (5 trits per byte, 1.6 bits per weight)
    ternary_storage: Literal["2bit", "base3"] = "2bit"
    #: which linear layers are held on chip: none, all, or a regular expression matching layer names in full
    #: (e.g. ``'model\\.layers\\.[0-9]\\..*'``); the others stream from off-chip memory every pass
    resident: Annotated[str, PlainValidator(_resident)] = "none"
    #: fractions of BRAM and URAM (after the shell) the weight buffer may use (URAM filled first)
    bram_share: Share = 0.7
    uram_share: Share = 0.7
    #: cap of the weight buffer, bytes (None: the BRAM and URAM shares above)
    weight_buffer_bytes: Int(0) | None = None
    # -- where the embedding and the LM head run
    #: fpga: the embedding row is read from off-chip memory; host: the host (PS or CPU) looks it up and
    #: sends the row over the host link
    embedding: Literal["fpga", "host"] = "fpga"
    #: fpga: lm_head is a row of the datapath; host: the host computes it (no FPGA storage or traffic)
    lm_head: Literal["fpga", "host"] = "fpga"
    #: host link bandwidth (AXI to the PS, or PCIe), GB/s
    host_gbps: Number(0, open_lo=True, unit="GB/s") = 4.0
    #: host compute rate for an lm_head on the host, GMAC/s
    host_gmacs: Number(0, open_lo=True, unit="GMAC/s") = 10.0
    #: host power while it works on a step, W (counted in the energy per token)
    host_w: Number(0, unit="W") = 5.0
    # -- off-chip memory
    #: the device memories used, by name, joined with '+' (e.g. ``ps_ddr4+pl_ddr4``; default: the board's
    #: main memory); traffic is interleaved over them in proportion to their bandwidth
    memory: str | None = None
    #: achieved fraction of peak off-chip bandwidth (None: constants.yaml mem_efficiency[<kind>] per memory)
    mem_efficiency: Share | None = None
    # -- KV cache and attention
    #: bits of a K or V cache value (8 and 4 add one FP16 scale per head per token)
    kv_bits: Literal[16, 8, 4] = 16
    #: tokens an attention block reads at most (None: the context, or the model's own sliding window)
    attention_window: Int(1) | None = None
    # -- power
    #: average toggle rate of the fabric (None: constants.yaml power.toggle_rate)
    toggle_rate: Share | None = None
    # -- run shape
    #: sequences decoded together (tokens per decode step)
    batch: Int(1) = 1
    #: tokens of KV cache read per decode step
    context_length: Int(0) = 512
    #: tokens of the prompt for the prefill latency
    prompt_length: Int(1) = 128

    @model_validator(mode="after")
    def _limits(self):
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise Problem(f"{value!r} is above {limit:,}, the largest the cost model counts", name)
        return self

    @model_validator(mode="after")
    def _memory(self):
        names = [m.name for m in get_device(self.device).memories]
        for name in self.memory_names:
            if name not in names:
                raise Problem(f"{name!r} is not one of {', '.join(names)} (device {self.device}; join several "
                              "with '+')", "memory")
        if len(set(self.memory_names)) != len(self.memory_names):
            raise Problem(f"{self.memory!r} names a memory twice", "memory")
        return self

    @property
    def dev(self) -> Device:
        """The :class:`~hwcost.devices.Device`."""
        return get_device(self.device)

    @property
    def memory_names(self) -> list[str]:
        """The memories used, by name."""
        return self.memory.split("+") if self.memory else [get_device(self.device).default_memory]

    @property
    def memories(self) -> list[MemorySystem]:
        return [self.dev.memory(name) for name in self.memory_names]

    def efficiency(self, mem: MemorySystem) -> float:
        """Achieved fraction of ``mem``'s peak bandwidth (explicit or the constants.yaml default of its kind)."""
        if self.mem_efficiency is not None:
            return float(self.mem_efficiency)
        return float(constants()["mem_efficiency"][mem.kind])

    def memory_bytes_per_s(self, mem: MemorySystem) -> float:
        """Bytes/s the datapath gets from ``mem``: min(peak * efficiency, channels * port bytes * clock).

        The second term is the fabric side: each channel's AXI port delivers ``port_bits / 8`` bytes per
        accelerator cycle, so a slow clock caps a wide memory (32 HBM2 ports of 256 bits at 225 MHz give
        230 GB/s of the stack's 460)."""
        return min(mem.bytes_per_s * self.efficiency(mem), mem.fabric_bytes_per_cycle * self.clock_mhz * 1e6)

    @property
    def bytes_per_cycle(self) -> float:
        """Off-chip bytes delivered per datapath cycle, summed over the memories used."""
        return sum(self.memory_bytes_per_s(m) for m in self.memories) / (self.clock_mhz * 1e6)

    @property
    def toggle(self) -> float:
        return float(self.toggle_rate if self.toggle_rate is not None else constants()["power"]["toggle_rate"])

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict, prefix: str = "hardware") -> "Accelerator":
        """From a plain mapping (the spec's ``hardware:``); :class:`AcceleratorError` naming ``<prefix>.<field>``."""
        if isinstance(d, dict) and "weights" in d:
            try:
                d = _resident_of_weights(d)
            except Problem as err:
                raise AcceleratorError(f"{prefix}.weights" if prefix else "weights", str(err)) from None
        return parse(Accelerator, d, prefix)
