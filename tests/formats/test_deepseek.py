"""Export to stock DeepSeek-V3 (`care_mla.formats.deepseek`): pure maths, then round trips on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3RMSNorm,
    apply_rotary_pos_emb_interleave,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from care_mla.formats import deepseek as ds
from care_mla.formats import engines
from care_mla.formats.families import UnsupportedModelError
from care_mla.formats.transformers_api import returned_cache
from care_mla.method import rope_split
from care_mla.pipeline.calibration import collect_statistics

# tiny_config: D = 64, 4 query heads, g = 2 KV heads, d_h = 16 → GQA cache 2·2·16 = 64 per layer
PARITY = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and a shared machine stays usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(seed: int = 0, shape=(2, 40)) -> torch.Tensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated():
    """Factory: (model, stats) per (family, overrides), calibrated on random tokens, cached."""
    made = {}

    def make(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            model = tiny_model(family, **overrides)
            stats = collect_statistics(model, _ids(1, (8, 64)), progress=False)
            made[key] = (model, stats)
        return made[key]

    return make


def _round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def _mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = reference.log_softmax(-1)
    return float((p.exp() * (p - other.log_softmax(-1))).sum(-1).mean())


def _random_unitary(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.complex(torch.randn(n, n, generator=g, dtype=torch.float64), torch.randn(n, n, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(A)
    return Q


# ============================================================================ pure functions


def test_pair_layouts_round_trip():
    W = torch.randn(5, 3 * 8, dtype=torch.float64)
    Z = rope_split.to_pairs(W, 3)
    assert Z.shape == (5, 3, 4)
    assert torch.equal(Z[:, 1, 2], torch.complex(W[:, 8 + 2], W[:, 8 + 6]))  # dims (p, p + d/2) of head 1
    assert torch.equal(rope_split.from_pairs(Z), W)
    X = rope_split.interleave(Z[:, 0])
    assert torch.equal(X[:, 0::2], Z[:, 0].real) and torch.equal(X[:, 1::2], Z[:, 0].imag)


def test_mixed_rope_pairs_reproduce_every_heads_rotated_scores():
    """Unitary per-frequency mixing commutes with RoPE: DeepSeek's interleaved k_pe with mixed
    query pairs gives each head exactly its GQA score, at any pair of positions."""
    g, heads, d = 3, 6, 8
    h = d // 2
    groups = torch.arange(heads) // (heads // g)
    torch.manual_seed(0)
    q = torch.randn(1, heads * d, dtype=torch.float64)  # one token's projections (R = 1 row)
    k = torch.randn(1, g * d, dtype=torch.float64)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    plan = rope_split.RopePlan(mixing=torch.stack([_random_unitary(g, p) for p in range(h)]),
                       energy=torch.ones(h, g, dtype=torch.float64), counts=torch.full((h,), g))
    q_pe = rope_split.interleave(rope_split.rope_query(rope_split.to_pairs(q, heads), plan, groups))[0]  # (heads, g·d)
    k_pe = rope_split.interleave(rope_split.rope_key(rope_split.to_pairs(k, g), plan))[0]  # (g·d,)
    freq, _ = plan.slots
    for t_q, t_k in [(0, 0), (7, 3), (40, 11)]:
        # GQA side: rotate_half RoPE on d dims per head
        emb = torch.cat([inv_freq, inv_freq])
        cq, sq = (emb * t_q).cos()[None, None], (emb * t_q).sin()[None, None]
        ck, sk = (emb * t_k).cos()[None, None], (emb * t_k).sin()[None, None]
        rq, _ = apply_rotary_pos_emb(q.view(1, heads, 1, d), q.view(1, heads, 1, d), cq, sq)
        _, rk = apply_rotary_pos_emb(k.view(1, g, 1, d), k.view(1, g, 1, d), ck, sk)
        want = (rq[0, :, 0] * rk[0, groups, 0]).sum(-1)
        # DeepSeek side: interleaved RoPE on the shared k_pe, one frequency per pair
        f = torch.cat([inv_freq[freq], inv_freq[freq]])
        cq, sq = (f * t_q).cos()[None, None], (f * t_q).sin()[None, None]
        ck, sk = (f * t_k).cos()[None, None], (f * t_k).sin()[None, None]
        dq, _ = apply_rotary_pos_emb_interleave(q_pe.view(1, heads, 1, -1), q_pe.view(1, heads, 1, -1), cq, sq)
        _, dk = apply_rotary_pos_emb_interleave(k_pe.view(1, 1, 1, -1), k_pe.view(1, 1, 1, -1), ck, sk)
        got = (dq[0, :, 0] * dk[0, 0, 0]).sum(-1)
        assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_kept_plus_rest_is_the_unrotated_score():
    """Without rotation, the kept pairs plus the rest key (nope) give q·k exactly."""
    g, heads, d = 2, 4, 8
    h = d // 2
    groups = torch.arange(heads) // 2
    torch.manual_seed(1)
    q, k = torch.randn(1, heads * d, dtype=torch.float64), torch.randn(1, g * d, dtype=torch.float64)
    plan = rope_split.RopePlan(mixing=torch.stack([_random_unitary(g, 10 + p) for p in range(h)]),
                       energy=torch.ones(h, g, dtype=torch.float64), counts=torch.tensor([2, 1, 0, 1]))
    kept = (rope_split.interleave(rope_split.rope_query(rope_split.to_pairs(q, heads), plan, groups))[0]
            * rope_split.interleave(rope_split.rope_key(rope_split.to_pairs(k, g), plan))[0]).sum(-1)
    rest = rope_split.from_pairs(rope_split.rest_key(rope_split.to_pairs(k, g), plan)).view(g, d)[groups]
    got = kept + (q.view(heads, d) * rest).sum(-1)
    want = (q.view(heads, d) * k.view(g, d)[groups]).sum(-1)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert plan.num_pairs == 4
    assert torch.equal(plan.slots[0], torch.tensor([0, 0, 1, 3])) and torch.equal(plan.slots[1], torch.tensor([0, 1, 0, 0]))


def test_pca_keeps_the_top_eigen_energy_and_beats_partial():
    torch.manual_seed(2)
    D, g, h = 12, 3, 4
    W = torch.randn(D, g * 2 * h, dtype=torch.float64)
    X = torch.randn(500, D, dtype=torch.float64) * torch.linspace(0.2, 3, D)
    C = X.T @ X / 500
    H = rope_split.key_pair_covariance(rope_split.to_pairs(W, g), C)
    # H is the covariance of the complex key pairs
    kz = X.to(torch.complex128) @ rope_split.to_pairs(W, g).reshape(D, -1)
    emp = torch.einsum("ni,nj->ij", kz, kz.conj()).reshape(g, h, g, h) / 500
    assert torch.allclose(H, torch.einsum("gphp->pgh", emp), atol=1e-10)
    counts = torch.tensor([2, 1, 0, 1])
    plans = {}
    for strategy in ("pca", "partial"):
        mixing, energy = rope_split.rope_components(H, strategy)
        plans[strategy] = rope_split.plan_rope(mixing, energy, energy, counts)
    pca, partial = plans["pca"], plans["partial"]
    eig = torch.linalg.eigvalsh(H).flip(-1)
    want = sum(float(eig[p, :c].sum()) for p, c in enumerate(counts.tolist()))
    assert pca.kept_energy() == pytest.approx(want, rel=1e-10)
    assert pca.kept_energy() >= partial.kept_energy()  # Ky Fan: top eigenvalues ≥ top diagonal entries
    total = float(torch.diagonal(H, dim1=-2, dim2=-1).real.sum())
    assert float(pca.energy.sum()) == pytest.approx(total, rel=1e-10) == float(partial.energy.sum())


def test_global_pair_counts_share_frequencies_by_normalised_energy():
    e1 = torch.tensor([[10.0, 1.0], [5.0, 0.0], [0.0, 0.0]])
    e2 = torch.tensor([[1.0, 0.0], [100.0, 90.0], [1.0, 0.0]])  # 10× the total energy: normalised away
    counts = rope_split.global_pair_counts([e1, e2], 3)
    assert counts.tolist() == [1, 2, 0]
    assert rope_split.global_pair_counts([e1, e2], 6).tolist() == [2, 2, 2]
    with pytest.raises(rope_split.DeepseekExportError):
        rope_split.global_pair_counts([e1], 7)


def test_linear_norm_prescale_makes_rmsnorm_the_identity_for_every_input():
    torch.manual_seed(3)
    D, r = 64, 20
    w_ln = torch.rand(D, dtype=torch.float64) * 2
    A = torch.randn(D, r, dtype=torch.float64)
    sigma = float(torch.linalg.matrix_norm(w_ln[:, None] * A, ord=2))
    s = ds.linear_norm_prescale(D * sigma**2, r)
    w = math.sqrt(ds.DEEPSEEK_NORM_EPS) / s
    # worst case: u (‖u‖² = D) along the top right-singular direction of diag(w_ln)·A
    _, _, Vh = torch.linalg.svd((w_ln[:, None] * A).T)
    u = Vh[0] * math.sqrt(D)
    x = torch.cat([(w_ln * u)[None], torch.randn(50, D, dtype=torch.float64)])
    c = x @ A
    exact = s * c * w / ((s * c).pow(2).mean(-1, keepdim=True) + ds.DEEPSEEK_NORM_EPS).sqrt()
    rel = ((exact - c).norm(dim=-1) / c.norm(dim=-1)).max()
    assert 0.99 * ds.LINEAR_NORM_DELTA / 2 <= rel <= ds.LINEAR_NORM_DELTA / 2  # the bound, nearly attained
    # upstream's norm (computed in float32) adds only float32 rounding
    norm = DeepseekV3RMSNorm(r, eps=ds.DEEPSEEK_NORM_EPS)
    norm.weight.data.fill_(w)
    got = norm((s * c).float()).double()
    assert ((got - c).norm(dim=-1) / c.norm(dim=-1)).max() <= ds.LINEAR_NORM_DELTA / 2 + 4 * 2.0**-24


def test_longrope_factors_give_bitwise_frequencies():
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    freqs = inv_freq[torch.tensor([0, 0, 0, 5, 5, 31])]
    f = torch.tensor(rope_split.longrope_factors(freqs), dtype=torch.float32)
    assert torch.equal(1.0 / (f * (1.0 ** torch.arange(0, 12, 2).float())), freqs)


def test_rope_parameters_default_when_possible():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    src = {"rope_type": "default", "rope_theta": 10000.0}
    assert rope_split.rope_parameters(inv_freq, src, 256) == {"rope_type": "default", "rope_theta": 10000.0}
    params = rope_split.rope_parameters(inv_freq.repeat_interleave(2), src, 256)
    assert params["rope_type"] == "longrope" and len(params["short_factor"]) == 16
    assert params["attention_factor"] == 1.0 and params["short_factor"] == params["long_factor"]


def test_default_rope_theta_recognises_prefix_and_strided_tables():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))  # 8 frequencies
    assert rope_split.default_rope_theta(inv_freq) == pytest.approx(10000.0, rel=1e-5)
    assert rope_split.default_rope_theta(inv_freq[:4]) == pytest.approx(100.0, rel=1e-5)  # θ^(2·4/16)
    assert rope_split.default_rope_theta(inv_freq[::2]) == pytest.approx(10000.0, rel=1e-5)
    assert rope_split.default_rope_theta(inv_freq[1:5]) is None  # does not start at frequency 1
    assert rope_split.default_rope_theta(inv_freq[torch.tensor([0, 1, 3])]) is None
    src = {"rope_type": "default", "rope_theta": 10000.0}
    params = rope_split.rope_parameters(inv_freq[:4], src, 256, bitwise=False)
    assert params["rope_type"] == "default"
    table = 1.0 / (params["rope_theta"] ** (torch.arange(0, 8, 2, dtype=torch.int64).float() / 8))
    assert torch.allclose(table, inv_freq[:4], rtol=1e-6, atol=0)
    with pytest.raises(rope_split.DeepseekExportError, match="portable"):
        rope_split.rope_parameters(inv_freq[torch.tensor([0, 1, 3])], src, 256, bitwise=False, portable=True)


def test_rotation_weight_discounts_frequencies_that_hardly_turn():
    inv_freq = torch.tensor([1.0, 0.1, 1e-2, 1e-4, 1e-7])
    w = rope_split.rotation_weight(inv_freq, 256)
    assert torch.all(w[:-1] > w[1:])  # faster frequencies cost more to leave unrotated
    assert w[0] == pytest.approx(1 - math.sin(256) / 256) and w[-1] < 1e-9
    assert torch.equal(rope_split.rotation_weight(inv_freq, None), torch.ones(5, dtype=torch.float64))


def test_portable_pair_counts_pick_one_pair_per_strided_frequency():
    score = torch.tensor([[1.0, 0.5], [0.1, 0.0], [2.0, 0.0], [0.1, 0.0], [3.0, 1.0], [0.0, 0.0]])
    counts = rope_split.portable_pair_counts([score], 3)
    assert counts.tolist() == [1, 0, 1, 0, 1, 0]  # stride 2 beats the prefix 0, 1, 2
    assert rope_split.portable_pair_counts([score], 6).tolist() == [1] * 6


def test_split_budget_rules_and_errors():
    kw = {"num_kv_heads": 3, "head_dim_": 64, "hidden_size": 576}
    assert rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=None, kv_fraction=None) == (192, 192)
    assert rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=None, kv_fraction=0.5) == (128, 64)
    assert rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=None, kv_fraction=0.25) == (64, 32)
    assert rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=32, kv_fraction=0.5) == (160, 32)
    assert rope_split.split_budget(**kw, kv_lora_rank=320, qk_rope_head_dim=None, kv_fraction=None) == (320, 64)
    assert rope_split.split_budget(**kw, kv_lora_rank=100, qk_rope_head_dim=32, kv_fraction=None) == (100, 32)
    with pytest.raises(rope_split.DeepseekExportError, match="even"):
        rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=33, kv_fraction=0.5)
    with pytest.raises(rope_split.DeepseekExportError, match="exceeds the GQA cache 384"):
        rope_split.split_budget(**kw, kv_lora_rank=300, qk_rope_head_dim=100, kv_fraction=None)
    with pytest.raises(rope_split.DeepseekExportError, match="smallest cache"):
        rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=96, kv_fraction=0.25)
    with pytest.raises(rope_split.DeepseekExportError, match="kv_fraction"):
        rope_split.split_budget(**kw, kv_lora_rank=None, qk_rope_head_dim=None, kv_fraction=1.5)


# ============================================================================ round trips on tiny models


PARITY_CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
    "llama-bias-eps1e-5": ("llama", {"attention_bias": True, "rms_norm_eps": 1e-5}),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_export_is_exact_after_save_and_reload(case, tmp_path):
    family, overrides = PARITY_CASES[case]
    model = tiny_model(family, **overrides)
    reloaded = _round_trip(ds.to_deepseek(model, None), tmp_path)
    assert type(reloaded) is DeepseekV3ForCausalLM
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    assert diff <= 1e-5  # measured 2–3e-7 (fp32)

    prompt = ids[:1, :8]
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    a = model.generate(prompt, **kw)
    out = reloaded.generate(prompt, return_dict_in_generate=True, **kw)
    assert torch.equal(a, out.sequences)

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == PARITY
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (32, 32, 0, 16)
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] == 3
    assert cfg["rms_norm_eps"] == ds.DEEPSEEK_NORM_EPS and cfg["rope_interleave"] is True
    assert cfg["q_lora_rank"] == (None if case in ("llama", "mistral") else 65)  # D + 1 carries the q bias
    assert cfg["attention_bias"] == (case != "llama" and case != "mistral")
    # transformers' DeepSeek cache holds the latent: kv_lora_rank + qk_rope_head_dim numbers per token
    layer = returned_cache(out).layers[0]
    assert layer.keys.shape[1] == layer.values.shape[1] == 1
    assert layer.keys.shape[-1] + layer.values.shape[-1] == PARITY


def test_parity_export_in_bfloat16_is_as_close_as_bfloat16_itself():
    model = tiny_model("llama", rms_norm_eps=1e-5)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        base = (model.to(torch.bfloat16)(ids).logits.float() - ref).abs().max().item()
        exported = ds.to_deepseek(model, None)
        assert next(exported.parameters()).dtype == torch.bfloat16
        err = (exported(ids).logits.float() - ref).abs().max().item()
    assert err <= 2 * base  # measured: about equal (the tiny pre-norm latents are normal bf16 numbers)


@pytest.mark.parametrize("strategy", ["pca", "partial"])
def test_below_parity_budget_and_quality(strategy, calibrated, tmp_path):
    model, stats = calibrated("llama")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    kls = {}
    for f in (1.0, 0.5, 0.25):
        rope = 16 if f == 1.0 else None  # parity cache with half of the key pairs left out of RoPE
        export = ds.to_deepseek(model, stats, kv_fraction=f, qk_rope_head_dim=rope, rope_strategy=strategy)
        cfg = export.config
        assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == round(f * PARITY)
        assert cfg.qk_nope_head_dim == 16 and cfg.v_head_dim == 16
        assert sum(export.care_export["rope_pairs_per_frequency"]) * 2 == cfg.qk_rope_head_dim
        with torch.no_grad():
            kls[f] = _mean_kl(ref, export(ids).logits)
    assert kls[1.0] < kls[0.5] < kls[0.25]
    assert kls[1.0] < 1e-3  # measured ~1e-4 (the unrotated half of K is the only loss)
    assert kls[0.25] < 0.1  # measured ~0.03 on the random tiny model
    reloaded = _round_trip(export, tmp_path)
    with torch.no_grad():
        assert (reloaded(ids).logits - export(ids).logits).abs().max().item() <= 1e-5


def test_pca_keeps_more_rope_energy_than_partial(calibrated):
    model, stats = calibrated("qwen2")
    pca = ds.to_deepseek(model, stats, kv_fraction=0.5, rope_strategy="pca").care_export
    partial = ds.to_deepseek(model, stats, kv_fraction=0.5, rope_strategy="partial").care_export
    assert pca["rope_pairs_per_frequency"] is not None
    # the same shared counts are not guaranteed, but each layer's pca energy at its counts is ≥ partial's
    assert sum(pca["kept_rope_energy"]) >= sum(partial["kept_rope_energy"]) - 1e-9


def test_qwen3_norm_folding_is_a_bounded_approximation(calibrated, tmp_path):
    model, stats = calibrated("qwen3")
    ids = _ids()
    reloaded = _round_trip(ds.to_deepseek(model, stats), tmp_path)
    with torch.no_grad():
        ref, got = model(ids).logits, reloaded(ids).logits
    # measured on this tiny random model: max |Δlogit| 0.10 (|logits| ≤ 0.62), mean KL 2.2e-4
    # (seeds 1, 2: 0.12 / 0.16 and 3.0e-4 / 2.8e-4)
    assert (ref - got).abs().max().item() <= 0.2
    assert _mean_kl(ref, got) <= 1e-3
    with pytest.raises(rope_split.DeepseekExportError, match="statistics"):
        ds.to_deepseek(model, None)


def test_runtime_support_and_export_summary():
    model = tiny_model("llama")
    parity = ds.to_deepseek(model, None)
    support = parity.care_export["runtime_support"]
    assert support.transformers and not support.vllm_sglang  # g = 2 copies of each frequency need longrope
    assert parity.care_export["exact"] and parity.care_export["cache_width"] == PARITY
    assert parity.care_export["residual_scale"] == 1.0  # tiny llama already uses ε = 1e-6


def test_errors_name_the_fix(calibrated):
    model, stats = calibrated("llama")
    with pytest.raises(rope_split.DeepseekExportError, match="needs calibration statistics"):
        ds.to_deepseek(model, None, kv_fraction=0.5)
    with pytest.raises(rope_split.DeepseekExportError, match="float16"):
        ds.to_deepseek(tiny_model("llama").half(), None)
    with pytest.raises(rope_split.DeepseekExportError, match="rope_strategy"):
        ds.to_deepseek(model, stats, kv_fraction=0.5, rope_strategy="freqfold")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama"):
        ds.to_deepseek(gpt2, None)


def test_portable_export_uses_default_rope_and_no_biases(calibrated, tmp_path):
    model, stats = calibrated("llama")
    ids = _ids()
    export = ds.to_deepseek(model, stats, kv_fraction=0.5, portable=True)
    cfg = export.config
    assert cfg.rope_parameters["rope_type"] == "default" and not cfg.attention_bias and cfg.rope_interleave
    assert cfg.qk_rope_head_dim <= 16 and cfg.kv_lora_rank + cfg.qk_rope_head_dim == 32
    vllm = export.care_export["runtime_support"].engines["vllm"]
    assert not vllm["ok"] and vllm["reasons"] == ["MLA cache 22 + 10 = 32 (runs: 512 + 64 = 576, 448 + 64 = 512, "
                                                  "256 + 64 = 320)"]  # the layout is portable, the width is not
    assert max(export.care_export["rope_pairs_per_frequency"]) == 1
    reloaded = _round_trip(export, tmp_path)
    with torch.no_grad():
        ref = model(ids).logits
        assert (reloaded(ids).logits - export(ids).logits).abs().max().item() <= 1e-5
        assert _mean_kl(ref, reloaded(ids).logits) < 0.1
    # at the parity cache a portable export keeps d_h RoPE dims: close, not exact (g = 2)
    near = ds.to_deepseek(model, stats, portable=True)
    assert (near.config.qk_rope_head_dim, near.config.kv_lora_rank) == (16, 48)
    assert near.config.rope_parameters == {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}
    with torch.no_grad():
        assert _mean_kl(ref, near(ids).logits) < 1e-3
    qwen2, qwen2_stats = calibrated("qwen2")
    with pytest.raises(rope_split.DeepseekExportError, match="biases"):
        ds.to_deepseek(qwen2, qwen2_stats, kv_fraction=0.5, portable=True)
    with pytest.raises(rope_split.DeepseekExportError, match="portable"):
        ds.to_deepseek(model, stats, kv_fraction=0.5, qk_rope_head_dim=20, portable=True)


# ============================================================================ serving engines


def _engine_config(kv_heads: int, d: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1152, num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads, head_dim=d)


@pytest.mark.parametrize("engine, kv_heads, d, fraction, expected", [
    ("vllm-cpu", 8, 128, 0.5, (512, 64)),  # Llama-3-8B: 2048 cached → 576 (F = 0.28)
    ("vllm", 8, 128, 0.5, (512, 64)),  # nearest to 1024 among 576 / 512 / 320
    ("vllm", 8, 128, 0.25, (448, 64)),  # 512 is nearest to 512
    ("vllm", 8, 128, 0.1, (256, 64)),
    ("vllm", 3, 64, 0.5, (256, 64)),  # SmolLM2 (384): only 320 caches less
    ("sglang", 4, 128, 0.5, (512, 64)),
])
def test_engine_geometry_is_one_the_engine_runs(engine, kv_heads, d, fraction, expected):
    config = _engine_config(kv_heads, d)
    assert engines.engine_geometry(config, engine, fraction) == expected
    assert expected in engines.ENGINE_GEOMETRIES[engine]


@pytest.mark.parametrize("engine, kv_heads, d, needle", [
    ("vllm-cpu", 3, 64, "512 + 64 = 576 (F = 1.5)"),  # SmolLM2: 384 < 576
    ("vllm", 2, 64, "256 + 64 = 320 (F = 1.25)"),  # Qwen2.5-0.5B: 256 cached per layer
])
def test_engine_geometry_refuses_a_model_whose_cache_is_already_smaller(engine, kv_heads, d, needle):
    with pytest.raises(rope_split.DeepseekExportError, match="already") as err:
        engines.engine_geometry(_engine_config(kv_heads, d), engine, 0.5)
    assert needle in str(err.value) and "without --engine" in str(err.value)


def test_engine_export_runs_in_its_geometry_with_an_untied_head(tmp_path, text_file):
    """`convert --engine vllm-cpu` on a model with Llama-3's KV width (8 KV heads × 128): 512 + 64 cached per token
    and layer, portable, an explicit lm_head (the source ties it), and runtime_support says which engines run it."""
    from conftest import make_tokenizer
    from safetensors import safe_open

    from care_mla.cli import main

    src = tmp_path / "src"
    tiny_model("llama", hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
               num_hidden_layers=2, intermediate_size=64).save_pretrained(src)
    make_tokenizer(text_file.read_text()).save_pretrained(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--engine", "vllm-cpu", "--calib-text", str(text_file),
                 "--eval-text", str(text_file), "--calib-samples", "8", "--calib-seq-len", "32", "--eval-samples", "2",
                 "--eval-seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["tie_word_embeddings"]) == (512, 64, False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    report = json.loads((out / "report.json").read_text())
    assert report["kv_fraction"] == 576 / 2048 and report["format"] == "deepseek"
    assert report["kv_bytes_per_token"]["converted_measured"] == 2 * 576 * 4
    engines = report["runtime_support"]["engines"]
    assert engines["vllm-cpu"]["ok"] and engines["vllm"]["ok"] and engines["sglang"]["ok"], engines
    assert "512 + 64 = 576" in engines["vllm-cpu"]["rule"]


@pytest.mark.parametrize("stride", [1, 2])
def test_strided_frequencies_of_a_128_dim_head_are_a_default_table(stride):
    """A portable export of a d_h = 128 model (Llama-3) keeps 32 of 64 frequencies at stride 1 or 2: both are
    default tables (θ' = θ^(stride/2)); the fit once failed on the float32 rounding of stride 1."""
    theta = 500000.0
    full = 1.0 / (theta ** (torch.arange(0, 128, 2).float() / 128))
    fitted = rope_split.default_rope_theta(full[torch.arange(32) * stride])
    assert fitted == pytest.approx(theta ** (stride / 2), rel=1e-5)
