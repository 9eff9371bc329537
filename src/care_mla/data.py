"""Text sources and fixed token windows for calibration and evaluation.

A text is named either by the embedded corpus ("austen": calibration and evaluation use
disjoint novels, see `assets.AUSTEN_SPLITS`) or by the path of a local UTF-8 file.
Windows are non-overlapping and evenly spaced over the whole tokenised text, so they are
deterministic and cover all of it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import assets


class TextError(ValueError):
    """A text that cannot be used; the message says why and what to do."""


def resolve_text(spec: str, split: str) -> Path:
    """Path of the text named `spec`; `split` ("calibration"/"evaluation") selects the embedded novels."""
    if spec == assets.DEFAULT_TEXT:
        return assets.austen_text(split)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TextError(
            f"text file not found: {spec} (give a UTF-8 text file, or {assets.DEFAULT_TEXT!r} for the embedded corpus)"
        )
    return path


def token_windows(tokenizer, text: str | torch.Tensor, num_windows: int, seq_len: int) -> torch.Tensor:
    """`num_windows` non-overlapping windows of `seq_len` tokens, evenly spread over `text`.

    `text` is a string or its token ids. Returns a LongTensor (num_windows, seq_len).
    Raises TextError when the text is too short.
    """
    if num_windows < 1 or seq_len < 2:
        raise TextError(f"need at least 1 window of at least 2 tokens, got {num_windows} × {seq_len}")
    ids = text if isinstance(text, torch.Tensor) else _tokenize(tokenizer, text)
    available = ids.numel() // seq_len
    if available < num_windows:
        raise TextError(
            f"the text has {ids.numel()} tokens: at most {available} windows of {seq_len}; "
            f"asked for {num_windows} (use fewer samples, shorter windows or a longer text)"
        )
    chunks = ids[: available * seq_len].view(available, seq_len)
    picks = torch.linspace(0, available - 1, num_windows).round().long()
    return chunks[picks].clone()


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


_TOKENIZED: dict[tuple, torch.Tensor] = {}


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    """Token ids of a text file, remembered in-process (a novel-sized text takes seconds to tokenise)."""
    stat = path.stat()
    who = tokenizer.name_or_path or id(tokenizer)  # an in-memory tokenizer has no name
    key = (who, len(tokenizer), str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _TOKENIZED:
        _TOKENIZED[key] = _tokenize(tokenizer, path.read_text(encoding="utf-8"))
    return _TOKENIZED[key]


def load_windows(tokenizer, spec: str, split: str, num_windows: int, seq_len: int) -> tuple[torch.Tensor, Path]:
    path = resolve_text(spec, split)
    return token_windows(tokenizer, tokenize_file(tokenizer, path), num_windows, seq_len), path
