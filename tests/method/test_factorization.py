"""Pure-maths tests of care_mla.method.factorization on synthetic activations (no model)."""

from __future__ import annotations

import warnings

import pytest
import torch

from care_mla.method.baselines import asvd_factorize, svd_factorize, svd_llm_factorize
from care_mla.method.factorization import (
    Factors,
    activation_error,
    balance_scale,
    care_factorize,
    joint_factorize,
    joint_factorize_gram,
    stack_gram,
    whitened_spectrum,
    whitening,
)

N, D, M = 2000, 32, 24
RANKS = [1, 4, 8, 12, 16, 20]


def _anisotropic_inputs(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    """X = Z·diag(logspace)·Q plus one dominant, mostly constant direction (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2.5, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ Q
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    amplitude = 6 * (1 + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    return X + amplitude * u


@pytest.fixture(scope="module")
def data():
    X = _anisotropic_inputs(0)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D, M, generator=g, dtype=torch.float64)
    C = X.T @ X / N
    # the optimal rank-r activation errors, independently: PCA of the outputs XW/√N
    out_sq = torch.linalg.svdvals(X @ W / N**0.5) ** 2
    optimal = {r: out_sq[r:].sum().item() for r in range(min(D, M) + 1)}
    return dict(X=X, W=W, C=C, abs_mean=X.abs().mean(0), optimal=optimal)


def _tail(spectrum: torch.Tensor, r: int) -> float:
    return (spectrum.double()[r:] ** 2).sum().item()


# --------------------------------------------------------------------------- data sanity


def test_inputs_are_strongly_anisotropic(data):
    evals = torch.linalg.eigvalsh(data["C"])
    assert evals[-1] / evals.sum() > 0.5  # one dominant direction
    assert evals[-1] / evals[0] > 1e5  # ill-conditioned


# --------------------------------------------------------------------------- whitening


@pytest.mark.parametrize("method", ["cholesky", "sqrt"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_whitening_identity(data, method, damping):
    C = data["C"]
    S, S_inv = whitening(C, method=method, damping=damping)
    assert S.dtype == torch.float32 and S_inv.dtype == torch.float32
    target = C + damping * C.diagonal().mean() * torch.eye(D, dtype=torch.float64)
    StS = S.double().T @ S.double()
    assert torch.allclose(StS, target, rtol=0, atol=1e-5 * target.abs().max().item())
    eye = torch.eye(D, dtype=torch.float64)
    # S⁻¹ is accurate to float32 rounding amplified by cond(S) ~ 2e3
    assert torch.allclose(S.double() @ S_inv.double(), eye, atol=5e-3)
    if method == "cholesky":
        assert torch.equal(S, torch.triu(S))
    else:
        assert torch.equal(S, S.T)


def test_whitening_float64_inverse_is_tight(data):
    S, S_inv = whitening(data["C"], damping=0.0)
    # float64 maths, float32 output: S⁻¹ computed before rounding, so error is rounding-level
    rel = (S.double() @ S_inv.double() - torch.eye(D, dtype=torch.float64)).abs().max()
    assert rel < 1e-2


def test_cholesky_retries_with_more_damping_and_warns_once():
    # a dead input channel makes C exactly singular
    X = _anisotropic_inputs(3, n=500, d=8)
    X[:, 2] = 0
    C = X.T @ X / X.shape[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S, _ = whitening(C, method="cholesky", damping=0.0)
    relevant = [w for w in caught if "damping" in str(w.message)]
    assert len(relevant) == 1
    assert torch.isfinite(S).all()
    # the dead channel's diagonal of SᵀS is exactly the damping that was added
    StS = S.double().T @ S.double()
    added = StS[2, 2] / C.diagonal().mean()
    assert 0 < added < 1e-5  # some damping was needed, and it stayed small
    assert torch.allclose(StS, C, atol=1e-5 * C.abs().max().item())


def test_svd_llm_handles_singular_covariance_silently():
    X = _anisotropic_inputs(4, n=500, d=8)
    X[:, 5] = 0
    C = X.T @ X / X.shape[0]
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = svd_llm_factorize(W, C, 3)
    opt = (torch.linalg.svdvals(X @ W / X.shape[0] ** 0.5) ** 2)[3:].sum().item()
    assert activation_error(W, f.weight(), C) == pytest.approx(opt, rel=1e-4)


# --------------------------------------------------------------------------- CARE optimality


@pytest.mark.parametrize("method", ["cholesky", "sqrt"])
@pytest.mark.parametrize("r", RANKS)
def test_care_error_is_whitened_tail_and_optimal(data, method, r):
    W, C = data["W"], data["C"]
    f = care_factorize(W, C, r, method=method, damping=0.0)
    err = activation_error(W, f.weight(), C)
    assert f.rank == r and f.down.shape == (D, r) and f.up.shape == (r, M)
    assert f.spectrum.shape == (min(D, M),)
    assert err == pytest.approx(_tail(f.spectrum, r), rel=1e-6)
    assert err == pytest.approx(data["optimal"][r], rel=1e-6)


@pytest.mark.parametrize("r", RANKS)
def test_care_beats_weight_svd_and_asvd(data, r):
    W, C = data["W"], data["C"]
    care = activation_error(W, care_factorize(W, C, r, damping=0.0).weight(), C)
    svd = activation_error(W, svd_factorize(W, r).weight(), C)
    asvd = activation_error(W, asvd_factorize(W, data["abs_mean"], r).weight(), C)
    # strict and by a wide margin on these inputs (the data are built to make it so)
    assert care < 0.5 * svd
    assert care < 0.5 * asvd


@pytest.mark.parametrize("r", RANKS)
def test_cholesky_and_sqrt_agree_undamped(data, r):
    W, C = data["W"], data["C"]
    e_chol = activation_error(W, care_factorize(W, C, r, method="cholesky", damping=0).weight(), C)
    e_sqrt = activation_error(W, care_factorize(W, C, r, method="sqrt", damping=0).weight(), C)
    assert e_chol == pytest.approx(e_sqrt, rel=1e-6)
    s_chol = whitened_spectrum(W, C, method="cholesky", damping=0)
    s_sqrt = whitened_spectrum(W, C, method="sqrt", damping=0)
    assert torch.allclose(s_chol, s_sqrt, rtol=1e-5)


@pytest.mark.parametrize("method", ["cholesky", "sqrt"])
@pytest.mark.parametrize("r", RANKS)
def test_damped_care_is_near_optimal(data, method, r):
    """With damping δ the result is optimal for C + δI; that bounds its excess error on C:

    opt ≤ err(Ŵ_δ) ≤ opt + δ‖W − Ŵ_opt‖²_F, and err(Ŵ_δ) + δ‖W − Ŵ_δ‖² = tail of its spectrum.
    """
    W, C = data["W"], data["C"]
    damping = 1e-2
    delta = damping * C.diagonal().mean().item()
    opt = data["optimal"][r]
    f = care_factorize(W, C, r, method=method, damping=damping)
    W_hat = f.weight().double()
    err = activation_error(W, W_hat, C)
    assert err == pytest.approx(
        _tail(f.spectrum, r) - delta * ((W - W_hat) ** 2).sum().item(), rel=1e-5
    )
    W_opt = care_factorize(W, C, r, method=method, damping=0.0).weight().double()
    bound = delta * ((W - W_opt) ** 2).sum().item()
    assert opt * (1 - 1e-6) <= err <= opt + bound * (1 + 1e-6)
    if r <= 4:  # where the kept directions dwarf the damping, the loss is negligible
        assert err == pytest.approx(opt, rel=1e-2)


@pytest.mark.parametrize("r", [2, 8, 16])
def test_svd_llm_matches_undamped_care(data, r):
    W, C = data["W"], data["C"]
    e = activation_error(W, svd_llm_factorize(W, C, r).weight(), C)
    assert e == pytest.approx(data["optimal"][r], rel=1e-4)


def test_whitened_spectrum_matches_factor_spectrum(data):
    W, C = data["W"], data["C"]
    for method in ("cholesky", "sqrt"):
        s = whitened_spectrum(W, C, method=method)
        f = care_factorize(W, C, 5, method=method)
        assert s.dtype == torch.float32 and s.shape == (min(D, M),)
        assert torch.allclose(s, f.spectrum, rtol=1e-6)
        assert torch.all(s[1:] <= s[:-1])


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("r", [3, 10])
def test_svd_error_is_weight_tail(data, r):
    W = data["W"]
    f = svd_factorize(W, r)
    err = ((W - f.weight().double()) ** 2).sum().item()
    assert err == pytest.approx(_tail(f.spectrum, r), rel=1e-6)
    assert torch.allclose(f.spectrum.double(), torch.linalg.svdvals(W), rtol=1e-6)
    # Σ lives in down: up has orthonormal rows
    assert torch.allclose(f.up.double() @ f.up.double().T, torch.eye(r, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("r", [3, 10])
def test_asvd_error_is_scaled_tail(data, r):
    W, am = data["W"], data["abs_mean"]
    alpha = 0.5
    f = asvd_factorize(W, am, r, alpha=alpha)
    s = am**alpha
    err = (((W - f.weight().double()) * s[:, None]) ** 2).sum().item()
    assert err == pytest.approx(_tail(f.spectrum, r), rel=1e-5)
    # alpha = 0 is plain weight SVD
    assert torch.allclose(asvd_factorize(W, am, r, alpha=0.0).weight(), svd_factorize(W, r).weight(), atol=1e-5)


def test_asvd_survives_dead_channels(data):
    W, am = data["W"], data["abs_mean"].clone()
    am[0] = 0.0
    f = asvd_factorize(W, am, 6)
    assert torch.isfinite(f.down).all() and torch.isfinite(f.up).all()


# --------------------------------------------------------------------------- exactness & edge cases


@pytest.mark.parametrize(
    "factorize",
    [
        lambda W, C, am, r: care_factorize(W, C, r),
        lambda W, C, am, r: care_factorize(W, C, r, method="sqrt"),
        lambda W, C, am, r: svd_factorize(W, r),
        lambda W, C, am, r: asvd_factorize(W, am, r),
        lambda W, C, am, r: svd_llm_factorize(W, C, r),
    ],
    ids=["care-cholesky", "care-sqrt", "svd", "asvd", "svd-llm"],
)
def test_full_rank_reproduces_and_rank_zero_is_empty(data, factorize):
    W, C, am = data["W"], data["C"], data["abs_mean"]
    full = factorize(W, C, am, min(D, M))
    assert (full.weight().double() - W).abs().max() <= 1e-5
    zero = factorize(W, C, am, 0)
    assert zero.down.shape == (D, 0) and zero.up.shape == (0, M) and zero.rank == 0
    assert zero.weight().shape == (D, M) and not zero.weight().any()
    assert zero.down.dtype == zero.up.dtype == zero.spectrum.dtype == torch.float32


def test_tall_and_wide_weights():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64)
    C = X.T @ X / 300
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)  # D < m
    f = care_factorize(W, C, 6, damping=0)
    assert f.spectrum.shape == (6,)
    assert (f.weight().double() - W).abs().max() <= 1e-5


def test_invalid_arguments_raise(data):
    W, C = data["W"], data["C"]
    with pytest.raises(ValueError, match=r"rank 25 exceeds min\(D, m\) = 24"):
        care_factorize(W, C, 25)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        svd_factorize(W, -1)
    with pytest.raises(TypeError):
        svd_factorize(W, 2.0)
    with pytest.raises(ValueError, match="square"):
        care_factorize(W, C[:, :5], 2)
    with pytest.raises(ValueError, match="D = 32"):
        care_factorize(W, C[:5, :5], 2)
    asym = C.clone()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        care_factorize(W, asym, 2)
    with pytest.raises(ValueError, match="method"):
        care_factorize(W, C, 2, method="qr")
    with pytest.raises(ValueError, match="damping"):
        care_factorize(W, C, 2, damping=-1.0)
    with pytest.raises(ValueError, match="shape"):
        activation_error(W, W[:, :3], C)
    with pytest.raises(ValueError, match="abs_mean"):
        asvd_factorize(W, data["abs_mean"][:3], 2)
    with pytest.raises(ValueError, match="2-D"):
        svd_factorize(W[0], 1)
    with pytest.raises(ValueError, match=r"rank 57 exceeds min\(D, m\) = 32"):
        joint_factorize(W, W, C, 57)
    with pytest.raises(ValueError, match="same input width"):
        joint_factorize(W, W[:5], C, 2)


def test_float32_compute_close_to_float64(data):
    W, C = data["W"], data["C"]
    f64 = care_factorize(W, C, 6)
    f32 = care_factorize(W, C, 6, compute_dtype=torch.float32)
    e64 = activation_error(W, f64.weight(), C)
    e32 = activation_error(W, f32.weight(), C)
    assert e32 == pytest.approx(e64, rel=1e-3)


# --------------------------------------------------------------------------- determinism


def test_determinism_bitwise(data):
    W, C, am = data["W"], data["C"], data["abs_mean"]
    calls = [
        lambda: care_factorize(W, C, 7),
        lambda: care_factorize(W, C, 7, method="sqrt"),
        lambda: svd_factorize(W, 7),
        lambda: asvd_factorize(W, am, 7),
        lambda: svd_llm_factorize(W, C, 7),
        lambda: joint_factorize(W[:, :10], W[:, 10:], C, 7)[0],
    ]
    for call in calls:
        a, b = call(), call()
        for x, y in ((a.down, b.down), (a.up, b.up), (a.spectrum, b.spectrum)):
            assert torch.equal(x, y)


def test_sign_convention(data):
    """Largest-|.| entry of each U column is positive: U Σ = S·down (CARE), = down (SVD)."""
    W, C = data["W"], data["C"]
    f = svd_factorize(W, 9)
    cols = f.down.double()
    assert (cols.gather(0, cols.abs().argmax(0, keepdim=True)) > 0).all()
    g = care_factorize(W, C, 9, method="sqrt")
    S, _ = whitening(C, method="sqrt")
    cols = S.double() @ g.down.double()
    assert (cols.gather(0, cols.abs().argmax(0, keepdim=True)) > 0).all()
    # and the sign choice changes nothing but the signs: flipping W's sign flips up only
    h = svd_factorize(-W, 9)
    assert torch.allclose(h.down, f.down, atol=1e-5) and torch.allclose(h.up, -f.up, atol=1e-5)


# --------------------------------------------------------------------------- K/V: balance & joint


@pytest.fixture(scope="module")
def kv(data):
    g = torch.Generator().manual_seed(2)
    W_k = 5.0 * torch.randn(D, 16, generator=g, dtype=torch.float64)  # K louder than V
    W_v = torch.randn(D, 16, generator=g, dtype=torch.float64)
    return W_k, W_v


def _c_norm(W, C):
    return torch.sqrt(torch.trace(W.T @ C @ W)).item()


def test_balance_scale(data, kv):
    C = data["C"]
    W_k, W_v = kv
    alpha = balance_scale(W_k, W_v, C)
    assert _c_norm(W_k / alpha, C) == pytest.approx(_c_norm(W_v, C), rel=1e-9)
    assert alpha > 1
    assert balance_scale(3 * W_k, W_v, C) == pytest.approx(3 * alpha, rel=1e-9)
    assert balance_scale(torch.zeros_like(W_k), W_v, C) == 1.0
    assert balance_scale(W_k, torch.zeros_like(W_v), C) == 1.0


@pytest.mark.parametrize("balance", [False, True])
def test_joint_full_rank_is_exact(data, kv, balance):
    C = data["C"]
    W_k, W_v = kv
    f, m_k = joint_factorize(W_k, W_v, C, 32, balance=balance)
    assert m_k == 16 and f.up.shape == (32, 32)
    Wh = f.weight().double()
    assert (Wh[:, :m_k] - W_k).abs().max() <= 1e-4  # |W_k| ~ 5× larger entries
    assert (Wh[:, m_k:] - W_v).abs().max() <= 1e-5
    assert torch.allclose(f.down.double() @ f.up.double()[:, :m_k], W_k, atol=1e-4)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("r", [4, 8, 16, 24])
def test_joint_beats_separate_at_same_width(data, kv, r, damping):
    """One latent of width r is optimal for the stacked objective, so it is at least as good
    as separate K and V latents of r/2 each (a block-diagonal rank-r candidate)."""
    C = data["C"]
    W_k, W_v = kv
    f, m_k = joint_factorize(W_k, W_v, C, r, balance=False, damping=damping)
    Wh = f.weight().double()
    fk = care_factorize(W_k, C, r // 2, damping=damping)
    fv = care_factorize(W_v, C, r // 2, damping=damping)
    if damping == 0:
        joint = activation_error(W_k, Wh[:, :m_k], C) + activation_error(W_v, Wh[:, m_k:], C)
        separate = activation_error(W_k, fk.weight(), C) + activation_error(W_v, fv.weight(), C)
    else:  # compare in the damped (whitened) objective that both optimise
        Cd = C + damping * C.diagonal().mean() * torch.eye(D, dtype=torch.float64)
        joint = activation_error(W_k, Wh[:, :m_k], Cd) + activation_error(W_v, Wh[:, m_k:], Cd)
        separate = activation_error(W_k, fk.weight(), Cd) + activation_error(W_v, fv.weight(), Cd)
        assert joint == pytest.approx(_tail(f.spectrum, r), rel=1e-5)
    assert joint <= separate * (1 + 1e-9)
    assert joint < 0.99 * separate  # on these inputs it is strictly better


def test_joint_balanced_error_is_balanced_tail(data, kv):
    C = data["C"]
    W_k, W_v = kv
    alpha = balance_scale(W_k, W_v, C)
    f, m_k = joint_factorize(W_k, W_v, C, 10, balance=True, damping=0.0)
    Wh = f.weight().double()
    balanced = activation_error(W_k, Wh[:, :m_k], C) / alpha**2 + activation_error(W_v, Wh[:, m_k:], C)
    assert balanced == pytest.approx(_tail(f.spectrum, 10), rel=1e-6)
    # balancing gives V a larger share than the unbalanced joint latent does
    g, _ = joint_factorize(W_k, W_v, C, 10, balance=False, damping=0.0)
    v_bal = activation_error(W_v, Wh[:, m_k:], C)
    v_unbal = activation_error(W_v, g.weight().double()[:, m_k:], C)
    assert v_bal < v_unbal


def test_factors_validation_and_weight():
    with pytest.raises(ValueError, match="inner dimensions"):
        Factors(down=torch.zeros(4, 2), up=torch.zeros(3, 5), spectrum=torch.zeros(4))
    f = Factors(down=torch.ones(4, 2), up=torch.ones(2, 5), spectrum=torch.zeros(4))
    assert f.rank == 2 and torch.equal(f.weight(), torch.full((4, 5), 2.0))


# --------------------------------------------------------------------------- K/V: from the stack's Gram


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("weighted,emphasis,balance", [(False, 1.0, True), (True, 4.0, True), (True, 2.0, False)])
@pytest.mark.parametrize("r", [1, 8, 24, 32])
def test_joint_from_the_gram_is_the_whitened_svds_latent(data, kv, damping, weighted, emphasis, balance, r):
    """The eigenvectors of AᵀSᵀSA give the latent the SVD of S·A gives (down·up to float32 rounding, the spectrum
    to 1e-6 of its largest value) on strongly anisotropic inputs, with and without weightings, for both
    whitenings."""
    C = data["C"]
    W_k, W_v = kv
    kwargs = dict(key_emphasis=emphasis, balance=balance)
    if weighted:
        g = torch.Generator().manual_seed(5)
        kwargs |= dict(key_weight=_weighting(16, g), value_weight=_weighting(16, g))
    gram = stack_gram(W_k, W_v, C, damping=damping)
    for method in ("cholesky", "sqrt"):
        want, m_k = joint_factorize(W_k, W_v, C, r, damping=damping, method=method, compute_dtype=torch.float64,
                                    **kwargs)
        got, m_k2 = joint_factorize_gram(W_k, W_v, gram, r, **kwargs)
        assert m_k == m_k2 == 16 and got.down.shape == want.down.shape and got.up.shape == want.up.shape
        w, g_ = want.weight().double(), got.weight().double()
        assert (w - g_).norm() <= 1e-5 * w.norm()  # the factors are float32
        assert (want.spectrum - got.spectrum).abs().max() <= 1e-6 * want.spectrum.max()


def _weighting(m: int, g: torch.Generator):
    from care_mla.method.objectives import Weighting

    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    T = Q * torch.logspace(0, 1, m, dtype=torch.float64) @ Q.T
    return Weighting(matrix=T, inverse=torch.linalg.inv(T))


def test_joint_from_the_gram_refuses_another_stack(data, kv):
    C = data["C"]
    W_k, W_v = kv
    gram = stack_gram(W_k, W_v, C)
    with pytest.raises(ValueError, match="not the stack of this Gram"):
        joint_factorize_gram(W_k[:, :8], W_v, gram, 4)
    with pytest.raises(ValueError, match="exceeds"):
        joint_factorize_gram(W_k, W_v, gram, 33)
    with pytest.raises(ValueError, match="key_emphasis"):
        joint_factorize_gram(W_k, W_v, gram, 4, key_emphasis=0.0)
