"""dse.schema: the one YAML reader and error formatter behind the spec, devices, accelerator and plan files.

Each mistake gives one exact line and exit status 2 from the real ``dse`` command, and no storage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dse.cli import main
from dse.errors import UserError
from dse.plan import PlanError
from dse.spec import SpecError
from hwcost.accelerator import AcceleratorError
from hwcost.cli import HwcostError
from hwcost.devices import DeviceFileError, load_devices_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "examples" / "default.yaml").read_text()
ESTIMATE = ["hwcost", "estimate", "--model-config", "smollm2-135m", "--device", "kria-kv260"]
LINE = {key: next(i for i, line in enumerate(EXAMPLE.splitlines(), 1) if line.startswith(key + ":"))
        for key in ("trials", "proxy")} | {"end": len(EXAMPLE.splitlines()) + 1}
NM = "'124' is not 'dense' or N:M with integers 0 < N < M (YAML 1.1 reads an unquoted 2:4 as the number 124; " \
     "quote it: '2:4')"


def spec_text(tmp_path: Path, old: str = "", new: str = "", extra: str = "") -> str:
    assert old in EXAMPLE
    return EXAMPLE.replace(old, new).replace("sqlite:///dse-studies.db", f"sqlite:///{tmp_path / 'studies.db'}") \
        + extra


def one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, (code, err)
    return err.rstrip("\n")


SPECS = [  # (old text of examples/default.yaml, its replacement, text appended, expected line after 'error: ')
    ("", "", "trials: 20\n",
     "{path}: not valid YAML at line {end}, column 1: duplicate key 'trials' (first at line {trials})"),
    ("trials: 16", "trails: 16", "",
     "trails: unknown field; allowed: study, model, tasks, space, hardware, objectives, constraints, sampler, "
     "trials, workers, ray, task_seed, task_paths, batch_size, storage, compression, proxy, promotion, warm_start, "
     "heartbeat_s; did you mean 'trials'?"),
    ("group_size: 64\n    - name: head", "groupsize: 64\n    - name: head", "",
     "space.groups[1].groupsize: unknown field; allowed: name, targets, sparsity, formats, prune, quant, "
     "group_size, symmetric; did you mean 'group_size'?"),
    ("sparsity: [dense, '2:4', '4:8']  #", "sparsity: [dense, 2:4, '4:8']  #", "",
     f"space.groups[1].sparsity[1]: {NM}"),
    ("proxy: {windows: 8, seq_len: 256}", "proxy: {windows: 8, seq_len: 256, seq_len: 128}", "",
     "{path}: not valid YAML at line {proxy}, column 35: duplicate key 'seq_len' (first at line {proxy})"),
]


@pytest.mark.parametrize("old,new,extra,expected", SPECS, ids=["duplicate", "did-you-mean", "nested-did-you-mean",
                                                                "unquoted-nm", "flow-duplicate"])
def test_spec_file_mistakes_one_exact_line(tmp_path, capsys, old, new, extra, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(tmp_path, old, new, extra))
    assert one_line(capsys, ["start", str(path), "--no-progress"]) == "error: " + expected.format(path=path, **LINE)
    assert not (tmp_path / "studies.db").exists()


@pytest.mark.parametrize("text,expected", [
    ("", "the file is empty; expected a mapping"),
    ("# only a comment\n", "the file is empty; expected a mapping"),
    ("- study\n- model\n", "expected a mapping at the top; got a list"),
    ("study: x\nmodel: [unclosed\n", "not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
])
def test_empty_and_malformed_files_one_line(tmp_path, capsys, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert one_line(capsys, ["start", str(path)]) == f"error: {path}: {expected}"
    assert one_line(capsys, ESTIMATE + ["--plan", str(path)]).startswith(f"error: --plan: {path}: ")


def test_plan_file_unknown_key_did_you_mean(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers:\n  - {name: model.layers.0.mlp.up_proj, format: 4, groupsize: 32}\n")
    assert one_line(capsys, ESTIMATE + ["--plan", str(plan)]) == (
        "error: --plan: layers[0].groupsize: unknown field; allowed: name, sparsity, format, group_size, symmetric, "
        "prune, quant; did you mean 'group_size'?")
    plan.write_text("layers: []\nblokcs: []\n")
    assert one_line(capsys, ESTIMATE + ["--plan", str(plan)]) == (
        "error: --plan: blokcs: unknown field; allowed: version, layers, blocks; did you mean 'blocks'?")
    plan.write_text("blocks:\n  - {index: 1, mixr: mlgru}\n")
    assert one_line(capsys, ESTIMATE + ["--plan", str(plan)]) == (
        "error: --plan: blocks[0].mixr: unknown field; allowed: index, mixer; did you mean 'mixer'?")
    plan.write_text("layers:\n  - {name: model.layers.0.mlp.up_proj, format: 4, sparsity: 2:4}\n")
    assert one_line(capsys, ESTIMATE + ["--plan", str(plan)]) == (
        f"error: --plan: layers[0] (model.layers.0.mlp.up_proj): sparsity: {NM}")
    plan.write_text("layers:\n  - name: lm_head\n    format: 4\n    format: 8\n")
    assert one_line(capsys, ESTIMATE + ["--plan", str(plan)]) == (
        f"error: --plan: {plan}: not valid YAML at line 4, column 5: duplicate key 'format' (first at line 3)")


def test_devices_and_accelerator_files_did_you_mean(tmp_path, capsys):
    boards = tmp_path / "boards.yaml"
    boards.write_text("devices:\n  my-board: {vendr: amd}\n")
    assert one_line(capsys, ["hwcost", "devices", "--devices-file", str(boards)]).startswith(
        "error: --devices-file: devices.my-board.vendr: unknown field; allowed: vendor, part, lut, ")
    with pytest.raises(DeviceFileError, match=r"^devices\.my-board\.vendr: unknown field; .*did you mean 'vendor'\?$"):
        load_devices_file(boards)
    accel = tmp_path / "accel.yaml"
    accel.write_text("hardware: {device: kria-kv260, clock_mzh: 200}\n")
    line = one_line(capsys, ESTIMATE[:4] + ["--weights", "int4", "--accel", str(accel)])
    assert line.startswith("error: --accel: hardware.clock_mzh: unknown key; allowed: device, clock_mhz, ")
    assert line.endswith("; did you mean 'clock_mhz'?")


def test_every_error_class_is_a_user_error_and_a_value_error():
    for cls in (SpecError, PlanError, DeviceFileError, AcceleratorError, HwcostError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls


def test_mistakes_in_a_real_process(tmp_path):
    files = {
        "dup.yaml": (spec_text(tmp_path, extra="trials: 20\n"), ["start"],
                     "{path}: not valid YAML at line {end}, column 1: duplicate key 'trials' (first at line {trials})"),
        "empty.yaml": ("", ["start"], "{path}: the file is empty; expected a mapping"),
        "nm.yaml": (spec_text(tmp_path, "sparsity: [dense, '2:4', '4:8']  #", "sparsity: [dense, 2:4, '4:8']  #"),
                    ["start"], f"space.groups[1].sparsity[1]: {NM}"),
        "plan.yaml": ("layers:\n  - {name: lm_head, format: 4, groupsize: 32}\n", ESTIMATE + ["--plan"],
                      "--plan: layers[0].groupsize: unknown field; allowed: name, sparsity, format, group_size, "
                      "symmetric, prune, quant; did you mean 'group_size'?"),
    }
    for name, (text, argv, expected) in files.items():
        path = tmp_path / name
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "dse.cli", *argv, str(path)], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == ["error: " + expected.format(path=path, **LINE)], proc.stderr
    assert not (tmp_path / "studies.db").exists()
