"""Decoupled-RoPE MLA: the latent-cache runtime with absorbed decode, and `convert --format deepseek`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import settings_for, tiny_model
from transformers import AutoModelForCausalLM

import care_mla  # noqa: F401  (registers care_mla with the Auto classes)
from care_mla.cli import main
from care_mla.evaluation.perplexity import cache_bytes
from care_mla.formats.mapping import build_decoupled_model
from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
from care_mla.formats.transformers_api import returned_cache
from care_mla.method import decoupled
from care_mla.pipeline import convert as api
from care_mla.pipeline.calibration import collect_statistics
from care_mla.settings import SettingsError

# tiny_config: D = 64, 4 query heads, g = 2 KV heads, d_h = 16 → GQA cache 64 numbers per layer, 3 layers
PARITY = 64


def _ids(seed: int = 0, shape=(2, 40)) -> torch.Tensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated():
    made = {}

    def make(family: str):
        if family not in made:
            model = tiny_model(family)
            made[family] = (model, collect_statistics(model, _ids(1, (8, 64)), progress=False))
        return made[family]

    return make


def _decoupled(model, stats, rope: int, ranks: list[int], exact: bool = False):
    split = decoupled.plan_rope_split(model, stats, qk_rope_head_dim=rope, exact=exact)
    layout = decoupled.mla_layout(split, ranks)
    return split, layout, build_decoupled_model(model, layout)


def _set_absorb(model, mode: str) -> None:
    for layer in model.model.layers:
        layer.self_attn.absorb = mode


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_exact_decoupled_layout_reproduces_the_original(family, calibrated):
    model, stats = calibrated(family)
    _, _, mla = _decoupled(model, stats, PARITY // 2, [PARITY // 2] * 3, exact=True)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        for mode in ("never", "always"):
            _set_absorb(mla, mode)
            assert (mla(ids).logits - ref).abs().max().item() <= 1e-5  # measured 2–3e-7


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_absorbed_decode_gives_the_expanded_logits_and_tokens(family, calibrated):
    model, stats = calibrated(family)
    _, layout, mla = _decoupled(model, stats, 8, [10, 30, 16])  # per-layer widths, 8 RoPE dims
    ids = _ids()
    with torch.no_grad():
        _set_absorb(mla, "never")
        expanded = mla(ids).logits
        _set_absorb(mla, "always")
        absorbed = mla(ids).logits
    assert (absorbed - expanded).abs().max().item() <= 1e-5  # measured ≤ 4e-7
    assert (expanded - model(ids).logits).abs().max().item() > 1e-2  # below parity: a real approximation

    prompt = ids[:1, :8]
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    _set_absorb(mla, "never")
    reference = mla.generate(prompt, **kw)
    _set_absorb(mla, "decode")
    out = mla.generate(prompt, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, reference)
    # the cache holds r_l + rope numbers per token and layer, nothing else
    per_token = cache_bytes(returned_cache(out)) / returned_cache(out).get_seq_length()
    assert per_token == (10 + 30 + 16 + 3 * 8) * 4 == mla.config.kv_cache_width() * 4


def test_absorbed_decode_with_left_padding_matches_single_rows(calibrated):
    model, stats = calibrated("llama")
    _, _, mla = _decoupled(model, stats, 8, [24, 24, 24])
    mla.config._attn_implementation = "eager"  # additive float masks through the absorbed path too
    for layer in mla.model.layers:
        layer.self_attn.config._attn_implementation = "eager"
    a, b = _ids(3, (1, 12)), _ids(4, (1, 7))
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, 5:] = a[0], b[0]
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    together = mla.generate(batch, attention_mask=mask, **kw)
    for row, single in ((0, a), (1, b)):
        alone = mla.generate(single, attention_mask=torch.ones_like(single), **kw)
        assert torch.equal(together[row, 12:], alone[0, single.shape[1]:])


def test_decoupled_model_saves_and_reloads(calibrated, tmp_path):
    model, stats = calibrated("qwen2")
    _, _, mla = _decoupled(model, stats, 8, [12, 20, 16])
    mla.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["kv_latent"] == "decoupled" and cfg["qk_rope_head_dim"] == 8 and cfg["kv_lora_ranks"] == [[12], [20], [16]]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is CareMlaForCausalLM
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, mla(ids).logits)


# ============================================================================ convert / CLI


def test_convert_deepseek_format_loads_without_care_mla(tiny_model_dir, text_file, tmp_path):
    src = tiny_model_dir("qwen2")
    out = tmp_path / "out"
    rc = main(["convert", str(src), "--out", str(out), "--format", "deepseek", "--kv-fraction", "1.0",
               "--calib-text", str(text_file), "--eval-text", str(text_file), "--calib-samples", "8",
               "--calib-seq-len", "32", "--eval-samples", "4", "--eval-seq-len", "32",
               "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["architecture"] == "DeepseekV3ForCausalLM" and report["mla"]["exact"]
    assert report["ppl"]["converted"] == pytest.approx(report["ppl"]["original"], rel=1e-5)
    kv = report["kv_bytes_per_token"]
    assert kv["original"] == kv["converted"] == kv["converted_measured"] == 3 * PARITY * 4
    assert not report["runtime_support"]["vllm_sglang"]  # q/v biases and repeated frequencies
    for name in ("tokenizer.json", "generation_config.json", "config.json", "model.safetensors"):
        assert (out / name).is_file()
    # a fresh interpreter that never imports care_mla loads it with the upstream class
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r});"
        "assert 'care_mla' not in sys.modules; print(type(m).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "DeepseekV3ForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert (original(ids).logits - exported(ids).logits).abs().max().item() <= 1e-3  # measured ~3e-7


def test_convert_decoupled_adjusted_allocation_spends_the_budget(tiny_model_dir, text_file, tmp_path):
    src = tiny_model_dir("llama")
    report = api.convert(settings_for(src, text_file, tmp_path, latent="decoupled", kv_fraction=0.5, rope_dim=8,
                                      allocation="adjusted"))
    ranks = [r for (r,) in report["ranks"]]
    assert sum(ranks) == 3 * (32 - 8) and len(set(ranks)) > 1  # adjusted: same total, different widths
    assert report["mla"]["qk_rope_head_dim"] == 8 and report["mla"]["qk_nope_head_dim"] == 16
    kv = report["kv_bytes_per_token"]
    assert kv["converted"] == kv["converted_measured"] == 3 * 32 * 4 == kv["original"] // 2
    assert all(0 <= row["v_rel_error"] < 1 and 0 < row["rope_kept_energy"] <= 1 for row in report["layers"])
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert converted.config.kv_latent == "decoupled"


def test_convert_deepseek_below_parity_and_errors(tiny_model_dir, text_file, tmp_path):
    src = tiny_model_dir("llama")
    report = api.convert(settings_for(src, text_file, tmp_path, format="deepseek", kv_fraction=0.5,
                                      rope_strategy="partial", rope_context=64))
    assert report["allocation"] == "uniform" and report["mla"]["rope_strategy"] == "partial"
    assert report["mla"]["rope_context"] == 64
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == PARITY // 2
    # a random tiny model: the approximation moves ppl either way (measured 0.996), but not far
    assert 0.9 < report["ppl"]["ratio"] < 1.2 and report["ppl"]["ratio"] != 1.0
    with pytest.raises(SettingsError, match="--latent decoupled"):
        settings_for(src, text_file, tmp_path, format="deepseek", allocation="adjusted")
    rc = main(["convert", str(src), "--out", str(tmp_path / "x"), "--format", "deepseek", "--rope-dim", "40",
               "--kv-fraction", "0.5", "--calib-text", str(text_file), "--no-eval", "--calib-samples", "4",
               "--calib-seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 2 and not (tmp_path / "x").exists()
