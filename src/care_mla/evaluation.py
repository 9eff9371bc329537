"""Held-out perplexity and KV-cache bytes per token (from the config and measured)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .configuration_care_mla import CareMlaConfig
from .families import gqa_kv_width


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of `windows` (N, T)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def kv_cache_width(config) -> int:
    """Numbers one token occupies in the KV cache of all layers, from the config.

    Latent-cache models: their latents (+ RoPE key); DeepSeek-V3 (MLA): ``kv_lora_rank +
    qk_rope_head_dim`` per layer, what transformers, vLLM and SGLang cache; GQA: ``2·g·d_h``.
    """
    if isinstance(config, CareMlaConfig):
        return config.kv_cache_width()
    if getattr(config, "model_type", None) == "deepseek_v3":
        return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    return config.num_hidden_layers * gqa_kv_width(config)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the KV cache of all layers, from the config."""
    return kv_cache_width(config) * torch.empty((), dtype=dtype).element_size()


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of a transformers Cache (keys and values of every layer)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measured_kv_bytes_per_token(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int = 8) -> float:
    """Run `generate` and divide the bytes of the returned cache by the tokens it holds.

    The cache holds every token but the last generated one (which was never fed back).
    """
    device = next(model.parameters()).device
    out = model.generate(
        input_ids.to(device),
        attention_mask=torch.ones_like(input_ids, device=device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0,
    )
    cache = out.past_key_values
    tokens = cache.get_seq_length() * input_ids.shape[0]
    return cache_bytes(cache) / tokens
