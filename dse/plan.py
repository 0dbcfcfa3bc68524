"""The plan vocabulary shared by every package: what to do to each layer and block.

Pure Python (no torch, ray or numpy) so that ``hwcost`` and ``evaluators`` can
both import it. Every object round-trips through plain JSON-able dicts
(``to_dict`` / ``from_dict``) and a :class:`ModelPlan` has a stable content hash
used as a cache key.

Terms
-----
* ``Sparsity``: N:M structured sparsity, N weights kept out of every M
  consecutive weights along the input dimension (0 < N < M); ``None`` is dense.
* ``WeightFormat``: ``"16"`` (FP16, the unquantised baseline), an integer grid
  of 8 down to 2 bits with a quantisation ``group_size`` (weights per scale
  along the input dimension, symmetric (default) or asymmetric (a zero point per
  group), or ``"ternary"`` ({-1, 0, +1} times one per-tensor scale, BitNet /
  MatMul-free style).
* ``LayerPlan``: one linear layer, named by its module path in the model.
* ``BlockPlan``: one transformer block's token mixer, ``attention`` or ``mlgru``.
* ``ModelPlan``: all layer and block plans; layers it does not name stay FP16
  dense, and embeddings and norms always stay full precision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from dse.errors import UserError

PLAN_VERSION = 1

WEIGHT_BITS = (16, 8, 7, 6, 5, 4, 3, 2)
FORMAT_NAMES = tuple(str(b) for b in WEIGHT_BITS) + ("ternary",)
MIXERS = ("attention", "mlgru")
CHECKPOINT_FORMATS = ("compressed-tensors", "dse-packed")
"""Formats of an exported checkpoint: ``compressed-tensors`` (default; BitNet for ternary plans): what transformers
and vLLM load as they are (:mod:`evaluators.hf_export`); ``dse-packed``: any plan, N:M stored as kept weights,
read by this package (:mod:`evaluators.checkpoint`)."""
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq", "refit")
"""``rtn`` round-to-nearest (ternary: BitLinear absmean), ``gptq`` error-compensated rounding with the layer
Hessian, ``refit`` (ternary only) absmean codes with per-channel scales refitted by least squares."""


class PlanError(UserError, ValueError):
    """A plan value outside the vocabulary; the message names the value and what is allowed."""


@dataclass(frozen=True, order=True)
class Sparsity:
    """N:M structured sparsity: ``n`` kept out of every ``m`` consecutive input weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise PlanError(f"'{self.n}:{self.m}' is not N:M with 0 < N < M")

    @property
    def density(self) -> float:
        """Fraction of weights kept (N/M)."""
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @staticmethod
    def parse(text: str | None) -> "Sparsity | None":
        """``'dense'`` or ``None`` -> ``None``; ``'2:4'`` -> ``Sparsity(2, 4)``."""
        if text is None or str(text).strip().lower() == "dense":
            return None
        parts = str(text).strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise PlanError(f"'{text}' is not 'dense' or N:M with integers 0 < N < M")
        return Sparsity(int(parts[0]), int(parts[1]))


def sparsity_name(sparsity: Sparsity | None) -> str:
    return "dense" if sparsity is None else str(sparsity)


@dataclass(frozen=True, order=True)
class WeightFormat:
    """How a layer's (kept) weights are stored.

    ``name`` is one of :data:`FORMAT_NAMES`. ``group_size`` is the number of
    consecutive input weights sharing one FP16 scale for the integer formats
    (ignored for ``"16"`` and ``"ternary"``, which has one per-tensor scale).
    ``symmetric``: integer grid centred on zero (GPTQ's symmetric quantiser);
    ``False`` adds a zero point per group (asymmetric). Ignored for ``"16"``
    and ``"ternary"``.
    """

    name: str = "16"
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.name not in FORMAT_NAMES:
            raise PlanError(f"'{self.name}' is not a weight format; allowed: {', '.join(FORMAT_NAMES)}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise PlanError(f"group_size {self.group_size!r} is not a positive integer")
        if not isinstance(self.symmetric, bool):
            raise PlanError(f"symmetric {self.symmetric!r} is not true or false")
        if self.is_float or self.is_ternary:
            object.__setattr__(self, "symmetric", True)  # no integer grid: one canonical value

    @property
    def is_float(self) -> bool:
        return self.name == "16"

    @property
    def is_ternary(self) -> bool:
        return self.name == "ternary"

    @property
    def bits(self) -> int:
        """Bits of one stored weight value (ternary stored as 2-bit codes)."""
        return 2 if self.is_ternary else int(self.name)

    def __str__(self) -> str:
        if self.is_float or self.is_ternary:
            return "fp16" if self.is_float else "ternary"
        return f"int{self.name}/g{self.group_size}" + ("" if self.symmetric else "/asym")

    @staticmethod
    def parse(value: object, group_size: int = 128, symmetric: bool = True) -> "WeightFormat":
        """``16``, ``'4'``, ``'int4'`` or ``'ternary'`` -> ``WeightFormat``."""
        text = str(value).strip().lower().removeprefix("int")
        if text in ("fp16", "bf16"):
            text = "16"
        return WeightFormat(text, group_size, symmetric)


FP16 = WeightFormat("16")


@dataclass(frozen=True)
class LayerPlan:
    """Compression of one linear layer (module path ``name``)."""

    name: str
    sparsity: Sparsity | None = None
    fmt: WeightFormat = FP16
    prune: str = "magnitude"
    quant: str = "rtn"

    def __post_init__(self) -> None:
        if self.prune not in PRUNE_METHODS:
            raise PlanError(f"prune method '{self.prune}'; allowed: {', '.join(PRUNE_METHODS)}")
        if self.quant not in QUANT_METHODS:
            raise PlanError(f"quant method '{self.quant}'; allowed: {', '.join(QUANT_METHODS)}")
        if self.quant == "refit" and not self.fmt.is_ternary:
            raise PlanError(f"layer {self.name}: quant method 'refit' needs format ternary, not {self.fmt.name}")

    @property
    def is_identity(self) -> bool:
        """True when the layer is left dense FP16."""
        return self.sparsity is None and self.fmt.is_float

    @property
    def label(self) -> str:
        """Short human label such as ``2:4 int4/g128`` or ``fp16``."""
        return str(self.fmt) if self.sparsity is None else f"{self.sparsity} {self.fmt}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "sparsity": sparsity_name(self.sparsity),
            "format": self.fmt.name,
            "group_size": self.fmt.group_size,
            "symmetric": self.fmt.symmetric,
            "prune": self.prune,
            "quant": self.quant,
        }

    @staticmethod
    def from_dict(d: dict) -> "LayerPlan":
        """From :meth:`to_dict`'s form; a bad value raises :class:`PlanError` naming its field."""
        def field_of(name: str, build):
            try:
                return build()
            except PlanError as err:
                raise PlanError(f"{name}: {err}") from None
            except (TypeError, ValueError):
                raise PlanError(f"{name}: {d.get(name)!r} is not valid") from None

        sparsity = field_of("sparsity", lambda: Sparsity.parse(d.get("sparsity")))
        group = field_of("group_size", lambda: int(d.get("group_size", 128)))
        symmetric = d.get("symmetric", True)
        if not isinstance(symmetric, bool):
            raise PlanError(f"symmetric: {symmetric!r} is not true or false")
        fmt = field_of("format", lambda: WeightFormat.parse(d.get("format", "16"), group, symmetric))
        return LayerPlan(name=d["name"], sparsity=sparsity, fmt=fmt, prune=d.get("prune", "magnitude"),
                         quant=d.get("quant", "rtn"))


@dataclass(frozen=True)
class BlockPlan:
    """Token mixer of transformer block ``index``."""

    index: int
    mixer: str = "attention"

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise PlanError(f"mixer '{self.mixer}'; allowed: {', '.join(MIXERS)}")

    def to_dict(self) -> dict:
        return {"index": self.index, "mixer": self.mixer}

    @staticmethod
    def from_dict(d: dict) -> "BlockPlan":
        return BlockPlan(index=int(d["index"]), mixer=d.get("mixer", "attention"))


@dataclass(frozen=True)
class ModelPlan:
    """A whole-model compression plan.

    Layers not listed stay dense FP16; blocks not listed keep attention.
    Embeddings and norms are always kept full precision (``lm_head`` only when
    no layer plan names it).
    """

    layers: tuple[LayerPlan, ...] = ()
    blocks: tuple[BlockPlan, ...] = ()
    version: int = PLAN_VERSION
    _by_name: dict = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        names = [lp.name for lp in self.layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise PlanError(f"layer '{dup}' appears more than once in the plan")
        object.__setattr__(self, "_by_name", {lp.name: lp for lp in self.layers})

    def layer(self, name: str) -> LayerPlan:
        """The plan for layer ``name`` (dense FP16 if the plan does not name it)."""
        return self._by_name.get(name) or LayerPlan(name)

    def mixer(self, block: int) -> str:
        for bp in self.blocks:
            if bp.index == block:
                return bp.mixer
        return "attention"

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "layers": [lp.to_dict() for lp in self.layers],
            "blocks": [bp.to_dict() for bp in self.blocks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit content hash (identity layers and attention blocks ignored)."""
        canonical = {
            "layers": sorted((lp.to_dict() for lp in self.layers if not lp.is_identity), key=lambda d: d["name"]),
            "blocks": sorted((bp.to_dict() for bp in self.blocks if bp.mixer != "attention"), key=lambda d: d["index"]),
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def from_dict(d: dict) -> "ModelPlan":
        version = int(d.get("version", PLAN_VERSION))
        if version > PLAN_VERSION:
            raise PlanError(f"plan version {version} is newer than this package understands ({PLAN_VERSION})")
        return ModelPlan(
            layers=tuple(LayerPlan.from_dict(x) for x in d.get("layers", ())),
            blocks=tuple(BlockPlan.from_dict(x) for x in d.get("blocks", ())),
            version=version,
        )

    @staticmethod
    def from_json(text: str) -> "ModelPlan":
        return ModelPlan.from_dict(json.loads(text))

    def summary(self) -> dict[str, int]:
        """Count of layers per label, e.g. ``{'2:4 int4/g128': 60, 'fp16': 150}``."""
        counts: dict[str, int] = {}
        for lp in self.layers:
            counts[lp.label] = counts.get(lp.label, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
