"""Promises that hold by construction and must keep holding: no deserialiser that runs code reads a file
or a stored value (no pickle, eval/exec, unsafe YAML, ``torch.load`` of pickles), passwords never reach
output or storage, and the dashboard binds to the loopback address unless told otherwise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dse.cli import build_parser, main
from helpers import PG_URL

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dse", "evaluators", "hwcost", "dashboard")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Imports of pickling modules and calls that can run code while reading data, found in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in ("eval", "exec", "compile"):
                found.append(f"{name}()")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                loader = keywords.get("Loader")
                safe = isinstance(loader, ast.Name) and loader.id in ("_Loader", "SafeLoader", "CSafeLoader")
                if not safe:
                    found.append(f"yaml.{name} without a safe loader")
            elif owner == "torch" and name == "load":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append("torch.load without weights_only=True")
            elif owner in ("np", "numpy") and name == "load":
                pickle = keywords.get("allow_pickle")
                if isinstance(pickle, ast.Constant) and pickle.value is True:
                    found.append("np.load(allow_pickle=True)")
    return found


def test_the_scanner_finds_each_unsafe_form():
    """The scanner itself, on a hand-written module holding every form it must catch (and the safe ones)."""
    source = ("import pickle\nfrom cloudpickle import dumps\nimport yaml, torch, numpy as np\n"
              "eval('1')\nexec('x = 1')\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\nyaml.unsafe_load(s)\n"
              "torch.load(f)\nnp.load(f, allow_pickle=True)\n"
              "yaml.safe_load(s)\nyaml.load(s, Loader=SafeLoader)\ntorch.load(f, weights_only=True)\nnp.load(f)\n"
              "model.eval()\n")
    assert _unsafe_calls(ast.parse(source)) == [
        "import pickle", "import cloudpickle", "eval()", "exec()", "yaml.load without a safe loader",
        "yaml.load without a safe loader", "yaml.unsafe_load without a safe loader",
        "torch.load without weights_only=True", "np.load(allow_pickle=True)"]


def test_no_code_runs_while_reading_files_or_storage():
    """Every module of the packages: no pickling module, eval/exec, unsafe YAML loader or pickle-based load."""
    problems = {str(path.relative_to(ROOT)): found for path in _sources()
                if (found := _unsafe_calls(ast.parse(path.read_text(), str(path))))}
    assert not problems, problems


def test_dashboard_binds_to_loopback_by_default():
    args = build_parser().parse_args(["dashboard"])
    assert args.address == "127.0.0.1"


@pytest.mark.parametrize("command", ["status", "export"])
def test_a_password_in_a_storage_url_never_reaches_output(command, capsys, tmp_path):
    """The real PostgreSQL server (trust authentication accepts any password): the message names the masked URL."""
    url = PG_URL.replace("postgres@", "postgres:s3cret-pw@", 1)
    assert "s3cret-pw" in url
    argv = [command, "no-such-study-xyz", "--storage", url] + (["--out", str(tmp_path / "o")] if command == "export"
                                                                 else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "s3cret-pw" not in out + err and "***" in err, err
    assert err.count("\n") == 1 and err.startswith("error: "), err  # no such study, or no studies there
