"""Compression methods on small matrices and a tiny Llama, against hand-worked values and brute force.

SparseGPT/GPTQ's column loop has its own brute-force tests in ``test_obs.py``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dse.plan import BlockPlan, LayerPlan, ModelPlan, Sparsity, WeightFormat
from evaluators.settings import CompressionSpec
from evaluators.compress import PlanApplier, PlanApplyError, compress_layer, needs_calibration
from evaluators.compress.cache import CompressionCache
from evaluators.compress.calibration import CalibrationSet, collect_hessians
from evaluators.compress.grid import int_grid, quantize, rtn
from evaluators.compress.prune import nm_mask_magnitude, nm_mask_wanda
from evaluators.compress.ternary import quantize_activations, refit_scales


def quantize_rtn(w, bits, group, symmetric=True):
    return rtn(w, WeightFormat(str(bits), group, symmetric)).dequantize()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (3, 5), (1, 2)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    torch.manual_seed(n * 10 + m)
    w = torch.randn(6, m * 7)
    mask = nm_mask_magnitude(w, Sparsity(n, m))
    groups = mask.reshape(6, -1, m)
    assert (groups.sum(dim=2) == n).all()
    # brute force: in each group the kept set is the one with the largest total magnitude
    mag = w.abs().reshape(6, -1, m)
    for r, g in itertools.product(range(6), range(7)):
        best = max(itertools.combinations(range(m), n), key=lambda idx: mag[r, g, list(idx)].sum().item())
        assert set(torch.nonzero(groups[r, g]).flatten().tolist()) == set(best)


def test_nm_mask_partial_trailing_group():
    w = torch.tensor([[5.0, -1.0, 0.5, 3.0, 9.0, -2.0]])  # 2:4 -> one full group of 4, one group of 2
    mask = nm_mask_magnitude(w, Sparsity(2, 4))
    assert mask.tolist() == [[True, False, False, True, True, True]]


def test_wanda_weighs_magnitude_by_input_norm():
    # |W| = [4, 3, 2, 1]; input norms sqrt(H_jj) = [0.1, 1, 10, 1]: Wanda scores [0.4, 3, 20, 1] keep inputs 1, 2
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    h = torch.diag(torch.tensor([0.01, 1.0, 100.0, 1.0]))
    assert nm_mask_wanda(w, Sparsity(2, 4), h).tolist() == [[False, True, True, False]]
    assert nm_mask_magnitude(w, Sparsity(2, 4)).tolist() == [[True, True, False, False]]


def test_rtn_hand_worked_group():
    # 4-bit, group of 4: maxq 15, scale = 2*max|w|/15 = 2*1.5/15 = 0.2, stored as the nearest FP16 value
    # 0.199951171875 (= 3276 * 2**-14), zero 8
    w = torch.tensor([[1.5, -0.31, 0.05, -1.5]])
    packed = rtn(w, WeightFormat("4", 4))
    s = 3276 * 2.0 ** -14
    assert packed.scales.tolist() == [[s]]
    # codes: round(w/s)+8 = 15.5->16 clamp 15, -1.55->-2 ->6, 0.25->0 ->8, -7.5->-8 ->0
    assert packed.codes.tolist() == [[15, 6, 8, 0]]
    assert packed.dequantize().tolist() == [[7 * s, -2 * s, 0.0, -8 * s]]


def test_rtn_asymmetric_hand_worked():
    # 2-bit asymmetric: xmin -0.5, xmax 1.0, scale 1.5/3 = 0.5, zero round(0.5/0.5) = 1; grid {-0.5, 0, 0.5, 1}
    w = torch.tensor([[1.0, -0.5, 0.3, 0.2]])
    packed = rtn(w, WeightFormat("2", 4, symmetric=False))
    assert packed.zeros.tolist() == [[1.0]] and packed.scales.tolist() == [[0.5]]
    assert packed.codes.tolist() == [[3, 0, 2, 1]]
    assert packed.dequantize().tolist() == [[1.0, -0.5, 0.5, 0.0]]


@pytest.mark.parametrize("bits,group", [(8, 32), (6, 16), (4, 64), (3, 128), (2, 8)])
def test_rtn_values_on_the_grid_of_each_group(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(5, 256)
    q = quantize_rtn(w, bits, group)
    maxq = 2**bits - 1
    for g in range(256 // group):
        block_w, block_q = w[:, g * group:(g + 1) * group], q[:, g * group:(g + 1) * group]
        scale = (2 * block_w.abs().amax(dim=1, keepdim=True) / maxq).half().float()  # stored as FP16
        codes = block_q / scale + (maxq + 1) / 2
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().min() >= 0 and codes.round().max() <= maxq
        # round-to-nearest: at most half a step, plus the clip of the largest weight when FP16 rounded the scale
        # down (at most half an FP16 ulp, 2**-11, of 2**(bits-1) steps)
        assert ((block_q - block_w).abs() <= scale * (0.5 + 2 ** (bits - 1 - 11)) + 1e-6).all()


def test_rtn_keeps_pruned_zeros_and_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    out = compress_layer(w, LayerPlan("x", Sparsity(2, 4), WeightFormat("4", 32))).dequantize()
    mask = nm_mask_magnitude(w, Sparsity(2, 4))
    assert (out[~mask] == 0).all()
    # the grid covers the kept weights only: the scale of each group is 2*max|kept|/15
    kept_max = (w * mask).reshape(16, 4, 32).abs().amax(dim=2)
    assert torch.equal(rtn(w, WeightFormat("4", 32), mask).scales, (2 * kept_max / 15).half().float())
    for symmetric in (True, False):
        errors = [((quantize_rtn(w, b, 32, symmetric) - w) ** 2).mean().item() for b in (2, 3, 4, 6, 8)]
        assert errors == sorted(errors, reverse=True)
    # the grids themselves take any width from 2 to 8 bits (5 and 7 included)
    for bits in range(2, 9):
        scale, zero = int_grid(w, bits, symmetric=False)
        codes = quantize(w, scale, zero, 2**bits - 1)
        assert codes.min() >= 0 and codes.max() == 2**bits - 1 and torch.equal(codes, codes.round())


def test_ternary_values_and_absmean_scale():
    w = torch.tensor([[0.9, -0.2, 0.05, -1.3], [0.4, 0.0, -0.6, 0.3]])
    gamma = w.abs().mean()  # 0.46875
    t = rtn(w, WeightFormat("ternary")).dequantize()
    assert set((t / gamma).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    expected = torch.tensor([[1, 0, 0, -1], [1, 0, -1, 1]]) * gamma
    assert torch.allclose(t, expected)


def test_ternary_with_nm_uses_kept_weights_for_the_scale():
    w = torch.tensor([[4.0, 0.1, -2.0, 0.2]])
    out = compress_layer(w, LayerPlan("x", Sparsity(2, 4), WeightFormat("ternary"))).dequantize()
    gamma = (4.0 + 2.0) / 2
    assert torch.allclose(out, torch.tensor([[gamma, 0.0, -gamma, 0.0]]))


def test_ternary_refit_is_the_least_squares_scale_per_channel():
    torch.manual_seed(1)
    x = torch.randn(200, 8) @ torch.randn(8, 8)  # correlated inputs
    w = torch.randn(3, 8)
    h = x.T @ x
    packed = refit_scales(w, rtn(w, WeightFormat("ternary")), h)
    t = (packed.codes.float() - 1).numpy()
    for row in range(3):  # brute force: numpy least squares of X w_r ~ a * X t_r
        design = (x.numpy() @ t[row])[:, None]
        a, *_ = np.linalg.lstsq(design, x.numpy() @ w[row].numpy(), rcond=None)
        assert packed.scales[row, 0].item() == pytest.approx(float(a[0]), rel=2 ** -11)  # stored as FP16
    before = ((x @ (w - rtn(w, WeightFormat("ternary")).dequantize()).T) ** 2).sum()
    after = ((x @ (w - packed.dequantize()).T) ** 2).sum()
    assert after < before


def test_activation_quantiser_hand_worked():
    # per token absmax 8-bit: scale 127/2; 1.0 -> round(63.5)=64 -> 64*2/127
    x = torch.tensor([[2.0, -1.0, 0.5], [0.01, 0.0, -0.02]])
    q = quantize_activations(x)
    assert q[0].tolist() == pytest.approx([2.0, -64 * 2 / 127, 32 * 2 / 127])
    assert q[1, 2].item() == pytest.approx(-0.02) and q[1, 0].item() == pytest.approx(round(63.5) * 0.02 / 127)


def test_needs_calibration():
    assert not needs_calibration(LayerPlan("x", Sparsity(2, 4), WeightFormat("4")))
    assert needs_calibration(LayerPlan("x", Sparsity(2, 4), prune="wanda"))
    assert not needs_calibration(LayerPlan("x", None, WeightFormat("16"), prune="sparsegpt", quant="gptq"))
    assert needs_calibration(LayerPlan("x", None, WeightFormat("ternary"), quant="refit"))


# ------------------------------------------------------------------ the applier on a tiny Llama
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def calibration():
    return CalibrationSet(torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0)))


def make_applier(tmp_path, mode="sequential", model=None):
    model = model or tiny_llama()
    return PlanApplier(model, settings=CompressionSpec(mode=mode, distill_steps=5),
                       cache=CompressionCache("tiny", tmp_path), calibration=calibration())


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.clone()


def test_applier_restores_dense_and_unties_lm_head(tmp_path):
    applier = make_applier(tmp_path)
    model = applier.model
    ids = torch.randint(0, 64, (1, 12))
    dense_logits = logits(model, ids)
    embedding = model.get_input_embeddings().weight.detach().clone()
    plan = ModelPlan((LayerPlan("lm_head", None, WeightFormat("4", 16)),
                      LayerPlan("model.layers.0.mlp.up_proj", Sparsity(2, 4), WeightFormat("8", 16))))
    report = applier.apply(plan)
    assert {n: d["label"] for n, d in report.layers.items()} == {"lm_head": "int4/g16",
                                                                 "model.layers.0.mlp.up_proj": "2:4 int8/g16"}
    assert torch.equal(model.get_input_embeddings().weight, embedding), "embeddings stay full precision"
    up = model.model.layers[0].mlp.up_proj.weight
    assert (up.reshape(up.shape[0], -1, 4) != 0).sum(dim=2).max() <= 2
    assert not torch.allclose(logits(model, ids), dense_logits)
    applier.apply(ModelPlan())
    assert torch.equal(logits(model, ids), dense_logits)


def test_applier_rejects_invalid_plans_with_one_line(tmp_path):
    applier = make_applier(tmp_path)
    cases = [
        (ModelPlan((LayerPlan("model.layers.9.mlp.up_proj", Sparsity(2, 4)),)), "'model.layers.9.mlp.up_proj': name"),
        (ModelPlan((LayerPlan("model.layers.0.mlp.down_proj", Sparsity(2, 3)),)), "sparsity: M=3"),
        (ModelPlan(blocks=(BlockPlan(5, "mlgru"),)), "block 5: index"),
        (ModelPlan((LayerPlan("model.layers.0.mlgru.f_proj", None, WeightFormat("4")),)), "needs its block's mixer"),
    ]
    for plan, message in cases:
        with pytest.raises(PlanApplyError, match=message) as err:
            applier.apply(plan)
        assert "\n" not in str(err.value)


CALIBRATED = ModelPlan((
    LayerPlan("model.layers.0.self_attn.q_proj", Sparsity(2, 4), WeightFormat("4", 16), "sparsegpt", "gptq"),
    LayerPlan("model.layers.0.mlp.down_proj", Sparsity(2, 4), WeightFormat("16"), "wanda"),
    LayerPlan("model.layers.1.mlp.up_proj", None, WeightFormat("3", 8), quant="gptq"),
    LayerPlan("model.layers.1.self_attn.o_proj", None, WeightFormat("ternary"), quant="refit"),
    LayerPlan("lm_head", None, WeightFormat("4", 16, symmetric=False), quant="gptq"),
))


@pytest.mark.parametrize("mode", ["sequential", "dense"])
def test_second_apply_loads_every_layer_from_the_cache(tmp_path, mode):
    applier = make_applier(tmp_path, mode)
    ids = torch.randint(0, 64, (2, 10))
    first = applier.apply(CALIBRATED)
    assert first.count("computed") == 5
    out_first = logits(applier.model, ids)
    second = applier.apply(CALIBRATED)
    assert second.count("cache") == 5 and second.count("computed") == 0
    assert torch.equal(logits(applier.model, ids), out_first)
    # a fresh applier (another worker) on the same cache loads too
    other = make_applier(tmp_path, mode)
    assert other.apply(CALIBRATED).count("cache") == 5
    assert torch.equal(logits(other.model, ids), out_first)


def test_sequential_statistics_see_the_compressed_earlier_blocks(tmp_path):
    """Block 1's GPTQ input statistics differ when block 0 is compressed (sequential), not in dense mode."""
    target = LayerPlan("model.layers.1.mlp.up_proj", None, WeightFormat("3", 8), quant="gptq")
    earlier = LayerPlan("model.layers.0.mlp.down_proj", Sparsity(1, 4), WeightFormat("2", 8))
    for mode, reused in (("sequential", False), ("dense", True)):
        applier = make_applier(tmp_path / mode, mode)
        applier.apply(ModelPlan((target,)))
        report = applier.apply(ModelPlan((earlier, target)))
        assert (report.layers[target.name]["source"] == "cache") is reused
    # the sequential statistics of block 1 equal those of the model with block 0 compressed
    applier = make_applier(tmp_path / "check")
    applier.apply(ModelPlan((earlier,)))
    module = applier.model.model.layers[1].mlp.up_proj
    hessian = collect_hessians(applier.model, calibration(), {"up": module})["up"]
    expected = compress_layer(module.weight.detach(), target, hessian).dequantize()
    applier.apply(ModelPlan((earlier, target)))
    assert torch.allclose(module.weight, expected, atol=1e-6)


def test_ternary_layers_compute_on_8bit_activations(tmp_path):
    """A ternary layer's output is its weight applied to the per-token absmax 8-bit grid of its input (computed
    here by hand), not to the input itself; restoring the plan gives the plain product back."""
    applier = make_applier(tmp_path)
    name = "model.layers.0.mlp.down_proj"
    seen = {}
    module = applier.model.get_submodule(name)
    module.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach().clone(), y=out.detach().clone()))
    applier.apply(ModelPlan((LayerPlan(name, None, WeightFormat("ternary")),)))
    logits(applier.model, torch.randint(0, 64, (1, 8)))
    x, y, w = seen["x"], seen["y"], module.weight.detach()
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    on_grid = torch.clamp(torch.round(x / step), -128, 127) * step
    assert torch.allclose(y, on_grid @ w.T, rtol=1e-5, atol=1e-6), "inputs lie on the per-token 8-bit grid"
    assert not torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-6)
    applier.apply(ModelPlan())
    logits(applier.model, torch.randint(0, 64, (1, 8)))
    assert torch.allclose(seen["y"], seen["x"] @ module.weight.detach().T, rtol=1e-5, atol=1e-6), \
        "restore removes the activation quantiser"


def test_plans_applied_in_any_order_give_the_same_model(tmp_path):
    """Partial restores between fully cached plans leave exactly the state a fresh apply gives."""
    applier = make_applier(tmp_path)
    ids = torch.randint(0, 64, (2, 10))
    a = CALIBRATED
    b = ModelPlan((LayerPlan("model.layers.0.mlp.up_proj", Sparsity(1, 4), WeightFormat("2", 8)),
                   LayerPlan("model.layers.1.self_attn.o_proj", None, WeightFormat("8", 16))),
                  blocks=(BlockPlan(0, "mlgru"),))
    expected = {}
    for plan in (a, b):
        applier.apply(plan)
        expected[plan.hash] = logits(applier.model, ids)
    for plan in (b, a, b, ModelPlan(), a):
        report = applier.apply(plan)
        assert report.count("computed") == 0
        out = logits(applier.model, ids)
        if plan.layers:
            assert torch.equal(out, expected[plan.hash])
    applier.apply(ModelPlan())
    fresh = tiny_llama()
    with torch.no_grad():
        for p in fresh.parameters():  # the applier's dense model: every weight at FP16
            p.copy_(p.half().float())
    assert torch.equal(logits(applier.model, ids), logits(fresh, ids))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_container_packing_round_trip(bits):
    from evaluators.compress.packed import container_bits, pack_containers, unpack_containers

    codes = torch.randint(0, 2**bits, (41,), dtype=torch.uint8)
    stream = pack_containers(codes, bits)
    assert stream.numel() == -(-41 * container_bits(bits) // 8)
    assert torch.equal(unpack_containers(stream, bits, 41), codes)


def test_a_layer_entry_of_another_storage_layout_is_recomputed(tmp_path):
    applier = make_applier(tmp_path)
    plan = ModelPlan((LayerPlan("model.layers.0.mlp.up_proj", None, WeightFormat("3", 8)),))
    applier.apply(plan)
    path = next((tmp_path / "tiny" / "layers").glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"format": "3"})  # an older layout's metadata
    report = applier.apply(plan)
    assert report.count("computed") == 1
    assert applier.apply(plan).count("cache") == 1
