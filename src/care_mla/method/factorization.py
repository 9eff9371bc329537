"""Low-rank factorizations of projection weights (CARE.md §1).

Pure functions on tensors, no model code. Conventions:

* a projection is ``y = x @ W`` with ``W`` of shape (D, m), i.e. ``nn.Linear.weight.T``;
* ``C = XᵀX / N`` is the uncentered second moment of the inputs (D, D);
* a rank-r result is ``down`` (D, r) and ``up`` (r, m): ``latent = x @ down``,
  ``y ≈ latent @ up``.

The activation error of an approximation ``Ŵ`` is ``(1/N)‖X(W − Ŵ)‖²_F = ‖S(W − Ŵ)‖²_F``
for any ``S`` with ``SᵀS = C``. CARE takes the SVD ``S·W = UΣVᵀ`` and keeps r terms, which is
the optimum of that objective; the error of the rank-r result is the tail ``Σ_{i>r} σ_i²``
of the whitened spectrum (exactly, when no damping is added to C).

Numerics: the maths runs in float64 when D ≤ 16384 (cheap at these sizes), in float32
otherwise or when ``compute_dtype=torch.float32`` is passed; tensors are returned in float32
on the device of the inputs. SVD signs are fixed (the largest-|.| entry of each column of U
is made positive) so that identical inputs give byte-identical outputs.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from care_mla.method.objectives import Weighting

WhiteningMethod = Literal["cholesky", "sqrt"]


#: Above this input width the maths defaults to float32 instead of float64.
FLOAT64_MAX_DIM = 16384


#: Tolerated asymmetry of C, relative to max|C| (covers float32 accumulation).
_SYMMETRY_RTOL = 1e-4


#: Cholesky retries multiply the relative damping by this factor ...
_DAMPING_GROWTH = 10.0


#: ... starting from at least this relative damping ...
_DAMPING_FIRST_RETRY = 1e-10


#: ... and give up above this one.
_DAMPING_MAX = 1.0


@dataclass(frozen=True)
class Factors:
    """A rank-r factorization ``W ≈ down @ up``.

    ``spectrum`` holds all min(D, m) singular values (descending) of the matrix that was
    truncated: S·W for CARE / SVD-LLM, diag(s)·W for ASVD, W itself for weight SVD.
    """

    down: Tensor  # (D, r)
    up: Tensor  # (r, m)
    spectrum: Tensor  # (min(D, m),)

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2:
            raise ValueError(
                f"down and up must be 2-D, got shapes {tuple(self.down.shape)} and "
                f"{tuple(self.up.shape)}"
            )
        if self.down.shape[1] != self.up.shape[0]:
            raise ValueError(
                f"inner dimensions differ: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )
        if self.spectrum.ndim != 1:
            raise ValueError(f"spectrum must be 1-D, got shape {tuple(self.spectrum.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])

    def weight(self) -> Tensor:
        """``down @ up`` (D, m), multiplied in float64 and returned in down's dtype."""
        return (self.down.double() @ self.up.double()).to(self.down.dtype)


def working_dtype(dim: int, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is None:
        return torch.float64 if dim <= FLOAT64_MAX_DIM else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    return compute_dtype


def check_weight(W: Tensor, name: str = "W") -> None:
    if not isinstance(W, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"{name} must be 2-D (D, m), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_covariance(C: Tensor, dim: int | None) -> None:
    if not isinstance(C, Tensor):
        raise TypeError(f"C must be a torch.Tensor, got {type(C).__name__}")
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square (D, D) matrix, got shape {tuple(C.shape)}")
    if dim is None:
        dim = int(C.shape[0])
    if C.shape[0] != dim:
        raise ValueError(f"C is {tuple(C.shape)} but the weight has D = {dim} input rows")
    if not C.is_floating_point():
        raise ValueError(f"C must be a floating-point tensor, got {C.dtype}")
    if not bool(torch.isfinite(C).all()):
        raise ValueError("C contains NaN or Inf")
    if dim:
        Cd = C.double()
        scale = float(Cd.abs().max())
        asym = float((Cd - Cd.T).abs().max())
        if asym > _SYMMETRY_RTOL * scale:
            raise ValueError(
                f"C is not symmetric: max|C - Cᵀ| = {asym:.3g} vs max|C| = {scale:.3g}; "
                "pass the second moment XᵀX/N"
            )


def check_rank(rank: int, dim: int, width: int) -> int:
    if isinstance(rank, bool):
        raise TypeError("rank must be an int, got bool")
    try:
        r = operator.index(rank)
    except TypeError:
        raise TypeError(f"rank must be an int, got {type(rank).__name__}") from None
    limit = min(dim, width)
    if r < 0:
        raise ValueError(f"rank must be >= 0, got {r}")
    if r > limit:
        raise ValueError(f"rank {r} exceeds min(D, m) = {limit} (D = {dim}, m = {width})")
    return r


def _check_damping(damping: float) -> float:
    d = float(damping)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    return d


def _damping_scale(C: Tensor) -> float:
    """mean(diag C), the unit of the relative damping (1 when C's diagonal is all zero)."""
    if C.shape[0] == 0:
        return 1.0
    s = float(torch.diagonal(C).mean())
    return s if s > 0 else 1.0


def _cholesky_upper(C: Tensor, damping: float, *, warn: bool) -> tuple[Tensor, float]:
    """Upper factor S = Lᵀ of C + δ·mean(diag C)·I, growing δ until Cholesky succeeds."""
    dim = C.shape[0]
    scale = _damping_scale(C)
    eye = torch.eye(dim, dtype=C.dtype, device=C.device)
    d = damping
    while True:
        L, info = torch.linalg.cholesky_ex(C + (d * scale) * eye)
        if int(info) == 0:
            break
        d = max(d * _DAMPING_GROWTH, _DAMPING_FIRST_RETRY)
        if d > _DAMPING_MAX:
            raise ValueError(
                f"Cholesky of C failed even with relative damping {_DAMPING_MAX}: "
                "C is not positive semi-definite"
            )
    if warn and d != damping:
        warnings.warn(
            f"Cholesky of C + {damping:g}·mean(diag C)·I failed (C is singular or not "
            f"positive definite); used relative damping {d:g} instead",
            RuntimeWarning,
            stacklevel=4,
        )
    return L.mT.contiguous(), d


def _sqrt_factor(C: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Symmetric √(C + δ·mean(diag C)·I) and its inverse, eigenvalues floored."""
    dim = C.shape[0]
    eye = torch.eye(dim, dtype=C.dtype, device=C.device)
    evals, evecs = torch.linalg.eigh(C + (damping * _damping_scale(C)) * eye)
    top = float(evals.abs().max()) if dim else 0.0
    floor = max(top, torch.finfo(C.dtype).tiny) * dim * torch.finfo(C.dtype).eps
    root = evals.clamp_min(floor).sqrt()
    S = (evecs * root) @ evecs.mT
    S_inv = (evecs / root) @ evecs.mT
    # exact symmetry (the products above are symmetric only up to rounding)
    return (S + S.mT) / 2, (S_inv + S_inv.mT) / 2


def _whiten_damped(
    C: Tensor, method: str, damping: float, dtype: torch.dtype, *, warn: bool = True
) -> tuple[Tensor, Tensor | None, float]:
    """Whitening factor S (SᵀS = C + δ·mean(diag C)·I) in ``dtype``, S⁻¹ for the symmetric root, and δ·mean(diag C).

    For Cholesky the second item is None: S is upper triangular and S⁻¹ is applied by a
    triangular solve (more accurate than forming the inverse). δ is `damping`, or the larger
    one a failing Cholesky needed.
    """
    Cc = C.to(dtype)
    Cc = (Cc + Cc.mT) / 2
    if method == "cholesky":
        S, d = _cholesky_upper(Cc, damping, warn=warn)
        return S, None, d * _damping_scale(Cc)
    if method == "sqrt":
        return (*_sqrt_factor(Cc, damping), damping * _damping_scale(Cc))
    raise ValueError(f"unknown whitening method {method!r}; use 'cholesky' or 'sqrt'")


def _whiten(
    C: Tensor, method: str, damping: float, dtype: torch.dtype, *, warn: bool = True
) -> tuple[Tensor, Tensor | None]:
    """`_whiten_damped` without the damping."""
    return _whiten_damped(C, method, damping, dtype, warn=warn)[:2]


def whitening(
    C: Tensor,
    *,
    method: WhiteningMethod = "cholesky",
    damping: float = 1e-2,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Whitening factor ``S`` and its inverse, with ``SᵀS = C + damping·mean(diag C)·I``.

    ``method="cholesky"``: ``S = Lᵀ`` (upper triangular) with ``L`` the Cholesky factor;
    if the factorization fails the damping is grown (×10, from at least 1e-10) until it
    succeeds and a single warning names the damping used. ``S_inv`` comes from a
    triangular solve.

    ``method="sqrt"``: the symmetric square root from ``eigh`` (the paper's choice);
    eigenvalues are floored at ``D·eps·λ_max``, so for a singular undamped C the identity
    ``SᵀS = C`` holds only up to that floor.

    Returned in float32 (computed in float64 for D ≤ 16384 unless ``compute_dtype`` says
    otherwise).
    """
    check_covariance(C, None)
    damping = _check_damping(damping)
    dtype = working_dtype(C.shape[0], compute_dtype)
    S, S_inv = _whiten(C, method, damping, dtype)
    if S_inv is None:  # Cholesky: S is upper triangular
        eye = torch.eye(S.shape[0], dtype=dtype, device=S.device)
        S_inv = torch.linalg.solve_triangular(S, eye, upper=True)
    return S.float(), S_inv.float()


def fixed_sign_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD with deterministic signs: the largest-|.| entry of each U column is > 0."""
    U, sigma, Vh = torch.linalg.svd(A, full_matrices=False)
    if U.shape[1]:
        idx = U.abs().argmax(dim=0, keepdim=True)
        signs = torch.gather(U, 0, idx).squeeze(0).sign()
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        U = U * signs
        Vh = Vh * signs[:, None]
    return U, sigma, Vh


def truncate(U: Tensor, sigma: Tensor, Vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U_r Σ_r, V_rᵀ)."""
    return U[:, :rank] * sigma[:rank], Vh[:rank]


def factors_of(down: Tensor, up: Tensor, spectrum: Tensor) -> Factors:
    """Package compute-dtype results as float32 Factors."""
    return Factors(
        down=down.float().contiguous(),
        up=up.float().contiguous(),
        spectrum=spectrum.float().contiguous(),
    )


def whitened_factors(
    W: Tensor,
    C: Tensor,
    rank: int,
    method: str,
    damping: float,
    compute_dtype: torch.dtype | None,
    *,
    warn: bool = True,
    cross: Tensor | None = None,
    right: Weighting | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CARE on validated inputs: SVD of S·W, down = S⁻¹U_rΣ_r, up = V_rᵀ (compute dtype).

    With `cross` (X = X̃ᵀX/N): SVD of S⁻ᵀ(X + δI)W instead of S·W (`care_factorize`); with a
    `right` weighting T: of (…)·T, and up = V_rᵀT⁻¹.
    """
    dtype = working_dtype(W.shape[0], compute_dtype)
    S, S_inv, delta = _whiten_damped(C, method, damping, dtype, warn=warn)
    Wd = W.to(dtype)
    if cross is None:
        target = S @ Wd
    else:
        Xd = cross.to(dtype)
        B = Xd @ Wd + delta * Wd
        target = torch.linalg.solve_triangular(S.mT, B, upper=False) if S_inv is None else S_inv @ B
    if right is not None:
        target = target @ right.matrix.to(dtype)
    U, sigma, Vh = fixed_sign_svd(target)
    left, up = truncate(U, sigma, Vh, rank)
    if right is not None:
        up = up @ right.inverse.to(dtype)
    if S_inv is None:
        down = torch.linalg.solve_triangular(S, left, upper=True)
    else:
        down = S_inv @ left
    return down, up, sigma


def _check_cross(cross: Tensor | None, dim: int) -> None:
    if cross is None:
        return
    if not isinstance(cross, Tensor) or cross.shape != (dim, dim):
        raise ValueError(f"cross must be a ({dim}, {dim}) tensor X̃ᵀX/N, got "
                         f"{tuple(cross.shape) if isinstance(cross, Tensor) else type(cross).__name__}")
    if not bool(torch.isfinite(cross).all()):
        raise ValueError("cross contains NaN or Inf")


def _check_weighting(weighting: Weighting | None, width: int, name: str) -> None:
    if weighting is not None and weighting.width != width:
        raise ValueError(f"{name} is {weighting.width} wide but the projection has {width} output columns")


def care_factorize(
    W: Tensor,
    C: Tensor,
    rank: int,
    *,
    method: WhiteningMethod = "cholesky",
    damping: float = 1e-2,
    compute_dtype: torch.dtype | None = None,
    cross: Tensor | None = None,
    weighting: Weighting | None = None,
) -> Factors:
    """CARE: the rank-r ``Ŵ`` minimising ``‖S(W − Ŵ)‖_F`` with ``SᵀS = C + damping·mean(diag C)·I``.

    SVD ``S·W = UΣVᵀ``; ``down = S⁻¹U_rΣ_r`` (D, r), ``up = V_rᵀ`` (r, m). Cholesky and the
    symmetric square root reach the same optimum (S differs by an orthogonal factor);
    with ``damping=0`` and full-rank C the activation error equals the spectrum's tail.

    Error compensation (`cross`): when the converted model's layer sees inputs X̃ (second moment
    C = X̃ᵀX̃/N) instead of the original X, pass ``cross = X̃ᵀX/N``; the factors then minimise
    ``(1/N)‖X̃Ŵ − XW‖² + δ‖S₀(Ŵ − W)‖²``-style error to the *original* outputs, in closed form: the
    SVD of ``S⁻ᵀ(X + δ·mean(diag C)·I)W``. With ``cross = C`` (an exact upstream) it is plain CARE.

    Attention-aware objective (`weighting`, from `objectives`): minimise ``‖S(W − Ŵ)T‖_F``;
    SVD of ``S·W·T``, ``up = V_rᵀT⁻¹``. The spectrum is then that of the weighted matrix, whose
    tail is the weighted error (`objectives.weighted_error`).
    """
    check_weight(W)
    check_covariance(C, W.shape[0])
    _check_cross(cross, W.shape[0])
    _check_weighting(weighting, W.shape[1], "weighting")
    r = check_rank(rank, *W.shape)
    return factors_of(*whitened_factors(W, C, r, method, _check_damping(damping), compute_dtype, cross=cross, right=weighting))


def _check_kv(W_k: Tensor, W_v: Tensor, C: Tensor) -> None:
    """W_k (D, m_k) and W_v (D, m_v) finite with one input width D, and C a D×D second moment."""
    check_weight(W_k, "W_k")
    check_weight(W_v, "W_v")
    if W_k.shape[0] != W_v.shape[0]:
        raise ValueError(
            f"W_k {tuple(W_k.shape)} and W_v {tuple(W_v.shape)} must have the same input width D"
        )
    check_covariance(C, W_k.shape[0])


def check_joint(W_k: Tensor, W_v: Tensor, C: Tensor, rank: int) -> tuple[int, int]:
    """(m_k, rank) of a joint K/V factorization, after checking the shapes agree."""
    _check_kv(W_k, W_v, C)
    m_k = int(W_k.shape[1])
    return m_k, check_rank(rank, W_k.shape[0], m_k + W_v.shape[1])


def _check_emphasis(key_emphasis: float) -> float:
    emphasis = float(key_emphasis)
    if not math.isfinite(emphasis) or emphasis <= 0:
        raise ValueError(f"key_emphasis must be a finite number > 0, got {key_emphasis}")
    return emphasis


def _unweighted_up(up: Tensor, m_k: int, alpha: float, key_weight: Weighting | None,
                   value_weight: Weighting | None) -> Tensor:
    """The up-projection of a weighted, balanced stack ``[A_k/α, A_v]`` mapped back to ``[W_k, W_v]``: K's columns
    ``·α·T_k⁻¹``, V's ``·T_v⁻¹``."""
    up_k, up_v = up[:, :m_k] * alpha, up[:, m_k:]
    if key_weight is not None:
        up_k = up_k @ key_weight.inverse.to(up.dtype)
    if value_weight is not None:
        up_v = up_v @ value_weight.inverse.to(up.dtype)
    return torch.cat([up_k, up_v], dim=1)


def joint_factorize(
    W_k: Tensor,
    W_v: Tensor,
    C: Tensor,
    rank: int,
    *,
    balance: bool = True,
    method: WhiteningMethod = "cholesky",
    damping: float = 1e-2,
    compute_dtype: torch.dtype | None = None,
    key_weight: Weighting | None = None,
    value_weight: Weighting | None = None,
    key_emphasis: float = 1.0,
    cross: Tensor | None = None,
) -> tuple[Factors, int]:
    """One latent for K and V (DeepSeek's c_KV): CARE of ``[W_k·T_k/α, W_v·T_v]``.

    ``T_k``, ``T_v`` are the attention-aware weightings (`objectives`; identity when None).
    ``α = balance_scale(W_k·T_k, W_v·T_v, C) / key_emphasis`` when ``balance``, else
    ``1 / key_emphasis``: balanced, K and V enter with equal (weighted) output energy, and
    `key_emphasis` > 1 weighs K's error more. ``up``'s first ``m_k`` columns are mapped back
    (``·T_k⁻¹·α``, V's by ``T_v⁻¹``), so ``latent @ up ≈ [x W_k, x W_v]``. Returns
    ``(factors, m_k)``; split with ``up[:, :m_k]`` (K) and ``up[:, m_k:]`` (V).
    ``factors.spectrum`` is the whitened spectrum of the weighted, balanced stack, whose tail
    is the error of its objective ``‖S(W_k − Ŵ_k)T_k‖²/α² + ‖S(W_v − Ŵ_v)T_v‖²``.
    `cross` compensates upstream error as in `care_factorize`.
    """
    m_k, r = check_joint(W_k, W_v, C, rank)
    damping = _check_damping(damping)
    _check_cross(cross, W_k.shape[0])
    _check_weighting(key_weight, m_k, "key_weight")
    _check_weighting(value_weight, W_v.shape[1], "value_weight")
    emphasis = _check_emphasis(key_emphasis)
    dtype = working_dtype(W_k.shape[0], compute_dtype)
    A_k, A_v = W_k.to(dtype), W_v.to(dtype)
    if key_weight is not None:
        A_k = A_k @ key_weight.matrix.to(dtype)
    if value_weight is not None:
        A_v = A_v @ value_weight.matrix.to(dtype)
    alpha = (balance_scale(A_k, A_v, C) if balance else 1.0) / emphasis
    down, up, sigma = whitened_factors(torch.cat([A_k / alpha, A_v], dim=1), C, r, method, damping, compute_dtype,
                            cross=cross)
    return factors_of(down, _unweighted_up(up, m_k, alpha, key_weight, value_weight), sigma), m_k


def whitened_spectrum(
    W: Tensor,
    C: Tensor,
    *,
    method: WhiteningMethod = "cholesky",
    damping: float = 1e-2,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Singular values (descending, float32) of ``S·W``, without building factors."""
    check_weight(W)
    check_covariance(C, W.shape[0])
    damping = _check_damping(damping)
    dtype = working_dtype(W.shape[0], compute_dtype)
    S, _ = _whiten(C, method, damping, dtype)
    return torch.linalg.svdvals(S @ W.to(dtype)).float()


def _c_norm_sq(W: Tensor, C: Tensor, dtype: torch.dtype) -> float:
    """trace(Wᵀ C W), i.e. (1/N)‖XW‖²_F."""
    Wd = W.to(dtype)
    return float(((C.to(dtype) @ Wd) * Wd).sum())


def activation_error(
    W: Tensor, W_hat: Tensor, C: Tensor, *, compute_dtype: torch.dtype | None = None
) -> float:
    """``(1/N)‖X(W − Ŵ)‖²_F = trace((W − Ŵ)ᵀ C (W − Ŵ))``, computed from C."""
    check_weight(W)
    check_weight(W_hat, "W_hat")
    if W.shape != W_hat.shape:
        raise ValueError(f"W {tuple(W.shape)} and W_hat {tuple(W_hat.shape)} differ in shape")
    check_covariance(C, W.shape[0])
    dtype = working_dtype(W.shape[0], compute_dtype)
    return _c_norm_sq(W.to(dtype) - W_hat.to(dtype), C, dtype)


def balance_scale(
    W_k: Tensor, W_v: Tensor, C: Tensor, *, compute_dtype: torch.dtype | None = None
) -> float:
    """α with ``‖W_k‖_C / α = ‖W_v‖_C``, where ``‖W‖_C = sqrt(trace(WᵀCW))`` (output RMS).

    Dividing K by α gives K and V equal output energy in a joint latent. Returns 1.0 when
    either norm is zero.
    """
    _check_kv(W_k, W_v, C)
    dtype = working_dtype(W_k.shape[0], compute_dtype)
    nk = _c_norm_sq(W_k, C, dtype)
    nv = _c_norm_sq(W_v, C, dtype)
    if nk <= 0 or nv <= 0:
        return 1.0
    return math.sqrt(nk / nv)



@dataclass(frozen=True)
class StackGram:
    """The second moments of a layer's K/V stack ``W = [W_k W_v]`` (D, m) that every joint factorization of it
    reads, whatever its weightings and balance: ``moment = WᵀCW`` and ``damped = Wᵀ(C + δ·mean(diag C)·I)W``
    (m, m), with ``m_k`` K columns. Made once per layer (`stack_gram`, a D²·m product), they let each further
    candidate factorize at m³ cost (`joint_factorize_gram`) instead of whitening and taking the SVD of a D × m
    matrix."""

    moment: Tensor  # (m, m)
    damped: Tensor  # (m, m)
    m_k: int


def stack_gram(W_k: Tensor, W_v: Tensor, C: Tensor, *, damping: float = 1e-2,
               compute_dtype: torch.dtype | None = None) -> StackGram:
    """`StackGram` of ``[W_k W_v]`` on the second moment C, damped as `whitening` damps (in the compute dtype of
    `working_dtype`)."""
    _check_kv(W_k, W_v, C)
    damping = _check_damping(damping)
    dtype = working_dtype(W_k.shape[0], compute_dtype)
    W = torch.cat([W_k, W_v], dim=1).to(dtype)
    Cd = C.to(dtype)
    Cd = (Cd + Cd.mT) / 2
    moment = W.mT @ (Cd @ W)
    moment = (moment + moment.mT) / 2
    damped = moment + (damping * _damping_scale(Cd)) * (W.mT @ W) if damping else moment
    return StackGram(moment=moment, damped=damped, m_k=int(W_k.shape[1]))


def _sandwich(M: Tensor, key: Weighting | None, value: Weighting | None, m_k: int) -> Tensor:
    """``Tᵀ M T`` for ``T = block-diag(key, value)`` (identity where None), block by block."""
    Tk = None if key is None else key.matrix.to(M.dtype)
    Tv = None if value is None else value.matrix.to(M.dtype)
    left = M.clone()
    if Tk is not None:
        left[:m_k] = Tk.mT @ M[:m_k]
    if Tv is not None:
        left[m_k:] = Tv.mT @ M[m_k:]
    out = left.clone()
    if Tk is not None:
        out[:, :m_k] = left[:, :m_k] @ Tk
    if Tv is not None:
        out[:, m_k:] = left[:, m_k:] @ Tv
    return (out + out.mT) / 2


def _weighted_energy(M: Tensor, weighting: Weighting | None) -> float:
    """``trace(Tᵀ M T)`` (T = I when None)."""
    if weighting is None:
        return float(M.diagonal().sum())
    T = weighting.matrix.to(M.dtype)
    return float(((M @ T) * T).sum())


def joint_factorize_gram(
    W_k: Tensor,
    W_v: Tensor,
    gram: StackGram,
    rank: int,
    *,
    balance: bool = True,
    key_weight: Weighting | None = None,
    value_weight: Weighting | None = None,
    key_emphasis: float = 1.0,
) -> tuple[Factors, int]:
    """`joint_factorize` (Cholesky or symmetric-root whitening: both reach the same optimum; no `cross`) from the
    layer's `StackGram`: the right singular vectors V and values σ of the whitened, weighted, balanced stack
    ``S·A`` are the eigenvectors and roots of ``AᵀSᵀSA`` (m, m), and ``down = S⁻¹U_rΣ_r = A·V_r`` needs no S.

    The same rank-r ``down @ up`` as `joint_factorize` to rounding (the spectrum's smallest values, which the
    Gram squares, to about √eps of the largest) at m³ instead of D³ + D²·m + D·m² work per call: what makes a
    choice among candidates that share a layer cheap at D = 4096. Signs: the largest-|.| entry of each column of
    V is positive. A Cholesky that needed more damping than the Gram's is not reproduced."""
    m_k = gram.m_k
    m = gram.moment.shape[0]
    if W_k.shape[1] != m_k or m_k + W_v.shape[1] != m or W_k.shape[0] != W_v.shape[0]:
        raise ValueError(f"W_k {tuple(W_k.shape)} and W_v {tuple(W_v.shape)} are not the stack of this Gram "
                         f"({m} columns, {m_k} of K)")
    r = check_rank(rank, W_k.shape[0], m)
    _check_weighting(key_weight, m_k, "key_weight")
    _check_weighting(value_weight, m - m_k, "value_weight")
    emphasis = _check_emphasis(key_emphasis)
    dtype = gram.moment.dtype
    nk = _weighted_energy(gram.moment[:m_k, :m_k], key_weight)
    nv = _weighted_energy(gram.moment[m_k:, m_k:], value_weight)
    alpha = (math.sqrt(nk / nv) if balance and nk > 0 and nv > 0 else 1.0) / emphasis
    scale = torch.ones(m, dtype=dtype, device=gram.moment.device)
    scale[:m_k] = 1 / alpha
    weighted = _sandwich(gram.damped, key_weight, value_weight, m_k) * scale[:, None] * scale[None, :]
    evals, evecs = torch.linalg.eigh(weighted)
    evals, V = evals.flip(0), evecs.flip(1)[:, :r]
    if r:
        idx = V.abs().argmax(dim=0, keepdim=True)
        signs = torch.gather(V, 0, idx).squeeze(0).sign()
        V = V * torch.where(signs == 0, torch.ones_like(signs), signs)
    right = V * scale[:, None]  # (T·diag(scale))·V, then T
    if key_weight is not None:
        right[:m_k] = key_weight.matrix.to(dtype) @ right[:m_k]
    if value_weight is not None:
        right[m_k:] = value_weight.matrix.to(dtype) @ right[m_k:]
    down = W_k.to(dtype) @ right[:m_k] + W_v.to(dtype) @ right[m_k:]
    sigma = evals.clamp_min(0).sqrt()[: min(W_k.shape[0], m)]
    return factors_of(down, _unweighted_up(V.mT, m_k, alpha, key_weight, value_weight), sigma), m_k
