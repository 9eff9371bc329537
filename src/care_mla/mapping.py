"""KV mapping: put per-layer factors into the latent-cache model (CARE.md §3, exact-RoPE).

The factors come from `factorization` (x @ down = latent, latent @ up ≈ x @ W). This module
only moves tensors: the original q/o projections, norms, MLPs and embeddings are copied
unchanged; k_proj/v_proj are replaced by the latent down/up projections, with the original
K/V biases on the up-projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_care_mla import CareMlaConfig
from .factorization import Factors
from .modeling_care_mla import CareMlaForCausalLM


@dataclass(frozen=True)
class LayerLatent:
    """One layer's latent factors: `(k, v)` for separate latents or `(kv,)` for a joint one.

    A joint latent's `up` has the K columns first (`kv_width` of them), then V.
    """

    factors: tuple[Factors, ...]

    @property
    def kv_latent(self) -> str:
        return "joint" if len(self.factors) == 1 else "separate"

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.factors]


def latent_state_dict(model: nn.Module, layers: list[LayerLatent]) -> dict[str, torch.Tensor]:
    """State dict of the latent-cache model built from the original `model` and the factors."""
    state = {k: v for k, v in model.state_dict().items() if ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k}
    for idx, (layer, latent) in enumerate(zip(model.model.layers, layers)):
        attn, prefix = layer.self_attn, f"model.layers.{idx}.self_attn."
        dtype = attn.k_proj.weight.dtype
        k_bias, v_bias = attn.k_proj.bias, attn.v_proj.bias
        if latent.kv_latent == "joint":
            (kv,) = latent.factors
            state[prefix + "kv_a_proj.weight"] = kv.down.T.contiguous().to(dtype)
            state[prefix + "kv_b_proj.weight"] = kv.up.T.contiguous().to(dtype)
            if k_bias is not None:
                state[prefix + "kv_b_proj.bias"] = torch.cat([k_bias, v_bias]).detach()
        else:
            for name, f, bias in (("k", latent.factors[0], k_bias), ("v", latent.factors[1], v_bias)):
                state[prefix + f"{name}_a_proj.weight"] = f.down.T.contiguous().to(dtype)
                state[prefix + f"{name}_b_proj.weight"] = f.up.T.contiguous().to(dtype)
                if bias is not None:
                    state[prefix + f"{name}_b_proj.bias"] = bias.detach()
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
