"""Declarative file schemas: one YAML reader and one error formatter for every file the user writes.

Part of the vocabulary layer (imports only the standard library, yaml, pydantic, ``dse.errors`` and
``dse.plan``). A schema is a frozen pydantic dataclass made by :func:`schema`: each field is declared
once, with its default, its bounds (:func:`Int`, :func:`Number`) or ``Literal`` choices and its doc.
Every mistake becomes one line ``<field path>: <problem>; allowed: ...`` (a :class:`SchemaError`), e.g.
``space.groups[1].sparsity[2]: '5:4' is not N:M with 0 < N < M``; an unknown key adds the closest
allowed one (``did you mean 'group_size'?``) and an integer where an N:M pattern belongs the hint to
quote it (YAML 1.1 reads an unquoted ``2:4`` as the sexagesimal integer 124).
"""

from __future__ import annotations

import difflib
import functools
import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, PlainValidator, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from dse.errors import UserError
from dse.plan import BlockPlan, LayerPlan, ModelPlan, PlanError

CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class SchemaError(UserError, ValueError):
    """An invalid field of a user file: ``str(err)`` is ``'<field path>: <problem and what is allowed>'``."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


class Problem(ValueError):
    """Raised inside a validator: ``message`` concerns the sub-field ``at`` (keys or indices) of the value."""

    def __init__(self, message: str, *at: str | int):
        super().__init__(message)
        self.at = at


# --------------------------------------------------------------------------- field types
def Int(lo: int, hi: int | None = None) -> Any:  # noqa: N802 (a type)
    """An integer (not a bool) from ``lo`` to ``hi`` (inclusive; no upper bound when ``None``)."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise ValueError(f"{value!r} is not {allowed}")
        return value
    return Annotated[int, PlainValidator(check)]


def Number(lo: float, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False,  # noqa: N802
           unit: str = "", of: str = "", bare: bool = False) -> Any:
    """A finite number in the interval ``[lo, hi]`` (``open_*``: the bound excluded). The message says
    ``a number in [lo, hi] <unit>``; ``of`` words it ``a number of <of> from lo to hi``, ``bare`` ``in [lo, hi]``."""
    interval = f"{'(' if open_lo else '['}{lo:g}, " + ("inf)" if hi is None else f"{hi:g}{')' if open_hi else ']'}")
    allowed = (f"a number of {of} from {lo:g} to {hi:g}" if of else f"in {interval}" if bare
               else f"a number in {interval}" + (f" {unit}" if unit else ""))

    def check(value):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not (value > lo if open_lo else value >= lo) or (hi is not None and not (value < hi if open_hi
                                                                                          else value <= hi))):
            raise ValueError(f"{value!r} is not {allowed}")
        return float(value)
    return Annotated[float, PlainValidator(check)]


def check_text(value: Any) -> str:
    """``value`` stripped if it is a non-empty string; ValueError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a non-empty string")
    return value.strip()


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


Text = Annotated[str, PlainValidator(check_text)]
"""A non-empty string (surrounding blanks removed)."""
Flag = Annotated[bool, PlainValidator(_flag)]
"""``true`` or ``false`` (no ``yes``, ``1`` or ``'true'``)."""


# --------------------------------------------------------------------------- schemas
def unknown_key(key: Any, allowed: list[str], noun: str = "unknown field") -> str:
    """``unknown field; allowed: a, b; did you mean 'b'?`` (the hint when a name is close to ``key``)."""
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    return f"{noun}; allowed: {', '.join(allowed)}" + (f"; did you mean '{close[0]}'?" if close else "")


def _before(cls, data: Any) -> Any:
    """Every schema: a mapping is required, ``key: null`` means the default, unknown keys are named (fields in
    ``__schema_internal__`` are set by the code, not by a file)."""
    if type(data).__name__ == "ArgsKwargs":  # a constructor call: Accelerator("kria-kv260", batch=None)
        return type(data)(data.args, {k: v for k, v in (data.kwargs or {}).items() if v is not None})
    if isinstance(data, cls):
        return data
    if isinstance(data, str) and getattr(cls, "__schema_shorthand__", None):
        data = {cls.__schema_shorthand__: data}
    names = [n for n in cls.__dataclass_fields__ if n not in getattr(cls, "__schema_internal__", ())]
    if not isinstance(data, dict):
        raise Problem(f"expected a mapping with fields {', '.join(names)}; got {type(data).__name__}")
    for key in data:
        if key not in names:
            raise Problem(unknown_key(key, names, cls.__schema_unknown__), key)
    return {k: v for k, v in data.items() if v is not None}


def schema(error: type[SchemaError] = SchemaError, prefix: str = "", unknown: str = "unknown field",
           kw_only: bool = False):
    """Class decorator: a frozen pydantic dataclass whose constructor raises ``error`` (one line, field paths
    under ``prefix``) instead of pydantic's ValidationError; ``unknown`` words an unknown key; ``kw_only``
    lets required fields follow defaulted ones (listed in the order a reader expects)."""
    def make(cls):
        cls.__schema_unknown__ = unknown
        cls._schema_before = model_validator(mode="before")(classmethod(_before))
        cls = pydantic_dataclass(frozen=True, config=CONFIG, kw_only=kw_only)(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as err:
                raise error(*explain(err, prefix)) from None

        cls.__init__ = __init__
        cls.__schema_error__ = (error, prefix)
        return cls
    return make


def parse(cls, data: Any, prefix: str | None = None):
    """Validate ``data`` (as read from YAML) into the schema ``cls``; its error class on the first problem."""
    error, default_prefix = cls.__schema_error__
    try:
        return cls.__pydantic_validator__.validate_python(data)
    except ValidationError as err:
        raise error(*explain(err, default_prefix if prefix is None else prefix)) from None


# --------------------------------------------------------------------------- the formatter
_MESSAGES = {
    "missing": "is required", "missing_argument": "is required", "missing_keyword_only_argument": "is required",
    "list_type": "expected a list", "tuple_type": "expected a list", "too_short": "expected a non-empty list",
    "dict_type": "expected a mapping", "bool_type": "{input!r} is not true or false",
    "string_type": "{input!r} is not a string",
}


def path_of(loc: tuple) -> str:
    """``('space', 'groups', 1, 'sparsity', 2)`` -> ``space.groups[1].sparsity[2]``."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def nm_hint(value: Any) -> str:
    """The quote hint for an integer YAML made of an unquoted N:M (``2:4`` -> 124), else ``''``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        n, m = divmod(value, 60)
        return f" (YAML 1.1 reads an unquoted {n}:{m} as the number {value}; quote it: '{n}:{m}')"
    return ""


def explain(err: ValidationError, prefix: str = "") -> tuple[str, str]:
    """The first error of ``err`` as ``(field path, one-line message)``."""
    first = err.errors(include_url=False)[0]
    loc, kind, value, ctx = list(first["loc"]), first["type"], first.get("input"), first.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, SchemaError):  # a nested parse (e.g. the spec's hardware: an Accelerator)
        loc += [cause.path] if cause.path else []
        message = cause.message
    elif cause is not None:  # a ValueError (or Problem) raised by a validator
        loc += list(getattr(cause, "at", ()))
        message = str(cause)
    elif kind == "literal_error":
        message = f"{value!r} is not one of {ctx['expected'].replace(' or ', ', ').replace(chr(39), '')}"
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown field"
    elif kind in _MESSAGES:
        message = _MESSAGES[kind].format(input=value)
    else:
        message = first["msg"]
    if "N:M" in message:
        message += nm_hint(value)
    path = path_of(loc)
    return (f"{prefix}.{path}" if prefix and path else prefix or path), message


# --------------------------------------------------------------------------- YAML files
class _Loader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, error: type[SchemaError] = SchemaError, noun: str = "file") -> dict:
    """The mapping in the YAML file ``path``; ``error('', '<file>: <problem>')`` if it is missing, empty,
    not YAML (line and column), has a duplicate key or holds no mapping."""
    path = Path(path)
    if not path.is_file():
        raise error("", f"{noun} '{path}' does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error("", f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        raise error("", f"{path}: the file is empty; expected a mapping")
    if not isinstance(data, dict):
        raise error("", f"{path}: expected a mapping at the top; got a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- plan files
PLAN_ITEMS = {"layers": LayerPlan("x"), "blocks": BlockPlan(0)}
"""The lists of a plan mapping and an instance of their items (whose ``to_dict`` keys a file may give)."""


EXPORT_HEADER = ("study", "trial", "model", "device")
"""The keys ``dse export`` writes above ``plan`` in its plan.yaml."""


def plan_from_file(data: dict) -> ModelPlan:
    """The plan of a plan file's top-level mapping: ``dse export``'s plan.yaml (the plan under ``plan``, next to
    the :data:`EXPORT_HEADER` keys; its fields named ``plan.layers[0]...``) or a bare plan mapping; any unknown
    key at any level is a :class:`PlanError` naming its path (with the closest allowed key)."""
    if "plan" in data:
        for key in data:
            if key not in (*EXPORT_HEADER, "plan"):
                raise PlanError(f"{key}: {unknown_key(key, [*EXPORT_HEADER, 'plan'])}")
        if not isinstance(data["plan"], dict):
            raise PlanError("plan: expected a mapping with version, layers, blocks")
        return plan_from_data(data["plan"], "plan.")
    if not {"layers", "blocks"} & set(data):
        raise PlanError("expected a ModelPlan mapping (version, layers, blocks) or a 'dse export' plan.yaml with "
                        "a top-level 'plan'")
    return plan_from_data(data)


def plan_from_data(data: dict, prefix: str = "") -> ModelPlan:
    """A plan mapping (``ModelPlan.to_dict``'s form, fields optional as ``from_dict`` reads them) checked key by
    key; :class:`PlanError` ``'<path>: <problem>'`` names the first unknown key or bad value (paths after
    ``prefix``)."""
    def keys(item: Any, allowed: list[str], path: str) -> None:
        if not isinstance(item, dict):
            raise PlanError(f"{prefix}{path}: expected a mapping with {', '.join(allowed)}")
        for key in item:
            if key not in allowed:
                raise PlanError(f"{prefix}{path + '.' if path else ''}{key}: {unknown_key(key, allowed)}")

    keys(data, list(ModelPlan().to_dict()), "")
    for key, sample in PLAN_ITEMS.items():
        if not isinstance(data.get(key) or [], list):
            raise PlanError(f"{prefix}{key}: expected a list")
        allowed = list(sample.to_dict())
        for i, item in enumerate(data.get(key) or []):
            keys(item, allowed, f"{key}[{i}]")
            if allowed[0] not in item:
                raise PlanError(f"{prefix}{key}[{i}].{allowed[0]}: is required")
            try:
                type(sample).from_dict(item)
            except (TypeError, ValueError) as err:
                name = f" ({item['name']})" if key == "layers" else ""
                raise PlanError(f"{prefix}{key}[{i}]{name}: {err}{nm_hint(item.get('sparsity'))}") from None
    return ModelPlan.from_dict({**data, **{key: data.get(key) or [] for key in PLAN_ITEMS}})
