"""The model's shape (:class:`Workload`), built from a Hugging Face ``config.json`` alone.

Layer names are the module paths of the Hugging Face torch model, so that a
:class:`~dse.plan.ModelPlan` written against the real model applies here.
Families (``model_type`` values in brackets):

* ``llama`` (llama, mistral, qwen2) and ``gemma`` (gemma, gemma2, gemma3_text):
  per block ``i`` ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` (q: hidden ->
  heads*head_dim, k/v: hidden -> kv_heads*head_dim (grouped KV heads), o:
  heads*head_dim -> hidden) and ``model.layers.{i}.mlp.{gate,up,down}_proj``;
  then ``lm_head``. Gemma gives ``head_dim`` explicitly (heads*head_dim may
  differ from hidden) and ties the embeddings by default; Gemma 2/3 have four
  RMSNorms per block, Gemma 3 also q/k RMSNorms over head_dim.
* ``gpt2`` (gpt2): ``transformer.h.{i}.attn.c_attn`` (hidden -> 3*hidden),
  ``transformer.h.{i}.attn.c_proj``, ``transformer.h.{i}.mlp.c_fc``
  (hidden -> n_inner), ``transformer.h.{i}.mlp.c_proj``; then ``lm_head``.
* ``opt`` (opt): ``model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj``
  (hidden -> hidden, with biases), ``model.decoder.layers.{i}.fc1`` (hidden ->
  ffn_dim) and ``.fc2``; when ``word_embed_proj_dim`` differs from hidden
  (OPT-350m) ``model.decoder.project_in`` (before the blocks) and
  ``model.decoder.project_out`` (after them), and ``lm_head`` reads
  word_embed_proj_dim features. Learned positions have max_position_embeddings + 2 rows.
* ``hgrn_bit`` (hgrn_bit, the MatMul-free LM of arXiv 2406.02528, reference code
  github.com/ridgerchu/matmulfreellm ``mmfreelm/models/hgrn_bit``): no attention
  and no KV cache. Every block's token mixer is an MLGRU,
  ``model.layers.{i}.attn.{i,f,g}_proj`` (hidden -> hidden*expand_ratio) and
  ``.o_proj`` (back to hidden), and its channel mixer a GLU,
  ``model.layers.{i}.mlp.gate_proj`` (hidden -> 2*intermediate, gate and up fused)
  and ``.down_proj``; then ``lm_head``. Every linear layer is a BitLinear with
  its own RMSNorm over its input (counted in :meth:`Workload.norm_params`).

A block of a transformer family whose token mixer a plan replaces by an MLGRU
has four hidden -> hidden projections instead of the attention ones, named
``<block prefix>.{i}.mlgru.{f,c,g,o}_proj`` (forget gate, candidate, output
gate, output projection); see :meth:`Workload.mlgru_counterpart`. An
``hgrn_bit`` block's mixer is always its native MLGRU (:attr:`Workload.token_mixer`).

Named shapes for ``dse hwcost estimate --model-config NAME`` are in
:data:`BUILTIN_CONFIGS` (no download, no torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

LLAMA_TYPES = ("llama", "mistral", "qwen2")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
GPT2_TYPES = ("gpt2",)
OPT_TYPES = ("opt",)
HGRN_BIT_TYPES = ("hgrn_bit",)
FAMILY_TYPES: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_TYPES, "gemma": GEMMA_TYPES, "gpt2": GPT2_TYPES, "opt": OPT_TYPES, "hgrn_bit": HGRN_BIT_TYPES,
}
"""Workload family -> the Hugging Face ``model_type`` values it reads."""
FAMILIES = tuple(FAMILY_TYPES)
MLGRU_PROJ = ("f_proj", "c_proj", "g_proj", "o_proj")
"""Projections of an MLGRU substituted for attention in a transformer block."""
HGRN_MIXER_PROJ = ("i_proj", "f_proj", "g_proj", "o_proj")
"""Projections of the native MLGRU token mixer of an hgrn_bit block (``attn.*``)."""

# Named model shapes (the fields of their Hugging Face config.json that hwcost reads), so that
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


def builtin_names() -> list[str]:
    """Names accepted by :meth:`Workload.resolve` besides paths."""
    return list(BUILTIN_CONFIGS)


def supported_model_types() -> str:
    """``'llama (llama, mistral, qwen2), gemma (...), ...'`` for error messages."""
    return ", ".join(f"{family} ({', '.join(types)})" for family, types in FAMILY_TYPES.items())


class LinearLayer(NamedTuple):
    """One linear layer: module ``name``, ``in_features``, ``out_features``, ``block`` index (None: outside blocks)."""

    name: str
    in_features: int
    out_features: int
    block: int | None


@dataclass(frozen=True)
class Workload:
    """Shape of a causal LM (counts of layers, features, heads, tokens).

    ``tied_embeddings``: ``lm_head`` shares the input embedding table.
    ``max_positions``: rows of a learned position table (GPT-2, OPT), else 0.
    ``embed_dim``: width of the token embedding (OPT ``word_embed_proj_dim``); 0 means ``hidden``.
    ``norms_per_block``: norms inside a block (2; Gemma 2/3: 4); ``qk_norm``: per-head q/k norms (Gemma 3);
    ``final_norm``: a norm after the last block; ``norm_affine``: norms have parameters (OPT option).
    ``lower_bounds``: HGRN-bit's learned forget-gate lower bounds (num_layers x hidden parameters).
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

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"workload family '{self.family}' is not one of {', '.join(FAMILIES)}")
        for key in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"workload {key}: {value!r} is not a positive integer")
        for key in ("max_positions", "embed_dim", "norms_per_block"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"workload {key}: {value!r} is not an integer >= 0")
        if self.heads % self.kv_heads:
            raise ValueError(f"workload kv_heads: {self.kv_heads} does not divide heads {self.heads}")

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
        for family, types in FAMILY_TYPES.items():
            if model_type in types:
                return _BUILDERS[family](config, model_type)
        raise ValueError(f"model_type '{model_type}' is not supported by hwcost; supported families: "
                         f"{supported_model_types()}")

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
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Workload":
        return Workload(**d)

    # ----------------------------------------------------------------- names
    @property
    def token_mixer(self) -> str:
        """The model's own token mixer: ``mlgru`` for hgrn_bit, ``attention`` otherwise."""
        return "mlgru" if self.family == "hgrn_bit" else "attention"

    @property
    def has_kv_cache(self) -> bool:
        return self.token_mixer == "attention"

    def native_mlgru_blocks(self) -> frozenset[int]:
        """Blocks whose token mixer is an MLGRU in the unmodified model (every block of hgrn_bit, else none)."""
        return frozenset(range(self.num_layers)) if self.token_mixer == "mlgru" else frozenset()

    @property
    def block_prefix(self) -> str:
        return {"gpt2": "transformer.h", "opt": "model.decoder.layers"}.get(self.family, "model.layers")

    @property
    def attention_name(self) -> str:
        """Module path of block ``{i}``'s attention (hgrn_bit: its MLGRU token mixer), to format with ``i``."""
        return self.block_prefix + (".{i}.attn" if self.family in ("gpt2", "hgrn_bit") else ".{i}.self_attn")

    @property
    def embedding_name(self) -> str:
        return {"gpt2": "transformer.wte", "opt": "model.decoder.embed_tokens",
                "hgrn_bit": "model.embeddings"}.get(self.family, "model.embed_tokens")

    @property
    def embed_width(self) -> int:
        """Width of a token embedding row (``embed_dim`` or ``hidden``)."""
        return self.embed_dim or self.hidden

    @property
    def mixer_width(self) -> int:
        """Width of the attention output (heads*head_dim) or of the hgrn_bit MLGRU state."""
        return self.heads * self.head_dim

    # ----------------------------------------------------------------- layers
    def attention_layers(self, i: int) -> list[LinearLayer]:
        """The attention projections of block ``i`` (ValueError for hgrn_bit, which has no attention)."""
        h, q_out, kv_out = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        p = self.attention_name.format(i=i)
        if self.family in ("llama", "gemma"):
            return [LinearLayer(f"{p}.q_proj", h, q_out, i), LinearLayer(f"{p}.k_proj", h, kv_out, i),
                    LinearLayer(f"{p}.v_proj", h, kv_out, i), LinearLayer(f"{p}.o_proj", q_out, h, i)]
        if self.family == "opt":
            return [LinearLayer(f"{p}.q_proj", h, q_out, i), LinearLayer(f"{p}.k_proj", h, kv_out, i),
                    LinearLayer(f"{p}.v_proj", h, kv_out, i), LinearLayer(f"{p}.out_proj", q_out, h, i)]
        if self.family == "gpt2":
            return [LinearLayer(f"{p}.c_attn", h, q_out + 2 * kv_out, i), LinearLayer(f"{p}.c_proj", q_out, h, i)]
        raise ValueError(f"workload {self.model_type or self.family}: block {i} has no attention (its token mixer "
                         f"is an MLGRU); give every block the mixer mlgru")

    def mlgru_layers(self, i: int) -> list[LinearLayer]:
        """The MLGRU projections of block ``i``: hgrn_bit's own ``attn.{i,f,g,o}_proj``, otherwise the
        four hidden -> hidden ``mlgru.{f,c,g,o}_proj`` replacing the attention."""
        if self.family == "hgrn_bit":
            h, d, p = self.hidden, self.mixer_width, self.attention_name.format(i=i)
            return [LinearLayer(f"{p}.i_proj", h, d, i), LinearLayer(f"{p}.f_proj", h, d, i),
                    LinearLayer(f"{p}.g_proj", h, d, i), LinearLayer(f"{p}.o_proj", d, h, i)]
        p = f"{self.block_prefix}.{i}.mlgru"
        return [LinearLayer(f"{p}.{proj}", self.hidden, self.hidden, i) for proj in MLGRU_PROJ]

    def mixer_layers(self, i: int, mixer: str | None = None) -> list[LinearLayer]:
        """Block ``i``'s token-mixer projections for ``mixer`` (default: the model's own)."""
        mixer = mixer or self.token_mixer
        return self.mlgru_layers(i) if mixer == "mlgru" else self.attention_layers(i)

    def mlp_layers(self, i: int) -> list[LinearLayer]:
        """The channel-mixer projections of block ``i``."""
        h, f = self.hidden, self.intermediate
        if self.family in ("llama", "gemma"):
            p = f"model.layers.{i}.mlp"
            return [LinearLayer(f"{p}.gate_proj", h, f, i), LinearLayer(f"{p}.up_proj", h, f, i),
                    LinearLayer(f"{p}.down_proj", f, h, i)]
        if self.family == "hgrn_bit":
            p = f"model.layers.{i}.mlp"
            return [LinearLayer(f"{p}.gate_proj", h, 2 * f, i), LinearLayer(f"{p}.down_proj", f, h, i)]
        if self.family == "opt":
            p = f"model.decoder.layers.{i}"
            return [LinearLayer(f"{p}.fc1", h, f, i), LinearLayer(f"{p}.fc2", f, h, i)]
        p = f"transformer.h.{i}.mlp"
        return [LinearLayer(f"{p}.c_fc", h, f, i), LinearLayer(f"{p}.c_proj", f, h, i)]

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
        mlgru = set(mlgru_blocks) | self.native_mlgru_blocks()
        out: list[LinearLayer] = list(self.pre_block_layers())
        for i in range(self.num_layers):
            out += self.mlgru_layers(i) if i in mlgru else self.attention_layers(i)
            out += self.mlp_layers(i)
        out += self.post_block_layers()
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

        Llama/Gemma: f <- q_proj, c <- k_proj, g <- v_proj, o <- o_proj; OPT the same with o <- out_proj;
        GPT-2: f, c, g <- c_attn, o <- c_proj. (hgrn_bit's MLGRU projections are its own layers.)
        """
        if self.family == "hgrn_bit" or ".mlgru." not in name:
            raise ValueError(f"'{name}' is not a substituted MLGRU projection of a {self.family} workload")
        prefix, proj = name.rsplit(".mlgru.", 1)
        attn = prefix + (".attn" if self.family == "gpt2" else ".self_attn")
        if self.family == "gpt2":
            return f"{attn}.{'c_proj' if proj == 'o_proj' else 'c_attn'}"
        out = "out_proj" if self.family == "opt" else "o_proj"
        return f"{attn}.{dict(zip(MLGRU_PROJ, ('q_proj', 'k_proj', 'v_proj', out)))[proj]}"

    # ----------------------------------------------------------------- parameter counts
    def embedding_params(self) -> int:
        """Input embedding parameters: token table vocab*embed_width (+ learned positions for GPT-2/OPT)."""
        return self.vocab * self.embed_width + self.max_positions * self.hidden

    def embedding_row_values(self) -> int:
        """Embedding values read per decoded token (token row + position row for GPT-2/OPT)."""
        return self.embed_width + (self.hidden if self.max_positions else 0)

    def norm_params(self) -> int:
        """Norm parameters: RMSNorm weight (Llama, Gemma, HGRN-bit) or LayerNorm weight + bias (GPT-2, OPT);
        ``norms_per_block`` per block + the final norm; Gemma 3 q/k norms over head_dim; HGRN-bit's
        per-block MLGRU output norm (mixer width) and one RMSNorm over the input of every BitLinear."""
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
        """Bias parameters of the linear layers (Llama/Gemma attention_bias/mlp_bias, Qwen2 q/k/v, GPT-2 every
        Conv1D, OPT enable_bias)."""
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


def _llama(c: dict, model_type: str) -> Workload:
    hidden = _int(c, "hidden_size")
    heads = _int(c, "num_attention_heads")
    return Workload(
        family="llama",
        num_layers=_int(c, "num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=_int(c, "num_key_value_heads", default=heads),
        head_dim=_int(c, "head_dim", default=hidden // heads),
        intermediate=_int(c, "intermediate_size"),
        vocab=_int(c, "vocab_size"),
        # Llama/Mistral/Qwen2 configs default to untied embeddings
        tied_embeddings=_bool(c, "tie_word_embeddings", False),
        # Llama: attention_bias on q, k, v and o; Qwen2: always on q, k, v, never on o; Mistral: none
        qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
        o_bias=model_type == "llama" and bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        model_type=model_type,
    )


def _gemma(c: dict, model_type: str) -> Workload:
    heads = _int(c, "num_attention_heads")
    bias = bool(c.get("attention_bias", False))  # Gemma 1-3: attention_bias on q, k, v and o
    return Workload(
        family="gemma",
        num_layers=_int(c, "num_hidden_layers"),
        hidden=_int(c, "hidden_size"),
        heads=heads,
        kv_heads=_int(c, "num_key_value_heads", default=heads),
        head_dim=_int(c, "head_dim", default=256),  # the Gemma configs' default; heads*head_dim may differ from hidden
        intermediate=_int(c, "intermediate_size"),
        vocab=_int(c, "vocab_size"),
        tied_embeddings=_bool(c, "tie_word_embeddings", True),
        qkv_bias=bias,
        o_bias=bias,
        model_type=model_type,
        norms_per_block=2 if model_type == "gemma" else 4,  # Gemma 2/3 add pre/post feed-forward norms
        qk_norm=model_type == "gemma3_text",
    )


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
        raise ValueError("model config use_short_conv: true is not supported by hwcost (no short convolution "
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


_BUILDERS = {"llama": _llama, "gemma": _gemma, "gpt2": _gpt2, "opt": _opt, "hgrn_bit": _hgrn_bit}
