"""hwcost.power: XPE-style dynamic power and the energy of moving bits, against hand-worked figures."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwcost import power
from hwcost.devices import constants

FABRICS = ("ultrascale_plus", "versal", "stratix10", "agilex")
KINDS = ("ddr4", "ddr5", "lpddr4", "lpddr5", "hbm2", "hbm2e")


def _total(d: dict) -> float:
    return float(sum(np.sum(v) for v in d.values()))


def test_tables_cover_every_fabric_and_memory_kind():
    p = constants()["power"]
    assert power.fabrics() == FABRICS
    assert set(power.offchip_kinds()) == set(KINDS)
    for fabric in FABRICS:
        assert set(p["dynamic_uw_per_mhz"][fabric]) == {"lut", "ff", "dsp", "bram36", "uram", "clock_per_ff"}
        assert set(p["onchip_pj_per_bit"][fabric]) == {"bram36", "uram"}
        assert all(v > 0 for v in p["dynamic_uw_per_mhz"][fabric].values())
    assert p["reference_toggle"] == 0.125 and 0.5 <= p["dynamic_scale"] <= 2.0  # fitted in calibration's range


def test_hand_worked_breakdown_ultrascale_plus():
    """A design typed in: 100k LUT, 150k FF, 1000 DSP, 200 BRAM36, 50 URAM at 250 MHz, toggle 25 %, enable 40 %.

    The coefficients are the ultrascale_plus row of constants.yaml (uW/MHz): lut 0.030, ff 0.016,
    dsp 1.2, bram36 41, uram 117, clock_per_ff 0.021. If that row changes, redo this arithmetic.
    """
    used = {"lut": 100_000, "ff": 150_000, "dsp": 1_000, "bram36": 200, "uram": 50}
    got = power.dynamic_power_w(used, 250.0, 0.25, "ultrascale_plus", enable_rate=0.4)
    toggle_factor = 0.25 / 0.125  # = 2
    expected = {
        "lut": 100_000 * 0.030 * 250 * 1e-6 * toggle_factor,  # = 1.5 W
        "ff": 150_000 * 0.016 * 250 * 1e-6 * toggle_factor,  # = 1.2 W
        "dsp": 1_000 * 1.2 * 250 * 1e-6 * toggle_factor,  # = 0.6 W
        "bram36": 200 * 41 * 250 * 1e-6 * 0.4,  # = 0.82 W
        "uram": 50 * 117 * 250 * 1e-6 * 0.4,  # = 0.585 W
        "clock": 150_000 * 0.021 * 250 * 1e-6,  # = 0.7875 W, no toggle factor
    }
    assert set(got) == set(expected)
    for key, watts in expected.items():
        assert float(got[key]) == pytest.approx(watts, rel=1e-12), key
    assert _total(got) == pytest.approx(1.5 + 1.2 + 0.6 + 0.82 + 0.585 + 0.7875)


def test_defaults_are_the_constants():
    used = {"lut": 5e4, "ff": 6e4, "dsp": 300, "bram36": 40, "uram": 8}
    p = constants()["power"]
    implicit = power.dynamic_power_w(used, 200, None, "versal")
    explicit = power.dynamic_power_w(used, 200, p["toggle_rate"], "versal", enable_rate=p["bram_enable_rate"])
    assert {k: float(v) for k, v in implicit.items()} == {k: float(v) for k, v in explicit.items()}


def test_zero_resources_zero_dynamic():
    for fabric in FABRICS:
        d = power.dynamic_power_w({}, 300.0, 0.125, fabric)
        assert set(d) == set(power.POWER_KEYS)
        assert _total(d) == 0.0
        assert _total(power.dynamic_power_w({r: 0 for r in power.RESOURCES}, 300.0, 0.5, fabric)) == 0.0


counts = st.fixed_dictionaries({r: st.floats(0, 2e6) for r in ("lut", "ff")}
                               | {r: st.floats(0, 1e4) for r in ("dsp", "bram36", "uram")})


@settings(max_examples=200, deadline=None)
@given(used=counts, fabric=st.sampled_from(FABRICS), resource=st.sampled_from(("lut", "ff", "dsp", "bram36", "uram")),
       extra=st.floats(1, 1e4), clock=st.floats(10, 800), toggle=st.floats(0.01, 1.0))
def test_power_rises_with_each_resource(used, fabric, resource, extra, clock, toggle):
    more = dict(used, **{resource: used[resource] + extra})
    assert _total(power.dynamic_power_w(more, clock, toggle, fabric)) > \
        _total(power.dynamic_power_w(used, clock, toggle, fabric))


@settings(max_examples=200, deadline=None)
@given(used=counts, fabric=st.sampled_from(FABRICS), clock=st.floats(10, 800), factor=st.floats(1.01, 4),
       toggle=st.floats(0.01, 1.0))
def test_power_rises_with_clock(used, fabric, clock, factor, toggle):
    used = dict(used, dsp=used["dsp"] + 1)  # something is used
    assert _total(power.dynamic_power_w(used, clock * factor, toggle, fabric)) > \
        _total(power.dynamic_power_w(used, clock, toggle, fabric))


@settings(max_examples=200, deadline=None)
@given(used=counts, fabric=st.sampled_from(FABRICS), clock=st.floats(10, 800), toggle=st.floats(0.01, 1.0),
       factor=st.floats(1.01, 4))
def test_power_rises_with_toggle(used, fabric, clock, toggle, factor):
    used = dict(used, lut=used["lut"] + 1)  # toggled logic is used
    assert _total(power.dynamic_power_w(used, clock, toggle * factor, fabric)) > \
        _total(power.dynamic_power_w(used, clock, toggle, fabric))


def test_clock_tree_and_memories_do_not_scale_with_toggle():
    used = {"ff": 1e5, "bram36": 100, "uram": 10}
    low = power.dynamic_power_w(used, 300, 0.05, "ultrascale_plus")
    high = power.dynamic_power_w(used, 300, 0.5, "ultrascale_plus")
    for key in ("clock", "bram36", "uram"):
        assert float(low[key]) == float(high[key]) > 0
    assert float(high["ff"]) == pytest.approx(10 * float(low["ff"]))


def test_array_and_scalar_inputs_agree():
    rng = np.random.default_rng(0)
    n = 7
    used = {"lut": rng.uniform(0, 1e6, n), "ff": rng.uniform(0, 2e6, n), "dsp": rng.uniform(0, 5e3, n),
            "bram36": rng.uniform(0, 2e3, n), "uram": rng.uniform(0, 900, n)}
    clock, toggle = rng.uniform(50, 500, n), rng.uniform(0.05, 0.5, n)
    for fabric in FABRICS:
        arr = power.dynamic_power_w(used, clock, toggle, fabric)
        for i in range(n):
            one = power.dynamic_power_w({r: float(v[i]) for r, v in used.items()}, float(clock[i]),
                                        float(toggle[i]), fabric)
            for key in power.POWER_KEYS:
                assert np.shape(one[key]) == ()
                assert float(one[key]) == pytest.approx(float(arr[key][i]), rel=1e-12)
    bits = rng.uniform(0, 1e12, n)
    for kind in KINDS:
        got = power.offchip_energy_j(bits, kind)
        assert [float(power.offchip_energy_j(float(b), kind)) for b in bits] == pytest.approx(list(got))
    for memory in ("bram36", "uram"):
        got = power.onchip_energy_j(bits, memory, "agilex")
        assert [float(power.onchip_energy_j(float(b), memory, "agilex")) for b in bits] == pytest.approx(list(got))


def test_scalar_counts_broadcast_against_array_clock():
    d = power.dynamic_power_w({"dsp": 1000}, np.array([100.0, 200.0, 400.0]), 0.125, "stratix10")
    assert d["dsp"] == pytest.approx([1000 * 1.7 * f * 1e-6 for f in (100, 200, 400)])


def test_one_gb_of_ddr4():
    # 1 GB = 1e9 bytes = 8e9 bits, at the ddr4 figure of 20 pJ/bit (Horowitz: 640 pJ per 32-bit DRAM access)
    assert float(power.offchip_energy_j(1e9, "ddr4")) == pytest.approx(8e9 * 20e-12)  # = 0.16 J
    for kind in KINDS:
        pj = constants()["offchip_pj_per_bit"][kind]
        assert float(power.offchip_energy_j(1e9, kind)) == pytest.approx(8e9 * pj * 1e-12)
    assert float(power.offchip_energy_j(0, "hbm2")) == 0.0


def test_onchip_energy_per_bit():
    # 1e9 bits read from BRAM36 on UltraScale+ at 0.57 pJ/bit
    assert float(power.onchip_energy_j(1e9, "bram36", "ultrascale_plus")) == pytest.approx(1e9 * 0.57e-12)
    assert float(power.onchip_energy_j(1e9, "uram")) == pytest.approx(1e9 * 1.6e-12)  # default fabric
    for fabric in FABRICS:
        pj = constants()["power"]["onchip_pj_per_bit"][fabric]
        assert float(power.onchip_energy_j(8, "uram", fabric)) == pytest.approx(8 * pj["uram"] * 1e-12)


def test_later_nodes_cost_less_per_resource():
    used = {"lut": 1e5, "ff": 1e5, "dsp": 1e3, "bram36": 100, "uram": 10}
    us, versal = (_total(power.dynamic_power_w(used, 300, 0.125, f)) for f in ("ultrascale_plus", "versal"))
    s10, agilex = (_total(power.dynamic_power_w(used, 300, 0.125, f)) for f in ("stratix10", "agilex"))
    assert versal < us and agilex < s10


def test_unknown_fabric_raises_naming_the_allowed_values():
    with pytest.raises(ValueError) as err:
        power.dynamic_power_w({"lut": 1}, 100, 0.125, "virtex7")
    msg = str(err.value)
    assert "fabric" in msg and "virtex7" in msg and all(f in msg for f in FABRICS)
    with pytest.raises(ValueError, match="fabric") as err:
        power.onchip_energy_j(1, "bram36", "cyclone")
    assert all(f in str(err.value) for f in FABRICS)


def test_unknown_memory_kind_raises_naming_the_allowed_values():
    with pytest.raises(ValueError) as err:
        power.offchip_energy_j(1, "gddr6")
    msg = str(err.value)
    assert "kind" in msg and "gddr6" in msg and all(k in msg for k in KINDS)
    with pytest.raises(ValueError) as err:
        power.onchip_energy_j(1, "lutram", "versal")
    assert "memory" in str(err.value) and "bram36" in str(err.value) and "uram" in str(err.value)


def test_unknown_resource_and_negative_inputs_raise():
    with pytest.raises(ValueError, match="used: 'm20k' is not one of lut, ff, dsp, bram36, uram"):
        power.dynamic_power_w({"m20k": 1}, 100, 0.125, "stratix10")
    with pytest.raises(ValueError, match="used\\[dsp\\]"):
        power.dynamic_power_w({"dsp": np.array([1.0, -1.0])}, 100, 0.125, "versal")
    with pytest.raises(ValueError, match="clock_mhz"):
        power.dynamic_power_w({"lut": 1}, -5, 0.125, "versal")
    with pytest.raises(ValueError, match="toggle_rate"):
        power.dynamic_power_w({"lut": 1}, 100, float("nan"), "versal")
    with pytest.raises(ValueError, match="bytes_moved"):
        power.offchip_energy_j(-1, "ddr4")
    with pytest.raises(ValueError, match="bits_read"):
        power.onchip_energy_j(np.array([1.0, -2.0]), "bram36", "versal")
