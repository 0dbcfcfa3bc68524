"""The study spec: a YAML file validated into dataclasses.

Every invalid field raises :class:`SpecError` whose one-line message names the
field path and what is allowed, e.g.
``space.groups[1].sparsity[2]: '5:4' is not N:M with 0 < N < M``.
Validation touches no storage; ``examples/default.yaml`` documents each field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dse.plan import FORMAT_NAMES, PRUNE_METHODS, QUANT_METHODS, PlanError, Sparsity, WeightFormat

SAMPLERS = ("nsga2", "nsga3", "tpe", "gp", "random")
TIE_MODES = ("layer", "block", "type", "group")
DIRECTIONS = ("maximize", "minimize")
ACCURACY = "accuracy"
"""Objective name for the mean of the tasks' chosen metrics (each in [0, 1]): the full lm-eval fidelity."""
PROXY_KL = "proxy_kl"
"""Objective name for the proxy fidelity: KL (nats/token) of the compressed model's next-token
distribution from the dense model's on the proxy tokens."""
MODEL_OBJECTIVES = {ACCURACY: "maximize", PROXY_KL: "minimize"}
"""Objectives measured on the compressed model (the rest come from the hardware report)."""
CONSTRAINT_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")


class SpecError(ValueError):
    """An invalid spec field: ``str(err)`` is ``'<field path>: <problem and what is allowed>'``."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass(frozen=True)
class TaskSpec:
    """An lm-eval task, the metric of it that enters the accuracy objective, and a document limit."""

    name: str
    metric: str = "acc"
    limit: int | None = None


@dataclass(frozen=True)
class LayerGroup:
    """Layers chosen by a regex on module names (full match), and the choices allowed for them."""

    name: str
    targets: str
    sparsity: tuple[Sparsity | None, ...] = (None,)
    formats: tuple[WeightFormat, ...] = (WeightFormat("16"),)
    prune: tuple[str, ...] = ("magnitude",)
    quant: tuple[str, ...] = ("rtn",)

    def matches(self, layer_name: str) -> bool:
        return re.fullmatch(self.targets, layer_name) is not None


@dataclass(frozen=True)
class SpaceSpec:
    """The search space: layer groups, how choices are tied, which blocks may use MLGRU, and layers
    kept FP16 dense whatever the groups say (regexes, full match)."""

    groups: tuple[LayerGroup, ...]
    tie: str = "block"
    mlgru_blocks: tuple[int, ...] = ()
    ignore: tuple[str, ...] = ()

    def ignored(self, layer_name: str) -> bool:
        return any(re.fullmatch(pattern, layer_name) for pattern in self.ignore)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str


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


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "nsga2"
    population: int = 8
    seed: int = 0


@dataclass(frozen=True)
class CompressionSpec:
    """How calibrated methods and MLGRU distillation run (evaluators.compress.apply explains the modes)."""

    mode: str = "sequential"      # sequential: statistics through the compressed earlier blocks; dense: from the dense model
    windows: int = 16             # calibration windows of the calibration works
    seq_len: int = 256            # tokens per calibration window
    seed: int = 0
    distill_steps: int = 300      # Adam steps per distilled MLGRU block
    distill_lr: float = 2e-3


@dataclass(frozen=True)
class ProxySpec:
    """The proxy fidelity's token set: ``windows`` x ``seq_len`` tokens of the validation works."""

    windows: int = 8
    seq_len: int = 256


@dataclass(frozen=True)
class PromotionSpec:
    """When the Pareto set of the proxy fidelity is evaluated on the full lm-eval tasks: every ``every``
    completed trials (0: never during the run) and, if ``final``, once the budget is reached."""

    every: int = 8
    final: bool = True


@dataclass(frozen=True)
class WarmStartSpec:
    """Plans enqueued before the sampler proposes any: the dense model and the uniform plans of the
    published systems the space allows (``baselines``), and plans built from a ``dse sensitivity``
    result (``sensitivity``: its sensitivity.json; default ``sensitivity-<study>/sensitivity.json``
    when that file exists)."""

    baselines: bool = True
    sensitivity: str | None = None


@dataclass(frozen=True)
class StudySpec:
    study: str
    model: str
    tasks: tuple[TaskSpec, ...]
    space: SpaceSpec
    hardware: dict
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...] = ()
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    trials: int = 12
    workers: int = 2
    threads_per_worker: int = 1
    task_seed: int = 0
    batch_size: int = 8
    storage: str = "sqlite:///dse-studies.db"
    ray_address: str | None = None
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    proxy: ProxySpec = field(default_factory=ProxySpec)
    promotion: PromotionSpec = field(default_factory=PromotionSpec)
    warm_start: WarmStartSpec = field(default_factory=WarmStartSpec)
    heartbeat_s: float = 10.0     # driver heartbeat per running trial; a trial silent for 3x this is stale

    def to_dict(self) -> dict:
        """JSON-serialisable form (stored as a study user attribute)."""
        d = asdict(self)
        d["space"]["groups"] = [
            {"name": g.name, "targets": g.targets,
             "sparsity": [("dense" if s is None else str(s)) for s in g.sparsity],
             "formats": [f.name for f in g.formats], "group_size": g.formats[0].group_size,
             "symmetric": g.formats[0].symmetric, "prune": list(g.prune), "quant": list(g.quant)}
            for g in self.space.groups
        ]
        d["constraints"] = [str(c) for c in self.constraints]
        d["storage"] = self.storage_display
        return d

    @property
    def storage_display(self) -> str:
        """The storage URL with any password masked (safe to store and print)."""
        from sqlalchemy.engine import make_url

        return make_url(self.storage).render_as_string(hide_password=True)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


# --------------------------------------------------------------------------- reading helpers


def _check_keys(d: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(d, dict):
        raise SpecError(path, f"expected a mapping with fields {', '.join(allowed)}; got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise SpecError(f"{path}.{key}" if path else str(key), f"unknown field; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in d or d[key] is None:
            raise SpecError(f"{path}.{key}" if path else key, "is required")
    return d


def _int(value: Any, path: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise SpecError(path, f"{value!r} is not {allowed}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(path, f"{value!r} is not a non-empty string")
    return value.strip()


def _choice(value: Any, path: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SpecError(path, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list) or not value:
        raise SpecError(path, "expected a non-empty list")
    return value


# --------------------------------------------------------------------------- sections


def _tasks(value: Any) -> tuple[TaskSpec, ...]:
    out = []
    for i, item in enumerate(_list(value, "tasks")):
        path = f"tasks[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        _check_keys(item, path, ("name", "metric", "limit"), ("name",))
        limit = item.get("limit")
        out.append(TaskSpec(
            name=_str(item["name"], f"{path}.name"),
            metric=_str(item.get("metric", "acc"), f"{path}.metric"),
            limit=None if limit is None else _int(limit, f"{path}.limit", 1),
        ))
    names = [t.name for t in out]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise SpecError(f"tasks[{i}].name", f"'{name}' is listed twice")
    return tuple(out)


def _group(item: Any, index: int) -> LayerGroup:
    path = f"space.groups[{index}]"
    _check_keys(item, path, ("name", "targets", "sparsity", "formats", "group_size", "symmetric", "prune", "quant"),
                ("targets",))
    targets = _str(item["targets"], f"{path}.targets")
    try:
        re.compile(targets)
    except re.error as err:
        raise SpecError(f"{path}.targets", f"invalid regular expression: {err}") from None
    group_size = _int(item.get("group_size", 128), f"{path}.group_size", 1)
    symmetric = item.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise SpecError(f"{path}.symmetric", f"{symmetric!r} is not true or false")
    methods = {}
    for key, allowed in (("prune", PRUNE_METHODS), ("quant", QUANT_METHODS)):
        raw = item.get(key, [allowed[0]])
        values = [_choice(v, f"{path}.{key}[{j}]", allowed)
                  for j, v in enumerate(raw if isinstance(raw, list) else [raw])]
        if not values or len(set(values)) != len(values):
            raise SpecError(f"{path}.{key}", "give one or more distinct methods")
        methods[key] = tuple(values)
    sparsity = []
    for j, s in enumerate(_list(item.get("sparsity", ["dense"]), f"{path}.sparsity")):
        try:
            sparsity.append(Sparsity.parse(str(s)))
        except PlanError as err:
            raise SpecError(f"{path}.sparsity[{j}]", str(err)) from None
    formats = []
    for j, f in enumerate(_list(item.get("formats", ["16"]), f"{path}.formats")):
        try:
            formats.append(WeightFormat.parse(f, group_size, symmetric))
        except PlanError:
            raise SpecError(f"{path}.formats[{j}]", f"{f!r} is not one of {', '.join(FORMAT_NAMES)}") from None
    for label, values in (("sparsity", sparsity), ("formats", formats)):
        if len(set(values)) != len(values):
            raise SpecError(f"{path}.{label}", "lists a choice twice")
    if "refit" in methods["quant"] and not all(f.is_ternary for f in formats):
        raise SpecError(f"{path}.quant", "refit applies to ternary weights only; list formats: [ternary]")
    name = item.get("name", f"group{index}")
    return LayerGroup(_str(name, f"{path}.name"), targets, tuple(sparsity), tuple(formats),
                      methods["prune"], methods["quant"])


def _space(value: Any) -> SpaceSpec:
    d = _check_keys(value, "space", ("groups", "tie", "mlgru_blocks", "ignore"), ("groups",))
    groups = tuple(_group(g, i) for i, g in enumerate(_list(d["groups"], "space.groups")))
    names = [g.name for g in groups]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise SpecError(f"space.groups[{i}].name", f"'{name}' is used by another group")
    mlgru = d.get("mlgru_blocks") or []
    if not isinstance(mlgru, list):
        raise SpecError("space.mlgru_blocks", "expected a list of block indices")
    blocks = tuple(_int(b, f"space.mlgru_blocks[{i}]", 0) for i, b in enumerate(mlgru))
    if len(set(blocks)) != len(blocks):
        raise SpecError("space.mlgru_blocks", "lists a block twice")
    ignore = d.get("ignore") or []
    if not isinstance(ignore, list):
        raise SpecError("space.ignore", "expected a list of regexes such as ['lm_head']")
    for i, pattern in enumerate(ignore):
        try:
            re.compile(_str(pattern, f"space.ignore[{i}]"))
        except re.error as err:
            raise SpecError(f"space.ignore[{i}]", f"invalid regular expression: {err}") from None
    return SpaceSpec(groups, _choice(d.get("tie", "block"), "space.tie", TIE_MODES), blocks,
                     tuple(p.strip() for p in ignore))


def _hardware(value: Any) -> dict:
    from hwcost.accelerator import Accelerator

    if not isinstance(value, dict):
        raise SpecError("hardware", "expected a mapping with at least 'device'")
    try:
        Accelerator.from_dict(value)
    except (ValueError, TypeError, KeyError) as err:
        message = str(err).strip("'\"").splitlines()[0]
        raise SpecError("" if message.startswith("hardware") else "hardware", message) from None
    return dict(value)


def _hardware_metrics() -> dict[str, str]:
    """Hardware metric name -> natural direction."""
    from hwcost.model import METRICS

    return {name: info["direction"] for name, info in METRICS.items()}


def _objectives(value: Any) -> tuple[Objective, ...]:
    hw = _hardware_metrics()
    allowed = (*MODEL_OBJECTIVES, *hw)
    out = []
    for i, item in enumerate(_list(value, "objectives")):
        path = f"objectives[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        _check_keys(item, path, ("name", "direction"), ("name",))
        name = _choice(item["name"], f"{path}.name", allowed)
        natural = MODEL_OBJECTIVES.get(name) or hw[name]
        out.append(Objective(name, _choice(item.get("direction", natural), f"{path}.direction", DIRECTIONS)))
    if len({o.name for o in out}) != len(out):
        raise SpecError("objectives", "an objective is listed twice")
    if sum(o.name in MODEL_OBJECTIVES for o in out) > 1:
        raise SpecError("objectives", f"give one of {', '.join(MODEL_OBJECTIVES)} (the proxy drives the search; "
                                      "the Pareto set is promoted to the full tasks)")
    return tuple(out)


def _constraints(value: Any) -> tuple[Constraint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError("constraints", "expected a list such as ['decode_tokens_per_s >= 100']")
    hw = _hardware_metrics()
    out = []
    for i, text in enumerate(value):
        match = CONSTRAINT_RE.match(str(text))
        if not match:
            raise SpecError(f"constraints[{i}]", f"{text!r} is not '<metric> <=|>= <number>'")
        metric, op, number = match.groups()
        _choice(metric, f"constraints[{i}]", tuple(hw))
        try:
            out.append(Constraint(metric, op, float(number)))
        except ValueError:
            raise SpecError(f"constraints[{i}]", f"{number!r} is not a number") from None
    return tuple(out)


def _sampler(value: Any) -> SamplerSpec:
    if value is None:
        return SamplerSpec()
    if isinstance(value, str):
        value = {"name": value}
    d = _check_keys(value, "sampler", ("name", "population", "seed"))
    return SamplerSpec(
        name=_choice(d.get("name", "nsga2"), "sampler.name", SAMPLERS),
        population=_int(d.get("population", 8), "sampler.population", 2),
        seed=_int(d.get("seed", 0), "sampler.seed", 0),
    )


def _storage(value: Any) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = _str(value, "storage")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpecError("storage", f"{url!r} is not a database URL such as sqlite:///studies.db "
                                   "or postgresql://user@host:5432/db") from None
    if parsed.drivername not in STORAGE_SCHEMES:
        raise SpecError("storage", f"scheme '{parsed.drivername}' is not one of {', '.join(STORAGE_SCHEMES)}")
    if parsed.drivername == "sqlite" and not parsed.database:
        raise SpecError("storage", "an in-memory sqlite URL cannot hold a study; give a file, e.g. sqlite:///studies.db")
    return url


def _ray(value: Any) -> tuple[str | None, int]:
    if value is None:
        return None, 1
    d = _check_keys(value, "ray", ("address", "threads_per_worker"))
    address = d.get("address")
    if address is not None:
        address = _str(address, "ray.address")
    return address, _int(d.get("threads_per_worker", 1), "ray.threads_per_worker", 1, 64)


def _compression(value: Any) -> CompressionSpec:
    d = _check_keys(value or {}, "compression", ("mode", "windows", "seq_len", "seed", "distill_steps", "distill_lr"))
    lr = d.get("distill_lr", 2e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise SpecError("compression.distill_lr", f"{lr!r} is not a number in (0, 1)")
    return CompressionSpec(
        mode=_choice(d.get("mode", "sequential"), "compression.mode", ("sequential", "dense")),
        windows=_int(d.get("windows", 16), "compression.windows", 1, 4096),
        seq_len=_int(d.get("seq_len", 256), "compression.seq_len", 8, 8192),
        seed=_int(d.get("seed", 0), "compression.seed", 0),
        distill_steps=_int(d.get("distill_steps", 300), "compression.distill_steps", 0, 100_000),
        distill_lr=float(lr),
    )


def _proxy(value: Any) -> ProxySpec:
    d = _check_keys(value or {}, "proxy", ("windows", "seq_len"))
    return ProxySpec(windows=_int(d.get("windows", 8), "proxy.windows", 1, 4096),
                     seq_len=_int(d.get("seq_len", 256), "proxy.seq_len", 8, 8192))


def _promotion(value: Any) -> PromotionSpec:
    d = _check_keys(value or {}, "promotion", ("every", "final"))
    final = d.get("final", True)
    if not isinstance(final, bool):
        raise SpecError("promotion.final", f"{final!r} is not true or false")
    return PromotionSpec(every=_int(d.get("every", 8), "promotion.every", 0), final=final)


def _warm_start(value: Any) -> WarmStartSpec:
    d = _check_keys(value or {}, "warm_start", ("baselines", "sensitivity"))
    baselines = d.get("baselines", True)
    if not isinstance(baselines, bool):
        raise SpecError("warm_start.baselines", f"{baselines!r} is not true or false")
    path = d.get("sensitivity")
    if path is not None and not Path(_str(path, "warm_start.sensitivity")).is_file():
        raise SpecError("warm_start.sensitivity", f"'{path}' is not a file (write one with dse sensitivity)")
    return WarmStartSpec(baselines, path)


def _seconds(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value <= 3600:
        raise SpecError(path, f"{value!r} is not a number of seconds from 0.5 to 3600")
    return float(value)


TOP_LEVEL = ("study", "model", "tasks", "task_seed", "batch_size", "space", "hardware", "objectives",
             "constraints", "sampler", "trials", "workers", "storage", "ray", "compression", "proxy",
             "promotion", "warm_start", "heartbeat_s")


def parse_spec(data: Any) -> StudySpec:
    """Validate a spec mapping (as loaded from YAML) into a :class:`StudySpec`."""
    d = _check_keys(data, "", TOP_LEVEL, ("study", "model", "tasks", "space", "hardware", "objectives"))
    study = _str(d["study"], "study")
    if not STUDY_NAME_RE.match(study):
        raise SpecError("study", f"{study!r} must be 1-100 characters of letters, digits, '_', '.', '-'")
    address, threads = _ray(d.get("ray"))
    sampler = _sampler(d.get("sampler"))
    objectives = _objectives(d["objectives"])
    if sampler.name == "nsga3" and len(objectives) < 2:
        raise SpecError("sampler.name", "nsga3 needs at least 2 objectives")
    return StudySpec(
        study=study,
        model=_str(d["model"], "model"),
        tasks=_tasks(d["tasks"]),
        task_seed=_int(d.get("task_seed", 0), "task_seed", 0),
        batch_size=_int(d.get("batch_size", 8), "batch_size", 1, 512),
        space=_space(d["space"]),
        hardware=_hardware(d["hardware"]),
        objectives=objectives,
        constraints=_constraints(d.get("constraints")),
        sampler=sampler,
        trials=_int(d.get("trials", 12), "trials", 1, 1_000_000),
        workers=_int(d.get("workers", 2), "workers", 1, 1024),
        threads_per_worker=threads,
        storage=_storage(d.get("storage", "sqlite:///dse-studies.db")),
        ray_address=address,
        compression=_compression(d.get("compression")),
        proxy=_proxy(d.get("proxy")),
        promotion=_promotion(d.get("promotion")),
        warm_start=_warm_start(d.get("warm_start")),
        heartbeat_s=_seconds(d.get("heartbeat_s", 10.0), "heartbeat_s"),
    )


def load_spec(path: str | Path, overrides: dict | None = None) -> StudySpec:
    """Read and validate a spec file; ``overrides`` replace top-level fields (e.g. from the command line)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", f"spec file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("", f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if isinstance(data, dict) and overrides:
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_spec(data)
