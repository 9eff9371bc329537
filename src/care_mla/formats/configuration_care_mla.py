"""Configuration of the latent-cache ("care_mla") model.

The config carries every field of the original model's config (so generation, masking and
RoPE read them as before) plus three of its own:

- `base_model_type`: the family the layers come from (llama, mistral, qwen2, qwen3, and the
  mixture-of-experts qwen3_moe, qwen2_moe, mixtral, whose sparse MLP blocks are kept as they are);
- `kv_latent`: "separate" (one latent for K, one for V, as in the CARE paper), "joint"
  (one latent for both, DeepSeek's c_KV) — both rotate the whole up-projected K at its cached
  positions, exact at full rank — or "decoupled" (DeepSeek's layout: a shared RoPE key of
  `qk_rope_head_dim` numbers beside the latent, which holds V and the un-rotated part of K;
  decode can absorb the up-projections, see `absorb`);
- `kv_lora_ranks`: per layer, the latent widths: `[r_k, r_v]` (separate) or `[r_kv]` (joint,
  decoupled). A layer caches `sum(kv_lora_ranks[l])` numbers per token (+ `qk_rope_head_dim`
  when decoupled).

Decoupled only: `qk_nope_head_dim` (per-head width of the un-rotated key, 0 at exact parity),
`qk_rope_head_dim`, `rope_freq_index` (which of the source RoPE frequencies each of the
`qk_rope_head_dim / 2` interleaved pairs turns at) and `absorb` ("decode": absorbed attention
for one-token steps, "always", or "never").
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING, PretrainedConfig

KV_LATENTS = ("separate", "joint", "decoupled")
ABSORB_MODES = ("decode", "always", "never")
_OWN_FIELDS = ("base_model_type", "kv_latent", "kv_lora_ranks", "qk_rope_head_dim", "qk_nope_head_dim",
               "rope_freq_index", "absorb")
_NOT_INHERITED = _OWN_FIELDS + ("model_type", "architectures", "auto_map", "transformers_version")


class CareMlaConfig(PretrainedConfig):
    model_type = "care_mla"

    def __init__(
        self,
        base_model_type: str = "llama",
        kv_latent: str = "separate",
        kv_lora_ranks: list[list[int]] | None = None,
        qk_rope_head_dim: int = 0,
        qk_nope_head_dim: int = 0,
        rope_freq_index: list[int] | None = None,
        absorb: str = "decode",
        **kwargs,
    ):
        if kv_latent not in KV_LATENTS:
            raise ValueError(f"kv_latent must be one of {KV_LATENTS}, got {kv_latent!r}")
        if absorb not in ABSORB_MODES:
            raise ValueError(f"absorb must be one of {ABSORB_MODES}, got {absorb!r}")
        self.base_model_type = base_model_type
        self.kv_latent = kv_latent
        self.kv_lora_ranks = [list(map(int, r)) for r in (kv_lora_ranks or [])]
        self.qk_rope_head_dim = int(qk_rope_head_dim)
        self.qk_nope_head_dim = int(qk_nope_head_dim)
        self.rope_freq_index = [int(i) for i in (rope_freq_index or [])]
        self.absorb = absorb
        if kv_latent == "decoupled" and (self.qk_rope_head_dim < 2 or len(self.rope_freq_index) * 2 != self.qk_rope_head_dim):
            raise ValueError("a decoupled latent needs qk_rope_head_dim ≥ 2 and one rope_freq_index per RoPE pair")
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
        cls, base: PretrainedConfig, *, kv_latent: str, kv_lora_ranks: list[list[int]], **own
    ) -> "CareMlaConfig":
        """The config of `base` converted with these latents (`own`: the decoupled fields)."""
        fields = {k: v for k, v in base.to_dict().items() if k not in _NOT_INHERITED}
        return cls(
            base_model_type=base.model_type, kv_latent=kv_latent, kv_lora_ranks=kv_lora_ranks, **own, **fields
        )

    def base_config(self) -> PretrainedConfig:
        """The original family's config, with the same attention implementation."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _NOT_INHERITED}
        base = CONFIG_MAPPING[self.base_model_type](**fields)
        base._attn_implementation = self._attn_implementation
        return base

    def kv_cache_width(self) -> int:
        """Numbers cached per token, summed over layers."""
        rope = self.qk_rope_head_dim if self.kv_latent == "decoupled" else 0
        return sum(sum(r) + rope for r in self.kv_lora_ranks)
