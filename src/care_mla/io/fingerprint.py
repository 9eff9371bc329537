"""Content identity of models and texts, for caches that cannot lie.

A cache keyed by file names, sizes and whole-second times hands stale statistics to a model
that was replaced in place with one of the same size. Here a file's identity is the SHA-256
of its bytes; hashing a multi-GB checkpoint on every run would cost seconds, so each digest is
remembered under (device, inode, size, mtime and ctime in ns) in ``<cache>/hashes/``. A rewrite changes
the inode or the mtime; one that restores the mtime afterwards (``touch -d``, ``cp -p``, ``os.utime``) still
changes the ctime, which no user call can set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# the digests of single files live with the assets, whose check of a cached model must not import torch
from care_mla.io.assets import MEMO_FOLDER, file_digest, sha256_file

__all__ = ["MEMO_FOLDER", "MODEL_FILE_SUFFIXES", "file_digest", "model_digest", "sha256_file"]

#: Files of a model folder that decide what calibration computes.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")


def model_digest(model_path: str, memo_dir: Path | None = None) -> str:
    """Identity of a model folder from the content of its config, tokenizer and weight files; a hub id is its name."""
    folder = Path(model_path)
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"hub:{model_path}".encode())
        return h.hexdigest()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES:
            h.update(f"{f.name}\0{file_digest(f, memo_dir)}\n".encode())
    return h.hexdigest()
