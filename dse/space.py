"""From the spec's layer groups to Optuna parameters and back to a :class:`~dse.plan.ModelPlan`.

Each group's regex picks layers by module name (full match). A *unit* is what
shares one choice: a single layer (``tie: layer``), a group within one block
(``tie: block``, e.g. all MLP projections of block 7), or a whole group
(``tie: group``). Each unit has up to four categorical parameters,
``<unit>.sparsity``, ``<unit>.format``, ``<unit>.prune`` and ``<unit>.quant``,
suggested only when the group allows more than one value. Each block listed
in ``space.mlgru_blocks`` has a parameter ``b<i>.mixer`` (attention or mlgru);
an MLGRU's projections inherit the plan of their attention counterparts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat, sparsity_name
from dse.spec import LayerGroup, SpaceSpec, SpecError

_BLOCK_RE = re.compile(r"\.(\d+)\.")


def block_index(layer_name: str) -> int | None:
    """Index of the transformer block a layer belongs to (first numeric path part), or None."""
    match = _BLOCK_RE.search(f".{layer_name}.")
    return int(match.group(1)) if match else None


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
    for i, group in enumerate(space.groups):
        hits = [name for name in layer_names if group.matches(name)]
        if not hits:
            examples = ", ".join(layer_names[:3])
            raise SpecError(f"space.groups[{i}].targets",
                            f"'{group.targets}' matches no linear layer of the model (e.g. {examples})")
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
        else:
            key = group.name
        units.setdefault(key, []).append(name)
        groups[key] = group
    return [Unit(key, groups[key], tuple(names)) for key, names in units.items()]


def suggest_plan(trial, units: list[Unit], mlgru_blocks: tuple[int, ...] = ()) -> ModelPlan:
    """Ask an Optuna trial for each unit's choices (and each MLGRU-eligible block's mixer); return the plan."""
    layers = []
    for unit in units:
        group = unit.group
        sparsity = Sparsity.parse(_suggest(trial, f"{unit.key}.sparsity", [sparsity_name(s) for s in group.sparsity]))
        first = group.formats[0]
        fmt = WeightFormat(_suggest(trial, f"{unit.key}.format", [f.name for f in group.formats]),
                           first.group_size, first.symmetric)
        prune = _suggest(trial, f"{unit.key}.prune", list(group.prune))
        quant = _suggest(trial, f"{unit.key}.quant", list(group.quant))
        if quant == "refit" and not fmt.is_ternary:
            quant = "rtn"
        layers.extend(LayerPlan(name, sparsity, fmt, prune, quant) for name in unit.layers)
    blocks = tuple(BlockPlan(i, _suggest(trial, f"b{i}.mixer", ["attention", "mlgru"])) for i in mlgru_blocks)
    return ModelPlan(layers=tuple(layers), blocks=tuple(bp for bp in blocks if bp.mixer == "mlgru"))


def _suggest(trial, name: str, choices: list[str]) -> str:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)
