"""The study spec: a YAML file validated into frozen schemas (``dse.schema``), one declaration per field.

Every invalid field raises :class:`SpecError` whose one-line message names the
field path and what is allowed, e.g.
``space.groups[1].sparsity[2]: '5:4' is not N:M with 0 < N < M``.
Validation touches no storage; ``examples/default.yaml`` documents each field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, field_validator, model_validator

from dse.hardware import DEVICES_FILE, HardwareSpace, parse_hardware
from dse.plan import FORMAT_NAMES, PRUNE_METHODS, QUANT_METHODS, PlanError, Sparsity, WeightFormat
from dse.schema import Flag, Int, Number, Problem, SchemaError, Text, check_text, parse, read_yaml, schema
from evaluators.settings import CompressionSpec, ProxySpec  # noqa: F401 (the spec's sections, imported from here)
from hwcost.model import METRICS

ACCURACY = "accuracy"
"""Objective name for the mean of the tasks' chosen metrics (each in [0, 1]): the full lm-eval fidelity."""
PROXY_KL = "proxy_kl"
"""Objective name for the proxy fidelity: KL (nats/token) of the compressed model's next-token
distribution from the dense model's on the proxy tokens."""
MODEL_OBJECTIVES = {ACCURACY: "maximize", PROXY_KL: "minimize"}
"""Objectives measured on the compressed model (the rest come from the hardware report)."""
HW_OBJECTIVES = {name: info["direction"] for name, info in METRICS.items()}
"""Hardware metric name -> natural direction."""
CONSTRAINT_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SpecError(SchemaError):
    """An invalid spec field: ``str(err)`` is ``'<field path>: <problem and what is allowed>'``."""


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid regular expression: {err}") from None
    return pattern


def _distinct(values: tuple, message: str, *at) -> None:
    if len(set(values)) != len(values):
        raise Problem(message, *at)


def _unique_names(items: tuple, message: str, *at) -> None:
    """Problem ``message`` (formatted with the name) at ``<at>[i].name`` of the first name used again."""
    names = [item.name for item in items]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise Problem(message.format(name), *at, i, "name")


def _task_dir(path: str) -> str:
    from evaluators.tasks import check_task_dir

    return check_task_dir(path)


def _format(value: Any) -> WeightFormat:
    try:
        return value if isinstance(value, WeightFormat) else WeightFormat.parse(value)
    except PlanError:
        raise ValueError(f"{value!r} is not one of {', '.join(FORMAT_NAMES)}") from None


Regex = Annotated[str, PlainValidator(lambda v: _regex(check_text(v)))]
"""A non-empty regular expression (module names are matched in full)."""
TaskDir = Annotated[str, PlainValidator(lambda v: _task_dir(check_text(v)))]
"""A directory of lm-eval task YAMLs (lm-eval's ``include_path``), made absolute."""
SparsityChoice = Annotated[Sparsity | None,
                           PlainValidator(lambda v: v if isinstance(v, Sparsity) else Sparsity.parse(str(v)))]
FormatChoice = Annotated[WeightFormat, PlainValidator(_format)]


@schema(SpecError)
class TaskSpec:
    """An lm-eval task, the metric of it that enters the accuracy objective, and a document limit
    (a bare string is the task name)."""

    __schema_shorthand__ = "name"
    name: Text
    #: the lm-eval metric of the task averaged into the accuracy objective
    metric: Text = "acc"
    #: documents evaluated per task (None: all)
    limit: Int(1) | None = None


@schema(SpecError)
class LayerGroup:
    """Layers chosen by a regex on module names (full match), and the choices allowed for them."""

    #: group name (default ``group<index>``)
    name: Text
    #: regular expression on module names (full match)
    targets: Regex
    #: ``dense`` or N:M patterns (0 < N < M), quoted: YAML reads an unquoted 2:4 as 124
    sparsity: Annotated[tuple[SparsityChoice, ...], Field(min_length=1)] = (None,)
    #: weight formats: 16 (FP16), 8..2 integer bits, or ternary
    formats: Annotated[tuple[FormatChoice, ...], Field(min_length=1)] = (WeightFormat("16"),)
    #: N:M mask choice methods (one, or a list to search over)
    prune: tuple[Literal[PRUNE_METHODS], ...] = ("magnitude",)
    #: quantisation methods (one, or a list to search over)
    quant: tuple[Literal[QUANT_METHODS], ...] = ("rtn",)
    #: weights per FP16 scale of the integer formats (None: WeightFormat's default)
    group_size: Int(1) | None = None
    #: integer grid centred on zero; false adds a zero point per group (None: WeightFormat's default)
    symmetric: Flag | None = None

    _methods = field_validator("prune", "quant", mode="before")(lambda v: [v] if isinstance(v, str) else v)

    @model_validator(mode="after")
    def _choices(self):
        object.__setattr__(self, "formats", tuple(
            replace(f, **{k: v for k, v in (("group_size", self.group_size), ("symmetric", self.symmetric))
                          if v is not None}) for f in self.formats))
        for label in ("sparsity", "formats"):
            _distinct(getattr(self, label), "lists a choice twice", label)
        for label in ("prune", "quant"):
            values = getattr(self, label)
            _distinct(values if values else (None, None), "give one or more distinct methods", label)
        if "refit" in self.quant and not all(f.is_ternary for f in self.formats):
            raise Problem("refit applies to ternary weights only; list formats: [ternary]", "quant")
        return self

    def matches(self, layer_name: str) -> bool:
        return re.fullmatch(self.targets, layer_name) is not None


@schema(SpecError)
class SpaceSpec:
    """The search space: layer groups, how choices are tied, which blocks may use MLGRU, and layers
    kept FP16 dense whatever the groups say (regexes, full match)."""

    groups: Annotated[tuple[LayerGroup, ...], Field(min_length=1)]
    #: a choice per layer, per group per block, per layer type across blocks, or one per group
    tie: Literal["layer", "block", "type", "group"] = "block"
    #: blocks that may swap attention for a distilled MLGRU
    mlgru_blocks: tuple[Int(0), ...] = ()
    #: layers kept FP16 dense (regexes, full match)
    ignore: tuple[Regex, ...] = ()

    @field_validator("groups", mode="before")
    @classmethod
    def _default_names(cls, groups):
        return [{**g, "name": f"group{i}"} if isinstance(g, dict) and g.get("name") is None else g
                for i, g in enumerate(groups)] if isinstance(groups, list) else groups

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore_list(cls, value):
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of regexes such as ['lm_head']")
        return value

    @model_validator(mode="after")
    def _names(self):
        _unique_names(self.groups, "'{}' is used by another group", "groups")
        _distinct(self.mlgru_blocks, "lists a block twice", "mlgru_blocks")
        return self

    def ignored(self, layer_name: str) -> bool:
        return any(re.fullmatch(pattern, layer_name) for pattern in self.ignore)


def _objective_name(value: Any) -> str:
    if value not in MODEL_OBJECTIVES and value not in HW_OBJECTIVES:
        raise ValueError(f"{value!r} is not one of {', '.join([*MODEL_OBJECTIVES, *HW_OBJECTIVES])}")
    return value


@schema(SpecError)
class Objective:
    """A model objective (accuracy or proxy_kl) or a hardware metric, and its direction (default: natural)."""

    __schema_shorthand__ = "name"
    name: Annotated[str, PlainValidator(_objective_name)]
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _natural(self):
        if self.direction is None:
            object.__setattr__(self, "direction", MODEL_OBJECTIVES.get(self.name) or HW_OBJECTIVES[self.name])
        return self


@dataclass(frozen=True)
class Constraint:
    """``metric <= value`` or ``metric >= value`` on a hardware-report metric."""

    metric: str
    op: str
    value: float

    def violation(self, actual: float) -> float:
        """Optuna convention: <= 0 when satisfied; otherwise the relative amount of violation."""
        scale = max(abs(self.value), 1e-12)
        return (actual - self.value) / scale if self.op == "<=" else (self.value - actual) / scale

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    @staticmethod
    def parse(text: Any) -> "Constraint":
        if isinstance(text, Constraint):
            return text
        match = CONSTRAINT_RE.match(str(text))
        if not match:
            raise ValueError(f"{text!r} is not '<metric> <=|>= <number>'")
        metric, op, number = match.groups()
        if metric not in HW_OBJECTIVES:
            raise ValueError(f"{metric!r} is not one of {', '.join(HW_OBJECTIVES)}")
        return Constraint(metric, op, float(number))


@schema(SpecError)
class SamplerSpec:
    """The search strategy (a bare string is its name)."""

    __schema_shorthand__ = "name"
    name: Literal["nsga2", "nsga3", "tpe", "gp", "random"] = "nsga2"
    #: proposals per generation of the evolutionary samplers
    population: Int(2) = 8
    seed: Int(0) = 0


@schema(SpecError)
class RaySpec:
    """Where the evaluator actors run."""

    #: a Ray cluster (ray://host:10001, auto); None starts a local Ray (or $RAY_ADDRESS)
    address: Text | None = None
    #: torch threads of each evaluator actor
    threads_per_worker: Int(1, 64) = 1


@schema(SpecError)
class PromotionSpec:
    """When the Pareto set of the proxy fidelity is evaluated on the full lm-eval tasks: every ``every``
    completed trials (0: never during the run) and, if ``final``, once the budget is reached."""

    every: Int(0) = 8
    final: Flag = True


@schema(SpecError)
class WarmStartSpec:
    """Plans enqueued before the sampler proposes any: the dense model and the uniform plans of the
    published systems the space allows (``baselines``), and plans built from a ``dse sensitivity``
    result (``sensitivity``: its sensitivity.json; default ``sensitivity-<study>/sensitivity.json``
    when that file exists)."""

    baselines: Flag = True
    sensitivity: Text | None = None

    @field_validator("sensitivity")
    @classmethod
    def _file(cls, path):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"'{path}' is not a file (write one with dse sensitivity)")
        return path


def _study_name(value: Any) -> str:
    study = check_text(value)
    if not STUDY_NAME_RE.match(study):
        raise ValueError(f"{study!r} must be 1-100 characters of letters, digits, '_', '.', '-'")
    return study


def _storage(value: Any) -> str:
    from dse.reader import StorageError, storage_url

    url = check_text(value)
    try:
        parsed = storage_url(url)
    except StorageError as err:
        raise ValueError(str(err)) from None
    if parsed.drivername == "sqlite" and not parsed.database:
        raise ValueError("an in-memory sqlite URL cannot hold a study; give a file, e.g. sqlite:///studies.db")
    return url


@schema(SpecError)
class StudySpec:
    """A study: model, tasks, search space, accelerator, objectives, budget and where it runs."""

    #: study name in the storage; starting again with the same name resumes it
    study: Annotated[str, PlainValidator(_study_name)]
    #: built-in name, Hugging Face causal-LM directory or hub id
    model: Text
    tasks: Annotated[tuple[TaskSpec, ...], Field(min_length=1)]
    space: SpaceSpec
    #: Accelerator fields (hwcost.accelerator), stored as given; a list of values is searched (dse.hardware),
    #: devices_file adds the boards of a devices file
    hardware: dict
    objectives: Annotated[tuple[Objective, ...], Field(min_length=1)]
    #: hardware constraints such as 'decode_tokens_per_s >= 100'
    constraints: tuple[Annotated[Constraint, PlainValidator(Constraint.parse)], ...] = ()
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    #: completed trials to reach (screened-out plans count)
    trials: Int(1, 1_000_000) = 12
    #: Ray evaluator actors, each loads the model once
    workers: Int(1, 1024) = 2
    ray: RaySpec = field(default_factory=RaySpec)
    #: seed of the text split and task construction
    task_seed: Int(0) = 0
    #: directories of the user's lm-eval task YAMLs (lm-eval's include_path, relative to the spec file) whose
    #: tasks ``tasks`` may name, besides the local and lm-eval's own tasks
    task_paths: tuple[TaskDir, ...] = ()
    #: lm-eval batch size inside each worker
    batch_size: Int(1, 512) = 8
    storage: Annotated[str, PlainValidator(_storage)] = "sqlite:///dse-studies.db"
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    proxy: ProxySpec = field(default_factory=ProxySpec)
    promotion: PromotionSpec = field(default_factory=PromotionSpec)
    warm_start: WarmStartSpec = field(default_factory=WarmStartSpec)
    #: driver heartbeat per running trial, s; a trial silent for 3x this is stale
    heartbeat_s: Number(0.5, 3600, of="seconds") = 10.0

    @field_validator("hardware")
    @classmethod
    def _accelerator(cls, value):
        parse_hardware(value)
        return dict(value)

    @cached_property
    def hardware_space(self) -> HardwareSpace:
        """The ``hardware:`` block validated: fixed and searched accelerator fields, user devices."""
        return parse_hardware(self.hardware)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks):
        _unique_names(tasks, "'{}' is listed twice")
        return tasks

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objectives):
        _distinct(tuple(o.name for o in objectives), "an objective is listed twice")
        if sum(o.name in MODEL_OBJECTIVES for o in objectives) > 1:
            raise ValueError(f"give one of {', '.join(MODEL_OBJECTIVES)} (the proxy drives the search; "
                             "the Pareto set is promoted to the full tasks)")
        return objectives

    @model_validator(mode="after")
    def _sampler(self):
        if self.sampler.name == "nsga3" and len(self.objectives) < 2:
            raise Problem("nsga3 needs at least 2 objectives", "sampler", "name")
        return self

    @cached_property
    def task_sources(self) -> list[dict]:
        """Each of ``task_paths`` with the sha256 of its task files (:func:`evaluators.tasks.task_files`), read
        once: ``{"path": absolute path, "files": {relative path: sha256}}``."""
        from evaluators.tasks import task_files

        return [{"path": path, "files": task_files(path)} for path in self.task_paths]

    @property
    def needs_model(self) -> bool:
        """Whether an objective is measured on the compressed model (else the study runs on the cost model alone)."""
        return any(o.name in MODEL_OBJECTIVES for o in self.objectives)

    @property
    def threads_per_worker(self) -> int:
        return self.ray.threads_per_worker

    @property
    def ray_address(self) -> str | None:
        return self.ray.address

    def to_dict(self) -> dict:
        """JSON-serialisable form (stored as a study user attribute)."""
        d: dict = {}
        for key, value in asdict(self).items():
            if key == "ray":
                continue
            d[key] = value
            if key == "workers":
                d["threads_per_worker"] = self.threads_per_worker
            elif key == "storage":
                d["storage"], d["ray_address"] = self.storage_display, self.ray_address
        d["space"]["groups"] = [
            {"name": g.name, "targets": g.targets,
             "sparsity": [("dense" if s is None else str(s)) for s in g.sparsity],
             "formats": [f.name for f in g.formats], "group_size": g.formats[0].group_size,
             "symmetric": g.formats[0].symmetric, "prune": list(g.prune), "quant": list(g.quant)}
            for g in self.space.groups
        ]
        d["constraints"] = [str(c) for c in self.constraints]
        d["task_paths"] = self.task_sources
        return d

    @property
    def storage_display(self) -> str:
        """The storage URL with any password masked (safe to store and print)."""
        from sqlalchemy.engine import make_url

        return make_url(self.storage).render_as_string(hide_password=True)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


def parse_spec(data: Any) -> StudySpec:
    """Validate a spec mapping (as loaded from YAML) into a :class:`StudySpec`."""
    return parse(StudySpec, data)


def _beside(spec_file: str | Path, path: str) -> str:
    """``path`` as written in the spec file ``spec_file``: relative to the file's folder, made absolute."""
    return str((Path(spec_file).parent / path.strip()).absolute())


def load_spec(path: str | Path, overrides: dict | None = None) -> StudySpec:
    """Read and validate a spec file; ``overrides`` replace top-level fields (e.g. from the command line)."""
    data = read_yaml(path, SpecError, noun="spec file")
    hardware = data.get("hardware")
    if isinstance(hardware, dict) and isinstance(hardware.get(DEVICES_FILE), str):  # relative to the spec file
        hardware = {**hardware, DEVICES_FILE: _beside(path, hardware[DEVICES_FILE])}
        data = {**data, "hardware": hardware}
    if isinstance(data.get("task_paths"), list):
        data = {**data, "task_paths": [_beside(path, p) if isinstance(p, str) and p.strip() else p
                                       for p in data["task_paths"]]}
    return parse_spec({**data, **{k: v for k, v in (overrides or {}).items() if v is not None}})
