"""Configuration of the latent-cache ("care_mla") model.

The config carries every field of the original model's config (so generation, masking and
RoPE read them as before) plus three of its own:

- `base_model_type`: the family the layers come from (llama, mistral, qwen2, qwen3);
- `kv_latent`: "separate" (one latent for K, one for V, as in the CARE paper) or "joint"
  (one latent for both, DeepSeek's c_KV);
- `kv_lora_ranks`: per layer, the latent widths: `[r_k, r_v]` (separate) or `[r_kv]` (joint).
  A layer caches `sum(kv_lora_ranks[l])` numbers per token.
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING, PretrainedConfig

KV_LATENTS = ("separate", "joint")
_OWN_FIELDS = ("base_model_type", "kv_latent", "kv_lora_ranks")
_NOT_INHERITED = _OWN_FIELDS + ("model_type", "architectures", "auto_map", "transformers_version")


class CareMlaConfig(PretrainedConfig):
    model_type = "care_mla"

    def __init__(
        self,
        base_model_type: str = "llama",
        kv_latent: str = "separate",
        kv_lora_ranks: list[list[int]] | None = None,
        **kwargs,
    ):
        if kv_latent not in KV_LATENTS:
            raise ValueError(f"kv_latent must be one of {KV_LATENTS}, got {kv_latent!r}")
        self.base_model_type = base_model_type
        self.kv_latent = kv_latent
        self.kv_lora_ranks = [list(map(int, r)) for r in (kv_lora_ranks or [])]
        super().__init__(**kwargs)
        n_layers = getattr(self, "num_hidden_layers", None)
        if kv_lora_ranks is not None and n_layers is not None:
            per_layer = 2 if kv_latent == "separate" else 1
            if len(self.kv_lora_ranks) != n_layers or any(
                len(r) != per_layer or min(r) < 1 for r in self.kv_lora_ranks
            ):
                raise ValueError(
                    f"kv_lora_ranks must list {n_layers} layers of {per_layer} positive rank(s) "
                    f"for kv_latent={kv_latent!r}, got {self.kv_lora_ranks}"
                )

    @classmethod
    def from_base(
        cls, base: PretrainedConfig, *, kv_latent: str, kv_lora_ranks: list[list[int]]
    ) -> "CareMlaConfig":
        fields = {k: v for k, v in base.to_dict().items() if k not in _NOT_INHERITED}
        return cls(
            base_model_type=base.model_type, kv_latent=kv_latent, kv_lora_ranks=kv_lora_ranks, **fields
        )

    def base_config(self) -> PretrainedConfig:
        """The original family's config, with the same attention implementation."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _NOT_INHERITED}
        base = CONFIG_MAPPING[self.base_model_type](**fields)
        base._attn_implementation = self._attn_implementation
        return base

    def kv_cache_width(self) -> int:
        """Numbers cached per token, summed over layers."""
        return sum(sum(r) for r in self.kv_lora_ranks)
