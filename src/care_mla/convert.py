"""Conversion pipeline: load → calibrate → allocate ranks → factorize → build → evaluate → save.

Orchestration only: the maths lives in `factorization` and `allocation`, the statistics in
`calibration`, the model in `modeling_care_mla`. `convert(settings)` is the Python API the
CLI calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from . import allocation, assets, deepseek, factorization
from .calibration import CalibrationStats, collect_statistics
from .checkpoint import CheckpointFormatError, CheckpointReader
from .data import load_windows, resolve_text
from .evaluation import kv_bytes_per_token, kv_cache_width, measured_kv_bytes_per_token, perplexity
from .families import get_family, gqa_kv_width, head_dim
from .configuration_care_mla import CareMlaConfig
from .mapping import LayerLatent, build_decoupled_model, build_latent_model
from .settings import ConvertSettings, SettingsError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "care_mla_settings.json"
#: Version of the cached statistics (2: second moments stored in float32); part of the cache key.
STATS_FORMAT = 2
REPORT_FILE = "report.json"


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names the fix."""


class OutputExistsError(FileExistsError):
    """The output folder exists and --overwrite was not given."""


# ----------------------------------------------------------------------------- loading


def resolve_model_path(spec: str) -> str:
    """The embedded default model's folder, a local folder, or a hub id (left to transformers)."""
    if spec == assets.DEFAULT_MODEL:
        return str(assets.default_model_dir())
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") != 1
    if path.exists() or looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(f"model folder not found: {spec} (give a Hugging Face model folder or a hub id)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return spec


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda was asked for but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def load_model(spec: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer, resolved path). The files on disk are only read."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {spec!r}: {str(err).splitlines()[0]} — pass a local model folder "
            f"(or {assets.DEFAULT_MODEL!r}); hub ids need network access or a populated HF cache"
        ) from err
    return model.to(device).eval(), tokenizer, path


# ----------------------------------------------------------------------------- calibration


def _model_fingerprint(model_path: str) -> bytes:
    """Identity of a model folder: its config and the names, sizes and times of its weight files."""
    h = hashlib.sha256(model_path.encode())
    mp = Path(model_path)
    if mp.is_dir():
        for f in sorted(mp.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin"):
                h.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
        h.update((mp / "config.json").read_bytes())
    return h.digest()


def _fingerprint(model_path: str, text_path: Path, settings: ConvertSettings, dtype: torch.dtype) -> str:
    """Key of the calibration cache: model files, text content and calibration shape."""
    h = hashlib.sha256(_model_fingerprint(model_path))
    h.update(hashlib.sha256(text_path.read_bytes()).digest())
    h.update(f"{settings.calib_samples}x{settings.calib_seq_len}:{dtype}:{STATS_FORMAT}".encode())
    return h.hexdigest()[:20]


def calibrate(model, tokenizer, model_path: str, settings: ConvertSettings, *,
              reader: CheckpointReader | None = None) -> CalibrationStats:
    """Statistics from the cache when this model, text and shape were calibrated before, else collected.

    The forward passes run in `settings.calib_dtype` (bf16 by default: 2–3× faster on CPU, and the
    statistics are accumulated in fp32/fp64 either way). With a `reader` (`model` is then None)
    the layers are read from the checkpoint one at a time in that dtype; otherwise a second copy
    of the model is loaded in it when it differs from the model's.
    """
    if reader is not None:
        device = resolve_device(settings.device)
        model_dtype = torch_dtype(settings.dtype, device)
    else:
        device, model_dtype = next(model.parameters()).device, next(model.parameters()).dtype
    dtype = model_dtype if settings.calib_dtype == "same" else getattr(torch, settings.calib_dtype)
    cache_root = assets.resolve_cache_dir(settings.cache_dir)
    text_path = resolve_text(settings.calib_text, "calibration")
    cache = cache_root / "calibration" / f"{_fingerprint(model_path, text_path, settings, dtype)}.safetensors"
    if cache.is_file():  # checked before tokenising: the statistics are all that is needed
        logger.info("calibration statistics from %s", cache)
        stats = CalibrationStats.load(cache)
        stats.meta["cache_file"] = str(cache)
        return stats
    windows, _ = load_windows(
        tokenizer, settings.calib_text, "calibration", settings.calib_samples, settings.calib_seq_len, cache_root
    )
    meta = {
        "model": model_path,
        "text": str(text_path),
        "samples": settings.calib_samples,
        "seq_len": settings.calib_seq_len,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if reader is not None:
        from .layerwise import collect_statistics_layerwise

        stats = collect_statistics_layerwise(reader, AutoConfig.from_pretrained(model_path), windows, dtype=dtype,
                                             device=device, batch_size=settings.batch_size,
                                             progress=settings.progress, meta=meta)
    else:
        runner = model if dtype == model_dtype else load_model(model_path, dtype, device)[0]
        stats = collect_statistics(runner, windows, batch_size=settings.batch_size, progress=settings.progress,
                                   meta=meta)
        del runner
    stats.save(cache)
    stats.meta["cache_file"] = str(cache)
    return stats


# ----------------------------------------------------------------------------- ranks and factors


def _factorize(method: str, W, C, abs_mean, rank: int, s: ConvertSettings) -> factorization.Factors:
    if method == "care":
        return factorization.care_factorize(W, C, rank, method=s.whitening, damping=s.damping)
    if method == "svd":
        return factorization.svd_factorize(W, rank)
    if method == "asvd":
        return factorization.asvd_factorize(W, abs_mean, rank)
    if method == "svd-llm":
        return factorization.svd_llm_factorize(W, C, rank)
    if method == "transmla":
        return factorization.transmla_factorize(W, C, rank)
    raise SettingsError(f"--method {method} builds no separate K and V latents")


def _joint_factorize(W_k, W_v, C, rank: int, s: ConvertSettings) -> factorization.Factors:
    """One K/V latent of rank `rank` (K columns of `up` first) by the joint-capable `s.method`."""
    if s.method == "care":
        return factorization.joint_factorize(
            W_k, W_v, C, rank, balance=s.balance_kv, method=s.whitening, damping=s.damping
        )[0]
    if s.method == "mha2mla":
        return factorization.mha2mla_factorize(W_k, W_v, rank)[0]
    if s.method == "transmla":
        return factorization.transmla_joint_factorize(W_k, W_v, C, rank, balance=s.balance_kv)[0]
    raise SettingsError(f"--method {s.method} builds no joint latent")


def _kv_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    return attn.k_proj.weight.detach().T.float().cpu(), attn.v_proj.weight.detach().T.float().cpu()


def rank_budget(config, settings: ConvertSettings) -> dict:
    """Per-branch mean rank, total, bounds, for the asked KV fraction."""
    kv_width = config.num_key_value_heads * head_dim(config)
    branch_width = 2 * kv_width if settings.latent == "joint" else kv_width
    cap = min(branch_width, config.hidden_size)
    layers = config.num_hidden_layers
    mean = settings.kv_fraction * branch_width
    total = round(mean * layers)
    if total < layers:
        raise SettingsError(
            f"kv_fraction {settings.kv_fraction} leaves less than one latent dim per layer; the smallest that works is "
            f"{1 / branch_width:.6g}"
        )
    if total > cap * layers:
        raise SettingsError(
            f"kv_fraction {settings.kv_fraction} needs rank {mean:g} per layer but the attention input has only "
            f"{config.hidden_size} dims; the largest kv_fraction that works is {cap / branch_width:.6g}"
        )
    r_min = max(1, math.floor(settings.rank_min_ratio * mean))
    r_max = min(cap, math.ceil(settings.rank_max_ratio * mean))
    return {"mean": mean, "total": total, "r_min": r_min, "r_max": r_max, "cap": cap, "layers": layers}


def choose_ranks(spectra: list[torch.Tensor], budget: dict, settings: ConvertSettings) -> list[int]:
    if settings.allocation == "uniform":
        return allocation.uniform_ranks(budget["layers"], budget["total"], r_max=budget["cap"])
    return allocation.adjusted_ranks(
        spectra, budget["total"], r_min=budget["r_min"], r_max=budget["r_max"], score=settings.allocation_score
    )


def _relative_error(W, W_hat, C) -> float:
    energy = factorization.activation_error(W, torch.zeros_like(W), C)
    return factorization.activation_error(W, W_hat, C) / max(energy, 1e-30)


KvWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index → (W_k, W_v), (D, m) float32


def plan_ranks(config, kv_weights: KvWeights, stats: CalibrationStats, settings: ConvertSettings) -> list[list[int]]:
    """Per-layer latent ranks at the asked budget: ``[k, v]`` per layer for separate latents, ``[kv]`` for joint.

    Uniform needs no weights; adjusted reads each layer's K/V weights once for its spectrum.
    """
    layers = config.num_hidden_layers
    budget = rank_budget(config, settings)
    Cs, abs_means = stats.second_moments, stats.abs_means
    if settings.allocation == "uniform":
        ranks = choose_ranks([], budget, settings)
        return [[r] if settings.latent == "joint" else [r, r] for r in ranks]
    bar = tqdm(range(layers), desc="spectra for the rank plan", unit="layer", disable=not settings.progress)
    if settings.latent == "joint":
        spectra = [_joint_factorize(*kv_weights(i), Cs[i], 0, settings).spectrum for i in bar]
        return [[r] for r in choose_ranks(spectra, budget, settings)]
    spectra: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    for i in bar:
        for name, W in zip(("k", "v"), kv_weights(i)):
            spectra[name].append(_factorize(settings.method, W, Cs[i], abs_means[i], 0, settings).spectrum)
    k, v = (choose_ranks(spectra[name], budget, settings) for name in ("k", "v"))
    return [list(pair) for pair in zip(k, v)]


def layer_latent(i: int, ranks: list[int], kv_weights: KvWeights, stats: CalibrationStats,
                 settings: ConvertSettings) -> tuple[LayerLatent, dict]:
    """Layer i's factors at `ranks` (from `plan_ranks`) and its row of the per-layer table (ranks, relative errors)."""
    W_k, W_v = kv_weights(i)
    C = stats.second_moments[i]
    if settings.latent == "joint":
        (r,) = ranks
        f = _joint_factorize(W_k, W_v, C, r, settings)
        W_hat, m_k = f.weight(), W_k.shape[1]
        row = {"layer": i, "kv_rank": r, "k_rel_error": _relative_error(W_k, W_hat[:, :m_k], C),
               "v_rel_error": _relative_error(W_v, W_hat[:, m_k:], C)}
        return LayerLatent((f,)), row
    fk, fv = (_factorize(settings.method, W, C, stats.abs_means[i], r, settings) for W, r in zip((W_k, W_v), ranks))
    row = {"layer": i, "k_rank": fk.rank, "v_rank": fv.rank, "k_rel_error": _relative_error(W_k, fk.weight(), C),
           "v_rel_error": _relative_error(W_v, fv.weight(), C)}
    return LayerLatent((fk, fv)), row


def plan_latents(model, stats: CalibrationStats, settings: ConvertSettings) -> tuple[list[LayerLatent], list[dict]]:
    """Factors of every layer of an in-memory `model` at the budgeted ranks, and the per-layer table."""
    weights = [_kv_weights(layer) for layer in model.model.layers]
    ranks = plan_ranks(model.config, weights.__getitem__, stats, settings)
    planned = [layer_latent(i, r, weights.__getitem__, stats, settings) for i, r in enumerate(ranks)]
    return [p[0] for p in planned], [p[1] for p in planned]


def plan_decoupled(model, stats: CalibrationStats, settings: ConvertSettings):
    """(RopeSplit, MlaLayout, per-layer table) of the decoupled-RoPE layout at the asked budget.

    The cache per token and layer is ``round(kv_fraction·2·g·d)``: ``qk_rope_head_dim`` RoPE
    numbers (``--rope-dim``, else `deepseek.default_rope_dim`) shared by all layers, the rest
    the latent, whose width is uniform or spread by the adjusted rule over the whitened spectra
    of each layer's [un-rotated K, V]. The parity budget with every key pair in RoPE is the
    exact layout (latent = V, no allocation to make).
    """
    config = model.config
    g, d = config.num_key_value_heads, head_dim(config)
    kv_lora_rank, rope = deepseek.split_budget(
        num_kv_heads=g, head_dim_=d, hidden_size=config.hidden_size, kv_lora_rank=None,
        qk_rope_head_dim=settings.rope_dim, kv_fraction=settings.kv_fraction, portable=settings.portable,
    )
    exact = rope == g * d and kv_lora_rank == g * d
    if settings.portable:
        deepseek.check_portable(model)
    split = deepseek.plan_rope_split(
        model, stats, qk_rope_head_dim=rope, exact=exact, rope_strategy=settings.rope_strategy,
        rope_context=settings.rope_context, portable=settings.portable,
    )
    kw = {"whitening": settings.whitening, "damping": settings.damping, "balance_kv": settings.balance_kv}
    layers = config.num_hidden_layers
    if exact or settings.allocation == "uniform":
        ranks = [kv_lora_rank] * layers
    else:
        cap = min(2 * g * d, config.hidden_size)
        r_min = max(1, math.floor(settings.rank_min_ratio * kv_lora_rank))
        r_max = min(cap, math.ceil(settings.rank_max_ratio * kv_lora_rank))
        ranks = allocation.adjusted_ranks(deepseek.latent_spectra(split, **kw), kv_lora_rank * layers,
                                          r_min=r_min, r_max=r_max, score=settings.allocation_score)
    layout = deepseek.mla_layout(split, ranks, **kw)
    kept = layout.summary()["kept_rope_energy"] or [1.0] * layers
    table = []
    for i, e in enumerate(layout.layers):
        W_v, C = split.weights[i][4], stats.second_moments[i] if stats is not None else None
        row = {"layer": i, "kv_rank": e.rank, "rope_kept_energy": kept[i]}
        if C is not None:
            k_rest = split.rest_key(i)
            row["k_nope_rel_error"] = _relative_error(k_rest, e.kv_latent @ e.up_k.reshape(e.rank, -1), C) if layout.qk_nope_head_dim else 0.0
            row["v_rel_error"] = _relative_error(W_v, e.kv_latent @ e.up_v.reshape(e.rank, -1), C)
        table.append(row)
    return split, layout, table


def build_converted(model, stats: CalibrationStats, settings: ConvertSettings) -> tuple[torch.nn.Module, dict]:
    """The converted model in the asked format, and the report fields that describe it."""
    if settings.latent == "decoupled":
        split, layout, table = plan_decoupled(model, stats, settings)
        logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(table))
        fields = {"ranks": [[r] for r in layout.kv_lora_ranks], "layers": table, "mla": layout.summary()}
        if settings.format == "deepseek":
            converted = deepseek.layout_to_deepseek(model, layout, split.inv_freq, split.source_rope,
                                                    portable=settings.portable)
            support = converted.care_export["runtime_support"]
            fields["runtime_support"] = {"transformers": support.transformers, "vllm_sglang": support.vllm_sglang,
                                         "reasons": list(support.reasons)}
            fields["mla"]["residual_scale"] = converted.care_export["residual_scale"]
        else:
            converted = build_decoupled_model(model, layout)
        return converted, fields
    latents, table = plan_latents(model, stats, settings)
    logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(table))
    return build_latent_model(model, latents), {"ranks": [l.ranks for l in latents], "layers": table}


def format_layer_table(table: list[dict]) -> str:
    """Plain-text table of the per-layer rows of `plan_latents`."""
    keys = [k for k in table[0] if k != "layer"]
    lines = ["layer " + " ".join(f"{k:>12s}" for k in keys)]
    for row in table:
        cells = (f"{row[k]:12d}" if isinstance(row[k], int) else f"{row[k]:12.4g}" for k in keys)
        lines.append(f"{row['layer']:5d} " + " ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it")


@contextmanager
def atomic_output(out: Path, overwrite: bool):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- evaluation


def original_perplexity(model, model_path: str, windows: torch.Tensor, settings: ConvertSettings, dtype) -> float:
    """Perplexity of the unconverted model, remembered per (model, windows, dtype) in the cache folder."""
    h = hashlib.sha256(_model_fingerprint(model_path))
    h.update(windows.numpy().tobytes())
    h.update(str(dtype).encode())
    memo = assets.resolve_cache_dir(settings.cache_dir) / "ppl" / f"{h.hexdigest()[:20]}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["ppl"]
    ppl = perplexity(model, windows, batch_size=settings.batch_size, progress=settings.progress)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"ppl": ppl, "model": model_path}))
    tmp.replace(memo)
    return ppl


def evaluate_pair(original, converted, tokenizer, model_path: str, settings: ConvertSettings, dtype) -> dict:
    windows, text_path = load_windows(
        tokenizer, settings.eval_text, "evaluation", settings.eval_samples, settings.eval_seq_len
    )
    probe = windows[:1, :32]
    return {
        "ppl": {
            "original": original_perplexity(original, model_path, windows, settings, dtype),
            "converted": perplexity(converted, windows, batch_size=settings.batch_size, progress=settings.progress),
        },
        "kv_bytes_per_token": {
            "original": kv_bytes_per_token(original.config, dtype),
            "converted": kv_bytes_per_token(converted.config, dtype),
            "original_measured": measured_kv_bytes_per_token(original, probe),
            "converted_measured": measured_kv_bytes_per_token(converted, probe),
        },
        "evaluation": {"text": str(text_path), "samples": settings.eval_samples, "seq_len": settings.eval_seq_len},
    }


def zero_shot_pair(original, converted, tokenizer, settings: ConvertSettings) -> dict:
    """Zero-shot accuracy (lm-eval) of the original and the converted model on `settings.zero_shot_tasks`."""
    from .zeroshot import evaluate_zero_shot

    kw = dict(text=settings.eval_text, limit=settings.zero_shot_limit, batch_size=settings.batch_size,
              cache_dir=settings.cache_dir)
    return {name: evaluate_zero_shot(m, tokenizer, settings.zero_shot_tasks, **kw)
            for name, m in (("original", original), ("converted", converted))}


# ----------------------------------------------------------------------------- API


def convert(settings: ConvertSettings) -> dict:
    """Convert `settings.model` and write the latent-cache model with its report to `settings.out`.

    Returns the report (also written as report.json). The input model is never modified.
    Separate and joint latents are converted layer by layer from the checkpoint (`layerwise`)
    unless ``settings.layerwise`` is False; decoupled layouts load the model whole.
    """
    out = Path(settings.out)
    check_output(out, settings.overwrite)  # fail before any work
    if settings.evaluate and settings.zero_shot_tasks:
        from .zeroshot import _import_lm_eval

        _import_lm_eval()  # a missing lm-eval is said now, not after the conversion
    device = resolve_device(settings.device)
    dtype = torch_dtype(settings.dtype, device)
    if settings.layerwise and settings.latent != "decoupled":
        reader = _checkpoint_reader(settings.model)
        if reader is not None:
            return _convert_layerwise(settings, reader, device, dtype)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model, tokenizer, model_path = load_model(settings.model, dtype, device)
    get_family(model.config)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = calibrate(model, tokenizer, model_path, settings)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    converted, fields = build_converted(model, stats, settings)
    timings["factorize_and_build"] = time.perf_counter() - t

    report = _report_head(model_path, model.config, converted.config, type(converted).__name__, fields, stats,
                          settings, dtype, device, loading="whole")
    if settings.evaluate:
        _evaluate_into(report, timings, model, converted, tokenizer, model_path, settings, dtype)

    t = time.perf_counter()
    with atomic_output(out, settings.overwrite) as tmp:
        if settings.format == "care_mla":
            from .layerwise import save_latent_model

            save_latent_model(tmp, converted)  # the same files the layer-by-layer path streams
        else:
            converted.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        settings.save(tmp / SETTINGS_FILE)
        timings["save"] = time.perf_counter() - t
        _finish_report(report, timings, tmp)
    return report


def _checkpoint_reader(spec: str) -> CheckpointReader | None:
    """A reader of the model's safetensors folder, or None (logged) when it must be loaded whole."""
    path = Path(resolve_model_path(spec))
    if not path.is_dir():
        logger.info("%s is not a local folder: loading it whole (layer by layer needs its safetensors files)", spec)
        return None
    try:
        return CheckpointReader(path)
    except CheckpointFormatError as err:
        logger.warning("loading the whole model: %s", err)
        return None


def _convert_layerwise(settings: ConvertSettings, reader: CheckpointReader, device: torch.device,
                       dtype: torch.dtype) -> dict:
    """`convert` with one decoder layer in memory at a time: statistics, rank plan and output streamed."""
    from .layerwise import kv_weights_reader, write_latent_model

    timings: dict[str, float] = {}
    t = time.perf_counter()
    model_path = str(reader.folder)
    try:
        config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model {settings.model!r}: {str(err).splitlines()[0]}") from err
    get_family(config)
    generation_config = _generation_config(model_path)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = calibrate(None, tokenizer, model_path, settings, reader=reader)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    kv_weights = kv_weights_reader(reader, dtype)
    ranks = plan_ranks(config, kv_weights, stats, settings)
    latent_config = CareMlaConfig.from_base(config, kv_latent=settings.latent, kv_lora_ranks=ranks)
    table: list[dict] = []

    def latent_of(i: int) -> LayerLatent:
        latent, row = layer_latent(i, ranks[i], kv_weights, stats, settings)
        table.append(row)
        return latent

    out = Path(settings.out)
    with atomic_output(out, settings.overwrite) as tmp:
        write_latent_model(tmp, reader, latent_config, latent_of, dtype=dtype, generation_config=generation_config,
                           progress=settings.progress)
        tokenizer.save_pretrained(tmp)
        settings.save(tmp / SETTINGS_FILE)
        timings["factorize_and_save"] = time.perf_counter() - t
        logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(table))
        fields = {"ranks": ranks, "layers": table}
        report = _report_head(model_path, config, latent_config, "CareMlaForCausalLM", fields, stats, settings, dtype,
                              device, loading="layerwise")
        report["peak_rss_mb_conversion"] = round(peak_rss_mb(), 1)
        if settings.evaluate:
            original = load_model(model_path, dtype, device)[0]
            converted = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
            _evaluate_into(report, timings, original, converted, tokenizer, model_path, settings, dtype)
            del original, converted
        _finish_report(report, timings, tmp)
    return report


def _generation_config(model_path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return None


def _report_head(model_path: str, config, converted_config, architecture: str, fields: dict,
                 stats: CalibrationStats, settings: ConvertSettings, dtype, device, *, loading: str) -> dict:
    """The report's description of a conversion (what was built from what, and how)."""
    return {
        "model": model_path,
        "format": settings.format,
        "architecture": architecture,
        "method": settings.method,
        "allocation": settings.allocation,
        "latent": settings.latent,
        "kv_fraction": settings.kv_fraction,
        "kv_cache_width_per_layer": {
            "original": gqa_kv_width(config),
            "converted": kv_cache_width(converted_config) / converted_config.num_hidden_layers,
        },
        **fields,
        "calibration": {
            "text": stats.meta.get("text", settings.calib_text),
            "samples": settings.calib_samples,
            "seq_len": settings.calib_seq_len,
            "tokens": stats.num_tokens,
            "dtype": stats.meta.get("dtype"),
            "statistics": stats.meta.get("cache_file"),
        },
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "loading": loading,
    }


def _evaluate_into(report: dict, timings: dict, original, converted, tokenizer, model_path: str,
                   settings: ConvertSettings, dtype) -> None:
    t = time.perf_counter()
    report.update(evaluate_pair(original, converted, tokenizer, model_path, settings, dtype))
    report["ppl"]["ratio"] = report["ppl"]["converted"] / report["ppl"]["original"]
    timings["evaluate"] = time.perf_counter() - t
    if settings.zero_shot_tasks:
        t = time.perf_counter()
        report["zero_shot"] = zero_shot_pair(original, converted, tokenizer, settings)
        timings["zero_shot"] = time.perf_counter() - t


def _finish_report(report: dict, timings: dict, folder: Path) -> None:
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def evaluate_folder(path: str, *, eval_text: str = "austen", eval_samples: int = 64, eval_seq_len: int = 256,
                    dtype: str = "float32", device: str = "auto", batch_size: int = 8, progress: bool = True) -> dict:
    """Held-out perplexity and KV bytes per token of a saved model (converted or original)."""
    dev = resolve_device(device)
    dt = torch_dtype(dtype, dev)
    model, tokenizer, model_path = load_model(path, dt, dev)
    windows, text_path = load_windows(tokenizer, eval_text, "evaluation", eval_samples, eval_seq_len)
    return {
        "model": model_path,
        "ppl": perplexity(model, windows, batch_size=batch_size, progress=progress),
        "kv_bytes_per_token": kv_bytes_per_token(model.config, dt),
        "kv_bytes_per_token_measured": measured_kv_bytes_per_token(model, windows[:1, :32]),
        "evaluation": {"text": str(text_path), "samples": eval_samples, "seq_len": eval_seq_len},
        "dtype": str(dt).removeprefix("torch."),
    }
