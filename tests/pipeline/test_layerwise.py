"""Layer-by-layer conversion: same bytes as the whole-model path, one layer in memory, sharded in and out."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import layerwise_statistics, make_tokenizer, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import care_mla  # noqa: F401
from care_mla.io.checkpoint import CheckpointFormatError, CheckpointReader, ShardWriter
from care_mla.pipeline import calibration, load
from care_mla.pipeline import convert as api
from care_mla.pipeline.calibration import collect_statistics
from care_mla.pipeline.layerwise import layer_prefix, skeleton
from care_mla.settings import ConvertSettings

#: Files that describe how a conversion ran (they name the loading mode); every other output file must match.
RUN_FILES = {"report.json", "care_mla_settings.json"}


def settings_for(model_dir, text_file, tmp_path, name, **kw) -> ConvertSettings:
    base = dict(model=str(model_dir), out=str(tmp_path / name), calib_text=str(text_file), eval_text=str(text_file),
                calib_samples=8, calib_seq_len=32, eval_samples=4, eval_seq_len=32,
                cache_dir=str(tmp_path / f"cache-{name}"), progress=False, evaluate=False)
    base.update(kw)
    return ConvertSettings(**base)


def output_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in RUN_FILES}


@pytest.mark.parametrize("family,latent,method,fmt", [
    ("llama", "separate", "care", "care_mla"), ("qwen2", "joint", "care", "care_mla"),
    ("qwen3", "separate", "asvd", "care_mla"), ("mistral", "joint", "mha2mla", "care_mla"),
    ("qwen3", "decoupled", "care", "care_mla"), ("qwen2", "decoupled", "care", "deepseek"),
    ("llama", "decoupled", "care", "deepseek"),
])
def test_layerwise_output_is_byte_identical_to_whole_model(tiny_model_dir, text_file, tmp_path, family, latent, method,
                                                           fmt):
    folder = tiny_model_dir(family)
    allocation = "uniform" if fmt == "deepseek" else "adjusted"
    kw = dict(latent=latent, method=method, allocation=allocation, kv_fraction=0.5, format=fmt)
    api.convert(settings_for(folder, text_file, tmp_path, "whole", layerwise=False, **kw))
    report = api.convert(settings_for(folder, text_file, tmp_path, "layerwise", **kw))
    assert report["loading"] == "layerwise"
    whole, layerwise = output_files(tmp_path / "whole"), output_files(tmp_path / "layerwise")
    assert sorted(whole) == sorted(layerwise) and "model.safetensors" in whole
    for name in whole:
        assert whole[name] == layerwise[name], name
    # the statistics were collected independently (two caches) and agree bit for bit as well
    (a,), (b,) = ((tmp_path / f"cache-{n}" / "calibration").glob("*.safetensors") for n in ("whole", "layerwise"))
    stats_a, stats_b = load_file(a), load_file(b)
    assert all(torch.equal(stats_a[k], stats_b[k]) for k in stats_a)
    # and it is a working model of the asked budget
    ranks = json.loads((tmp_path / "layerwise" / "report.json").read_text())["ranks"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "layerwise")
    if fmt == "deepseek":
        assert type(model).__name__ == "DeepseekV3ForCausalLM"
        assert (model.config.kv_lora_rank + model.config.qk_rope_head_dim) * 3 == 0.5 * 2 * 2 * 16 * 3
    elif latent == "decoupled":  # the latent plus the shared RoPE key make the budget
        assert model.config.kv_lora_ranks == ranks
        assert sum(r + model.config.qk_rope_head_dim for (r,) in ranks) == 0.5 * 2 * 2 * 16 * 3
    else:
        assert model.config.kv_lora_ranks == ranks and sum(map(sum, ranks)) == 0.5 * 2 * 2 * 16 * 3


def test_layerwise_conversion_is_reproducible_and_evaluates(tiny_model_dir, text_file, tmp_path):
    folder = tiny_model_dir("llama")
    r1 = api.convert(settings_for(folder, text_file, tmp_path, "one", evaluate=True))
    r2 = api.convert(settings_for(folder, text_file, tmp_path, "two", evaluate=True))
    assert output_files(tmp_path / "one") == output_files(tmp_path / "two")
    assert r1["ppl"] == r2["ppl"] and r1["ppl"]["converted"] != r1["ppl"]["original"]  # a random tiny model can improve
    assert r1["kv_bytes_per_token"]["converted_measured"] == r1["kv_bytes_per_token"]["converted"]
    assert 0 < r1["peak_rss_mb_conversion"] <= r1["peak_rss_mb"]


def test_sharded_input_and_output(tiny_model_dir, text_file, tmp_path):
    """A sharded checkpoint converts to the same tensors; small shards write an index that transformers loads."""
    sharded = tmp_path / "sharded"
    model = tiny_model("llama")
    model.save_pretrained(sharded, max_shard_size="40KB")
    make_tokenizer(text_file.read_text()).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(sharded)
    assert len(set(reader.weight_map.values())) > 2
    assert torch.equal(reader.get("model.layers.1.mlp.up_proj.weight"), model.model.layers[1].mlp.up_proj.weight)
    assert set(reader.state("model.layers.2.")) == {k for k, _ in model.model.layers[2].named_parameters()}

    api.convert(settings_for(sharded, text_file, tmp_path, "from-sharded"))
    api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, "from-single"))
    a = load_file(tmp_path / "from-sharded" / "model.safetensors")
    b = load_file(tmp_path / "from-single" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "resharded"
    out.mkdir()
    writer = ShardWriter(out, [(k, v.shape, v.dtype) for k, v in a.items()], max_shard_bytes=30_000)
    for k, v in a.items():
        writer.add(k, v)
    files = writer.close()
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a) and index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in a.values())
    back = CheckpointReader(out)
    assert all(torch.equal(back.get(k), a[k]) for k in a)
    with pytest.raises(ValueError, match="twice"):
        ShardWriter(tmp_path, [("x", (1,), torch.float32)] * 2)
    w = ShardWriter(tmp_path, [("x", (1,), torch.float32), ("y", (2,), torch.float32)])
    with pytest.raises(ValueError, match="expected tensor x next"):
        w.add("y", torch.zeros(2))
    with pytest.raises(ValueError, match="the plan says"):
        w.add("x", torch.zeros(1, dtype=torch.bfloat16))
    w.add("x", torch.zeros(1))
    with pytest.raises(ValueError, match="never written, starting with y"):
        w.close()


def test_streamed_safetensors_match_the_library(tmp_path):
    """Files from ShardWriter load with safetensors and hold exactly what was written, every dtype alike."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors = {"b.weight": torch.randn(3, 5).to(dtype), "a.bias": torch.randn(7).to(dtype),
                   "z": torch.randn(0, 4).to(dtype), "c": torch.randn(2, 2, 3).to(dtype)}
        folder = tmp_path / str(dtype)
        folder.mkdir()
        writer = ShardWriter(folder, [(k, v.shape, v.dtype) for k, v in tensors.items()])
        for k, v in tensors.items():
            writer.add(k, v)
        assert writer.close() == ["model.safetensors"]
        back = load_file(folder / "model.safetensors")
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_calibration_holds_one_layer_at_a_time(tiny_model_dir, text_file):
    """Before each layer is read, every decoder layer is on the meta device (the previous one was released)."""
    folder = tiny_model_dir("qwen3")
    reader = CheckpointReader(folder)
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(folder))
    model.model.embed_tokens.load_state_dict({"weight": reader.get("model.embed_tokens.weight")}, assign=True)
    seen = []

    def layer_weights(i):
        seen.append([all(p.is_meta for p in layer.parameters()) for layer in model.model.layers])
        return reader.state(layer_prefix(i))

    ids = torch.randint(3, 200, (4, 16))
    stats = collect_statistics(model, ids, batch_size=2, progress=False, layer_weights=layer_weights)
    assert seen == [[True] * 3] * 3
    assert all(p.is_meta for layer in model.model.layers for p in layer.parameters())
    # same statistics as the whole model in memory
    whole = AutoModelForCausalLM.from_pretrained(folder)
    ref = collect_statistics(whole, ids, batch_size=2, progress=False)
    for c, c_ref in zip(stats.second_moments, ref.second_moments):
        assert torch.equal(c, c_ref)


def test_non_safetensors_checkpoint_falls_back_to_whole_loading(text_file, tmp_path):
    folder = tmp_path / "bin"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # transformers 5 writes safetensors only: make a legacy .bin folder
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, folder / "pytorch_model.bin")
    make_tokenizer(text_file.read_text()).save_pretrained(folder)
    with pytest.raises(CheckpointFormatError, match="--no-layerwise"):
        CheckpointReader(folder)
    report = api.convert(settings_for(folder, text_file, tmp_path, "out"))
    assert report["loading"] == "whole"


def test_token_ids_are_cached_on_disk(text_file, tmp_path, monkeypatch):
    from care_mla.io import text as data

    tok = make_tokenizer(text_file.read_text())
    first = data.tokenize_file(tok, text_file, tmp_path)
    (cached,) = (tmp_path / "tokens").glob("*.safetensors")
    monkeypatch.setattr(data, "_TOKENIZED", {})  # a new process
    monkeypatch.setattr(data, "_tokenize", lambda *a: pytest.fail("tokenised again despite the disk cache"))
    assert torch.equal(data.tokenize_file(tok, text_file, tmp_path), first) and first.dtype == torch.long
    other = make_tokenizer("completely different words only here")  # another tokenizer: another key
    monkeypatch.setattr(data, "_TOKENIZED", {})
    monkeypatch.undo()
    data.tokenize_file(other, text_file, tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 2 and cached.is_file()


@pytest.mark.parametrize("latent,fmt", [("separate", "care_mla"), ("decoupled", "care_mla"), ("decoupled", "deepseek")])
def test_conversion_reads_one_layer_at_a_time(tiny_model_dir, text_file, tmp_path, monkeypatch, latent, fmt):
    """Every read of the checkpoint is one decoder layer's tensors or one tensor outside them; nothing loads it whole."""
    folder = tiny_model_dir("qwen3")
    reads = []
    real_read = CheckpointReader._read

    def read(self, names, dtype):
        reads.append(list(names))
        return real_read(self, names, dtype)

    monkeypatch.setattr(CheckpointReader, "_read", read)
    for stage in (load, calibration):
        monkeypatch.setattr(stage, "load_model", lambda *a, **k: pytest.fail("the model was loaded whole"))
    allocation = "uniform" if fmt == "deepseek" else "adjusted"
    report = api.convert(settings_for(folder, text_file, tmp_path, "out", latent=latent, format=fmt,
                                      allocation=allocation, kv_fraction=0.5))
    assert report["loading"] == "layerwise"
    per_layer: dict[str, int] = {}
    for names in reads:
        layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        assert len(layers) == 1 or (not layers and len(names) == 1), names
        for i in layers:
            per_layer[i] = per_layer.get(i, 0) + 1
    # calibration, the rank / RoPE plan and writing read each layer (or its K and V) a few times each; a choice by
    # calibration loss reads each layer a few times per stage for all its candidates (LayerMemo) plus, per
    # candidate, at most its own RoPE plan and adjusted rank plan; the converted stream (output refit) twice more
    choices = [v for k, v in report.items() if k.endswith("_choice")]
    assert bool(choices) == (latent != "separate")  # the paper's separate latents keep the activation objective
    extra = 3 * len(choices) + 2 * sum(len(c.get("screening_loss", {})) + len(c.get("calibration_loss", {}))
                                       for c in choices)
    extra += 2 * (report["refit_output"] or report["compensate"])  # the converted stream reads each layer again
    assert sorted(per_layer) == ["0", "1", "2"] and max(per_layer.values()) <= 6 + extra, per_layer
    if latent == "decoupled" and fmt == "care_mla":  # the RoPE/latent split was chosen too
        assert {"objective_choice", "rope_dim_choice"} <= set(report)


def test_max_memory_is_parsed_and_checked():
    from care_mla.settings import SettingsError, parse_max_memory

    assert parse_max_memory("0=20GiB, 1=500MB,cpu=1GiB") == {0: 20 * 2**30, 1: 500 * 10**6, "cpu": 2**30}
    for bad, match in (("0:20GiB", "DEVICE=SIZE"), ("gpu0=1GiB", "DEVICE=SIZE"), ("0=lots", "not a size"),
                       (" , ", "names no device")):
        with pytest.raises(SettingsError, match=match):
            parse_max_memory(bad)
    with pytest.raises(SettingsError, match="--device cuda"):
        ConvertSettings(device="cpu", max_memory="0=20GiB")
    assert ConvertSettings(device="cpu", max_memory="cpu=2GiB").max_memory_map == {"cpu": 2 * 2**30}


def test_layer_placement_spreads_a_layer_that_does_not_fit_one_device(tiny_model_dir):
    """accelerate's placement of one decoder layer over small budgets (no GPU needed: shapes only, on meta)."""
    from transformers import AutoConfig

    from care_mla.pipeline.layerwise import PlacementError, layer_placement

    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))  # one layer: 30,848 fp32 parameters = 123 KB
    assert layer_placement(config, {0: "10MB"}, torch.float32) is None  # fits the first device whole
    placement = layer_placement(config, {0: "60KB", 1: "60KB", "cpu": "1MB"}, torch.float32)
    assert set(placement.values()) == {0, 1, "cpu"}
    layer = skeleton(config).model.layers[0]
    covered = {n for n, _ in layer.named_parameters() if any(n == k or n.startswith(k + ".") for k in placement)}
    assert covered == {n for n, _ in layer.named_parameters()}
    for device in (0, 1):  # accelerate keeps each GPU within its budget
        size = sum(p.numel() * 4 for n, p in layer.named_parameters()
                   if any(n.startswith(k + ".") and placement[k] == device for k in placement))
        assert 0 < size <= 60_000
    with pytest.raises(PlacementError, match="does not fit --max-memory"):
        layer_placement(config, {0: "20KB"}, torch.float32)


def test_calibration_over_a_placement_matches_one_device(tiny_model_dir):
    """A layer spread by accelerate's hooks (every part on the CPU here) gives the same statistics, bit for bit."""
    ids = torch.randint(3, 200, (4, 16))
    placement = {"self_attn.q_proj": "cpu", "self_attn.k_proj": "cpu", "self_attn.v_proj": "cpu",
                 "self_attn.o_proj": "cpu", "mlp": "cpu", "input_layernorm": "cpu", "post_attention_layernorm": "cpu"}
    runs = []
    for place in (None, placement):
        stats, model = layerwise_statistics(tiny_model_dir("qwen2"), ids, place)
        runs.append(stats)
        layers = model.model.layers
        assert all(p.is_meta for p in layers.parameters()) and not any(hasattr(m, "_hf_hook") for m in layers.modules())
    for a, b in zip(runs[0].second_moments, runs[1].second_moments):
        assert torch.equal(a, b)


def test_max_memory_conversion_matches_the_default(tiny_model_dir, text_file, tmp_path):
    """With --max-memory both paths (accelerate's device_map="auto" for the whole model) write the same model as
    the two-pass conversion on one device (a layer spread over devices is converted in two passes)."""
    folder = tiny_model_dir("llama")
    api.convert(settings_for(folder, text_file, tmp_path, "default", single_pass=False))
    for layerwise in (True, False):
        name = f"budget-{layerwise}"
        report = api.convert(settings_for(folder, text_file, tmp_path, name, layerwise=layerwise, device="cpu",
                                          max_memory="cpu=1GiB", evaluate=True))
        assert output_files(tmp_path / name) == output_files(tmp_path / "default")
        assert report["ppl"]["converted"] > 1
    from care_mla.pipeline.layerwise import PlacementError

    with pytest.raises(PlacementError, match="does not fit --max-memory"):
        api.convert(settings_for(folder, text_file, tmp_path, "tiny-budget", device="cpu", max_memory="cpu=10KB"))
    assert not (tmp_path / "tiny-budget").exists()


def test_placement_moves_a_submodule_or_one_tensor():
    """What `layer_placement` names — a submodule, or one tensor of a module holding tensors of its own (fused
    experts) — is moved, and only it."""
    from torch import nn

    from care_mla.pipeline.calibration import _move

    m = nn.Sequential(nn.Linear(2, 2))
    m[0].register_buffer("scale", torch.ones(1))
    _move(m, "0.weight", "meta")
    assert m[0].weight.is_meta and isinstance(m[0].weight, nn.Parameter) and not m[0].bias.is_meta
    _move(m, "0.scale", "meta")
    assert m[0].scale.is_meta and not m[0].bias.is_meta
    _move(m, "0", "meta")
    assert m[0].bias.is_meta


def test_reader_trims_the_heap_at_a_new_layer_at_most_once_a_second(tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    from care_mla.io import checkpoint

    reader = CheckpointReader(tiny_model_dir("llama"))
    clock = [1000.0]
    trims = []
    monkeypatch.setattr(checkpoint, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # this module's clock only
    monkeypatch.setattr(checkpoint, "trim_heap", lambda: trims.append(clock[0]))
    reader.state(layer_prefix(0))
    reader.state(layer_prefix(0))  # the same layer again: no trim
    reader.state(layer_prefix(1))  # a new layer within the second: no trim
    assert trims == [1000.0]
    clock[0] += checkpoint.TRIM_INTERVAL_S
    reader.state(layer_prefix(1))  # the second has passed, but the layer is the same
    assert trims == [1000.0]
    reader.state(layer_prefix(0))
    assert trims == [1000.0, 1000.0 + checkpoint.TRIM_INTERVAL_S]
