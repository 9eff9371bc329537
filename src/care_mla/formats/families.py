"""Model families that can be converted: one registry entry per `config.model_type`.

A family tells the converter and the latent-cache model where the attention projections
live, which biases they carry, and whether keys and queries are RMS-normalised per head
(Qwen3).  Adding a family is one entry here, never a copied module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralModel, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm, Qwen3RotaryEmbedding


class UnsupportedModelError(ValueError):
    """Raised for a model whose attention this project cannot convert."""


@dataclass(frozen=True)
class Family:
    model_type: str
    model_cls: type[nn.Module]  # the decoder stack, e.g. LlamaModel
    rotary_cls: type[nn.Module]
    qk_norm_cls: type[nn.Module] | None = None  # per-head RMSNorm on q and k (Qwen3)
    qkv_bias_always: bool = False  # Qwen2: q/k/v carry a bias whatever the config says

    def biases(self, config: PretrainedConfig) -> tuple[bool, bool]:
        """(bias on q/k/v projections, bias on o_proj)."""
        if self.qkv_bias_always:
            return True, False
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LlamaModel, LlamaRotaryEmbedding),
    "mistral": Family("mistral", MistralModel, MistralRotaryEmbedding),
    "qwen2": Family("qwen2", Qwen2Model, Qwen2RotaryEmbedding, qkv_bias_always=True),
    "qwen3": Family("qwen3", Qwen3Model, Qwen3RotaryEmbedding, qk_norm_cls=Qwen3RMSNorm),
}

# Llama's RMSNorm is what every family above uses for its per-layer norms.
RMSNorm = LlamaRMSNorm


def get_family(config: PretrainedConfig) -> Family:
    """The family of `config`, or an error that names the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; care-mla converts GQA decoders of the "
            f"families: {supported}"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if window is not None and uses_window and window < config.max_position_embeddings:
        raise UnsupportedModelError(
            f"{model_type} with sliding_window={window} is not supported yet: the latent cache keeps "
            "every position; set sliding_window to null in config.json if the model was trained without it"
        )
    return family


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gqa_kv_width(config: PretrainedConfig) -> int:
    """Numbers a GQA layer caches per token: K and V for every KV head."""
    return 2 * config.num_key_value_heads * head_dim(config)
