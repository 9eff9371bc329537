"""Model families that can be converted: one registry entry per `config.model_type`.

A family tells the converter and the latent-cache model where the attention projections
live, which biases they carry, whether keys and queries are RMS-normalised per head
(Qwen3), and — for mixture-of-experts families — how their sparse MLP blocks are named and
routed (`MoeLayout`; the attention of every MoE family here is its dense sibling's GQA).
Adding a family is one entry here, never a copied module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralModel, MistralRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralModel, MixtralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2RotaryEmbedding
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeModel, Qwen2MoeRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm, Qwen3RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeModel, Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding


class UnsupportedModelError(ValueError):
    """Raised for a model whose attention this project cannot convert."""


@dataclass(frozen=True)
class MoeLayout:
    """A family's sparse MLP block: its names on disk and what its router computes.

    In the module (transformers ≥ 5) every family here holds its experts fused under the decoder
    layer's ``mlp``: ``mlp.experts.gate_up_proj`` (E, 2·I, D) — gate rows, then up rows —,
    ``mlp.experts.down_proj`` (E, D, I) and the router ``mlp.gate.weight`` (E, D). Checkpoints
    (the hub's, and what `save_pretrained` writes) keep one tensor per expert:
    ``{disk_block}.experts.{e}.{gate|up|down}.weight`` and ``{disk_block}.gate.weight``.

    Routing: softmax over all experts, the top ``num_experts_per_tok`` kept, their weights
    renormalised to sum 1 when ``norm_topk_prob`` (always for Mixtral).
    """

    disk_block: str = "mlp"  # the block's name on disk (Mixtral: block_sparse_moe)
    # per expert on disk: gate, up, down (Mixtral: w1, w3, w2)
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    num_experts_field: str = "num_experts"  # the config field of the expert count
    always_norm_topk: bool = False  # Mixtral renormalises the top-k weights whatever the config says
    shared_expert: bool = False  # Qwen2-MoE: a shared expert behind a sigmoid gate, beside the routed ones

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_field))

    def norm_topk_prob(self, config: PretrainedConfig) -> bool:
        return self.always_norm_topk or bool(getattr(config, "norm_topk_prob", False))

    def sparse_layers(self, config: PretrainedConfig) -> list[bool]:
        """Per decoder layer, whether its MLP is the sparse block (Qwen's `mlp_only_layers` and
        `decoder_sparse_step` name the dense ones; Mixtral has no dense layer)."""
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        experts = self.num_experts(config)
        return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]


@dataclass(frozen=True)
class Family:
    model_type: str
    model_cls: type[nn.Module]  # the decoder stack, e.g. LlamaModel
    rotary_cls: type[nn.Module]
    qk_norm_cls: type[nn.Module] | None = None  # per-head RMSNorm on q and k (Qwen3)
    qkv_bias_always: bool = False  # Qwen2: q/k/v carry a bias whatever the config says
    qkv_bias_field: str | None = None  # Qwen2-MoE: the config field that puts a bias on q/k/v (none on o_proj)
    moe: MoeLayout | None = None  # mixture-of-experts families: their sparse MLP block

    def biases(self, config: PretrainedConfig) -> tuple[bool, bool]:
        """(bias on q/k/v projections, bias on o_proj)."""
        if self.qkv_bias_always:
            return True, False
        if self.qkv_bias_field is not None:
            return bool(getattr(config, self.qkv_bias_field)), False
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LlamaModel, LlamaRotaryEmbedding),
    "mistral": Family("mistral", MistralModel, MistralRotaryEmbedding),
    "qwen2": Family("qwen2", Qwen2Model, Qwen2RotaryEmbedding, qkv_bias_always=True),
    "qwen3": Family("qwen3", Qwen3Model, Qwen3RotaryEmbedding, qk_norm_cls=Qwen3RMSNorm),
    # mixture-of-experts families: their dense sibling's attention, the sparse MLP blocks kept as they are
    "qwen3_moe": Family("qwen3_moe", Qwen3MoeModel, Qwen3MoeRotaryEmbedding, qk_norm_cls=Qwen3MoeRMSNorm,
                        moe=MoeLayout()),
    "qwen2_moe": Family("qwen2_moe", Qwen2MoeModel, Qwen2MoeRotaryEmbedding, qkv_bias_field="qkv_bias",
                        moe=MoeLayout(shared_expert=True)),
    "mixtral": Family("mixtral", MixtralModel, MixtralRotaryEmbedding,
                      moe=MoeLayout(disk_block="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                                    num_experts_field="num_local_experts", always_norm_topk=True)),
}

# Llama's RMSNorm is what every family above uses for its per-layer norms.
RMSNorm = LlamaRMSNorm


def get_family(config: PretrainedConfig) -> Family:
    """The family of `config`, or an error that names the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        dense = ", ".join(sorted(name for name, f in FAMILIES.items() if f.moe is None))
        moe = ", ".join(sorted(name for name, f in FAMILIES.items() if f.moe is not None))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; care-mla converts GQA decoders of the "
            f"families: {dense}; mixture-of-experts: {moe}"
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
