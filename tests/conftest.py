"""Shared fixtures: tiny random models of every family, saved with a tokenizer, and a small text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from care_mla.settings import ConvertSettings

FAMILY_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
VOCAB = 256

_WORDS = (
    "the a of and to in was her she he it that his had with for as not be you but my on at by all "
    "said mr mrs miss sister house letter very much could would must will should time little "
    "emma anne elizabeth darcy bennet elinor marianne fanny catherine wentworth"
).split()


def make_text(n_words: int = 12000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, words = [], []
    for i in range(n_words):
        words.append(rng.choice(_WORDS))
        if i % 12 == 11:
            lines.append(" ".join(words).capitalize() + ".")
            words = []
    return "\n".join(lines) + "\n"


def make_tokenizer(text: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, **overrides):
    config_cls, _ = FAMILY_CLASSES[family]
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=family in ("llama", "qwen2"),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides)
    return config_cls(**fields)


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    _, model_cls = FAMILY_CLASSES[family]
    model = model_cls(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # non-trivial biases and norms, so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text())
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, text_file):
    """Factory: folder of a saved tiny model of `family` (with tokenizer), cached per family."""
    made: dict[str, Path] = {}
    tokenizer = make_tokenizer(text_file.read_text())

    def make(family: str = "llama") -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = folder
        return made[family]

    return make


def settings_for(model_dir, text_file, tmp_path, **kw) -> ConvertSettings:
    """Settings of a small, quiet conversion of `model_dir` on `text_file` (calibration 8 x 32, evaluation 4 x 32,
    forward passes in float32) into `tmp_path`; `kw` overrides."""
    base = dict(
        model=str(model_dir),
        # "auto" would take bfloat16 on a CPU with native bf16 and float32 elsewhere: the same numbers on any machine
        calib_dtype="float32",
        out=str(tmp_path / "out"),
        calib_text=str(text_file),
        eval_text=str(text_file),
        calib_samples=8,
        calib_seq_len=32,
        eval_samples=4,
        eval_seq_len=32,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    base.update(kw)
    return ConvertSettings(**base)


def layerwise_statistics(folder, ids: torch.Tensor, placement: dict | None):
    """(calibration statistics, the model after) of the checkpoint in `folder` on `ids`, collected one decoder layer
    at a time as conversion does, the layer spread by `placement` (submodule → device; None: one device)."""
    from care_mla.io.checkpoint import CheckpointReader
    from care_mla.pipeline.calibration import collect_statistics
    from care_mla.pipeline.layerwise import layer_prefix, skeleton

    reader = CheckpointReader(folder)
    model = skeleton(AutoConfig.from_pretrained(folder))
    model.model.embed_tokens.load_state_dict({"weight": reader.get("model.embed_tokens.weight")}, assign=True)
    stats = collect_statistics(model, ids, batch_size=2, progress=False, layer_placement=placement,
                               layer_weights=lambda i: reader.state(layer_prefix(i)))
    return stats, model
