"""The dashboard's pages with Streamlit's AppTest on the real SQLite study the driver made (conftest's
``sqlite_study``), every figure checked against the stored trials by an independent computation."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from dse.cli import main
from dse.optuna_private import compute_hypervolume
from dse.records import TrialRecords
from dse.study import full_results
from helpers import ROOT

APP = str(ROOT / "dashboard" / "app.py")
STUDY = "e2e-sqlite"


# ------------------------------------------------------------------ helpers
def run_app(url: str, monkeypatch, view: str = "Study"):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DSE_STORAGE", url)
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    if view != "Study":
        app.sidebar.radio(key="view").set_value(view).run()
        assert not app.exception, app.exception
    return app


def figures(app) -> dict[str, dict]:
    """The page's Plotly figures by title."""
    out = {}
    for chart in app.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        out[fig["layout"]["title"]["text"]] = fig
    return out


def array(value) -> np.ndarray:
    """A Plotly array as sent to the browser (plain list, or base64 typed array)."""
    if isinstance(value, dict) and "bdata" in value:
        data = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return data.reshape([int(s) for s in str(shape).split(",")]) if shape else data
    return np.asarray(value)


def trace(fig: dict, name: str) -> dict | None:
    return next((t for t in fig["data"] if t.get("name") == name), None)


def completed(study) -> list:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def reports(study) -> dict[int, dict]:
    """The stored hardware report of every completed trial, by number (:mod:`dse.records`)."""
    records = TrialRecords.of(study)
    return {t.number: records.report(t) for t in completed(study)}


def brute_force_front(study) -> set[int]:
    """Evaluated trials that meet every constraint and that no other such trial dominates (signs by hand:
    proxy_kl minimise, tokens/s maximise, J/token minimise); one per distinct objective vector."""
    ok = [t for t in completed(study) if t.user_attrs["evaluated"] and all(v <= 0 for v in t.constraints.values())]
    sign = np.array([1.0, -1.0, 1.0])
    front, seen = set(), set()
    for t in ok:
        a = np.array(t.values) * sign
        beaten = any(np.all(np.array(o.values) * sign <= a) and np.any(np.array(o.values) * sign < a) for o in ok)
        if not beaten and tuple(t.values) not in seen:
            seen.add(tuple(t.values))
            front.add(t.number)
    return front


def hand_label(layer: dict) -> str:
    fmt = layer["format"]
    text = "fp16" if fmt == "16" else "ternary" if fmt == "ternary" else f"int{fmt}/g{layer['group_size']}"
    text += "" if layer.get("symmetric", True) or fmt in ("16", "ternary") else "/asym"
    return text if layer["sparsity"] == "dense" else f"{layer['sparsity']} {text}"


@pytest.fixture
def study_copy(sqlite_study, tmp_path):
    """A copy of the session study's database, for tests that add trials or studies."""
    _, url = sqlite_study
    db = tmp_path / "copy.db"
    shutil.copy(url.removeprefix("sqlite:///"), db)
    return f"sqlite:///{db}"


# ------------------------------------------------------------------ study view
def test_study_view_front_marks_baselines_and_hypervolume(sqlite_study, monkeypatch):
    study, url = sqlite_study
    app = run_app(url, monkeypatch)
    assert [h.value for h in app.subheader] == [STUDY]
    metrics = {m.label: m.value for m in app.metric}
    done = completed(study)
    by_number = {t.number: t for t in done}
    screened = [t for t in done if not t.user_attrs["evaluated"]]
    assert metrics["complete"] == str(len(done)) and metrics["infeasible"] == str(len(screened))
    front = brute_force_front(study)
    assert front and metrics["Pareto"] == str(len(front))

    fig = figures(app)["Pareto front"]
    assert fig["layout"]["xaxis"]["title"]["text"] == "decode tokens/s"  # the study's objectives by default
    assert set(array(trace(fig, "Pareto")["customdata"]).tolist()) == front
    feasible = {t.number for t in done if t.user_attrs["evaluated"]} - front
    if feasible:
        assert set(array(trace(fig, "feasible")["customdata"]).tolist()) == feasible
    promoted = set(full_results(study))
    assert promoted and set(array(trace(fig, "full fidelity")["customdata"]).tolist()) == promoted
    baselines = {t.user_attrs["warm_start"] for t in done if t.user_attrs.get("warm_start", "").startswith("uniform")
                 and t.user_attrs["evaluated"]}
    assert baselines and baselines <= {a["text"] for a in fig["layout"]["annotations"]}
    # screened-out trials have no proxy KL: not on these axes, said below the chart
    assert trace(fig, "infeasible (screened)") is None
    assert any(c.value.startswith(f"{len(screened)} infeasible trial") and "no proxy_kl" in c.value
               for c in app.caption)

    # hypervolume after each feasible trial: Optuna's WFG on every prefix, normalised by all feasible trials
    ok = sorted((t for t in done if t.user_attrs["evaluated"]), key=lambda t: t.number)
    loss = np.array([t.values for t in ok]) * np.array([1.0, -1.0, 1.0])
    lo, hi = loss.min(0), loss.max(0)
    scaled = (loss - lo) / np.where(hi > lo, hi - lo, 1.0)
    expected = [compute_hypervolume(scaled[: i + 1], np.full(3, 1.1)) for i in range(len(ok))]
    hv = figures(app)["Hypervolume"]["data"][0]
    assert array(hv["x"]).tolist() == [t.number for t in ok]
    assert array(hv["y"]) == pytest.approx(expected, rel=1e-9)
    assert metrics["hypervolume"] == f"{expected[-1]:.4f}"

    three = {t["name"]: t for t in figures(app)["Three objectives"]["data"]}  # proxy KL, tokens/s, J/token colour
    assert set(array(three["Pareto"]["customdata"]).tolist()) == front
    for part in three.values():
        for number, colour in zip(array(part["customdata"]), array(part["marker"]["color"])):
            assert colour == pytest.approx(by_number[int(number)].values[2])
    assert sorted(np.concatenate([array(t["customdata"]) for t in three.values()]).tolist()) == [t.number for t in ok]
    app.toggle(key=f"rotate-{STUDY}").set_value(True).run()
    three = {t["name"]: t for t in figures(app)["Three objectives"]["data"]}
    assert three["Pareto"]["type"] == "scatter3d"
    assert array(three["Pareto"]["z"]) == pytest.approx([by_number[n].values[2] for n in
                                                         array(three["Pareto"]["customdata"])])

    table = app.dataframe[0].value
    assert sorted(table["trial"]) == [t.number for t in study.trials]
    assert set(table.loc[table["status"] == "pareto", "trial"]) == front
    assert set(table.loc[table["status"] == "infeasible", "trial"]) == {t.number for t in screened}


def test_axes_show_hardware_figures_and_infeasible_trials(sqlite_study, monkeypatch):
    study, url = sqlite_study
    app = run_app(url, monkeypatch)
    options = app.selectbox(key=f"x-{STUDY}").options
    for label in ("LUT share", "DSP share", "BRAM share", "URAM share", "J/token", "weight bytes",
                  "proxy KL from the dense model (nats/token)", "full-fidelity accuracy (promoted trials)"):
        assert label in options
    app.selectbox(key=f"x-{STUDY}").set_value("lut_util")
    app.selectbox(key=f"y-{STUDY}").set_value("decode_tokens_per_s").run()
    assert not app.exception
    fig = figures(app)["Pareto front"]
    hw = reports(study)
    screened = trace(fig, "infeasible (screened)")
    assert screened is not None
    for name in ("Pareto", "feasible", "infeasible (screened)"):
        part = trace(fig, name)
        if part is None:
            continue
        for number, x, y in zip(array(part["customdata"]), array(part["x"]), array(part["y"])):
            assert x == pytest.approx(hw[int(number)]["utilisation"]["lut"])
            assert y == pytest.approx(hw[int(number)]["decode_tokens_per_s"])
    assert set(array(screened["customdata"]).tolist()) == {t.number for t in completed(study)
                                                           if not t.user_attrs["evaluated"]}
    # the front drawn for these axes: no feasible trial has lower LUT share and more tokens/s than a front point
    line = trace(fig, "front in these axes")
    ok = [(hw[t.number]["utilisation"]["lut"], hw[t.number]["decode_tokens_per_s"]) for t in completed(study)
          if t.user_attrs["evaluated"]]
    for x, y in zip(array(line["x"]), array(line["y"])):
        assert not any(a <= x and b >= y and (a < x or b > y) for a, b in ok)
    assert sorted(array(line["x"]).tolist()) == array(line["x"]).tolist()


# ------------------------------------------------------------------ trial and compare views
def test_trial_view_plan_map_breakdown_resources_and_evaluation(sqlite_study, monkeypatch):
    study, url = sqlite_study
    uniform = next(t for t in completed(study) if t.user_attrs.get("warm_start") == "uniform 2:4+int4")
    app = run_app(url, monkeypatch, view="Trial")
    app.selectbox(key=f"trial-{STUDY}").set_value(uniform.number).run()
    assert not app.exception
    figs = figures(app)
    heat = figs[f"Plan map, trial {uniform.number}"]["data"][0]
    columns, rows = list(heat["x"]), list(heat["y"])
    text, bits = heat["text"], array(heat["z"])
    for layer in TrialRecords.of(study).plan(uniform)["layers"]:
        parts = layer["name"].split(".")
        row = f"block {parts[2]}" if parts[:2] == ["model", "layers"] else layer["name"]
        column = ".".join(parts[3:]) if parts[:2] == ["model", "layers"] else "outside blocks"
        assert text[rows.index(row)][columns.index(column)] == hand_label(layer), layer["name"]
    # stored bits per weight, by hand: 2:4 INT4 with a 16-bit scale per 64 kept weights and a 2-bit index
    # per kept weight (ceil(log2 4)): q_proj 576 -> 576: 4 * 2/4 + 16 * ceil(288 / 64) / 576 + 2 * 2/4
    assert bits[rows.index("block 3"), columns.index("self_attn.q_proj")] == pytest.approx(2 + 80 / 576 + 1)
    # down_proj 1536 -> 576: 768 kept per row, 12 scales
    assert bits[rows.index("block 3"), columns.index("mlp.down_proj")] == pytest.approx(2 + 12 * 16 / 1536 + 1)
    assert all(t[columns.index("mixer")] == "attention" for t in text[:30])

    hw = TrialRecords.of(study).report(uniform)
    bars = figs["Resources on kria-kv260 (share of what the shell leaves)"]["data"]
    used = dict(zip(bars[0]["y"], array(bars[0]["x"])))
    assert used == pytest.approx(hw["utilisation"])
    assert dict(zip(bars[1]["y"], array(bars[1]["x"]))) == pytest.approx(hw["caps"])

    layers = next(d.value for d in app.dataframe if "bound" in d.value.columns)
    assert list(layers["name"]) == [row["name"] for row in hw["layers"]]
    for got, row in zip(layers.to_dict("records"), hw["layers"]):
        assert got["cycles"] == max(row["compute_cycles"], row["memory_cycles"])
        assert got["us"] == pytest.approx(got["cycles"] / hw["clock_mhz"])
        if row["compute_cycles"] != row["memory_cycles"]:
            assert got["bound"] == ("compute" if row["compute_cycles"] > row["memory_cycles"] else "memory")
    cycles = figs["Cycles per decode step by layer"]["data"]
    assert sum(len(array(t["y"])) for t in cycles) == len(hw["layers"])

    evaluation = next(d.value for d in app.dataframe if "fidelity" in d.value.columns)
    full = full_results(study)[uniform.number]
    for task, metrics in full["metrics"].items():
        for metric, value in metrics.items():
            if isinstance(value, float):
                got = evaluation[(evaluation["task"] == task) & (evaluation["metric"] == metric)]["value"]
                assert got.tolist() == [pytest.approx(value)]
    proxy = evaluation[evaluation["fidelity"] == "proxy"].set_index("metric")["value"]
    assert proxy["kl"] == pytest.approx(uniform.values[0])
    button = app.get("download_button")[0].proto
    assert button.label.startswith("Export bundle")


def test_export_bundle_equals_dse_export(sqlite_study, tmp_path):
    """The dashboard's download is the bundle `dse export --trial N` writes, byte for byte."""
    from dse.export import bundle_zip

    study, url = sqlite_study
    trial = next(t for t in completed(study) if t.number in full_results(study))
    assert main(["export", STUDY, "--storage", url, "--trial", str(trial.number), "--out", str(tmp_path)]) == 0
    with zipfile.ZipFile(io.BytesIO(bundle_zip(study, trial))) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(p.name for p in tmp_path.iterdir())
        for name in names:
            assert archive.read(name) == (tmp_path / name).read_bytes(), name


def test_compare_two_trials(sqlite_study, monkeypatch):
    study, url = sqlite_study
    app = run_app(url, monkeypatch, view="Compare")
    a, b = app.selectbox(key=f"cmp-a-{STUDY}").value, app.selectbox(key=f"cmp-b-{STUDY}").value
    assert a != b
    by_number = {t.number: t for t in study.trials}
    diff = app.dataframe[1].value
    records = TrialRecords.of(study)
    la = {d["name"]: d for d in records.plan(by_number[a])["layers"]}
    lb = {d["name"]: d for d in records.plan(by_number[b])["layers"]}

    def choice(d):
        return (d["sparsity"], d["format"], d["group_size"], d.get("symmetric", True),
                d["prune"] if d["sparsity"] != "dense" else None, d["quant"] if d["format"] != "16" else None)
    assert set(diff["unit"]) == {n for n in la if choice(la[n]) != choice(lb[n])}
    figures_table = app.dataframe[0].value.set_index("metric")
    for name in ("decode_tokens_per_s", "j_per_token"):
        row = figures_table.loc[name]
        ha, hb = records.report(by_number[a])[name], records.report(by_number[b])[name]
        assert row[f"trial {a}"] == pytest.approx(ha) and row["B - A"] == pytest.approx(hb - ha)
    assert len([f for f in figures(app) if f.startswith("Plan map")]) == 2


def test_studies_view_lists_every_study(sqlite_study, study_copy, monkeypatch):
    study, _ = sqlite_study
    optuna.create_study(study_name="plain-optuna", storage=study_copy, directions=["minimize", "maximize"])
    app = run_app(study_copy, monkeypatch, view="Studies")
    table = app.dataframe[0].value.set_index("study")
    assert list(table.index) == [STUDY, "plain-optuna"]
    row = table.loc[STUDY]
    assert (row["model"], row["device"], row["budget"], row["sampler"]) == ("smollm2-135m", "kria-kv260", 4, "nsga2")
    assert row["complete"] == len(completed(study)) and row["running"] == 0
    assert row["objectives"] == "proxy_kl (min), decode_tokens_per_s (max), j_per_token (min)"
    assert (row["constraints"], row["space"]) == ("decode_tokens_per_s >= 165", "attn, mlp, head")
    last = max(t.datetime_complete for t in study.trials)  # local time in Optuna's FrozenTrial
    assert abs(row["last update (UTC)"].timestamp() - last.timestamp()) < 1
    assert table.loc["plain-optuna", "complete"] == 0
    # an empty study's own page says so
    app.sidebar.radio(key="view").set_value("Study")
    app.sidebar.selectbox(key="study").set_value("plain-optuna").run()
    assert not app.exception and any("No trials yet" in i.value for i in app.info)


# ------------------------------------------------------------------ incomplete records
def test_running_failed_and_old_trials_render(sqlite_study, study_copy, monkeypatch, tmp_path):
    """A running trial (no values), a failed one, and a complete trial written the way older versions did
    (plan and report in its user attributes, no records; no hw_metrics, plan_summary, constraints or evaluated
    flag) render everywhere, and the old trial exports its plan and report."""
    source, _ = sqlite_study
    uniform = next(t for t in completed(source) if t.user_attrs.get("warm_start") == "uniform 2:4+int4")
    plan, hw = TrialRecords.of(source).plan(uniform), TrialRecords.of(source).report(uniform)
    study = optuna.load_study(study_name=STUDY, storage=study_copy)
    running = study.ask()
    failed = study.ask()
    failed.set_user_attr("error", "worker died")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    old_hw = {k: v for k, v in hw.items() if k not in ("engines", "prefill_ms")}
    study.add_trial(optuna.trial.create_trial(values=uniform.values, user_attrs={"plan": plan, "hw": old_hw}))
    old = study.trials[-1].number

    app = run_app(study_copy, monkeypatch)
    table = app.dataframe[0].value.set_index("trial")
    assert table.loc[running.number, "status"] == "running" and math.isnan(table.loc[running.number, "proxy_kl"])
    assert table.loc[failed.number, "status"] == "failed" and table.loc[failed.number, "note"] == "worker died"
    assert table.loc[old, "status"] == "unrecorded"  # no evaluation record: neither feasible nor screened
    assert table.loc[old, "decode_tokens_per_s"] == pytest.approx(hw["decode_tokens_per_s"])
    assert table.loc[old, "lut_util"] == pytest.approx(hw["utilisation"]["lut"])
    assert {m.label: m.value for m in app.metric}["running"] == "1"

    app.sidebar.radio(key="view").set_value("Trial").run()
    app.selectbox(key=f"trial-{STUDY}").set_value(old).run()
    assert not app.exception and f"Plan map, trial {old}" in figures(app)
    layers = next(d.value for d in app.dataframe if "bound" in d.value.columns)
    assert list(layers["name"]) == [row["name"] for row in old_hw["layers"]]
    assert app.get("download_button")[0].proto.label.startswith("Export bundle")
    bundle = tmp_path / "bundle"  # a fresh directory: tmp_path holds the storage copy
    assert main(["export", STUDY, "--storage", study_copy, "--trial", str(old), "--out", str(bundle)]) == 0
    assert yaml.safe_load((bundle / "plan.yaml").read_text())["plan"] == plan
    assert json.loads((bundle / "hw_report.json").read_text()) == old_hw
    app.sidebar.radio(key="view").set_value("Compare").run()
    app.selectbox(key=f"cmp-a-{STUDY}").set_value(old)
    app.selectbox(key=f"cmp-b-{STUDY}").set_value(uniform.number).run()
    assert not app.exception and app.dataframe[1].value.empty  # the same plan
    app.sidebar.radio(key="view").set_value("Studies").run()
    assert not app.exception
    row = app.dataframe[0].value.set_index("study").loc[STUDY]
    assert (row["running"], row["fail"]) == (1, 1)


# ------------------------------------------------------------------ reading, and mistakes
def test_reader_returns_lean_trials_incrementally(sqlite_study, study_copy):
    """The reader's trials are Optuna's (same numbers, states, values, constraints, user attributes) without
    their parameters, carry no plan or report, and a second read returns the same finished objects plus what
    is new or changed."""
    from dse.reader import TrialReader

    storage = optuna.storages.RDBStorage(study_copy, skip_table_creation=True)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    reader = TrialReader(storage, STUDY)
    light = reader.trials()
    for got, want in zip(light, study.get_trials(), strict=True):
        assert (got.number, got.state, got.values, got.constraints) == (want.number, want.state, want.values,
                                                                        want.constraints)
        assert got.user_attrs == want.user_attrs and got.params == {} and len(want.params) > 100
        assert "plan" not in got.user_attrs and "hw" not in got.user_attrs and "hw_metrics" in got.user_attrs
    new = study.ask()  # a second read returns the same finished objects and the new trial
    again = reader.trials()
    assert [t.number for t in again] == [t.number for t in light] + [new.number]
    assert all(a is b for a, b in zip(again, light))
    study.tell(new, state=optuna.trial.TrialState.FAIL)
    assert reader.trials()[-1].state == optuna.trial.TrialState.FAIL
    assert TrialReader(storage, storage.get_study_id_from_name(STUDY)).study.study_name == STUDY  # by id too


def test_bad_storage_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    missing = tmp_path / "missing.db"
    assert main(["dashboard", "--storage", f"sqlite:///{missing}"]) == 2
    assert capsys.readouterr().err == f"error: --storage: SQLite file '{missing}' does not exist (no studies there)\n"
    assert main(["dashboard", "--storage", "nonsense"]) == 2
    assert capsys.readouterr().err.startswith("error: --storage: 'nonsense' is not a database URL")
    assert main(["dashboard", "--port", "70000", "--storage", f"sqlite:///{missing}"]) == 2
    assert capsys.readouterr().err == "error: --port: 70000 is not a TCP port (1-65535)\n"
    assert not missing.exists()
    monkeypatch.setenv("DSE_STORAGE", f"sqlite:///{missing}")
    app = AppTest.from_file(APP, default_timeout=60)
    app.run()
    assert not app.exception and len(app.error) == 1 and "\n" not in app.error[0].value
    assert not missing.exists() or Path(missing).stat().st_size == 0


def test_plan_map_of_ternary_mlgru_and_sparse_layers_by_hand(sqlite_study):
    """The plan map of a hand-written plan on the study's stored workload: an MLGRU block shows its MLGRU
    projections (no attention ones) and is marked, and each cell's bits per weight is the hand count."""
    from dashboard.charts import plan_map
    from dashboard.data import plan_grid

    study, _ = sqlite_study
    plan = {"layers": [
        {"name": "model.layers.2.mlgru.f_proj", "sparsity": "dense", "format": "ternary"},
        {"name": "model.layers.0.mlp.down_proj", "sparsity": "1:4", "format": "3", "group_size": 32,
         "prune": "wanda", "quant": "gptq"}],
        "blocks": [{"index": 2, "mixer": "mlgru"}]}
    labels, bits = plan_grid(plan, study.user_attrs["workload"])
    assert list(labels.index) == [str(b) for b in range(30)] + ["lm_head"]
    assert labels.loc["2", "mixer"] == "MLGRU" and labels.loc["1", "mixer"] == "attention"
    assert labels.loc["2", "mlgru.f_proj"] == "ternary" and labels.loc["2", "self_attn.q_proj"] == ""
    assert labels.loc["1", "mlgru.f_proj"] == "" and labels.loc["1", "self_attn.q_proj"] == "fp16"
    assert labels.loc["0", "mlp.down_proj"] == "1:4 int3/g32"
    # ternary 576 x 576: 2-bit codes and one FP16 scale for the tensor
    assert bits.loc["2", "mlgru.f_proj"] == pytest.approx(2 + 16 / (576 * 576))
    # 1:4 INT3/g32, 1536 inputs: 384 kept x 3 bits, 12 scales x 16 bits, 384 x 2 index bits, per 1536 weights
    assert bits.loc["0", "mlp.down_proj"] == pytest.approx((384 * 3 + 12 * 16 + 384 * 2) / 1536)
    assert bits.loc["1", "self_attn.q_proj"] == 16 and math.isnan(bits.loc["1", "mlgru.f_proj"])
    fig = plan_map(labels, bits)
    assert [(s.y0, s.y1) for s in fig.layout.shapes] == [(1.5, 2.5)]  # the band on block 2's mixer cell


def test_postgresql_storage_reads_the_same(sqlite_study, monkeypatch):
    """The study copied (optuna.copy_study, then its records with dse.records.copy_records) to the real
    PostgreSQL server: the reader and the page give the same trials, statuses and numbers as on SQLite, and
    the Trial view the same plan map."""
    import os

    import sqlalchemy as sa

    from dse.records import TABLE, copy_records, study_key
    from helpers import PG_URL

    study, url = sqlite_study
    name = f"dash-pg-{os.getpid()}"
    optuna.copy_study(from_study_name=STUDY, from_storage=url, to_storage=PG_URL, to_study_name=name)
    source, target = sa.create_engine(url), sa.create_engine(PG_URL)
    try:
        assert copy_records(study_key(study), source, target) >= 2 * len(completed(study))  # plan, hw of each
        sqlite_table = run_app(url, monkeypatch).dataframe[0].value
        app = run_app(PG_URL, monkeypatch)
        app.sidebar.selectbox(key="study").set_value(name).run()
        assert not app.exception and [h.value for h in app.subheader] == [name]
        pg_table = app.dataframe[0].value
        columns = ["trial", "status", "proxy_kl", "decode_tokens_per_s", "j_per_token", "lut_util", "promoted",
                   "warm_start", "violated", "plan"]
        assert pg_table[columns].equals(sqlite_table[columns])
        app.sidebar.radio(key="view").set_value("Studies").run()
        row = app.dataframe[0].value.set_index("study").loc[name]
        assert row["complete"] == (sqlite_table["status"] != "running").sum()
        sqlite_maps = figures(run_app(url, monkeypatch, view="Trial"))
        app.sidebar.radio(key="view").set_value("Trial").run()
        assert not app.exception
        pg_maps = figures(app)
        title = next(t for t in sqlite_maps if t.startswith("Plan map"))
        assert pg_maps[title]["data"][0]["text"] == sqlite_maps[title]["data"][0]["text"]
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)
        with target.begin() as conn:
            conn.execute(TABLE.delete().where(TABLE.c.study == study_key(study)))
        source.dispose()
        target.dispose()


def test_every_view_leaves_the_storage_unchanged(study_copy, monkeypatch):
    """The dashboard only reads: after every view (the Trial view builds the export bundle) the database file
    is byte-identical."""
    import hashlib

    db = Path(study_copy.removeprefix("sqlite:///"))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    app = run_app(study_copy, monkeypatch)
    for view in ("Trial", "Compare", "Studies"):
        app.sidebar.radio(key="view").set_value(view).run()
        assert not app.exception
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
