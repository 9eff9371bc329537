"""The baselines CARE is compared with, at the same cache width (CARE.md §1): weight SVD (the paper's
"uniform-rank SVD", Palu style), ASVD, SVD-LLM, MHA2MLA (weight SVD of the stacked [W_K W_V]) and TransMLA (PCA of
the K/V outputs). Each returns `factorization.Factors`, like CARE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from care_mla.method.factorization import (
    Factors,
    balance_scale,
    check_covariance,
    check_joint,
    check_rank,
    check_weight,
    factors_of,
    fixed_sign_svd,
    truncate,
    whitened_factors,
    working_dtype,
)


def svd_factorize(W: Tensor, rank: int, *, compute_dtype: torch.dtype | None = None) -> Factors:
    """Weight-only truncated SVD (baseline): ``down = U_rΣ_r``, ``up = V_rᵀ``."""
    check_weight(W)
    r = check_rank(rank, *W.shape)
    dtype = working_dtype(W.shape[0], compute_dtype)
    U, sigma, Vh = fixed_sign_svd(W.to(dtype))
    down, up = truncate(U, sigma, Vh, r)
    return factors_of(down, up, sigma)


def asvd_factorize(
    W: Tensor,
    abs_mean: Tensor,
    rank: int,
    *,
    alpha: float = 0.5,
    compute_dtype: torch.dtype | None = None,
) -> Factors:
    """ASVD baseline: SVD of ``diag(s)·W`` with ``s = mean|x|^alpha`` per input channel.

    ``s`` is clamped to at least ``1e-6·max(s)`` (1 if all zero) so that dead channels do
    not make ``diag(1/s)`` blow up. ``down = diag(1/s)U_rΣ_r``, ``up = V_rᵀ``.
    """
    check_weight(W)
    r = check_rank(rank, *W.shape)
    if not isinstance(abs_mean, Tensor):
        raise TypeError(f"abs_mean must be a torch.Tensor, got {type(abs_mean).__name__}")
    if abs_mean.ndim != 1 or abs_mean.shape[0] != W.shape[0]:
        raise ValueError(
            f"abs_mean must have shape ({W.shape[0]},) to match W {tuple(W.shape)}, "
            f"got {tuple(abs_mean.shape)}"
        )
    if not bool(torch.isfinite(abs_mean).all()) or bool((abs_mean < 0).any()):
        raise ValueError("abs_mean must be finite and non-negative (it is mean|x| per channel)")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    dtype = working_dtype(W.shape[0], compute_dtype)
    s = abs_mean.to(dtype) ** alpha
    top = float(s.max()) if s.numel() else 0.0
    eps = max(1e-6 * top, torch.finfo(dtype).tiny) if top > 0 else 1.0
    s = s.clamp_min(eps)
    U, sigma, Vh = fixed_sign_svd(s[:, None] * W.to(dtype))
    left, up = truncate(U, sigma, Vh, r)
    return factors_of(left / s[:, None], up, sigma)


def svd_llm_factorize(
    W: Tensor, C: Tensor, rank: int, *, compute_dtype: torch.dtype | None = None
) -> Factors:
    """SVD-LLM baseline: Cholesky whitening with damping only as large as needed.

    The objective is the same as CARE's (``‖S(W − Ŵ)‖_F`` with ``SᵀS ≈ C``) and so is the
    optimum; the two differ only in the whitening details: SVD-LLM uses a Cholesky factor
    with the smallest damping that factors (relative damping 1e-6, grown ×10 on failure,
    silently, since that is the method's normal path), whereas CARE uses a fixed, larger
    regulariser (1e-2 by default) and, in the paper, the symmetric square root.
    """
    check_weight(W)
    check_covariance(C, W.shape[0])
    r = check_rank(rank, *W.shape)
    return factors_of(*whitened_factors(W, C, r, "cholesky", 1e-6, compute_dtype, warn=False))


def mha2mla_factorize(
    W_k: Tensor, W_v: Tensor, rank: int, *, compute_dtype: torch.dtype | None = None
) -> tuple[Factors, int]:
    """MHA2MLA-style joint latent (baseline): weight-only SVD of the stacked ``[W_k, W_v]``.

    One truncated SVD of the (D, m_k + m_v) concatenation, no activations and no balancing
    of K against V (MHA2MLA's "SVD-joint"; its partial-RoPE step is not part of this
    factorization: here RoPE stays exact). Returns ``(factors, m_k)`` like
    :func:`joint_factorize`; ``spectrum`` is the weight spectrum of the stack.
    """
    check_weight(W_k, "W_k")
    check_weight(W_v, "W_v")
    if W_k.shape[0] != W_v.shape[0]:
        raise ValueError(
            f"W_k {tuple(W_k.shape)} and W_v {tuple(W_v.shape)} must have the same input width D"
        )
    stacked = torch.cat([W_k, W_v.to(W_k.dtype)], dim=1)
    return svd_factorize(stacked, rank, compute_dtype=compute_dtype), int(W_k.shape[1])


def _output_pca(W: Tensor, C: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(W·U_r, U_rᵀ, √λ) with U, λ the eigenpairs of WᵀCW, descending (compute dtype)."""
    Wd = W.to(dtype)
    Cd = C.to(dtype)
    cov = Wd.mT @ ((Cd + Cd.mT) / 2) @ Wd  # (m, m): second moment of the outputs x·W
    evals, evecs = torch.linalg.eigh((cov + cov.mT) / 2)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    if evecs.shape[1]:  # deterministic signs, as for the SVDs: largest-|.| entry of each column > 0
        idx = evecs.abs().argmax(dim=0, keepdim=True)
        signs = torch.gather(evecs, 0, idx).squeeze(0).sign()
        evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    U = evecs[:, :rank]
    spectrum = evals.clamp_min(0).sqrt()[: min(W.shape)]  # rank(WᵀCW) ≤ min(D, m)
    return Wd @ U, U.mT, spectrum


def transmla_factorize(
    W: Tensor, C: Tensor, rank: int, *, compute_dtype: torch.dtype | None = None
) -> Factors:
    """TransMLA-style output PCA (baseline): keep the top-r principal directions of ``x·W``.

    With ``U_r`` the top-r eigenvectors of the outputs' (uncentered) second moment
    ``WᵀCW = (1/N)(XW)ᵀ(XW)``: ``down = W·U_r`` (D, r), ``up = U_rᵀ`` (r, m), so
    ``Ŵ = W·U_r·U_rᵀ`` projects every output onto its principal subspace. ``spectrum`` is
    √λ (the singular values of ``XW/√N``), comparable with CARE's whitened spectrum.

    How it relates to CARE. Its error ``(1/N)‖X(W − Ŵ)‖²_F = Σ_{i>r} λ_i`` is the
    Eckart–Young optimum for the outputs, so it minimises the *same* activation error as
    CARE and reaches the same minimum. In fact for any invertible S with SᵀS = C, CARE's
    ``down = S⁻¹U_rΣ_r = W·V_r`` with V_r the top eigenvectors of ``WᵀSᵀSW = WᵀCW``: undamped
    CARE on a positive-definite C returns this very factorization. The two differ because
    CARE regularises: it whitens with ``C + δ·mean(diag C)·I``, i.e. it is output PCA on
    ``WᵀCW + δ·mean(diag C)·WᵀW`` — a blend towards weight SVD that keeps directions of
    W that calibration did not excite (δ = 0.01 by default). Output PCA takes C as
    measured, needs no inverse (a singular C is no problem), and computes in the m-wide
    output space; forming WᵀCW squares the condition number, which float64 absorbs at
    these sizes.
    """
    check_weight(W)
    check_covariance(C, W.shape[0])
    r = check_rank(rank, *W.shape)
    return factors_of(*_output_pca(W, C, r, working_dtype(W.shape[0], compute_dtype)))


def transmla_joint_factorize(
    W_k: Tensor,
    W_v: Tensor,
    C: Tensor,
    rank: int,
    *,
    balance: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Factors, int]:
    """TransMLA-style joint latent: output PCA of ``[x·W_k/α, x·W_v]``.

    ``α = balance_scale(W_k, W_v, C)`` when ``balance`` (TransMLA divides K by the ratio of
    the K and V output norms before its PCA), else 1; the K columns of ``up`` are multiplied
    back by α. Returns ``(factors, m_k)`` like :func:`joint_factorize`.
    """
    m_k, r = check_joint(W_k, W_v, C, rank)
    dtype = working_dtype(W_k.shape[0], compute_dtype)
    alpha = balance_scale(W_k, W_v, C) if balance else 1.0
    stacked = torch.cat([W_k.to(dtype) / alpha, W_v.to(dtype)], dim=1)
    down, up, spectrum = _output_pca(stacked, C, r, dtype)
    up = torch.cat([up[:, :m_k] * alpha, up[:, m_k:]], dim=1)
    return factors_of(down, up, spectrum), m_k
