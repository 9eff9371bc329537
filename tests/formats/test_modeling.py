"""Latent-cache model on tiny random configs of every family: parity, round trip, cache, generate."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CLASSES, tiny_model
from transformers import AutoModelForCausalLM

import care_mla  # noqa: F401  (registers model_type care_mla)
from care_mla.evaluation.perplexity import cache_bytes, kv_bytes_per_token, measured_kv_bytes_per_token
from care_mla.formats.mapping import LayerLatent, build_latent_model
from care_mla.formats.transformers_api import returned_cache
from care_mla.method.factorization import Factors


def exact_latents(model, kv_latent: str) -> list[LayerLatent]:
    """Full-rank factors that reproduce k_proj/v_proj exactly (identity up-projection)."""
    out = []
    for layer in model.model.layers:
        W_k = layer.self_attn.k_proj.weight.detach().T
        W_v = layer.self_attn.v_proj.weight.detach().T
        if kv_latent == "joint":
            W = torch.cat([W_k, W_v], dim=1)
            out.append(LayerLatent((Factors(W, torch.eye(W.shape[1]), torch.ones(W.shape[1])),)))
        else:
            out.append(LayerLatent(tuple(Factors(W, torch.eye(W.shape[1]), torch.ones(W.shape[1])) for W in (W_k, W_v))))
    return out


def random_latents(model, ranks: list[list[int]], seed: int = 1) -> list[LayerLatent]:
    g = torch.Generator().manual_seed(seed)
    D = model.config.hidden_size
    m = model.config.num_key_value_heads * model.config.head_dim
    out = []
    for r in ranks:
        widths = [2 * m] if len(r) == 1 else [m, m]
        out.append(
            LayerLatent(
                tuple(
                    Factors(torch.randn(D, ri, generator=g) / D**0.5, torch.randn(ri, w, generator=g) / ri**0.5, torch.ones(ri))
                    for ri, w in zip(r, widths)
                )
            )
        )
    return out


@pytest.mark.parametrize("family", sorted(FAMILY_CLASSES))
@pytest.mark.parametrize("kv_latent", ["separate", "joint"])
def test_full_rank_latent_model_reproduces_logits(family, kv_latent, tmp_path):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latent = build_latent_model(model, exact_latents(model, kv_latent))
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        got = latent(ids).logits
    assert (expected - got).abs().max().item() <= 1e-4
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # round trip through save_pretrained / AutoModelForCausalLM
    latent.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "CareMlaForCausalLM"
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, got)


@pytest.mark.parametrize("kv_latent,ranks", [("separate", [[5, 11], [9, 3], [16, 16]]), ("joint", [[7], [30], [12]])])
def test_generate_with_latent_cache_matches_uncached_forward(kv_latent, ranks):
    model = tiny_model("qwen3")  # q/k norms and per-layer ranks: the hardest case
    latent = build_latent_model(model, random_latents(model, ranks))
    prompt = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = latent.generate(prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
        seq = out.sequences
        # greedy decoding without any cache, one full forward per step
        ids = prompt
        for _ in range(10):
            nxt = latent(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(seq, ids)
    # the cache holds latents only: exactly sum(ranks) numbers per token, fp32
    cache = returned_cache(out)
    tokens = cache.get_seq_length()
    assert tokens == 12 + 10 - 1
    assert cache_bytes(cache) == tokens * sum(map(sum, ranks)) * 4
    assert kv_bytes_per_token(latent.config, torch.float32) == sum(map(sum, ranks)) * 4


def test_left_padded_batch_generation_matches_single_rows():
    model = tiny_model("llama")
    latent = build_latent_model(model, random_latents(model, [[8, 8], [4, 12], [16, 2]]))
    a = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    b = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 10), torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1)]).long()
    with torch.no_grad():
        both = latent.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        only_a = latent.generate(a, max_new_tokens=6, do_sample=False)
        only_b = latent.generate(b, max_new_tokens=6, do_sample=False)
    assert torch.equal(both[0, 10:], only_a[0, 10:])
    assert torch.equal(both[1, 10:], only_b[0, 6:])


def test_measured_cache_bytes_of_original_gqa_model():
    model = tiny_model("mistral")
    ids = torch.randint(3, 256, (1, 16))
    expected = kv_bytes_per_token(model.config, torch.float32)
    assert expected == 3 * 2 * 2 * 16 * 4
    assert measured_kv_bytes_per_token(model, ids) == expected
