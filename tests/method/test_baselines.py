"""The MHA2MLA (joint weight SVD) and TransMLA (output PCA) baselines: maths, settings, conversion."""

from __future__ import annotations

import pytest
import torch
from conftest import settings_for

from care_mla.method.baselines import mha2mla_factorize, svd_factorize, transmla_factorize, transmla_joint_factorize
from care_mla.method.factorization import activation_error, balance_scale, care_factorize
from care_mla.pipeline import convert as api
from care_mla.settings import ConvertSettings, SettingsError

N, D, M = 3000, 24, 16


def _inputs(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    """Anisotropic inputs with one dominant direction (as LLM attention inputs have)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64) @ Q
    return X + 5 * torch.randn(d, generator=g, dtype=torch.float64) / d**0.5


@pytest.fixture(scope="module")
def data():
    X = _inputs(0)
    g = torch.Generator().manual_seed(1)
    W_k = torch.randn(D, M, generator=g, dtype=torch.float64) * 3
    W_v = torch.randn(D, M, generator=g, dtype=torch.float64)
    return dict(X=X, C=X.T @ X / N, W_k=W_k, W_v=W_v)


def _direct_pca(Y: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-r right singular vectors of the sampled outputs Y (N, m): PCA without forming WᵀCW."""
    return torch.linalg.svd(Y, full_matrices=False)[2][:rank].T


@pytest.mark.parametrize("rank", [1, 4, 9, 16])
def test_transmla_is_the_pca_of_sampled_outputs(data, rank):
    X, W, C = data["X"], data["W_k"], data["C"]
    f = transmla_factorize(W, C, rank)
    U = _direct_pca(X @ W, rank)
    assert f.down.shape == (D, rank) and f.up.shape == (rank, M)
    # same projector, so the same approximation Ŵ = W·U_r·U_rᵀ (signs of U do not matter)
    assert torch.allclose(f.weight().double(), W @ U @ U.T, atol=1e-4 * W.abs().max().item())
    assert torch.allclose(f.down.double(), W @ f.up.double().T, atol=1e-5)  # down = W·U_r
    sigma = torch.linalg.svdvals(X @ W / N**0.5)
    assert torch.allclose(f.spectrum.double(), sigma, rtol=1e-4)
    # the error of the sampled outputs is the Eckart–Young optimum: the tail of the output spectrum
    err = ((X @ (W - f.weight().double())) ** 2).sum().item() / N
    assert err == pytest.approx((sigma[rank:] ** 2).sum().item(), rel=1e-4, abs=1e-9)


def test_transmla_equals_undamped_care_and_damped_care_is_pca_of_a_ridge_covariance(data):
    W, C = data["W_v"], data["C"]
    for rank in (3, 8):
        pca = transmla_factorize(W, C, rank).weight().double()
        care0 = care_factorize(W, C, rank, damping=0.0).weight().double()
        assert torch.allclose(pca, care0, atol=1e-5 * W.abs().max().item())
        # CARE with damping δ is output PCA on WᵀCW + δ·mean(diag C)·WᵀW, not on WᵀCW
        delta = 0.05
        ridge = C + delta * C.diagonal().mean() * torch.eye(D, dtype=C.dtype)
        care = care_factorize(W, C, rank, damping=delta).weight().double()
        assert torch.allclose(transmla_factorize(W, ridge, rank).weight().double(), care, atol=1e-5 * W.abs().max().item())
        assert activation_error(W, care.float(), C) >= activation_error(W, pca.float(), C) - 1e-9


def test_transmla_needs_no_inverse_of_a_singular_covariance(data):
    X = data["X"][:10]  # 10 samples in 24 dims: C has rank 10
    C, W = X.T @ X / 10, data["W_k"]
    f = transmla_factorize(W, C, 10)
    assert activation_error(W, f.weight(), C) <= 1e-9 * activation_error(W, torch.zeros_like(W), C)
    assert f.spectrum.shape == (M,) and bool((f.spectrum[10:] < 1e-6 * f.spectrum[0]).all())


def test_transmla_full_rank_is_exact_and_deterministic(data):
    W, C = data["W_k"], data["C"]
    f = transmla_factorize(W, C, M)
    assert torch.allclose(f.weight().double(), W, atol=1e-5 * W.abs().max().item())
    g = transmla_factorize(W.clone(), C.clone(), 5)
    assert torch.equal(transmla_factorize(W, C, 5).down, g.down)


def test_transmla_joint_is_the_pca_of_balanced_stacked_outputs(data):
    X, C, W_k, W_v = data["X"], data["C"], data["W_k"], data["W_v"]
    alpha = balance_scale(W_k, W_v, C)
    assert alpha > 2  # K carries more energy: balancing matters here
    for rank in (4, 12):
        f, m_k = transmla_joint_factorize(W_k, W_v, C, rank)
        assert m_k == M and f.up.shape == (rank, 2 * M)
        stacked = torch.cat([W_k / alpha, W_v], dim=1)
        U = _direct_pca(X @ stacked, rank)
        expected = stacked @ U @ U.T
        expected[:, :M] *= alpha
        assert torch.allclose(f.weight().double(), expected, atol=1e-4 * W_k.abs().max().item())
    unbalanced, _ = transmla_joint_factorize(W_k, W_v, C, 4, balance=False)
    U = _direct_pca(X @ torch.cat([W_k, W_v], dim=1), 4)
    expected = torch.cat([W_k, W_v], 1) @ U @ U.T
    assert torch.allclose(unbalanced.weight().double(), expected, atol=1e-4 * W_k.abs().max().item())


@pytest.mark.parametrize("rank", [2, 8, 24])
def test_mha2mla_is_the_weight_svd_of_stacked_kv(data, rank):
    W_k, W_v = data["W_k"], data["W_v"]
    f, m_k = mha2mla_factorize(W_k, W_v, rank)
    stacked = torch.cat([W_k, W_v], dim=1)
    sigma = torch.linalg.svdvals(stacked)
    assert m_k == M and f.rank == rank and torch.allclose(f.spectrum.double(), sigma, rtol=1e-5)
    # Eckart–Young in the weights: no activations, no balancing
    err = ((stacked - f.weight().double()) ** 2).sum().item()
    assert err == pytest.approx((sigma[rank:] ** 2).sum().item(), rel=1e-4, abs=1e-8)
    assert torch.equal(f.down, svd_factorize(stacked, rank).down)


def test_mha2mla_ignores_activations_so_output_pca_wins_on_them(data):
    C, W_k, W_v = data["C"], data["W_k"], data["W_v"]
    stacked = torch.cat([W_k, W_v], dim=1)
    weight_svd, _ = mha2mla_factorize(W_k, W_v, 6)
    pca, _ = transmla_joint_factorize(W_k, W_v, C, 6, balance=False)
    assert activation_error(stacked, pca.weight(), C) < activation_error(stacked, weight_svd.weight(), C)


# ----------------------------------------------------------------------------- settings and conversion


def test_settings_for_joint_capable_methods():
    assert ConvertSettings(method="mha2mla").latent == "joint"  # the only latent it builds
    # the best measured layout is every joint-capable method's default; the others build separate latents
    assert ConvertSettings().latent == ConvertSettings(method="transmla").latent == "joint"
    assert ConvertSettings().allocation == "uniform"  # the joint latent's measured numbers are uniform
    assert ConvertSettings(method="svd").latent == ConvertSettings(method="svd-llm").latent == "separate"
    assert ConvertSettings(method="svd").allocation == "adjusted"
    assert ConvertSettings(method="transmla", latent="separate").latent == "separate"
    with pytest.raises(SettingsError, match="--latent joint"):
        ConvertSettings(method="mha2mla", latent="separate")
    with pytest.raises(SettingsError, match="care, mha2mla, transmla"):
        ConvertSettings(method="svd", latent="joint")
    with pytest.raises(SettingsError, match="decoupled K/V latent is built with --method care"):
        ConvertSettings(method="transmla", latent="decoupled")


@pytest.fixture(scope="module")
def converted(tiny_model_dir, text_file, tmp_path_factory):
    """Factory: the report of converting the tiny qwen2 at F=0.5 (uniform) with `method`/`latent`, memoised."""
    tmp, done = tmp_path_factory.mktemp("baselines"), {}

    def run(method: str, latent: str) -> dict:
        if (method, latent) not in done:
            done[method, latent] = api.convert(settings_for(
                tiny_model_dir("qwen2"), text_file, tmp, out=str(tmp / f"{method}-{latent}"), kv_fraction=0.5,
                method=method, latent=latent, allocation="uniform", evaluate=False))
        return done[method, latent]

    return run


@pytest.mark.parametrize(("method", "latent"), [("mha2mla", "joint"), ("transmla", "joint"), ("transmla", "separate")])
def test_baselines_convert_at_the_budget(method, latent, converted):
    report = converted(method, latent)
    assert sum(sum(r) for r in report["ranks"]) == 3 * 32  # half of 2·2·16 per layer, 3 layers
    care = converted("care", latent)
    for mine, theirs in zip(report["layers"], care["layers"]):
        if method == "transmla":  # the same objective as CARE: only the ridge term differs
            assert mine["v_rel_error"] == pytest.approx(theirs["v_rel_error"], rel=0.1, abs=1e-3)
        else:  # weight SVD: never better than CARE on the activations
            assert mine["v_rel_error"] >= theirs["v_rel_error"] - 1e-9
