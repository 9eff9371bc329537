"""KV mapping: put per-layer factors into the latent-cache model (CARE.md §3).

Exact-RoPE latents (`build_latent_model`): the factors come from `factorization`
(x @ down = latent, latent @ up ≈ x @ W). The original q/o projections, norms, MLPs and
embeddings are copied unchanged; k_proj/v_proj are replaced by the latent down/up
projections, with the original K/V biases on the up-projections.

Decoupled-RoPE latents (`build_decoupled_model`): the per-layer tensors of a
`deepseek.MlaLayout` (RoPE key, joint latent, up-projections per KV head, query with the
softmax scale folded) replace q/k/v/o; everything else is copied unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
from care_mla.method.factorization import Factors

if TYPE_CHECKING:
    from care_mla.method.decoupled import LayerLayout, MlaLayout, RopeSplit


@dataclass(frozen=True)
class LayerLatent:
    """One layer's latent factors: `(k, v)` for separate latents or `(kv,)` for a joint one.

    A joint latent's `up` has the K columns first (`kv_width` of them), then V.
    """

    factors: tuple[Factors, ...]
    o_weight: torch.Tensor | None = None  # a refitted o_proj weight (D, heads·d_v) (`compensation`); None: the source's

    @property
    def kv_latent(self) -> str:
        return "joint" if len(self.factors) == 1 else "separate"

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.factors]


def latent_layer_state(layer_state: dict[str, torch.Tensor], latent: LayerLatent) -> dict[str, torch.Tensor]:
    """One decoder layer of the latent-cache model from the original layer's tensors (names relative to the layer).

    Everything but ``self_attn.{k,v}_proj`` (and ``o_proj.weight`` when the latent holds a refitted one) is
    passed through; the latent factors are cast to the original K projection's dtype, the K/V biases move onto
    the up-projections.
    """
    attn_kv = ("self_attn.k_proj.", "self_attn.v_proj.")
    state = {k: v for k, v in layer_state.items() if not k.startswith(attn_kv)}
    dtype = layer_state["self_attn.k_proj.weight"].dtype
    k_bias, v_bias = layer_state.get("self_attn.k_proj.bias"), layer_state.get("self_attn.v_proj.bias")
    if latent.kv_latent == "joint":
        (kv,) = latent.factors
        state["self_attn.kv_a_proj.weight"] = kv.down.T.contiguous().to(dtype)
        state["self_attn.kv_b_proj.weight"] = kv.up.T.contiguous().to(dtype)
        if k_bias is not None:
            state["self_attn.kv_b_proj.bias"] = torch.cat([k_bias, v_bias])
    else:
        for name, f, bias in (("k", latent.factors[0], k_bias), ("v", latent.factors[1], v_bias)):
            state[f"self_attn.{name}_a_proj.weight"] = f.down.T.contiguous().to(dtype)
            state[f"self_attn.{name}_b_proj.weight"] = f.up.T.contiguous().to(dtype)
            if bias is not None:
                state[f"self_attn.{name}_b_proj.bias"] = bias
    if latent.o_weight is not None:
        state["self_attn.o_proj.weight"] = latent.o_weight.to(layer_state["self_attn.o_proj.weight"].dtype)
    return state


def latent_state_dict(model: nn.Module, layers: list[LayerLatent]) -> dict[str, torch.Tensor]:
    """State dict of the latent-cache model built from the original `model` and the factors."""
    full = {k: v.detach() for k, v in model.state_dict().items()}
    state = {k: v for k, v in full.items() if not k.startswith("model.layers.")}
    for idx, latent in enumerate(layers):
        prefix = f"model.layers.{idx}."
        layer_state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in latent_layer_state(layer_state, latent).items()})
    return state


def build_latent_model(model: nn.Module, layers: list[LayerLatent]) -> CareMlaForCausalLM:
    """A new `CareMlaForCausalLM` with `model`'s weights and the given latents; `model` is untouched."""
    kinds = {latent.kv_latent for latent in layers}
    if len(kinds) != 1 or len(layers) != model.config.num_hidden_layers:
        raise ValueError("need one latent of a single kind (separate or joint) per decoder layer")
    config = CareMlaConfig.from_base(model.config, kv_latent=kinds.pop(), kv_lora_ranks=[l.ranks for l in layers])
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.device(device):
        latent_model = CareMlaForCausalLM(config).to(dtype)
    latent_model.load_state_dict(latent_state_dict(model, layers), strict=True)
    latent_model.generation_config = model.generation_config
    return latent_model.eval()


def decoupled_layer_state(layer_state: dict[str, torch.Tensor], e: "LayerLayout", *, qk_rope_head_dim: int,
                          rope_attention_scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """One decoder layer of the decoupled latent-cache model (names relative to the layer) from the original
    layer's tensors and its `deepseek.LayerLayout`: attention tensors float64, the rest passed through."""
    attn_keys = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.",
                 "self_attn.q_norm.", "self_attn.k_norm.")
    state = {k: v for k, v in layer_state.items() if not k.startswith(attn_keys)}
    D = e.o_weight.shape[0]
    qkv_bias = "self_attn.q_proj.bias" in layer_state
    o_bias = qkv_bias or "self_attn.o_proj.bias" in layer_state
    q = e.q.clone()
    q[..., q.shape[-1] - qk_rope_head_dim :] /= rope_attention_scaling**2  # our cos/sin carry the scaling
    state["self_attn.q_proj.weight"] = q[:D].reshape(D, -1).T
    state["self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([e.kv_latent, e.k_pe[:D]], dim=1).T
    state["self_attn.kv_b_proj.weight"] = torch.cat([e.up_k, e.up_v], dim=-1).reshape(e.rank, -1).T
    state["self_attn.o_proj.weight"] = e.o_weight
    if qkv_bias:
        state["self_attn.q_proj.bias"] = q[D].reshape(-1)
        state["self_attn.kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(e.rank, dtype=e.k_pe.dtype), e.k_pe[D]])
    if o_bias:
        state["self_attn.o_proj.bias"] = e.o_bias if e.o_bias is not None else torch.zeros(D, dtype=torch.float64)
    return state


def decoupled_state_dict(model: nn.Module, layout: "MlaLayout") -> dict[str, torch.Tensor]:
    """State dict of the decoupled latent-cache model built from `model` and `layout` (float64 attention tensors)."""
    full = {k: v.detach() for k, v in model.state_dict().items()}
    state = {k: v for k, v in full.items() if not k.startswith("model.layers.")}
    for idx, e in enumerate(layout.layers):
        prefix = f"model.layers.{idx}."
        layer_state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in decoupled_layer_state(
            layer_state, e, qk_rope_head_dim=layout.qk_rope_head_dim,
            rope_attention_scaling=layout.rope_attention_scaling).items()})
    return state


def decoupled_config(base_config, layout: "MlaLayout | RopeSplit", kv_lora_ranks: list[int]) -> CareMlaConfig:
    """The `CareMlaConfig` of a decoupled layout (from the layout, or from its split before the layers are made)."""
    return CareMlaConfig.from_base(
        base_config, kv_latent="decoupled", kv_lora_ranks=[[r] for r in kv_lora_ranks],
        qk_rope_head_dim=layout.qk_rope_head_dim, qk_nope_head_dim=layout.qk_nope_head_dim,
        rope_freq_index=layout.rope_freq_index.tolist(),
    )


def build_decoupled_model(model: nn.Module, layout: "MlaLayout") -> CareMlaForCausalLM:
    """A new decoupled-RoPE `CareMlaForCausalLM` (per-layer latent widths, absorbed decode); `model` is untouched."""
    if len(layout.layers) != model.config.num_hidden_layers:
        raise ValueError("need one layer layout per decoder layer")
    config = decoupled_config(model.config, layout, layout.kv_lora_ranks)
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.device(device):
        latent_model = CareMlaForCausalLM(config).to(dtype)
    state = decoupled_state_dict(model, layout)
    latent_model.load_state_dict({k: v.to(dtype=dtype, device=device) for k, v in state.items()}, strict=True)
    latent_model.generation_config = model.generation_config
    return latent_model.eval()
