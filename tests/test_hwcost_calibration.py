"""Calibration against published FPGA designs (hwcost/calibration.py, `dse hwcost calibrate`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dse.cli import main
from hwcost import calibration
from hwcost.calibration import CalibrationRow, calibration_rows, override_constants
from hwcost.devices import DATA_DIR, constants

SHARED_PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "calibration" / "published_fpga.yaml"
"""The project's shared calibration file: <repo>/../shared/calibration/published_fpga.yaml."""
HEADER_LINES = 2

ROWS = calibration_rows()
TOLERANCED = [row for row in ROWS if row.tolerance is not None]


@pytest.fixture(scope="module")
def fitted() -> dict:
    return calibration.fit()


@pytest.mark.parametrize("row", TOLERANCED, ids=[f"{r.design}:{r.metric}" for r in TOLERANCED])
def test_toleranced_check_passes(row: CalibrationRow):
    print(f"{row.design} {row.metric}: reported {row.reported:g}, predicted {row.predicted:.4g}, "
          f"residual {row.residual:+.1%}, tolerance {row.tolerance:.0%} ({row.note})")
    assert row.predicted is not None
    assert row.residual == pytest.approx(row.predicted / row.reported - 1.0)
    assert abs(row.residual) <= row.tolerance
    assert row.passed is True


def test_every_design_and_reported_figure_has_a_row():
    published = yaml.safe_load((DATA_DIR / "published_fpga.yaml").read_text())
    expected = {(d["id"], metric) for d in published["designs"] for metric in d["reported"]}
    assert expected <= {(row.design, row.metric) for row in ROWS}
    tolerances = {(row.design, row.metric): (row.tolerance, row.loo_tolerance) for row in ROWS}
    confidence = {d["id"]: d.get("confidence", "high") for d in published["designs"]}
    for (design, metric), (tol, loo) in tolerances.items():  # the targets for high/medium confidence
        if metric == "decode_tokens_per_s" and confidence[design] in ("high", "medium") and tol is not None:
            assert (tol, loo) == (0.15, 0.25), design
        if metric == "power_w" and tol is not None:
            assert (tol, loo) == (0.30, 0.30), design
    for design in ("flightllm-u280-llama2-7b", "kv260-llama2-7b-w4a16", "llama-fpga-u250-llama2-7b-int4",
                   "llama-fpga-zcu104-pl-llama2-7b-int4", "hummingbird-kv260-llama3-8b"):
        assert tolerances[(design, "decode_tokens_per_s")] == (0.15, 0.25), design
    for design in ("flightllm-u280-llama2-7b", "kv260-llama2-7b-w4a16", "matmulfree-d5005-1p3b"):
        assert tolerances[(design, "power_w")] == (0.30, 0.30), design
    for metric in ("matmul_speedup_4096", "llama7b_throughput_per_token"):  # GPU figures: printed, no prediction
        row = next(r for r in ROWS if r.metric == metric)
        assert row.predicted is None and row.tolerance is None and row.passed is None
        assert row.note == calibration.GPU_NOTE


def llama2_7b_linear_shapes() -> list[tuple[int, int]]:
    """(in, out) of the 224 block linear layers of LLaMA2-7B (hidden 4096, intermediate 11008, 32 blocks)."""
    h, f = 4096, 11008
    return [(h, h)] * 4 * 32 + [(h, f), (h, f), (f, h)] * 32


def test_nm_int4_storage_figures_are_exact():
    shapes = llama2_7b_linear_shapes()
    weights = sum(i * o for i, o in shapes)
    reduction = 16 * weights / sum(4 * i * o for i, o in shapes)  # INT4 values stored densely, scales excluded
    nm_bits = sum((i // 4) * o * (2 * 4 + 2 * 2) for i, o in shapes) / weights  # per 4 weights: 2 values + 2 2-bit indices
    assert (reduction, nm_bits) == (4.0, 3.0)
    rows = {row.metric: row for row in ROWS if row.design == "nm-int4-storage"}
    assert rows["weight_storage_reduction_vs_fp16"].predicted == reduction
    assert rows["nm_2of4_int4_bits_per_weight"].predicted == nm_bits
    assert rows["weight_storage_reduction_vs_fp16"].reported == 4.0
    assert rows["nm_2of4_int4_bits_per_weight"].reported == 3.0


def test_designs_reproduce_the_published_shapes():
    designs = {d: calibration.build_design(d) for d in calibration.design_ids()}
    for design_id, design in designs.items():
        if design.workload is None:  # not modelled: the published entry gives no model shape
            assert design.spec.get("not_modelled") and design.accel is None, design_id
            continue
        params_b = design.published["model"]["params_b"]
        assert design.workload.param_count() / 1e9 == pytest.approx(params_b, rel=0.05), design_id
    flight = designs["flightllm-u280-llama2-7b"]
    bits = [(layer.in_features * layer.out_features, flight.plan.layer(layer.name).fmt.bits)
            for layer in flight.workload.linear_layers() if layer.name != "lm_head"]
    assert sum(n * b for n, b in bits) / sum(n for n, _ in bits) == pytest.approx(3.55, abs=0.005)
    matmulfree = designs["matmulfree-d5005-1p3b"]
    from hwcost import estimate
    report = estimate(matmulfree.plan, matmulfree.workload, matmulfree.accel)
    assert [(e.kernel, e.lanes, e.fixed) for e in report.engines] == [("ternary", 512, True)]
    assert all(lp.fmt.is_ternary for lp in matmulfree.plan.layers)
    assert matmulfree.accel.clock_mhz == 60 and designs["kv260-llama2-7b-w4a16"].accel.clock_mhz == 300


NEW_MODELLED = {"llama-fpga-u250-llama2-7b-int4": ("decode_tokens_per_s",),
                "llama-fpga-zcu104-pl-llama2-7b-int4": ("decode_tokens_per_s",),
                "hummingbird-kv260-llama3-8b": ("decode_tokens_per_s", "model_bandwidth_utilisation")}
NOT_MODELLED = ("tereffic-v1-hbm-mmfreelm-2p7b", "tellme-v1-kv260-ternary")


def test_every_published_design_has_an_entry_and_is_printed(capsys):
    """Every design of published_fpga.yaml has a calibration.yaml entry, and every one of its figures is printed
    by `dse hwcost calibrate` with a residual or as not modelled with a reason."""
    published = yaml.safe_load((DATA_DIR / "published_fpga.yaml").read_text())
    specs = calibration.calibration_spec()["designs"]
    assert [d["id"] for d in published["designs"]] == calibration.design_ids()
    assert set(specs) == set(calibration.design_ids())
    by_design: dict[str, list[CalibrationRow]] = {}
    for row in ROWS:
        by_design.setdefault(row.design, []).append(row)
    for d in published["designs"]:
        rows = by_design[d["id"]]
        assert {r.metric for r in rows} >= set(d["reported"]), d["id"]
        for r in rows:
            reason = r.note[len(calibration.NOT_MODELLED):] if r.note.startswith(calibration.NOT_MODELLED) else ""
            assert (r.residual is not None) or reason.strip() or r.note == calibration.GPU_NOTE, (d["id"], r.metric)
            if r.residual is None:
                assert r.predicted is None and r.tolerance is None and r.passed is None, (d["id"], r.metric)
    assert main(["hwcost", "calibrate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for row, cells in zip(ROWS, calibration.table_cells(ROWS)):
        line = next((ln for ln in lines if ln.split()[:2] == [row.design, row.metric]), None)
        assert line is not None, (row.design, row.metric)
        if row.residual is not None:
            assert cells[4] in line.split()
        else:
            assert row.note and row.note in line


def test_new_designs_modelled_or_not_modelled():
    rows = {(r.design, r.metric): r for r in ROWS}
    for design_id, metrics in NEW_MODELLED.items():
        for metric in metrics:  # reproduced from the published parameters; the decode rates are tested
            row = rows[(design_id, metric)]
            assert row.predicted is not None and row.residual is not None, (design_id, metric)
            assert (row.tolerance is not None) == (metric == "decode_tokens_per_s")
    assert rows[("hummingbird-kv260-llama3-8b", "lut_dsp_power_vs_prior")].note.startswith(calibration.NOT_MODELLED)
    for design_id in NOT_MODELLED:
        design = calibration.build_design(design_id)
        assert design.accel is None and design.spec["not_modelled"]
        own = [r for r in ROWS if r.design == design_id]
        assert own and all(r.predicted is None and r.tolerance is None and r.note.startswith(calibration.NOT_MODELLED)
                           for r in own)
    u250 = calibration.build_design("llama-fpga-u250-llama2-7b-int4")
    assert (u250.accel.device, u250.accel.clock_mhz, u250.accel.act_bits) == ("alveo-u250", 300, 16)
    assert {lp.fmt.bits for lp in u250.plan.layers} == {4}
    hb = calibration.build_design("hummingbird-kv260-llama3-8b")
    assert (hb.workload.kv_heads, hb.workload.vocab, hb.accel.device) == (8, 128256, "kria-kv260")
    zcu = calibration.build_design("llama-fpga-zcu104-pl-llama2-7b-int4")
    assert (zcu.accel.device, zcu.accel.clock_mhz, zcu.accel.memory_names) == ("zcu104", 266.5, ["pl_ddr4"])


def test_override_constants_restores():
    c = constants()
    before = (c["power"]["dynamic_scale"], c["mem_efficiency"]["hbm2"])
    with override_constants({"power.dynamic_scale": 1.5, "mem_efficiency.hbm2": 0.5}) as inside:
        assert inside is constants() and constants()["power"]["dynamic_scale"] == 1.5
        assert constants()["mem_efficiency"]["hbm2"] == 0.5
    assert (c["power"]["dynamic_scale"], c["mem_efficiency"]["hbm2"]) == before
    with pytest.raises(KeyError):
        with override_constants({"power.dynamic_scale": 2.0, "no_such_constant": 1}):
            pass
    assert c["power"]["dynamic_scale"] == before[0]


def test_stored_constants_equal_fit(fitted):
    stored = calibration.stored_constants()
    assert set(fitted) == set(calibration.fit_spec()) == {"mem_efficiency.ddr4", "power.dynamic_scale"}
    for key, value in fitted.items():
        assert stored[key] == pytest.approx(value, rel=0.01), key
        lo, hi = calibration.fit_spec()[key]["range"]
        assert lo <= value <= hi
    for also in calibration.fit_spec()["mem_efficiency.ddr4"]["also"]:  # the DDR family shares the value
        assert calibration._get(also) == stored["mem_efficiency.ddr4"]


def test_fit_reproduces_a_single_design():
    """With one design in the fit, the log loss is zero at the fitted value inside the range: the minimiser
    finds the efficiency whose prediction equals the reported rate (checked by re-estimating)."""
    design = calibration.build_design("kv260-llama2-7b-w4a16")
    loss = calibration.log_loss([design], "decode_tokens_per_s", "mem_efficiency.ddr4")
    x = calibration.minimise_bounded(loss, 0.6, 0.95)
    from hwcost import estimate
    with override_constants({"mem_efficiency.ddr4": x}):
        rate = estimate(design.plan, design.workload, design.accel).decode_tokens_per_s
    assert rate == pytest.approx(4.9, rel=1e-4)
    assert calibration.minimise_bounded(lambda v: (v - 0.3) ** 2, 0.5, 2.0) == pytest.approx(0.5)  # a bound


def test_leave_one_out():
    """A design outside every fit has its all-in prediction as LOO; one inside a fit is predicted by constants
    fitted without it (the fit really changes), and a constant left without designs takes its prior."""
    rows = {(r.design, r.metric): r for r in ROWS}
    flight = rows[("flightllm-u280-llama2-7b", "decode_tokens_per_s")]
    assert flight.loo_predicted == pytest.approx(flight.predicted)  # FlightLLM is in no rate fit
    kv = rows[("kv260-llama2-7b-w4a16", "power_w")]
    assert kv.loo_predicted != pytest.approx(kv.predicted)
    without = calibration.fit(exclude="kv260-llama2-7b-w4a16")
    assert without["power.dynamic_scale"] != pytest.approx(calibration.fit()["power.dynamic_scale"])
    for d in calibration.fit_spec()["mem_efficiency.ddr4"]["designs"]:
        assert calibration.fit(exclude=d)["mem_efficiency.ddr4"] != calibration.fit()["mem_efficiency.ddr4"]
    assert all(r.loo_residual is not None for r in ROWS if r.tolerance is not None)


@pytest.mark.skipif(not SHARED_PUBLISHED.is_file(), reason=f"no shared calibration file at {SHARED_PUBLISHED}")
def test_shipped_published_file_is_the_shared_one():
    shipped = (DATA_DIR / "published_fpga.yaml").read_text(encoding="utf-8").splitlines(keepends=True)
    assert all(line.startswith("#") for line in shipped[:HEADER_LINES])
    assert "".join(shipped[HEADER_LINES:]) == SHARED_PUBLISHED.read_text(encoding="utf-8")


def test_cli_calibrate_table(capsys):
    code = main(["hwcost", "calibrate"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    for design_id in calibration.design_ids():
        assert design_id in out
    assert out.splitlines()[0].split()[:9] == ["design", "metric", "reported", "predicted", "residual", "LOO",
                                               "predicted", "LOO", "residual"]
    assert "FAIL" not in out and "PASS" in out


def test_cli_calibrate_json(capsys):
    code = main(["hwcost", "calibrate", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    rows = json.loads(out)
    assert [CalibrationRow(**row) for row in rows] == ROWS


def test_cli_calibrate_fit(capsys, fitted):
    code = main(["hwcost", "calibrate", "--fit"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "mem_efficiency.ddr4" in out and "power.dynamic_scale" in out
    data = json.loads((main(["hwcost", "calibrate", "--fit", "--json"]), capsys.readouterr().out)[1])
    assert data["fit"]["power.dynamic_scale"]["stored"] == constants()["power"]["dynamic_scale"]


def test_cli_calibrate_exits_1_on_a_failing_check(capsys, monkeypatch):
    failing = CalibrationRow("d", "decode_tokens_per_s", 10.0, 20.0, 1.0, 0.2, False, "")
    monkeypatch.setattr(calibration, "calibration_rows", lambda: [failing])
    assert main(["hwcost", "calibrate"]) == 1
    assert "FAIL" in capsys.readouterr().out
