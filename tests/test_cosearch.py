"""Co-search: accelerator fields listed as choices in the spec's ``hardware:`` are searched with the plan.

The spec's lists become Optuna parameters ``hw.<field>``; a bad choice is one line naming its index; a real
hardware-only study (the driver on SQLite, the cost model alone, no Ray) over two devices, one of them from
a devices file, stores with every trial the accelerator it was costed on; ``dse status`` and the dashboard
show it; ``dse export`` writes it as accelerator.yaml, from which ``dse hwcost estimate`` in a fresh process
reproduces the stored report exactly.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution

from dse.cli import main
from dse.hardware import accelerator_fields, encode_choice
from dse.plan import ModelPlan
from dse.records import TrialRecords
from dse.space import accelerator_from_params, hardware_distributions, suggest_accelerator
from dse.spec import load_spec, parse_spec
from hwcost import Workload, estimate, list_devices
from helpers import ROOT

EXAMPLE = ROOT / "examples" / "default.yaml"
STUDY = "cosearch"
BOARD = {"vendor": "amd", "part": "test-part", "lut": 230_400, "ff": 460_800, "dsp": 1_728, "dsp_kind": "dsp48e2",
         "bram_blocks": 312, "bram_block_kbits": 36, "uram": 96, "memories": {"ddr4": {"gbps": 38.4, "gb": 8}},
         "static_w": 5.0}
"""A board that is not in the catalog (a ZCU-class part with twice the KV260's DDR4 bandwidth)."""
SEARCH = {"device": ["kria-kv260", "my-board"], "clock_mhz": [200, 300], "batch": [1, 4], "dsp_share": 0.6,
          "devices_file": "boards.yaml"}
TRIALS = 14


def example(**hardware) -> dict:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["hardware"] = hardware or {"device": "kria-kv260"}
    return data


def hardware_only(tmp_path: Path, storage: str, study: str, hardware: dict, trials: int = TRIALS) -> Path:
    """A spec file whose objectives are the cost model's (no evaluation, no Ray), boards.yaml beside it."""
    (tmp_path / "boards.yaml").write_text(yaml.safe_dump({"devices": {"my-board": BOARD}}))
    data = example(**hardware)
    data.update(study=study, storage=storage, trials=trials, heartbeat_s=1,
                objectives=[{"name": "decode_tokens_per_s"}, {"name": "j_per_token"}],
                constraints=["decode_tokens_per_s >= 200"], sampler={"name": "nsga2", "population": 4, "seed": 5},
                promotion={"every": 0, "final": False})
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ the spec and the parameters
def test_hardware_lists_are_optuna_parameters():
    spec = parse_spec(example(device=["kria-kv260", "zcu102"], clock_mhz=[200, 250, 300], dsp_share=0.5,
                              batch=[1, 4], lut_share=[0.4]))
    hw = spec.hardware_space
    assert hardware_distributions(hw) == {
        "hw.device": CategoricalDistribution(["kria-kv260", "zcu102"]),
        "hw.clock_mhz": CategoricalDistribution([200, 250, 300]), "hw.batch": CategoricalDistribution([1, 4])}
    # a list of one choice fixes the field; a field without a parameter takes its first choice
    accel = accelerator_from_params({"hw.device": "zcu102", "hw.clock_mhz": 250}, hw)
    assert (accel.device, accel.clock_mhz, accel.batch, accel.dsp_share, accel.lut_share) == (
        "zcu102", 250.0, 1, 0.5, 0.4)
    assert hw.first().to_dict() == accelerator_from_params({}, hw).to_dict()
    assert hw.first().device == "kria-kv260" and hw.first().clock_mhz == 200.0
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    suggested = suggest_accelerator(trial, hw)
    assert set(trial.params) == {"hw.device", "hw.clock_mhz", "hw.batch"}
    assert suggested == accelerator_from_params(trial.params, hw)
    assert hw.searched_values(suggested) == {k: suggested.to_dict()[k] for k in ("device", "clock_mhz", "batch")}
    # nothing listed: no parameter (a study searching no field has the plan's parameters only, as before)
    assert hardware_distributions(parse_spec(example(device="kria-kv260", clock_mhz=300)).hardware_space) == {}


def test_mapping_choices_are_stable_json_text():
    assert encode_choice({"int4": 64, "fp16": 8}) == '{"fp16":8,"int4":64}' == encode_choice({"fp16": 8, "int4": 64})
    assert [encode_choice(v) for v in ("a", 3, 2.5, True, None)] == ["a", 3, 2.5, True, None]
    if "lanes" not in accelerator_fields():
        pytest.skip("this Accelerator has no mapping field")
    hw = parse_spec(example(device="kria-kv260", lanes=[{"int4": 64}, {"int4": 32, "int8": 16}])).hardware_space
    choices = hardware_distributions(hw)["hw.lanes"].choices
    assert choices == ('{"int4":64}', '{"int4":32,"int8":16}')
    assert accelerator_from_params({"hw.lanes": choices[1]}, hw).lanes == {"int4": 32, "int8": 16}


def test_a_relative_devices_file_is_read_beside_the_spec(tmp_path, monkeypatch):
    spec_file = hardware_only(tmp_path, f"sqlite:///{tmp_path / 's.db'}", "rel", SEARCH)
    monkeypatch.chdir(ROOT)  # not the spec's directory
    spec = load_spec(spec_file)
    assert spec.hardware["devices_file"] == str(tmp_path / "boards.yaml")
    assert set(spec.hardware_space.devices) == {"my-board"}
    assert spec.hardware_space.user_device_entries()["my-board"]["memories"]["ddr4"]["gbps"] == 38.4
    assert "my-board" not in list_devices()  # known only while a study runs (or a spec's accelerator is built)


BAD = [
    ({"device": "kria-kv260", "clock_mhz": [200, 5000]},
     "hardware.clock_mhz[1]: 5000 is not a number in [1, 1000] MHz"),
    ({"device": ["kria-kv260", "alveo-u999"]}, "hardware.device[1]: 'alveo-u999' is not one of alveo-u280, "),
    ({"device": "kria-kv260", "batch": [1, 0, 4]}, "hardware.batch[1]: 0 is not an integer >= 1"),
    ({"device": "kria-kv260", "clock_mhz": []}, "hardware.clock_mhz: expected a value or a non-empty list of choices"),
    ({"device": "kria-kv260", "clock_mhz": [300, 200, 300.0]},
     "hardware.clock_mhz[2]: 300.0 is the same choice as clock_mhz[0]; list each choice once"),
    ({"device": ["alveo-u280", "kria-kv260"], "memory": "hbm2"},
     "hardware.memory: 'hbm2' is not one of ddr4 (device kria-kv260"),
    ({"device": "kria-kv260", "colour": ["red"]}, "hardware.colour: unknown key; allowed: device, clock_mhz, "),
    ({"device": "kria-kv260", "devices_file": "nowhere.yaml"}, "hardware.devices_file: devices file '"),
    ({"device": ["kria-kv260", "my-board"], "devices_file": "broken.yaml"},
     "hardware.devices_file: {dir}/broken.yaml: devices.my-board.dsp: is required"),
    ({"device": ["kria-kv260", "other-board"], "devices_file": "boards.yaml"},
     "hardware.device[1]: 'other-board' is not one of alveo-u280, "),
]


@pytest.mark.parametrize("hardware,message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_a_bad_choice_is_one_line_naming_its_index(tmp_path, capsys, hardware, message):
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"devices": {"my-board": {
        k: v for k, v in BOARD.items() if k != "dsp"}}}))
    db = tmp_path / "studies.db"
    spec_file = hardware_only(tmp_path, f"sqlite:///{db}", "bad", hardware)
    assert main(["start", str(spec_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + message.format(dir=tmp_path)), err
    assert not db.exists(), "a rejected spec must not create the storage"


# ------------------------------------------------------------------ a real study
@pytest.fixture(scope="module")
def cosearch_study(tmp_path_factory):
    """A hardware-only study over device x clock x batch (one device from the spec's devices file), run by
    ``dse start`` from another directory than the spec's; returns (study, url, spec, spec file)."""
    tmp = tmp_path_factory.mktemp("cosearch")
    url = f"sqlite:///{tmp / 'studies.db'}"
    spec_file = hardware_only(tmp, url, STUDY, SEARCH)
    assert main(["start", str(spec_file), "--no-progress"]) == 0
    return optuna.load_study(study_name=STUDY, storage=url), url, load_spec(spec_file), spec_file


def completed(study) -> list:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_every_trial_stores_the_accelerator_it_was_costed_on(cosearch_study):
    study, _, spec, _ = cosearch_study
    hw = spec.hardware_space
    trials = completed(study)
    assert len(trials) == TRIALS and [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS
    assert {t.user_attrs.get("warm_start") for t in trials} >= {"dense", "uniform 2:4+int4"}
    records = TrialRecords.of(study)
    workload = Workload.from_dict(study.user_attrs["workload"])
    devices, feasible = set(), []
    for t in trials:
        assert {"hw.device", "hw.clock_mhz", "hw.batch"} <= set(t.params)  # warm starts' hardware is sampled
        accel = accelerator_from_params(t.params, hw)
        assert records.accelerator(t) == json.loads(json.dumps(accel.to_dict()))
        assert t.user_attrs["accelerator"] == hw.searched_values(accel) == {
            "device": accel.device, "clock_mhz": accel.clock_mhz, "batch": accel.batch}
        with hw.active():
            report = estimate(ModelPlan.from_dict(records.plan(t)), workload, accel)
        assert records.report(t) == json.loads(json.dumps(report.to_dict()))
        assert t.values == [report.decode_tokens_per_s, report.j_per_token]
        assert "eval" not in t.user_attrs and t.user_attrs["evaluated"] == (max(t.constraints.values()) <= 0)
        assert t.user_attrs.get("fidelity") == ("hwcost" if t.user_attrs["evaluated"] else None)
        assert t.constraints == t.user_attrs["constraints"] and set(t.constraints) == {
            "fits", "decode_tokens_per_s >= 200"}
        devices.add(accel.device)
        feasible.append(max(t.constraints.values()) <= 0)
        assert len(json.dumps(t.user_attrs)) < 4000
    assert devices == {"kria-kv260", "my-board"}
    assert all(feasible)  # the co-design sampler found a design meeting the constraint for every plan
    assert study.user_attrs["devices"]["my-board"]["dsp"] == BOARD["dsp"]
    assert "my-board" not in list_devices()  # the run's devices are gone with the run


def test_the_codesign_choice_is_pareto_optimal_for_its_plan(cosearch_study):
    """Brute force over all 8 designs (device x clock x batch) of every trial's plan, with single estimates:
    the design the co-design sampler chose meets the constraints, is at least as good as the reference
    design (the first choices) on both hardware objectives, and no such design dominates it."""
    import itertools

    study, _, spec, _ = cosearch_study
    hw = spec.hardware_space
    records = TrialRecords.of(study)
    workload = Workload.from_dict(study.user_attrs["workload"])
    names = list(hw.searched)
    for t in completed(study):
        plan = ModelPlan.from_dict(records.plan(t))
        points = {}
        with hw.active():
            for combo in itertools.product(*(hw.searched[n] for n in names)):
                r = estimate(plan, workload, hw.build(dict(zip(names, combo))))
                ok = r.fits and r.decode_tokens_per_s >= 200
                points[combo] = (ok, -r.decode_tokens_per_s, r.j_per_token)
        chosen = points[tuple(hw.decode(n, t.params[f"hw.{n}"]) for n in names)]
        reference = points[tuple(hw.searched[n][0] for n in names)]
        assert chosen[0], t.number
        if reference[0]:
            assert chosen[1] <= reference[1] and chosen[2] <= reference[2], t.number
        for ok, speed, energy in points.values():
            dominates = speed <= chosen[1] and energy <= chosen[2] and (speed, energy) != chosen[1:]
            assert not (ok and dominates), (t.number, (speed, energy), chosen)


def test_status_lists_the_searched_fields(cosearch_study, capsys):
    study, url, _, _ = cosearch_study
    assert main(["status", STUDY, "--storage", url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "device kria-kv260 | my-board," in lines[0]
    assert lines[1] == ("searched with the plan: hw.device (2 choices: kria-kv260, my-board), "
                        "hw.clock_mhz (2 choices: 200, 300), hw.batch (2 choices: 1, 4)")
    header = next(line for line in lines if line.startswith("trial"))
    assert header.split()[:6] == ["trial", "decode_tokens_per_s", "j_per_token", "hw.device", "hw.clock_mhz",
                                  "hw.batch"]


def _export(url: str, number: int, out: Path) -> tuple[dict, dict]:
    assert main(["export", STUDY, "--storage", url, "--trial", str(number), "--out", str(out)]) == 0
    return yaml.safe_load((out / "accelerator.yaml").read_text()), json.loads((out / "hw_report.json").read_text())


def test_export_accelerator_reproduces_the_report_in_a_fresh_process(cosearch_study, tmp_path):
    study, url, _, _ = cosearch_study
    records = TrialRecords.of(study)
    by_device = {}
    for t in completed(study):
        by_device.setdefault(t.user_attrs["accelerator"]["device"], t)
    for device, trial in by_device.items():
        out = tmp_path / device
        accel, hw = _export(url, trial.number, out)
        assert {k: v for k, v in accel.items() if k != "devices"} == records.accelerator(trial)
        assert yaml.safe_load((out / "plan.yaml").read_text())["device"] == device
        if device == "my-board":  # the board travels with the accelerator, in devices-file form
            assert list(accel["devices"]) == ["my-board"]
            assert {k: accel["devices"]["my-board"][k] for k in ("lut", "dsp", "uram", "static_w")} == {
                k: BOARD[k] for k in ("lut", "dsp", "uram", "static_w")}
        else:
            assert "devices" not in accel
        proc = subprocess.run([sys.executable, "-m", "dse.cli", "hwcost", "estimate", "--accel",
                               str(out / "accelerator.yaml"), "--model-config", "smollm2-135m", "--plan",
                               str(out / "plan.yaml"), "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        again = json.loads(proc.stdout)
        scalars = {k: v for k, v in hw.items() if not isinstance(v, (dict, list))}
        assert scalars and {k: again[k] for k in scalars} == scalars
        assert [{k: v for k, v in row.items() if k != "cycles"} for row in again["layers"]] == hw["layers"]
        assert {r: again["resources"][r]["used"] for r in hw["resources"]} == hw["resources"]
        assert again["accelerator"] == records.accelerator(trial)


def test_export_bundle_of_the_dashboard_equals_dse_export(cosearch_study, tmp_path):
    from dse.export import bundle_zip

    study, url, _, _ = cosearch_study
    trial = next(t for t in completed(study) if t.user_attrs["accelerator"]["device"] == "my-board")
    assert main(["export", STUDY, "--storage", url, "--trial", str(trial.number), "--out", str(tmp_path)]) == 0
    with zipfile.ZipFile(io.BytesIO(bundle_zip(study, trial))) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(p.name for p in tmp_path.iterdir()) and "accelerator.yaml" in names
        for name in names:
            assert archive.read(name) == (tmp_path / name).read_bytes(), name


def test_dashboard_shows_each_trials_accelerator(cosearch_study, monkeypatch):
    from streamlit.testing.v1 import AppTest

    study, url, _, _ = cosearch_study
    monkeypatch.setenv("DSE_STORAGE", url)
    app = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value.set_index("trial")
    by_number = {t.number: t for t in completed(study)}
    for number, t in by_number.items():
        for field, value in t.user_attrs["accelerator"].items():
            assert table.loc[number, f"hw.{field}"] == value
    assert any("searched with the plan: hw.device" in c.value for c in app.caption)
    app.sidebar.radio(key="view").set_value("Trial").run()
    trial = next(t for t in by_number.values() if t.user_attrs["accelerator"]["device"] == "my-board")
    app.selectbox(key=f"trial-{STUDY}").set_value(trial.number).run()
    assert not app.exception, app.exception
    shown = next(d.value for d in app.dataframe if list(d.value.columns) == ["field", "value", "searched"])
    stored = TrialRecords.of(study).accelerator(trial)
    assert list(shown["field"]) == list(stored)
    assert dict(zip(shown["field"], shown["value"]))["device"] == "my-board"
    assert set(shown[shown["searched"]]["field"]) == {"device", "clock_mhz", "batch"}
    assert any(figure.proto.spec for figure in app.get("plotly_chart"))  # the plan map and charts still draw
    app.sidebar.radio(key="view").set_value("Compare").run()
    assert not app.exception, app.exception


def test_resuming_with_other_choices_is_refused(cosearch_study, capsys):
    study, url, _, spec_file = cosearch_study
    data = yaml.safe_load(spec_file.read_text())
    data["hardware"] = {**data["hardware"], "clock_mhz": [200, 250]}
    changed = spec_file.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    before = len(study.trials)
    assert main(["start", str(changed), "--no-progress", "--trials", str(TRIALS + 2)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: hardware.clock_mhz: stored [200, 300], this spec [200, 250];")
    assert f"study '{STUDY}' in " in err and "use another study name" in err, err
    assert len(optuna.load_study(study_name=STUDY, storage=url).trials) == before


def test_a_study_searching_nothing_keeps_its_parameters(tmp_path):
    """Without lists the trials have the plan's parameters only and no accelerator attribute; the accelerator
    record is the spec's one accelerator, exported like any other."""
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    hardware = {"device": "kria-kv260", "clock_mhz": 250}
    spec_file = hardware_only(tmp_path, url, "plain", hardware, trials=3)
    assert main(["start", str(spec_file), "--no-progress"]) == 0
    study = optuna.load_study(study_name="plain", storage=url)
    records = TrialRecords.of(study)
    expected = json.loads(json.dumps(load_spec(spec_file).hardware_space.first().to_dict()))
    for t in completed(study):
        assert not any(name.startswith("hw.") for name in t.params) and "accelerator" not in t.user_attrs
        assert records.accelerator(t) == expected
    assert "devices" not in study.user_attrs
    out = tmp_path / "out"
    assert main(["export", "plain", "--storage", url, "--trial", "0", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "accelerator.yaml").read_text()) == expected


def test_the_stored_spec_keeps_the_lists_as_given():
    """Parsing keeps the spec's hardware mapping as given (lists stay lists in the stored spec)."""
    hardware = {"device": ["kria-kv260", "zcu102"], "clock_mhz": [200, 300]}
    given = copy.deepcopy(hardware)
    spec = parse_spec(example(**hardware))
    assert hardware == given and spec.to_dict()["hardware"] == given
