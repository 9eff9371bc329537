"""Mixture-of-experts families (`care_mla.formats.moe`): Qwen3-MoE — the CARE paper's MoE family —, Qwen2-MoE and
Mixtral, in the latent-cache format and the DeepSeek-V2 export, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, layerwise_statistics, make_tokenizer
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

import care_mla  # noqa: F401  (registers model_type care_mla)
from care_mla.cli import main
from care_mla.evaluation.perplexity import cache_bytes
from care_mla.formats import deepseek as ds
from care_mla.formats import moe
from care_mla.formats.families import FAMILIES, UnsupportedModelError, get_family
from care_mla.formats.mapping import LayerLatent, build_decoupled_model, build_latent_model
from care_mla.formats.transformers_api import cache_kwargs, returned_cache
from care_mla.method.decoupled import mla_layout, plan_rope_split
from care_mla.method.factorization import Factors
from care_mla.method.rope_split import DeepseekExportError
from care_mla.pipeline.calibration import collect_statistics
from care_mla.pipeline.layerwise import skeleton

MOE_CLASSES = {
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
}
# tiny_config's attention: D = 64, 4 query heads, g = 2 KV heads, d_h = 16 → GQA cache 2·2·16 = 64 per layer
PARITY = 64
LAYERS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and a shared machine stays usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_moe_config(family: str, **overrides):
    config_cls, _ = MOE_CLASSES[family]
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        fields.update(num_local_experts=4, sliding_window=None)
    else:
        fields.update(num_experts=8, moe_intermediate_size=32)
    if family == "qwen2_moe":
        fields.update(shared_expert_intermediate_size=48)
    fields.update(overrides)
    return config_cls(**fields)


def tiny_moe(family: str = "qwen3_moe", seed: int = 0, **overrides):
    """A random tiny MoE model; norms and biases perturbed so that they are tested too."""
    torch.manual_seed(seed)
    _, model_cls = MOE_CLASSES[family]
    model = model_cls(tiny_moe_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, text_file):
    """Factory: folder of a saved tiny MoE model (with tokenizer), cached per (family, overrides)."""
    made = {}
    tokenizer = make_tokenizer(text_file.read_text())

    def make(family: str = "qwen3_moe", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_moe(family, **overrides).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make


def _ids(seed: int = 0, shape=(2, 40)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _convert(src, out, text_file, *args) -> dict:
    assert main(["convert", str(src), "--out", str(out), "--calib-text", str(text_file), "--eval-text",
                 str(text_file), "--calib-samples", "8", "--calib-seq-len", "32", "--eval-samples", "2",
                 "--eval-seq-len", "32", "--cache-dir", str(out.parent / "cache"), "--quiet", *args]) == 0
    return json.loads((out / "report.json").read_text())


def _keys(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _exact_latents(model) -> list[LayerLatent]:
    out = []
    for layer in model.model.layers:
        W = torch.cat([layer.self_attn.k_proj.weight.detach().T, layer.self_attn.v_proj.weight.detach().T], dim=1)
        out.append(LayerLatent((Factors(W, torch.eye(W.shape[1]), torch.ones(W.shape[1])),)))
    return out


def _decode_matches_forward(model, prompt) -> float:
    """Max |Δlogit| between a one-token decode step on the prefilled cache and the full forward of the sequence."""
    with torch.no_grad():
        full = model(prompt, use_cache=False).logits[:, -1]
        out = model(prompt[:, :-1], use_cache=True)
        step = model(prompt[:, -1:], **cache_kwargs(returned_cache(out)), use_cache=True).logits[:, -1]
    return (full - step).abs().max().item()


# ============================================================================ names: disk ↔ module


@pytest.mark.parametrize("family", sorted(MOE_CLASSES))
def test_checkpoint_names_are_what_save_pretrained_writes(family, tmp_path):
    """The streamed writer's per-expert names and shapes (`checkpoint_entries` of the module's state) are the ones
    transformers writes and reads, and module ↔ checkpoint names round-trip bit for bit."""
    model = tiny_moe(family)
    model.save_pretrained(tmp_path)
    entries = moe.checkpoint_entries(model.config, model.state_dict())
    assert {k: tuple(v.shape) for k, v in entries.items()} == _keys(tmp_path)
    layout = moe.checkpoint_layout(model.config)
    layer = {k: v for k, v in model.model.layers[1].state_dict().items()}
    on_disk = moe.checkpoint_layer_state(layout, layer)
    assert "mlp.experts.gate_up_proj" not in on_disk
    assert f"{layout.disk_block}.experts.3.{layout.expert_names[2]}.weight" in on_disk
    back = moe.module_layer_state(layout, on_disk)
    assert back.keys() == layer.keys() and all(torch.equal(back[k], layer[k]) for k in layer)


def test_skeleton_layers_load_checkpoint_names():
    model = tiny_moe("mixtral")
    layer_state = moe.checkpoint_layer_state(moe.checkpoint_layout(model.config), model.model.layers[0].state_dict())
    assert any(k.startswith("block_sparse_moe.experts.0.w1") for k in layer_state)
    layer = skeleton(model.config).model.layers[0]
    layer.load_state_dict(layer_state, strict=True, assign=True)  # the load hook fuses the experts
    assert torch.equal(layer.mlp.experts.gate_up_proj, model.model.layers[0].mlp.experts.gate_up_proj)
    with pytest.raises(ValueError, match="incomplete"):
        moe.module_layer_state(moe.checkpoint_layout(model.config),
                               {k: v for k, v in layer_state.items() if "experts.1.w3" not in k})


def test_stages_that_name_the_dense_export_class_build_the_moe_export_class():
    """Pipeline stages name `DeepseekV3ForCausalLM` for the DeepSeek format; a MoE export's config is DeepSeek-V2's,
    and the layer-by-layer skeleton follows the config."""
    from transformers import DeepseekV3ForCausalLM

    model = tiny_moe("qwen2_moe", shared_expert_intermediate_size=0)
    config = ds.to_deepseek(model, None).config
    assert type(skeleton(config, model_class=DeepseekV3ForCausalLM)) is DeepseekV2ForCausalLM
    assert ds.export_class(config) is DeepseekV2ForCausalLM


def test_unsupported_moe_family_names_the_supported_ones():
    config = OlmoeConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(UnsupportedModelError, match="qwen3_moe"):
        get_family(config)
    assert {"qwen3_moe", "qwen2_moe", "mixtral"} <= set(FAMILIES)


# ============================================================================ latent-cache format


@pytest.mark.parametrize("family", sorted(MOE_CLASSES))
def test_full_rank_latent_model_keeps_the_moe_blocks(family, tmp_path):
    model = tiny_moe(family)
    latent = build_latent_model(model, _exact_latents(model))
    assert type(latent.model.layers[0].mlp) is type(model.model.layers[0].mlp)  # the upstream block, unchanged
    ids = _ids()
    with torch.no_grad():
        expected, got = model(ids).logits, latent(ids).logits
    assert (expected - got).abs().max().item() <= 1e-4  # measured ~4e-7
    latent.save_pretrained(tmp_path)
    saved = _keys(tmp_path)
    assert {k for k in saved if ".experts." in k or ".gate." in k} == {k for k in _keys_of(model) if ".experts." in k
                                                                      or ".gate." in k}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, got)


def _keys_of(model) -> set[str]:
    return set(moe.checkpoint_entries(model.config, model.state_dict()))


def test_convert_at_parity_reproduces_qwen3_moe(moe_dir, text_file, tmp_path):
    """The acceptance: `care-mla convert DIR --kv-fraction 1.0` of a tiny Qwen3-MoE, read layer by layer from its
    checkpoint, reproduces the original logits; its experts are the source's tensors, under the source's names."""
    src = moe_dir("qwen3_moe")
    out = tmp_path / "parity"
    report = _convert(src, out, text_file, "--kv-fraction", "1.0")
    assert report["loading"] == "layerwise" and report["architecture"] == "CareMlaForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert (original(ids).logits - converted(ids).logits).abs().max().item() <= 1e-4  # measured 3.6e-7
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        experts = [k for k in a.keys() if ".mlp." in k]
        assert len(experts) == LAYERS * (8 * 3 + 1)
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in experts)
    assert report["kv_bytes_per_token"]["converted_measured"] == report["kv_bytes_per_token"]["original_measured"]


#: Pins what the defaults choose by calibration loss (a tiny model's choice is noise, and each candidate costs a pass).
PINNED = {"care_mla": (), "deepseek": ("--objective", "activation", "--rope-dim", "8")}


@pytest.mark.parametrize("fmt", ["care_mla", "deepseek"])
def test_half_cache_after_generate_and_decode_equals_forward(moe_dir, text_file, tmp_path, fmt):
    """At F = 0.5 (the care_mla default: joint latent, objective by calibration loss, output refit; the DeepSeek
    export with its choices pinned) the cache that `generate` leaves is half the original's, and a one-token
    decode step gives the full forward."""
    src = moe_dir("qwen3_moe")
    report = _convert(src, tmp_path / fmt, text_file, "--kv-fraction", "0.5", "--format", fmt, *PINNED[fmt])
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / fmt, dtype=torch.float32).eval()
    assert type(converted).__name__ == ("CareMlaForCausalLM" if fmt == "care_mla" else "DeepseekV2ForCausalLM")
    prompt = _ids(3, (1, 12))
    kw = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, "pad_token_id": 0}
    bytes_ = {}
    for name, model in (("original", original), ("converted", converted)):
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        cache = returned_cache(out)
        bytes_[name] = cache_bytes(cache) / cache.get_seq_length()
    assert bytes_ == {"original": LAYERS * PARITY * 4, "converted": LAYERS * PARITY * 4 / 2}
    assert report["kv_bytes_per_token"]["converted_measured"] == LAYERS * PARITY * 4 / 2
    assert _decode_matches_forward(converted, _ids(4, (2, 20))) <= 1e-5  # measured ~5e-7


# ============================================================================ DeepSeek-V2 export


def test_deepseek_export_of_qwen3_moe_is_v2_with_the_source_routing(moe_dir, text_file, tmp_path):
    """`--format deepseek` at parity: a stock DeepseekV2ForCausalLM with the source's router and experts bit for bit.
    Its logits equal the decoupled latent-cache model's (the same layout); what separates both from the original
    is Qwen3's per-head q/k RMSNorm, which no DeepSeek model has (folded at its calibration mean, as for dense
    Qwen3)."""
    src = moe_dir("qwen3_moe")
    out = tmp_path / "ds"
    report = _convert(src, out, text_file, "--kv-fraction", "1.0", "--format", "deepseek")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert report["architecture"] == "DeepseekV2ForCausalLM"  # the report names the class that was written
    assert {k: cfg[k] for k in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                                "n_shared_experts", "first_k_dense_replace", "topk_method", "norm_topk_prob",
                                "routed_scaling_factor", "n_group", "topk_group")} == {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 0,
        "first_k_dense_replace": 0, "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "n_group": 1, "topk_group": 1}
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == PARITY
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        routed = [k for k in a.keys() if ".mlp." in k]
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in routed)  # same names, same bytes
    assert report["runtime_support"]["engines"]["transformers"]["ok"]
    export = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(export) is DeepseekV2ForCausalLM
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        # measured 0.14 (dense tiny Qwen3: 0.10–0.16): the q/k-norm fold
        assert (export(ids).logits - original(ids).logits).abs().max().item() <= 0.2


def test_deepseek_export_differs_from_qwen3_moe_only_by_the_qk_norm_fold():
    """In memory, with one calibration: the export's MoE blocks compute the source's function, and its logits are
    the decoupled latent-cache model's (the same layout, Qwen3's norms folded the same way)."""
    model = tiny_moe("qwen3_moe")
    stats = collect_statistics(model, _ids(1, (8, 32)), progress=False)
    export = ds.to_deepseek(model, stats)
    decoupled = build_decoupled_model(model, mla_layout(plan_rope_split(model, stats, qk_rope_head_dim=PARITY // 2,
                                                                        exact=True), [PARITY // 2] * LAYERS))
    ids = _ids()
    h = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for i in range(LAYERS):
            assert (model.model.layers[i].mlp(h) - export.model.layers[i].mlp(h)).abs().max().item() <= 1e-6
        ref, got = model(ids).logits, export(ids).logits
        assert (got - decoupled(ids).logits).abs().max().item() <= 1e-5  # measured 3e-7
    assert (got - ref).abs().max().item() >= 1e-2  # the fold is an approximation (measured 0.10): not exact


def test_deepseek_v2_export_is_exact_without_qk_norms(tmp_path):
    """A MoE source without q/k norms and without renormalisation (Qwen2-MoE without a shared expert, its first
    layer dense): the export reproduces it in plain transformers, biases and the dense prefix included."""
    model = tiny_moe("qwen2_moe", shared_expert_intermediate_size=0, mlp_only_layers=[0])
    export = ds.to_deepseek(model, None)
    assert type(export) is DeepseekV2ForCausalLM and export.config.first_k_dense_replace == 1
    assert export.config.q_lora_rank == 65  # the q bias through the q-LoRA path
    export.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert (model(ids).logits - reloaded(ids).logits).abs().max().item() <= 1e-5  # measured 3.6e-7
    prompt = ids[:1, :8]
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    assert torch.equal(model.generate(prompt, **kw), reloaded.generate(prompt, **kw))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_renormalising_router_is_written_and_exact_under_deepseeks_routing(family, monkeypatch):
    """Mixtral (always) and Qwen3-MoE with norm_topk_prob renormalise their top-k weights. The export says so
    (norm_topk_prob: true) and reproduces the source under DeepSeek's definition of the field; transformers'
    DeepSeek-V2 ignores the field, so there it does not, and runtime_support says which runtime is exact."""
    model = tiny_moe(family, **({"norm_topk_prob": True} if family == "qwen3_moe" else {}))
    stats = collect_statistics(model, _ids(1, (8, 32)), progress=False) if family == "qwen3_moe" else None
    export = ds.to_deepseek(model, stats)
    assert export.config.norm_topk_prob is True
    support = export.care_export["runtime_support"]
    assert not support.transformers and moe.RENORM_CAVEAT in support.engines["transformers"]["reasons"]
    reference = build_decoupled_model(model, mla_layout(plan_rope_split(model, stats, qk_rope_head_dim=32, exact=True),
                                                        [32] * LAYERS))
    ids = _ids()
    with torch.no_grad():
        want = reference(ids).logits
        plain = export(ids).logits
    assert (plain - want).abs().max().item() > 1e-2  # measured 0.05 (Mixtral): unnormalised weights

    real = DeepseekV2TopkRouter.forward

    def renormalised(self, hidden_states):  # DeepSeek's reference MoEGate with norm_topk_prob (top_k > 1)
        logits, weights, indices = real(self, hidden_states)
        return logits, weights / weights.sum(-1, keepdim=True), indices

    monkeypatch.setattr(DeepseekV2TopkRouter, "forward", renormalised)
    with torch.no_grad():
        assert (export(ids).logits - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("overrides,needle", [
    ({}, "sigmoid gate"),  # Qwen2-MoE's gated shared expert
    ({"shared_expert_intermediate_size": 0, "mlp_only_layers": [1]}, r"dense MLP layers \[1\]"),
    ({"shared_expert_intermediate_size": 0, "decoder_sparse_step": 2}, r"dense MLP layers \[0, 2\]"),
])
def test_deepseek_export_refuses_what_deepseeks_moe_cannot_hold(overrides, needle):
    model = tiny_moe("qwen2_moe", **overrides)
    with pytest.raises(DeepseekExportError, match=needle) as err:
        ds.to_deepseek(model, None)
    assert "--format care_mla" in str(err.value)


@pytest.mark.parametrize("fmt,pinned", [
    ("care_mla", ("--objective", "activation")),
    ("deepseek", PINNED["deepseek"]),
    pytest.param("deepseek", (), marks=pytest.mark.slow),  # its choices by calibration loss: ~75 s here
])
def test_layerwise_moe_conversion_is_byte_identical_to_whole_model(moe_dir, text_file, tmp_path, fmt, pinned):
    """Read layer by layer (per-expert checkpoint names, fused by the load hooks) or loaded whole (fused module
    names), through calibration, the output refit's two streams and (unpinned) the choice's candidate models:
    the same output files, bit for bit."""
    src = moe_dir("qwen3_moe")
    args = ("--kv-fraction", "0.5", "--format", fmt, "--no-eval", *pinned)
    _convert(src, tmp_path / "layerwise", text_file, *args)
    _convert(src, tmp_path / "whole", text_file, *args, "--no-layerwise")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "layerwise" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_max_memory_places_a_moe_layer_with_its_experts(moe_dir, text_file, tmp_path):
    """`--max-memory`: accelerate's placement of one MoE decoder layer (router and experts included) over small
    budgets covers every parameter of the layer (shapes only, on meta), and a conversion within a CPU budget writes
    the same model as one without it."""
    from transformers import AutoConfig

    from care_mla.pipeline.layerwise import PlacementError, layer_placement

    src = moe_dir("qwen3_moe")
    config = AutoConfig.from_pretrained(src)
    layer = skeleton(config).model.layers[0]
    size = sum(p.numel() * 4 for p in layer.parameters())
    assert layer_placement(config, {0: size + 1}, torch.float32) is None  # fits the first device whole
    third = size // 3 + 1
    placement = layer_placement(config, {0: third, 1: third, "cpu": 10 * size}, torch.float32)
    assert 0 in placement.values() and len(set(placement.values())) > 1  # spread: the experts do not fit a third
    covered = {n for n, _ in layer.named_parameters() if any(n == k or n.startswith(k + ".") for k in placement)}
    assert covered == {n for n, _ in layer.named_parameters()}  # the experts and the router are placed too
    for device in (0, 1):  # accelerate keeps each GPU within its budget
        assert sum(p.numel() * 4 for n, p in layer.named_parameters()
                   if any((n == k or n.startswith(k + ".")) and placement[k] == device for k in placement)) <= third
    with pytest.raises(PlacementError, match="does not fit --max-memory"):
        layer_placement(config, {0: size // 10}, torch.float32)
    # a layer spread over devices converts in two passes: compared with the two passes on one device
    plain = _convert(src, tmp_path / "plain", text_file, "--kv-fraction", "0.5", "--no-eval", "--two-pass")
    budget = _convert(src, tmp_path / "budget", text_file, "--kv-fraction", "0.5", "--no-eval", "--device", "cpu",
                      "--max-memory", "cpu=1GiB")
    assert budget["loading"] == plain["loading"] == "layerwise"
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "budget" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_heal_trains_the_deepseek_v2_export_of_a_moe_model(moe_dir, text_file, tmp_path):
    """`care-mla heal` takes the MoE export (DeepseekV2ForCausalLM): the loss falls, the held-out ppl with it, and
    the healed folder is the same class with the router and the experts trained in place."""
    from care_mla.healing import heal as healing
    from care_mla.healing.settings import HealSettings

    src = moe_dir("qwen3_moe")
    _convert(src, tmp_path / "ds", text_file, "--kv-fraction", "0.5", "--format", "deepseek", "--no-eval")
    report = healing.heal(HealSettings(
        converted=str(tmp_path / "ds"), teacher=str(src), out=str(tmp_path / "healed"), tokens=12 * 4 * 32, seq_len=32,
        batch_size=4, lr=3e-3, train_text=str(text_file), eval_text=str(text_file), eval_samples=4, eval_seq_len=32,
        eval_every=0, log_every=1, progress=False))
    assert report["format"] == "deepseek" and report["architecture"] == "DeepseekV2ForCausalLM"
    assert report["ppl"]["after"] < report["ppl"]["before"], report["ppl"]
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", dtype=torch.float32)
    assert type(healed) is DeepseekV2ForCausalLM
    with safe_open(str(tmp_path / "ds" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "healed" / "model.safetensors"), "pt") as b:
        experts = [k for k in a.keys() if ".mlp.experts." in k]
        assert experts and set(experts) <= set(b.keys())
        assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in experts)  # trained, not frozen


def test_calibration_over_a_placement_fuses_the_experts_as_one_device_does(moe_dir):
    """A MoE layer spread by accelerate's hooks (every part on the CPU here) loads the checkpoint's per-expert tensors
    through the fusing load hook and gives the same statistics, bit for bit."""
    from transformers import AutoConfig

    from care_mla.io.checkpoint import CheckpointReader
    from care_mla.pipeline.layerwise import layer_prefix

    folder = moe_dir("qwen3_moe")
    reader, config = CheckpointReader(folder), AutoConfig.from_pretrained(folder)
    assert any(".experts.0." in k for k in reader.state(layer_prefix(0)))  # per-expert names on disk
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    layer = skeleton(config).model.layers[0]
    placement = {name: "cpu" for name, _ in layer.named_children()}
    placement["mlp.experts"] = "cpu"
    del placement["mlp"]
    placement["mlp.gate"] = "cpu"
    (plain, _), (placed, _) = (layerwise_statistics(folder, ids, place) for place in (None, placement))
    for a, b in zip(plain.second_moments, placed.second_moments):
        assert torch.equal(a, b)
