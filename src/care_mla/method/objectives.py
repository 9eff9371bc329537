"""Attention-aware objectives: what an error in K or V costs the attention that reads it (CARE.md §6).

CARE minimises the error of the K/V *activations*, ``‖S(W − Ŵ)‖²_F`` with ``SᵀS = C``. The model
never reads K or V directly:

* K is read through scores ``q·k``. The error ``e = x(W_k − Ŵ_k)`` of KV head g shifts the score of
  query head h (of g's group) by ``q_hᵀ R_Δ e_g``, RoPE rotating by the relative position Δ. Its
  mean square over the calibration queries is ``e_gᵀ R_Δᵀ M_g R_Δ e_g`` with the query Gram
  ``M_g = Σ_{h ∈ g} W_q,hᵀ C W_q,h`` (queries read from the same inputs, hence the same C). Averaged
  over relative positions (``rotary=True``), each RoPE pair's 2×2 block of M keeps only its trace
  half on the diagonal — the rotation-invariant part; its antisymmetric part adds nothing to a
  quadratic form, and the other parts, like the blocks between pairs of different frequencies,
  average out. So K's weight is diagonal: per key dimension, the mean query energy of its pair.
  Without RoPE (``rotary=False``, e.g. the un-rotated part of a decoupled layout) M is used whole.
* V is read through ``o_proj``. The error of KV head g reaches the residual stream as
  ``e_g W_o,h`` for each query head h of its group; treating the heads' attention patterns as
  independent, its mean square is ``e_g (Σ_{h ∈ g} W_o,h W_o,hᵀ) e_gᵀ``.

Both are right-hand weights T with ``TTᵀ = G`` block-diagonal per KV head: the objective
``‖S(W − Ŵ)T‖²_F`` is minimised in closed form by the SVD of ``S·W·T``, up-projection
``V_rᵀT⁻¹`` (a two-sided whitened SVD, `factorization.joint_factorize(key_weight=, value_weight=)`).
Pure functions on tensors; convention ``W`` is (D, m), i.e. ``nn.Linear.weight.T``.

Approximations, stated: query biases (Qwen2) and per-head query norms (Qwen3) are left out of
M (the Gram of the pre-norm, bias-free query); attention patterns are not modelled (V's heads
independent, K's positions uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Weighting", "attention_weightings", "block_weighting", "key_query_gram", "value_output_gram",
           "weighted_error"]

#: Each block's eigenvalues are floored at this fraction of their mean (T must be invertible:
#: directions no query or output head reads would otherwise get weight 0 and an infinite inverse).
WEIGHT_FLOOR = 1e-3


@dataclass(frozen=True)
class Weighting:
    """A right-hand weight ``matrix`` (m, m) and its ``inverse``: the objective is ``‖S(W − Ŵ)·matrix‖²``."""

    matrix: Tensor
    inverse: Tensor

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"a weighting is a square matrix, got shape {tuple(self.matrix.shape)}")
        if self.inverse.shape != self.matrix.shape:
            raise ValueError(f"matrix {tuple(self.matrix.shape)} and inverse {tuple(self.inverse.shape)} differ")

    @property
    def width(self) -> int:
        return int(self.matrix.shape[0])


def _check_heads(width: int, num_heads: int, num_kv_heads: int, head_dim: int, what: str) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a positive multiple of num_kv_heads {num_kv_heads}")
    if width != num_heads * head_dim:
        raise ValueError(f"{what} has {width} query-head columns, expected num_heads·head_dim = "
                         f"{num_heads}·{head_dim}")
    return num_heads // num_kv_heads


def rope_partner(head_dim: int, *, interleaved: bool = False) -> Tensor:
    """Index of each dimension's RoPE partner: ``j ↔ j + d/2`` (rotate_half) or ``2i ↔ 2i + 1``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    idx = torch.arange(head_dim)
    if interleaved:
        return idx ^ 1
    return (idx + head_dim // 2) % head_dim


def key_query_gram(W_q: Tensor, C: Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
                   rotary: bool = True, interleaved: bool = False) -> Tensor:
    """Per KV head, the query Gram ``M_g = Σ_{h ∈ g} W_q,hᵀ C W_q,h`` (g, d, d), float64.

    With ``rotary`` it is averaged over relative positions: diagonal, each entry the mean of its
    RoPE pair's two diagonal entries (pairs per `rope_partner`). Query heads are grouped as in GQA:
    heads ``g·n/g … (g+1)·n/g − 1`` read KV head g.
    """
    group = _check_heads(W_q.shape[1], num_heads, num_kv_heads, head_dim, "W_q")
    if C.shape != (W_q.shape[0], W_q.shape[0]):
        raise ValueError(f"C {tuple(C.shape)} does not match W_q's input width {W_q.shape[0]}")
    Wq = W_q.double().reshape(W_q.shape[0], num_kv_heads, group, head_dim)
    Cd = C.double()
    if rotary:
        energy = torch.einsum("Dgkd,DE,Egkd->gd", Wq, Cd, Wq)  # diag of M_g
        energy = (energy + energy[:, rope_partner(head_dim, interleaved=interleaved)]) / 2
        return torch.diag_embed(energy)
    M = torch.einsum("Dgkd,DE,Egke->gde", Wq, Cd, Wq)
    return (M + M.mT) / 2


def value_output_gram(W_o: Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """Per KV head, ``Σ_{h ∈ g} W_o,h W_o,hᵀ`` (g, d, d), float64; ``W_o`` is ``o_proj.weight.T`` (n·d, D)."""
    group = _check_heads(W_o.shape[0], num_heads, num_kv_heads, head_dim, "W_o")
    Wo = W_o.double().reshape(num_kv_heads, group, head_dim, W_o.shape[1])
    G = torch.einsum("gkdD,gkeD->gde", Wo, Wo)
    return (G + G.mT) / 2


def block_weighting(grams: Tensor, *, floor: float = WEIGHT_FLOOR) -> Weighting:
    """T = block-diag(√G_g) and T⁻¹ from per-head PSD blocks (g, d, d), eigenvalues floored at `floor`·mean.

    Every block is normalised to unit mean eigenvalue first: the weighting then redistributes
    error within a head and between heads, and keeps the overall scale of the activation
    error (the balance between K and V is set separately).
    """
    if grams.ndim != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must be (heads, d, d), got shape {tuple(grams.shape)}")
    if not bool(torch.isfinite(grams).all()):
        raise ValueError("the Gram blocks contain NaN or Inf")
    evals, evecs = torch.linalg.eigh(grams.double())
    evals = evals.clamp_min(0)
    mean = float(evals.mean())
    if mean <= 0:
        raise ValueError("the Gram blocks are all zero: nothing reads this projection")
    evals = (evals / mean).clamp_min(floor)
    root = evals.sqrt()
    T = torch.block_diag(*((evecs * root[:, None, :]) @ evecs.mT))
    T_inv = torch.block_diag(*((evecs / root[:, None, :]) @ evecs.mT))
    return Weighting(matrix=T, inverse=T_inv)


def weighted_error(W: Tensor, W_hat: Tensor, C: Tensor, weighting: Weighting | None = None) -> float:
    """``‖S(W − Ŵ)T‖²_F = trace(Tᵀ(W − Ŵ)ᵀ C (W − Ŵ)T)`` in float64 (T = I without a weighting)."""
    E = W.double() - W_hat.double()
    if weighting is not None:
        E = E @ weighting.matrix.double()
    return float(((C.double() @ E) * E).sum())


def attention_weightings(W_q: Tensor, W_o: Tensor, C: Tensor, *, num_heads: int, num_kv_heads: int,
                         head_dim: int, rotary: bool = True, interleaved: bool = False) -> tuple[Weighting, Weighting]:
    """(key weighting, value weighting) of one attention layer: `key_query_gram` and `value_output_gram`
    as `block_weighting` s. ``W_q`` is (D, n·d) (``q_proj.weight.T``), ``W_o`` (n·d, D) (``o_proj.weight.T``)."""
    heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return (block_weighting(key_query_gram(W_q, C, rotary=rotary, interleaved=interleaved, **heads)),
            block_weighting(value_output_gram(W_o, **heads)))
