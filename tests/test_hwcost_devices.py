"""The device catalog v2 (hwcost/devices.py, hwcost/data/devices.yaml): named memories with a kind, fabric-side
ports, the fabric family, the new boards' data-sheet figures, to_dict round trips and one-line file errors."""

from __future__ import annotations

import json

import pytest
import yaml

from dse.cli import main
from hwcost.devices import (FABRICS, MEMORY_KINDS, Device, DeviceFileError, MemorySystem, catalog_names, constants,
                            dsp_kinds, get_device, load_data_yaml, load_devices_file, parse_devices)

AMD_BOARD = {
    "vendor": "amd", "part": "xczu7ev-ffvc1156-2-e", "lut": 230400, "ff": 460800, "dsp": 1728,
    "dsp_kind": "dsp48e2", "bram_blocks": 312, "bram_block_kbits": 36, "uram": 96, "static_w": 5,
    "memories": {"ddr4": {"gbps": 19.2, "gb": 4}},
}

# The new boards' figures as the cited documents give them, typed here independently of devices.yaml:
# name -> (kind, GB/s, GiB, channels, port_bits)
NEW_BOARDS = {
    "zcu104": {  # UG1267 / DS891 (XCZU7EV); board files XilinxBoardStore zcu104/1.1
        "part": "xczu7ev-ffvc1156-2-e", "lut": 230_400, "ff": 460_800, "dsp": 1_728, "bram36": 312, "uram": 96,
        "dsp_kind": "dsp48e2", "fabric": "ultrascale_plus", "default": "pl_ddr4",
        "memories": {"pl_ddr4": ("ddr4", 17.06, 4, 1, 512), "ps_ddr4": ("ddr4", 17.07, 2, 4, 128)},
    },
    "vcu128": {  # UG1302 / DS923 (XCVU37P), UG949, UG1393, PG276; board files vcu128/production/1.0
        "part": "xcvu37p-fsvh2892-2L-e", "lut": 1_303_680, "ff": 2_607_360, "dsp": 9_024, "bram36": 2_016,
        "uram": 960, "dsp_kind": "dsp48e2", "fabric": "ultrascale_plus", "default": "hbm2",
        "memories": {"hbm2": ("hbm2", 460, 8, 32, 256), "ddr4": ("ddr4", 21.33, 4, 1, 512)},
    },
    "vck190": {  # UG1366 / DS950 (XCVC1902), AM004; board files vck190/production/3.1
        "part": "xcvc1902-vsva2197-2MP-e-S", "lut": 899_840, "ff": 1_799_680, "dsp": 1_968, "bram36": 967,
        "uram": 463, "dsp_kind": "dsp58", "fabric": "versal", "default": "lpddr4",
        "memories": {"lpddr4": ("lpddr4", 62.5, 8, 4, 512), "ddr4": ("ddr4", 25.6, 8, 2, 512)},
    },
    "alveo-v80": {  # Alveo V80 product brief / DS1013 (XCV80), PG313, AMD AMR V80 docs, AVED V80 design
        "part": "xcv80-lsva4737-2MHP-e-S", "lut": 2_600_000, "ff": 5_200_000, "dsp": 10_848, "bram36": 3_741,
        "uram": 1_925, "dsp_kind": "dsp58", "fabric": "versal", "default": "hbm2e",
        "memories": {"hbm2e": ("hbm2e", 819.2, 32, 32, 512), "ddr4": ("ddr4", 25.6, 32, 2, 512)},
    },
}

# Fabric-side ports of the existing boards: AMD PG276 (HBM2: 32 pseudo-channel AXI ports of 256 bits), PG150 (one
# 512-bit AXI port per DDR4 MIG controller), UG1085 (four 128-bit HP ports into the Zynq PS DDR), Intel EMIF (512-bit
# Avalon per DDR4 bank).
PORTS = {
    ("alveo-u280", "hbm2"): (32, 256), ("alveo-u280", "ddr4"): (2, 512), ("alveo-u55c", "hbm2"): (32, 256),
    ("alveo-u250", "ddr4"): (4, 512), ("vcu118", "ddr4"): (2, 512), ("zcu102", "ddr4"): (4, 128),
    ("kria-kv260", "ddr4"): (4, 128), ("intel-d5005", "ddr4"): (4, 512),
}


def board(**change) -> dict:
    return {**AMD_BOARD, **change}


def parse_one(fields: dict, name: str = "b") -> Device:
    return parse_devices({"devices": {name: fields}})[name]


def error_of(fields: dict, name: str = "b") -> str:
    with pytest.raises(DeviceFileError) as info:
        parse_one(fields, name)
    text = str(info.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------ the catalog
def test_every_catalog_device_parses_with_constants_for_its_kinds():
    raw = load_data_yaml("devices.yaml")["devices"]
    assert set(NEW_BOARDS) <= set(catalog_names()) == set(raw)
    for name in catalog_names():
        dev = get_device(name)
        assert dev.name == name and dev.fabric in FABRICS and dev.dsp_kind in dsp_kinds()
        assert dev.default_memory in dev.memory_names and dev.memory() is dev.memory(dev.default_memory)
        for mem in dev.memories:
            assert mem.kind in MEMORY_KINDS and mem.kind in constants()["mem_efficiency"], (name, mem)
            assert mem.channels >= 1 and mem.fabric_bytes_per_cycle == mem.channels * mem.port_bits / 8
        assert parse_one(raw[name], name) == dev


def test_memory_kinds_and_every_kind_has_an_efficiency():
    assert MEMORY_KINDS == ("ddr4", "ddr5", "lpddr4", "lpddr5", "hbm2", "hbm2e")
    assert set(MEMORY_KINDS) <= set(constants()["mem_efficiency"])


@pytest.mark.parametrize("name", sorted(NEW_BOARDS))
def test_new_boards_key_figures(name):
    want, dev = NEW_BOARDS[name], get_device(name)
    assert (dev.part, dev.lut, dev.ff, dev.dsp, dev.uram) == (want["part"], want["lut"], want["ff"], want["dsp"],
                                                             want["uram"])
    assert dev.bram_blocks == want["bram36"] and dev.bram_block_kbits == 36 and dev.bram36 == want["bram36"]
    assert (dev.dsp_kind, dev.fabric, dev.default_memory) == (want["dsp_kind"], want["fabric"], want["default"])
    assert dev.memory_names == list(want["memories"])
    for mem_name, (kind, gbps, gb, channels, port_bits) in want["memories"].items():
        mem = dev.memory(mem_name)
        assert (mem.name, mem.kind, mem.channels, mem.port_bits) == (mem_name, kind, channels, port_bits)
        assert mem.gbps == pytest.approx(gbps) and mem.gb == gb
    assert 0 <= dev.shell_overhead < 0.2 and dev.static_w > 0 and dev.source


def test_new_boards_bandwidth_is_the_configured_rate_times_the_width():
    """Each new GB/s is data rate x data bits / 8 of the configuration the catalog cites."""
    def gbps(mt_s: float, bits: int) -> float:
        return mt_s * 1e6 * bits / 8 / 1e9
    assert get_device("zcu104").memory("pl_ddr4").gbps == pytest.approx(gbps(2e6 / 938, 64), rel=1e-3)  # tCK 938 ps
    assert get_device("zcu104").memory("ps_ddr4").gbps == pytest.approx(gbps(2 * 1067, 64), rel=1e-3)  # 1067 MHz
    assert get_device("vcu128").memory("ddr4").gbps == pytest.approx(gbps(2e6 / 750, 64), rel=1e-3)  # tCK 750 ps
    assert get_device("vck190").memory("lpddr4").gbps == pytest.approx(gbps(2e6 / 512, 4 * 32))  # 2 DDRMC x 2 x32
    assert get_device("vck190").memory("ddr4").gbps == pytest.approx(gbps(3200, 64))  # DDR4-3200 UDIMM
    assert get_device("alveo-v80").memory("hbm2e").gbps == pytest.approx(gbps(3200, 32 * 64))  # 32 PCs x 64 bits
    assert get_device("alveo-v80").memory("ddr4").gbps == pytest.approx(gbps(3200, 64))  # DDR4-3200 RDIMM


def test_existing_boards_ports():
    for (name, mem), (channels, port_bits) in PORTS.items():
        m = get_device(name).memory(mem)
        assert (m.channels, m.port_bits) == (channels, port_bits), (name, mem)
    assert get_device("alveo-u280").memory("hbm2").fabric_bytes_per_cycle == 32 * 32  # 1 KiB per cycle


def test_fabric_follows_the_dsp_kind():
    assert {name: get_device(name).fabric for name in ("alveo-u280", "vck190", "intel-d5005")} == {
        "alveo-u280": "ultrascale_plus", "vck190": "versal", "intel-d5005": "stratix10"}
    assert parse_one(board(dsp_kind="dsp58")).fabric == "versal"
    assert parse_one(board(fabric="agilex", dsp_kind="s10_vp")).fabric == "agilex"
    assert error_of(board(fabric="virtex")) == (
        "devices.b.fabric: 'virtex' is not one of ultrascale_plus, versal, stratix10, agilex")


def test_dsp58_constants_have_the_dsp48e2_keys():
    c = constants()
    assert "dsp58" in dsp_kinds()
    for table in ("macs_per_dsp", "macs_per_dsp_a16", "lane_lut"):
        assert set(c[table]["dsp58"]) == set(c[table]["dsp48e2"]), table
    assert c["macs_per_dsp"]["dsp58"]["int8"] == 3 and c["macs_per_dsp"]["dsp58"]["fp16"] == 1


# ------------------------------------------------------------------ to_dict
@pytest.mark.parametrize("name", catalog_names())
def test_to_dict_round_trips(name):
    dev = get_device(name)
    d = dev.to_dict()
    assert d.pop("name") == name and set(d["memories"]) == set(dev.memory_names)
    assert parse_devices({"devices": {name: d}})[name] == dev
    through_yaml = yaml.safe_load(yaml.safe_dump({"devices": {name: d}}, sort_keys=False))  # keeps memory order
    assert parse_devices(through_yaml)[name] == dev
    assert parse_devices(json.loads(json.dumps({"devices": {name: d}})))[name] == dev


def test_to_dict_memories_are_in_the_file_form():
    d = get_device("zcu104").to_dict()
    assert d["memories"]["ps_ddr4"] == {"kind": "ddr4", "gbps": 17.07, "gb": 2.0, "channels": 4, "port_bits": 128}
    assert d["default_memory"] == "pl_ddr4" and d["fabric"] == "ultrascale_plus"


# ------------------------------------------------------------------ memories in a devices file
def test_old_format_memories_still_parse():
    dev = parse_one(board(memories={"hbm2": {"gbps": 460, "gb": 8}, "ddr4": {"gbps": 38, "gb": 32}}))
    assert dev.memory_names == ["hbm2", "ddr4"] and dev.default_memory == "hbm2"
    hbm = dev.memory("hbm2")
    assert (hbm.name, hbm.kind, hbm.gbps, hbm.gb, hbm.channels, hbm.port_bits) == ("hbm2", "hbm2", 460, 8, 1, 512)
    assert hbm.bytes_per_s == 460e9 and hbm.capacity_bytes == 8 * 2**30 and hbm.fabric_bytes_per_cycle == 64


def test_named_memories_with_an_explicit_kind():
    dev = parse_one(board(memories={
        "ps_ddr4": {"kind": "ddr4", "gbps": 17.07, "gb": 2, "channels": 4, "port_bits": 128},
        "pl_ddr4": {"kind": "ddr4", "gbps": 17.06, "gb": 4},
        "hbm2": {"kind": "hbm2e", "gbps": 819.2, "gb": 32},  # a kind's name used for another kind: the kind wins
    }, default_memory="pl_ddr4"))
    assert dev.memory().name == "pl_ddr4" and dev.memory("ps_ddr4").kind == "ddr4"
    assert dev.memory("ps_ddr4").fabric_bytes_per_cycle == 4 * 128 / 8
    assert dev.memory("hbm2").kind == "hbm2e"
    with pytest.raises(ValueError, match=r"^device 'b' has no memory 'ddr4'; allowed: ps_ddr4, pl_ddr4, hbm2$"):
        dev.memory("ddr4")


def test_memory_systems_built_in_python_are_named_by_their_kind():
    dev = Device(**{**board(), "memories": (MemorySystem(kind="lpddr5", gbps=51.2, gb=8),)})
    assert dev.memory_names == ["lpddr5"] and dev.default_memory == "lpddr5" and dev.fabric == "ultrascale_plus"


@pytest.mark.parametrize("memories, message", [
    ({"m": {"kind": "ddr6", "gbps": 10, "gb": 2}},
     "devices.b.memories.m.kind: 'ddr6' is not one of ddr4, ddr5, lpddr4, lpddr5, hbm2, hbm2e"),
    ({"fast": {"gbps": 10, "gb": 2}},
     "devices.b.memories.fast.kind: is required (the name 'fast' is not a memory kind); allowed: ddr4, ddr5, lpddr4, "
     "lpddr5, hbm2, hbm2e"),
    ({"ddr4": {"gbps": 10, "gb": 2, "channels": 0}}, "devices.b.memories.ddr4.channels: 0 is not an integer >= 1"),
    ({"ddr4": {"gbps": 10, "gb": 2, "channels": 2.5}}, "devices.b.memories.ddr4.channels: 2.5 is not an integer"),
    ({"ddr4": {"gbps": 10, "gb": 2, "channels": True}}, "devices.b.memories.ddr4.channels: True is not an integer"),
    ({"ddr4": {"gbps": 10, "gb": 2, "port_bits": 100}},
     "devices.b.memories.ddr4.port_bits: 100 is not an AXI data width; allowed: 8, 16, 32, 64, 128, 256, 512, 1024"),
    ({"ddr4": {"gbps": 10, "gb": 2, "port_bits": 4}}, "devices.b.memories.ddr4.port_bits: 4 is not an AXI data width"),
    ({"ddr4": {"gbps": 10, "gb": 2, "port_bits": "512"}},
     "devices.b.memories.ddr4.port_bits: '512' is not an AXI data width"),
    ({"ddr4": {"gbps": 10, "gb": 2, "ports": 4}}, "devices.b.memories.ddr4.ports: unknown field; allowed: kind, gbps"),
    ({"ddr4": {"gbps": 0, "gb": 2}}, "devices.b.memories.ddr4.gbps: 0 is not a number"),
    ({"ps.ddr4": {"kind": "ddr4", "gbps": 10, "gb": 2}}, "devices.b.memories.ps.ddr4: a memory name is 1-32 letters"),
    ({"ps+pl": {"kind": "ddr4", "gbps": 10, "gb": 2}}, "devices.b.memories.ps+pl: a memory name is 1-32 letters"),
    ({}, "devices.b.memories: expected a mapping of memory name -> {kind, gbps, gb, channels, port_bits}"),
    ({"ddr4": [1, 2]}, "devices.b.memories.ddr4: expected a mapping with fields kind, gbps, gb, channels, port_bits"),
])
def test_memory_errors_are_one_line_naming_the_field(memories, message):
    assert error_of(board(memories=memories)).startswith(message)


def test_default_memory_is_a_name():
    two = {"ps_ddr4": {"kind": "ddr4", "gbps": 17, "gb": 2}, "pl_ddr4": {"kind": "ddr4", "gbps": 17, "gb": 4}}
    assert parse_one(board(memories=two)).default_memory == "ps_ddr4"  # the first listed
    assert error_of(board(memories=two, default_memory="ddr4")) == (
        "devices.b.default_memory: 'ddr4' is not one of ps_ddr4, pl_ddr4")


# ------------------------------------------------------------------ duplicate keys
DUPLICATE_FIELD = """\
devices:
  b:
    vendor: amd
    lut: 1000
    ff: 2000
    dsp: 10
    dsp: 12
    dsp_kind: dsp48e2
    bram_blocks: 4
    bram_block_kbits: 36
    memories: {ddr4: {gbps: 19.2, gb: 4}}
    static_w: 3
"""

DUPLICATE_MEMORY = """\
devices:
  b:
    lut: 1000
    ff: 2000
    dsp: 10
    dsp_kind: dsp48e2
    bram_blocks: 4
    bram_block_kbits: 36
    memories:
      ddr4: {gbps: 19.2, gb: 4}
      ddr4: {gbps: 25.6, gb: 8}
    static_w: 3
"""


@pytest.mark.parametrize("text, key, line, first", [(DUPLICATE_FIELD, "dsp", 7, 6), (DUPLICATE_MEMORY, "ddr4", 11, 10)])
def test_duplicate_key_in_a_devices_file_names_key_and_line(tmp_path, text, key, line, first):
    path = tmp_path / "boards.yaml"
    path.write_text(text)
    with pytest.raises(DeviceFileError) as info:
        load_devices_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"at line {line}," in message and f"duplicate key '{key}' (first at line {first})" in message, message


def test_duplicate_key_through_the_cli_is_one_line(tmp_path, capsys):
    path = tmp_path / "boards.yaml"
    path.write_text(DUPLICATE_FIELD)
    assert main(["hwcost", "devices", "--devices-file", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --devices-file: ") and "duplicate key 'dsp'" in lines[0]


# ------------------------------------------------------------------ CLI
def test_unknown_device_error_points_to_devices_file(capsys):
    code = main(["hwcost", "estimate", "--model-config", "smollm2-135m", "--weights", "int4", "--device", "foo"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --device: 'foo' is not a known device; allowed: alveo-u280, ")
    assert lines[0].endswith("(or add it with --devices-file FILE.yaml)") and "alveo-v80" in lines[0]


def test_devices_table_shows_memory_names_kinds_and_ports(capsys):
    assert main(["hwcost", "devices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ports x bits" in out[0]
    zcu104 = next(line for line in out if line.startswith("zcu104 "))
    assert "pl_ddr4 (ddr4)+ps_ddr4 (ddr4)" in zcu104 and "1x512/4x128" in zcu104 and "17.06/17.07" in zcu104
    u280 = next(line for line in out if line.startswith("alveo-u280 "))
    assert "hbm2+ddr4" in u280 and "32x256/2x512" in u280


def test_devices_json_rows_keep_the_file_form_and_block_ram(capsys):
    assert main(["hwcost", "devices", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["vck190"]["bram36"] == 967 and rows["vck190"]["fabric"] == "versal"
    assert rows["alveo-v80"]["memories"]["hbm2e"] == {"kind": "hbm2e", "gbps": 819.2, "gb": 32.0, "channels": 32,
                                                      "port_bits": 512}
