"""The conversion pipeline and CLI end to end on tiny saved models."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from conftest import FAMILY_CLASSES, settings_for
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import care_mla  # noqa: F401
from care_mla.cli import main
from care_mla.formats.families import UnsupportedModelError
from care_mla.pipeline import calibration, load
from care_mla.pipeline import convert as api
from care_mla.settings import ConvertSettings, SettingsError


def folder_digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", sorted(FAMILY_CLASSES))
def test_parity_conversion_reproduces_original(family, tiny_model_dir, text_file, tmp_path):
    src = tiny_model_dir(family)
    digest = folder_digest(src)
    report = api.convert(settings_for(src, text_file, tmp_path, kv_fraction=1.0))
    assert folder_digest(src) == digest  # the input model is never modified
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (original(ids).logits - converted(ids).logits).abs().max().item() <= 1e-4
    assert report["ppl"]["converted"] == pytest.approx(report["ppl"]["original"], rel=1e-5)
    kv = report["kv_bytes_per_token"]
    assert kv["original"] == kv["converted"] == kv["original_measured"] == kv["converted_measured"] == 3 * 64 * 4


@pytest.mark.parametrize("latent", ["separate", "joint"])
@pytest.mark.parametrize("allocation", ["uniform", "adjusted"])
def test_budget_is_met_exactly_and_measured(latent, allocation, tiny_model_dir, text_file, tmp_path):
    s = settings_for(tiny_model_dir("llama"), text_file, tmp_path, kv_fraction=0.3, latent=latent, allocation=allocation)
    report = api.convert(s)
    # GQA width 2·2·16 = 64 per layer; 0.3 of it over 3 layers
    widths = [sum(r) for r in report["ranks"]]
    if latent == "separate":
        assert sum(r[0] for r in report["ranks"]) == sum(r[1] for r in report["ranks"]) == round(0.3 * 32 * 3)
    else:
        assert sum(widths) == round(0.3 * 64 * 3)
    kv = report["kv_bytes_per_token"]
    assert kv["converted"] == kv["converted_measured"] == sum(widths) * 4
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("ppl", "kv_bytes_per_token", "ranks", "calibration", "timings_s", "peak_rss_mb"):
        assert key in saved
    assert saved["calibration"]["tokens"] == 8 * 32
    # the settings written are the ones that built the model: an "auto" objective is stored as chosen
    choice = report.get("objective_choice")
    assert (choice is not None) == (latent == "joint")  # the paper's separate latents keep the activation objective
    expected = s if choice is None else dataclasses.replace(s, objective=report["objective"],
                                                            key_emphasis=report["key_emphasis"])
    if choice is not None and allocation == "uniform":  # the default layout: one pass, the objective per layer
        assert report["timings_s"].keys() >= {"calibrate_choose_refit", "save"}
        assert report["objective"] == report["key_emphasis"] == "auto"  # stored as asked: it differs per layer
        screening = choice["screening"]  # two rounds: 7 candidates on 4 of the 8 selection windows, 3 on all 8
        assert choice["windows"] == 8 and screening["windows"] == 4 and screening["finalists"] == 3
        assert len(choice["per_layer"]) == 3 and all(len(e) == 7 for e in screening["attention_error"])
        assert all(len(e) == 3 for e in choice["attention_error"])
        for name, errors, row in zip(choice["per_layer"], choice["attention_error"], report["layers"]):
            assert name == min(errors, key=errors.get) and row["choice_error"] == pytest.approx(errors[name], abs=1e-6)
            assert 0 < row["o_refit_error"] < row["o_error"]  # the refit lowered the attention output's error
    elif choice is not None:  # adjusted ranks: the two passes, one objective by calibration loss
        assert len(choice["screening_loss"]) == 7 and len(choice["calibration_loss"]) == 3
        assert choice["chosen"] == min(choice["calibration_loss"], key=choice["calibration_loss"].get)
    assert ConvertSettings.from_dict(json.loads((tmp_path / "out" / api.SETTINGS_FILE).read_text())) == expected


def test_care_has_lower_activation_error_than_weight_svd(tiny_model_dir, text_file, tmp_path):
    common = dict(kv_fraction=0.25, allocation="uniform", evaluate=False)
    care = api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, out=str(tmp_path / "a"), **common))
    svd = api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, out=str(tmp_path / "b"), method="svd", **common))
    for c, s in zip(care["layers"], svd["layers"]):
        assert c["k_rel_error"] <= s["k_rel_error"] + 1e-9
        assert c["v_rel_error"] <= s["v_rel_error"] + 1e-9


def test_second_conversion_reuses_calibration(tiny_model_dir, text_file, tmp_path, monkeypatch):
    api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, out=str(tmp_path / "a"), evaluate=False))

    def boom(*a, **k):
        raise AssertionError("calibration should come from the cache")

    monkeypatch.setattr(calibration, "collect_statistics", boom)
    api.convert(
        settings_for(tiny_model_dir("llama"), text_file, tmp_path, out=str(tmp_path / "b"), method="svd", kv_fraction=0.25, evaluate=False)
    )
    assert len(list((tmp_path / "cache" / "calibration").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("layerwise", [True, False])
def test_interrupted_conversion_leaves_no_output(tiny_model_dir, text_file, tmp_path, monkeypatch, layerwise):
    from care_mla.io.checkpoint import ShardWriter

    calls = []

    def killed(self, name, tensor):  # killed after the first shard tensors are on their way
        calls.append(name)
        if len(calls) > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, evaluate=False, layerwise=layerwise))
    assert len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no output, no partial folder


def test_sigterm_during_the_cli_leaves_no_output(tiny_model_dir, text_file, tmp_path):
    """`kill` (SIGTERM) mid-write unwinds like Ctrl-C: exit status 143, no output, no staging folder."""
    import signal
    import subprocess
    import sys

    script = """
import os, signal, sys
from care_mla.io.checkpoint import ShardWriter
from care_mla.cli import main
real = ShardWriter.add
def add(self, name, tensor):
    real(self, name, tensor)
    os.kill(os.getpid(), signal.SIGTERM)
ShardWriter.add = add
sys.exit(main(sys.argv[1:]))
"""
    out = tmp_path / "work" / "out"
    args = [str(tiny_model_dir("llama")), "--out", str(out), "--calib-text", str(text_file), "--calib-samples", "8",
            "--calib-seq-len", "32", "--no-eval", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    run = subprocess.run([sys.executable, "-c", script, "convert", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-2000:]
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_model_dir, text_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    s = settings_for(tiny_model_dir("llama"), text_file, tmp_path, evaluate=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        api.convert(s)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, evaluate=False, overwrite=True))
    assert (tmp_path / "out" / "report.json").is_file() and not (tmp_path / "out" / "keep.txt").exists()


def test_unsupported_architecture_names_supported_families(text_file, tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(tmp_path / "gpt2")
    from conftest import make_tokenizer

    make_tokenizer(text_file.read_text()).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        api.convert(settings_for(tmp_path / "gpt2", text_file, tmp_path))


def test_offline_hub_id_fails_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    with pytest.raises(load.ModelLoadError, match="local model folder"):
        load.load_model("no-such-org/no-such-model", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_kv_fraction_outside_range_is_refused(fraction):
    with pytest.raises(SettingsError, match=r"\(0, 1\]"):
        ConvertSettings(kv_fraction=fraction)


def test_unknown_settings_are_refused():
    with pytest.raises(SettingsError, match="unknown setting"):
        ConvertSettings.from_dict({"kv_fraction": 0.5, "ratio": 2})


def test_cli_errors_are_one_clear_line(tiny_model_dir, text_file, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    cases = [
        (["convert", model, "--out", str(tmp_path / "o"), "--kv-fraction", "1.5"], "(0, 1]"),
        (["convert", model, "--out", str(tmp_path / "o"), "--calib-text", str(tmp_path / "missing.txt")], "text file not found"),
        (["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "model folder not found"),
    ]
    (tmp_path / "exists").mkdir()
    cases.append((["convert", model, "--out", str(tmp_path / "exists")], "--overwrite"))
    for argv, message in cases:
        assert main(argv + ["--quiet", "--cache-dir", str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_convert_and_eval(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--eval-text", str(text_file), "--eval-samples", "2", "--eval-seq-len", "32", "--quiet"]
    argv = ["convert", str(tiny_model_dir("qwen2")), "--out", str(out), "--kv-fraction", "0.5", "--latent", "joint",
            "--calib-text", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32", "--cache-dir", str(tmp_path / "c")]
    assert main(argv + common) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kv_bytes_per_token"]["converted"] == 3 * 32 * 4
    assert main(["eval", str(out)] + common) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["kv_bytes_per_token"] == evaluated["kv_bytes_per_token_measured"] == 3 * 32 * 4


def test_two_runs_with_the_same_settings_write_identical_models(tiny_model_dir, text_file, tmp_path):
    digests = []
    for name in ("a", "b"):
        s = settings_for(tiny_model_dir("qwen3"), text_file, tmp_path / name, kv_fraction=0.4, evaluate=False)
        api.convert(s)
        digests.append(hashlib.sha256((tmp_path / name / "out" / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_demo_table_compares_care_with_weight_svd(tiny_model_dir, text_file, tmp_path):
    from care_mla.demo import run_demo

    s = settings_for(tiny_model_dir("llama"), text_file, tmp_path)
    fields = {k: v for k, v in s.to_dict().items() if k not in ("out", "kv_fraction", "overwrite", "method", "allocation", "latent",
                                                                 "objective", "key_emphasis")}
    table = run_demo(tmp_path / "demo", kv_fraction=0.5, **fields)
    lines = table.splitlines()
    assert len(lines) == 7 and "original (GQA)" in lines[2] and "CARE" in lines[3] and "weight SVD" in lines[4]
    assert lines[6].startswith("SmolLM2-135M-Instruct, calibration 8 x 32 tokens, held-out 4 x 32 tokens")
    assert "| 64 | 768 |" in lines[2], lines and "| 32 | 384 |" in lines[3]  # width per layer, fp32 bytes per token
    assert (tmp_path / "demo" / "demo.md").read_text().strip() == table
