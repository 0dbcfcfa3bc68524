"""The GPTQ / SparseGPT column loop against round-to-nearest, a brute-force OBS reference and its baselines."""

from __future__ import annotations

import pytest
import torch

from dse.plan import Sparsity, WeightFormat
from evaluators.compress.grid import int_grid, quantize, rtn, ternary_scale
from evaluators.compress.obs import obs_compress
from evaluators.compress.prune import nm_mask_magnitude


def correlated_inputs(tokens: int, width: int, rank: int, seed: int) -> torch.Tensor:
    """``X`` [tokens, width] with strongly correlated features: a low-rank mix plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, width, generator=g)
    return x + 0.1 * torch.randn(tokens, width, generator=g) + 0.5 * torch.randn(width, generator=g)


def obs_reference(weight, hessian, fmt, sparsity=None, mask=None, percdamp=0.01):
    """Slow, direct OBS in float64: explicit inverse of the damped Hessian of the remaining columns.

    Column ``j`` in order: quantise/prune ``w_j`` to ``q_j``; ``err = (w_j - q_j) / [H_F^-1]_jj``;
    ``w_F -= err * [H_F^-1]_{j,F}`` with ``F = {j, ..., in-1}``; then ``j`` leaves ``F``. The N:M
    saliency of column ``k`` is ``w_k^2 / [H_{F_k}^-1]_kk`` with ``F_k = {k, ...}`` (the squared diagonal
    of the Cholesky factor the fast loop uses), on the weights current when the mask is decided.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    inv_diag = torch.stack([torch.linalg.inv(H[k:, k:])[0, 0] for k in range(cols)])
    keep = torch.ones(rows, cols, dtype=torch.bool) if mask is None else mask.clone()
    is_int = not (fmt.is_float or fmt.is_ternary)
    group = fmt.group_size if is_int else cols
    if fmt.is_ternary:
        tscale = ternary_scale(W.float(), nm_mask_magnitude(W, sparsity) if sparsity else mask).double()
    Q = torch.zeros_like(W)
    for j in range(cols):
        if sparsity is not None:
            n, m = sparsity.n, sparsity.m
            if is_int:  # every m-block starting inside the quantisation group, decided at its first column
                starts = [s for s in range(j, min(j + group, cols)) if s % m == 0] if j % group == 0 else []
            else:
                starts = [j] if j % m == 0 else []
            for s in starts:
                e = min(s + m, cols)
                score = W[:, s:e] ** 2 / inv_diag[s:e]
                prune = max(0, (e - s) - n)
                order = score.argsort(dim=1)[:, :prune] + s
                keep[:, s:e] = True
                keep.scatter_(1, order, False)
        if is_int and j % group == 0:
            g1 = min(j + group, cols)
            scale, zero = (t.double() for t in int_grid((W[:, j:g1] * keep[:, j:g1]).float(), fmt.bits, fmt.symmetric))
        w = W[:, j]
        if fmt.is_float:
            q = w.clone()
        elif fmt.is_ternary:
            q = tscale[0, 0] * (quantize(w, tscale[0, 0], 1.0, 2) - 1.0)
        else:
            q = scale[:, 0] * (quantize(w, scale[:, 0], zero[:, 0], 2**fmt.bits - 1) - zero[:, 0])
        q = torch.where(keep[:, j], q, 0.0)
        Hinv_F = torch.linalg.inv(H[j:, j:])
        err = (w - q) / Hinv_F[0, 0]
        W[:, j:] -= torch.outer(err, Hinv_F[0, :])
        Q[:, j] = q
    return Q, keep


def output_error(x, w, q):
    return torch.linalg.norm(x @ w.T - x @ q.T).item()


# --- 1. identity Hessian: no correlation to exploit, so GPTQ is round-to-nearest -----------------

@pytest.mark.parametrize("bits", ["2", "3", "4", "8"])
@pytest.mark.parametrize("group", [4, 8, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_identity_hessian_is_rtn(bits, group, symmetric, with_mask):
    torch.manual_seed(int(bits) * 1000 + group)
    w = torch.randn(8, 24)
    mask = nm_mask_magnitude(w, Sparsity(2, 4)) if with_mask else None
    fmt = WeightFormat(bits, group, symmetric)
    got = obs_compress(w, torch.eye(24), fmt, mask=mask, blocksize=8)
    want = rtn(w, fmt, mask)
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scales, want.scales) and torch.equal(got.zeros, want.zeros)
    assert got.group_size == want.group_size
    assert torch.equal(got.dequantize(), want.dequantize())


@pytest.mark.parametrize("with_mask", [False, True])
def test_identity_hessian_ternary_is_rtn(with_mask):
    torch.manual_seed(3)
    w = torch.randn(8, 24)
    mask = nm_mask_magnitude(w, Sparsity(2, 4)) if with_mask else None
    got = obs_compress(w, 5.0 * torch.eye(24), WeightFormat("ternary"), mask=mask, blocksize=8)
    want = rtn(w, WeightFormat("ternary"), mask)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert got.group_size == 24 and torch.equal(got.zeros, torch.ones(1, 1))


# --- 2. SparseGPT at 0% sparsity ----------------------------------------------------------------

def test_fp16_dense_returns_weights_unchanged():
    torch.manual_seed(0)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    x = correlated_inputs(128, 32, 4, seed=1)
    got = obs_compress(w, x.T @ x, WeightFormat("16"))
    assert got.mask is None and torch.equal(got.dequantize(), w.float())


# --- 3. N:M chosen inside -----------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 5), (1, 2)])
@pytest.mark.parametrize("fmt", [WeightFormat("16"), WeightFormat("4", 16), WeightFormat("ternary")], ids=str)
def test_nm_chosen_inside_keeps_n_of_every_m(n, m, fmt):
    torch.manual_seed(n * 10 + m)
    w = torch.randn(12, 8 * m)
    x = correlated_inputs(256, 8 * m, 6, seed=m)
    packed = obs_compress(w, x.T @ x, fmt, sparsity=Sparsity(n, m), blocksize=16)
    assert packed.mask.shape == w.shape
    assert (packed.mask.reshape(12, -1, m).sum(dim=2) == n).all()
    deq = packed.dequantize()
    assert (deq[~packed.mask] == 0).all() and deq.isfinite().all()


# --- 4. codes lie on the grid -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [WeightFormat("3", 8), WeightFormat("4", 16, False), WeightFormat("2", 6, False)],
                         ids=str)
def test_integer_codes_on_grid(fmt):
    torch.manual_seed(1)
    w = torch.randn(10, 30)
    x = correlated_inputs(200, 30, 5, seed=2)
    packed = obs_compress(w, x.T @ x, fmt, sparsity=Sparsity(2, 4), blocksize=8)
    maxq = 2**fmt.bits - 1
    assert packed.codes.dtype == torch.uint8 and int(packed.codes.max()) <= maxq
    assert packed.scales.shape == packed.zeros.shape == (10, -(-30 // fmt.group_size))
    deq = packed.dequantize()
    for c in range(30):
        g = c // fmt.group_size
        on_grid = packed.scales[:, g] * (packed.codes[:, c].float() - packed.zeros[:, g])
        kept = packed.mask[:, c]
        assert torch.equal(deq[kept, c], on_grid[kept])


def test_ternary_values_on_grid():
    torch.manual_seed(2)
    w = torch.randn(10, 32)
    x = correlated_inputs(200, 32, 5, seed=3)
    packed = obs_compress(w, x.T @ x, WeightFormat("ternary"), sparsity=Sparsity(2, 4), blocksize=8)
    assert set(packed.codes.unique().tolist()) <= {0, 1, 2} and packed.scales.shape == (1, 1)
    s = packed.scales.item()
    assert torch.isclose(packed.scales, ternary_scale(w, nm_mask_magnitude(w, Sparsity(2, 4)))).all()
    assert set(packed.dequantize().unique().tolist()) <= {-s, 0.0, s}


# --- 5. against the brute-force OBS reference ---------------------------------------------------

# Integer grids here are asymmetric: a symmetric grid puts a row's most negative weight exactly on
# a rounding tie (w / scale = -maxq / 2), which float32 (fast loop) and float64 (reference) may
# break differently; symmetric grids are checked exactly against RTN with an identity Hessian.
CASES = {
    "gptq-int3-g4": (WeightFormat("3", 4, False), None, False),
    "gptq-int4-g5": (WeightFormat("4", 5, False), None, False),
    "gptq-int4-g4-fixed-mask": (WeightFormat("4", 4, False), None, True),
    "ternary-fixed-mask": (WeightFormat("ternary"), None, True),
    "sparsegpt-fp16-2:4": (WeightFormat("16"), Sparsity(2, 4), False),
    "sparsegpt-fp16-fixed-mask": (WeightFormat("16"), None, True),
    "joint-int4-g8-2:4": (WeightFormat("4", 8, False), Sparsity(2, 4), False),
    "joint-int3-g6-3:5": (WeightFormat("3", 6, False), Sparsity(3, 5), False),
    "joint-ternary-1:2": (WeightFormat("ternary"), Sparsity(1, 2), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_brute_force_obs(case):
    fmt, sparsity, fixed = CASES[case]
    torch.manual_seed(7)
    w = torch.randn(6, 20)
    x = correlated_inputs(64, 20, 4, seed=11)
    h = x.T @ x
    mask = nm_mask_magnitude(w * torch.rand(6, 20), Sparsity(2, 4)) if fixed else None
    w_in, h_in = w.clone(), h.clone()
    got = obs_compress(w, h, fmt, sparsity=sparsity, mask=mask, blocksize=4)
    want, want_keep = obs_reference(w, h, fmt, sparsity=sparsity, mask=mask)
    assert torch.equal(w, w_in) and torch.equal(h, h_in)  # inputs untouched
    if sparsity is not None or fixed:
        assert torch.equal(got.mask, want_keep)
    assert torch.allclose(got.dequantize().double(), want, atol=1e-4, rtol=0)
    assert not torch.equal(got.dequantize(), rtn(w, fmt, got.mask).dequantize())  # not a plain rounding


def test_dead_inputs_zeroed():
    torch.manual_seed(4)
    w = torch.randn(6, 12)
    x = correlated_inputs(64, 12, 4, seed=5)
    x[:, [2, 7]] = 0
    h = x.T @ x
    for fmt, sp in [(WeightFormat("4", 4, False), None), (WeightFormat("16"), Sparsity(2, 4))]:
        got = obs_compress(w, h, fmt, sparsity=sp, blocksize=4)
        want, _ = obs_reference(w, h, fmt, sparsity=sp)
        deq = got.dequantize()
        assert (deq[:, [2, 7]] == 0).all() and torch.allclose(deq.double(), want, atol=1e-4, rtol=0)


# --- 6. it beats the data-free baselines on correlated inputs -----------------------------------

def test_lower_output_error_than_baselines():
    torch.manual_seed(5)
    w = torch.randn(32, 64)
    x = correlated_inputs(512, 64, 8, seed=6)
    h = x.T @ x
    int3 = WeightFormat("3", 16)
    err = {
        "gptq": obs_compress(w, h, int3).dequantize(),
        "rtn": rtn(w, int3).dequantize(),
        "sparsegpt": obs_compress(w, h, WeightFormat("16"), sparsity=Sparsity(2, 4)).dequantize(),
        "magnitude": w * nm_mask_magnitude(w, Sparsity(2, 4)),
    }
    mask = nm_mask_magnitude(w, Sparsity(2, 4))
    err["mask-gptq"] = obs_compress(w, h, int3, mask=mask).dequantize()
    err["mask-rtn"] = rtn(w, int3, mask).dequantize()
    e = {k: output_error(x, w, v) for k, v in err.items()}
    assert e["gptq"] < 0.8 * e["rtn"]
    assert e["sparsegpt"] < 0.8 * e["magnitude"]
    assert e["mask-gptq"] < 0.8 * e["mask-rtn"]


# --- errors -------------------------------------------------------------------------------------

def test_rejects_bad_arguments():
    w, h = torch.randn(4, 8), torch.eye(8)
    fmt = WeightFormat("4", 4)
    with pytest.raises(ValueError, match="hessian shape"):
        obs_compress(w, torch.eye(7), fmt)
    with pytest.raises(ValueError, match="2-D"):
        obs_compress(torch.randn(8), h, fmt)
    with pytest.raises(ValueError, match="mask shape"):
        obs_compress(w, h, fmt, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        obs_compress(w, h, fmt, sparsity=Sparsity(2, 4), mask=torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive definite"):
        obs_compress(w, -torch.eye(8), fmt, percdamp=0.0)
