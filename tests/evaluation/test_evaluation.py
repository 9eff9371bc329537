"""Perplexity with chunked logits (equal to full logits, bounded memory), non-finite results, empty caches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Gemma2Config, Gemma2ForCausalLM
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from care_mla.evaluation.perplexity import (
    LOGITS_BUDGET_BYTES,
    CacheNotUsedError,
    NonFiniteError,
    _split_head,
    check_finite_ppl,
    logit_bytes,
    logits_chunk_tokens,
    measured_kv_bytes_per_token,
    perplexity,
)

BIG_VOCAB = 50_000


@torch.no_grad()
def full_logits_perplexity(model, windows, batch_size=8):
    """The computation perplexity replaced: the whole batch's logits at once."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def windows_for(vocab: int, n: int = 5, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def big_vocab_model(family: str = "llama", vocab: int = BIG_VOCAB, hidden: int = 32):
    return tiny_model(family, vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)


def tiny_deepseek(vocab: int = 512) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8,
                              q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, max_position_embeddings=64, tie_word_embeddings=False)
    return DeepseekV3ForCausalLM(config).eval()


class HeadOnTop(nn.Module):
    """A custom causal LM exposing `.model` and `.lm_head` only (as CareMlaForCausalLM does)."""

    def __init__(self, vocab: int = 300, hidden: int = 16):
        super().__init__()
        self.model = _Body(vocab, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, use_cache=None):
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids).last_hidden_state))


class _Body(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)

    def forward(self, input_ids, use_cache=None):
        return BaseModelOutput(last_hidden_state=torch.tanh(self.mix(self.embed(input_ids))))


# ----------------------------------------------------------------------------- chunked == full logits


@pytest.mark.parametrize("budget", [LOGITS_BUDGET_BYTES, 7 * BIG_VOCAB * logit_bytes(torch.float32), 1])
def test_chunked_perplexity_equals_full_logits(budget):
    model = big_vocab_model()
    windows = windows_for(BIG_VOCAB)
    expected = full_logits_perplexity(model, windows, batch_size=2)
    assert perplexity(model, windows, batch_size=2, budget_bytes=budget) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_chunked_perplexity_equals_full_logits_per_family(family):
    model = tiny_model(family)
    windows = windows_for(model.config.vocab_size, n=3, t=20)
    assert _split_head(model, windows[:1], model(windows[:1]).logits) is not None
    expected = full_logits_perplexity(model, windows, batch_size=2)
    assert perplexity(model, windows, batch_size=2, budget_bytes=5 * 256 * 12) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("make", [tiny_deepseek, HeadOnTop], ids=["deepseek_v3", "model+lm_head"])
def test_chunked_perplexity_on_mla_and_custom_models(make):
    model = make()
    vocab = model.lm_head.out_features
    windows = windows_for(vocab, n=3, t=20)
    assert _split_head(model, windows[:1], model(windows[:1]).logits) is not None
    expected = full_logits_perplexity(model, windows, batch_size=2)
    assert perplexity(model, windows, batch_size=2, budget_bytes=3 * vocab * 12) == pytest.approx(expected, rel=1e-6)


def test_soft_capped_logits_fall_back_to_the_whole_model():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          max_position_embeddings=64)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits well past the cap, so capping matters
    windows = windows_for(400, n=3, t=20)
    assert _split_head(model, windows[:1], model(windows[:1]).logits) is None
    expected = full_logits_perplexity(model, windows, batch_size=2)
    assert perplexity(model, windows, batch_size=2, budget_bytes=1) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- memory bound


def test_chunk_size_keeps_logits_within_the_budget():
    for vocab, dtype in [(200_000, torch.float32), (151_936, torch.bfloat16), (49_152, torch.float16)]:
        chunk = logits_chunk_tokens(vocab, dtype)
        assert chunk * vocab * logit_bytes(dtype) <= LOGITS_BUDGET_BYTES < (chunk + 1) * vocab * logit_bytes(dtype)
    assert logits_chunk_tokens(200_000, torch.float32, budget_bytes=1) == 1  # never zero


def test_perplexity_scores_at_most_a_chunk_of_tokens_at_a_time():
    vocab = 200_000
    model = big_vocab_model(vocab=vocab, hidden=16)
    windows = windows_for(vocab, n=3, t=33)
    budget = 10 * vocab * logit_bytes(torch.float32)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape))
    try:
        perplexity(model, windows, batch_size=2, budget_bytes=budget)
    finally:
        handle.remove()
    chunks = [s[0] for s in rows if len(s) == 2]  # (tokens, vocab); the 3-D calls are the 16-token probe
    assert max(chunks) == logits_chunk_tokens(vocab, torch.float32, budget) == 10
    assert sum(chunks) == 3 * 32


# ----------------------------------------------------------------------------- non-finite results


def test_overflowing_perplexity_is_inf_not_an_error():
    model = big_vocab_model(vocab=1000)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # mean NLL far above log(float max) ≈ 709.8
    ppl = perplexity(model, windows_for(1000, n=2, t=12))
    assert ppl == math.inf
    with pytest.raises(NonFiniteError, match="--dtype float32"):
        check_finite_ppl(ppl, "converted perplexity")


def test_nan_weights_give_nan_and_are_refused():
    model = big_vocab_model(vocab=1000)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    ppl = perplexity(model, windows_for(1000, n=2, t=12))
    assert math.isnan(ppl)
    with pytest.raises(NonFiniteError, match="NaN/Inf weights"):
        check_finite_ppl(ppl, "perplexity")
    assert check_finite_ppl(12.5) == 12.5


def test_windows_without_a_predicted_token_are_refused():
    with pytest.raises(ValueError, match="2\\+ tokens"):
        perplexity(HeadOnTop(), torch.zeros(2, 1, dtype=torch.long))


# ----------------------------------------------------------------------------- measured cache


class _CachelessModel(nn.Module):
    """generate returns a cache that attention never wrote to."""

    generation_config = SimpleNamespace(pad_token_id=0)

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 2)

    def generate(self, input_ids, **kwargs):
        cache = SimpleNamespace(get_seq_length=lambda: 0, layers=[])
        return SimpleNamespace(past_key_values=cache)


def test_empty_cache_raises_a_clear_error():
    with pytest.raises(CacheNotUsedError, match="did not use the cache"):
        measured_kv_bytes_per_token(_CachelessModel(), torch.zeros(1, 4, dtype=torch.long))
