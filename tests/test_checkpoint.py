"""Exported compressed checkpoints (evaluators.checkpoint): packed storage, and a reload whose logits equal
the evaluated (PlanApplier's) model's.

The fast tests use a tiny random Llama saved as a Hugging Face directory with the default model's tokenizer
(so calibration reads real text); the slow ones use SmolLM2-135M itself. Every compression cache lives under
``tmp_path`` (the converted default model stays where :mod:`evaluators.models` keeps it).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from evaluators.settings import CompressionSpec
from evaluators.checkpoint import (FORMAT_VERSION, WEIGHTS, CheckpointError, check_sums, load_checkpoint, pack_codes,
                                   pack_mask, read_manifest, unpack_codes, unpack_mask, write_checkpoint)
from evaluators.compress import PlanApplier
from evaluators.compress.cache import CompressionCache, model_fingerprint
from evaluators.compress.ternary import BitLinearForward
from evaluators.models import DEFAULT_MODEL, load_model, resolve_model_path

SPEC = CompressionSpec(distill_steps=20, windows=2, seq_len=64)


# ---------------------------------------------------------------------------------------------- bit streams

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference stream built bit by bit with numpy: each code's low ``bits`` bits, least significant first."""
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 64, 1001])
def test_pack_codes_is_the_dense_little_endian_stream(bits, count):
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    stream = pack_codes(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == math.ceil(count * bits / 8)
    assert torch.equal(stream, pack_bits(codes, bits))
    assert torch.equal(unpack_codes(stream, bits, count), codes)


def test_pack_codes_hand_worked_and_mask():
    # 3-bit codes 5, 2, 7: bits 101 | 010 | 111 from the least significant end: 0b11_010_101, 0b0000000_1
    assert pack_codes(torch.tensor([5, 2, 7]), 3).tolist() == [0b11010101, 0b1]
    mask = torch.tensor([True, False, False, True, True, True, False, False, True])
    assert pack_mask(mask).tolist() == [0b00111001, 0b1]
    assert torch.equal(unpack_mask(pack_mask(mask), 9), mask)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([8]), 3)


# ---------------------------------------------------------------------------------------------- round trips

def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.clone()


def windows(tokenizer, n=3, length=48):
    text = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do "
            "shake the darling buds of May, and summer's lease hath all too short a date. ") * 4
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * 7: i * 7 + length] for i in range(n)])


def export_and_reload(name, plan, tmp_path):
    """Apply ``plan`` on one model (the evaluation), write the checkpoint with write_checkpoint (another model
    object, the same tmp cache), reload it; returns (evaluated model, reloaded model, tokenizer, out dir)."""
    model, tokenizer = load_model(name)
    cache_root = tmp_path / "cache"
    fingerprint = model_fingerprint(model)
    applier = PlanApplier(model, tokenizer, SPEC, cache=CompressionCache(fingerprint, cache_root))
    applier.apply(plan)
    out = tmp_path / "ckpt"
    files = write_checkpoint(name, plan, SPEC, out, cache=CompressionCache(fingerprint, cache_root),
                             format="dse-packed")
    names = {f.name for f in files}
    assert {WEIGHTS, "config.json", "checkpoint.json", "tokenizer.json"} <= names
    assert all(f.parent == out and f.exists() for f in files)
    reloaded, tok2 = load_checkpoint(out)
    assert not reloaded.training and tok2 is not None
    assert tok2("summer's day").input_ids == tokenizer("summer's day").input_ids
    return applier.model, reloaded, tokenizer, out


def check_packed(out, plan_layers):
    """Every compressed layer is packed (no dense weight), with the documented byte counts."""
    manifest = read_manifest(out)
    records = {r["name"]: r for r in manifest["layers"]}
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
        for name, record in records.items():
            rows, cols = record["shape"]
            assert f"{name}.weight" not in keys
            assert json.loads(meta[f"layer:{name}"]) == record
            if record["format"] == "16":
                assert f"{name}.qweight" not in keys and f"{name}.scales" not in keys
                assert handle.get_tensor(f"{name}.values").dtype == torch.float16  # the base model's FP16 values
            else:
                q = handle.get_tensor(f"{name}.qweight")
                # codes of the kept weights only: all of them, or the mask's 1 bits for an N:M layer
                kept = rows * cols if record["sparsity"] == "dense" else int(
                    unpack_mask(handle.get_tensor(f"{name}.nm_mask"), rows * cols).sum())
                assert q.dtype == torch.uint8 and q.shape == (math.ceil(kept * record["bits"] / 8),)
                assert record["bits"] == (2 if record["format"] == "ternary" else int(record["format"]))
                scales = handle.get_tensor(f"{name}.scales")
                assert scales.dtype == torch.float16
                if record["format"] != "ternary":
                    assert scales.shape == (rows, math.ceil(cols / record["scale_group"]))
                else:  # absmean per tensor, or refit per output channel
                    assert scales.shape == ((rows, 1) if record["quant"] == "refit" else (1, 1))
                assert (f"{name}.zeros" in keys) == (not record["symmetric"])
                if not record["symmetric"]:
                    assert handle.get_tensor(f"{name}.zeros").dtype == torch.uint8
            if record["sparsity"] != "dense":
                mask = handle.get_tensor(f"{name}.nm_mask")
                assert mask.dtype == torch.uint8 and mask.shape == (math.ceil(rows * cols / 8),)
                n, m = (int(x) for x in record["sparsity"].split(":"))
                kept = unpack_mask(mask, rows * cols).reshape(rows, cols // m, m).sum(-1)
                assert (kept <= n).all()
                if record["format"] == "16":
                    assert handle.get_tensor(f"{name}.values").numel() == int(kept.sum())
            else:
                assert f"{name}.nm_mask" not in keys
    mixers = {m["block"] for m in manifest["mixers"]}
    for lp in plan_layers:
        if any(lp.name.startswith(f"model.layers.{b}.self_attn.") for b in mixers):
            assert lp.name not in records  # the attention the MLGRU replaced (its plan passed to the MLGRU)
            continue
        r = records[lp.name]
        assert (r["format"], r["group_size"], r["symmetric"], r["prune"], r["quant"]) == \
            (lp.fmt.name, lp.fmt.group_size, lp.fmt.symmetric, lp.prune, lp.quant)
        assert r["sparsity"] == ("dense" if lp.sparsity is None else str(lp.sparsity))
        assert r["act_bits"] == (8 if lp.fmt.is_ternary else None)
    return manifest


def mixed_plan(g, mlgru_block):
    """The mixed plan of the brief on blocks 0..2 and an MLGRU block, with quantisation groups of ``g`` inputs."""
    def attn(block, proj):
        return f"model.layers.{block}.self_attn.{proj}"

    def mlp(block, proj):
        return f"model.layers.{block}.mlp.{proj}"

    int4 = WeightFormat("4", g)
    layers = (
        LayerPlan(attn(0, "q_proj"), Sparsity(2, 4), int4, "sparsegpt", "gptq"),
        LayerPlan(attn(0, "k_proj"), Sparsity(2, 4), int4, "sparsegpt", "gptq"),
        LayerPlan(mlp(0, "gate_proj"), Sparsity(2, 4), int4, "sparsegpt", "gptq"),
        LayerPlan(mlp(0, "up_proj"), None, WeightFormat("3", g, symmetric=False), "magnitude", "rtn"),
        LayerPlan(mlp(0, "down_proj"), None, WeightFormat("3", g, symmetric=False), "magnitude", "rtn"),
        LayerPlan(attn(1, "o_proj"), None, WeightFormat("ternary"), quant="refit"),
        LayerPlan(mlp(1, "down_proj"), None, WeightFormat("ternary"), quant="rtn"),
        LayerPlan(mlp(2, "up_proj"), Sparsity(2, 4), WeightFormat("16"), "wanda"),
        LayerPlan(attn(2, "v_proj"), Sparsity(4, 8), WeightFormat("5", g // 2, symmetric=False), "magnitude", "gptq"),
        LayerPlan(mlp(2, "gate_proj"), None, WeightFormat("8", g)),
        # the MLGRU block: f/c/g named ternary, o_proj inherits self_attn.o_proj's (ternary refit)
        LayerPlan(f"model.layers.{mlgru_block}.mlgru.f_proj", None, WeightFormat("ternary"), quant="refit"),
        LayerPlan(f"model.layers.{mlgru_block}.mlgru.c_proj", None, WeightFormat("ternary")),
        LayerPlan(f"model.layers.{mlgru_block}.mlgru.g_proj", None, WeightFormat("ternary")),
        LayerPlan(attn(mlgru_block, "o_proj"), None, WeightFormat("ternary"), quant="refit"),
        LayerPlan("lm_head", None, WeightFormat("8", 2 * g)),
    )
    return ModelPlan(layers, blocks=(BlockPlan(mlgru_block, "mlgru"),))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 4-block Llama (hidden 64) with the default model's tokenizer, as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = resolve_model_path(DEFAULT_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2, rms_norm_eps=1e-5)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def test_tiny_mixed_plan_round_trip(tiny_model_dir, tmp_path):
    plan = mixed_plan(32, mlgru_block=3)
    evaluated, reloaded, tokenizer, out = export_and_reload(str(tiny_model_dir), plan, tmp_path)
    ids = windows(tokenizer)
    want = logits(evaluated, ids)
    dense, _ = load_model(str(tiny_model_dir))
    assert (want - logits(dense, ids)).abs().max() > 1e-3, "the plan changed the model"
    diff = float((logits(reloaded, ids) - want).abs().max())
    assert diff <= 1e-5, diff
    manifest = check_packed(out, plan.layers)
    records = {r["name"]: r for r in manifest["layers"]}
    assert manifest["mixers"] == [{"block": 3, "type": "mlgru", "hidden": 64, "lower_bound": pytest.approx(3 / 4),
                                   "eps": pytest.approx(1e-5)}]
    assert records["model.layers.3.mlgru.o_proj"]["inherited_from"] == "model.layers.3.self_attn.o_proj"
    assert "model.layers.3.self_attn.o_proj" not in records  # replaced by the MLGRU
    assert manifest["plan"] == plan.to_dict() and manifest["compression"]["distill_steps"] == 20
    assert not manifest["tied_embeddings"]  # lm_head compressed: untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"model.layers.3.mlgru.g_norm.weight", "model.layers.3.mlgru.lower_bound",
            "model.embed_tokens.weight"} <= keys
    assert not any(k.startswith("model.layers.3.self_attn.") for k in keys)
    # ternary layers (and only they) quantise their inputs to 8 bits per token in the reloaded model
    hooked = {n for n, m in reloaded.named_modules() if isinstance(m.__dict__.get("forward"), BitLinearForward)}
    assert hooked == {n for n, r in records.items() if r["format"] == "ternary"}


def test_tiny_uncompressed_lm_head_stays_tied(tiny_model_dir, tmp_path):
    plan = ModelPlan((LayerPlan("model.layers.0.mlp.up_proj", None, WeightFormat("4", 64)),
                      LayerPlan("model.layers.2.self_attn.q_proj", Sparsity(1, 4), WeightFormat("2", 16))))
    evaluated, reloaded, tokenizer, out = export_and_reload(str(tiny_model_dir), plan, tmp_path)
    ids = windows(tokenizer)
    assert float((logits(reloaded, ids) - logits(evaluated, ids)).abs().max()) <= 1e-5
    manifest = check_packed(out, plan.layers)
    assert manifest["tied_embeddings"] and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    assert manifest["sizes"]["weights_file_bytes"] < manifest["sizes"]["dense_fp32_bytes"]


def test_not_a_checkpoint_raises_one_line_value_error(tiny_model_dir, tmp_path):
    def raises(path, names):
        with pytest.raises(ValueError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert "\n" not in message and names in message, message
        assert isinstance(err.value, CheckpointError)

    raises(tmp_path / "nowhere", "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(empty, "checkpoint.json")
    hf_dir = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, hf_dir)  # a Hugging Face model directory, not a checkpoint
    raises(hf_dir, "checkpoint.json")
    (hf_dir / "checkpoint.json").write_text("{not json")
    raises(hf_dir, "checkpoint.json")
    (hf_dir / "checkpoint.json").write_text(json.dumps({"format": "dse-compressed-checkpoint", "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(hf_dir)
    (hf_dir / "checkpoint.json").write_text(json.dumps({"format": "dse-compressed-checkpoint",
                                                        "format_version": FORMAT_VERSION}))
    raises(hf_dir, WEIGHTS)  # a version 3 checkpoint's weights are not model.safetensors


# ---------------------------------------------------------------------------------------------- integrity

def tensor_spans(path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first byte, end) in the safetensors file, from its header as the format defines it
    (8-byte little-endian header length, JSON header, data offsets relative to the end of the header)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


TINY_PLAN = ModelPlan((LayerPlan("model.layers.0.mlp.up_proj", Sparsity(2, 4), WeightFormat("4", 32)),
                       LayerPlan("model.layers.1.self_attn.o_proj", None, WeightFormat("ternary"))))


def test_every_tensor_carries_the_sha256_of_its_stored_bytes(tiny_model_dir, tmp_path):
    _, _, _, out = export_and_reload(str(tiny_model_dir), TINY_PLAN, tmp_path)
    weights = out / WEIGHTS
    raw = weights.read_bytes()
    sums = read_manifest(out)["tensor_sha256"]
    spans = tensor_spans(weights)
    assert set(sums) == set(spans) and "model.layers.0.mlp.up_proj.qweight" in sums
    assert sums == {name: hashlib.sha256(raw[a:b]).hexdigest() for name, (a, b) in spans.items()}


def test_flipped_bytes_in_a_tensor_fail_the_load_naming_the_file_and_tensor(tiny_model_dir, tmp_path):
    evaluated, _, tokenizer, out = export_and_reload(str(tiny_model_dir), TINY_PLAN, tmp_path)
    weights = out / WEIGHTS
    name, (start, end) = max(tensor_spans(weights).items(), key=lambda item: item[1][1] - item[1][0])
    middle = (start + end) // 2
    data = bytearray(weights.read_bytes())
    data[middle - 2048: middle + 2048] = bytes(b ^ 0xFF for b in data[middle - 2048: middle + 2048])  # 4 KB
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(out)
    assert str(err.value) == (f"checkpoint: {weights}: tensor {name} does not match its sha256 in checkpoint.json "
                              "(the file is damaged or was changed)")
    # what a loader without the check would run: the sum made to match the damaged bytes -> other logits
    manifest = json.loads((out / "checkpoint.json").read_text())
    manifest["tensor_sha256"][name] = hashlib.sha256(bytes(data[start:end])).hexdigest()
    (out / "checkpoint.json").write_text(json.dumps(manifest))
    damaged, _ = load_checkpoint(out)
    ids = windows(tokenizer)
    assert not torch.allclose(logits(damaged, ids), logits(evaluated, ids), atol=1e-3, equal_nan=True)


def test_missing_sums_and_old_checkpoints_are_refused(tiny_model_dir, tmp_path):
    _, _, _, out = export_and_reload(str(tiny_model_dir), TINY_PLAN, tmp_path)
    path, weights = out / "checkpoint.json", out / WEIGHTS
    good = json.loads(path.read_text())

    def refused(manifest: dict, message: str) -> None:
        path.write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(out)
        assert str(err.value) == message

    sums = dict(good["tensor_sha256"])
    sums.pop("model.norm.weight")
    refused({**good, "tensor_sha256": sums},
            f"checkpoint: {weights}: tensor model.norm.weight has no sha256 in checkpoint.json")
    refused({**good, "tensor_sha256": {**good["tensor_sha256"], "model.extra": "0" * 64}},
            f"checkpoint: {weights}: tensor model.extra named in checkpoint.json is missing")
    refused({k: v for k, v in good.items() if k != "tensor_sha256"}, f"checkpoint: {path}: tensor_sha256 is missing")
    refused({**good, "format_version": 1}, f"checkpoint: {path}: format version 1 has no tensor checksums and is not "
                                           "loaded; write the checkpoint again (dse export --trial N --checkpoint)")
    path.write_text(json.dumps(good))
    load_checkpoint(out)


# ---------------------------------------------------------------------------------------------- SmolLM2-135M

def test_smollm2_mixed_plan_round_trip(tmp_path):
    plan = mixed_plan(64, mlgru_block=3)
    evaluated, reloaded, tokenizer, out = export_and_reload(DEFAULT_MODEL, plan, tmp_path)
    ids = windows(tokenizer)
    diff = float((logits(reloaded, ids) - logits(evaluated, ids)).abs().max())
    print(f"SmolLM2 mixed plan: max |logit diff| {diff:.3g}")
    assert diff <= 1e-5, diff
    manifest = check_packed(out, plan.layers)
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    started = time.perf_counter()
    check_sums(stored, manifest, out / WEIGHTS)  # the integrity check load_checkpoint runs
    print(f"sha256 of {sum(t.numel() * t.element_size() for t in stored.values()) / 1e6:.0f} MB of tensors: "
          f"{time.perf_counter() - started:.2f} s")
    assert len(manifest["layers"]) == len(plan.layers)
    print(f"sizes: {manifest['sizes']}")
    for record in manifest["layers"]:  # packed layers are far below their FP32 bytes (INT8: about a quarter;
        fp32 = 4 * record["shape"][0] * record["shape"][1]  # 2:4 float: half the values, 1/32 more for the mask)
        assert record["bytes"] <= (0.54 if record["format"] == "16" else 0.3) * fp32, record["name"]


@pytest.mark.slow
def test_smollm2_int4_plan_is_much_smaller(tmp_path):
    model, _ = load_model(DEFAULT_MODEL)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    del model
    plan = ModelPlan(tuple(LayerPlan(n, None, WeightFormat("4", 64)) for n in names))
    evaluated, reloaded, tokenizer, out = export_and_reload(DEFAULT_MODEL, plan, tmp_path)
    ids = windows(tokenizer)
    diff = float((logits(reloaded, ids) - logits(evaluated, ids)).abs().max())
    assert diff <= 1e-5, diff
    manifest = check_packed(out, plan.layers[:3])
    sizes = manifest["sizes"]
    file_bytes, dense_bytes = sizes["weights_file_bytes"], sizes["dense_fp32_bytes"]
    print(f"SmolLM2 INT4/g64 (all {len(names)} linear layers): max |logit diff| {diff:.3g}, "
          f"{file_bytes / 1e6:.1f} MB vs dense FP32 {dense_bytes / 1e6:.1f} MB ({dense_bytes / file_bytes:.2f}x)")
    # per INT4/g64 weight: 0.5 byte of code + 2/64 byte of FP16 scale; embeddings and norms stored FP16
    linear = sum(r["shape"][0] * r["shape"][1] for r in manifest["layers"])
    expected = linear * (0.5 + 2 / 64) + (dense_bytes - 4 * (linear - model_vocab_hidden(manifest))) / 2
    assert file_bytes == pytest.approx(expected, rel=0.01)
    assert dense_bytes / file_bytes > 2.5


def model_vocab_hidden(manifest):
    """Elements of lm_head (counted in ``linear`` but, tied, not in the dense state dict)."""
    head = next(r for r in manifest["layers"] if r["name"] == "lm_head")
    return head["shape"][0] * head["shape"][1]
