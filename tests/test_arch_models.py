"""dse.arch against real torch models of every Hugging Face family it lists.

Each family's tiny model is built locally with transformers from a config (random weights, no hub).
Checked: the names and shapes :mod:`dse.arch` derives from the config alone are the model's linear
modules (``nn.Linear``; GPT-2's ``Conv1D``); a plan with N:M, integer, ternary and calibrated choices and
an MLGRU block applies (the logits move, the MLGRU runs where the attention was) and restores the dense
model exactly; the MLGRU maps hidden -> hidden whatever the attention geometry.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dse.arch import Workload, check_plan  # noqa: E402
from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat  # noqa: E402
from evaluators.compress import PlanApplier, PlanApplyError  # noqa: E402
from evaluators.compress import mlgru as M  # noqa: E402
from evaluators.compress.cache import CompressionCache  # noqa: E402
from evaluators.compress.calibration import CalibrationSet  # noqa: E402
from evaluators.compress.modules import linear_modules, weight_of  # noqa: E402
from evaluators.settings import CompressionSpec  # noqa: E402

VOCAB = 128
COMMON = {"num_hidden_layers": 2, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
TINY = {
    # grouped KV heads (4 query heads over 2 KV heads), heads * head_dim == hidden
    "llama-gqa": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 1, "sliding_window": 8},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    # head_dim 24: heads * head_dim = 96 != hidden 64, q/k norms
    "qwen3": {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 24},
    "gemma": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 48},
    "gemma2": {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 48, "sliding_window": 8},
    # the Gemma-3 270M geometry shrunk: 4 heads x head_dim 32 = 128 != hidden 40, one KV head, sliding blocks
    "gemma3": {"model_type": "gemma3_text", "hidden_size": 40, "intermediate_size": 96, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 8, "num_hidden_layers": 3},
    # fused qkv_proj and gate_up_proj
    "phi3": {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    # Conv1D layers (weights stored [in, out]), fused c_attn
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64},
    "opt": {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
            "max_position_embeddings": 64, "word_embed_proj_dim": 64},
}


def build(name: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**COMMON, **TINY[name]}
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()
    return model, Workload.from_hf_config(cfg.to_dict())


def ids(rows: int = 2, length: int = 12, seed: int = 1):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits.float().clone()


def plan_for(workload: Workload) -> ModelPlan:
    """N:M + INT4 (GPTQ) on block 0's channel mixer, INT8 on its attention, ternary on lm_head; block 1 MLGRU
    (its projections inherit block 1's attention plan: 2:4 magnitude + INT4)."""
    mlp0 = workload.mlp_layers(0)
    attn0, attn1 = workload.attention_layers(0), workload.attention_layers(1)
    layers = [LayerPlan(mlp0[0].name, Sparsity(2, 4), WeightFormat("4", 16), "sparsegpt", "gptq"),
              LayerPlan(mlp0[-1].name, None, WeightFormat("3", 16, symmetric=False)),
              *(LayerPlan(x.name, None, WeightFormat("8", 32)) for x in attn0),
              *(LayerPlan(x.name, Sparsity(2, 4), WeightFormat("4", 16)) for x in attn1),
              LayerPlan("lm_head", None, WeightFormat("ternary"))]
    return ModelPlan(layers=tuple(layers), blocks=(BlockPlan(1, "mlgru"),))


@pytest.mark.parametrize("name", list(TINY))
def test_names_and_shapes_are_the_models_linear_modules(name):
    model, workload = build(name)
    ours = {x.name: (x.in_features, x.out_features) for x in workload.linear_layers()}
    theirs = {n: tuple(weight_of(m).shape[::-1]) for n, m in linear_modules(model).items()}
    assert ours == theirs
    assert workload.param_count() == sum(p.numel() for p in model.parameters())
    assert model.get_submodule(workload.block_prefix) is M.decoder_layers(model)
    assert model.get_submodule(workload.embedding_name) is model.get_input_embeddings()


@pytest.mark.parametrize("name", list(TINY))
def test_a_plan_with_an_mlgru_applies_and_restores(name, tmp_path):
    model, workload = build(name)
    x = ids()
    applier = PlanApplier(model, settings=CompressionSpec(distill_steps=3, mode="sequential"),
                          cache=CompressionCache("tiny-" + name, tmp_path),
                          calibration=CalibrationSet(ids(4, 16, seed=2)))
    dense = logits(model, x)  # the applier's dense model: every tensor at its 16-bit storage width
    plan = plan_for(workload)
    report = applier.apply(plan)
    mlgru = M.decoder_layers(model)[1].mlgru
    assert M.installed_blocks(model) == [1] and (mlgru.hidden, report.mixers[1]["source"]) == (workload.hidden, "computed")
    applied = {n: weight_of(m).detach().clone() for n, m in linear_modules(model).items()}
    assert set(applied) >= {x.name for x in workload.mlgru_layers(1)}  # the MLGRU's projections are model layers
    # every layer the plan implies holds its format: 2:4 rows keep 2 of every 4 weights, INT8 <= 256 levels
    kept = applied[workload.mlp_layers(0)[0].name].reshape(-1, 4).ne(0).sum(1)
    assert int(kept.max()) <= 2
    for layer in workload.mlgru_layers(1):  # inherited 2:4 from the attention counterpart
        assert int(applied[layer.name].reshape(-1, 4).ne(0).sum(1).max()) <= 2
    compressed = logits(model, x)
    assert torch.isfinite(compressed).all() and not torch.allclose(compressed, dense)
    applier.restore()
    assert M.installed_blocks(model) == []
    assert torch.equal(logits(model, x), dense)
    applier.apply(plan)  # from the cache: the same model again
    assert torch.equal(logits(model, x), compressed)


@pytest.mark.parametrize("name", ["gemma3", "qwen3", "llama-gqa"])
def test_mlgru_initialised_from_any_attention_geometry(name):
    """The MLGRU's linear path W_o W_c starts as the attention's value-output path O V (KV heads expanded)."""
    model, workload = build(name)
    attn = getattr(M.decoder_layers(model)[0], workload.arch.mixer)
    mixer = M.from_attention(attn, model.config, 0, workload.num_layers)
    v = attn.v_proj.weight.detach().reshape(workload.kv_heads, workload.head_dim, -1)
    v = v.repeat_interleave(workload.heads // workload.kv_heads, dim=0).reshape(workload.mixer_width, -1)
    path = attn.o_proj.weight.detach() @ v  # hidden x hidden
    assert mixer.c_proj.weight.shape == mixer.o_proj.weight.shape == (workload.hidden, workload.hidden)
    torch.testing.assert_close(mixer.o_proj.weight @ mixer.c_proj.weight, path, rtol=1e-4, atol=1e-5)


def test_plan_mismatches_are_one_line_and_name_the_field(tmp_path):
    model, workload = build("gemma3")
    applier = PlanApplier(model, cache=CompressionCache("tiny-gemma3", tmp_path))
    width = workload.mixer_width  # o_proj reads heads * head_dim = 128; its MLGRU replacement reads hidden 40
    o_proj = workload.attention_layers(0)[-1].name
    check_plan(ModelPlan((LayerPlan(o_proj, Sparsity(1, 32)),)), workload)  # 32 divides 128
    with pytest.raises(PlanApplyError) as err:  # ... but not the inheriting MLGRU o_proj's 40
        applier.apply(ModelPlan((LayerPlan(o_proj, Sparsity(1, 32)),), (BlockPlan(0, "mlgru"),)))
    assert width % 32 == 0 and str(err.value) == ("plan layer 'model.layers.0.mlgru.o_proj': sparsity: M=32 does "
                                                  "not divide in_features 40 of model.layers.0.mlgru.o_proj")


def test_bfloat16_model_applies_a_plan(tmp_path):
    model, workload = build("llama-gqa", torch.bfloat16)
    applier = PlanApplier(model, settings=CompressionSpec(distill_steps=2),
                          cache=CompressionCache("tiny-bf16", tmp_path), calibration=CalibrationSet(ids(4, 16, 2)))
    x = ids()
    dense = logits(model, x)
    applier.apply(plan_for(workload))
    assert next(model.parameters()).dtype == torch.bfloat16 and torch.isfinite(logits(model, x)).all()
    applier.restore()
    assert torch.equal(logits(model, x), dense)


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "phi3", "opt"])
def test_checkpoint_round_trip_on_other_families(name, tmp_path):
    """The packed checkpoint of a plan with an MLGRU block reloads to the evaluated model's logits (GPT-2's
    Conv1D layers, Gemma-3's heads x head_dim != hidden, Phi-3's fused projections, OPT's out_proj)."""
    from evaluators.checkpoint import load_checkpoint, save_applied

    model, workload = build(name)
    applier = PlanApplier(model, settings=CompressionSpec(distill_steps=3),
                          cache=CompressionCache("ckpt-" + name, tmp_path / "cache"),
                          calibration=CalibrationSet(ids(4, 16, seed=2)))
    save_applied(applier, plan_for(workload), tmp_path / "ckpt")
    x = ids()
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert M.installed_blocks(reloaded) == [1]
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=0, atol=1e-5)


def integer_plan(workload: Workload) -> ModelPlan:
    """plan_for without what no stock format holds: no MLGRU, an INT8 head instead of ternary."""
    plan = plan_for(workload)
    layers = tuple(LayerPlan("lm_head", None, WeightFormat("8", 32)) if lp.name == "lm_head" else lp
                   for lp in plan.layers)
    return ModelPlan(layers=layers)


@pytest.mark.parametrize("name", list(TINY))
def test_compressed_tensors_export_loads_in_plain_transformers(name, tmp_path):
    """Every family: the integer plan's compressed-tensors directory, loaded by a plain ``from_pretrained``, gives
    the evaluated logits (1e-4), or the export refuses in one line (GPT-2's Conv1D layers)."""
    from transformers import AutoModelForCausalLM

    from evaluators.hf_export import ExportFormatError, save_hf

    model, workload = build(name)
    applier = PlanApplier(model, settings=CompressionSpec(distill_steps=3),
                          cache=CompressionCache("ct-" + name, tmp_path / "cache"),
                          calibration=CalibrationSet(ids(4, 16, seed=2)))
    out = tmp_path / "ct"
    if name == "gpt2":
        with pytest.raises(ExportFormatError, match="Conv1D.*--format dse-packed"):
            save_hf(applier, integer_plan(workload), out)
        return
    save_hf(applier, integer_plan(workload), out)  # reloads and checks the logits itself
    x = ids()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    assert (logits(loaded, x) - logits(applier.model, x)).abs().max() <= 1e-4
