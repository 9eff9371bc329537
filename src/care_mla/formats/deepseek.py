"""Export to the stock DeepSeek-V3 format (`DeepseekV3ForCausalLM`, no remote code) — CARE.md §3.

`to_deepseek(model, stats, ...)` turns a Llama / Mistral / Qwen2 / Qwen3 `*ForCausalLM` into a
`DeepseekV3ForCausalLM` whose attention caches, per token and layer, ``kv_lora_rank`` latent
numbers plus ``qk_rope_head_dim`` RoPE-key numbers (GQA caches ``2·g·d_h``).

Three stages, so that the latent-cache format can hold the same layout with per-layer ranks:
`plan_rope_split` (which key components stay under RoPE) → `latent_spectra` (for a rank
allocation) → `layer_layout` / `mla_layout` (the tensors at chosen ranks) →
`deepseek_layer_state` / `layout_to_deepseek` (upstream config and names, one rank) or
`mapping.decoupled_layer_state` / `build_decoupled_model` (care-mla runtime). The split holds
no weights, only a reader of one layer's tensors, so `convert` streams all of it layer by layer.

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

DeepSeek's RoPE runs one frequency per pair with pairs interleaved (``rope_interleave=True``,
what every runtime supports). A frequency list that is a default-RoPE table ``θ'^(-2i/r)``
(bit for bit for the exact export, within float32 rounding otherwise) is written as default
RoPE; any other list (e.g. each frequency g times, at parity) as ``rope_type="longrope"`` with
``rope_theta = 1`` and per-pair ``short_factor = long_factor = 1/ω`` chosen so that
transformers' float32 ``1/factor`` reproduces the source's ``inv_freq`` bit for bit.
vLLM/SGLang map every non-default RoPE type of DeepSeek to yarn, so ``portable=True`` keeps
one component on each of a strided set of frequencies ``p = m·i`` (a default table with
``θ' = θ^(2mn/d)``, exact up to float32 rounding) — at most d RoPE dims, never exact for g > 1.

`kv_a_layernorm` made linear
----------------------------
RMSNorm is ``c·w/√(ms(c) + ε)``. The export scales the latent before the norm by a tiny s
(in ``kv_a_proj_with_mqa``) so that ``ms(s·c) ≤ δ·ε`` for *every* possible input, and sets
``w = √ε/s``: the norm's output is ``c/√(1 + ms(s·c)/ε)``, within ``δ/2 = 2⁻²⁴`` (relative) of
c. The bound is rigorous: the attention input is ``x = w_ln ⊙ u`` with ``‖u‖² < D`` (it is the
output of ``input_layernorm``), so ``‖c‖ ≤ √D·σ_max(diag(w_ln)·A)``. This depends on ε, and
transformers builds ``kv_a_layernorm`` with ε = 1e-6 while vLLM/SGLang use
``config.rms_norm_eps``; the export therefore sets ``rms_norm_eps = 1e-6`` and, when the source
used another ε, rescales the residual stream by ``k = √(1e-6/ε)`` (embeddings, ``o_proj``,
``down_proj``; the export is always untied, its ``lm_head`` the unscaled head), which leaves every
RMSNorm's output unchanged exactly. Works in float32 and bfloat16 (values ~1e-7 are normal
numbers there); float16 would underflow and is refused.

Biases (Qwen2; Llama/Mistral with ``attention_bias``)
---------------------------------------------------
DeepSeek's ``q_proj`` has no bias; ``kv_a_proj_with_mqa``, ``q_a_proj`` and ``o_proj`` have
one when ``attention_bias``. K bias: its RoPE part goes to the ``kv_a_proj_with_mqa`` bias;
its un-rotated (nope) part adds ``q_i·b`` to every score of query i, which softmax ignores,
so it is dropped exactly. V bias: softmax rows sum to one, so it becomes ``W_o·b_v`` in the
``o_proj`` bias. Q bias: through the q-LoRA path with ``q_lora_rank = D + 1``: ``q_a_proj``
is ``s·[I; 0]`` with bias ``s·e_{D+1}``, ``q_a_layernorm`` made linear as above, and
``q_b_proj = [W_q; b_q]``. vLLM/SGLang load no attention biases, so biased exports (and any
longrope export) run in transformers only; see `RuntimeSupport`.

Qwen3 (per-head q_norm / k_norm)
--------------------------------
DeepSeek has no per-head norm. The export folds each head's norm weight and replaces the
per-token ``1/rms`` by the constant ``1/√(E[ms] + ε)`` computed from C — an approximation
whose cost the tests bound (tiny random Qwen3 at parity: max |Δlogit| 0.10–0.16, mean KL
2–3e-4).

Measured (SmolLM2-135M-Instruct, calibration 256×256 bf16, held-out Austen 64×256 fp32,
original ppl 40.276; `benchmarks/method_table.py`), ppl ratio to the original:

=================  =====  =====  =======  ===========================
cache (rope dims)  exact  pca    partial  pca, portable (vLLM/SGLang)
=================  =====  =====  =======  ===========================
384 (192)          1.000  —      —        —
384 (64)           —      1.035  1.062    1.135
192 (64)           —      1.348  1.374    1.525
96 (32)            —      1.953  2.871    1.953 (same selection)
=================  =====  =====  =======  ===========================

(the 384 (64) pca / partial cells are from 32 windows, `benchmarks/deepseek_rope.py`.)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.initialization import no_init_weights

from care_mla.formats.families import get_family, head_dim
from care_mla.method.factorization import care_factorize, joint_factorize
from care_mla.method.objectives import attention_weightings
from care_mla.pipeline.calibration import CalibrationStats

__all__ = [
    "DEEPSEEK_NORM_EPS",
    "DeepseekExportError",
    "LayerLayout",
    "MlaLayout",
    "RopePlan",
    "RopeSplit",
    "RuntimeSupport",
    "check_portable",
    "component_scores",
    "default_rope_dim",
    "default_rope_theta",
    "from_pairs",
    "global_pair_counts",
    "identity_plan",
    "interleave",
    "key_pair_covariance",
    "latent_spectra",
    "layout_to_deepseek",
    "linear_norm_prescale",
    "longrope_factors",
    "mla_layout",
    "plan_rope",
    "plan_rope_split",
    "portable_pair_counts",
    "qk_norm_scale",
    "rest_key",
    "rope_components",
    "rope_key",
    "rope_parameters",
    "rope_query",
    "rotation_weight",
    "runtime_support",
    "split_budget",
    "to_deepseek",
    "to_pairs",
]

RopeStrategy = Literal["pca", "partial"]

#: ε of DeepSeek's latent norms in transformers (hard-coded there); the export sets
#: ``config.rms_norm_eps`` to it so that vLLM/SGLang, which read the config, agree.
DEEPSEEK_NORM_EPS = 1e-6
#: ms(pre-norm latent) ≤ δ·ε, so the latent norms deviate from linear by at most δ/2 (relative).
LINEAR_NORM_DELTA = 2.0**-23
#: Relative distance T over which `rotation_weight` judges a frequency, when the statistics do
#: not name their calibration window length.
DEFAULT_ROPE_CONTEXT = 256
#: Source RoPE types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class DeepseekExportError(ValueError):
    """A model or budget the DeepSeek-V3 export cannot handle; the message names the fix."""


# ============================================================================ pure maths: layouts


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


# ============================================================================ pure maths: RoPE plan


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


# ============================================================================ pure maths: norms, budget, RoPE config


def linear_norm_prescale(max_sq_norm: float, width: int, eps: float = DEEPSEEK_NORM_EPS,
                         delta: float = LINEAR_NORM_DELTA) -> float:
    """Scale s for an input of squared norm ≤ ``max_sq_norm`` so that RMSNorm(s·c)·(√ε/s) = c·(1 − O(δ)).

    ``ms(s·c) = s²‖c‖²/width ≤ δ·ε`` ⇒ the norm's gain ``√ε/√(ms + ε)`` is within δ/2 of 1.
    """
    if max_sq_norm <= 0:
        return 1.0
    return math.sqrt(delta * eps * width / max_sq_norm)


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


# ============================================================================ runtime support


#: MLA cache geometries ``(kv_lora_rank, qk_rope_head_dim)`` each serving engine runs. vLLM 0.32 (installed and
#: run; mla_attention.py asserts it): every MLA backend takes ``kv_lora_rank + qk_rope_head_dim`` ∈ {320, 512,
#: 576}, its CPU decode kernel only 512 + 64. SGLang: assumed DeepSeek's kernels' 512 + 64 (not verified).
ENGINE_GEOMETRIES: dict[str, tuple[tuple[int, int], ...]] = {
    "vllm": ((512, 64), (448, 64), (256, 64)),
    "vllm-cpu": ((512, 64),),
    "sglang": ((512, 64),),
}
#: What was run for each engine (README, "Serving"); anything else about it is not verified.
ENGINE_VERIFIED = {
    "vllm": "GPU backends not verified (no GPU was lent); the 512 + 64 geometry ran on vLLM 0.32.0's CPU backend",
    "vllm-cpu": "vllm-cpu 0.32.0: greedy tokens equal to transformers on 6/6 prompts (fp32), 4,608 vs 16,384 KV "
                "bytes per token (scripts/serving_check.py)",
    "sglang": "not verified (not installable here)",
}
ENGINES = tuple(ENGINE_GEOMETRIES)


@dataclass(frozen=True)
class RuntimeSupport:
    """Which stock runtimes run an exported config (from the config alone), with the rule checked for each.

    ``engines[name]`` is ``{"ok": bool, "rule": str, "reasons": [...], "verified": str}``.
    """

    transformers: bool
    vllm_sglang: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)
    engines: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"transformers": self.transformers, "vllm_sglang": self.vllm_sglang, "reasons": list(self.reasons),
                "engines": self.engines}


def _geometry_text(geometries) -> str:
    return ", ".join(f"{r} + {p} = {r + p}" for r, p in geometries)


def runtime_support(config: DeepseekV3Config) -> RuntimeSupport:
    """Per engine, whether it runs `config`: vLLM and SGLang build DeepSeek attention without biases, with
    interleaved default/yarn RoPE, an untied head, and only the MLA widths of `ENGINE_GEOMETRIES`."""
    layout = []
    if config.attention_bias:
        layout.append("attention biases (vLLM/SGLang DeepSeek layers have none)")
    if config.rope_parameters.get("rope_type") != "default":
        layout.append(f"rope_type {config.rope_parameters.get('rope_type')!r} (vLLM maps any non-default type to yarn)")
    if not config.rope_interleave:
        layout.append("rope_interleave=False (vLLM always interleaves)")
    if config.qk_nope_head_dim == 0:
        layout.append("qk_nope_head_dim=0 (not exercised by vLLM/SGLang MLA kernels)")
    if config.tie_word_embeddings:
        layout.append("tied lm_head (vLLM's DeepSeek model never ties it)")
    geometry = (config.kv_lora_rank, config.qk_rope_head_dim)
    engines = {}
    for engine, allowed in ENGINE_GEOMETRIES.items():
        reasons = list(layout)
        if geometry not in allowed:
            reasons.append(f"MLA cache {geometry[0]} + {geometry[1]} = {sum(geometry)} (runs: {_geometry_text(allowed)})")
        engines[engine] = {"ok": not reasons, "reasons": reasons, "verified": ENGINE_VERIFIED[engine],
                           "rule": f"kv_lora_rank + qk_rope_head_dim in {{{_geometry_text(allowed)}}}; default "
                                   "interleaved RoPE; no attention biases; untied lm_head; qk_nope_head_dim > 0"}
    engines["transformers"] = {"ok": True, "reasons": [], "verified": "transformers 5.15-5.24 (tests)",
                               "rule": "DeepseekV3ForCausalLM: any widths, biases through the q-LoRA path"}
    llama = [r for r in layout if "qk_nope" in r or "rope_type" in r or "biases" in r]
    engines["llamacpp"] = {
        "ok": not llama,
        "reasons": ["attention biases (not verified in llama.cpp)" if "biases" in r else r.replace("vLLM/SGLang", "llama.cpp")
                    .replace("vLLM maps any non-default type to yarn", "llama.cpp drops RoPE factors") for r in llama],
        "verified": "llama-cpp-python 0.3.36: greedy tokens equal to transformers (f32 GGUF) on 5/5 prompts at "
                    "F = 1.0 / 0.5 / 0.25 of portable exports (scripts/llamacpp_check.py, scripts/gguf_export.py)",
        "rule": "deepseek2: any widths; qk_nope_head_dim >= 1; plain RoPE (no longrope); biases not verified"}
    return RuntimeSupport(transformers=True, vllm_sglang=engines["vllm"]["ok"] and engines["sglang"]["ok"],
                          reasons=tuple(dict.fromkeys(engines["vllm"]["reasons"] + engines["sglang"]["reasons"])),
                          engines=engines)


def engine_geometry(config, engine: str, kv_fraction: float) -> tuple[int, int]:
    """``(kv_lora_rank, qk_rope_head_dim)`` for `engine`: of the geometries it runs that cache less than the
    model's GQA cache, the one nearest to ``kv_fraction`` of it (ties: the smaller). Refuses, naming the
    geometries and their fractions, when every geometry the engine runs is as large as the GQA cache."""
    if engine not in ENGINE_GEOMETRIES:
        raise DeepseekExportError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    parity = 2 * config.num_key_value_heads * head_dim(config)
    allowed = ENGINE_GEOMETRIES[engine]
    smaller = [(r, p) for r, p in allowed if r + p < parity and r <= config.hidden_size]
    if not smaller:
        options = "; ".join(f"{r} + {p} = {r + p} (F = {(r + p) / parity:.3g})" for r, p in allowed)
        raise DeepseekExportError(
            f"{engine} runs MLA caches of {options} numbers per token and layer, but this model's GQA cache is "
            f"already {parity}: an export for {engine} would cache more than the original. Export without --engine "
            "(transformers and llama.cpp run any width)"
        )
    target = kv_fraction * parity
    return min(smaller, key=lambda g: (abs(sum(g) - target), sum(g)))


# ============================================================================ orchestration


@dataclass
class _Dims:
    hidden: int
    heads: int
    kv_heads: int
    d: int
    groups: Tensor  # (heads,) KV group of each query head

    @property
    def half(self) -> int:
        return self.d // 2


def _dims(config) -> _Dims:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return _Dims(config.hidden_size, heads, kv_heads, head_dim(config),
                 torch.arange(heads) // (heads // kv_heads))


def _source_rope(model) -> tuple[Tensor, float, dict]:
    """(inv_freq (h,) float32, attention scaling of cos/sin, rope_parameters) of the source model."""
    rotary = model.model.rotary_emb
    params = dict(model.config.rope_parameters or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise DeepseekExportError(
            f"source rope_type {rope_type!r} changes its frequencies with the sequence length; the export "
            f"supports {', '.join(STATIC_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise DeepseekExportError("partial_rotary_factor < 1 is not supported (every head dim must be rotated)")
    return rotary.inv_freq.detach().float().cpu(), float(rotary.attention_scaling), params


#: Layer index → that decoder layer's tensors, named relative to the layer ("self_attn.q_proj.weight", ...).
LayerState = Callable[[int], dict[str, Tensor]]


def module_layer_state(model: nn.Module) -> LayerState:
    """`LayerState` of an in-memory model."""
    layers = model.model.layers
    return lambda i: {k: v.detach() for k, v in layers[i].state_dict().items()}


def _weights(state: dict[str, Tensor], attn: nn.Module, dims: _Dims, family, C: Tensor | None):
    """Float64 (W_q, b_q, W_k, b_k, W_v, b_v, W_o, b_o) as y = x W + b from a layer's tensors, Qwen3's norms
    folded (`attn`, possibly on the meta device, gives the norms' ε)."""

    def wb(name: str):
        b = state.get(f"self_attn.{name}.bias")
        return state[f"self_attn.{name}.weight"].double().cpu().T, (b.double().cpu() if b is not None else None)

    (Wq, bq), (Wk, bk), (Wv, bv), (WoT, bo) = wb("q_proj"), wb("k_proj"), wb("v_proj"), wb("o_proj")
    Wo = WoT.T
    if family.qk_norm_cls is not None:
        if C is None:
            raise DeepseekExportError("Qwen3's q_norm/k_norm are folded with calibration statistics: pass stats")
        Wq, bq = _fold_head_norm(Wq, bq, state["self_attn.q_norm.weight"], _eps(attn.q_norm), dims.heads, dims.d, C)
        Wk, bk = _fold_head_norm(Wk, bk, state["self_attn.k_norm.weight"], _eps(attn.k_norm), dims.kv_heads, dims.d, C)
    return Wq, bq, Wk, bk, Wv, bv, Wo, bo


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _fold_head_norm(W: Tensor, b: Tensor | None, norm_weight: Tensor, eps: float, heads: int, d: int, C: Tensor):
    """Per head: ``w_norm ⊙ (x W + b) / √(E[ms] + ε)`` as one linear map (the Qwen3 approximation)."""
    w = norm_weight.double().cpu()
    W, b = W.clone(), (b.clone() if b is not None else None)
    for i in range(heads):
        cols = slice(i * d, (i + 1) * d)
        scale = qk_norm_scale(W[:, cols], C, eps, None if b is None else b[cols]) * w
        W[:, cols] *= scale
        if b is not None:
            b[cols] *= scale
    return W, b


@dataclass
class LayerLayout:
    """One layer's decoupled-RoPE MLA tensors (float64, y = x·W layout, bias as the last row).

    The latent is ``c = x·kv_latent`` (r numbers), the shared RoPE key ``k_pe = [x, 1]·k_pe``
    (interleaved pairs); per KV head G the up-projections give ``k_nope = c·up_k[:, G]`` and
    ``v = c·up_v[:, G]``. Query head j is ``[x, 1]·q[:, j]`` = ``[q_nope | q_pe]`` with the
    softmax scale folded for a softmax of ``(nope + rope)^-½``.
    """

    q: Tensor | None  # (D+1, heads, nope+rope); None (with o_*) in a layout kept slim, see `query_tensors`
    kv_latent: Tensor  # (D, r)
    k_pe: Tensor  # (D+1, rope)
    up_k: Tensor  # (r, g, nope)
    up_v: Tensor  # (r, g, d)
    o_weight: Tensor | None  # (D, heads·d) as nn.Linear.weight
    o_bias: Tensor | None
    kept_energy: float
    total_energy: float

    @property
    def rank(self) -> int:
        return self.kv_latent.shape[1]


@dataclass
class MlaLayout:
    """Every layer's `LayerLayout` and what the layers share (RoPE slots, head widths)."""

    layers: list[LayerLayout]
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    rope_freq_index: Tensor  # (rope/2,) int64: source frequency of each k_pe pair
    rope_pairs_per_frequency: Tensor  # (d/2,) int64
    exact: bool
    rope_strategy: str | None
    rope_context: int | None
    has_q_bias: bool
    has_k_bias: bool
    rope_attention_scaling: float = 1.0  # the source's cos/sin scaling (folded into q as its square)

    @property
    def kv_lora_ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]


def _latent_weightings(weights, dims: _Dims, C: Tensor, objective: str) -> dict:
    """The weightings of the [K left out of RoPE, V] latent for `objective` (`objectives`), none for "activation".

    The un-rotated key part is read by the whole query (no RoPE on it): its key weight is the full
    query Gram (``rotary=False``).
    """
    if objective == "activation":
        return {}
    if objective not in ("value", "attention"):
        raise DeepseekExportError(f"unknown objective {objective!r}; use 'activation', 'value' or 'attention'")
    Wq, Wo = weights[0], weights[6]
    key_weight, value_weight = attention_weightings(Wq, Wo.T, C, num_heads=dims.heads, num_kv_heads=dims.kv_heads,
                                                    head_dim=dims.d, rotary=False)
    if objective == "value":
        return {"value_weight": value_weight}
    return {"key_weight": key_weight, "value_weight": value_weight}


def _layer_layout(weights, plan: RopePlan, dims: _Dims, nope: int, kv_lora_rank: int, C: Tensor | None,
                  q_scale: float, whitening: str, damping: float, balance_kv: bool, objective: str = "activation",
                  key_emphasis: float = 1.0, cross: Tensor | None = None) -> LayerLayout:
    """The decoupled-RoPE tensors of one layer (float64), from its weights and RoPE plan.

    Error compensation (`cross` = X̃ᵀX/N, with C = X̃ᵀX̃/N the converted stream's second moment): the
    [un-rotated K, V] latent is fitted to the original outputs (`joint_factorize(cross=)`) and the RoPE key
    columns become the damped least-squares map from the converted inputs to the original RoPE keys,
    ``(C + δI)⁻¹(X̃ᵀX/N + δI)·W_pe`` (full-rank CARE with the cross moment). The exact layout is kept as is.
    """
    _, _, Wk, bk, Wv, *_ = weights
    D = dims.hidden
    zero_k = torch.zeros(dims.kv_heads * dims.d, dtype=torch.float64)
    Zk = to_pairs(torch.cat([Wk, (bk if bk is not None else zero_k)[None]]), dims.kv_heads)  # (R, g, h)
    k_pe = interleave(rope_key(Zk, plan))  # (R, rope)
    query = _query_tensors(weights, plan, dims, nope, q_scale)

    if nope == 0:  # exact parity: the latent is V itself
        down = Wv
        up_k = torch.zeros(kv_lora_rank, 0, dtype=torch.float64)
        up_v = torch.eye(kv_lora_rank, dtype=torch.float64)
    else:
        k_rest = from_pairs(rest_key(Zk[:D], plan))  # (D, g·d)
        factors, m_k = joint_factorize(k_rest, Wv, C, kv_lora_rank, balance=balance_kv, method=whitening,
                                       damping=damping, compute_dtype=torch.float64, key_emphasis=key_emphasis,
                                       cross=cross, **_latent_weightings(weights, dims, C, objective))
        if cross is not None and k_pe.shape[1]:
            k_pe = k_pe.clone()
            k_pe[:D] = care_factorize(k_pe[:D], C, k_pe.shape[1], method=whitening, damping=damping,
                                      compute_dtype=torch.float64, cross=cross).weight()
        down = factors.down.double()
        up_k, up_v = factors.up.double()[:, :m_k], factors.up.double()[:, m_k:]
    r = kv_lora_rank
    return LayerLayout(kv_latent=down, k_pe=k_pe, up_k=up_k.reshape(r, dims.kv_heads, nope),
                       up_v=up_v.reshape(r, dims.kv_heads, dims.d), kept_energy=plan.kept_energy(),
                       total_energy=float(plan.energy.sum()), **query)


def _query_tensors(weights, plan: RopePlan, dims: _Dims, nope: int, q_scale: float) -> dict[str, Tensor | None]:
    """The layout's ``q`` (its RoPE pairs mixed as the plan says, softmax scale folded), ``o_weight`` and
    ``o_bias`` (V's bias through softmax): the query and output side, remade cheaply from the weights."""
    Wq, bq, _, _, _, bv, Wo, bo = weights
    D, R = dims.hidden, dims.hidden + 1
    zero_q = torch.zeros(dims.heads * dims.d, dtype=torch.float64)
    Zq = to_pairs(torch.cat([Wq, (bq if bq is not None else zero_q)[None]]), dims.heads)  # (R, heads, h)
    q_rope = interleave(rope_query(Zq, plan, dims.groups))  # (R, heads, rope)
    q = torch.cat([from_pairs(Zq).reshape(R, dims.heads, dims.d), q_rope], dim=-1) if nope else q_rope
    # V bias → o_proj bias (softmax rows sum to 1); K's nope bias is dropped (softmax shift).
    o_bias = None
    if bv is not None or bo is not None:
        o_bias = bo.clone() if bo is not None else torch.zeros(D, dtype=torch.float64)
        if bv is not None:
            o_bias = o_bias + Wo @ bv.reshape(dims.kv_heads, dims.d)[dims.groups].reshape(-1)
    return {"q": q * q_scale, "o_weight": Wo, "o_bias": o_bias}


def query_tensors(split: "RopeSplit", i: int, weights: tuple | None = None) -> dict[str, Tensor | None]:
    """Layer i's ``q``, ``o_weight``, ``o_bias`` of its `LayerLayout` (a layout kept without them, e.g. while
    every layer of a large model is fitted before any is written, is completed with these)."""
    return _query_tensors(weights or split.weights(i), split.plans[i], split.dims, split.nope, split.q_scale)


@dataclass
class RopeSplit:
    """A model's attention with the shared RoPE plan chosen: the stage before the latent ranks.

    Made by `plan_rope_split`; holds no weights, only how to read them (`attention`), so a
    model read layer by layer from its checkpoint is never in memory whole. `latent_spectra`
    gives what an allocation needs, `layer_layout` one layer's tensors at a chosen rank.
    """

    attention: Callable[[int], tuple]  # layer index → `_weights` of that layer
    num_layers: int
    plans: list[RopePlan]
    stats: CalibrationStats | None
    dims: _Dims
    qk_rope_head_dim: int
    exact: bool
    inv_freq: Tensor
    rope_scaling: float
    source_rope: dict
    src_scaling: float
    rope_strategy: str
    rope_context: int | None
    has_q_bias: bool
    has_k_bias: bool
    has_o_bias: bool  # the export's o_proj has a bias (the source's, and/or V's folded through softmax)

    @property
    def nope(self) -> int:
        return 0 if self.exact else self.dims.d

    @property
    def qk_nope_head_dim(self) -> int:
        return self.nope

    @property
    def q_scale(self) -> float:
        """The source's softmax scale d^-½ (× RoPE cos/sin scaling²) over the (nope+rope)^-½ of the MLA softmax."""
        return self.src_scaling * self.rope_scaling**2 * math.sqrt(self.nope + self.qk_rope_head_dim)

    @property
    def rope_freq_index(self) -> Tensor:
        return self.plans[0].slots[0]

    def C(self, i: int) -> Tensor | None:
        """Layer i's attention-input second moment in float64 (made when asked), or None without statistics."""
        return _second_moment(self.stats, i)

    def weights(self, i: int) -> tuple:
        """Layer i's float64 ``(W_q, b_q, W_k, b_k, W_v, b_v, W_o, b_o)``, read when asked."""
        return self.attention(i)

    def rest_key(self, i: int, weights: tuple | None = None) -> Tensor:
        """Layer i's key left out of RoPE, (D, g·d) in the original head layout."""
        Wk = (weights or self.weights(i))[2]
        return from_pairs(rest_key(to_pairs(Wk, self.dims.kv_heads), self.plans[i]))

    def kept_rope_energy(self, i: int) -> float:
        """Share of layer i's key energy that stays under RoPE (1 for the exact layout)."""
        total = float(self.plans[i].energy.sum())
        return 1.0 if self.exact or total <= 0 else self.plans[i].kept_energy() / total

    def summary(self) -> dict:
        kept = [self.kept_rope_energy(i) for i in range(self.num_layers)]
        return {
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.nope,
            "exact": self.exact,
            "rope_strategy": None if self.exact else self.rope_strategy,
            "rope_context": self.rope_context,
            "rope_pairs_per_frequency": self.plans[0].counts.tolist(),
            "kept_rope_energy": None if self.exact else kept,
        }


def _second_moment(stats: CalibrationStats | None, i: int) -> Tensor | None:
    return stats.second_moments[i].double() if stats is not None else None


def _check_stats(num_layers: int, stats: CalibrationStats | None, needs: bool) -> None:
    if stats is not None and stats.num_layers != num_layers:
        raise DeepseekExportError(f"stats hold {stats.num_layers} layers, the model has {num_layers}")
    if needs and stats is None:
        raise DeepseekExportError(
            "this export needs calibration statistics (care_mla.pipeline.calibration.collect_statistics): "
            "only the exact parity export of a model without q/k norms works without them"
        )


def check_portable(config) -> None:
    """vLLM/SGLang's DeepSeek layers load no attention biases: refuse a portable export of a biased model."""
    family = get_family(config)
    if family.qkv_bias_always or getattr(config, "attention_bias", False):
        raise DeepseekExportError(
            f"{config.model_type} has attention biases, which vLLM/SGLang's DeepSeek layers do not load; "
            "export without portable (transformers runs it)"
        )


@torch.no_grad()
def plan_rope_split(model: nn.Module, stats: CalibrationStats | None, *, qk_rope_head_dim: int, exact: bool,
                    rope_strategy: RopeStrategy = "pca", rope_context: int | None = None,
                    portable: bool = False, layer_state: LayerState | None = None,
                    dtype: torch.dtype | None = None) -> RopeSplit:
    """Choose which key components stay under RoPE (shared counts per frequency, per-layer mixing).

    ``exact`` (the parity layout: every key pair in RoPE, V as the latent) needs no statistics
    unless the model has q/k norms. `model` gives the architecture and RoPE; its weights are
    read through `layer_state` (default: from `model` itself), so `model` may be a meta-device
    skeleton (`layerwise.skeleton`) with `layer_state` reading a checkpoint, and `dtype` then
    names the dtype the weights are read in. Each layer is read once here (below parity).
    """
    _check_source(model.config, dtype or next(model.parameters()).dtype)
    family = get_family(model.config)
    dims = _dims(model.config)
    layers = model.model.layers
    layer_state = layer_state or module_layer_state(model)
    _check_stats(len(layers), stats, not exact or family.qk_norm_cls is not None)
    inv_freq, rope_scaling, src_rope = _source_rope(model)

    def attention(i: int) -> tuple:
        return _weights(layer_state(i), layers[i].self_attn, dims, family, _second_moment(stats, i))

    _, bq, _, bk, _, bv, _, bo = attention(0)
    biases = {"has_q_bias": bq is not None, "has_k_bias": bk is not None, "has_o_bias": bv is not None or bo is not None}
    del bq, bk, bv, bo
    context = None
    if exact:
        plans = [identity_plan(dims.half, dims.kv_heads) for _ in layers]
    else:
        context = _rope_context(rope_context, stats)
        weight = rotation_weight(inv_freq, context)
        candidates = []
        for i in range(len(layers)):
            C = _second_moment(stats, i)
            _, _, Wk, bk, *_ = attention(i)
            bz = to_pairs(bk[None], dims.kv_heads)[0] if bk is not None else None
            mixing, energy = rope_components(key_pair_covariance(to_pairs(Wk, dims.kv_heads), C, bz), rope_strategy)
            candidates.append((mixing, energy, component_scores(energy, weight)))
        scores = [c[2] for c in candidates]
        pairs = qk_rope_head_dim // 2
        counts = portable_pair_counts(scores, pairs) if portable else global_pair_counts(scores, pairs)
        plans = [plan_rope(m, e, sc, counts) for m, e, sc in candidates]
    src_scaling = float(getattr(layers[0].self_attn, "scaling", dims.d**-0.5))
    return RopeSplit(attention=attention, num_layers=len(layers), plans=plans, stats=stats,
                     dims=dims, qk_rope_head_dim=qk_rope_head_dim, exact=exact, inv_freq=inv_freq,
                     rope_scaling=rope_scaling, source_rope=src_rope, src_scaling=src_scaling,
                     rope_strategy=rope_strategy, rope_context=context, **biases)


def latent_spectra(split: RopeSplit, *, whitening: str = "cholesky", damping: float = 1e-2,
                   balance_kv: bool = True, progress: bool = False, objective: str = "activation",
                   key_emphasis: float = 1.0) -> list[Tensor]:
    """Per layer, the whitened singular values of the joint [K left out of RoPE, V] latent (for allocation)."""
    spectra = []
    for i in tqdm(range(split.num_layers), desc="spectra for the rank plan", unit="layer", disable=not progress):
        w = split.weights(i)
        f, _ = joint_factorize(split.rest_key(i, w), w[4], split.C(i), 0, balance=balance_kv, method=whitening,
                               damping=damping, compute_dtype=torch.float64, key_emphasis=key_emphasis,
                               **_latent_weightings(w, split.dims, split.C(i), objective))
        spectra.append(f.spectrum)
    return spectra


def _check_rank(split: RopeSplit, rank: int) -> None:
    if split.exact and rank != split.dims.kv_heads * split.dims.d:
        raise DeepseekExportError("the exact parity layout has kv_lora_rank = g·d_h in every layer")


@torch.no_grad()
def layer_layout(split: RopeSplit, i: int, kv_lora_rank: int, *, whitening: str = "cholesky", damping: float = 1e-2,
                 balance_kv: bool = True, weights: tuple | None = None, objective: str = "activation",
                 key_emphasis: float = 1.0, moments: tuple[Tensor, Tensor] | None = None) -> LayerLayout:
    """Layer i's decoupled-RoPE tensors at latent rank `kv_lora_rank` (its weights read now unless given).

    `moments` = (C̃, X̃ᵀX/N) of error compensation (`care_mla.method.compensation`) replace the layer's statistics:
    the latent and the RoPE keys are fitted to the original layer's outputs (`_layer_layout`). The RoPE plan
    (which components stay rotated) is the split's, made on the original statistics.
    """
    _check_rank(split, kv_lora_rank)
    C, cross = (split.C(i), None) if moments is None or split.exact else (m.double() for m in moments)
    return _layer_layout(weights or split.weights(i), split.plans[i], split.dims, split.nope, kv_lora_rank,
                         C, split.q_scale, whitening, damping, balance_kv, objective, key_emphasis, cross)


@torch.no_grad()
def mla_layout(split: RopeSplit, kv_lora_ranks: list[int], *, whitening: str = "cholesky", damping: float = 1e-2,
               balance_kv: bool = True, objective: str = "activation", key_emphasis: float = 1.0) -> MlaLayout:
    """The decoupled-RoPE tensors of every layer at the given latent ranks (one per layer), in memory."""
    if len(kv_lora_ranks) != split.num_layers:
        raise DeepseekExportError(f"need one kv_lora_rank per layer ({split.num_layers}), got {len(kv_lora_ranks)}")
    for r in kv_lora_ranks:
        _check_rank(split, r)
    kw = {"whitening": whitening, "damping": damping, "balance_kv": balance_kv, "objective": objective,
          "key_emphasis": key_emphasis}
    return assemble_layout(split, [layer_layout(split, i, r, **kw) for i, r in enumerate(kv_lora_ranks)])


def assemble_layout(split: RopeSplit, layers: list[LayerLayout]) -> MlaLayout:
    """The `MlaLayout` of `split` holding these per-layer tensors."""
    return MlaLayout(
        layers=layers, qk_rope_head_dim=split.qk_rope_head_dim, qk_nope_head_dim=split.nope,
        rope_freq_index=split.rope_freq_index, rope_pairs_per_frequency=split.plans[0].counts.clone(),
        exact=split.exact, rope_strategy=None if split.exact else split.rope_strategy,
        rope_context=split.rope_context, has_q_bias=split.has_q_bias, has_k_bias=split.has_k_bias,
        rope_attention_scaling=split.rope_scaling,
    )


def deepseek_config(source_config, split: RopeSplit, kv_lora_rank: int, *, portable: bool = False) -> DeepseekV3Config:
    """The upstream config of the export of `split` at one `kv_lora_rank` for every layer."""
    dims = split.dims
    rope_params = rope_parameters(split.inv_freq[split.rope_freq_index], split.source_rope,
                                  source_config.max_position_embeddings, bitwise=split.exact, portable=portable)
    config = DeepseekV3Config(
        vocab_size=source_config.vocab_size,
        hidden_size=dims.hidden,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads,
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=dims.hidden + 1 if split.has_q_bias else None,  # q bias through the q-LoRA path
        qk_rope_head_dim=split.qk_rope_head_dim,
        qk_nope_head_dim=split.nope,
        v_head_dim=dims.d,
        first_k_dense_replace=source_config.num_hidden_layers,
        num_mtp_layers=0,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        rms_norm_eps=DEEPSEEK_NORM_EPS,
        use_cache=True,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        # always untied: vLLM's DeepSeek model never ties lm_head to the embedding (a tied export generates token 0
        # forever there), and the embedding is rescaled by the residual scale while the head is not
        tie_word_embeddings=False,
        rope_parameters=rope_params,
        rope_interleave=True,
        attention_bias=split.has_q_bias or split.has_k_bias or split.has_o_bias,
        attention_dropout=0.0,
    )
    config._attn_implementation = source_config._attn_implementation
    return config


def export_summary(source_config, split: RopeSplit, config: DeepseekV3Config) -> dict:
    """What the export kept (`RopeSplit.summary`), its cache widths, residual scale and runtime support."""
    dims = split.dims
    return {
        "kv_lora_rank": config.kv_lora_rank,
        "cache_width": config.kv_lora_rank + config.qk_rope_head_dim,
        "gqa_cache_width": 2 * dims.kv_heads * dims.d,
        **split.summary(),
        "residual_scale": residual_scale(source_config),
        "runtime_support": runtime_support(config),
    }


def residual_scale(source_config) -> float:
    """k: the export runs the residual stream ×k so that its norms' ε (1e-6) acts as the source's."""
    return math.sqrt(DEEPSEEK_NORM_EPS / float(source_config.rms_norm_eps))


def _rope_context(rope_context: int | None, stats: CalibrationStats) -> int:
    if rope_context is None:
        return int(stats.meta.get("seq_len", DEFAULT_ROPE_CONTEXT))
    if isinstance(rope_context, bool) or operator.index(rope_context) < 1:
        raise DeepseekExportError(f"rope_context must be a positive number of tokens, got {rope_context!r}")
    return int(rope_context)


def _check_source(config, dtype: torch.dtype) -> None:
    get_family(config)  # names the supported families
    if getattr(config, "mlp_bias", False):
        raise DeepseekExportError("mlp_bias=True: DeepSeek-V3's MLP has no biases")
    if config.num_attention_heads % config.num_key_value_heads:
        raise DeepseekExportError("num_attention_heads must be a multiple of num_key_value_heads")
    if dtype == torch.float16:
        raise DeepseekExportError(
            "float16 cannot hold the ~1e-7 pre-norm latents that make kv_a_layernorm linear; "
            "load the model in float32 or bfloat16"
        )


def export_budget(config, *, kv_lora_rank: int | None = None, qk_rope_head_dim: int | None = None,
                  kv_fraction: float | None = None, portable: bool = False) -> tuple[int, int, bool]:
    """(kv_lora_rank, qk_rope_head_dim, exact) of the asked cache (`split_budget`); exact is the parity layout."""
    g, d = config.num_key_value_heads, head_dim(config)
    kv_lora_rank, rope = split_budget(num_kv_heads=g, head_dim_=d, hidden_size=config.hidden_size,
                                      kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                                      kv_fraction=kv_fraction, portable=portable)
    return kv_lora_rank, rope, rope == g * d and kv_lora_rank == g * d


@torch.no_grad()
def to_deepseek(
    model: nn.Module,
    stats: CalibrationStats | None,
    *,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    kv_fraction: float | None = None,
    rope_strategy: RopeStrategy = "pca",
    rope_context: int | None = None,
    whitening: Literal["cholesky", "sqrt"] = "cholesky",
    damping: float = 1e-2,
    balance_kv: bool = True,
    portable: bool = False,
) -> DeepseekV3ForCausalLM:
    """A `DeepseekV3ForCausalLM` (upstream transformers class, no remote code) equivalent to `model`.

    Args:
        model: a loaded Llama / Mistral / Qwen2 / Qwen3 ``*ForCausalLM`` (float32 or bfloat16);
            it is not modified.
        stats: per-layer attention-input second moments (`calibration.collect_statistics`);
            may be None only for the exact parity export of a family without q/k norms.
        kv_lora_rank, qk_rope_head_dim, kv_fraction: the cache per token and layer is
            ``kv_lora_rank + qk_rope_head_dim``; give both widths, or a fraction of the GQA cache
            ``2·g·d`` (default 1: parity, exact), optionally pinning one width
            (see `split_budget`, `default_rope_dim`).
        rope_strategy: below parity, "pca" (per-frequency complex PCA across KV heads) or
            "partial" (per-head partial RoPE, unmixed); both share the per-frequency counts.
        rope_context: the relative distance T (tokens) over which leaving a component unrotated
            is judged (`rotation_weight`); frequencies that turn little within T go to the
            latent first. Default: the calibration window length (``stats.meta["seq_len"]``),
            else `DEFAULT_ROPE_CONTEXT`. Match it to the serving context: SmolLM2 at cache 192,
            ppl ratio on 256-token windows T = 256/1024/2048 → 1.31/1.37/1.49 (held-in), on
            2048-token windows T = 256/2048 → 1.97/1.55.
        whitening, damping: CARE whitening of the joint [K_nope, V] latent (`care_factorize`).
        balance_kv: scale K against V before the joint factorization (`balance_scale`).
        portable: restrict the export to what vLLM and SGLang run: default RoPE (one component
            per frequency, on a strided set of frequencies, ``qk_rope_head_dim ≤ d_h``) and no
            biases. Exact parity is then impossible for g > 1 (each frequency is needed g times).

    Returns:
        The model in eval mode, same dtype and device as `model`; `save_pretrained` it and load
        it with `AutoModelForCausalLM.from_pretrained`. ``result.care_export`` holds a summary
        (kept RoPE energy per layer, runtime support).
    """
    _check_source(model.config, next(model.parameters()).dtype)
    kv_lora_rank, rope, exact = export_budget(model.config, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                                              kv_fraction=kv_fraction, portable=portable)
    if portable:
        check_portable(model.config)
    split = plan_rope_split(model, stats, qk_rope_head_dim=rope, exact=exact, rope_strategy=rope_strategy,
                            rope_context=rope_context, portable=portable)
    layout = mla_layout(split, [kv_lora_rank] * split.num_layers, whitening=whitening, damping=damping,
                        balance_kv=balance_kv)
    return layout_to_deepseek(model, split, layout, portable=portable)


def check_one_rank(ranks: list[int]) -> int:
    """DeepSeek-V3's single kv_lora_rank, or a clear error for per-layer ranks."""
    if len(set(ranks)) != 1:
        raise DeepseekExportError(
            "DeepSeek-V3 has one kv_lora_rank for all layers; per-layer ranks (--allocation adjusted) live in the "
            "latent-cache format (--format care_mla --latent decoupled)"
        )
    return ranks[0]


@torch.no_grad()
def layout_to_deepseek(model: nn.Module, split: RopeSplit, layout: MlaLayout, *,
                       portable: bool = False) -> DeepseekV3ForCausalLM:
    """The `DeepseekV3ForCausalLM` holding `layout` (one kv_lora_rank for every layer), in memory."""
    config = deepseek_config(model.config, split, check_one_rank(layout.kv_lora_ranks), portable=portable)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.device(device), no_init_weights():  # every weight is loaded below
        out = DeepseekV3ForCausalLM(config).to(dtype)
    out.tie_weights()
    src = {k: v.detach() for k, v in model.state_dict().items()}
    state = {name: deepseek_global_tensor(name, src.__getitem__, model.config, config)
             for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for i, e in enumerate(layout.layers):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in deepseek_layer_state(layer, e, model.config, config).items()})
    out.load_state_dict({k: v.to(dtype=dtype, device=device) for k, v in state.items()}, strict=True)
    out.generation_config = model.generation_config
    out.care_export = export_summary(model.config, split, config)
    return out.eval()


def _scaled(t: Tensor, k: float, rows: int = 4096) -> Tensor:
    """``(t·k)`` computed in float64 and rounded to t's dtype, a block of rows at a time (no float64 copy of t)."""
    if k == 1.0:
        return t
    out = torch.empty_like(t)
    for i in range(0, t.shape[0], rows):
        out[i:i + rows] = (t[i:i + rows].double() * k).to(t.dtype)
    return out


def deepseek_global_tensor(name: str, get: Callable[[str], Tensor], source_config,
                           config: DeepseekV3Config) -> Tensor:
    """One of the export's tensors outside the decoder layers, from the source's (``get(name)``, in its dtype)."""
    k_res = residual_scale(source_config)
    if name == "model.embed_tokens.weight":
        return _scaled(get(name), k_res)
    if name == "model.norm.weight":
        return get(name)
    if name == "lm_head.weight":  # the export is untied (`deepseek_config`): a tied source's head is its embedding
        return get("model.embed_tokens.weight" if source_config.tie_word_embeddings else name)
    raise KeyError(f"{name} is not a tensor of the DeepSeek-V3 export outside its decoder layers")


def deepseek_layer_state(source: dict[str, Tensor], e: LayerLayout, source_config,
                         config: DeepseekV3Config) -> dict[str, Tensor]:
    """One decoder layer of the export (upstream DeepSeek-V3 names relative to the layer) from the source
    layer's tensors and its `LayerLayout`: attention tensors float64, the rest in the source's dtype."""
    dims = _dims(source_config)
    k_res = residual_scale(source_config)
    D = dims.hidden
    state = {name: source[name] for name in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                             "mlp.gate_proj.weight", "mlp.up_proj.weight")}
    state["mlp.down_proj.weight"] = _scaled(source["mlp.down_proj.weight"], k_res)

    # attention input x = w_ln ⊙ u with ‖u‖² < D: bound ‖x·A‖ for the latent pre-scales
    w_ln = state["input_layernorm.weight"].double().cpu().abs()
    lat_sigma = float(torch.linalg.matrix_norm(w_ln[:, None] * e.kv_latent, ord=2)) if e.kv_latent.numel() else 0.0
    s = linear_norm_prescale(D * lat_sigma**2, config.kv_lora_rank)
    a = "self_attn."
    state[a + "kv_a_proj_with_mqa.weight"] = torch.cat([s * e.kv_latent, e.k_pe[:D]], dim=1).T
    state[a + "kv_a_layernorm.weight"] = torch.full((config.kv_lora_rank,), math.sqrt(DEEPSEEK_NORM_EPS) / s)
    # DeepSeek's kv_b_proj serves every query head: repeat each KV head's columns for its group
    kv_b = torch.cat([e.up_k[:, dims.groups], e.up_v[:, dims.groups]], dim=-1).reshape(e.rank, -1)
    state[a + "kv_b_proj.weight"] = kv_b.T
    if config.attention_bias:
        state[a + "kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(config.kv_lora_rank), e.k_pe[D]])
        o_bias = e.o_bias if e.o_bias is not None else torch.zeros(D)
        state[a + "o_proj.bias"] = o_bias * k_res
    state[a + "o_proj.weight"] = e.o_weight * k_res

    if config.q_lora_rank is None:
        state[a + "q_proj.weight"] = e.q[:D].reshape(D, -1).T
    else:  # q bias through the q-LoRA path: q_a = s·[x, 1], q_b = [W_q; b_q]
        qs = linear_norm_prescale(D * float(w_ln.max()) ** 2 + 1.0, config.q_lora_rank)
        q_a = torch.zeros(D + 1, D, dtype=torch.float64)
        q_a[:D] = torch.eye(D, dtype=torch.float64) * qs
        state[a + "q_a_proj.weight"] = q_a
        state[a + "q_a_proj.bias"] = torch.cat([torch.zeros(D, dtype=torch.float64), torch.tensor([qs])])
        state[a + "q_a_layernorm.weight"] = torch.full((D + 1,), math.sqrt(DEEPSEEK_NORM_EPS) / qs)
        state[a + "q_b_proj.weight"] = e.q.reshape(D + 1, -1).T
    return state
