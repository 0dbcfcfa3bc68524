"""The MLGRU token mixer (evaluators.compress.mlgru): equations, scan, install/uninstall into SmolLM2,
distillation from the attention it replaces, and greedy generation through TorchLM."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from evaluators.compress import mlgru as M

BLOCK = 3


# ---------------------------------------------------------------------------------------------- no model

def _numpy_mlgru(x, wf, wc, wg, wo, gw, lb, eps):
    """The MLGRU by the equations, in float64 numpy, one token at a time (reference form of the output gate)."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    silu = lambda z: z * sig(z)  # noqa: E731
    h = np.zeros(x.shape[1])
    out = []
    for xt in x:
        f = lb + (1 - lb) * sig(wf @ xt)
        c = silu(wc @ xt)
        h = f * h + (1 - f) * c
        g = wg @ xt
        gate = g / np.sqrt(np.mean(g * g) + eps) * gw
        out.append(wo @ (gate * silu(h)))
    return np.array(out)


def test_hand_worked_recurrence():
    wf = np.eye(2)
    wc = np.array([[0.0, 1.0], [1.0, 0.0]])
    wg = np.array([[1.0, 0.0], [1.0, 1.0]])
    wo = np.array([[1.0, 1.0], [0.0, -1.0]])
    gw = np.array([1.0, 2.0])
    x = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    m = M.MLGRU(2, lower_bound=0.25, eps=1e-5)
    with torch.no_grad():
        for lin, w in ((m.f_proj, wf), (m.c_proj, wc), (m.g_proj, wg), (m.o_proj, wo)):
            lin.weight.copy_(torch.tensor(w))
        m.g_norm.weight.copy_(torch.tensor(gw))
        got = m(torch.tensor(x, dtype=torch.float32)[None])[0].double().numpy()
    expected = _numpy_mlgru(x, wf, wc, wg, wo, gw, 0.25, 1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # token 0 by hand: f = .25 + .75 sigmoid([1, 0]) = [.79829, .625]; c = silu([0, 1]) = [0, .73106];
    # h = (1 - f) c = [0, .27415]; g = [1, 1] -> rmsnorm * [1, 2] = [1, 2]; silu(h) = [0, .15575];
    # out = W_o [0, .31149] = [.31149, -.31149]
    h1 = 0.375 * (1 / (1 + math.exp(-1)))
    silu_h1 = h1 / (1 + math.exp(-h1))
    gate = np.array([1.0, 2.0]) / math.sqrt(1 + 1e-5)
    np.testing.assert_allclose(got[0], wo @ (gate * np.array([0.0, silu_h1])), atol=1e-6)
    assert got[0, 1] == pytest.approx(-0.31149, abs=1e-5)


@pytest.mark.parametrize("T", [1, 2, 3, 17, 64, 256])
def test_scan_equals_loop(T):
    gen = torch.Generator().manual_seed(T)
    f = torch.rand(3, T, 40, generator=gen)
    f[:, ::5] = f[:, ::5] * 1e-4  # tiny gates too
    u = torch.randn(3, T, 40, generator=gen)
    torch.testing.assert_close(M.recurrence_scan(f, u), M.recurrence_loop(f, u), atol=1e-5, rtol=0)


def test_scan_gradient():
    gen = torch.Generator().manual_seed(0)
    f = torch.rand(2, 11, 3, generator=gen, dtype=torch.float64).requires_grad_()
    u = torch.randn(2, 11, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(M.recurrence_scan, (f, u))


def test_mlgru_scan_modes_agree_with_gradients():
    torch.manual_seed(0)
    a = M.MLGRU(24, lower_bound=0.1)
    b = M.MLGRU(24, lower_bound=0.1, scan="loop")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 50, 24)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=0)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-4, rtol=1e-4)


def test_lower_bounds():
    assert M.lower_bound(0, 30) == 0.0
    values = [M.lower_bound(i, 30) for i in range(30)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] < 1.0
    # the reference: softmax(zeros).cumsum(0) - softmax(zeros)[0]
    ref = torch.zeros(30).softmax(0)
    ref = ref.cumsum(0) - ref[0]
    np.testing.assert_allclose(values, ref.numpy(), atol=1e-6)
    assert M.lower_bound(3, 30) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        M.lower_bound(30, 30)


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def model_and_tokenizer():
    """SmolLM2-135M, float32, CPU; one torch thread, as in test_lm_equivalence (on a busy 2-core machine
    two threads made these small forwards and distillation steps several times slower, measured)."""
    from evaluators.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model()
    model.eval()
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture()
def clean_model(model_and_tokenizer):
    model, tok = model_and_tokenizer
    yield model, tok
    for b in M.installed_blocks(model):
        M.uninstall(model, b)


def _mixer(model, block=BLOCK, seed=0):
    cfg = model.config
    return M.from_attention(M.decoder_layers(model)[block].self_attn, cfg, block, cfg.num_hidden_layers, seed=seed)


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_from_attention_initialisation(clean_model):
    model, _ = clean_model
    cfg = model.config
    attn = M.decoder_layers(model)[BLOCK].self_attn
    mix = _mixer(model)
    assert float(mix.lower_bound) == pytest.approx(BLOCK / cfg.num_hidden_layers)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        v = attn.v_proj(x).view(2, 5, cfg.num_key_value_heads, cfg.head_dim)
        v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=2).reshape(2, 5, -1)
        torch.testing.assert_close(mix.c_proj(x), v)
    assert torch.equal(mix.o_proj.weight, attn.o_proj.weight)
    assert torch.equal(mix.g_norm.weight, torch.ones(cfg.hidden_size))
    assert mix.f_proj.weight.abs().max() < 0.05 and mix.g_proj.weight.abs().max() < 0.05
    assert torch.equal(_mixer(model, seed=0).f_proj.weight, mix.f_proj.weight)
    assert not torch.equal(_mixer(model, seed=1).f_proj.weight, mix.f_proj.weight)


def test_install_names_causality_and_uninstall(clean_model):
    from dse.arch import Workload

    model, tok = clean_model
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog because it was in a hurry to get home")])
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    dense_names = _linear_names(model)

    M.install(model, BLOCK, _mixer(model))
    assert M.installed_blocks(model) == [BLOCK]
    names = _linear_names(model)
    mlgru_names = [f"model.layers.{BLOCK}.mlgru.{p}" for p in ("f_proj", "c_proj", "g_proj", "o_proj")]
    assert set(mlgru_names) <= set(names)
    assert not [n for n in names if n.startswith(f"model.layers.{BLOCK}.self_attn")]
    assert not [n for n, _ in model.named_modules() if n.startswith(f"model.layers.{BLOCK}.self_attn.")]
    workload = Workload.from_hf_config(model.config.to_dict())
    assert [layer.name for layer in workload.mlgru_layers(BLOCK)] == mlgru_names
    assert [n for n in names if f".{BLOCK}." in n and n.startswith("model.layers")] == (
        mlgru_names + [f"model.layers.{BLOCK}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")])
    assert f"model.layers.{BLOCK}.mlgru.lower_bound" in model.state_dict()

    with torch.no_grad():
        mixed = model(input_ids=ids, use_cache=False).logits
        assert not torch.allclose(mixed, dense, atol=1e-3)
        t = 9
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % model.config.vocab_size
        other = model(input_ids=changed, use_cache=False).logits
    torch.testing.assert_close(other[:, :t], mixed[:, :t], atol=1e-5, rtol=0)
    assert (other[:, t:] - mixed[:, t:]).abs().amax(-1).min() > 1e-4

    M.uninstall(model, BLOCK)
    assert M.installed_blocks(model) == []
    assert _linear_names(model) == dense_names
    assert not hasattr(M.decoder_layers(model)[BLOCK], "mlgru")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, dense)


def test_reinstall_keeps_original_attention(clean_model):
    model, _ = clean_model
    original = M.decoder_layers(model)[BLOCK].self_attn
    M.install(model, BLOCK, _mixer(model, seed=0))
    second = _mixer(model, seed=1)
    M.install(model, BLOCK, second)
    assert M.decoder_layers(model)[BLOCK].mlgru is second
    M.uninstall(model, BLOCK)
    assert M.decoder_layers(model)[BLOCK].self_attn is original


def test_capture_and_distill_lower_the_error(clean_model):
    from evaluators.corpus import token_windows

    model, tok = clean_model
    ids = torch.tensor(token_windows(tok, 4, 64, split="calibration", seed=0))
    io = M.capture_attention_io(model, [BLOCK], ids, batch=2)
    x, y = io[BLOCK]
    assert x.shape == y.shape == (4, 64, model.config.hidden_size) and x.dtype == torch.float32
    # y is what the attention module returns for x (position embeddings are those of positions 0..63)
    with torch.no_grad():
        inner = model.model
        pos = torch.arange(64)[None]
        emb = inner.rotary_emb(x[:1], pos)
        mask = torch.full((64, 64), float("-inf")).triu(1)[None, None]
        ref = M.decoder_layers(model)[BLOCK].self_attn(hidden_states=x[:1], position_embeddings=emb,
                                                         attention_mask=mask)[0]
    torch.testing.assert_close(ref, y[:1], atol=1e-4, rtol=1e-4)
    mix = _mixer(model)
    seen = []
    result = M.distill(mix, x, y, steps=60, lr=M.DEFAULT_LR, batch_windows=2, seed=0,
                       progress=lambda s, n, loss: seen.append((s, n)))
    print(f"[mlgru] distill 4x64, 60 steps: {result}")
    assert seen[0] == (1, 60) and seen[-1] == (60, 60)
    assert result["steps"] == 60 and result["seconds"] > 0
    assert result["mse_final"] < result["mse_initial"] / 5
    assert result["mse_final"] < float(y.square().mean()) / 2  # better than predicting zero
    assert not mix.training and not any(p.requires_grad for p in mix.parameters())
    with torch.no_grad():
        assert float((mix(x) - y).square().mean()) == pytest.approx(result["mse_final"], rel=1e-4)


def test_generate_until_batched_equals_one_at_a_time(clean_model):
    from lm_eval.api.instance import Instance

    from evaluators.lm import TorchLM

    model, tok = clean_model
    M.install(model, BLOCK, _mixer(model))
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 8}
    contexts = ["The capital of France is", "Once upon a time", "2 + 2 =", "A"]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(c, gen_kwargs), idx=i)
            for i, c in enumerate(contexts)]
    batched = TorchLM(model, tok, batch_size=4, disable_tqdm=True).generate_until(reqs)
    single = TorchLM(model, tok, batch_size=1, disable_tqdm=True)
    one_by_one = [single.generate_until([r])[0] for r in reqs]
    assert batched == one_by_one
    # and both are the plain greedy decode, by full recomputation without padding
    for context, text in zip(contexts, batched):
        toks = single._encode_prompts([context])[0]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(input_ids=torch.tensor([toks + new]), use_cache=False).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id or "\n\n" in tok.decode(new):
                    break
        assert text == tok.decode(new, skip_special_tokens=True).split("\n\n")[0]


@pytest.mark.slow
def test_distill_one_block_benchmark(clean_model):
    """The measured setting: block 3, 16 windows x 256 tokens, the default steps and lr, 2 threads;
    8 other windows held out."""
    from evaluators.corpus import token_windows

    model, tok = clean_model
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = torch.tensor(token_windows(tok, 24, 256, split="calibration", seed=0))
        start = time.perf_counter()
        x, y = M.capture_attention_io(model, [BLOCK], ids)[BLOCK]
        capture = time.perf_counter() - start
        result = M.distill(_mixer(model), x[:16], y[:16], batch_windows=4, heldout=(x[16:], y[16:]))
    finally:
        torch.set_num_threads(threads)
    zero, zero_heldout = float(y[:16].square().mean()), float(y[16:].square().mean())
    print(f"[mlgru] capture 24x256 {capture:.1f} s; distill 16x256: {result}; "
          f"zero-prediction mse {zero:.4f} (held out {zero_heldout:.4f})")
    assert result["mse_final"] < result["mse_initial"] / 10
    assert result["mse_final"] < zero / 5
    assert result["mse_heldout"] < result["mse_heldout_initial"] / 3
    assert result["mse_heldout"] < 0.6 * zero_heldout
