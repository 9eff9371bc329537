"""Export to stock DeepSeek (`DeepseekV3ForCausalLM`, `DeepseekV2ForCausalLM`; no remote code) — CARE.md §3.

`to_deepseek(model, stats, ...)` turns a Llama / Mistral / Qwen2 / Qwen3 `*ForCausalLM` into a
`DeepseekV3ForCausalLM` whose attention caches, per token and layer, ``kv_lora_rank`` latent
numbers plus ``qk_rope_head_dim`` RoPE-key numbers (GQA caches ``2·g·d_h``). A mixture-of-experts
source (Qwen3-MoE, Mixtral) becomes a `DeepseekV2ForCausalLM` instead: the same attention, and
DeepSeek-V2's router, which is the function these families route with (V3's sigmoid router is
not); its experts pass through unchanged (`care_mla.formats.moe`).

The layout itself (RoPE split, per-layer tensors) is `care_mla.method.rope_split` and
`care_mla.method.decoupled`; this module writes it with upstream names and config fields.

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

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.initialization import no_init_weights

from care_mla.formats.engines import runtime_support
from care_mla.formats.families import head_dim
from care_mla.formats.moe import RENORM_CAVEAT, deepseek_mlp_state, deepseek_moe_fields
from care_mla.method.decoupled import (
    LayerLayout,
    MlaLayout,
    RopeSplit,
    attention_dims,
    check_portable,
    check_source,
    mla_layout,
    plan_rope_split,
)
from care_mla.method.rope_split import (
    DeepseekExportError,
    RopeStrategy,
    rope_parameters,
    split_budget,
)
from care_mla.method.statistics import CalibrationStats

logger = logging.getLogger(__name__)

#: ε of DeepSeek's latent norms in transformers (hard-coded there); the export sets
#: ``config.rms_norm_eps`` to it so that vLLM/SGLang, which read the config, agree.
DEEPSEEK_NORM_EPS = 1e-6


#: ms(pre-norm latent) ≤ δ·ε, so the latent norms deviate from linear by at most δ/2 (relative).
LINEAR_NORM_DELTA = 2.0**-23


def linear_norm_prescale(max_sq_norm: float, width: int, eps: float = DEEPSEEK_NORM_EPS,
                         delta: float = LINEAR_NORM_DELTA) -> float:
    """Scale s for an input of squared norm ≤ ``max_sq_norm`` so that RMSNorm(s·c)·(√ε/s) = c·(1 − O(δ)).

    ``ms(s·c) = s²‖c‖²/width ≤ δ·ε`` ⇒ the norm's gain ``√ε/√(ms + ε)`` is within δ/2 of 1.
    """
    if max_sq_norm <= 0:
        return 1.0
    return math.sqrt(delta * eps * width / max_sq_norm)


#: The upstream class of each export config.
EXPORT_CLASSES = {DeepseekV3Config: DeepseekV3ForCausalLM, DeepseekV2Config: DeepseekV2ForCausalLM}

DeepseekConfig = DeepseekV3Config | DeepseekV2Config
DeepseekForCausalLM = DeepseekV3ForCausalLM | DeepseekV2ForCausalLM


def export_class(config: DeepseekConfig) -> type[nn.Module]:
    """`DeepseekV3ForCausalLM` for a dense source's export, `DeepseekV2ForCausalLM` for a MoE source's."""
    return EXPORT_CLASSES[type(config)]


def deepseek_config(source_config, split: RopeSplit, kv_lora_rank: int, *, portable: bool = False) -> DeepseekConfig:
    """The upstream config of the export of `split` at one `kv_lora_rank` for every layer: DeepSeek-V3's for a
    dense source, DeepSeek-V2's for a mixture-of-experts one (`moe.deepseek_moe_fields`)."""
    dims = split.dims
    rope_params = rope_parameters(split.inv_freq[split.rope_freq_index], split.source_rope,
                                  source_config.max_position_embeddings, bitwise=split.exact, portable=portable)
    moe = deepseek_moe_fields(source_config)
    if moe is None:  # dense: every layer is a dense prefix layer
        config_class, own = DeepseekV3Config, {"first_k_dense_replace": source_config.num_hidden_layers,
                                               "num_mtp_layers": 0, "rope_interleave": True}
    else:  # V2 always interleaves its RoPE pairs
        config_class, own = DeepseekV2Config, moe
    config = config_class(
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
        attention_bias=split.has_q_bias or split.has_k_bias or split.has_o_bias,
        attention_dropout=0.0,
        **own,
    )
    config._attn_implementation = source_config._attn_implementation
    return config


def export_summary(source_config, split: RopeSplit, config: DeepseekConfig) -> dict:
    """What the export kept (`RopeSplit.summary`), its cache widths, residual scale and runtime support."""
    dims = split.dims
    return {
        "kv_lora_rank": config.kv_lora_rank,
        "cache_width": config.kv_lora_rank + config.qk_rope_head_dim,
        "gqa_cache_width": 2 * dims.kv_heads * dims.d,
        **split.summary(),
        "residual_scale": residual_scale(source_config),
        "runtime_support": runtime_support(config),
        "architecture": export_class(config).__name__,
    }


def residual_scale(source_config) -> float:
    """k: the export runs the residual stream ×k so that its norms' ε (1e-6) acts as the source's."""
    return math.sqrt(DEEPSEEK_NORM_EPS / float(source_config.rms_norm_eps))


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
) -> DeepseekForCausalLM:
    """A `DeepseekV3ForCausalLM` (upstream transformers class, no remote code) equivalent to `model`;
    `DeepseekV2ForCausalLM` for a mixture-of-experts `model` (`care_mla.formats.moe`).

    Args:
        model: a loaded Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral ``*ForCausalLM`` (float32 or
            bfloat16); it is not modified.
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
    check_source(model.config, next(model.parameters()).dtype)
    deepseek_moe_fields(model.config)  # what DeepSeek's MoE cannot hold is refused before any work
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
                       portable: bool = False) -> DeepseekForCausalLM:
    """The `DeepseekV3ForCausalLM` (`DeepseekV2ForCausalLM` for a MoE `model`) holding `layout` (one kv_lora_rank
    for every layer), in memory."""
    config = deepseek_config(model.config, split, check_one_rank(layout.kv_lora_ranks), portable=portable)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.device(device), no_init_weights():  # every weight is loaded below
        out = export_class(config)(config).to(dtype)
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
    if getattr(config, "norm_topk_prob", False) and isinstance(config, DeepseekV2Config):
        logger.warning("the export renormalises its top-k routing weights (norm_topk_prob: true) like the source; "
                       "%s, so in transformers it routes with unnormalised weights", RENORM_CAVEAT)
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
                           config: DeepseekConfig) -> Tensor:
    """One of the export's tensors outside the decoder layers, from the source's (``get(name)``, in its dtype)."""
    k_res = residual_scale(source_config)
    if name == "model.embed_tokens.weight":
        return _scaled(get(name), k_res)
    if name == "model.norm.weight":
        return get(name)
    if name == "lm_head.weight":  # the export is untied (`deepseek_config`): a tied source's head is its embedding
        return get("model.embed_tokens.weight" if source_config.tie_word_embeddings else name)
    raise KeyError(f"{name} is not a tensor of the DeepSeek export outside its decoder layers")


def deepseek_layer_state(source: dict[str, Tensor], e: LayerLayout, source_config,
                         config: DeepseekConfig) -> dict[str, Tensor]:
    """One decoder layer of the export (upstream DeepSeek module names relative to the layer) from the source
    layer's tensors (checkpoint or module names) and its `LayerLayout`: attention tensors float64, the rest in
    the source's dtype; a MoE layer's router and experts pass through (`moe.deepseek_mlp_state`)."""
    dims = attention_dims(source_config)
    k_res = residual_scale(source_config)
    D = dims.hidden
    state = {name: source[name] for name in ("input_layernorm.weight", "post_attention_layernorm.weight")}
    state.update(deepseek_mlp_state(source, source_config, lambda t: _scaled(t, k_res)))

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
