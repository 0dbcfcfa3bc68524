"""``dse export`` bundles: written whole into a fresh directory (bundle.json with every file's sha256), an
``--out`` that may not be replaced refused with one line before anything is written, ``--force`` replacing
another trial's bundle whole, and a screened-out trial exported with a warning.

The study is a real hardware-only one (objectives and constraint from the cost model: no Ray, no model load),
so every test but the checkpoint one runs in about a second."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from dse.cli import main
from dse.export import export_trial
from dse.spec import load_spec
from dse.study import run_study

ROOT = Path(__file__).resolve().parent.parent
STUDY = "bundle-hw"
CONSTRAINT = "decode_tokens_per_s >= 180"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256): the whole state of a directory."""
    return {p.relative_to(path).as_posix(): sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hw_study(tmp_path_factory):
    """(study, storage URL, database file, {'feasible': [two trial numbers], 'screened': a screened-out one})."""
    tmp = tmp_path_factory.mktemp("bundle-study")
    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    data.update(study=STUDY, storage=f"sqlite:///{tmp / 'studies.db'}", trials=8, heartbeat_s=1,
                objectives=[{"name": "decode_tokens_per_s"}, {"name": "j_per_token"}], constraints=[CONSTRAINT],
                sampler={"name": "random", "seed": 1}, promotion={"every": 0, "final": False})
    (tmp / "spec.yaml").write_text(yaml.safe_dump(data))
    study = run_study(load_spec(tmp / "spec.yaml"), progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t.number for t in done if t.user_attrs["evaluated"]]
    screened = [t.number for t in done if t.user_attrs["evaluated"] is False]
    assert len(feasible) >= 2 and screened, "the study needs feasible and screened-out trials"
    assert len({study.trials[n].user_attrs["plan_hash"] for n in feasible[:2]}) == 2
    return study, data["storage"], tmp / "studies.db", {"feasible": feasible[:2], "screened": screened[0]}


def export(hw_study, number: int, out: Path, *extra: str) -> int:
    _, url, _, _ = hw_study
    return main(["export", STUDY, "--storage", url, "--trial", str(number), "--out", str(out), *extra])


def trials_of(hw_study) -> dict:
    return hw_study[3]


def siblings(out: Path) -> list[str]:
    """Entries next to ``out`` left by a bundle write (its temporary or set-aside directories)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_bundle_lists_every_file_with_its_sha256(hw_study, tmp_path, capsys):
    study, _, _, trials = hw_study
    number = trials["feasible"][0]
    out = tmp_path / "new" / "parents" / "bundle"  # missing parents are created
    assert export(hw_study, number, out) == 0
    printed = capsys.readouterr().out.split()
    manifest = json.loads((out / "bundle.json").read_text())
    assert (manifest["format"], manifest["study"], manifest["trial"], manifest["screened_out"]) == (
        "dse-export-bundle", STUDY, number, False)
    assert manifest["plan_hash"] == study.trials[number].user_attrs["plan_hash"]
    files = tree(out)
    assert set(manifest["files"]) == set(files) - {"bundle.json"} == {
        "plan.yaml", "accelerator.yaml", "kernels.json", "kernels.hpp", "hw_report.json", "evaluation.json",
        "summary.txt"}
    for name, entry in manifest["files"].items():  # what sha256sum of the file prints
        assert entry == {"bytes": (out / name).stat().st_size, "sha256": files[name]}, name
    assert printed == [str(out / name) for name in manifest["files"]] + [str(out / "bundle.json")]
    assert siblings(out) == []


def test_bundle_has_the_kernel_table_of_its_hardware_report(hw_study, tmp_path):
    """kernels.json lists every linear layer of hw_report.json in its order with the report's figures (kept MACs
    per token: per step / batch), on the accelerator of accelerator.yaml; kernels.hpp compiles (g++, C++17)."""
    number = trials_of(hw_study)["feasible"][0]
    out = tmp_path / "bundle"
    assert export(hw_study, number, out) == 0
    table = json.loads((out / "kernels.json").read_text())
    report = json.loads((out / "hw_report.json").read_text())
    accelerator = yaml.safe_load((out / "accelerator.yaml").read_text())
    not_linear = ("embedding fp16", "attention fp16", "mlgru", "vector unit")
    linear = [row for row in report["layers"] if row["kernel"] not in not_linear]
    assert [row["name"] for row in table["layers"]] == [row["name"] for row in linear]
    assert len(linear) == 30 * 7 + 1 or any(".mlgru." in row["name"] for row in linear)  # SmolLM2: 30 blocks + head
    for row, cost in zip(table["layers"], linear):
        assert (row["label"], row["weight_bytes"], row["resident"], row["bound"], row["compute_cycles"],
                row["memory_cycles"]) == (cost["kernel"], cost["weight_bytes"], cost["resident"], cost["bound"],
                                          cost["compute_cycles"], cost["memory_cycles"]), row["name"]
        assert row["kept_macs"] * accelerator["batch"] == cost["kept_macs"]
    assert (table["accelerator"]["device"], table["accelerator"]["clock_mhz"]) == (
        accelerator["device"], accelerator["clock_mhz"])
    gxx = shutil.which("g++")
    if gxx:
        proc = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-x", "c++", str(out / "kernels.hpp")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


def test_same_trial_replaces_its_bundle_and_an_empty_directory_is_fine(hw_study, tmp_path):
    number = trials_of(hw_study)["feasible"][0]
    out = tmp_path / "bundle"
    out.mkdir()  # empty
    assert export(hw_study, number, out) == 0
    first = tree(out)
    (out / "summary.txt").write_text("edited by hand\n")
    assert export(hw_study, number, out) == 0  # its own bundle: replaced, no --force needed
    assert tree(out) == first
    (out / "bundle.json").unlink()  # a bundle written before bundle.json: known by plan.yaml's header
    assert export(hw_study, number, out) == 0
    assert tree(out) == first and siblings(out) == []


def test_another_trials_bundle_is_refused_then_replaced_whole_with_force(hw_study, tmp_path, capsys):
    _, _, db, trials = hw_study
    a, b = trials["feasible"]
    out = tmp_path / "bundle"
    assert export(hw_study, a, out) == 0
    before, stored = tree(out), sha256(db)
    capsys.readouterr()
    assert export(hw_study, b, out) == 2
    assert capsys.readouterr().err == (f"error: --out: {out} holds the bundle of study '{STUDY}' trial {a}; give "
                                       "another --out, or --force to replace it\n")
    assert tree(out) == before and siblings(out) == [] and sha256(db) == stored
    assert export(hw_study, b, out, "--force") == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["trial"] == b and yaml.safe_load((out / "plan.yaml").read_text())["trial"] == b
    assert set(tree(out)) == set(manifest["files"]) | {"bundle.json"}  # nothing of trial a's bundle is left
    assert siblings(out) == [] and sha256(db) == stored


def test_another_studys_bundle_is_refused(hw_study, tmp_path, capsys):
    number = trials_of(hw_study)["feasible"][0]
    out = tmp_path / "bundle"
    assert export(hw_study, number, out) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    (out / "bundle.json").write_text(json.dumps({**manifest, "plan_hash": "0" * 16}))  # same name, other plan
    capsys.readouterr()
    assert export(hw_study, number, out) == 2
    assert capsys.readouterr().err == (f"error: --out: {out} holds the bundle of study '{STUDY}' trial {number} of "
                                       "another storage (another plan); give another --out, or --force to replace "
                                       "it\n")
    (out / "bundle.json").write_text(json.dumps({**manifest, "study": "other-study"}))
    assert export(hw_study, number, out) == 2
    assert "holds the bundle of study 'other-study'" in capsys.readouterr().err


def _file(tmp: Path) -> tuple[Path, list[str], str]:
    out = tmp / "plan.txt"
    out.write_text("mine\n")
    return out, [], f"{out} is a file, not a directory; give a new or empty directory"


def _unrelated(tmp: Path) -> tuple[Path, list[str], str]:
    out = tmp / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return out, ["--force"], f"{out} holds 'notes.txt', which is not part of a bundle; give a new or empty " \
                             "directory (--force replaces only a bundle)"


def _bundle_plus_unrelated(tmp: Path) -> tuple[Path, list[str], str]:
    out = tmp / "bundle"
    out.mkdir()
    (out / "bundle.json").write_text(json.dumps({"study": "s", "trial": 1, "files": {"plan.yaml": {}}}))
    (out / "plan.yaml").write_text("plan: {}\n")
    (out / "studies.db").write_text("a database")
    return out, ["--force"], f"{out} holds 'studies.db', which is not part of a bundle; give a new or empty " \
                             "directory (--force replaces only a bundle)"


def _under_a_file(tmp: Path) -> tuple[Path, list[str], str]:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "bundle", [], f"{tmp / 'afile'} is a file, not a directory"


def _unwritable_system_dir(tmp: Path) -> tuple[Path, list[str], str]:
    return Path("/sys/dse-export-test"), [], "cannot write /sys/dse-export-test: "


def _read_only_parent(tmp: Path) -> tuple[Path, list[str], str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    parent = tmp / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    return parent / "bundle", [], f"cannot write {parent / 'bundle'}: Permission denied"


@pytest.mark.parametrize("make", [_file, _unrelated, _bundle_plus_unrelated, _under_a_file, _unwritable_system_dir,
                                  _read_only_parent], ids=lambda f: f.__name__.strip("_"))
def test_out_that_cannot_take_a_bundle_is_one_line_and_untouched(hw_study, tmp_path, capsys, make):
    _, _, db, trials = hw_study
    out, extra, message = make(tmp_path)
    before = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    content = tree(out) if out.is_dir() else (sha256(out) if out.is_file() else None)
    stored = sha256(db)
    capsys.readouterr()
    assert export(hw_study, trials["feasible"][0], out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out: {message}") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")} == before
    assert (tree(out) if out.is_dir() else (sha256(out) if out.is_file() else None)) == content
    assert sha256(db) == stored


def test_an_interrupted_export_leaves_the_old_bundle(hw_study, tmp_path):
    """Interrupted while the bundle is being written (here at the checkpoint's first progress message): the
    previous bundle is left byte for byte and no partial directory remains."""
    study, _, _, trials = hw_study
    a, b = trials["feasible"]
    out = tmp_path / "bundle"
    export_trial(study, study.trials[a], out)
    before = tree(out)

    def interrupt(message: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_trial(study, study.trials[b], out, checkpoint=True, progress=interrupt, force=True,
                     checkpoint_format="dse-packed")
    assert tree(out) == before and siblings(out) == []


def test_screened_out_trial_exports_with_a_warning(hw_study, tmp_path, capsys):
    study, _, _, trials = hw_study
    number = trials["screened"]
    out = tmp_path / "screened"
    assert export(hw_study, number, out) == 0
    warning = (f"trial {number} was screened out by the hardware screen (it breaks {CONSTRAINT}) and never "
               "evaluated: the bundle has its plan and hardware report, no accuracy")
    assert capsys.readouterr().err == f"warning: --trial: {warning}\n"
    assert (out / "summary.txt").read_text().splitlines()[1] == f"  SCREENED OUT, NOT EVALUATED: {warning}"
    assert json.loads((out / "evaluation.json").read_text()) == {"evaluated": False, "screened_out": warning}
    assert json.loads((out / "bundle.json").read_text())["screened_out"] is True
    assert study.trials[number].user_attrs["constraints"][CONSTRAINT] > 0  # the screen did refuse it
    feasible = tmp_path / "feasible"
    assert export(hw_study, trials["feasible"][0], feasible) == 0
    assert capsys.readouterr().err == ""
    assert "SCREENED" not in (feasible / "summary.txt").read_text()


@pytest.mark.slow
def test_force_replaces_a_checkpoint_bundle_whole(hw_study, tmp_path, capsys):
    """A bundle with the compressed model (its files in bundle.json, its tensors checked at load), replaced with
    --force by another trial's bundle without one: the old checkpoint does not survive next to the new plan."""
    from evaluators.checkpoint import load_checkpoint

    a, b = trials_of(hw_study)["feasible"]
    out = tmp_path / "bundle"
    assert export(hw_study, a, out, "--checkpoint", "--format", "dse-packed") == 0
    manifest = json.loads((out / "bundle.json").read_text())
    files = tree(out)
    assert {"checkpoint/dse-packed.safetensors", "checkpoint/checkpoint.json", "checkpoint/config.json"} <= set(
        manifest["files"])
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
        name: digest for name, digest in files.items() if name != "bundle.json"}
    load_checkpoint(out / "checkpoint")  # every tensor matches its sha256
    capsys.readouterr()
    assert export(hw_study, b, out) == 2 and tree(out) == files
    assert export(hw_study, b, out, "--force") == 0
    assert not (out / "checkpoint").exists() and json.loads((out / "bundle.json").read_text())["trial"] == b
    assert siblings(out) == []
