"""Content identity of files: the memo of digests never hands out a stale one."""

from __future__ import annotations

import hashlib
import os

from care_mla.io.fingerprint import file_digest, model_digest


def test_digest_is_the_sha256_of_the_bytes_and_is_remembered(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights-1")
    memo = tmp_path / "memo"
    assert file_digest(f, memo) == hashlib.sha256(b"weights-1").hexdigest()
    assert len(list(memo.glob("*.sha256"))) == 1
    assert file_digest(f, memo) == hashlib.sha256(b"weights-1").hexdigest()  # from the memo
    assert len(list(memo.glob("*.sha256"))) == 1


def test_same_size_rewrite_with_the_mtime_restored_is_hashed_again(tmp_path):
    """A weight file swapped in place for one of the same size, with its mtime put back (cp -p, touch -d): the
    inode, size and mtime are unchanged, the ctime is not; the digest must follow the content."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights-1")
    memo = tmp_path / "memo"
    first = file_digest(f, memo)
    st = f.stat()
    with open(f, "r+b") as handle:  # same inode, same size
        handle.write(b"weights-2")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored
    after = f.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    if after.st_ctime_ns == st.st_ctime_ns:  # a filesystem with coarse ctime: make the change visible
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = file_digest(f, memo)
    assert first != second == hashlib.sha256(b"weights-2").hexdigest()


def test_model_digest_follows_every_model_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a")
    (tmp_path / "notes.md").write_text("not a model file")
    before = model_digest(str(tmp_path))
    (tmp_path / "notes.md").write_text("changed")
    assert model_digest(str(tmp_path)) == before
    (tmp_path / "model.safetensors").write_bytes(b"b")
    assert model_digest(str(tmp_path)) != before
    assert model_digest("org/name") != model_digest("org/other")  # a hub id is its name
