"""The embedded default text: six Jane Austen novels from Debian's r-cran-janeaustenr (R data files read
without R), split into calibration and evaluation novels, checksummed and cached.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from care_mla.io.assets import (
    MEMO_FOLDER,
    AssetError,
    files_match,
    make_dir,
    read_json,
    remove_stale_temps,
    resolve_cache_dir,
    write_bytes_atomic,
    write_json_atomic,
)

logger = logging.getLogger(__name__)


#: Environment variable naming an already downloaded ``r-cran-janeaustenr`` ``.deb`` (skips apt-get).
AUSTEN_DEB_ENV = "CARE_MLA_AUSTEN_DEB"


#: Which novels make up each text split. The splits are fixed and share no novel.
AUSTEN_SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma"),
    "evaluation": ("Northanger Abbey", "Persuasion"),
}


_AUSTEN_PACKAGE = "r-cran-janeaustenr"


_TEXT_FORMAT = 1


_TEXT_CHECKSUMS = "austen-checksums.json"


# Title used in AUSTEN_SPLITS -> name of the R data object in janeaustenr.
_AUSTEN_OBJECTS: dict[str, str] = {
    "Sense & Sensibility": "sensesensibility",
    "Pride & Prejudice": "prideprejudice",
    "Mansfield Park": "mansfieldpark",
    "Emma": "emma",
    "Northanger Abbey": "northangerabbey",
    "Persuasion": "persuasion",
}


def _text_paths(root: Path) -> tuple[Path, dict[str, Path]]:
    folder = root / "text"
    return folder, {split: folder / f"austen-{split}.txt" for split in AUSTEN_SPLITS}


def _text_is_valid(folder: Path, paths: Mapping[str, Path]) -> bool:
    record = read_json(folder / _TEXT_CHECKSUMS)
    if record is None or record.get("format") != _TEXT_FORMAT:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or set(files) != {p.name for p in paths.values()}:
        return False
    if record.get("splits") != {split: list(novels) for split, novels in AUSTEN_SPLITS.items()}:
        return False
    return files_match(folder, files, folder.parent / MEMO_FOLDER)


def austen_text(split: str, cache_dir: Path | None = None) -> Path:
    """Return the path of one split of Jane Austen's novels as a UTF-8 text file.

    The first call fetches the Debian package ``r-cran-janeaustenr`` with ``apt-get download``
    (or uses the ``.deb`` named by ``$CARE_MLA_AUSTEN_DEB``), reads its R lazy-load database and
    writes both splits to ``<cache>/text/austen-{calibration,evaluation}.txt``. Later calls verify
    the sha256 of both files and return at once.

    Each novel is its lines joined with ``"\\n"`` (blank lines kept as paragraph breaks, leading
    and trailing blank lines dropped); novels are separated by ``"\\n\\n"``; the file ends with a
    newline. The novels in each split are listed in :data:`AUSTEN_SPLITS`.

    Args:
        split: ``"calibration"`` or ``"evaluation"``.
        cache_dir: Cache root; defaults to ``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``.

    Returns:
        Path of the split's ``.txt`` file.

    Raises:
        AssetError: unknown split, apt-get or the package unavailable, or unreadable data.
    """
    if split not in AUSTEN_SPLITS:
        raise AssetError(f"unknown Austen split {split!r}; use one of {', '.join(map(repr, AUSTEN_SPLITS))}")
    root = resolve_cache_dir(cache_dir)
    folder, paths = _text_paths(root)
    if _text_is_valid(folder, paths):
        logger.debug("using cached text %s", paths[split])
        return paths[split]

    make_dir(folder)
    remove_stale_temps(folder, ".")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".janeaustenr-", dir=folder))
    try:
        deb, package_version = _fetch_janeaustenr_deb(work)
        novels = _read_janeaustenr(deb, work / "extracted")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    texts = {
        split_name: _join_novels(novels[title] for title in titles) for split_name, titles in AUSTEN_SPLITS.items()
    }
    for split_name, text in texts.items():
        write_bytes_atomic(paths[split_name], text.encode("utf-8"))
    write_json_atomic(
        folder / _TEXT_CHECKSUMS,
        {
            "format": _TEXT_FORMAT,
            "source": {"package": _AUSTEN_PACKAGE, "version": package_version},
            "splits": {split_name: list(titles) for split_name, titles in AUSTEN_SPLITS.items()},
            "chars": {split_name: len(text) for split_name, text in texts.items()},
            "files": {paths[s].name: hashlib.sha256(t.encode("utf-8")).hexdigest() for s, t in texts.items()},
        },
    )
    if not _text_is_valid(folder, paths):
        raise AssetError(f"the Austen text files in {folder} changed while being written (another process?); try again")
    logger.info("Austen text ready in %s (%.1f s)", folder, time.perf_counter() - started)
    return paths[split]


def _join_novels(novels: Iterable[list[str]]) -> str:
    parts = []
    for lines in novels:
        start, end = 0, len(lines)
        while start < end and not lines[start].strip():
            start += 1
        while end > start and not lines[end - 1].strip():
            end -= 1
        parts.append("\n".join(line.rstrip() for line in lines[start:end]))
    return "\n\n".join(parts) + "\n"


def _fetch_janeaustenr_deb(work: Path) -> tuple[Path, str]:
    """Get the ``r-cran-janeaustenr`` ``.deb`` into ``work``; returns its path and version string."""
    override = os.environ.get(AUSTEN_DEB_ENV, "").strip()
    if override:
        deb = Path(override).expanduser()
        if not deb.is_file():
            raise AssetError(
                f"{AUSTEN_DEB_ENV}={override} is not a file; point it at a {_AUSTEN_PACKAGE} .deb or unset it"
            )
        logger.info("using %s from %s", _AUSTEN_PACKAGE, deb)
        return deb, deb.name
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise AssetError(
            f"apt-get not found, so {_AUSTEN_PACKAGE} cannot be fetched; on a non-Debian system download "
            f"the {_AUSTEN_PACKAGE} .deb from packages.debian.org and set {AUSTEN_DEB_ENV} to its path"
        )
    logger.info("downloading %s with apt-get", _AUSTEN_PACKAGE)
    try:
        result = subprocess.run(
            # Sandbox::User=root: the download folder is ours, not the _apt user's (avoids a warning).
            [apt_get, "download", "-q", "-o", "APT::Sandbox::User=root", _AUSTEN_PACKAGE],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AssetError(
            f"`apt-get download {_AUSTEN_PACKAGE}` could not run ({error}); run `apt-get update` and try again"
        ) from error
    debs = sorted(work.glob(f"{_AUSTEN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("E:")), lines[-1] if lines else "no output")
        raise AssetError(
            f"`apt-get download {_AUSTEN_PACKAGE}` failed ({reason.strip()}); run `apt-get update` "
            f"(as root) first, or set {AUSTEN_DEB_ENV} to a downloaded .deb"
        )
    deb = debs[0]
    version = deb.name[len(_AUSTEN_PACKAGE) + 1 :].rsplit("_", 1)[0]
    return deb, version


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the data archive of a ``.deb`` into ``dest`` (``dpkg-deb -x``, or pure Python)."""
    dest.mkdir(parents=True, exist_ok=True)
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is not None:
        result = subprocess.run([dpkg_deb, "-x", str(deb), str(dest)], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        logger.warning("dpkg-deb -x failed (%s); unpacking in Python", result.stderr.strip())
    _extract_deb_python(deb, dest)


def _extract_deb_python(deb: Path, dest: Path) -> None:
    """Minimal ``ar`` reader for ``.deb`` files: find ``data.tar.*`` and unpack it."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise AssetError(f"{deb} is not a Debian package (no ar header); delete it and download it again")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise AssetError(f"{deb} uses zstd compression; install dpkg (which provides dpkg-deb) and try again")
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
            archive.extractall(dest, filter="data")
        return
    raise AssetError(f"{deb} has no data archive; delete it and download it again")


def _read_janeaustenr(deb: Path, dest: Path) -> dict[str, list[str]]:
    """Read the six novels (title -> list of lines) from the package's R data."""
    _extract_deb(deb, dest)
    rdx_files = sorted(dest.glob("**/janeaustenr/data/Rdata.rdx"))
    if rdx_files:
        rdx = rdx_files[0]
        objects = _read_lazyload_db(rdx, rdx.with_suffix(".rdb"), _AUSTEN_OBJECTS.values())
    else:
        objects = _read_rda_files(dest, _AUSTEN_OBJECTS.values())
    novels: dict[str, list[str]] = {}
    for title, name in _AUSTEN_OBJECTS.items():
        value = objects.get(name)
        if value is None:
            raise AssetError(
                f"{deb.name} has no R object {name!r} ({title}); set {AUSTEN_DEB_ENV} to a janeaustenr 1.x .deb"
            )
        lines = _as_lines(value, name)
        if len(lines) < 1000:
            raise AssetError(
                f"{title} in {deb.name} has only {len(lines)} lines; set {AUSTEN_DEB_ENV} to a janeaustenr 1.x .deb"
            )
        novels[title] = lines
    return novels


def _as_lines(value: Any, name: str) -> list[str]:
    """An R character vector (numpy array or sequence; NA -> empty line) as a list of str."""
    try:
        items = list(value)
    except TypeError as error:
        raise AssetError(
            f"R object {name!r} is not a character vector; set {AUSTEN_DEB_ENV} to a janeaustenr 1.x .deb"
        ) from error
    lines = []
    for item in items:
        if item is None or (isinstance(item, float) and item != item):
            lines.append("")
        elif isinstance(item, str):
            lines.append(str(item))
        else:
            raise AssetError(
                f"R object {name!r} holds {type(item).__name__}, not text; "
                f"set {AUSTEN_DEB_ENV} to a janeaustenr 1.x .deb"
            )
    return lines


def _r_convert(data: bytes, extension: str) -> Any:
    import rdata

    parsed = rdata.parser.parse_data(data, extension=extension)
    return rdata.conversion.convert(parsed)


def _read_lazyload_db(rdx: Path, rdb: Path, names: Iterable[str]) -> dict[str, Any]:
    """Read variables from an R lazy-load database (``.rdx`` index + ``.rdb`` blobs).

    The ``.rdx`` file is a gzip-compressed RDS list ``(variables, references, compressed)`` where
    each variable maps to ``(offset, length)`` in the ``.rdb``. Each blob is a 4-byte big-endian
    uncompressed length followed by a zlib stream (``compressed = TRUE``) or, for ``compressed``
    2 or 3, by a type byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` stored) and the payload; an
    uncompressed database stores the serialisation as is. The payload is an R serialisation
    (XDR), which :mod:`rdata` converts.
    """
    try:
        index = _r_convert(rdx.read_bytes(), ".rds")
        variables = index["variables"]
        compressed = index.get("compressed", True)
        compressed = compressed[0] if hasattr(compressed, "__len__") and not isinstance(compressed, str) else compressed
        blob_file = rdb.read_bytes()
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise AssetError(
            f"cannot read the R lazy-load index {rdx} ({error}); delete the cache and try again"
        ) from error
    variables = {str(key): value for key, value in variables.items()}
    out: dict[str, Any] = {}
    for name in names:
        if name not in variables:
            continue
        offset, length = (int(x) for x in variables[name][:2])
        blob = blob_file[offset : offset + length]
        if len(blob) != length:
            raise AssetError(f"{rdb} is truncated; delete the cache and try again")
        try:
            data = _unpack_lazyload_blob(blob, compressed)
            out[name] = _r_convert(data, ".rds")
        except (ValueError, zlib.error, OSError, lzma.LZMAError, EOFError, NotImplementedError) as error:
            raise AssetError(
                f"cannot decode R object {name!r} in {rdb} ({error}); delete the cache and try again"
            ) from error
    return out


def _unpack_lazyload_blob(blob: bytes, compressed: Any) -> bytes:
    level = int(compressed) if not isinstance(compressed, bool) else (1 if compressed else 0)
    if level == 0:
        return blob
    if len(blob) < 5:
        raise ValueError("blob too short")
    (expected,) = struct.unpack(">I", blob[:4])
    if level == 1:
        data = zlib.decompress(blob[4:])
    else:
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            data = zlib.decompress(body)
        elif kind == b"2":
            data = bz2.decompress(body)
        elif kind == b"X":
            data = lzma.decompress(body)
        elif kind == b"0":
            data = body
        else:
            raise ValueError(f"unknown compression type {kind!r}")
    if len(data) != expected:
        raise ValueError(f"decompressed {len(data)} bytes, expected {expected}")
    return data


def _read_rda_files(root: Path, names: Iterable[str]) -> dict[str, Any]:
    """Fallback for packages that ship plain ``data/*.rda`` / ``*.RData`` files."""
    import rdata

    wanted = set(names)
    out: dict[str, Any] = {}
    for path in sorted(root.glob("**/data/*")):
        if path.suffix.lower() not in {".rda", ".rdata"}:
            continue
        try:
            values = rdata.read_rda(path)
        except Exception as error:
            raise AssetError(
                f"cannot read R data file {path} ({error}); set {AUSTEN_DEB_ENV} to a janeaustenr 1.x .deb"
            ) from error
        out.update({str(k): v for k, v in values.items() if str(k) in wanted})
    return out
