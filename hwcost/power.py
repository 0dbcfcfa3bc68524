"""FPGA power in the manner of AMD's Power Estimator (XPE), and the energy of moving bits.

Pure functions of counts, clock and activity; they take Python floats or numpy arrays (broadcast
against each other) and return numpy arrays (0-d for scalar inputs). Every coefficient lives in
``hwcost/data/constants.yaml`` under ``power`` and ``offchip_pj_per_bit``, each with its source.

Dynamic power of a design on a fabric (:func:`dynamic_power_w`), W per resource::

    lut, ff, dsp   count * C[power.dynamic_uw_per_mhz][fabric][r] * clock_mhz * 1e-6
                         * toggle_rate / C[power.reference_toggle]
    bram36, uram   count * C[...][r] * clock_mhz * 1e-6 * enable_rate     (coefficient at 100 % enable)
    clock          ff count * C[...][clock_per_ff] * clock_mhz * 1e-6      (no activity factor)

The clock tree does not scale with the toggle rate: a clock net switches every cycle whatever the
data do, and XPE's Clock sheet takes frequency and fanout only. Block RAM and UltraRAM scale with the
clock and the fraction of cycles a port is enabled (``C[power.bram_enable_rate]`` by default), as in
XPE's block RAM sheet. The caller multiplies the sum by ``C[power.dynamic_scale]`` (fitted by
calibration); these functions do not, so that the fit can vary it.

Energy of data movement: :func:`offchip_energy_j` (bytes * 8 * pJ/bit of the DRAM kind, device + PHY +
controller) and :func:`onchip_energy_j` (bits read from BRAM36 or URAM * pJ/bit on the fabric).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from hwcost.devices import constants

RESOURCES = ("lut", "ff", "dsp", "bram36", "uram")
"""Resource counts :func:`dynamic_power_w` takes (``lut`` in LUT6-equivalents, ``bram36`` in 36 Kib-equivalents)."""
TOGGLED = ("lut", "ff", "dsp")
"""Resources whose power scales with the toggle rate."""
ENABLED = ("bram36", "uram")
"""Memory blocks whose power scales with the enable rate (also the kinds :func:`onchip_energy_j` takes)."""
POWER_KEYS = RESOURCES + ("clock",)
"""Keys of the dict :func:`dynamic_power_w` returns."""


def _power_constants() -> dict:
    return constants()["power"]


def fabrics() -> tuple[str, ...]:
    """Fabric names with power coefficients (``constants.yaml`` power.dynamic_uw_per_mhz)."""
    return tuple(_power_constants()["dynamic_uw_per_mhz"])


def offchip_kinds() -> tuple[str, ...]:
    """Off-chip memory kinds with an energy per bit (``constants.yaml`` offchip_pj_per_bit)."""
    return tuple(constants()["offchip_pj_per_bit"])


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _amount(field: str, value) -> np.ndarray:
    """``value`` as a float array; a negative or non-finite entry raises ValueError naming ``field``."""
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{field}: must be finite and >= 0, got {value!r}")
    return arr


def dynamic_power_w(used: Mapping[str, float | np.ndarray], clock_mhz: float | np.ndarray,
                    toggle_rate: float | np.ndarray | None, fabric: str, *,
                    enable_rate: float | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Dynamic W per resource (``lut``, ``ff``, ``dsp``, ``bram36``, ``uram``) and of the ``clock`` tree.

    ``used`` maps resource names (see :data:`RESOURCES`; a missing one counts 0) to counts;
    ``clock_mhz`` is the design clock; ``toggle_rate`` the average toggle rate of the logic
    (None: ``C[power.toggle_rate]``); ``enable_rate`` the fraction of cycles BRAM/URAM ports are
    enabled (None: ``C[power.bram_enable_rate]``). Not multiplied by ``C[power.dynamic_scale]``.
    """
    p = _power_constants()
    coef = p["dynamic_uw_per_mhz"][_choice("fabric", fabric, fabrics())]
    unknown = sorted(set(used) - set(RESOURCES))
    if unknown:
        raise ValueError(f"used: {unknown[0]!r} is not one of {', '.join(RESOURCES)}")
    clock = _amount("clock_mhz", clock_mhz)
    toggle = _amount("toggle_rate", p["toggle_rate"] if toggle_rate is None else toggle_rate)
    enable = _amount("enable_rate", p["bram_enable_rate"] if enable_rate is None else enable_rate)
    to_w = clock * 1e-6  # uW/MHz * MHz * 1e-6 = W
    activity = {r: toggle / float(p["reference_toggle"]) for r in TOGGLED} | {r: enable for r in ENABLED}
    counts = {r: _amount(f"used[{r}]", used.get(r, 0.0)) for r in RESOURCES}
    out = {r: np.asarray(counts[r] * float(coef[r]) * to_w * activity[r]) for r in RESOURCES}
    out["clock"] = np.asarray(counts["ff"] * float(coef["clock_per_ff"]) * to_w)
    return out


def offchip_energy_j(bytes_moved: float | np.ndarray, kind: str) -> np.ndarray:
    """J to move ``bytes_moved`` bytes between off-chip memory of ``kind`` and the fabric.

    ``bytes * 8 * C[offchip_pj_per_bit][kind] * 1e-12``; ``kind`` is one of :func:`offchip_kinds`.
    """
    pj = float(constants()["offchip_pj_per_bit"][_choice("kind", kind, offchip_kinds())])
    return np.asarray(_amount("bytes_moved", bytes_moved) * 8.0 * pj * 1e-12)


def onchip_energy_j(bits_read: float | np.ndarray, memory: str, fabric: str = "ultrascale_plus") -> np.ndarray:
    """J to read ``bits_read`` bits from on-chip ``memory`` (``bram36`` or ``uram``) on ``fabric``.

    ``bits * C[power.onchip_pj_per_bit][fabric][memory] * 1e-12``.
    """
    table = _power_constants()["onchip_pj_per_bit"][_choice("fabric", fabric, fabrics())]
    pj = float(table[_choice("memory", memory, ENABLED)])
    return np.asarray(_amount("bits_read", bits_read) * pj * 1e-12)
