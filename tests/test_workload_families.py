"""Workload families against an independent reference.

For every family in transformers, the same hand-written config is built as a real
torch model on the meta device (no weights, no download) and its parameter count
and linear layers (names, in/out features) are compared with what hwcost computes
from the config alone. HGRN-bit (MatMul-free LM) is not in transformers: it is
checked against hand arithmetic from the shapes of the reference code
(github.com/ridgerchu/matmulfreellm, mmfreelm/models/hgrn_bit and mmfreelm/layers/hgrn_bit.py).

torch and transformers are used here only, never by hwcost.
"""

from __future__ import annotations

import pytest

from hwcost import Workload
from dse.arch import BUILTIN_CONFIGS, FAMILIES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    # HuggingFaceTB/SmolLM2-135M: grouped KV heads (9 heads, 3 KV heads), tied embeddings
    "smollm2-135m": BUILTIN_CONFIGS["smollm2-135m"],
    # Llama with biases on attention and MLP, untied, GQA 8 -> 2
    "llama-bias": {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 256, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "intermediate_size": 640, "vocab_size": 1000,
                   "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
    # Mistral-7B shape, fewer layers
    "mistral": {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 4096, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                "tie_word_embeddings": False},
    # Qwen2-0.5B: q/k/v biases, tied, GQA 14 -> 2
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
              "tie_word_embeddings": True},
    # GPT-2 small
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024},
    # facebook/opt-125m
    "opt-125m": {"model_type": "opt", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                 "ffn_dim": 3072, "vocab_size": 50272, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 768, "do_layer_norm_before": True, "enable_bias": True},
    # facebook/opt-350m: word_embed_proj_dim 512 != hidden 1024 (project_in/out), post-norm (no final norm)
    "opt-350m": {"model_type": "opt", "num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                 "ffn_dim": 4096, "vocab_size": 50272, "max_position_embeddings": 2048,
                 "word_embed_proj_dim": 512, "do_layer_norm_before": False, "enable_bias": True},
    # google/gemma-2b: head_dim 256 given explicitly, multi-query (1 KV head), tied
    "gemma-2b": {"model_type": "gemma", "num_hidden_layers": 18, "hidden_size": 2048, "num_attention_heads": 8,
                 "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 16384, "vocab_size": 256000},
    # google/gemma-7b shape with 2 layers: heads * head_dim = 4096 != hidden 3072
    "gemma-7b-2l": {"model_type": "gemma", "num_hidden_layers": 2, "hidden_size": 3072,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
                    "intermediate_size": 24576, "vocab_size": 256000},
    # google/gemma-2-2b shape with 2 layers: four norms per block
    "gemma2-2l": {"model_type": "gemma2", "num_hidden_layers": 2, "hidden_size": 2304, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000},
    # google/gemma-3-1b shape with 2 layers: four norms per block and q/k norms
    "gemma3-2l": {"model_type": "gemma3_text", "num_hidden_layers": 2, "hidden_size": 1152,
                  "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                  "intermediate_size": 6912, "vocab_size": 262144},
    # Qwen/Qwen3-0.6B shape with 2 layers: head_dim 128 given explicitly (16 x 128 = 2048 != hidden 1024), q/k norms
    "qwen3-2l": {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 1024, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936,
                 "tie_word_embeddings": True},
    # Qwen3 with sliding windows on blocks >= max_window_layers, and attention biases on q, k, v, o
    "qwen3-sliding": {"model_type": "qwen3", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 512, "vocab_size": 1000,
                      "attention_bias": True, "use_sliding_window": True, "sliding_window": 128,
                      "max_window_layers": 2},
    # microsoft/Phi-3-mini-4k-instruct shape with 2 layers: fused qkv_proj and gate_up_proj
    "phi3-mini-2l": {"model_type": "phi3", "num_hidden_layers": 2, "hidden_size": 3072, "num_attention_heads": 32,
                     "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 32064,
                     "sliding_window": 2047},
    # Phi-3 with grouped KV heads (Phi-3-medium style, 40 heads / 10 KV heads), shrunk
    "phi3-gqa": {"model_type": "phi3", "num_hidden_layers": 2, "hidden_size": 320, "num_attention_heads": 10,
                 "num_key_value_heads": 2, "intermediate_size": 640, "vocab_size": 32064},
    # google/gemma-3-270m shape: hidden 640, 4 heads x head_dim 256 (1024 != 640), 1 KV head, vocab 262,144
    "gemma3-270m": {"model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                    "intermediate_size": 2048, "vocab_size": 262144, "sliding_window": 512},
}

# Published / model-card parameter counts of the real models among CONFIGS (torch's count)
PUBLISHED = {"smollm2-135m": 134_515_008, "gpt2": 124_439_808, "opt-125m": 125_239_296,
             "opt-350m": 331_196_416, "qwen2": 494_032_768, "gemma-2b": 2_506_172_416}


def reference(config: dict):
    """(parameter count, {linear name: (in, out)}) of the transformers model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    count = sum(p.numel() for p in model.parameters())  # a tied parameter is one Parameter, counted once
    linears = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2: weight is (in, out)
            linears[name] = tuple(module.weight.shape)
    return count, linears


@pytest.fixture(scope="module")
def references() -> dict:
    return {name: reference(config) for name, config in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_transformers(name, references):
    count, _ = references[name]
    workload = Workload.from_hf_config(CONFIGS[name])
    print(f"\n{name}: hwcost {workload.param_count():,} vs transformers {count:,}")
    assert workload.param_count() == count
    if name in PUBLISHED:
        assert count == PUBLISHED[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_layers_match_transformers(name, references):
    _, linears = references[name]
    workload = Workload.from_hf_config(CONFIGS[name])
    ours = {layer.name: (layer.in_features, layer.out_features) for layer in workload.linear_layers()}
    assert ours == linears
    for layer in workload.linear_layers():  # the block index is the one in the module path
        if layer.block is not None:
            assert f".{layer.block}." in layer.name
    # every family's attention and MLP layers are what estimate costs per block
    assert workload.linear_layers()[-1].name == "lm_head"


def test_every_family_is_covered():
    covered = {Workload.from_hf_config(c).family for c in CONFIGS.values()} | {"hgrn_bit"}
    assert covered == set(FAMILIES)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sliding_windows_match_transformers_configs(name):
    """Which blocks slide, and over how many tokens, as transformers' config classes derive it."""
    from transformers import AutoConfig

    fields = dict(CONFIGS[name])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    window = getattr(cfg, "sliding_window", None) or 0
    types = getattr(cfg, "layer_types", None)
    expected = ([i for i, t in enumerate(types) if t == "sliding_attention"] if types is not None
                else list(range(cfg.num_hidden_layers)) if window else [])
    workload = Workload.from_hf_config(CONFIGS[name])
    assert list(workload.sliding_blocks) == (expected if window else [])
    assert workload.sliding_window == (window if expected else 0)


def test_family_specifics():
    opt = Workload.from_hf_config(CONFIGS["opt-350m"])
    names = [layer.name for layer in opt.linear_layers()]
    assert names[0] == "model.decoder.project_in" and names[-2:] == ["model.decoder.project_out", "lm_head"]
    assert opt.lm_head()[1:3] == (512, 50272) and opt.embedding_row_values() == 512 + 1024
    assert opt.mlgru_counterpart("model.decoder.layers.3.mlgru.o_proj") == "model.decoder.layers.3.self_attn.out_proj"
    gemma = Workload.from_hf_config(CONFIGS["gemma-7b-2l"])
    assert gemma.attention_layers(0)[0][1:3] == (3072, 4096) and gemma.attention_layers(0)[3][1:3] == (4096, 3072)
    assert gemma.tied_embeddings and gemma.kv_bytes_per_token() == 2 * 16 * 256 * 2
    qwen = Workload.from_hf_config(CONFIGS["qwen2"])
    assert qwen.attention_layers(0)[1][1:3] == (896, 128)  # 2 KV heads x head_dim 64
    assert qwen.qkv_bias and not qwen.o_bias
    phi = Workload.from_hf_config(CONFIGS["phi3-gqa"])
    assert [tuple(x)[:3] for x in phi.attention_layers(1)] == [
        ("model.layers.1.self_attn.qkv_proj", 320, (10 + 2 * 2) * 32), ("model.layers.1.self_attn.o_proj", 320, 320)]
    assert phi.mlgru_counterpart("model.layers.1.mlgru.c_proj") == "model.layers.1.self_attn.qkv_proj"
    assert phi.mlp_kind == "glu" and opt.mlp_kind == "mlp"
    gemma3 = Workload.from_hf_config(CONFIGS["gemma3-270m"])
    assert gemma3.mixer_width == 1024 != gemma3.hidden  # the MLGRU still maps hidden -> hidden
    assert all(x[1:3] == (640, 640) for x in gemma3.mlgru_layers(16))
    assert gemma3.mlgru_counterpart("model.layers.16.mlgru.o_proj") == "model.layers.16.self_attn.o_proj"


# ------------------------------------------------------------------ HGRN-bit (MatMul-free LM)
def hgrn_bit_reference(hidden: int, layers: int, intermediate: int, vocab: int, expand: int = 1) -> int:
    """Parameters of HGRNBitForCausalLM from the reference code's module shapes (no short conv, lower bounds).

    HGRNBitModel: embeddings (vocab x hidden), lower_bounds (layers x hidden), final RMSNorm (hidden).
    HGRNBitBlock: attn_norm, mlp_norm (hidden each);
      HGRNBitAttention: i_proj, f_proj, g_proj BitLinear(hidden, d), o_proj BitLinear(d, hidden),
                        g_norm FusedRMSNormSwishGate(d), d = hidden * expand_ratio;
      HGRNBitMLP: gate_proj BitLinear(hidden, 2 * intermediate), down_proj BitLinear(intermediate, hidden).
    lm_head: BitLinear(hidden, vocab), untied. Every BitLinear (bias=False) owns RMSNorm(in_features).
    """
    d = hidden * expand
    bitlinear = {  # (in, out) of each BitLinear of one block
        "i_proj": (hidden, d), "f_proj": (hidden, d), "g_proj": (hidden, d), "o_proj": (d, hidden),
        "gate_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden),
    }
    per_block = sum(i * o + i for i, o in bitlinear.values()) + 2 * hidden + d
    return vocab * hidden + layers * hidden + layers * per_block + hidden + (hidden * vocab + hidden)


def test_hgrn_bit_1p3b_shape_and_count():
    w = Workload.resolve("mmfreelm-1.3b")
    assert (w.family, w.num_layers, w.hidden, w.intermediate, w.vocab) == ("hgrn_bit", 24, 2048, 5632, 32000)
    expected = hgrn_bit_reference(2048, 24, 5632, 32000)
    print(f"\nMMfreeLM-1.3B (hgrn_bit): hwcost {w.param_count():,} vs reference-code arithmetic {expected:,} "
          f"(published as 1.3B)")
    assert w.param_count() == expected == 1_364_779_008
    assert 1.3e9 <= w.param_count() < 1.4e9
    # without the per-BitLinear norms, the lower bounds and the norms: linear + embedding weights
    assert w.linear_params() + w.vocab * w.hidden == 24 * (4 * 2048**2 + 3 * 2048 * 5632) + 2 * 32000 * 2048


def test_hgrn_bit_layers_and_mixer():
    w = Workload.from_hf_config({"model_type": "hgrn_bit", "hidden_size": 512, "num_hidden_layers": 2,
                                 "vocab_size": 1000, "num_heads": 4, "expand_ratio": 2, "hidden_ratio": 4})
    assert w.intermediate == 256 * -(-int(512 * 4 * 2 / 3) // 256) == 1536  # HGRNBitMLP rounding
    assert [tuple(x) for x in w.linear_layers()[:6]] == [
        ("model.layers.0.attn.i_proj", 512, 1024, 0), ("model.layers.0.attn.f_proj", 512, 1024, 0),
        ("model.layers.0.attn.g_proj", 512, 1024, 0), ("model.layers.0.attn.o_proj", 1024, 512, 0),
        ("model.layers.0.mlp.gate_proj", 512, 2 * 1536, 0), ("model.layers.0.mlp.down_proj", 1536, 512, 0)]
    assert w.param_count() == hgrn_bit_reference(512, 2, 1536, 1000, expand=2)
    assert w.token_mixer == "mlgru" and not w.has_kv_cache and w.kv_bytes_per_token() == 0
    assert w.native_mlgru_blocks() == {0, 1} and w.embedding_name == "model.embeddings"
    with pytest.raises(ValueError, match="has no attention"):
        w.attention_layers(0)
    with pytest.raises(ValueError, match="use_short_conv"):
        Workload.from_hf_config({"model_type": "hgrn_bit", "use_short_conv": True})


# ------------------------------------------------------------------ errors and names
def test_unknown_model_type_lists_families():
    with pytest.raises(ValueError) as err:
        Workload.from_hf_config({"model_type": "mamba"})
    message = str(err.value)
    assert "\n" not in message and message.startswith("model_type 'mamba' is not supported")
    assert all(family in message for family in FAMILIES)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
      "vocab_size": 100}, "model config has no 'num_hidden_layers'"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": "big", "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 100}, "model config hidden_size: 'big' is not a positive integer"),
    ({"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "vocab_size": 100}, "model config has no 'ffn_dim'"),
])
def test_bad_config_fields(config, message):
    with pytest.raises(ValueError, match=message):
        Workload.from_hf_config(config)


def test_builtin_names_and_files(tmp_path):
    assert Workload.resolve("smollm2-135m").param_count() == 134_515_008
    assert Workload.resolve("llama2-7b").param_count() == 6_738_415_616
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Workload.resolve(tmp_path)
    with pytest.raises(ValueError, match="built-in names: smollm2-135m"):
        Workload.resolve("no-such-model")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cost_model_costs_the_mlgru_shapes_of_every_family(name):
    """A block whose attention an MLGRU replaces is costed on four hidden x hidden projections (whatever the
    attention's heads x head_dim), the other blocks on their attention projections."""
    from dse.plan import BlockPlan, ModelPlan
    from hwcost import Accelerator, estimate

    workload = Workload.from_hf_config(CONFIGS[name])
    plan = ModelPlan(blocks=(BlockPlan(0, "mlgru"),))
    rows = {row.name: row for row in estimate(plan, workload, Accelerator("alveo-u280")).layers}
    for layer in workload.mlgru_layers(0):
        assert rows[layer.name].macs == workload.hidden * workload.hidden
    for layer in workload.attention_layers(1):
        assert rows[layer.name].macs == layer.in_features * layer.out_features
    assert not any(layer.name in rows for layer in workload.attention_layers(0))
