"""Text sources and fixed token windows for calibration and evaluation.

A text is named either by the embedded corpus ("austen": calibration and evaluation use
disjoint novels, see `austen.AUSTEN_SPLITS`) or by the path of a local UTF-8 file.
Windows are non-overlapping and evenly spaced over the whole tokenised text, so they are
deterministic and cover all of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from care_mla.io import assets, austen


class TextError(ValueError):
    """A text that cannot be used; the message says why and what to do."""


def resolve_text(spec: str, split: str) -> Path:
    """Path of the text named `spec`; `split` ("calibration"/"evaluation") selects the embedded novels."""
    if spec == assets.DEFAULT_TEXT:
        return austen.austen_text(split)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TextError(
            f"text file not found: {spec} (give a UTF-8 text file, or {assets.DEFAULT_TEXT!r} for the embedded corpus)"
        )
    return path


def user_text(spec: str) -> str | None:
    """The path of a user's text file, None for the embedded corpus (nothing on disk the user gave)."""
    return None if spec == assets.DEFAULT_TEXT else spec


def check_text_file(spec: str, split: str) -> Path | None:
    """A user's text file, refused up front (`TextError`) when missing, empty or not UTF-8; the embedded corpus
    needs no check (None: it is prepared and verified by `assets`)."""
    import codecs

    if user_text(spec) is None:
        return None
    path = resolve_text(spec, split)
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
                seen += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise TextError(f"{spec} is not UTF-8 text (bad byte at offset {seen + err.start}); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
    except OSError as err:
        raise TextError(f"cannot read the {split} text {spec}: {err.strerror}") from None
    if seen == 0:
        raise TextError(f"the {split} text {spec} is empty; give a UTF-8 text file with enough tokens")
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


def tokenize_file(tokenizer, path: Path, cache_dir: Path | None = None) -> torch.Tensor:
    """Token ids of a text file, remembered in-process (a novel-sized text takes seconds to tokenise).

    With `cache_dir`, also on disk, keyed by the text's bytes and the fast tokenizer's full
    definition (its JSON): tokenising the 3 MB Austen calibration text costs ~3 s and ~400 MB
    of peak memory, which a repeated conversion then skips.
    """
    stat = path.stat()
    who = tokenizer.name_or_path or id(tokenizer)  # an in-memory tokenizer has no name
    key = (who, len(tokenizer), str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    file = None
    if cache_dir is not None and backend is not None:
        h = hashlib.sha256(backend.to_str().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
        file = Path(cache_dir) / "tokens" / f"{h.hexdigest()[:24]}.safetensors"
    ids = None
    if file is not None and file.is_file():
        try:
            ids = load_file(str(file))["ids"].long()
        except Exception as err:  # a damaged cache entry is only a cost: tokenise again
            logging.getLogger(__name__).warning("ignoring the damaged token cache %s (%s)", file, err)
    if ids is None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise TextError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it first") from None
        ids = _tokenize(tokenizer, text)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
            save_file({"ids": ids.to(torch.int32 if ids.numel() == 0 or int(ids.max()) < 2**31 else torch.int64)},
                      str(tmp))
            tmp.replace(file)
    _TOKENIZED[key] = ids
    return ids


def load_windows(tokenizer, spec: str, split: str, num_windows: int, seq_len: int,
                 cache_dir: Path | None = None) -> tuple[torch.Tensor, Path]:
    """Evenly spaced token windows of the text `spec` (token ids cached on disk under `cache_dir` when given)."""
    path = resolve_text(spec, split)
    return token_windows(tokenizer, tokenize_file(tokenizer, path, cache_dir), num_windows, seq_len), path
