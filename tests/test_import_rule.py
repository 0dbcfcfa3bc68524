"""The import rule of DESIGN.md ("Layout"), checked on the source with ``ast`` (nothing is imported).

Every ``import x`` and ``from x import y`` of the packages dse, evaluators, hwcost and dashboard counts,
function-local ones included, relative ones resolved. The rules:

- the vocabulary layer (:data:`VOCABULARY`) is pure Python: stdlib, yaml, pydantic and the vocabulary
  layer itself, nothing else (no torch, ray, lm_eval, optuna, transformers, numpy, no other project module);
- ``dse/__init__.py`` is as light (``hwcost`` importing ``dse.plan`` runs it);
- ``hwcost`` and ``evaluators`` import from ``dse`` only the vocabulary layer;
- ``hwcost`` never imports torch, ray, lm_eval, transformers or optuna, nor ``evaluators``;
- ``dashboard`` imports only ``dse`` and ``hwcost`` among the project packages, and nothing imports it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dse", "evaluators", "hwcost", "dashboard")
VOCABULARY = ("dse.plan", "dse.arch", "dse.errors", "dse.schema", "dse.textio")
"""The vocabulary layer, by name; a name whose file does not exist (yet) is simply not checked."""
PURE_THIRD_PARTY = {"yaml", "pydantic"}
NEVER_IN_HWCOST = {"torch", "ray", "lm_eval", "transformers", "optuna"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of :data:`PACKAGES` (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def resolve(importer: str, is_package: bool, node: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module) of every module one import statement names; ``from x import y`` names
    ``x.y`` when that is a module of the project, else ``x``."""
    if isinstance(node, ast.Import):
        return [(node.lineno, alias.name) for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        out.append((node.lineno, full if full in MODULES else base))
    return list(dict.fromkeys(out))


def in_vocabulary(name: str) -> bool:
    return any(name == v or name.startswith(v + ".") for v in VOCABULARY)


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def violations_of(importer: str, target: str) -> list[str]:
    """The rules ``importer`` importing ``target`` breaks (empty when it is allowed)."""
    top, package = target.split(".")[0], importer.split(".")[0]
    broken = []
    if in_vocabulary(importer) or importer == "dse":
        where = "vocabulary layer" if in_vocabulary(importer) else "dse/__init__"
        if is_project(target):
            if not in_vocabulary(target):
                broken.append(f"{where}: no project module outside the vocabulary layer")
        elif top not in sys.stdlib_module_names and top not in PURE_THIRD_PARTY:
            broken.append(f"{where}: stdlib, yaml and pydantic only")
    if package in ("hwcost", "evaluators") and top == "dse" and target != "dse" and not in_vocabulary(target):
        broken.append(f"{package} imports from dse only the vocabulary layer")
    if package == "hwcost" and (top in NEVER_IN_HWCOST or top == "evaluators"):
        broken.append("hwcost never imports torch, ray, lm_eval, transformers, optuna or evaluators")
    if package == "dashboard" and is_project(target) and top not in ("dse", "hwcost", "dashboard"):
        broken.append("dashboard imports only dse and hwcost among the project packages")
    if top == "dashboard" and package != "dashboard":
        broken.append("nothing imports dashboard")
    return broken


def all_violations() -> list[str]:
    lines = []
    for importer, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for line, target in resolve(importer, path.name == "__init__.py", node):
                lines += [f"{importer}:{line} imports {target} ({rule})" for rule in violations_of(importer, target)]
    return lines


def test_the_rule_itself():
    """The checker flags what the rule forbids and resolves relative imports (on made-up module names)."""
    assert violations_of("dse.plan", "numpy") and violations_of("dse.plan", "dse.spec")
    assert not violations_of("dse.plan", "dataclasses") and not violations_of("dse.plan", "yaml")
    assert not violations_of("dse.plan", "dse.errors")
    assert violations_of("dse", "optuna") and not violations_of("dse.study", "optuna")
    assert violations_of("hwcost.model", "dse.space") and not violations_of("hwcost.model", "dse.plan")
    assert violations_of("hwcost.model", "torch.nn") and not violations_of("hwcost.model", "numpy")
    assert violations_of("evaluators.lm", "dse.spec") and not violations_of("evaluators.lm", "torch")
    assert violations_of("dashboard.app", "evaluators.lm") and not violations_of("dashboard.app", "dse.reader")
    assert violations_of("dse.cli", "dashboard.app") and not violations_of("dse.cli", "evaluators.lm")
    rel = ast.parse("from .plan import ModelPlan\nfrom . import plan\nfrom .. import spec\n").body
    assert resolve("dse.errors", False, rel[0]) == [(1, "dse.plan")]
    assert resolve("dse", True, rel[1]) == [(2, "dse.plan")]
    assert resolve("evaluators.compress.apply", False, rel[2]) == [(3, "evaluators")]


def test_import_rule():
    assert MODULES and all(name in MODULES for name in ("dse", "dse.plan", "hwcost", "evaluators", "dashboard"))
    found = all_violations()
    if found:
        pytest.fail(f"{len(found)} import-rule violation(s):\n" + "\n".join(found), pytrace=False)
