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
import os
from pathlib import Path

#: Files of a model folder that decide what calibration computes.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of `path`'s bytes, remembered in `memo_dir` under its (device, inode, size, mtime_ns, ctime_ns)."""
    path = Path(path)
    st = path.stat()
    if memo_dir is None:
        return sha256_file(path)
    ident = f"{path.resolve()}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    memo = memo_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.sha256"
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.tmp-{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(memo)
    except OSError:
        pass  # a read-only cache only costs the hashing next time
    return digest


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
