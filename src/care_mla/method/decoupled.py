"""Decoupled-RoPE layer layouts: a model's K/V turned into a shared RoPE key and one joint CARE latent, per layer.

Three stages, so that the latent-cache format can hold the same layout with per-layer ranks:
`plan_rope_split` (which key components stay under RoPE) → `latent_spectra` (for a rank
allocation) → `layer_layout` / `mla_layout` (the tensors at chosen ranks) →
`deepseek_layer_state` / `layout_to_deepseek` (upstream config and names, one rank) or
`mapping.decoupled_layer_state` / `build_decoupled_model` (care-mla runtime). The split holds
no weights, only a reader of one layer's tensors, so the conversion streams all of it layer by layer.


Notation: D hidden size, h_q query heads, g KV heads, d = d_h head dim, h = d/2 RoPE frequencies
("pairs"), G(j) the KV group of query head j. The maths lives in pure functions on tensors;
`to_deepseek` only walks the model and fills the upstream module names.

Qwen3 (per-head q_norm / k_norm)
--------------------------------
DeepSeek has no per-head norm. The export folds each head's norm weight and replaces the
per-token ``1/rms`` by the constant ``1/√(E[ms] + ε)`` computed from C — an approximation
whose cost the tests bound (tiny random Qwen3 at parity: max |Δlogit| 0.10–0.16, mean KL
2–3e-4).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from care_mla.formats.families import get_family, head_dim
from care_mla.method.factorization import care_factorize, joint_factorize, joint_factorize_gram, stack_gram
from care_mla.method.objectives import attention_weightings
from care_mla.method.rope_split import (
    DEFAULT_ROPE_CONTEXT,
    DeepseekExportError,
    RopePlan,
    RopeStrategy,
    component_scores,
    from_pairs,
    global_pair_counts,
    identity_plan,
    interleave,
    key_pair_covariance,
    plan_rope,
    portable_pair_counts,
    qk_norm_scale,
    rest_key,
    rope_components,
    rope_key,
    rope_query,
    rotation_weight,
    to_pairs,
)
from care_mla.method.statistics import CalibrationStats

#: Source RoPE types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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


def attention_dims(config) -> _Dims:
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


def _latent_weightings(weights, dims: _Dims, C: Tensor, objective: str, shared: dict | None = None) -> dict:
    """The weightings of the [K left out of RoPE, V] latent for `objective` (`objectives`), none for "activation".

    The un-rotated key part is read by the whole query (no RoPE on it): its key weight is the full
    query Gram (``rotary=False``). `shared`: this layer's values other candidates made (filled here).
    """
    if objective == "activation":
        return {}
    if objective not in ("value", "attention"):
        raise DeepseekExportError(f"unknown objective {objective!r}; use 'activation', 'value' or 'attention'")
    Wq, Wo = weights[0], weights[6]
    if shared is not None and "weightings" in shared:
        key_weight, value_weight = shared["weightings"]
    else:
        key_weight, value_weight = attention_weightings(Wq, Wo.T, C, num_heads=dims.heads,
                                                        num_kv_heads=dims.kv_heads, head_dim=dims.d, rotary=False)
        if shared is not None:
            shared["weightings"] = (key_weight, value_weight)
    if objective == "value":
        return {"value_weight": value_weight}
    return {"key_weight": key_weight, "value_weight": value_weight}


def _layer_layout(weights, plan: RopePlan, dims: _Dims, nope: int, kv_lora_rank: int, C: Tensor | None,
                  q_scale: float, whitening: str, damping: float, balance_kv: bool, objective: str = "activation",
                  key_emphasis: float = 1.0, cross: Tensor | None = None, shared: dict | None = None) -> LayerLayout:
    """The decoupled-RoPE tensors of one layer (float64), from its weights and RoPE plan.

    Error compensation (`cross` = X̃ᵀX/N, with C = X̃ᵀX̃/N the converted stream's second moment): the
    [un-rotated K, V] latent is fitted to the original outputs (`joint_factorize(cross=)`) and the RoPE key
    columns become the damped least-squares map from the converted inputs to the original RoPE keys,
    ``(C + δI)⁻¹(X̃ᵀX/N + δI)·W_pe`` (full-rank CARE with the cross moment). The exact layout is kept as is.

    `shared` (never with `cross`): what the candidates of a choice that share this layer's RoPE plan and C reuse —
    the attention weightings and the latent stack's `StackGram` (the latent then comes from
    `joint_factorize_gram`: the same one at m³ cost); filled on first use.
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
        if shared is not None and cross is None:
            if "stack_gram" not in shared:
                shared["stack_gram"] = stack_gram(k_rest, Wv, C, damping=damping, compute_dtype=torch.float64)
            factors, m_k = joint_factorize_gram(k_rest, Wv, shared["stack_gram"], kv_lora_rank, balance=balance_kv,
                                                key_emphasis=key_emphasis,
                                                **_latent_weightings(weights, dims, C, objective, shared))
        else:
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
    check_source(model.config, dtype or next(model.parameters()).dtype)
    family = get_family(model.config)
    dims = attention_dims(model.config)
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


def check_rank(split: RopeSplit, rank: int) -> None:
    if split.exact and rank != split.dims.kv_heads * split.dims.d:
        raise DeepseekExportError("the exact parity layout has kv_lora_rank = g·d_h in every layer")


@torch.no_grad()
def layer_layout(split: RopeSplit, i: int, kv_lora_rank: int, *, whitening: str = "cholesky", damping: float = 1e-2,
                 balance_kv: bool = True, weights: tuple | None = None, objective: str = "activation",
                 key_emphasis: float = 1.0, moments: tuple[Tensor, Tensor] | None = None,
                 shared: dict | None = None) -> LayerLayout:
    """Layer i's decoupled-RoPE tensors at latent rank `kv_lora_rank` (its weights read now unless given).

    `moments` = (C̃, X̃ᵀX/N) of error compensation (`care_mla.method.compensation`) replace the layer's statistics:
    the latent and the RoPE keys are fitted to the original layer's outputs (`_layer_layout`). The RoPE plan
    (which components stay rotated) is the split's, made on the original statistics. `shared`: layer i's values
    that candidates of a choice on this `split` share (`_layer_layout`; ignored with `moments`).
    """
    check_rank(split, kv_lora_rank)
    C, cross = (split.C(i), None) if moments is None or split.exact else (m.double() for m in moments)
    return _layer_layout(weights or split.weights(i), split.plans[i], split.dims, split.nope, kv_lora_rank,
                         C, split.q_scale, whitening, damping, balance_kv, objective, key_emphasis, cross,
                         shared if moments is None else None)


@torch.no_grad()
def mla_layout(split: RopeSplit, kv_lora_ranks: list[int], *, whitening: str = "cholesky", damping: float = 1e-2,
               balance_kv: bool = True, objective: str = "activation", key_emphasis: float = 1.0) -> MlaLayout:
    """The decoupled-RoPE tensors of every layer at the given latent ranks (one per layer), in memory."""
    if len(kv_lora_ranks) != split.num_layers:
        raise DeepseekExportError(f"need one kv_lora_rank per layer ({split.num_layers}), got {len(kv_lora_ranks)}")
    for r in kv_lora_ranks:
        check_rank(split, r)
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


def _rope_context(rope_context: int | None, stats: CalibrationStats) -> int:
    if rope_context is None:
        return int(stats.meta.get("seq_len", DEFAULT_ROPE_CONTEXT))
    if isinstance(rope_context, bool) or operator.index(rope_context) < 1:
        raise DeepseekExportError(f"rope_context must be a positive number of tokens, got {rope_context!r}")
    return int(rope_context)


def check_source(config, dtype: torch.dtype) -> None:
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
