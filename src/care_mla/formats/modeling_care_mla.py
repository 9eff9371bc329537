"""Latent-cache model: each attention layer caches only its K/V latent(s).

Two realisations of CARE.md §3. `CareMlaAttention` (kv_latent "separate" / "joint") is the
exact-RoPE one; `CareMlaDecoupledAttention` (kv_latent "decoupled") is DeepSeek's layout with
per-layer latent widths and an absorbed decode path (see its docstring).

Exact-RoPE realisation. Per token and layer the cache holds the latent(s)
`c = x @ W_a` (width r_k + r_v, or r_kv for a joint latent) instead of the GQA keys and
values (2·g·d_h). At attention time the latents are up-projected to per-KV-head K and V,
K gets Qwen3's k_norm (if any) and RoPE at its true positions, and attention runs as in the
original model. At full rank the logits equal the original model's.

Shapes in comments: B batch, T new tokens, S cached tokens (incl. new), g KV heads,
h query heads, d head dim, r latent width.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.families import FAMILIES, head_dim
from care_mla.formats.moe import accept_checkpoint_names
from care_mla.formats.transformers_api import (
    attention_interface,
    cache_kwargs,
    output_kwargs,
    pick_cache,
    returned_cache,
)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, S, d) by cos/sin (B or 1, S, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _init_heads(attention: nn.Module, config, layer_idx: int):
    """Set what every attention of this model knows of its heads (upstream attribute names); returns the family."""
    attention.config = config
    attention.layer_idx = layer_idx
    attention.head_dim = head_dim(config)
    attention.num_heads = config.num_attention_heads
    attention.num_key_value_heads = config.num_key_value_heads
    attention.num_key_value_groups = attention.num_heads // attention.num_key_value_heads
    attention.attention_dropout = getattr(config, "attention_dropout", 0.0)
    attention.is_causal = True
    return FAMILIES[config.model_type]


class CareMlaAttention(nn.Module):
    """GQA attention whose K/V cache is a low-rank latent."""

    def __init__(self, config, layer_idx: int, kv_latent: str, ranks: list[int]):
        super().__init__()
        family = _init_heads(self, config, layer_idx)
        self.kv_latent = kv_latent
        self.scaling = self.head_dim**-0.5
        qkv_bias, o_bias = family.biases(config)
        hidden, kv_width = config.hidden_size, self.num_key_value_heads * self.head_dim

        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        if kv_latent == "joint":
            (r,) = ranks
            self.kv_a_proj = nn.Linear(hidden, r, bias=False)
            self.kv_b_proj = nn.Linear(r, 2 * kv_width, bias=qkv_bias)  # rows: [K heads | V heads]
        else:
            r_k, r_v = ranks
            self.k_a_proj = nn.Linear(hidden, r_k, bias=False)
            self.k_b_proj = nn.Linear(r_k, kv_width, bias=qkv_bias)
            self.v_a_proj = nn.Linear(hidden, r_v, bias=False)
            self.v_b_proj = nn.Linear(r_v, kv_width, bias=qkv_bias)
        if family.qk_norm_cls is not None:
            self.q_norm = family.qk_norm_cls(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = family.qk_norm_cls(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # RoPE for cached positions: the latent carries no position, so K is rotated at read time.
        self.rotary_emb = family.rotary_cls(config=config)

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores for tokens x (B, T, D): two tensors (B, 1, T, r·)."""
        if self.kv_latent == "joint":
            c = self.kv_a_proj(x).unsqueeze(1)
            return c, c[..., :0]
        return self.k_a_proj(x).unsqueeze(1), self.v_a_proj(x).unsqueeze(1)

    def expand(self, c_a: torch.Tensor, c_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up-project cached latents to K, V (B, g, S, d), before RoPE."""
        B, _, S, _ = c_a.shape
        if self.kv_latent == "joint":
            k, v = self.kv_b_proj(c_a[:, 0]).chunk(2, dim=-1)
        else:
            k, v = self.k_b_proj(c_a[:, 0]), self.v_b_proj(c_b[:, 0])
        shape = (B, S, self.num_key_value_heads, self.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = pick_cache(cache, kwargs)  # `cache` or `past_key_values`, by transformers version
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, h, T, d)

        c_a, c_b = self.latents(hidden_states)
        if cache is not None:
            c_a, c_b = cache.update(c_a, c_b, self.layer_idx)
            # Positions are cache indices: what matters to RoPE is j − i, which they preserve
            # (also for left-padded batches, where position_ids are shifted per row).
            S = c_a.shape[-2]
            positions = torch.arange(S, device=c_a.device).unsqueeze(0)
            cos_k, sin_k = self.rotary_emb(hidden_states, positions)
            cos_q, sin_q = cos_k[:, S - T :], sin_k[:, S - T :]
        else:
            cos_q, sin_q = cos_k, sin_k = position_embeddings

        k, v = self.expand(c_a, c_b)
        if self.k_norm is not None:
            k = self.k_norm(k.transpose(1, 2)).transpose(1, 2)
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos_k, sin_k)

        kernel = attention_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = kernel(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(B, T, -1).contiguous()), weights


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x (..., S, 2n) by cos/sin (..., S, n): ``z·e^{iωt}``."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class CareMlaDecoupledAttention(nn.Module):
    """MLA with a decoupled RoPE key (DeepSeek's layout) and this layer's own latent width r.

    Per token the cache holds the latent ``c = x·W_DKV`` (r numbers) and the shared rotated
    key ``k_pe`` (``qk_rope_head_dim`` numbers), side by side in one tensor. Query head j (of KV group G) scores a cached
    token with ``q_nopeⱼ·(W_UK[G]ᵀ c) + q_peⱼ·k_pe`` and reads ``W_UV[G]ᵀ c``. Two equivalent
    evaluations (`absorb`):

    * expanded: up-project every cached c to per-KV-head k_nope and v, run standard attention;
    * absorbed: fold W_UK into the query (``q̂ⱼ = W_UK[G] q_nopeⱼ``, r numbers), attend over
      ``[c, k_pe]`` as one shared key head and over c as the value (multi-query attention of
      width r + rope), then apply W_UV[G] to each head's r-wide output before ``o_proj``. No
      per-token up-projection: a decode step reads only the cache.

    ``kv_b_proj`` rows are per KV head ``[k_nope (nope) | v (d)]``; the query carries the
    softmax scale for ``(nope + rope)^-½``. Pairs take the model's RoPE cos/sin at the
    frequencies ``rope_freq_index`` (so positions, left padding and any RoPE scaling follow
    the source model's).
    """

    def __init__(self, config, layer_idx: int, rank: int, mla_config):
        super().__init__()
        family = _init_heads(self, config, layer_idx)
        self.rank = rank
        self.nope = mla_config.qk_nope_head_dim
        self.rope = mla_config.qk_rope_head_dim
        self.absorb = mla_config.absorb
        self.scaling = (self.nope + self.rope) ** -0.5
        qkv_bias, o_bias = family.biases(config)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * (self.nope + self.rope), bias=qkv_bias)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, rank + self.rope, bias=qkv_bias)
        self.kv_b_proj = nn.Linear(rank, self.num_key_value_heads * (self.nope + self.head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=qkv_bias or o_bias)  # + folded V bias
        # a plain list, not a buffer: from_pretrained leaves non-persistent buffers uninitialised
        self.rope_freq_index = list(mla_config.rope_freq_index)
        self._freq_index: dict[torch.device, torch.Tensor] = {}

    def _up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (g, nope, r) and W_UV (g, d, r) from kv_b_proj."""
        W = self.kv_b_proj.weight.view(self.num_key_value_heads, self.nope + self.head_dim, self.rank)
        return W[:, : self.nope], W[:, self.nope :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = pick_cache(cache, kwargs)
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # (B, h, T, ·)
        c, k_pe = self.kv_a_proj_with_mqa(hidden_states).unsqueeze(1).split([self.rank, self.rope], dim=-1)
        # (B, 1, T, ·): one shared "head"

        cos, sin = position_embeddings  # (B, T, d) rotate_half layout: column p < d/2 is frequency p
        index = self._freq_index.get(cos.device)
        if index is None:
            index = self._freq_index[cos.device] = torch.tensor(self.rope_freq_index, device=cos.device)
        cos, sin = cos[..., index].unsqueeze(1), sin[..., index].unsqueeze(1)
        q_pe, k_pe = apply_rope_interleaved(q_pe, cos, sin), apply_rope_interleaved(k_pe, cos, sin)
        # The cache holds [c | k_pe] as one (B, 1, S, r + rope) tensor (its "values" are empty):
        # the absorbed path reads it as the shared key and its first r columns as the value.
        ckv = torch.cat([c, k_pe], dim=-1)
        if cache is not None:
            ckv, _ = cache.update(ckv, ckv[..., :0], self.layer_idx)

        absorbed = self.absorb == "always" or (self.absorb == "decode" and T == 1 and not self.training)
        if absorbed:
            out, weights = self._absorbed(q_nope, q_pe, ckv, attention_mask)
        else:
            c, k_pe = ckv.split([self.rank, self.rope], dim=-1)
            out, weights = self._expanded(q_nope, q_pe, c, k_pe, attention_mask, **kwargs)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), weights

    def _expanded(self, q_nope, q_pe, c, k_pe, attention_mask, **kwargs):
        B, _, S, _ = c.shape
        kv = self.kv_b_proj(c[:, 0]).view(B, S, self.num_key_value_heads, self.nope + self.head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.num_key_value_heads, S, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        pad = q.shape[-1] - v.shape[-1]
        if pad > 0 and self.config._attn_implementation == "sdpa":
            # torch's fused SDPA kernels want one head width for q/k and v; the fallback for
            # unequal widths is ~4× slower on CPU (SmolLM2 layer, 2K tokens: 300 vs 79 ms)
            v = nn.functional.pad(v, (0, pad))
        kernel = attention_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = kernel(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return out[..., : self.head_dim].transpose(1, 2), weights  # (B, h, T, d)

    def _absorbed(self, q_nope, q_pe, ckv, attention_mask):
        B, h, T, _ = q_nope.shape
        W_uk, W_uv = self._up()
        g, G = self.num_key_value_heads, self.num_key_value_groups
        q_lat = torch.einsum("bgjtn,gnr->bgjtr", q_nope.reshape(B, g, G, T, self.nope), W_uk).reshape(B, h, T, -1)
        query = torch.cat([q_lat, q_pe], dim=-1)  # (B, h, T, r + rope)
        key, c = ckv, ckv[..., : self.rank]  # (B, 1, S, r + rope), (B, 1, S, r)
        # Multi-query attention as two GEMMs with the heads (× new tokens) as rows: every head
        # shares the one cached key/value, so nothing is expanded or copied per head. (torch's
        # SDPA with one KV head and unequal q/v widths is ~10× slower here on CPU.)
        S = ckv.shape[-2]
        scores = torch.matmul(query.reshape(B, 1, h * T, -1), key.mT).view(B, h, T, S) * self.scaling
        mask = attention_mask
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=ckv.device).tril(S - T)
        if mask is not None:
            mask = mask[..., :S]
            if mask.dtype == torch.bool:  # True = attend; a finite fill keeps fully masked (padding) rows finite
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask.to(scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        o_lat = torch.matmul(probs.view(B, 1, h * T, S), c).view(B, h, T, self.rank)
        out = torch.einsum("bgjtr,gdr->bgjtd", o_lat.view(B, g, G, T, self.rank), W_uv).reshape(B, h, T, -1)
        return out, None


class CareMlaPreTrainedModel(PreTrainedModel):
    config_class = CareMlaConfig
    config: CareMlaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "Qwen3MoeDecoderLayer", "Qwen2MoeDecoderLayer", "MixtralDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True


class CareMlaForCausalLM(CareMlaPreTrainedModel, GenerationMixin):
    """The original family's decoder with every attention layer replaced by `CareMlaAttention`.

    A mixture-of-experts family keeps its sparse MLP blocks as they are (the upstream modules); its layers
    also load a state dict in the checkpoint's per-expert names (`moe.accept_checkpoint_names`), and
    `save_pretrained` writes those names (transformers' conversion mapping of the inner decoder model).
    Router logits are not returned (no auxiliary load-balancing loss).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CareMlaConfig):
        super().__init__(config)
        base = config.base_config()
        self.model = FAMILIES[config.base_model_type].model_cls(base)
        for idx, layer in enumerate(self.model.layers):
            if config.kv_latent == "decoupled":
                (rank,) = config.kv_lora_ranks[idx]
                layer.self_attn = CareMlaDecoupledAttention(base, idx, rank, config)
            else:
                layer.self_attn = CareMlaAttention(base, idx, config.kv_latent, config.kv_lora_ranks[idx])
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        accept_checkpoint_names(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = pick_cache(cache, kwargs)  # generate passes `cache` (transformers ≥ 5.24) or `past_key_values`
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **output_kwargs(returned_cache(outputs))
        )
