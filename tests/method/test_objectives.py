"""Attention-aware objectives and error compensation (care_mla.method.objectives, factorization's weighting/cross,
compensation's output refit)."""

from __future__ import annotations

import math

import pytest
import torch

from care_mla.method.compensation import OutputMoments, output_refit_error, refit_output_weight
from care_mla.method.factorization import activation_error, care_factorize, joint_factorize
from care_mla.method.objectives import (
    Weighting,
    block_weighting,
    key_query_gram,
    rope_partner,
    value_output_gram,
    weighted_error,
)

N, D, HEADS, KV, HD = 3000, 48, 6, 2, 8


def _inputs(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64) @ Q
    u = torch.randn(d, generator=g, dtype=torch.float64)
    return X + 4 * (u / u.norm())


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(7)
    X = _inputs(0)
    w = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(shape[0])  # noqa: E731
    return dict(X=X, C=X.T @ X / N, Wq=w(D, HEADS * HD), Wk=w(D, KV * HD), Wv=w(D, KV * HD), Wo=w(HEADS * HD, D))


def _tail(spectrum: torch.Tensor, r: int) -> float:
    return float((spectrum.double()[r:] ** 2).sum())


def _weights(layer):
    kw = dict(num_heads=HEADS, num_kv_heads=KV, head_dim=HD)
    return (block_weighting(key_query_gram(layer["Wq"], layer["C"], **kw)),
            block_weighting(value_output_gram(layer["Wo"], **kw)))


# ------------------------------------------------------------------------------------ the weights


def test_rope_partner_pairs():
    assert rope_partner(8).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert rope_partner(8, interleaved=True).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    with pytest.raises(ValueError, match="even head_dim"):
        rope_partner(7)


def test_key_gram_is_the_rotation_average_of_the_query_gram(layer):
    """Averaging R_Δᵀ M R_Δ over a full period of relative positions (two distinct integer frequencies)
    leaves exactly the diagonal of pair-averaged query energy."""
    C, Wq = layer["C"], layer["Wq"][:, : 2 * 4]  # one KV head, two query heads of head_dim 4
    full = key_query_gram(Wq, C, num_heads=2, num_kv_heads=1, head_dim=4, rotary=False)[0]
    freqs = torch.tensor([1.0, 3.0], dtype=torch.float64)  # rotate_half layout: pairs (0, 2) and (1, 3)
    K = 64
    avg = torch.zeros(4, 4, dtype=torch.float64)
    for k in range(K):
        ang = 2 * math.pi * k / K * freqs
        c, s = torch.cos(ang), torch.sin(ang)
        R = torch.zeros(4, 4, dtype=torch.float64)
        for p in range(2):
            i, j = p, p + 2
            R[i, i], R[i, j], R[j, i], R[j, j] = c[p], -s[p], s[p], c[p]
        avg += R.T @ full @ R / K
    rotary = key_query_gram(Wq, C, num_heads=2, num_kv_heads=1, head_dim=4)[0]
    torch.testing.assert_close(rotary, avg, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(rotary - torch.diag(torch.diagonal(rotary))) == 0


def test_key_gram_sums_the_groups_query_heads(layer):
    C, Wq = layer["C"], layer["Wq"]
    M = key_query_gram(Wq, C, num_heads=HEADS, num_kv_heads=KV, head_dim=HD, rotary=False)
    group = HEADS // KV
    for g in range(KV):
        expected = sum(Wq[:, h * HD:(h + 1) * HD].T @ C @ Wq[:, h * HD:(h + 1) * HD]
                       for h in range(g * group, (g + 1) * group))
        torch.testing.assert_close(M[g], expected, rtol=1e-10, atol=1e-12)


def test_value_gram_is_the_sum_over_the_groups_output_heads(layer):
    Wo = layer["Wo"]
    G = value_output_gram(Wo, num_heads=HEADS, num_kv_heads=KV, head_dim=HD)
    group = HEADS // KV
    for g in range(KV):
        expected = sum(Wo[h * HD:(h + 1) * HD] @ Wo[h * HD:(h + 1) * HD].T for h in range(g * group, (g + 1) * group))
        torch.testing.assert_close(G[g], expected, rtol=1e-10, atol=1e-12)


def test_value_error_weight_is_the_output_error(layer):
    """‖e·T_v‖² equals Σ over query heads of ‖e_g W_o,h‖² (the error the heads write to the residual)."""
    G = value_output_gram(layer["Wo"], num_heads=HEADS, num_kv_heads=KV, head_dim=HD)
    T = block_weighting(G, floor=0.0)
    scale = float(torch.linalg.eigvalsh(G).mean())
    e = torch.randn(5, KV * HD, dtype=torch.float64)
    group = HEADS // KV
    direct = sum(float(((e[:, (h // group) * HD:(h // group + 1) * HD] @ layer["Wo"][h * HD:(h + 1) * HD]) ** 2).sum())
                 for h in range(HEADS))
    assert float(((e @ T.matrix) ** 2).sum()) * scale == pytest.approx(direct, rel=1e-10)


def test_block_weighting_is_a_root_and_invertible():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    G = A @ A.mT
    G[1] = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0], dtype=torch.float64))  # singular block
    w = block_weighting(G)
    torch.testing.assert_close(w.matrix @ w.inverse, torch.eye(15, dtype=torch.float64), rtol=0, atol=1e-9)
    mean = float(torch.linalg.eigvalsh(G).mean())
    block0 = (w.matrix @ w.matrix.T)[:5, :5]
    torch.testing.assert_close(block0, G[0] / mean, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="all zero"):
        block_weighting(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="NaN"):
        block_weighting(torch.full((1, 2, 2), float("nan")))


def test_gram_shapes_are_checked(layer):
    with pytest.raises(ValueError, match="num_heads·head_dim"):
        key_query_gram(layer["Wq"], layer["C"], num_heads=HEADS, num_kv_heads=KV, head_dim=HD + 2)
    with pytest.raises(ValueError, match="multiple"):
        value_output_gram(layer["Wo"], num_heads=HEADS, num_kv_heads=4, head_dim=HD)


# ------------------------------------------------------------------------------------ objectives


@pytest.mark.parametrize("rank", [2, 5, 9, 14])
def test_weighted_care_error_is_its_spectrum_tail_and_beats_plain_care(layer, rank):
    C, Wv = layer["C"], layer["Wv"]
    _, vw = _weights(layer)
    f = care_factorize(Wv, C, rank, damping=0.0, weighting=vw)
    err = weighted_error(Wv, f.weight(), C, vw)
    assert err == pytest.approx(_tail(f.spectrum, rank), rel=1e-6)  # factors are float32
    plain = care_factorize(Wv, C, rank, damping=0.0)
    assert err <= weighted_error(Wv, plain.weight(), C, vw) * (1 + 1e-6)
    # and in its own metric plain CARE wins: the objectives differ
    assert activation_error(Wv, plain.weight(), C) <= activation_error(Wv, f.weight(), C) * (1 + 1e-6)


@pytest.mark.parametrize("emphasis", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("rank", [3, 8, 16])
def test_attention_aware_joint_error_is_its_tail_and_beats_activation_joint(layer, rank, emphasis):
    C, Wk, Wv = layer["C"], layer["Wk"], layer["Wv"]
    kw_, vw = _weights(layer)
    f, m_k = joint_factorize(Wk, Wv, C, rank, damping=0.0, key_weight=kw_, value_weight=vw, key_emphasis=emphasis)
    W_hat = f.weight()
    alpha = math.sqrt(weighted_error(Wk, 0 * Wk, C, kw_) / weighted_error(Wv, 0 * Wv, C, vw)) / emphasis

    def objective(K_hat, V_hat):
        return weighted_error(Wk, K_hat, C, kw_) / alpha**2 + weighted_error(Wv, V_hat, C, vw)

    err = objective(W_hat[:, :m_k], W_hat[:, m_k:])
    assert err == pytest.approx(_tail(f.spectrum, rank), rel=1e-6)  # factors are float32
    plain, _ = joint_factorize(Wk, Wv, C, rank, damping=0.0)
    P = plain.weight()
    assert err <= objective(P[:, :m_k], P[:, m_k:]) * (1 + 1e-6)


def test_key_emphasis_trades_value_error_for_key_error(layer):
    C, Wk, Wv = layer["C"], layer["Wk"], layer["Wv"]
    errs = []
    for emphasis in (0.25, 1.0, 4.0):
        f, m_k = joint_factorize(Wk, Wv, C, 8, key_emphasis=emphasis)
        W = f.weight()
        errs.append((activation_error(Wk, W[:, :m_k], C), activation_error(Wv, W[:, m_k:], C)))
    assert errs[0][0] > errs[1][0] > errs[2][0]
    assert errs[0][1] < errs[1][1] < errs[2][1]
    with pytest.raises(ValueError, match="key_emphasis"):
        joint_factorize(Wk, Wv, C, 8, key_emphasis=0.0)


def test_weightings_are_checked(layer):
    C, Wk, Wv = layer["C"], layer["Wk"], layer["Wv"]
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="key_weight is 3 wide"):
        joint_factorize(Wk, Wv, C, 4, key_weight=Weighting(eye, eye))
    with pytest.raises(ValueError, match="weighting is 3 wide"):
        care_factorize(Wv, C, 4, weighting=Weighting(eye, eye))


def test_results_are_deterministic(layer):
    kw_, vw = _weights(layer)
    a, _ = joint_factorize(layer["Wk"], layer["Wv"], layer["C"], 6, key_weight=kw_, value_weight=vw)
    b, _ = joint_factorize(layer["Wk"], layer["Wv"], layer["C"], 6, key_weight=kw_, value_weight=vw)
    assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)


# ------------------------------------------------------------------------------------ compensation


@pytest.mark.parametrize("method", ["cholesky", "sqrt"])
def test_compensation_with_an_exact_upstream_is_plain_care(layer, method):
    C, Wk, Wv = layer["C"], layer["Wk"], layer["Wv"]
    plain = care_factorize(Wv, C, 7, method=method)
    comp = care_factorize(Wv, C, 7, method=method, cross=C)
    torch.testing.assert_close(comp.weight(), plain.weight(), rtol=1e-6, atol=1e-8)
    pj, _ = joint_factorize(Wk, Wv, C, 7, method=method)
    cj, _ = joint_factorize(Wk, Wv, C, 7, method=method, cross=C)
    torch.testing.assert_close(cj.weight(), pj.weight(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rank", [3, 8, 16])
def test_compensation_fits_the_original_outputs(layer, rank):
    """Inputs drifted by upstream error: the compensated factors reach the optimum error to the original
    outputs, ‖X̃Ŵ − XW‖²/N = tail + the part no Ŵ can fit, and beat CARE on the drifted inputs alone."""
    X, Wv = layer["X"], layer["Wv"]
    g = torch.Generator().manual_seed(11)
    Xt = X @ (torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(D, D, generator=g, dtype=torch.float64)) \
        + 0.05 * torch.randn(N, D, generator=g, dtype=torch.float64)
    Ct, cross = Xt.T @ Xt / N, Xt.T @ X / N
    comp = care_factorize(Wv, Ct, rank, damping=0.0, cross=cross)
    err = float(((Xt @ comp.weight().double() - X @ Wv) ** 2).sum()) / N
    # the best unconstrained fit W* = C̃⁻¹XᵀX̃... leaves this much
    W_star = torch.linalg.solve(Ct, cross @ Wv)
    floor = float(((Xt @ W_star - X @ Wv) ** 2).sum()) / N
    assert err == pytest.approx(floor + _tail(comp.spectrum, rank), rel=1e-6)
    plain = care_factorize(Wv, Ct, rank, damping=0.0)
    assert err < float(((Xt @ plain.weight().double() - X @ Wv) ** 2).sum()) / N


def test_cross_is_checked(layer):
    with pytest.raises(ValueError, match="cross must be"):
        care_factorize(layer["Wv"], layer["C"], 3, cross=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        care_factorize(layer["Wv"], layer["C"], 3, cross=torch.full((D, D), float("nan")))


# ------------------------------------------------------------------------------------ output refit


def _output_moments(heads: torch.Tensor, y: torch.Tensor) -> OutputMoments:
    n = heads.shape[0]
    return OutputMoments(heads.T @ heads / n, heads.T @ y / n, float(y.pow(2).sum()) / n)


def test_output_refit_of_an_exact_attention_keeps_o_proj(layer):
    """ô = the original heads, y = ô·W_oᵀ: the refit is W_o at any damping, with zero error."""
    heads = layer["X"] @ layer["Wq"]  # any (N, h·d) activations stand for the heads
    W_o = layer["Wo"].T  # (D, h·d), as nn.Linear.weight
    moments = _output_moments(heads, heads @ W_o.T)
    for damping in (0.0, 1e-2, 1.0):
        torch.testing.assert_close(refit_output_weight(moments, W_o, damping), W_o, rtol=1e-7, atol=1e-9)
    assert output_refit_error(moments, W_o) < 1e-12


def test_output_refit_is_the_least_squares_map(layer):
    """Converted heads = the original's through a perturbation plus noise: without damping the refit is the
    least-squares solution (its error, from the moments, equals the error on the data) and beats W_o; damping
    pulls it towards W_o, and its error lies between the two."""
    g = torch.Generator().manual_seed(3)
    heads = layer["X"] @ layer["Wq"]
    W_o = layer["Wo"].T
    y = heads @ W_o.T
    m = heads.shape[1]
    drifted = heads @ (torch.eye(m, dtype=torch.float64) + 0.2 * torch.randn(m, m, generator=g, dtype=torch.float64)) \
        + 0.05 * heads.std() * torch.randn(heads.shape, generator=g, dtype=torch.float64)
    moments = _output_moments(drifted, y)
    refit = refit_output_weight(moments, W_o, 0.0)
    lstsq = torch.linalg.lstsq(drifted, y).solution.T
    torch.testing.assert_close(refit, lstsq, rtol=1e-6, atol=1e-8)
    data_error = float((drifted @ refit.T - y).pow(2).sum() / y.pow(2).sum())
    assert output_refit_error(moments, refit) == pytest.approx(data_error, rel=1e-6)
    before = output_refit_error(moments, W_o)
    assert data_error < 0.5 * before
    damped = output_refit_error(moments, refit_output_weight(moments, W_o, 1.0))
    assert data_error < damped < before
    with pytest.raises(ValueError, match="do not fit o_proj"):
        refit_output_weight(moments, W_o[:, :-1], 0.0)
