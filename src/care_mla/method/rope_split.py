"""The RoPE split of a decoupled (DeepSeek-style) MLA layout: which key components keep their rotation.

Pure functions of tensors: key pairs as complex numbers, their covariance from the calibration second moment,
per-frequency PCA across KV heads, the scores and global counts that choose the kept components, and the
budget arithmetic of a cache split between ``qk_rope_head_dim`` and ``kv_lora_rank``. The per-layer layouts that
use a split are `care_mla.method.decoupled`; the DeepSeek-V3 format is `care_mla.formats.deepseek`.

Notation: D hidden size, h_q query heads, g KV heads, d = d_h head dim, h = d/2 RoPE frequencies
("pairs"), G(j) the KV group of query head j. The maths lives in pure functions on tensors;
`to_deepseek` only walks the model and fills the upstream module names.

RoPE as complex numbers
-----------------------
The source models rotate with ``rotate_half``: frequency p rotates dims (p, p + h) of a head.
Writing that pair as ``z = x_p + i·x_{p+h}``, RoPE at position t is ``z·e^{iω_p t}`` and the
pair's share of a score is ``Re(conj(q_z)·k_z·e^{iω_p(t_k − t_q)})``. Stack the g key heads'
pairs of frequency p into ``k ∈ ℂ^g`` and lift query head j to ``q̃ = e_{G(j)}·q_z``. Any
unitary g×g mixing ``V_p`` keeps ``q̃ᴴk = (V_p q̃)ᴴ(V_p k)`` and commutes with the rotation
(a scalar ``e^{iωt}``), so the rows of ``V_p k`` are valid RoPE pairs shared by every head,
and head j's query on row c is ``V_p[c, G(j)]·q_z``.

* **parity** (``qk_rope_head_dim = g·d``, ``kv_lora_rank = g·d``): ``V_p = I``, every key
  pair goes to ``k_pe``, V is the latent (``kv_b_proj`` repeats each KV head's v for its
  group) and ``qk_nope_head_dim = 0``. Exact.
* **below parity**: a global count ``n_p`` of kept components per frequency (the same in all
  layers, because DeepSeek has one RoPE table) is chosen greedily from the layers' component
  scores, normalised per layer. Per layer, ``strategy="pca"`` takes ``V_p`` from the
  eigenvectors of the key pair covariance ``H_p = E[k kᴴ]`` (computed from C and W_k, no
  activations; complex PCA, which captures at least the energy of TransMLA's real RoRoPE);
  ``strategy="partial"`` keeps single heads unmixed (MHA2MLA's per-head partial RoPE). A
  component's score is its key energy times ``1 − sin(ωT)/(ωT)`` (`rotation_weight`: what
  leaving it unrotated costs over relative distances up to T): the source models put most key
  energy in frequencies that hardly turn within T, and ranking by energy alone wastes the
  RoPE dims on them (SmolLM2, cache 192: 5.8× ppl by energy vs 1.43× with T = 256). The
  components that are not kept lose their rotation (the approximation): their part of K,
  written back in the original head layout (``qk_nope_head_dim = d``, query nope = the
  original q), joins V in one CARE latent of rank ``kv_lora_rank``
  (`factorization.joint_factorize` with the layer's C).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RopeStrategy = Literal["pca", "partial"]


#: Relative distance T over which `rotation_weight` judges a frequency, when the statistics do
#: not name their calibration window length.
DEFAULT_ROPE_CONTEXT = 256


class DeepseekExportError(ValueError):
    """A model or budget the DeepSeek-V3 export cannot handle; the message names the fix."""


def to_pairs(W: Tensor, num_heads: int) -> Tensor:
    """(R, heads·d) real, rotate_half layout per head → (R, heads, d/2) complex: ``x_p + i·x_{p+d/2}``."""
    R = W.shape[0]
    Wh = W.reshape(R, num_heads, -1).double()
    half = Wh.shape[-1] // 2
    return torch.complex(Wh[..., :half], Wh[..., half:])


def from_pairs(Z: Tensor) -> Tensor:
    """Inverse of `to_pairs`: (R, heads, d/2) complex → (R, heads·d) real, rotate_half layout."""
    return torch.cat([Z.real, Z.imag], dim=-1).reshape(Z.shape[0], -1)


def interleave(Z: Tensor) -> Tensor:
    """(..., n) complex → (..., 2n) real with pair i at (2i, 2i+1): DeepSeek's interleaved RoPE layout."""
    return torch.stack([Z.real, Z.imag], dim=-1).flatten(-2)


def key_pair_covariance(Zk: Tensor, C: Tensor, bias: Tensor | None = None) -> Tensor:
    """``H[p] = E[k_p k_pᴴ]`` (h, g, g), with ``k_p = Zk[:, :, p]ᵀ x`` (+ bias) the g key pairs of frequency p.

    Zk: (D, g, h) complex key weights (`to_pairs` of W_k); C: (D, D) second moment of x;
    bias: (g, h) complex or None (added as ``b bᴴ``: the cross term needs E[x], which the
    statistics do not hold).
    """
    Zk = Zk.to(torch.complex128)
    Cc = C.to(torch.complex128)
    H = torch.einsum("dgp,de,ehp->pgh", Zk, Cc, Zk.conj())
    if bias is not None:
        b = bias.to(torch.complex128)
        H = H + torch.einsum("gp,hp->pgh", b, b.conj())
    return (H + H.mH) / 2


@dataclass(frozen=True)
class RopePlan:
    """Which key pairs one layer keeps under RoPE.

    ``mixing[p]`` is a unitary g×g matrix whose rows (components) are ordered by decreasing
    ``score[p, c]``; the first ``counts[p]`` rows of frequency p are kept. ``energy[p, c]`` is
    the key energy ``E|component|²``. The k_pe slots are ``(freq[i], comp[i])``, ordered by
    frequency then component.
    """

    mixing: Tensor  # (h, g, g) complex128
    energy: Tensor  # (h, g) float64
    counts: Tensor  # (h,) int64
    score: Tensor | None = None  # (h, g) float64, decreasing in c

    @property
    def num_pairs(self) -> int:
        return int(self.counts.sum())

    @property
    def slots(self) -> tuple[Tensor, Tensor]:
        """(freq, comp) of every k_pe pair, each (n,) int64."""
        freq = torch.repeat_interleave(torch.arange(len(self.counts)), self.counts)
        starts = torch.cumsum(self.counts, 0) - self.counts
        comp = torch.arange(self.num_pairs) - torch.repeat_interleave(starts, self.counts)
        return freq, comp

    def rest_projector(self) -> Tensor:
        """``P[p] = Σ_{c ≥ counts[p]} conj(V[p, c])ᵀ V[p, c]`` (h, g, g): projector on the dropped components."""
        g = self.mixing.shape[-1]
        dropped = (torch.arange(g)[None, :] >= self.counts[:, None]).to(self.mixing.dtype)  # (h, g)
        V = self.mixing * dropped[..., None]
        return torch.einsum("pcg,pch->pgh", V.conj(), V)

    def kept_energy(self) -> float:
        keep = torch.arange(self.energy.shape[1])[None, :] < self.counts[:, None]
        return float((self.energy * keep).sum())


def rope_components(H: Tensor, strategy: RopeStrategy) -> tuple[Tensor, Tensor]:
    """(mixing (h, g, g), key energy (h, g)) of one layer: the candidate RoPE components.

    "pca": rows are the eigenvectors of ``H[p]`` (``V = Uᴴ``), energy its eigenvalues;
    "partial": rows are the unit vectors of the heads (no mixing), energy ``diag H[p]``.
    """
    if strategy == "pca":
        evals, evecs = torch.linalg.eigh(H)  # ascending
        return evecs.flip(-1).mH.contiguous(), evals.flip(-1).clamp_min(0)
    if strategy == "partial":
        g = H.shape[-1]
        mixing = torch.eye(g, dtype=H.dtype).expand_as(H).clone()
        return mixing, torch.diagonal(H, dim1=-2, dim2=-1).real.clamp_min(0).contiguous()
    raise DeepseekExportError(f"unknown rope_strategy {strategy!r}; use 'pca' or 'partial'")


def rotation_weight(inv_freq: Tensor, context: float | None) -> Tensor:
    """``E_Δ|e^{iωΔ} − 1|²/2 = 1 − sin(ωT)/(ωT)`` for Δ uniform on [0, T]: what dropping RoPE costs.

    Near 0 for frequencies that hardly turn within the context T, near 1 for fast ones; all ones
    when ``context`` is None (pure energy ranking).
    """
    w = inv_freq.double()
    if context is None:
        return torch.ones_like(w)
    x = w * float(context)
    return torch.where(x > 1e-4, 1 - torch.sin(x) / x, x**2 / 6)


def component_scores(energy: Tensor, weight: Tensor | None = None) -> Tensor:
    """Score (h, g) of each component: its key energy × the weight of its frequency (`rotation_weight`)."""
    return energy if weight is None else energy * weight[:, None]


def global_pair_counts(scores: list[Tensor], num_pairs: int) -> Tensor:
    """Components to keep per frequency, shared by all layers: ``counts`` (h,) summing to num_pairs.

    Each layer's component scores (h, g) are sorted per frequency and normalised by the layer's
    total; the gain of the m-th component of frequency p is the sum over layers of its
    normalised score. Gains decrease in m, so taking the ``num_pairs`` largest (ties to the
    lower m) maximises the summed kept score under a shared count.
    """
    stack = torch.stack([s.sort(-1, descending=True).values / s.sum().clamp_min(1e-300) for s in scores])
    gain = stack.sum(0)  # (h, g)
    h, g = gain.shape
    if not 0 <= num_pairs <= h * g:
        raise DeepseekExportError(f"num_pairs must be in [0, {h * g}], got {num_pairs}")
    order = sorted((-float(gain[p, m]), m, p) for p in range(h) for m in range(g))
    counts = torch.zeros(h, dtype=torch.long)
    for _, _, p in order[:num_pairs]:
        counts[p] += 1
    return counts


def plan_rope(mixing: Tensor, energy: Tensor, score: Tensor, counts: Tensor) -> RopePlan:
    """One layer's plan: components re-ordered by decreasing score, the first ``counts[p]`` kept."""
    order = score.argsort(dim=-1, descending=True, stable=True)  # (h, g)
    rows = order[..., None].expand_as(mixing)
    return RopePlan(mixing=torch.gather(mixing, 1, rows), energy=torch.gather(energy, 1, order),
                    counts=counts.clone(), score=torch.gather(score, 1, order))


def identity_plan(num_freqs: int, num_kv_heads: int) -> RopePlan:
    """The parity plan: no mixing, every pair kept (needs no statistics)."""
    g = num_kv_heads
    eye = torch.eye(g, dtype=torch.complex128).expand(num_freqs, g, g).clone()
    counts = torch.full((num_freqs,), g, dtype=torch.long)
    return RopePlan(mixing=eye, energy=torch.zeros(num_freqs, g, dtype=torch.float64), counts=counts)


def rope_key(Zk: Tensor, plan: RopePlan) -> Tensor:
    """Kept key pairs (R, n) complex: ``κ_i = Σ_G V[p_i, c_i, G]·Zk[:, G, p_i]``."""
    freq, comp = plan.slots
    coeff = plan.mixing[freq, comp]  # (n, g)
    return torch.einsum("rgn,ng->rn", Zk[:, :, freq].to(torch.complex128), coeff)


def rope_query(Zq: Tensor, plan: RopePlan, groups: Tensor) -> Tensor:
    """Kept query pairs per head (R, heads, n) complex: ``V[p_i, c_i, G(j)]·Zq[:, j, p_i]``."""
    freq, comp = plan.slots
    coeff = plan.mixing[freq, comp][:, groups].T  # (heads, n)
    return Zq[:, :, freq].to(torch.complex128) * coeff[None]


def rest_key(Zk: Tensor, plan: RopePlan) -> Tensor:
    """The key pairs left out of RoPE, in the original head layout (R, g, h) complex: ``P_p·k_p``."""
    return torch.einsum("pgh,rhp->rgp", plan.rest_projector(), Zk.to(torch.complex128))


def default_rope_dim(cache_width: int, num_kv_heads: int, head_dim_: int) -> int:
    """RoPE dims for a cache of ``cache_width`` when not pinned.

    At parity (``2·g·d``) all ``g·d`` key dims (exact). Below parity a third of the cache,
    capped at d (one head's worth), rounded down to an even number, at least 2. Chosen on
    held-in calibration text of SmolLM2-135M (ppl ratio at cache 192: rope 32/48/64/80/96 →
    1.43/1.38/1.31/1.32/1.34; at cache 96: rope 16/24/32/40/48 → 3.54/2.29/1.89/2.00/2.11).
    """
    parity = 2 * num_kv_heads * head_dim_
    if cache_width >= parity:
        return num_kv_heads * head_dim_
    return max(2, min(head_dim_, cache_width // 3) // 2 * 2)


def split_budget(*, num_kv_heads: int, head_dim_: int, hidden_size: int, kv_lora_rank: int | None,
                 qk_rope_head_dim: int | None, kv_fraction: float | None,
                 portable: bool = False) -> tuple[int, int]:
    """(kv_lora_rank, qk_rope_head_dim) from what the caller pinned; errors say what works.

    The cache is ``kv_fraction·2·g·d`` (rounded) or, when neither the fraction nor both widths
    are given, the GQA parity width ``2·g·d``; a missing width is what is left of the cache
    (both missing: `default_rope_dim`, at most d for a portable export, whose RoPE holds one
    pair per frequency).
    """
    parity = 2 * num_kv_heads * head_dim_
    max_rope = head_dim_ if portable else num_kv_heads * head_dim_
    for name, value in (("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim)):
        if value is not None:
            if isinstance(value, bool):
                raise DeepseekExportError(f"{name} must be an int, got bool")
            operator.index(value)
    if kv_fraction is not None:
        if not 0 < kv_fraction <= 1:
            raise DeepseekExportError(f"kv_fraction must be in (0, 1] (1 = GQA parity), got {kv_fraction}")
        if kv_lora_rank is not None and qk_rope_head_dim is not None:
            raise DeepseekExportError("give kv_fraction or both kv_lora_rank and qk_rope_head_dim, not all three")
        cache = round(kv_fraction * parity)
    elif kv_lora_rank is not None and qk_rope_head_dim is not None:
        cache = kv_lora_rank + qk_rope_head_dim
    else:
        cache = parity
    if qk_rope_head_dim is None and kv_lora_rank is None:
        qk_rope_head_dim = min(default_rope_dim(cache, num_kv_heads, head_dim_), max_rope)
    if qk_rope_head_dim is None:
        qk_rope_head_dim = cache - kv_lora_rank
    if kv_lora_rank is None:
        kv_lora_rank = cache - qk_rope_head_dim
    if qk_rope_head_dim % 2 or not 2 <= qk_rope_head_dim <= max_rope:
        limit = f"d_h = {max_rope} (a portable export has one pair per frequency)" if portable else (
            f"g·d_h = {max_rope} (whole RoPE pairs of the {num_kv_heads} KV heads)")
        raise DeepseekExportError(f"qk_rope_head_dim must be even and in [2, {limit}]; got {qk_rope_head_dim}")
    if kv_lora_rank < 1:
        raise DeepseekExportError(
            f"kv_lora_rank must be ≥ 1; a cache of {cache} leaves {kv_lora_rank} after {qk_rope_head_dim} RoPE dims "
            f"(the smallest cache that works is {qk_rope_head_dim + 1}; lower qk_rope_head_dim or raise the budget)"
        )
    if kv_lora_rank + qk_rope_head_dim > parity:
        raise DeepseekExportError(
            f"kv_lora_rank + qk_rope_head_dim = {kv_lora_rank + qk_rope_head_dim} exceeds the GQA cache {parity}; "
            f"the largest budget that makes sense is parity ({parity})"
        )
    if kv_lora_rank > hidden_size:
        raise DeepseekExportError(
            f"kv_lora_rank {kv_lora_rank} exceeds the hidden size {hidden_size}: a larger latent cannot hold more"
        )
    return kv_lora_rank, qk_rope_head_dim


def longrope_factors(inv_freq: Tensor) -> list[float]:
    """float32 factors f with ``float32(1/f) == inv_freq`` (bitwise where such an f exists).

    transformers' longrope computes ``1 / (f · θ^(2i/d))`` in float32; with θ = 1 that is ``1/f``.
    """
    out = []
    for w in inv_freq.to(torch.float32):
        first = (1.0 / w.double()).to(torch.float32)
        best, candidate = first, first
        for toward in (math.inf, 0.0):  # walk a few ulps each way
            candidate = first
            for _ in range(4):
                if (1.0 / candidate).to(torch.float32) == w:
                    best = candidate
                    break
                candidate = torch.nextafter(candidate, torch.tensor(toward))
            if (1.0 / best).to(torch.float32) == w:
                break
        out.append(float(best))
    return out


def _default_inv_freq(theta: float, n: int) -> Tensor:
    """transformers' default RoPE frequencies for 2n dims, computed as it does (float32)."""
    return 1.0 / (theta ** (torch.arange(0, 2 * n, 2, dtype=torch.int64).float() / (2 * n)))


def default_rope_theta(freqs: Tensor, rtol: float = 1e-6) -> float | None:
    """θ' with ``freqs[i] = θ'^(-2i/2n)`` within ``rtol`` (a default-RoPE table), or None."""
    f = freqs.double()
    n = f.numel()
    if n == 0 or abs(float(f[0]) - 1.0) > rtol:
        return None
    if n == 1:
        return 10000.0  # a single pair of frequency 1: any θ
    if not bool(((f[1:] > 0) & (f[1:] < 1)).all()):
        return None
    # least squares on log f_i = −(i/n)·log θ over every i: fitting on f[1] alone amplifies its float32
    # rounding n-fold (θ = f[1]^−n), which failed the check for 32 pairs of a d_h = 128 model
    i = torch.arange(n, dtype=torch.float64)
    theta = math.exp(-n * float((i * f.log()).sum() / (i * i).sum()))
    want = theta ** (-torch.arange(n, dtype=torch.float64) / n)
    return theta if float(((want - f).abs() / f).max()) <= rtol else None


def rope_parameters(freqs: Tensor, source: dict, max_position_embeddings: int, *, bitwise: bool = True,
                    portable: bool = False) -> dict:
    """DeepSeek ``rope_parameters`` whose ``inv_freq`` is ``freqs`` (n,).

    Default RoPE (every runtime) when ``freqs`` is a default table ``θ'^(-2i/2n)``: bit for
    bit when ``bitwise`` (the exact parity export), else within float32 rounding (1e-6
    relative, far below an approximate export's own error). Otherwise longrope with bitwise
    frequencies (transformers only), or an error when ``portable``.
    """
    n = freqs.numel()
    target = freqs.to(torch.float32)
    candidates = []
    if source.get("rope_type", "default") == "default":
        candidates.append(float(source["rope_theta"]))
    fitted = default_rope_theta(freqs)
    if fitted is not None:
        candidates.append(fitted)
    for theta in candidates:
        table = _default_inv_freq(theta, n)
        if torch.equal(table, target) or (not bitwise and float(((table - target).abs() / target).max()) <= 1e-6):
            return {"rope_type": "default", "rope_theta": theta}
    if portable:
        raise DeepseekExportError("the RoPE frequencies are not a default-RoPE table; a portable export needs one")
    factors = longrope_factors(freqs)
    return {
        "rope_type": "longrope",
        "rope_theta": 1.0,
        "short_factor": factors,
        "long_factor": list(factors),
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": max_position_embeddings,
    }


def portable_pair_counts(scores: list[Tensor], num_pairs: int) -> Tensor:
    """One component at each of the frequencies ``p = m·i`` (i < num_pairs), the stride m that
    keeps most normalised score: a table that default RoPE reproduces (``θ' = θ^(2·m·n/d)``)."""
    stack = torch.stack([s.max(-1).values / s.sum().clamp_min(1e-300) for s in scores]).sum(0)  # (h,)
    h = stack.numel()
    best, best_gain = None, -1.0
    for m in range(1, h + 1):
        if m * (num_pairs - 1) >= h:
            break
        picks = torch.arange(num_pairs) * m
        gain = float(stack[picks].sum())
        if gain > best_gain:
            best, best_gain = picks, gain
    if best is None or num_pairs < 1:
        raise DeepseekExportError(f"a portable export keeps 1 to {h} RoPE pairs, got {num_pairs}")
    counts = torch.zeros(h, dtype=torch.long)
    counts[best] = 1
    return counts


def qk_norm_scale(W: Tensor, C: Tensor, eps: float, bias: Tensor | None = None) -> float:
    """``1/√(E[ms(x W + b)] + ε)`` for one head's projection W (D, d), from the second moment C."""
    Wd = W.double()
    energy = float(((C.double() @ Wd) * Wd).sum())
    if bias is not None:
        energy += float((bias.double() ** 2).sum())
    return 1.0 / math.sqrt(energy / W.shape[1] + eps)
