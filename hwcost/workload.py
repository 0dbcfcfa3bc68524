"""The model's shape (:class:`Workload`), built from a Hugging Face ``config.json`` alone.

Layer names are the module paths of the Hugging Face torch model, so that a
:class:`~dse.plan.ModelPlan` written against the real model applies here:

* Llama family (``model_type`` llama, mistral, qwen2): per block ``i``
  ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` (q: hidden -> heads*head_dim,
  k/v: hidden -> kv_heads*head_dim, o: heads*head_dim -> hidden) and
  ``model.layers.{i}.mlp.{gate,up,down}_proj``; then ``lm_head``.
* GPT-2: ``transformer.h.{i}.attn.c_attn`` (hidden -> 3*hidden),
  ``transformer.h.{i}.attn.c_proj``, ``transformer.h.{i}.mlp.c_fc``
  (hidden -> n_inner), ``transformer.h.{i}.mlp.c_proj``; then ``lm_head``.

A block whose token mixer is an MLGRU (MatMul-free LM, arXiv 2406.02528) has
four hidden -> hidden projections instead of the attention ones, named
``<block prefix>.mlgru.{f,c,g,o}_proj`` (forget gate, candidate, output gate,
output projection); see :meth:`Workload.mlgru_counterpart`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)
FAMILIES = ("llama", "gpt2")
MLGRU_PROJ = ("f_proj", "c_proj", "g_proj", "o_proj")


class LinearLayer(NamedTuple):
    """One linear layer: module ``name``, ``in_features``, ``out_features``, ``block`` index (None: lm_head)."""

    name: str
    in_features: int
    out_features: int
    block: int | None


@dataclass(frozen=True)
class Workload:
    """Shape of a causal LM (counts of layers, features, heads, tokens).

    ``tied_embeddings``: ``lm_head`` shares the input embedding table.
    ``max_positions`` is only used by learned position embeddings (GPT-2).
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

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"workload family '{self.family}' is not one of {', '.join(FAMILIES)}")
        for key in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"workload {key}: {value!r} is not a positive integer")
        if self.heads % self.kv_heads:
            raise ValueError(f"workload kv_heads: {self.kv_heads} does not divide heads {self.heads}")

    # ----------------------------------------------------------------- constructors
    @staticmethod
    def from_hf_config(config: dict | str | Path) -> "Workload":
        """From a Hugging Face config dict, a ``config.json`` path or a model directory holding one."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except OSError as err:
                raise ValueError(f"cannot read model config '{path}': {err.strerror}") from None
        model_type = str(config.get("model_type", "")).lower()
        if model_type in LLAMA_TYPES:
            return _llama(config, model_type)
        if model_type in GPT2_TYPES:
            return _gpt2(config, model_type)
        allowed = ", ".join(LLAMA_TYPES + GPT2_TYPES)
        raise ValueError(f"model_type '{model_type}' is not supported by hwcost; allowed: {allowed}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Workload":
        return Workload(**d)

    # ----------------------------------------------------------------- layers
    @property
    def block_prefix(self) -> str:
        return "model.layers" if self.family == "llama" else "transformer.h"

    @property
    def attention_name(self) -> str:
        """Module path of block ``{i}``'s attention, to format with ``i``."""
        return self.block_prefix + (".{i}.self_attn" if self.family == "llama" else ".{i}.attn")

    @property
    def embedding_name(self) -> str:
        return "model.embed_tokens" if self.family == "llama" else "transformer.wte"

    def attention_layers(self, i: int) -> list[LinearLayer]:
        """The attention projections of block ``i``."""
        h, q_out, kv_out = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "llama":
            p = f"model.layers.{i}.self_attn"
            return [LinearLayer(f"{p}.q_proj", h, q_out, i), LinearLayer(f"{p}.k_proj", h, kv_out, i),
                    LinearLayer(f"{p}.v_proj", h, kv_out, i), LinearLayer(f"{p}.o_proj", q_out, h, i)]
        p = f"transformer.h.{i}.attn"
        return [LinearLayer(f"{p}.c_attn", h, q_out + 2 * kv_out, i), LinearLayer(f"{p}.c_proj", q_out, h, i)]

    def mlgru_layers(self, i: int) -> list[LinearLayer]:
        """The MLGRU projections replacing block ``i``'s attention (four hidden -> hidden)."""
        p = f"{self.block_prefix}.{i}.mlgru"
        return [LinearLayer(f"{p}.{proj}", self.hidden, self.hidden, i) for proj in MLGRU_PROJ]

    def mlp_layers(self, i: int) -> list[LinearLayer]:
        """The channel-mixer projections of block ``i``."""
        h, f = self.hidden, self.intermediate
        if self.family == "llama":
            p = f"model.layers.{i}.mlp"
            return [LinearLayer(f"{p}.gate_proj", h, f, i), LinearLayer(f"{p}.up_proj", h, f, i),
                    LinearLayer(f"{p}.down_proj", f, h, i)]
        p = f"transformer.h.{i}.mlp"
        return [LinearLayer(f"{p}.c_fc", h, f, i), LinearLayer(f"{p}.c_proj", f, h, i)]

    def lm_head(self) -> LinearLayer:
        return LinearLayer("lm_head", self.hidden, self.vocab, None)

    def linear_layers(self, mlgru_blocks: Iterable[int] = ()) -> list[LinearLayer]:
        """Every linear layer in model order; blocks in ``mlgru_blocks`` get MLGRU projections instead of attention."""
        mlgru = set(mlgru_blocks)
        out: list[LinearLayer] = []
        for i in range(self.num_layers):
            out += self.mlgru_layers(i) if i in mlgru else self.attention_layers(i)
            out += self.mlp_layers(i)
        out.append(self.lm_head())
        return out

    def layer_names(self) -> set[str]:
        """Every name a plan may use: attention and MLGRU projections of every block, MLP, lm_head."""
        names = {layer.name for layer in self.linear_layers()}
        for i in range(self.num_layers):
            names.update(layer.name for layer in self.mlgru_layers(i))
        return names

    def mlgru_counterpart(self, name: str) -> str:
        """The attention layer whose plan an MLGRU projection inherits when the plan does not name it.

        Llama: f <- q_proj, c <- k_proj, g <- v_proj, o <- o_proj; GPT-2: f, c, g <- c_attn, o <- c_proj.
        """
        prefix, proj = name.rsplit(".mlgru.", 1)
        attn = prefix + (".self_attn" if self.family == "llama" else ".attn")
        if self.family == "llama":
            return f"{attn}.{dict(zip(MLGRU_PROJ, ('q_proj', 'k_proj', 'v_proj', 'o_proj')))[proj]}"
        return f"{attn}.{'c_proj' if proj == 'o_proj' else 'c_attn'}"

    # ----------------------------------------------------------------- parameter counts
    def embedding_params(self) -> int:
        """Input embedding parameters: token table vocab*hidden (+ learned positions for GPT-2)."""
        return self.vocab * self.hidden + self.max_positions * self.hidden

    def embedding_row_values(self) -> int:
        """Embedding values read per decoded token (token row + position row for GPT-2)."""
        return self.hidden * (2 if self.max_positions else 1)

    def norm_params(self) -> int:
        """Norm parameters: RMSNorm (weight) for Llama, LayerNorm (weight + bias) for GPT-2; 2 per block + final."""
        per_norm = self.hidden if self.family == "llama" else 2 * self.hidden
        return (2 * self.num_layers + 1) * per_norm

    def bias_params(self) -> int:
        """Bias parameters of the linear layers (Llama attention_bias/mlp_bias, Qwen2 q/k/v, GPT-2 every Conv1D)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_block = 0
        if self.qkv_bias:
            per_block += q_out + 2 * kv_out
        if self.o_bias:
            per_block += self.hidden
        if self.mlp_bias:
            per_block += self.intermediate + self.hidden + (self.intermediate if self.family == "llama" else 0)
        return per_block * self.num_layers

    def linear_params(self, mlgru_blocks: Iterable[int] = ()) -> int:
        """Weights of every linear layer, lm_head included (even when tied)."""
        return sum(layer.in_features * layer.out_features for layer in self.linear_layers(mlgru_blocks))

    def param_count(self) -> int:
        """Total parameters as torch counts them (a tied lm_head counted once, with the embedding)."""
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden
        blocks = self.linear_params() - self.vocab * self.hidden
        return blocks + lm_head + self.embedding_params() + self.norm_params() + self.bias_params()

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """K and V cache bytes one token adds in one attention block: 2*kv_heads*head_dim*bytes."""
        return 2 * self.kv_heads * self.head_dim * bytes_per_value


def _get(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise ValueError(f"model config has no '{keys[0]}'")


def _llama(c: dict, model_type: str) -> Workload:
    hidden = int(_get(c, "hidden_size"))
    heads = int(_get(c, "num_attention_heads"))
    return Workload(
        family="llama",
        num_layers=int(_get(c, "num_hidden_layers")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(_get(c, "num_key_value_heads", default=heads)),
        head_dim=int(_get(c, "head_dim", default=hidden // heads)),
        intermediate=int(_get(c, "intermediate_size")),
        vocab=int(_get(c, "vocab_size")),
        # Llama/Mistral/Qwen2 configs default to untied embeddings
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        # Llama: attention_bias on q, k, v and o; Qwen2: always on q, k, v, never on o; Mistral: none
        qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
        o_bias=model_type == "llama" and bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        model_type=model_type,
    )


def _gpt2(c: dict, model_type: str) -> Workload:
    hidden = int(_get(c, "n_embd", "hidden_size"))
    heads = int(_get(c, "n_head", "num_attention_heads"))
    return Workload(
        family="gpt2",
        num_layers=int(_get(c, "n_layer", "num_hidden_layers")),
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate=int(c.get("n_inner") or 4 * hidden),
        vocab=int(_get(c, "vocab_size")),
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        max_positions=int(_get(c, "n_positions", "n_ctx", default=1024)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        model_type=model_type,
    )
