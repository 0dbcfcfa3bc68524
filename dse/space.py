"""From the spec's layer groups to Optuna parameters and back to a :class:`~dse.plan.ModelPlan`.

Each group's regex picks layers by module name (full match); layers matching a
``space.ignore`` regex stay FP16 and dense whatever the groups say (as
llm-compressor's ``ignore``). Embeddings and norms are not linear layers and are
never in a plan, so they always stay as they are. A *unit* is what shares one
choice: a single layer (``tie: layer``), a group within one block (``tie: block``,
e.g. all MLP projections of block 7), one layer type across blocks (``tie: type``,
e.g. every ``mlp.down_proj``), or a whole group (``tie: group``).

Each unit has up to four categorical parameters, ``<unit>.sparsity``,
``<unit>.format``, ``<unit>.prune`` and ``<unit>.quant``, present only when the
group allows more than one value. Each block listed in ``space.mlgru_blocks`` has
a parameter ``b<i>.mixer`` (attention or mlgru); an MLGRU's projections inherit
the plan of their attention counterparts. :func:`distributions` gives the Optuna
distributions, :func:`plan_from_params` turns a parameter dict back into a
:class:`~dse.plan.ModelPlan`, and :func:`unit_params` goes the other way for one
unit (warm starts are enqueued as parameter dicts).

Accelerator fields the spec's ``hardware:`` block searches (:mod:`dse.hardware`) are one categorical
``hw.<field>`` each, suggested after the plan's parameters (so a study that searches none has exactly the
parameters it had before): :func:`hardware_distributions`, :func:`suggest_accelerator` and
:func:`accelerator_from_params`. Choices are Optuna values as they are (strings, numbers, booleans, null);
a mapping choice (e.g. ``lanes``) is its JSON text with sorted keys. A parameter dict without a ``hw.<field>``
(a plan-only warm start) rebuilds with the field's first choice; a trial enqueued without one gets it from
the sampler (the co-design sampler, :mod:`dse.codesign`), like any parameter an enqueued trial leaves out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from optuna.distributions import CategoricalDistribution

from dse.arch import block_index, layer_type
from dse.hardware import HardwareSpace
from dse.plan import MIXERS, BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat, sparsity_name
from dse.spec import LayerGroup, SpaceSpec, SpecError

HW_PREFIX = "hw."
"""Parameter names of searched accelerator fields: ``hw.<field>``."""


@dataclass(frozen=True)
class Unit:
    """Layers that share one choice, and the group that allows the choices."""

    key: str
    group: LayerGroup
    layers: tuple[str, ...]


def match_layers(space: SpaceSpec, layer_names: list[str]) -> dict[str, LayerGroup]:
    """Assign each layer to the group whose regex matches it.

    Raises :class:`SpecError` when a group matches nothing or a layer matches two groups.
    """
    assigned: dict[str, LayerGroup] = {}
    owner: dict[str, int] = {}
    for i, pattern in enumerate(space.ignore):
        if not any(re.fullmatch(pattern, name) for name in layer_names):
            raise SpecError(f"space.ignore[{i}]", f"'{pattern}' matches no linear layer of the model")
    kept = [name for name in layer_names if not space.ignored(name)]
    for i, group in enumerate(space.groups):
        hits = [name for name in kept if group.matches(name)]
        if not hits:
            examples = ", ".join(kept[:3])
            raise SpecError(f"space.groups[{i}].targets",
                            f"'{group.targets}' matches no linear layer of the model outside space.ignore "
                            f"(e.g. {examples})")
        for name in hits:
            if name in assigned:
                raise SpecError(f"space.groups[{i}].targets",
                                f"also matches '{name}', already chosen by space.groups[{owner[name]}]")
            assigned[name] = group
            owner[name] = i
    return assigned


def build_units(space: SpaceSpec, layer_names: list[str]) -> list[Unit]:
    """The units of choice in model order (see module docstring)."""
    assigned = match_layers(space, layer_names)
    units: dict[str, list[str]] = {}
    groups: dict[str, LayerGroup] = {}
    for name in layer_names:
        group = assigned.get(name)
        if group is None:
            continue
        block = block_index(name)
        if space.tie == "layer":
            key = name
        elif space.tie == "block" and block is not None:
            key = f"{group.name}.b{block}"
        elif space.tie == "type":
            key = f"{group.name}.{layer_type(name)}"
        else:
            key = group.name
        units.setdefault(key, []).append(name)
        groups[key] = group
    return [Unit(key, groups[key], tuple(names)) for key, names in units.items()]


def _choices(unit: Unit) -> dict[str, list[str]]:
    """Parameter suffix -> allowed values of a unit (in the group's order)."""
    g = unit.group
    return {"sparsity": [sparsity_name(s) for s in g.sparsity], "format": [f.name for f in g.formats],
            "prune": list(g.prune), "quant": list(g.quant)}


def distributions(units: list[Unit], mlgru_blocks: tuple[int, ...] = ()) -> dict[str, CategoricalDistribution]:
    """The Optuna parameters of the space: one categorical per unit field with more than one choice,
    and one per MLGRU-eligible block."""
    out = {}
    for unit in units:
        for field, choices in _choices(unit).items():
            if len(choices) > 1:
                out[f"{unit.key}.{field}"] = CategoricalDistribution(choices)
    for i in mlgru_blocks:
        out[f"b{i}.mixer"] = CategoricalDistribution(MIXERS)
    return out


def plan_from_params(params: dict, units: list[Unit], mlgru_blocks: tuple[int, ...] = ()) -> ModelPlan:
    """The plan a parameter dict describes; a field without a parameter takes its group's only value."""
    layers = []
    for unit in units:
        choice = {field: params.get(f"{unit.key}.{field}", values[0]) for field, values in _choices(unit).items()}
        first = unit.group.formats[0]
        fmt = WeightFormat(choice["format"], first.group_size, first.symmetric)
        sparsity = Sparsity.parse(choice["sparsity"])
        # A method that cannot change the layer is normalised, so equal models get equal plans (and hashes):
        # no mask -> no pruning method; FP16 weights or refit on non-ternary -> round-to-nearest.
        prune = choice["prune"] if sparsity is not None else "magnitude"
        quant = "rtn" if fmt.is_float or (choice["quant"] == "refit" and not fmt.is_ternary) else choice["quant"]
        layers.extend(LayerPlan(name, sparsity, fmt, prune, quant) for name in unit.layers)
    blocks = tuple(BlockPlan(i, "mlgru") for i in mlgru_blocks if params.get(f"b{i}.mixer") == "mlgru")
    return ModelPlan(layers=tuple(layers), blocks=blocks)


def unit_params(unit: Unit, **choice: str) -> dict[str, str]:
    """Parameters giving ``unit`` the named values (``sparsity='2:4', format='4'``...); a field with one
    allowed value needs none. Raises ValueError when the group does not allow a value."""
    allowed = _choices(unit)
    out = {}
    for field, value in choice.items():
        if value not in allowed[field]:
            raise ValueError(f"{unit.key}: {field} {value!r} is not allowed (allowed: {allowed[field]})")
        if len(allowed[field]) > 1:
            out[f"{unit.key}.{field}"] = value
    return out


def suggest_plan(trial, units: list[Unit], mlgru_blocks: tuple[int, ...] = ()) -> ModelPlan:
    """Ask an Optuna trial for each parameter of :func:`distributions`; return the plan."""
    params = {name: trial.suggest_categorical(name, dist.choices)
              for name, dist in distributions(units, mlgru_blocks).items()}
    return plan_from_params(params, units, mlgru_blocks)


def hardware_distributions(hardware: HardwareSpace) -> dict[str, CategoricalDistribution]:
    """One categorical ``hw.<field>`` per searched accelerator field, its choices in the spec's order."""
    return {f"{HW_PREFIX}{name}": CategoricalDistribution(hardware.encoded(name)) for name in hardware.searched}


def accelerator_from_params(params: dict, hardware: HardwareSpace):
    """The :class:`~hwcost.accelerator.Accelerator` a parameter dict describes: the fixed fields, each searched
    field's ``hw.<field>`` value, and its first choice where the dict has none."""
    choice = {name: hardware.decode(name, params[f"{HW_PREFIX}{name}"]) for name in hardware.searched
              if f"{HW_PREFIX}{name}" in params}
    return hardware.build(choice)


def suggest_accelerator(trial, hardware: HardwareSpace):
    """Ask an Optuna trial for each parameter of :func:`hardware_distributions` (the fields that change the
    evaluated model, ``dse.codesign.ACCURACY_FIELDS``, first: the co-design sampler chooses the others for
    the plan and them); return the accelerator."""
    from dse.codesign import ACCURACY_FIELDS

    dists = hardware_distributions(hardware)
    order = sorted(dists, key=lambda name: name[len(HW_PREFIX):] not in ACCURACY_FIELDS)
    params = {name: trial.suggest_categorical(name, dists[name].choices) for name in order}
    return accelerator_from_params(params, hardware)
