"""Held-out perplexity and KV-cache bytes per token (from the config and measured).

Perplexity never holds a batch's full-vocabulary logits: the decoder runs on a batch, then the
LM head and the cross-entropy run over chunks of its hidden states, so the logits and their
temporaries take at most `LOGITS_BUDGET_BYTES` whatever the vocabulary (152k for Qwen2).
"""

from __future__ import annotations

import logging
import math

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.families import gqa_kv_width
from care_mla.formats.transformers_api import returned_cache

logger = logging.getLogger(__name__)

#: Bytes the logits of one chunk of tokens (and their cross-entropy temporaries) may take.
LOGITS_BUDGET_BYTES = 256 * 1024**2
#: Tokens of the first window used to check that ``lm_head(decoder(ids))`` is the model's logits.
_PROBE_TOKENS = 16


class NonFiniteError(RuntimeError):
    """A perplexity is NaN or infinite: the model's outputs are not finite numbers."""


class CacheNotUsedError(RuntimeError):
    """`generate` returned an empty KV cache: the model's attention did not write to it."""


def logit_bytes(dtype: torch.dtype) -> int:
    """Bytes per logit while a chunk is scored: the head's output in `dtype`, an fp32 copy, an fp32 log-softmax."""
    return torch.empty((), dtype=dtype).element_size() + 8


def logits_chunk_tokens(vocab_size: int, dtype: torch.dtype, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk such that ``tokens · vocab_size · logit_bytes(dtype) ≤ budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // (vocab_size * logit_bytes(dtype)))


def check_finite_ppl(value: float, what: str = "perplexity") -> float:
    """`value` if finite, else `NonFiniteError` naming the likely cause and the fix (callers refuse NaN/Inf)."""
    if math.isfinite(value):
        return value
    raise NonFiniteError(
        f"{what} is {value}: the model's logits are not finite or its mean NLL overflows exp, likely NaN/Inf "
        "weights or activations overflowing the dtype (float16/bfloat16); retry with --dtype float32"
    )


def _ppl(total_nll: float, total_tokens: int) -> float:
    """exp(mean NLL): inf when it overflows, nan when the NLL is nan (never raises)."""
    mean = total_nll / total_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


def _split_head(model: nn.Module, probe: torch.Tensor, logits: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) such that ``lm_head(decoder(probe).last_hidden_state)`` is `logits`, else None.

    The decoder is `model.get_decoder()` (else `model.model`), the head `model.get_output_embeddings()`
    (else `model.lm_head`). Rather than trusting a list of families, the identity is checked against
    the model's own `logits` for `probe` (to one ulp of the largest logit, NaN equal to NaN): a model
    whose forward changes the logits after the head (Gemma-2's final soft-capping, Cohere's
    logit_scale, Granite's logits_scaling, ...) fails it.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if not isinstance(decoder, nn.Module) or decoder is model or not isinstance(head, nn.Module):
        return None
    hidden = getattr(decoder(probe, use_cache=False), "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        return None
    ours = head(hidden)
    if ours.shape != logits.shape or ours.dtype != logits.dtype:
        return None
    finite = logits[logits.isfinite()]
    ulp = torch.finfo(logits.dtype).eps * (finite.abs().max().item() if finite.numel() else 1.0)
    return (decoder, head) if torch.allclose(ours, logits, rtol=0.0, atol=ulp, equal_nan=True) else None


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of the next-token NLL of `targets` (n,) under `logits` (n, vocab), computed in fp32."""
    return nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False,
               budget_bytes: int = LOGITS_BUDGET_BYTES) -> float:
    """exp(mean next-token NLL) over every predicted token of `windows` (N, T); inf or nan, never an error.

    Memory: the decoder's activations for one batch (hidden states ``batch_size · T · hidden`` and
    attention) plus at most `budget_bytes` of logits, whatever the vocabulary: the LM head and the
    cross-entropy run over `logits_chunk_tokens` tokens at a time, and the NLL sums in float64.
    A model whose logits are not ``lm_head(decoder(ids))`` (checked by `_split_head` on the first 16
    tokens) runs whole, on as many windows at a time as the budget holds; at least one, so its bound
    is ``max(budget_bytes, T · vocab · logit_bytes)``. Pass the result to `check_finite_ppl` to refuse NaN/Inf.
    """
    n, t = windows.shape
    if n == 0 or t < 2:
        raise ValueError(f"perplexity needs windows of 2+ tokens, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    probe = windows[:1, :_PROBE_TOKENS].to(device)
    probe_logits = model(probe, use_cache=False).logits
    vocab, dtype = probe_logits.shape[-1], probe_logits.dtype
    split = _split_head(model, probe, probe_logits)
    del probe_logits
    if split is None:
        batch_size = min(batch_size, max(1, budget_bytes // (t * vocab * logit_bytes(dtype))))
        logger.info("perplexity: logits are not lm_head(decoder(ids)); scoring %d window(s) at a time", batch_size)
    chunk = logits_chunk_tokens(vocab, dtype, budget_bytes)
    total_nll, total_tokens = 0.0, 0  # python floats: float64
    for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        targets = ids[:, 1:].reshape(-1)
        if split is None:
            logits = model(ids, use_cache=False).logits[:, :-1]
            total_nll += _nll_sum(logits.reshape(-1, vocab), targets)
        else:
            decoder, head = split
            hidden = decoder(ids, use_cache=False).last_hidden_state[:, :-1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for s in range(0, targets.numel(), chunk):
                total_nll += _nll_sum(head(hidden[s : s + chunk]), targets[s : s + chunk])
        total_tokens += targets.numel()
    return _ppl(total_nll, total_tokens)


def kv_cache_width(config) -> int:
    """Numbers one token occupies in the KV cache of all layers, from the config.

    Latent-cache models: their latents (+ RoPE key); DeepSeek-V3 (MLA): ``kv_lora_rank +
    qk_rope_head_dim`` per layer, what transformers, vLLM and SGLang cache; GQA: ``2·g·d_h``.
    """
    if isinstance(config, CareMlaConfig):
        return config.kv_cache_width()
    if getattr(config, "model_type", None) in ("deepseek_v2", "deepseek_v3"):
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
    Raises `CacheNotUsedError` when the returned cache is empty (attention that bypassed it).
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
    cache = returned_cache(out)
    length = cache.get_seq_length() if cache is not None else 0
    if length == 0:
        raise CacheNotUsedError(
            f"{type(model).__name__}.generate returned an empty KV cache: the model's attention did not use the "
            f"cache, likely a transformers version outside the tested range (installed {transformers.__version__}; "
            "see pyproject.toml and constraints.txt)"
        )
    return cache_bytes(cache) / (length * input_ids.shape[0])
