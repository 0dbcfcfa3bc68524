"""Exports stock loaders read (evaluators.hf_export): a plain ``transformers.AutoModelForCausalLM.from_pretrained``
of every exported directory reproduces the evaluated model's logits or raises; compressed-tensors' own config
objects accept the config; stored bytes match the cost model's ``weight_bytes``.

Models are random Llamas built here and saved as Hugging Face directories; the evaluated model is the
PlanApplier's, on the same directory, as a study's evaluation applies the plan.
"""

from __future__ import annotations

import json

import pytest
import torch

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from evaluators.checkpoint import CheckpointError, load_checkpoint, save_applied
from evaluators.compress import PlanApplier
from evaluators.compress.cache import CompressionCache, model_fingerprint
from evaluators.hf_export import ExportFormatError, plan_layout, save_hf
from evaluators.models import DEFAULT_MODEL, load_model, resolve_model_path
from evaluators.settings import CompressionSpec

SPEC = CompressionSpec(distill_steps=5, windows=2, seq_len=32)
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. ") * 3
"""Held-out text: not in the calibration set the applier draws."""


def attn(b, name):
    return f"model.layers.{b}.self_attn.{name}"


def mlp(b, name):
    return f"model.layers.{b}.mlp.{name}"


def build(path, tokenizer=True, **shape):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    defaults = dict(vocab_size=49152, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2,
                    rms_norm_eps=1e-5)
    config = LlamaConfig(**{**defaults, **shape})
    LlamaForCausalLM(config).eval().save_pretrained(path)
    if tokenizer:
        AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hf") / "tiny-llama")


def applier_for(path, tmp_path):
    model, tokenizer = load_model(str(path))
    cache = CompressionCache(model_fingerprint(model), root=tmp_path / "cache")
    return PlanApplier(model, tokenizer, SPEC, cache=cache)


def held_out(tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    return torch.stack([ids[:40], ids[9:49]])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def plain_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def mixed_plan():
    """INT8, INT4 at two group sizes (one asymmetric, one ragged: 64 inputs in groups of 48), 2:4 and 4:8 layers
    (one of them FP16, one GPTQ), an FP16 head (lm_head not named)."""
    int4 = WeightFormat("4", 32)
    return ModelPlan((
        LayerPlan(attn(0, "q_proj"), None, WeightFormat("8", 64)),
        LayerPlan(attn(0, "k_proj"), None, int4),
        LayerPlan(attn(0, "v_proj"), Sparsity(2, 4), int4),
        LayerPlan(attn(0, "o_proj"), Sparsity(4, 8), WeightFormat("4", 16)),
        LayerPlan(mlp(0, "gate_proj"), Sparsity(2, 4), WeightFormat("16")),
        LayerPlan(mlp(0, "up_proj"), None, WeightFormat("4", 32, symmetric=False)),
        LayerPlan(mlp(0, "down_proj"), None, WeightFormat("4", 64), quant="gptq"),
        LayerPlan(attn(1, "q_proj"), None, WeightFormat("4", 48)),
        LayerPlan(mlp(1, "down_proj"), Sparsity(4, 8), WeightFormat("8", 64)),
        LayerPlan(mlp(2, "up_proj"), None, WeightFormat("3", 64)),
    ))


def ternary_plan():
    layers = [LayerPlan(attn(b, n), Sparsity(2, 4) if n == "o_proj" else None, WeightFormat("ternary"))
              for b in range(3) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    layers += [LayerPlan(mlp(b, n), None, WeightFormat("ternary")) for b in range(3) for n in ("gate_proj", "up_proj")]
    return ModelPlan(tuple(layers))  # down_proj and lm_head stay FP16


def test_mixed_plan_loads_in_plain_transformers(tiny, tmp_path):
    applier = applier_for(tiny, tmp_path)
    out = tmp_path / "ct"
    save_hf(applier, mixed_plan(), out, verify_load=False)
    ids = held_out(applier.tokenizer)
    want = logits(applier.model, ids)
    dense, _ = load_model(str(tiny))
    assert (want - logits(dense, ids)).abs().max() > 1e-2, "the plan changed the model"
    loaded = plain_load(out)
    assert (logits(loaded, ids) - want).abs().max() <= 1e-4

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    groups = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"].get("group_size"),
               g["weights"]["symmetric"], g["format"]): sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert groups[(4, "group", 32, True, "pack-quantized")] == sorted([attn(0, "k_proj"), attn(0, "v_proj")])
    assert groups[(4, "group", 32, False, "int-quantized")] == [mlp(0, "up_proj")]
    assert groups[(8, "group", 64, True, "pack-quantized")] == [mlp(1, "down_proj")]  # 192 inputs: 3 groups
    assert groups[(8, "channel", None, True, "pack-quantized")] == [attn(0, "q_proj")]  # 64 inputs: one group
    assert (4, "block", None, True, "pack-quantized") in groups  # 64 inputs in groups of 48
    assert "lm_head" in qc["ignore"] and mlp(0, "gate_proj") in qc["ignore"]
    assert config["dse_export"]["sparsity"] == {attn(0, "v_proj"): "2:4", attn(0, "o_proj"): "4:8",
                                                mlp(0, "gate_proj"): "2:4", mlp(1, "down_proj"): "4:8"}
    # compressed-tensors' own schema reads the config back
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in ("version", "sparsity_config")})
    # the N:M pattern survives: in every group of M consecutive inputs at most N weights are nonzero
    for name, n, m in ((attn(0, "v_proj"), 2, 4), (attn(0, "o_proj"), 4, 8), (mlp(1, "down_proj"), 4, 8)):
        w = loaded.get_submodule(name).weight.detach()
        assert int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) <= n


def test_ternary_plan_loads_as_bitnet(tiny, tmp_path):
    applier = applier_for(tiny, tmp_path)
    out = tmp_path / "bitnet"
    assert plan_layout(ternary_plan()) == "bitnet"
    save_hf(applier, ternary_plan(), out, verify_load=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert set(config["quantization_config"]["modules_to_not_convert"]) == {"lm_head"} | {
        mlp(b, "down_proj") for b in range(3)}
    ids = held_out(applier.tokenizer)
    loaded = plain_load(out)
    assert type(loaded.get_submodule(attn(0, "q_proj"))).__name__ == "BitLinear"
    assert (logits(loaded, ids) - logits(applier.model, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("plan, reason", [
    (ModelPlan((LayerPlan(attn(0, "q_proj"), None, WeightFormat("4", 32)),), blocks=(BlockPlan(1, "mlgru"),)),
     "MLGRU"),
    (ModelPlan((LayerPlan(attn(0, "q_proj"), None, WeightFormat("4", 32)),
                LayerPlan(attn(0, "k_proj"), None, WeightFormat("ternary")))), "mixes ternary"),
    (ModelPlan((LayerPlan(attn(0, "q_proj"), None, WeightFormat("ternary"), quant="refit"),)), "per-channel"),
])
def test_plans_no_stock_format_holds_are_refused_in_one_line(plan, reason):
    with pytest.raises(ExportFormatError) as err:
        plan_layout(plan)
    message = str(err.value)
    assert reason in message and "--format dse-packed" in message and "\n" not in message


def test_dse_packed_refuses_plain_from_pretrained_and_loads_with_ours(tiny, tmp_path):
    applier = applier_for(tiny, tmp_path)
    plan = ModelPlan(mixed_plan().layers, blocks=(BlockPlan(2, "mlgru"),))
    out = tmp_path / "packed"
    save_applied(applier, plan, out)
    with pytest.raises(OSError):
        plain_load(out)  # no model.safetensors: an error, never random layers
    ids = held_out(applier.tokenizer)
    model, _ = load_checkpoint(out)
    assert torch.equal(logits(model, ids), logits(applier.model, ids))


def test_every_format_reproduces_or_raises(tiny, tmp_path):
    """A plain from_pretrained of each exported directory: the evaluated logits within 1e-4, or an exception."""
    applier = applier_for(tiny, tmp_path)
    ids = held_out(applier.tokenizer)
    for i, (plan, writer) in enumerate([(mixed_plan(), save_hf), (ternary_plan(), save_hf), (mixed_plan(), save_applied),
                                        (ternary_plan(), save_applied)]):
        out = tmp_path / f"out{i}"
        writer(applier, plan, out, **({"verify_load": False} if writer is save_hf else {}))
        want = logits(applier.model, ids)
        try:
            loaded = plain_load(out)
        except (OSError, ValueError, RuntimeError):
            continue
        assert (logits(loaded, ids) - want).abs().max() <= 1e-4, f"{writer.__name__} {i} loads silently wrong"


def test_verify_refuses_a_directory_that_reloads_differently(tiny, tmp_path):
    applier = applier_for(tiny, tmp_path)
    out = tmp_path / "ct"
    save_hf(applier, mixed_plan(), out)  # verified: reloads equal
    from evaluators.hf_export import verify

    with torch.no_grad():
        applier.model.get_submodule(attn(0, "k_proj")).weight.mul_(1.01)  # the "evaluated" model drifts
    with pytest.raises(CheckpointError, match="differ from the evaluated"):
        verify(out, applier.model)


def test_stock_directory_checks_its_sums_in_our_loader(tiny, tmp_path):
    applier = applier_for(tiny, tmp_path)
    out = tmp_path / "ct"
    save_hf(applier, mixed_plan(), out, verify_load=False)
    model, _ = load_checkpoint(out)
    ids = held_out(applier.tokenizer)
    assert (logits(model, ids) - logits(applier.model, ids)).abs().max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    name = next(iter(config["dse_export"]["tensor_sha256"]))
    config["dse_export"]["tensor_sha256"][name] = "0" * 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(out)


# ---------------------------------------------------------------------------------------------- bytes

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Linear layers dominate its bytes (vocab 512, hidden 256, untied head)."""
    return build(tmp_path_factory.mktemp("hf") / "wide-llama", vocab_size=512, hidden_size=256,
                 intermediate_size=1024, num_hidden_layers=2, tie_word_embeddings=False)


def every_linear(fmt, sparsity=None, head=None):
    names = [attn(b, n) for b in range(2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [mlp(b, n) for b in range(2) for n in ("gate_proj", "up_proj", "down_proj")]
    layers = [LayerPlan(n, sparsity, fmt) for n in names]
    return ModelPlan(tuple(layers + ([LayerPlan("lm_head", None, head)] if head else [])))


def cost_model_weight_bytes(path, plan) -> int:
    from hwcost.accelerator import Accelerator
    from hwcost.model import estimate
    from dse.arch import Workload

    return estimate(plan, Workload.from_hf_config(path / "config.json"), Accelerator(device="alveo-u280")).weight_bytes_total


@pytest.mark.parametrize("name, plan, writer", [
    ("uniform int4/g128", every_linear(WeightFormat("4", 128)), save_hf),
    ("mixed int8/g64 + int3/g32 head", every_linear(WeightFormat("8", 64), head=WeightFormat("3", 32)), save_hf),
    ("ternary", every_linear(WeightFormat("ternary")), save_hf),
    ("2:4 int4/g64 (dse-packed)", every_linear(WeightFormat("4", 64), Sparsity(2, 4)), save_applied),
])
def test_stored_bytes_match_the_cost_model(wide, tmp_path, name, plan, writer):
    """The weights file holds the hardware report's weight_bytes plus headers (within 5%)."""
    applier = applier_for(wide, tmp_path)
    out = tmp_path / "out"
    writer(applier, plan, out, **({"verify_load": False} if writer is save_hf else {}))
    stored = next(p for p in out.glob("*.safetensors")).stat().st_size
    want = cost_model_weight_bytes(wide, plan)
    assert abs(stored / want - 1) <= 0.05, f"{name}: file {stored} B, cost model {want} B"
