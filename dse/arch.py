"""One description of decoder architectures, from a Hugging Face ``config.json`` alone (vocabulary layer).

Pure Python (no torch, numpy or other project modules): ``hwcost`` costs these shapes, ``evaluators``
finds and replaces these modules in the torch model, ``dse`` builds its search space from these names and
the dashboard draws them. A :class:`Workload` is the model's shape (layers, widths, heads, vocabulary);
its :class:`Family` says where each piece lives in the torch model. Layer names are the module paths of
the Hugging Face model, so a :class:`~dse.plan.ModelPlan` written against the real model applies here.

Families (Hugging Face ``model_type`` values in brackets); per block ``i`` under the family's block list:

* ``llama`` (llama, mistral, qwen2, qwen3) and ``gemma`` (gemma, gemma2, gemma3_text): ``model.layers.{i}``,
  attention ``self_attn.{q,k,v,o}_proj`` (q: hidden -> heads*head_dim, k/v: hidden -> kv_heads*head_dim
  (grouped KV heads), o: heads*head_dim -> hidden), GLU ``mlp.{gate,up,down}_proj``. Gemma and Qwen3 give
  ``head_dim`` explicitly (heads*head_dim may differ from hidden); Gemma ties the embeddings by default;
  Gemma 2/3 have four RMSNorms per block, Gemma 3 and Qwen3 also q/k RMSNorms over head_dim.
* ``phi3`` (phi3): fused ``self_attn.qkv_proj`` (hidden -> (heads + 2*kv_heads)*head_dim), ``self_attn.o_proj``,
  fused GLU ``mlp.gate_up_proj`` (hidden -> 2*intermediate) and ``mlp.down_proj``.
* ``gpt2`` (gpt2): ``transformer.h.{i}``, ``attn.c_attn`` (hidden -> 3*hidden), ``attn.c_proj``, ``mlp.c_fc``
  (hidden -> n_inner), ``mlp.c_proj`` (``Conv1D`` modules, weight stored ``[in, out]``).
* ``opt`` (opt): ``model.decoder.layers.{i}``, ``self_attn.{q,k,v,out}_proj`` (with biases), ``fc1``, ``fc2``;
  when ``word_embed_proj_dim`` differs from hidden (OPT-350m) ``model.decoder.project_in`` (before the
  blocks) and ``model.decoder.project_out`` (after them). Learned positions have max_position_embeddings + 2 rows.
* ``hgrn_bit`` (hgrn_bit, the MatMul-free LM of arXiv 2406.02528, reference code
  github.com/ridgerchu/matmulfreellm ``mmfreelm/models/hgrn_bit``): no attention and no KV cache; every
  block's token mixer is its own MLGRU ``attn.{i,f,g}_proj`` (hidden -> hidden*expand_ratio) and ``.o_proj``,
  its channel mixer a GLU ``mlp.gate_proj`` (hidden -> 2*intermediate, gate and up fused) and ``.down_proj``.
  Every linear layer is a BitLinear with its own RMSNorm over its input.

Every family ends with ``lm_head``. Sliding-window attention (Mistral, Qwen2/3 with ``use_sliding_window``,
Gemma 2/3, Phi-3) is :attr:`Workload.sliding_window` tokens on the blocks in :attr:`Workload.sliding_blocks`.

An MLGRU substituted for a block's attention (the MatMul-free LM's token mixer) has four
hidden -> hidden projections, whatever the attention's heads and head_dim, named
``<blocks>.{i}.mlgru.{f,c,g,o}_proj`` (forget gate, candidate, output gate, output projection); a
projection the plan does not name inherits the plan of its attention counterpart
(:meth:`Workload.mlgru_counterpart`). :func:`check_plan` is the one plan-against-model check.
Named shapes for ``--model-config NAME`` are in :data:`BUILTIN_CONFIGS`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, NamedTuple

from dse.errors import UserError
from dse.plan import LayerPlan, ModelPlan, Sparsity

MLGRU_PROJ = ("f_proj", "c_proj", "g_proj", "o_proj")
"""Projections of an MLGRU substituted for attention in a transformer block."""
MLGRU_ROLE = {"f_proj": "q", "c_proj": "k", "g_proj": "v", "o_proj": "o"}
"""MLGRU projection -> the attention role whose plan it inherits (f <- q, c <- k, g <- v, o <- o)."""


@dataclass(frozen=True)
class Family:
    """Where a family's pieces live in the Hugging Face torch model.

    ``blocks``: module path of the list of decoder blocks; ``mixer``: attribute of a block holding its token
    mixer; ``mixer_proj``: (attribute, role) of the mixer's linear layers, roles ``q k v o`` (``qkv`` fused)
    or, for a native MLGRU, ``i f g mo``; ``mlp``: attribute of the channel mixer in a block ('' = the block
    itself); ``mlp_proj``: (attribute, role), roles ``gate up down`` (``gate_up`` fused); ``embedding``:
    module path of the token embedding.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    mixer: str
    mixer_proj: tuple[tuple[str, str], ...]
    mlp: str
    mlp_proj: tuple[tuple[str, str], ...]
    embedding: str

    @property
    def native_mlgru(self) -> bool:
        """The model's own token mixer is an MLGRU (hgrn_bit)."""
        return self.mixer_proj[0][1] == "i"

    @property
    def mlp_kind(self) -> str:
        """``glu`` (gated: gate and up projections, fused or not) or ``mlp`` (up, activation, down)."""
        return "glu" if any(role.startswith("gate") for _, role in self.mlp_proj) else "mlp"


_QKVO = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"))
_GLU = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))
FAMILY_LIST = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", "self_attn", _QKVO, "mlp", _GLU,
           "model.embed_tokens"),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), "model.layers", "self_attn", _QKVO, "mlp", _GLU,
           "model.embed_tokens"),
    Family("phi3", ("phi3",), "model.layers", "self_attn", (("qkv_proj", "qkv"), ("o_proj", "o")), "mlp",
           (("gate_up_proj", "gate_up"), ("down_proj", "down")), "model.embed_tokens"),
    Family("gpt2", ("gpt2",), "transformer.h", "attn", (("c_attn", "qkv"), ("c_proj", "o")), "mlp",
           (("c_fc", "up"), ("c_proj", "down")), "transformer.wte"),
    Family("opt", ("opt",), "model.decoder.layers", "self_attn", _QKVO[:3] + (("out_proj", "o"),), "",
           (("fc1", "up"), ("fc2", "down")), "model.decoder.embed_tokens"),
    Family("hgrn_bit", ("hgrn_bit",), "model.layers", "attn",
           (("i_proj", "i"), ("f_proj", "f"), ("g_proj", "g"), ("o_proj", "mo")), "mlp",
           (("gate_proj", "gate_up"), ("down_proj", "down")), "model.embeddings"),
)
FAMILIES: dict[str, Family] = {f.name: f for f in FAMILY_LIST}
FAMILY_OF_TYPE: dict[str, Family] = {t: f for f in FAMILY_LIST for t in f.model_types}
"""Hugging Face ``model_type`` -> its :class:`Family`."""

# Named model shapes (the fields of their Hugging Face config.json read here), so that
# `dse hwcost estimate --model-config NAME` needs neither a download nor torch.
BUILTIN_CONFIGS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M config.json (the project's default model)
    "smollm2-135m": {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 8192,
    },
    # meta-llama/Llama-2-7b-hf config.json (6,738,415,616 parameters)
    "llama2-7b": {
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 4096,
    },
    # MatMul-free LM 1.3B (ridger/MMfreeLM-1.3B, arXiv 2406.02528): the HGRNBitConfig defaults of
    # github.com/ridgerchu/matmulfreellm mmfreelm/models/hgrn_bit/configuration_hgrn_bit.py (vocab 32000,
    # hidden 2048, 24 layers, num_heads 1, expand_ratio 1, no short convolution, lower bounds, untied),
    # which are the 1.3B row of its README (24 layers, d 2048); intermediate 5632 is HGRNBitMLP's rule
    # 256 * ceil(int(2048 * 4 * 2/3) / 256) for hidden_ratio 4.
    "mmfreelm-1.3b": {
        "model_type": "hgrn_bit", "num_hidden_layers": 24, "hidden_size": 2048, "num_heads": 1,
        "expand_ratio": 1, "hidden_ratio": 4, "intermediate_size": 5632, "vocab_size": 32000,
        "use_short_conv": False, "use_lower_bound": True, "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
    },
}


_BLOCK_RE = re.compile(r"\.(\d+)\.")


def block_index(layer_name: str) -> int | None:
    """Index of the block a module path lies in (its first numeric part, as every family's block list gives
    it: ``model.layers.12.mlp.up_proj`` -> 12, ``transformer.h.3.attn.c_attn`` -> 3), or None (``lm_head``)."""
    match = _BLOCK_RE.search(f".{layer_name}.")
    return int(match.group(1)) if match else None


def layer_type(layer_name: str) -> str:
    """The layer's path inside its block (``mlp.down_proj``), or its whole name outside the blocks."""
    match = _BLOCK_RE.search(f".{layer_name}.")
    return layer_name[match.end() - 1:] if match else layer_name


def supported_model_types() -> str:
    """``'llama (llama, mistral, qwen2, qwen3), gemma (...), ...'`` for error messages."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILY_LIST)


class LinearLayer(NamedTuple):
    """One linear layer: module ``name``, ``in_features``, ``out_features``, ``block`` index (None: outside blocks)."""

    name: str
    in_features: int
    out_features: int
    block: int | None


class PlanMismatch(UserError, ValueError):
    """A plan the model cannot take. ``str()`` is one line; ``layer`` or ``block`` names what is wrong,
    ``field`` which of its fields (``name``, ``sparsity``, ``index``, ``mixer``) and ``problem`` why, so a
    command can put the flag or spec field it read the plan from in front."""

    def __init__(self, message: str, *, field: str, problem: str, layer: str | None = None,
                 block: int | None = None, sparsity: Sparsity | None = None):
        super().__init__(message)
        self.field, self.problem, self.layer, self.block, self.sparsity = field, problem, layer, block, sparsity


@dataclass(frozen=True)
class Workload:
    """Shape of a causal LM (counts of layers, features, heads, tokens) and its family.

    ``tied_embeddings``: ``lm_head`` shares the input embedding table.
    ``max_positions``: rows of a learned position table (GPT-2, OPT), else 0.
    ``embed_dim``: width of the token embedding (OPT ``word_embed_proj_dim``); 0 means ``hidden``.
    ``norms_per_block``: norms inside a block (2; Gemma 2/3: 4); ``qk_norm``: per-head q/k norms (Gemma 3, Qwen3);
    ``final_norm``: a norm after the last block; ``norm_affine``: norms have parameters (OPT option).
    ``lower_bounds``: HGRN-bit's learned forget-gate lower bounds (num_layers x hidden parameters).
    ``sliding_window``: tokens a sliding-window attention block sees (0: none); ``sliding_blocks``: those blocks.
    For ``hgrn_bit`` ``heads * head_dim`` is the MLGRU width (hidden * expand_ratio) and ``heads`` its heads.
    """

    family: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_positions: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = ""
    embed_dim: int = 0
    norms_per_block: int = 2
    qk_norm: bool = False
    final_norm: bool = True
    norm_affine: bool = True
    lower_bounds: bool = False
    sliding_window: int = 0
    sliding_blocks: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"workload family '{self.family}' is not one of {', '.join(FAMILIES)}")
        for key in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"workload {key}: {value!r} is not a positive integer")
        for key in ("max_positions", "embed_dim", "norms_per_block", "sliding_window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"workload {key}: {value!r} is not an integer >= 0")
        if self.heads % self.kv_heads:
            raise ValueError(f"workload kv_heads: {self.kv_heads} does not divide heads {self.heads}")
        object.__setattr__(self, "sliding_blocks", tuple(int(b) for b in self.sliding_blocks))

    # ----------------------------------------------------------------- constructors
    @staticmethod
    def from_hf_config(config: dict | str | Path) -> "Workload":
        """From a Hugging Face config dict, a ``config.json`` path or a model directory holding one.

        ValueError (one line) for an unreadable or invalid file, a missing or non-integer field,
        or a ``model_type`` outside the supported families.
        """
        if not isinstance(config, dict):
            config = read_config(config)
        model_type = str(config.get("model_type", "")).lower()
        if model_type not in FAMILY_OF_TYPE:
            raise ValueError(f"model_type '{model_type}' is not supported; supported families: "
                             f"{supported_model_types()}")
        return _BUILDERS[FAMILY_OF_TYPE[model_type].name](config, model_type)

    @staticmethod
    def resolve(ref: dict | str | Path) -> "Workload":
        """From a config dict, a ``config.json`` path, a model directory, or a name in :data:`BUILTIN_CONFIGS`."""
        if isinstance(ref, dict):
            return Workload.from_hf_config(ref)
        path = Path(ref)
        if path.exists():
            return Workload.from_hf_config(path)
        key = str(ref).strip().lower()
        if key in BUILTIN_CONFIGS:
            return Workload.from_hf_config(BUILTIN_CONFIGS[key])
        raise ValueError(f"'{ref}' is not a config.json, a model directory or a built-in name; "
                         f"built-in names: {', '.join(BUILTIN_CONFIGS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sliding_blocks"] = list(self.sliding_blocks)
        return d

    @staticmethod
    def from_dict(d: dict) -> "Workload":
        return Workload(**d)

    # ----------------------------------------------------------------- where things are
    @property
    def arch(self) -> Family:
        """The family's module layout."""
        return FAMILIES[self.family]

    @property
    def token_mixer(self) -> str:
        """The model's own token mixer: ``mlgru`` for hgrn_bit, ``attention`` otherwise."""
        return "mlgru" if self.arch.native_mlgru else "attention"

    @property
    def has_kv_cache(self) -> bool:
        return self.token_mixer == "attention"

    def native_mlgru_blocks(self) -> frozenset[int]:
        """Blocks whose token mixer is an MLGRU in the unmodified model (every block of hgrn_bit, else none)."""
        return frozenset(range(self.num_layers)) if self.token_mixer == "mlgru" else frozenset()

    @property
    def block_prefix(self) -> str:
        """Module path of the list of blocks (``model.layers``)."""
        return self.arch.blocks

    def block_name(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}"

    def attention_module(self, i: int) -> str:
        """Module path of block ``i``'s token mixer (its attention; hgrn_bit: its MLGRU)."""
        return f"{self.block_name(i)}.{self.arch.mixer}"

    def mlgru_module(self, i: int) -> str:
        """Module path of the MLGRU substituted for block ``i``'s attention."""
        return f"{self.block_name(i)}.mlgru"

    @property
    def embedding_name(self) -> str:
        return self.arch.embedding

    @property
    def embed_width(self) -> int:
        """Width of a token embedding row (``embed_dim`` or ``hidden``)."""
        return self.embed_dim or self.hidden

    @property
    def mixer_width(self) -> int:
        """Width of the attention output (heads*head_dim) or of the hgrn_bit MLGRU state."""
        return self.heads * self.head_dim

    @property
    def mlp_kind(self) -> str:
        """``glu`` or ``mlp`` (see :attr:`Family.mlp_kind`)."""
        return self.arch.mlp_kind

    def block_of(self, name: str) -> int | None:
        """Index of the block a module path lies in, or None (embedding, lm_head, OPT project_in/out)."""
        return block_index(name) if name.startswith(self.arch.blocks + ".") else None

    # ----------------------------------------------------------------- layers
    def _shape(self, role: str) -> tuple[int, int]:
        """(in, out) features of a projection role."""
        h, q, kv, f, d = self.hidden, self.mixer_width, self.kv_heads * self.head_dim, self.intermediate, \
            self.mixer_width
        return {"q": (h, q), "k": (h, kv), "v": (h, kv), "qkv": (h, q + 2 * kv), "o": (q, h),
                "i": (h, d), "f": (h, d), "g": (h, d), "mo": (d, h),
                "gate": (h, f), "up": (h, f), "gate_up": (h, 2 * f), "down": (f, h)}[role]

    def _layers(self, i: int, prefix: str, projections) -> list[LinearLayer]:
        return [LinearLayer(f"{prefix}.{attr}" if prefix else attr, *self._shape(role), i)
                for attr, role in projections]

    def attention_layers(self, i: int) -> list[LinearLayer]:
        """The attention projections of block ``i`` (ValueError for hgrn_bit, which has no attention)."""
        if self.token_mixer != "attention":
            raise ValueError(f"workload {self.model_type or self.family}: block {i} has no attention (its token "
                             f"mixer is an MLGRU); give every block the mixer mlgru")
        return self._layers(i, self.attention_module(i), self.arch.mixer_proj)

    def mlgru_layers(self, i: int) -> list[LinearLayer]:
        """The MLGRU projections of block ``i``: hgrn_bit's own ``attn.{i,f,g,o}_proj``, otherwise the
        four hidden -> hidden ``mlgru.{f,c,g,o}_proj`` replacing the attention (any heads and head_dim)."""
        if self.token_mixer == "mlgru":
            return self._layers(i, self.attention_module(i), self.arch.mixer_proj)
        return [LinearLayer(f"{self.mlgru_module(i)}.{proj}", self.hidden, self.hidden, i) for proj in MLGRU_PROJ]

    def mlp_layers(self, i: int) -> list[LinearLayer]:
        """The channel-mixer projections of block ``i``."""
        mlp = self.arch.mlp
        return self._layers(i, f"{self.block_name(i)}.{mlp}" if mlp else self.block_name(i), self.arch.mlp_proj)

    def pre_block_layers(self) -> list[LinearLayer]:
        """Linear layers between the embedding and block 0 (OPT ``project_in``), usually none."""
        if self.family == "opt" and self.embed_width != self.hidden:
            return [LinearLayer("model.decoder.project_in", self.embed_width, self.hidden, None)]
        return []

    def post_block_layers(self) -> list[LinearLayer]:
        """Linear layers between the last block and ``lm_head`` (OPT ``project_out``), usually none."""
        if self.family == "opt" and self.embed_width != self.hidden:
            return [LinearLayer("model.decoder.project_out", self.hidden, self.embed_width, None)]
        return []

    def lm_head(self) -> LinearLayer:
        return LinearLayer("lm_head", self.embed_width, self.vocab, None)

    def linear_layers(self, mlgru_blocks: Iterable[int] = ()) -> list[LinearLayer]:
        """Every linear layer in model order; blocks in ``mlgru_blocks`` (and every hgrn_bit block) get
        MLGRU projections instead of attention."""
        return list(_linear_layers(self, frozenset(mlgru_blocks) | self.native_mlgru_blocks()))

    def layer_names(self) -> set[str]:
        """Every name a plan may use: attention and MLGRU projections of every block, MLP, lm_head."""
        return set(_layer_names(self))

    def mlgru_counterpart(self, name: str) -> str:
        """The attention layer whose plan an MLGRU projection inherits when the plan does not name it.

        f <- q, c <- k, g <- v, o <- o (Llama/Gemma/Qwen: ``q_proj`` ...; OPT: o <- ``out_proj``); a fused
        ``qkv_proj`` / ``c_attn`` (Phi-3, GPT-2) gives f, c and g. (hgrn_bit's MLGRU projections are its own.)
        """
        block = self.block_of(name)
        proj = name.rsplit(".", 1)[-1]
        if self.token_mixer != "attention" or block is None or name != f"{self.mlgru_module(block)}.{proj}" \
                or proj not in MLGRU_ROLE:
            raise ValueError(f"'{name}' is not a substituted MLGRU projection of a {self.family} workload")
        role = MLGRU_ROLE[proj]
        for attr, r in self.arch.mixer_proj:
            if r == role or (r == "qkv" and role in "qkv"):
                return f"{self.attention_module(block)}.{attr}"
        raise AssertionError(f"family {self.family} has no attention role {role}")

    def effective_plan(self, plan: ModelPlan) -> dict[str, LayerPlan]:
        """Layer name -> the plan that applies to it, for every linear layer of the model as ``plan`` builds it
        (MLGRU projections the plan does not name take their counterpart's), in model order; layers left
        dense FP16 included."""
        mlgru = {bp.index for bp in plan.blocks if bp.mixer == "mlgru"}
        named = {lp.name for lp in plan.layers}
        inherit = self.token_mixer == "attention"
        out = {}
        for layer in self.linear_layers(mlgru):
            lp = plan.layer(layer.name)
            if inherit and layer.block in mlgru and layer.name not in named and ".mlgru." in layer.name:
                base = plan.layer(self.mlgru_counterpart(layer.name))
                lp = LayerPlan(layer.name, base.sparsity, base.fmt, base.prune, base.quant)
            out[layer.name] = lp
        return out

    # ----------------------------------------------------------------- parameter counts
    def embedding_params(self) -> int:
        """Input embedding parameters: token table vocab*embed_width (+ learned positions for GPT-2/OPT)."""
        return self.vocab * self.embed_width + self.max_positions * self.hidden

    def embedding_row_values(self) -> int:
        """Embedding values read per decoded token (token row + position row for GPT-2/OPT)."""
        return self.embed_width + (self.hidden if self.max_positions else 0)

    def norm_params(self) -> int:
        """Norm parameters: RMSNorm weight (Llama, Gemma, Phi-3, HGRN-bit) or LayerNorm weight + bias (GPT-2,
        OPT); ``norms_per_block`` per block + the final norm; Gemma 3 / Qwen3 q/k norms over head_dim;
        HGRN-bit's per-block MLGRU output norm (mixer width) and one RMSNorm over the input of every BitLinear."""
        if not self.norm_affine:
            return 0
        per = self.hidden * (2 if self.family in ("gpt2", "opt") else 1)
        total = (self.norms_per_block * self.num_layers + (1 if self.final_norm else 0)) * per
        if self.qk_norm:
            total += 2 * self.head_dim * self.num_layers
        if self.family == "hgrn_bit":
            total += self.mixer_width * self.num_layers + sum(layer.in_features for layer in self.linear_layers())
        return total

    def bias_params(self) -> int:
        """Bias parameters of the linear layers (Llama/Gemma/Qwen3 attention_bias, Llama mlp_bias, Qwen2 q/k/v,
        GPT-2 every Conv1D, OPT enable_bias)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_block = 0
        if self.qkv_bias:
            per_block += q_out + 2 * kv_out
        if self.o_bias:
            per_block += self.hidden
        if self.mlp_bias:
            per_block += self.intermediate + self.hidden + (self.intermediate if self.family == "llama" else 0)
        return per_block * self.num_layers

    def other_params(self) -> int:
        """Parameters outside embeddings, norms and linear layers (HGRN-bit lower bounds)."""
        return self.num_layers * self.hidden if self.lower_bounds else 0

    def linear_params(self, mlgru_blocks: Iterable[int] = ()) -> int:
        """Weights of every linear layer, lm_head included (even when tied)."""
        return sum(layer.in_features * layer.out_features for layer in self.linear_layers(mlgru_blocks))

    def param_count(self) -> int:
        """Total parameters as torch counts them (a tied lm_head counted once, with the embedding)."""
        head = self.lm_head()
        tied = head.in_features * head.out_features if self.tied_embeddings else 0
        return (self.linear_params() - tied + self.embedding_params() + self.norm_params() + self.bias_params()
                + self.other_params())

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """K and V cache bytes one token adds in one attention block: 2*kv_heads*head_dim*bytes (0 for hgrn_bit)."""
        return 2 * self.kv_heads * self.head_dim * bytes_per_value if self.has_kv_cache else 0


# ----------------------------------------------------------------------------- the one plan check
def check_plan(plan: ModelPlan, workload: Workload, model: str | None = None) -> None:
    """Raise :class:`PlanMismatch` (one line) for the first thing in ``plan`` the model cannot take; ``model``
    (a name the user gave, e.g. ``llama2-7b``) is named in place of "the workload".

    Checked: every named layer is a linear layer of the model (an attention projection in any block: the
    MLGRU replacing it inherits its plan; an MLGRU projection only where the plan sets the mixer to mlgru),
    every block index exists and can take its mixer (hgrn_bit blocks have no
    attention to keep), and every N:M pattern's M divides the input width of the layer it applies to
    (MLGRU projections inheriting their counterpart's pattern included). Weight formats and bits are
    checked by :class:`~dse.plan.WeightFormat` when the plan is built. Layers the model has and the plan leaves
    out are no error here (they stay FP16 dense, as a partial search space intends): :func:`left_out` finds the
    ones a plan written for another model would leave.
    """
    n = workload.num_layers
    where = model or "the workload"
    mlgru = set()
    for bp in plan.blocks:
        if not 0 <= bp.index < n:
            raise PlanMismatch(f"plan block {bp.index} is not in 0..{n - 1}", block=bp.index, field="index",
                               problem=f"block {bp.index} is not in {where} (blocks 0..{n - 1})")
        if bp.mixer == "attention" and workload.token_mixer == "mlgru":
            problem = f"model_type {workload.model_type} has no attention; allowed: mlgru"
            raise PlanMismatch(f"plan block {bp.index} mixer 'attention': {problem}", block=bp.index, field="mixer",
                               problem=problem)
        if bp.mixer == "mlgru":
            mlgru.add(bp.index)
    base = _base_names(workload)
    substituted = _mlgru_blocks_of(workload)  # MLGRU projection name -> its block
    for lp in plan.layers:
        if lp.name not in base and substituted.get(lp.name, -1) not in mlgru:
            hint = (" (an MLGRU projection needs its block's mixer set to mlgru)"
                    if lp.name in _layer_names(workload) else "")
            example = next(iter(_linear_layers(workload, workload.native_mlgru_blocks()))).name
            raise PlanMismatch(f"plan layer '{lp.name}' is not a linear layer of the workload (e.g. '{example}', "
                               f"'lm_head'){hint}", layer=lp.name, field="name",
                               problem=f"is not in {where} ({n} blocks){hint}")
    widths = _widths(workload)
    checked = [(lp.name, lp) for lp in plan.layers]
    if mlgru and workload.token_mixer == "attention":  # substituted projections the plan does not name inherit
        named = {lp.name for lp in plan.layers}
        counterpart = _counterparts(workload)
        checked += [(name, plan.layer(counterpart[name])) for name, block in substituted.items()
                    if block in mlgru and name not in named]
    for name, lp in checked:
        if lp.sparsity is not None and widths[name] % lp.sparsity.m:
            raise PlanMismatch(f"layer {name}: M={lp.sparsity.m} does not divide in_features {widths[name]}",
                               layer=name, sparsity=lp.sparsity, field="sparsity",
                               problem=f"M={lp.sparsity.m} does not divide in_features {widths[name]} of {name}")


def left_out(plan: ModelPlan, workload: Workload) -> list[str]:
    """Linear layers of the model (as ``plan`` builds it, in model order) that ``plan`` leaves FP16 dense although
    it sets the same layer type (:func:`layer_type`, e.g. ``mlp.up_proj``) in another block: what a plan written
    for a model with fewer blocks (or other block numbers) leaves out. An MLGRU projection inheriting its
    counterpart's plan counts as set; a layer type the plan sets nowhere (kept dense on purpose) is not listed."""
    mlgru = {bp.index for bp in plan.blocks if bp.mixer == "mlgru"} | workload.native_mlgru_blocks()
    named = {lp.name for lp in plan.layers}
    inherit = _counterparts(workload) if workload.token_mixer == "attention" else {}
    layers = [layer.name for layer in _linear_layers(workload, frozenset(mlgru))]
    covered = {name for name in layers if name in named or inherit.get(name) in named}
    types = {layer_type(name) for name in covered}
    return [name for name in layers if name not in covered and layer_type(name) in types]


def compact_names(names: list[str], workload: Workload, mlgru: Iterable[int] = (), limit: int = 6) -> str:
    """``names`` (linear layers, model order) in short form: ``model.layers.30.*`` for a block whose every linear
    layer is listed, ``model.layers.3.mlp.*`` for such a module, else the names; after ``limit`` items
    ``... (N more)``."""
    all_layers = [layer.name for layer in _linear_layers(workload, frozenset(mlgru) | workload.native_mlgru_blocks())]
    listed, items = set(names), []
    for name in names:
        block = workload.block_of(name)
        prefixes = [name.rsplit(".", 1)[0]] if block is None else [workload.block_name(block), name.rsplit(".", 1)[0]]
        prefix = next((p for p in prefixes if "." in p and all(n in listed for n in all_layers
                                                               if n.startswith(p + "."))), None)
        item = f"{prefix}.*" if prefix else name
        if item not in items:
            items.append(item)
    shown = items[:limit]
    return ", ".join(shown) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@lru_cache(maxsize=64)
def _base_names(workload: Workload) -> frozenset[str]:
    """Names of the linear layers of the model's own architecture (its native MLGRU blocks included)."""
    return frozenset(layer.name for layer in _linear_layers(workload, workload.native_mlgru_blocks()))


@lru_cache(maxsize=64)
def _mlgru_blocks_of(workload: Workload) -> dict[str, int]:
    """Every MLGRU projection name a plan may set -> its block (do not mutate)."""
    return {layer.name: i for i in range(workload.num_layers) for layer in workload.mlgru_layers(i)}


@lru_cache(maxsize=64)
def _counterparts(workload: Workload) -> dict[str, str]:
    """Substituted MLGRU projection -> the attention layer whose plan it inherits (do not mutate)."""
    return {name: workload.mlgru_counterpart(name) for name in _mlgru_blocks_of(workload)}


@lru_cache(maxsize=256)
def _linear_layers(workload: Workload, mlgru: frozenset[int]) -> tuple[LinearLayer, ...]:
    """:meth:`Workload.linear_layers` (cached: plan checks and the cost model's batch path ask it per plan)."""
    out: list[LinearLayer] = list(workload.pre_block_layers())
    for i in range(workload.num_layers):
        out += workload.mlgru_layers(i) if i in mlgru else workload.attention_layers(i)
        out += workload.mlp_layers(i)
    out += workload.post_block_layers()
    out.append(workload.lm_head())
    return tuple(out)


@lru_cache(maxsize=64)
def _layer_names(workload: Workload) -> frozenset[str]:
    names = {layer.name for layer in _linear_layers(workload, workload.native_mlgru_blocks())}
    return frozenset(names | {layer.name for i in range(workload.num_layers) for layer in workload.mlgru_layers(i)})


@lru_cache(maxsize=64)
def _widths(workload: Workload) -> dict[str, int]:
    """Input width of every layer a plan may name (do not mutate)."""
    layers = list(_linear_layers(workload, workload.native_mlgru_blocks()))
    layers += [layer for i in range(workload.num_layers) for layer in workload.mlgru_layers(i)]
    return {layer.name: layer.in_features for layer in layers}


# ----------------------------------------------------------------------------- reading configs
def read_config(path: str | Path) -> dict:
    """The JSON object in a ``config.json`` (or in ``<dir>/config.json``); ValueError with one line otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read model config '{path}': {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"model config '{path}' is not UTF-8 text") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"model config '{path}' is not valid JSON: {err.msg} at line {err.lineno}, "
                         f"column {err.colno}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model config '{path}' is not a JSON object")
    return config


def _get(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise ValueError(f"model config has no '{keys[0]}'")


def _int(config: dict, *keys: str, default=None) -> int:
    """A positive integer field (the first of ``keys`` present), ValueError naming it otherwise."""
    value = _get(config, *keys, default=default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        key = next((k for k in keys if config.get(k) is not None), keys[0])
        raise ValueError(f"model config {key}: {value!r} is not a positive integer")
    return value


def _bool(config: dict, key: str, default: bool) -> bool:
    value = config.get(key)
    return default if value is None else bool(value)


def _sliding(c: dict, model_type: str, layers: int) -> dict:
    """``sliding_window`` and ``sliding_blocks`` as transformers' config classes derive them: an explicit
    ``layer_types`` wins; else Mistral and Phi-3 slide on every block when a window is set, Qwen2/3 only with
    ``use_sliding_window`` from ``max_window_layers`` on, Gemma 2 on even blocks, Gemma 3 on all but every
    ``sliding_window_pattern``-th (6) block; Gemma 1, Llama, GPT-2, OPT and HGRN-bit do not slide."""
    defaults = {"mistral": 4096, "gemma2": 4096, "gemma3_text": 4096, "qwen2": 4096, "qwen3": 4096}
    if model_type not in defaults and model_type != "phi3":
        return {}
    window = c.get("sliding_window", defaults.get(model_type))
    if model_type in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
        window = None
    if not window:
        return {}
    types = c.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        blocks = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif model_type in ("qwen2", "qwen3"):
        blocks = list(range(int(c.get("max_window_layers", 28)), layers))
    elif model_type == "gemma2":
        blocks = [i for i in range(layers) if (i + 1) % 2]
    elif model_type == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern", 6))
        blocks = [i for i in range(layers) if (i + 1) % pattern]
    else:
        blocks = list(range(layers))
    return {"sliding_window": _int({"sliding_window": window}, "sliding_window"),
            "sliding_blocks": tuple(blocks)} if blocks else {}


def _decoder(c: dict, model_type: str, family: str, *, head_dim: int | None, tied: bool, **fields) -> Workload:
    """The fields Llama-style configs (Llama, Mistral, Qwen, Gemma, Phi-3) name alike; ``head_dim`` and ``tied``:
    the config class's defaults when the file omits them (``None``: hidden / heads)."""
    hidden, heads, layers = _int(c, "hidden_size"), _int(c, "num_attention_heads"), _int(c, "num_hidden_layers")
    return Workload(
        family=family,
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=_int(c, "num_key_value_heads", default=heads),
        head_dim=_int(c, "head_dim", default=head_dim or hidden // heads),
        intermediate=_int(c, "intermediate_size"),
        vocab=_int(c, "vocab_size"),
        tied_embeddings=_bool(c, "tie_word_embeddings", tied),
        model_type=model_type,
        **_sliding(c, model_type, layers),
        **fields,
    )


def _llama(c: dict, model_type: str) -> Workload:
    bias = bool(c.get("attention_bias", False))
    # Qwen3's config class defaults head_dim to 128 (heads*head_dim may differ from hidden); all default to untied.
    # Llama, Qwen3: attention_bias on q, k, v and o; Qwen2: always on q, k, v, never on o; Mistral: none
    return _decoder(c, model_type, "llama", head_dim=128 if model_type == "qwen3" else None, tied=False,
                    qkv_bias=model_type == "qwen2" or bias, o_bias=model_type in ("llama", "qwen3") and bias,
                    mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=model_type == "qwen3")


def _gemma(c: dict, model_type: str) -> Workload:
    bias = bool(c.get("attention_bias", False))  # Gemma 1-3: attention_bias on q, k, v and o
    # head_dim 256 is the Gemma configs' default (heads*head_dim may differ from hidden); Gemma 2/3 add
    # pre/post feed-forward norms, Gemma 3 q/k norms
    return _decoder(c, model_type, "gemma", head_dim=256, tied=True, qkv_bias=bias, o_bias=bias,
                    norms_per_block=2 if model_type == "gemma" else 4, qk_norm=model_type == "gemma3_text")


def _phi3(c: dict, model_type: str) -> Workload:
    return _decoder(c, model_type, "phi3", head_dim=None, tied=False)


def _gpt2(c: dict, model_type: str) -> Workload:
    hidden = _int(c, "n_embd", "hidden_size")
    heads = _int(c, "n_head", "num_attention_heads")
    return Workload(
        family="gpt2",
        num_layers=_int(c, "n_layer", "num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate=_int(c, "n_inner", default=4 * hidden),
        vocab=_int(c, "vocab_size"),
        tied_embeddings=_bool(c, "tie_word_embeddings", True),
        max_positions=_int(c, "n_positions", "n_ctx", default=1024),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        model_type=model_type,
    )


def _opt(c: dict, model_type: str) -> Workload:
    hidden = _int(c, "hidden_size")
    heads = _int(c, "num_attention_heads")
    bias = _bool(c, "enable_bias", True)
    if hidden % heads:
        raise ValueError(f"model config num_attention_heads: {heads} does not divide hidden_size {hidden}")
    return Workload(
        family="opt",
        num_layers=_int(c, "num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate=_int(c, "ffn_dim"),
        vocab=_int(c, "vocab_size"),
        tied_embeddings=_bool(c, "tie_word_embeddings", True),
        max_positions=_int(c, "max_position_embeddings", default=2048) + 2,  # OPT offsets positions by 2
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        model_type=model_type,
        embed_dim=_int(c, "word_embed_proj_dim", default=hidden),
        final_norm=_bool(c, "do_layer_norm_before", True) and not _bool(c, "_remove_final_layer_norm", False),
        norm_affine=_bool(c, "layer_norm_elementwise_affine", True),
    )


def _hgrn_bit(c: dict, model_type: str) -> Workload:
    if c.get("use_short_conv"):
        raise ValueError("model config use_short_conv: true is not supported (no short convolution "
                         "in the hgrn_bit workload); allowed: false")
    hidden = _int(c, "hidden_size", default=2048)
    heads = _int(c, "num_heads", default=1)
    width = hidden * _int(c, "expand_ratio", default=1)
    if width % heads:
        raise ValueError(f"model config num_heads: {heads} does not divide hidden_size * expand_ratio {width}")
    if c.get("intermediate_size") is not None:
        intermediate = _int(c, "intermediate_size")
    else:  # HGRNBitMLP: a multiple of 256 near 2/3 * hidden * hidden_ratio
        ratio = _int(c, "hidden_ratio", default=4)
        intermediate = 256 * math.ceil(int(hidden * ratio * 2 / 3) / 256)
    return Workload(
        family="hgrn_bit",
        num_layers=_int(c, "num_hidden_layers", default=24),
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        head_dim=width // heads,
        intermediate=intermediate,
        vocab=_int(c, "vocab_size", default=32000),
        tied_embeddings=_bool(c, "tie_word_embeddings", False),
        model_type=model_type,
        lower_bounds=_bool(c, "use_lower_bound", True),
    )


_BUILDERS = {"llama": _llama, "gemma": _gemma, "phi3": _phi3, "gpt2": _gpt2, "opt": _opt, "hgrn_bit": _hgrn_bit}
