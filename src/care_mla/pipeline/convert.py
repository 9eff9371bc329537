"""Conversion pipeline: load → calibrate → allocate ranks → factorize → build → evaluate → save.

Orchestration only: the maths lives in `factorization` and `allocation`, the statistics in
`calibration`, the model in `modeling_care_mla`. `convert(settings)` is the Python API the
CLI calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from care_mla.evaluation.perplexity import (
    check_finite_ppl,
    kv_bytes_per_token,
    kv_cache_width,
    measured_kv_bytes_per_token,
    perplexity,
)
from care_mla.formats import deepseek
from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.families import get_family, gqa_kv_width, head_dim
from care_mla.formats.mapping import LayerLatent, build_decoupled_model, build_latent_model, decoupled_config
from care_mla.io import assets
from care_mla.io.checkpoint import CheckpointFormatError, CheckpointReader, check_finite
from care_mla.io.fingerprint import model_digest
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.io.text import check_text_file, load_windows, resolve_text, user_text
from care_mla.method import allocation, factorization
from care_mla.pipeline.calibration import CalibrationCacheError, CalibrationStats, collect_statistics
from care_mla.settings import ConvertSettings, SettingsError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "care_mla_settings.json"
#: Version of the cached statistics (2: second moments stored in float32; 3: keyed by content); part of the key.
STATS_FORMAT = 3
REPORT_FILE = "report.json"


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names the fix."""


class EvaluationError(RuntimeError):
    """The converted model was written but its evaluation failed; the message says how to re-run it alone."""


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
    """A dtype name as torch's; "auto" is the fastest numerically safe dtype of `device` for evaluation (measured
    on CPUs, `hardware.resolve_auto_dtype`; bf16 on CUDA where supported, else fp16)."""
    if name == "auto":
        return auto_dtype(device, "evaluation")[0]
    return getattr(torch, name)


def auto_dtype(device: torch.device, step: str, config=None, *, tokens: int = 512,
               cache_dir: str | None = None) -> tuple[torch.dtype, dict]:
    """(dtype, what it was chosen from) for the forward passes of `step` on `device`: a GEMM probe at the shapes
    of `config`'s decoder layer (default shapes without one), cached per machine and torch version."""
    from care_mla.io import hardware

    shapes = hardware.DEFAULT_SHAPES
    if config is not None:
        kv = config.num_key_value_heads * head_dim(config)
        shapes = hardware.gemm_shapes(config.hidden_size, kv, config.intermediate_size, tokens=min(512, tokens))
    return hardware.resolve_auto_dtype(device, shapes=shapes, cache_dir=assets.resolve_cache_dir(cache_dir),
                                       step=step)


def calib_dtype(settings: ConvertSettings, config, device: torch.device,
                model_dtype: torch.dtype) -> tuple[torch.dtype, dict | None]:
    """The dtype of the calibration forward passes, and the hardware facts behind an "auto" choice."""
    if settings.calib_dtype == "same":
        return model_dtype, None
    if settings.calib_dtype == "auto":
        return auto_dtype(device, "calibration", config, tokens=settings.batch_size * settings.calib_seq_len,
                          cache_dir=settings.cache_dir)
    return getattr(torch, settings.calib_dtype), None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda was asked for but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def load_model(spec: str, dtype: torch.dtype, device: torch.device,
               max_memory: dict[int | str, int] | None = None):
    """(model, tokenizer, resolved path) on `device`, or spread by accelerate (``device_map="auto"``) over the
    devices of `max_memory`. The files on disk are only read."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _from_pretrained(path, dtype, device, max_memory)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {spec!r}: {str(err).splitlines()[0]} — pass a local model folder "
            f"(or {assets.DEFAULT_MODEL!r}); hub ids need network access or a populated HF cache"
        ) from err
    return model, tokenizer, path


def _from_pretrained(path, dtype: torch.dtype, device: torch.device, max_memory: dict | None):
    if max_memory:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


# ----------------------------------------------------------------------------- calibration


def _model_fingerprint(model_path: str, cache_root: Path) -> bytes:
    """Identity of a model folder by content (`fingerprint.model_digest`, digests remembered per file)."""
    return bytes.fromhex(model_digest(model_path, cache_root / "hashes"))


def _fingerprint(model_path: str, text_path: Path, settings: ConvertSettings, dtype: torch.dtype,
                 cache_root: Path) -> str:
    """Key of the calibration cache: content of the model files and of the text, calibration shape and dtype."""
    h = hashlib.sha256(_model_fingerprint(model_path, cache_root))
    h.update(hashlib.sha256(text_path.read_bytes()).digest())
    h.update(f"{settings.calib_samples}x{settings.calib_seq_len}:{dtype}:{STATS_FORMAT}".encode())
    return h.hexdigest()


def calibrate(model, tokenizer, model_path: str, settings: ConvertSettings, *,
              reader: CheckpointReader | None = None) -> CalibrationStats:
    """Statistics from the cache when this model, text and shape were calibrated before, else collected.

    The forward passes run in `settings.calib_dtype` ("auto" by default: the fastest numerically safe
    dtype of this machine, measured — bf16 where native, fp32 on AVX2-only CPUs; the statistics are
    accumulated in fp32/fp64 either way). With a `reader` (`model` is then None)
    the layers are read from the checkpoint one at a time in that dtype; otherwise a second copy
    of the model is loaded in it when it differs from the model's.
    """
    if reader is not None:
        device = resolve_device(settings.device)
        model_dtype = torch_dtype(settings.dtype, device)
        config = AutoConfig.from_pretrained(model_path)
    else:
        device, model_dtype = next(model.parameters()).device, next(model.parameters()).dtype
        config = model.config
    dtype, hardware_info = calib_dtype(settings, config, device, model_dtype)
    stats = _calibrate(model, tokenizer, model_path, settings, reader, device, dtype, config, model_dtype)
    stats.meta["hardware"] = hardware_info or {"step": "calibration", "dtype": str(dtype).removeprefix("torch."),
                                               "reason": f"--calib-dtype {settings.calib_dtype}"}
    stats.meta["hardware"]["threads"] = torch.get_num_threads()
    return stats


def _calibrate(model, tokenizer, model_path: str, settings: ConvertSettings, reader, device, dtype,
               config, model_dtype) -> CalibrationStats:
    cache_root = assets.resolve_cache_dir(settings.cache_dir)
    text_path = resolve_text(settings.calib_text, "calibration")
    key = _fingerprint(model_path, text_path, settings, dtype, cache_root)
    cache = cache_root / "calibration" / f"{key[:20]}.safetensors"
    if cache.is_file():  # checked before tokenising: the statistics are all that is needed
        try:
            stats = CalibrationStats.load(cache, key=key)
        except CalibrationCacheError as err:
            logger.warning("ignoring the cached calibration statistics: %s; calibrating again", err)
        else:
            logger.info("calibration statistics from %s", cache)
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
        "key": key,
    }
    resume = cache.with_name(cache.stem + ".partial.safetensors")  # layers done so far, if a run was killed
    if reader is not None:
        from care_mla.pipeline.layerwise import collect_statistics_layerwise

        stats = collect_statistics_layerwise(reader, config, windows, dtype=dtype,
                                             device=device, batch_size=settings.batch_size,
                                             progress=settings.progress, meta=meta,
                                             max_memory=settings.max_memory_map, resume=resume)
    else:
        runner = model if dtype == model_dtype else load_model(model_path, dtype, device, settings.max_memory_map)[0]
        stats = collect_statistics(runner, windows, batch_size=settings.batch_size, progress=settings.progress,
                                   meta=meta, resume=resume)
        del runner
    stats.save(cache, key=key)
    resume.unlink(missing_ok=True)
    stats.meta["cache_file"] = str(cache)
    return stats


# ----------------------------------------------------------------------------- ranks and factors


def _factorize(method: str, W, C, abs_mean, rank: int, s: ConvertSettings,
               weighting: factorization.Weighting | None = None, cross: torch.Tensor | None = None) -> factorization.Factors:
    if method == "care":
        return factorization.care_factorize(W, C, rank, method=s.whitening, damping=s.damping, weighting=weighting,
                                            cross=cross)
    if method == "svd":
        return factorization.svd_factorize(W, rank)
    if method == "asvd":
        return factorization.asvd_factorize(W, abs_mean, rank)
    if method == "svd-llm":
        return factorization.svd_llm_factorize(W, C, rank)
    if method == "transmla":
        return factorization.transmla_factorize(W, C, rank)
    raise SettingsError(f"--method {method} builds no separate K and V latents")


def _joint_factorize(W_k, W_v, C, rank: int, s: ConvertSettings, weights: dict | None = None) -> factorization.Factors:
    """One K/V latent of rank `rank` (K columns of `up` first) by the joint-capable `s.method`; `weights`: the
    attention-aware weightings of care (`attention_weights`)."""
    if s.method == "care":
        return factorization.joint_factorize(
            W_k, W_v, C, rank, balance=s.balance_kv, method=s.whitening, damping=s.damping,
            key_emphasis=s.key_emphasis, **(weights or {}),
        )[0]
    if s.method == "mha2mla":
        return factorization.mha2mla_factorize(W_k, W_v, rank)[0]
    if s.method == "transmla":
        return factorization.transmla_joint_factorize(W_k, W_v, C, rank, balance=s.balance_kv)[0]
    raise SettingsError(f"--method {s.method} builds no joint latent")


def _kv_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    return attn.k_proj.weight.detach().T.float().cpu(), attn.v_proj.weight.detach().T.float().cpu()


def _qo_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q (D, n·d), W_o (n·d, D)) of a decoder layer, float32 on the CPU: what the attention objective reads."""
    attn = layer.self_attn
    return attn.q_proj.weight.detach().T.float().cpu(), attn.o_proj.weight.detach().T.float().cpu()


def attention_weights(config, qo_weights: QoWeights | None, i: int, C: torch.Tensor,
                      settings: ConvertSettings) -> dict:
    """The weightings of `settings.objective` for one layer (`objectives`): ``{"key_weight", "value_weight"}``
    for "attention", ``{"value_weight"}`` for "value", {} for "activation"."""
    if settings.objective == "activation":
        return {}
    if settings.objective == "auto" or settings.key_emphasis == "auto":
        raise ValueError("resolve the 'auto' objective first (choose_settings)")
    if qo_weights is None:
        raise ValueError("the attention objective needs the layer's q_proj and o_proj weights")
    from care_mla.method.objectives import attention_weightings

    W_q, W_o = (w.to(C.device) for w in qo_weights(i))
    k, v = attention_weightings(W_q, W_o, C, num_heads=config.num_attention_heads,
                                num_kv_heads=config.num_key_value_heads, head_dim=head_dim(config))
    return {"key_weight": k, "value_weight": v} if settings.objective == "attention" else {"value_weight": v}


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
QoWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index → (W_q (D, n·d), W_o (n·d, D))


def plan_ranks(config, kv_weights: KvWeights, stats: CalibrationStats, settings: ConvertSettings,
               qo_weights: QoWeights | None = None) -> list[list[int]]:
    """Per-layer latent ranks at the asked budget: ``[k, v]`` per layer for separate latents, ``[kv]`` for joint.

    Uniform needs no weights; adjusted reads each layer's K/V weights once for its spectrum.
    """
    layers = config.num_hidden_layers
    budget = rank_budget(config, settings)
    if settings.allocation == "uniform":
        ranks = choose_ranks([], budget, settings)
        return [[r] if settings.latent == "joint" else [r, r] for r in ranks]
    bar = tqdm(range(layers), desc="spectra for the rank plan", unit="layer", disable=not settings.progress)
    if settings.latent == "joint":
        spectra = []
        for i in bar:
            W_k, W_v, C, _ = _layer_inputs(i, kv_weights, stats, settings)
            weights = attention_weights(config, qo_weights, i, C, settings)
            spectra.append(_joint_factorize(W_k, W_v, C, 0, settings, weights).spectrum.cpu())
        return [[r] for r in choose_ranks(spectra, budget, settings)]
    spectra: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    for i in bar:
        W_k, W_v, C, abs_mean = _layer_inputs(i, kv_weights, stats, settings)
        weights = attention_weights(config, qo_weights, i, C, settings)
        for name, W in zip(("k", "v"), (W_k, W_v)):
            f = _factorize(settings.method, W, C, abs_mean, 0, settings, weights.get(f"{_BRANCH[name]}_weight"))
            spectra[name].append(f.spectrum.cpu())
    k, v = (choose_ranks(spectra[name], budget, settings) for name in ("k", "v"))
    return [list(pair) for pair in zip(k, v)]


_BRANCH = {"k": "key", "v": "value"}


def layer_latent(i: int, ranks: list[int], kv_weights: KvWeights, stats: CalibrationStats,
                 settings: ConvertSettings, qo_weights: QoWeights | None = None,
                 config=None, moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[LayerLatent, dict]:
    """Layer i's factors at `ranks` (from `plan_ranks`) and its row of the per-layer table (ranks, relative errors).

    The factorization runs on the conversion's device (`_layer_inputs`); the factors are returned on the CPU.
    The attention objective needs `qo_weights` and the model's `config`. `moments` = (C̃, X̃ᵀX/N) of error
    compensation (`compensation`) replace the layer's calibration statistics (errors are then relative to C̃).
    """
    W_k, W_v, C, abs_mean = _layer_inputs(i, kv_weights, stats, settings)
    cross = None
    if moments is not None:
        C, cross = (m.to(C.device) for m in moments)
    weights = attention_weights(config, qo_weights, i, C, settings)
    if cross is not None:
        weights = {**weights, "cross": cross}
    if settings.latent == "joint":
        (r,) = ranks
        f = _joint_factorize(W_k, W_v, C, r, settings, weights)
        W_hat, m_k = f.weight(), W_k.shape[1]
        row = {"layer": i, "kv_rank": r, "k_rel_error": _relative_error(W_k, W_hat[:, :m_k], C),
               "v_rel_error": _relative_error(W_v, W_hat[:, m_k:], C)}
        return LayerLatent((_to_cpu(f),)), row
    fk, fv = (_factorize(settings.method, W, C, abs_mean, r, settings, weights.get(f"{_BRANCH[b]}_weight"), cross)
              for b, W, r in zip("kv", (W_k, W_v), ranks))
    row = {"layer": i, "k_rank": fk.rank, "v_rank": fv.rank, "k_rel_error": _relative_error(W_k, fk.weight(), C),
           "v_rel_error": _relative_error(W_v, fv.weight(), C)}
    return LayerLatent((_to_cpu(fk), _to_cpu(fv))), row


@dataclass(frozen=True)
class Compensation:
    """How error compensation runs its two hidden-state streams: over the calibration `windows` (N, T), in
    `dtype` on `device`."""

    windows: torch.Tensor
    dtype: torch.dtype
    device: torch.device


#: (layer index, (C̃, X̃ᵀX/N)) → (the layer's factors or layout, its table row, its converted tensors)
FitLayer = Callable[[int, tuple[torch.Tensor, torch.Tensor]], tuple[object, dict, dict[str, torch.Tensor]]]


def compensated_layers(config, target, model_class: type, fit: FitLayer, layer_state: Callable[[int], dict],
                       embedding: torch.Tensor, compensation: Compensation,
                       settings: ConvertSettings) -> tuple[list, list[dict]]:
    """Every layer made in turn while the converted stream runs (`compensation.sequential_moments`): the
    original stream runs `config`'s layers (tensors from `layer_state`), the converted one
    `model_class(target)`'s. With ``settings.compensate`` ``fit`` gets the compensated moments, else None
    (the plain factors); with ``settings.refit_output`` the layer's ``o_proj`` is then refitted
    (`compensation.refit_output_weight`) and set as the product's ``o_weight``. Returns each layer's product
    and table row, with the hidden-state drift after it (and the attention output's relative error before and
    after the refit)."""
    from care_mla.method.compensation import output_refit_error, refit_output_weight, sequential_moments
    from care_mla.pipeline.layerwise import skeleton

    products, rows = [], []

    def convert_layer(i: int, moment: torch.Tensor, cross: torch.Tensor) -> dict[str, torch.Tensor]:
        product, row, state = fit(i, (moment, cross) if settings.compensate else None)
        products.append(product)
        rows.append(row)
        return state

    def refit_output(i: int, outputs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        before = state["self_attn.o_proj.weight"]
        weight = refit_output_weight(outputs, before, settings.damping).cpu()
        rows[i]["o_error"] = output_refit_error(outputs, before)
        rows[i]["o_refit_error"] = output_refit_error(outputs, weight)
        products[i] = dataclasses.replace(products[i], o_weight=weight)
        return {**state, "self_attn.o_proj.weight": weight.to(before.dtype)}

    c = compensation
    drift = sequential_moments(skeleton(config, c.device), skeleton(target, c.device, model_class), layer_state,
                               convert_layer, c.windows, embedding=embedding, dtype=c.dtype, device=c.device,
                               batch_size=settings.batch_size, progress=settings.progress,
                               refit_output=refit_output if settings.refit_output else None)
    for row, d in zip(rows, drift):
        row["drift"] = d  # relative error of the converted hidden states after this layer
    return products, rows


def compensated_latents(config, ranks: list[list[int]], kv_weights: KvWeights, qo_weights: QoWeights,
                        layer_state: Callable[[int], dict], embedding: torch.Tensor, compensation: Compensation,
                        stats: CalibrationStats, settings: ConvertSettings) -> tuple[list[LayerLatent], list[dict]]:
    """Every layer's joint or separate latent factors (and table rows) at `ranks`, made on the converted stream
    (error compensation and/or output refit, as `settings` say)."""
    from care_mla.formats.mapping import latent_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM

    def fit(i: int, moments: tuple[torch.Tensor, torch.Tensor]):
        latent, row = layer_latent(i, ranks[i], kv_weights, stats, settings, qo_weights, config, moments=moments)
        return latent, row, latent_layer_state(layer_state(i), latent)

    target = CareMlaConfig.from_base(config, kv_latent=settings.latent, kv_lora_ranks=ranks)
    return compensated_layers(config, target, CareMlaForCausalLM, fit, layer_state, embedding, compensation, settings)


def compensated_layouts(config, split: deepseek.RopeSplit, ranks: list[int], layer_state: Callable[[int], dict],
                        embedding: torch.Tensor, compensation: Compensation, stats: CalibrationStats,
                        settings: ConvertSettings) -> tuple[list[deepseek.LayerLayout], list[dict]]:
    """Every layer's decoupled-RoPE layout (and table rows) at `ranks`, made on the converted stream (error
    compensation and/or output refit, as `settings` say), each kept without its query and output tensors but
    a refitted ``o_weight`` (complete it with `completed_layout`: they are copies of the source's, and all
    layers are fitted before any is written). The converted stream runs the decoupled latent model,
    which computes what the DeepSeek export does (without the export's residual scale), so one pass serves
    both formats."""
    from care_mla.formats.mapping import decoupled_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM

    def fit(i: int, moments: tuple[torch.Tensor, torch.Tensor]):
        e, row = decoupled_layer(split, i, ranks[i], stats, settings, moments=moments)
        state = decoupled_layer_state(layer_state(i), e, qk_rope_head_dim=split.qk_rope_head_dim,
                                      rope_attention_scaling=split.rope_scaling)
        return dataclasses.replace(e, q=None, o_weight=None, o_bias=None), row, state

    target = decoupled_config(config, split, ranks)
    return compensated_layers(config, target, CareMlaForCausalLM, fit, layer_state, embedding, compensation, settings)


def completed_layout(split: deepseek.RopeSplit, i: int, e: deepseek.LayerLayout) -> deepseek.LayerLayout:
    """A layout kept slim by `compensated_layouts` with its query and output tensors again (a refitted
    ``o_weight`` stays)."""
    tensors = deepseek.query_tensors(split, i)
    if e.o_weight is not None:
        del tensors["o_weight"]
    return dataclasses.replace(e, **tensors)


def _layer_inputs(i: int, kv_weights: KvWeights, stats: CalibrationStats, settings: ConvertSettings):
    """(W_k, W_v, C, mean |x|) of layer i on the conversion's device, so a GPU run factorizes there too instead
    of waiting on CPU SVDs (not timed: no GPU was available); on the CPU nothing moves."""
    device = resolve_device(settings.device)
    W_k, W_v = kv_weights(i)
    return (W_k.to(device), W_v.to(device), stats.second_moments[i].to(device), stats.abs_means[i].to(device))


def _to_cpu(f: factorization.Factors) -> factorization.Factors:
    return dataclasses.replace(f, down=f.down.cpu(), up=f.up.cpu(), spectrum=f.spectrum.cpu())


def plan_latents(model, stats: CalibrationStats, settings: ConvertSettings,
                 windows: torch.Tensor | None = None) -> tuple[list[LayerLatent], list[dict]]:
    """Factors of every layer of an in-memory `model` at the budgeted ranks, and the per-layer table; with
    ``settings.sequential_fit``, made layer after layer on the calibration `windows` (`compensated_latents`)."""
    weights = [_kv_weights(layer) for layer in model.model.layers]
    qo = [_qo_weights(layer) for layer in model.model.layers]
    ranks = plan_ranks(model.config, weights.__getitem__, stats, settings, qo.__getitem__)
    if settings.sequential_fit:
        return compensated_latents(model.config, ranks, weights.__getitem__, qo.__getitem__,
                                   deepseek.module_layer_state(model), model.model.embed_tokens.weight.detach(),
                                   _in_memory_compensation(model, windows, settings), stats, settings)
    planned = [layer_latent(i, r, weights.__getitem__, stats, settings, qo.__getitem__, model.config)
               for i, r in enumerate(ranks)]
    return [p[0] for p in planned], [p[1] for p in planned]


def _in_memory_compensation(model, windows: torch.Tensor | None, settings: ConvertSettings) -> Compensation:
    """The two streams of an in-memory model run in the calibration's dtype, as the layer-by-layer path's do
    (so both write the same bytes)."""
    if windows is None:
        raise ValueError("error compensation and output refit run the calibration windows through the model: "
                         "pass them (windows=), or set compensate=False, refit_output=False")
    parameter = next(model.parameters())
    dtype = calib_dtype(settings, model.config, parameter.device, parameter.dtype)[0]
    return Compensation(windows, dtype, parameter.device)


def plan_decoupled(model, stats: CalibrationStats, settings: ConvertSettings, *,
                   layer_state: "deepseek.LayerState | None" = None, dtype: torch.dtype | None = None,
                   split: deepseek.RopeSplit | None = None) -> tuple[deepseek.RopeSplit, list[int]]:
    """(RopeSplit, per-layer latent ranks) of the decoupled-RoPE layout at the asked budget.

    The cache per token and layer is ``round(kv_fraction·2·g·d)``: ``qk_rope_head_dim`` RoPE
    numbers (``--rope-dim``, else `deepseek.default_rope_dim`) shared by all layers, the rest
    the latent, whose width is uniform or spread by the adjusted rule over the whitened spectra
    of each layer's [un-rotated K, V]. The parity budget with every key pair in RoPE is the
    exact layout (latent = V, no allocation to make). `model` may be a meta-device skeleton
    whose layers `layer_state` reads (in `dtype`) from the checkpoint.
    """
    config = model.config
    kv_lora_rank, rope, exact = deepseek.export_budget(config, qk_rope_head_dim=settings.rope_dim,
                                                       kv_fraction=settings.kv_fraction, portable=settings.portable)
    if settings.portable:
        deepseek.check_portable(config)
    if split is None:  # given: the candidates of an objective choice share one (it does not depend on the objective)
        split = deepseek.plan_rope_split(
            model, stats, qk_rope_head_dim=rope, exact=exact, rope_strategy=settings.rope_strategy,
            rope_context=settings.rope_context, portable=settings.portable, layer_state=layer_state, dtype=dtype,
        )
    layers = config.num_hidden_layers
    if exact or settings.allocation == "uniform":
        return split, [kv_lora_rank] * layers
    g, d = config.num_key_value_heads, head_dim(config)
    cap = min(2 * g * d, config.hidden_size)
    r_min = max(1, math.floor(settings.rank_min_ratio * kv_lora_rank))
    r_max = min(cap, math.ceil(settings.rank_max_ratio * kv_lora_rank))
    spectra = deepseek.latent_spectra(split, **_decoupled_kw(settings), progress=settings.progress)
    ranks = allocation.adjusted_ranks(spectra, kv_lora_rank * layers, r_min=r_min, r_max=r_max,
                                      score=settings.allocation_score)
    return split, ranks


def _decoupled_kw(settings: ConvertSettings) -> dict:
    return {"whitening": settings.whitening, "damping": settings.damping, "balance_kv": settings.balance_kv,
            "objective": settings.objective, "key_emphasis": settings.key_emphasis}


def decoupled_layer(split: deepseek.RopeSplit, i: int, rank: int, stats: CalibrationStats | None,
                    settings: ConvertSettings, moments: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[deepseek.LayerLayout, dict]:
    """Layer i's decoupled-RoPE tensors at `rank` and its row of the per-layer table (rank, kept RoPE energy, errors);
    `moments` = (C̃, X̃ᵀX/N) of error compensation (errors are then relative to C̃)."""
    w = split.weights(i)
    e = deepseek.layer_layout(split, i, rank, weights=w, moments=moments, **_decoupled_kw(settings))
    row = {"layer": i, "kv_rank": e.rank, "rope_kept_energy": split.kept_rope_energy(i)}
    if stats is not None:
        C = stats.second_moments[i] if moments is None else moments[0]
        k_nope = e.kv_latent @ e.up_k.reshape(e.rank, -1)
        row["k_nope_rel_error"] = _relative_error(split.rest_key(i, w), k_nope, C) if split.nope else 0.0
        row["v_rel_error"] = _relative_error(w[4], e.kv_latent @ e.up_v.reshape(e.rank, -1), C)
    return e, row


def decoupled_target(config, split: deepseek.RopeSplit, ranks: list[int], settings: ConvertSettings):
    """(config of the converted model, report fields that describe its layout) for the decoupled latent."""
    fields = {"ranks": [[r] for r in ranks], "mla": split.summary()}
    if settings.format != "deepseek":
        return decoupled_config(config, split, ranks), fields
    target = deepseek.deepseek_config(config, split, deepseek.check_one_rank(ranks), portable=settings.portable)
    fields["runtime_support"] = deepseek.runtime_support(target).as_dict()
    fields["mla"]["residual_scale"] = deepseek.residual_scale(config)
    return target, fields


def build_converted(model, stats: CalibrationStats, settings: ConvertSettings,
                    windows: torch.Tensor | None = None) -> tuple[torch.nn.Module, dict]:
    """The converted model in the asked format, and the report fields that describe it (`windows`: the calibration
    windows, needed by error compensation and output refit)."""
    if settings.latent == "decoupled":
        split, ranks = plan_decoupled(model, stats, settings)
        _, fields = decoupled_target(model.config, split, ranks, settings)  # a DeepSeek budget is refused here
        if settings.sequential_fit:
            fitted, fields["layers"] = compensated_layouts(
                model.config, split, ranks, deepseek.module_layer_state(model),
                model.model.embed_tokens.weight.detach(), _in_memory_compensation(model, windows, settings), stats,
                settings)
            layers = [completed_layout(split, i, e) for i, e in enumerate(fitted)]
        else:
            made = [decoupled_layer(split, i, r, stats, settings) for i, r in enumerate(ranks)]
            layers, fields["layers"] = [e for e, _ in made], [row for _, row in made]
        layout = deepseek.assemble_layout(split, layers)
        logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(fields["layers"]))
        if settings.format == "deepseek":
            return deepseek.layout_to_deepseek(model, split, layout, portable=settings.portable), fields
        return build_decoupled_model(model, layout), fields
    latents, table = plan_latents(model, stats, settings, windows)
    logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(table))
    return build_latent_model(model, latents), {"ranks": [l.ranks for l in latents], "layers": table}


# ----------------------------------------------------------------------------- choices by calibration loss


def selection_windows(tokenizer, settings: ConvertSettings) -> torch.Tensor:
    """`selection.SELECTION_WINDOWS` calibration windows, evenly spaced over the calibration set (held-in)."""
    from care_mla.pipeline.selection import SELECTION_WINDOWS

    windows, _ = load_windows(tokenizer, settings.calib_text, "calibration", settings.calib_samples,
                              settings.calib_seq_len, assets.resolve_cache_dir(settings.cache_dir))
    step = max(1, windows.shape[0] // SELECTION_WINDOWS)
    return windows[::step][:SELECTION_WINDOWS]


def objective_candidates(settings: ConvertSettings) -> list[ConvertSettings]:
    """The settings to choose from by calibration loss: every "auto" objective and key_emphasis spelled out
    (`selection.OBJECTIVE_CHOICES` × `selection.KEY_EMPHASIS_GRID`); one entry when nothing is left to choose."""
    from care_mla.pipeline.selection import KEY_EMPHASIS_GRID, OBJECTIVE_CHOICES

    objectives = OBJECTIVE_CHOICES if settings.objective == "auto" else (settings.objective,)
    out = []
    for objective in objectives:
        emphases = (settings.key_emphasis,)
        if settings.key_emphasis == "auto":
            emphases = (1.0,) if objective == "activation" else KEY_EMPHASIS_GRID
        out += [dataclasses.replace(settings, objective=objective, key_emphasis=e) for e in emphases]
    return out


def rope_dim_candidates(config, settings: ConvertSettings) -> list[ConvertSettings]:
    """Decoupled layouts below parity with no pinned ``--rope-dim``: splits of the cache between
    ``qk_rope_head_dim`` and ``kv_lora_rank`` to choose from by calibration loss (`selection.ROPE_SHARES` of the
    cache, even, valid for the export); one entry when there is nothing to choose."""
    from care_mla.pipeline.selection import ROPE_SHARES

    if settings.latent != "decoupled" or settings.rope_dim is not None or settings.engine is not None:
        return [settings]
    g, d = config.num_key_value_heads, head_dim(config)
    cache = round(settings.kv_fraction * 2 * g * d)
    if cache >= 2 * g * d:
        return [settings]  # parity: the exact layout
    dims = []
    for share in ROPE_SHARES:
        rope = max(2, int(cache * share) // 2 * 2)
        try:
            deepseek.export_budget(config, qk_rope_head_dim=rope, kv_fraction=settings.kv_fraction,
                                   portable=settings.portable)
        except deepseek.DeepseekExportError:
            continue
        if rope not in dims:
            dims.append(rope)
    return [dataclasses.replace(settings, rope_dim=r) for r in dims] or [settings]


#: The stages of a choice by calibration loss: (report field, candidates, how a candidate is named).
_STAGES = (
    ("objective_choice", lambda config, s: objective_candidates(s),
     lambda c: f"{c.objective}, key_emphasis {c.key_emphasis:g}"),
    ("rope_dim_choice", rope_dim_candidates, lambda c: f"qk_rope_head_dim {c.rope_dim}"),
)


def choose_settings(config, settings: ConvertSettings,
                    score: Callable[[list[ConvertSettings]], list[float]]) -> tuple[ConvertSettings, dict]:
    """`settings` with what is "auto" resolved by calibration loss, one stage after the other (`_STAGES`: first
    the objective and the K/V balance, then, for a decoupled layout, the RoPE/latent split), and the report
    fields of each choice made. `score` gives the calibration loss of each candidate."""
    from care_mla.pipeline.selection import best

    fields = {}
    for field, candidates_of, name_of in _STAGES:
        candidates = candidates_of(config, settings)
        if len(candidates) == 1:
            settings = candidates[0]
            continue
        names = [name_of(c) for c in candidates]
        # scored as plain conversions: compensation and output refit rerun every layer, multiplying the cost
        losses = score([dataclasses.replace(c, compensate=False, refit_output=False) for c in candidates])
        name, info = best(names, losses, field.removesuffix("_choice"))
        settings = candidates[names.index(name)]
        fields[field] = info
    if fields:
        fields["objective"], fields["key_emphasis"] = settings.objective, settings.key_emphasis
    return settings, fields


def choose_settings_whole(model, tokenizer, stats: CalibrationStats,
                          settings: ConvertSettings) -> tuple[ConvertSettings, dict]:
    """`choose_settings` with each candidate built in memory and scored on `selection_windows`."""
    windows = None

    def score(candidates: list[ConvertSettings]) -> list[float]:
        nonlocal windows
        windows = selection_windows(tokenizer, settings) if windows is None else windows
        losses = []
        for candidate in candidates:
            converted, _ = build_converted(model, stats, candidate)
            losses.append(math.log(perplexity(converted, windows, batch_size=settings.batch_size)))
            del converted
        return losses

    return choose_settings(model.config, settings, score)


def choose_settings_layerwise(config, reader: CheckpointReader, tokenizer, stats: CalibrationStats,
                              settings: ConvertSettings, dtype: torch.dtype,
                              device: torch.device) -> tuple[ConvertSettings, dict]:
    """`choose_settings` with one decoder layer of one candidate in memory at a time (`selection.streamed_losses`;
    the candidates read each layer from disk once, `layerwise.LayerMemo`)."""
    from care_mla.pipeline.layerwise import LayerMemo
    from care_mla.pipeline.selection import streamed_losses

    windows = None
    memo = LayerMemo(reader)

    def score(candidates: list[ConvertSettings]) -> list[float]:
        nonlocal windows
        windows = selection_windows(tokenizer, settings) if windows is None else windows
        make = _decoupled_stream if settings.latent == "decoupled" else _latent_stream
        streams = [make(config, memo, stats, candidates[0], dtype)]
        for c in candidates[1:]:  # a RoPE plan depends on rope_dim only: shared by candidates that share it
            same = settings.latent == "decoupled" and c.rope_dim == candidates[0].rope_dim
            streams.append(make(config, memo, stats, c, dtype, **({"split": streams[0].split} if same else {})))
        first = streams[0]
        return streamed_losses(first.model_class, first.tensor, [(p.config, p.layer) for p in streams], windows,
                               dtype=dtype, device=device, batch_size=settings.batch_size)

    return choose_settings(config, settings, score)


def format_layer_table(table: list[dict]) -> str:
    """Plain-text table of the per-layer rows of `plan_latents`."""
    keys = [k for k in table[0] if k != "layer"]
    lines = ["layer " + " ".join(f"{k:>12s}" for k in keys)]
    for row in table:
        cells = (f"{row[k]:12d}" if isinstance(row[k], int) else f"{row[k]:12.4g}" for k in keys)
        lines.append(f"{row['layer']:5d} " + " ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output


def output_folder(settings: ConvertSettings) -> OutputFolder:
    """The output of a conversion, checked against every input it reads (model, texts, cache)."""
    inputs = input_paths(settings.model, settings.calib_text, settings.eval_text, settings.cache_dir)
    return OutputFolder(settings.out, overwrite=settings.overwrite, inputs=inputs)


def input_paths(model: str, calib_text: str, eval_text: str, cache_dir: str | None) -> dict[str, str | None]:
    """What a conversion or sweep reads, by name, as paths (None: nothing on disk the user gave)."""
    model_path = str(assets.default_model_location()) if model == assets.DEFAULT_MODEL else model
    return {"input model": model_path, "calibration text": user_text(calib_text),
            "evaluation text": user_text(eval_text), "cache folder": cache_dir}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- evaluation


def original_perplexity(model, model_path: str, windows: torch.Tensor, settings: ConvertSettings, dtype) -> float:
    """Perplexity of the unconverted model, remembered per (model, windows, dtype) in the cache folder."""
    cache_root = assets.resolve_cache_dir(settings.cache_dir)
    h = hashlib.sha256(_model_fingerprint(model_path, cache_root))
    h.update(windows.numpy().tobytes())
    h.update(str(dtype).encode())
    memo = cache_root / "ppl" / f"{h.hexdigest()[:20]}.json"
    try:
        return float(json.loads(memo.read_text())["ppl"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring the unreadable remembered perplexity %s (%s); measuring again", memo, err)
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
    from care_mla.evaluation.zeroshot import evaluate_zero_shot

    kw = dict(text=settings.eval_text, limit=settings.zero_shot_limit, batch_size=settings.batch_size,
              cache_dir=settings.cache_dir)
    return {name: evaluate_zero_shot(m, tokenizer, settings.zero_shot_tasks, **kw)
            for name, m in (("original", original), ("converted", converted))}


# ----------------------------------------------------------------------------- API


def convert(settings: ConvertSettings) -> dict:
    """Convert `settings.model` and write the latent-cache model with its report to `settings.out`.

    Returns the report (also written as report.json). The input model is never modified; the
    output is checked against every input and for writability before any work, locked for the
    run, and written atomically (`outputs.OutputFolder`). The model is written before it is
    evaluated: an evaluation that fails keeps it, records the error in report.json and raises
    `EvaluationError`. A safetensors checkpoint is converted layer by layer (`layerwise`: every
    latent and format, the same bytes) unless ``settings.layerwise`` is False; `.bin`
    checkpoints and hub ids are loaded whole.
    """
    folder = output_folder(settings)
    folder.check()  # fail before any work
    check_inputs(settings)
    settings = resolve_engine(settings)
    device = resolve_device(settings.device)
    dtype = torch_dtype(settings.dtype, device)
    with folder:
        reader = _checkpoint_reader(settings.model) if settings.layerwise else None
        if reader is not None:
            return _convert_layerwise(settings, reader, device, dtype, folder)
        return _convert_whole(settings, device, dtype, folder)


def check_finite_weights(named_tensors) -> None:
    """Refuse a loaded model holding NaN/Inf weights, naming the first such tensor."""
    for name, tensor in named_tensors:
        check_finite(name, tensor.detach())


def resolve_engine(settings: ConvertSettings) -> ConvertSettings:
    """`settings` with an engine's geometry filled in (`kv_fraction`, `rope_dim`), or unchanged without one."""
    if settings.engine is None:
        return settings
    config = AutoConfig.from_pretrained(resolve_model_path(settings.model))
    kv_lora_rank, rope = deepseek.engine_geometry(config, settings.engine, settings.kv_fraction)
    parity = gqa_kv_width(config)
    resolved = dataclasses.replace(settings, kv_fraction=(kv_lora_rank + rope) / parity, rope_dim=rope)
    logger.info("engine %s: MLA cache %d + %d = %d numbers per token and layer, %.1f %% of the GQA cache (%d); "
                "nearest to the asked kv_fraction %g among %s", settings.engine, kv_lora_rank, rope,
                kv_lora_rank + rope, 100 * resolved.kv_fraction, parity, settings.kv_fraction,
                [r + p for r, p in deepseek.ENGINE_GEOMETRIES[settings.engine]])
    return resolved


def check_inputs(settings: ConvertSettings) -> None:
    """What can be checked of the inputs before any work: texts readable, zero-shot tasks known, model present."""
    check_text_file(settings.calib_text, "calibration")
    if settings.evaluate:
        check_text_file(settings.eval_text, "evaluation")
    if settings.evaluate and settings.zero_shot_tasks:
        from care_mla.evaluation.zeroshot import check_tasks

        check_tasks(settings.zero_shot_tasks, settings.eval_text)  # a missing lm-eval or an unknown task: now
    if settings.model != assets.DEFAULT_MODEL:
        resolve_model_path(settings.model)


def _convert_whole(settings: ConvertSettings, device: torch.device, dtype: torch.dtype,
                   folder: OutputFolder) -> dict:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer, model_path = load_model(settings.model, dtype, device, settings.max_memory_map)
    get_family(model.config)
    check_finite_weights(model.named_parameters())
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = calibrate(model, tokenizer, model_path, settings)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    settings, choice = choose_settings_whole(model, tokenizer, stats, settings)
    windows = None
    if settings.sequential_fit:
        windows, _ = load_windows(tokenizer, settings.calib_text, "calibration", settings.calib_samples,
                                  settings.calib_seq_len, assets.resolve_cache_dir(settings.cache_dir))
    converted, fields = build_converted(model, stats, settings, windows)
    fields.update(choice)
    timings["factorize_and_build"] = time.perf_counter() - t

    report = _report_head(model_path, model.config, converted.config, type(converted).__name__, fields, stats,
                          settings, dtype, device, loading="whole")
    t = time.perf_counter()
    with folder.staging() as tmp:
        from care_mla.pipeline.layerwise import save_model

        save_model(tmp, converted)  # the same files the layer-by-layer path streams
        tokenizer.save_pretrained(tmp)
        settings.save(tmp / SETTINGS_FILE)
        timings["save"] = time.perf_counter() - t
        _finish_report(report, timings, tmp, pending=settings.evaluate)
    if settings.evaluate:
        _evaluate_saved(report, timings, folder, lambda: (model, converted), tokenizer, model_path, settings, dtype)
    return report


def _evaluate_saved(report: dict, timings: dict, folder: OutputFolder, models: Callable, tokenizer, model_path: str,
                    settings: ConvertSettings, dtype) -> None:
    """Evaluate the written model (``models()`` → original, converted) and rewrite its report.

    Whatever goes wrong (an error, Ctrl-C), the model stays written and report.json says what
    happened; an error is re-raised as `EvaluationError` naming the command that re-runs the
    evaluation alone.
    """
    try:
        original, converted = models()
        _evaluate_into(report, timings, original, converted, tokenizer, model_path, settings, dtype)
    except BaseException as err:
        reason = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else f"{type(err).__name__}: {err}"
        report["evaluation_status"] = f"failed: {reason}"
        _finish_report(report, timings, folder.out)
        if isinstance(err, Exception):
            raise EvaluationError(
                f"the converted model was written to {folder.out}, but its evaluation failed ({reason}); re-run only "
                f"the evaluation with: care-mla eval {folder.out}"
            ) from err
        raise
    report["evaluation_status"] = "done"
    _finish_report(report, timings, folder.out)


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
                       dtype: torch.dtype, folder: OutputFolder) -> dict:
    """`convert` with one decoder layer in memory at a time: statistics, rank plan and output streamed."""
    from care_mla.pipeline.layerwise import write_model

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
    settings, choice = choose_settings_layerwise(config, reader, tokenizer, stats, settings, dtype, device)
    if choice:
        timings["choose_settings"] = time.perf_counter() - t
        t = time.perf_counter()
    compensation = None
    if settings.sequential_fit:  # the two streams run in the calibration's dtype
        windows, _ = load_windows(tokenizer, settings.calib_text, "calibration", settings.calib_samples,
                                  settings.calib_seq_len, assets.resolve_cache_dir(settings.cache_dir))
        compensation = Compensation(windows, calib_dtype(settings, config, device, dtype)[0], device)
    if settings.latent == "decoupled":
        plan = _decoupled_stream(config, reader, stats, settings, dtype, compensation=compensation)
    else:
        plan = _latent_stream(config, reader, stats, settings, dtype, compensation)
    plan.fields.update(choice)
    with folder.staging() as tmp:
        write_model(tmp, plan.model_class, plan.config, tensor=plan.tensor, layer=plan.layer, dtype=dtype,
                    generation_config=generation_config, progress=settings.progress)
        tokenizer.save_pretrained(tmp)
        settings.save(tmp / SETTINGS_FILE)
        timings["factorize_and_save"] = time.perf_counter() - t
        logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(plan.fields["layers"]))
        report = _report_head(model_path, config, plan.config, plan.model_class.__name__, plan.fields, stats, settings,
                              dtype, device, loading="layerwise")
        report["peak_rss_mb_conversion"] = round(peak_rss_mb(), 1)
        _finish_report(report, timings, tmp, pending=settings.evaluate)
    if settings.evaluate:
        def models():
            return (load_model(model_path, dtype, device, settings.max_memory_map)[0],
                    _from_pretrained(str(folder.out), dtype, device, settings.max_memory_map))

        _evaluate_saved(report, timings, folder, models, tokenizer, model_path, settings, dtype)
    return report


@dataclass
class _Stream:
    """What `layerwise.write_model` streams: the converted model's class and config, its tensors outside the
    decoder layers by name, each layer's by index, and the report fields (the per-layer rows fill as it runs)."""

    model_class: type
    config: object
    tensor: Callable[[str], torch.Tensor]
    layer: Callable[[int], dict[str, torch.Tensor]]
    fields: dict
    split: deepseek.RopeSplit | None = None  # decoupled layouts: the shared RoPE plan


def _latent_stream(config, reader: CheckpointReader, stats: CalibrationStats, settings: ConvertSettings,
                   dtype: torch.dtype, compensation: Compensation | None = None) -> _Stream:
    """The latent model's stream; with ``settings.sequential_fit`` its factors are fitted first, layer after layer,
    as `compensation` says."""
    from care_mla.formats.mapping import latent_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
    from care_mla.pipeline.layerwise import kv_weights_reader, layer_prefix, qo_weights_reader

    kv_weights = kv_weights_reader(reader, dtype)
    qo_weights = qo_weights_reader(reader, dtype)
    ranks = plan_ranks(config, kv_weights, stats, settings, qo_weights)
    fields = {"ranks": ranks, "layers": []}
    fitted = None
    if settings.sequential_fit:
        fitted, fields["layers"] = compensated_latents(
            config, ranks, kv_weights, qo_weights, *_streamed_compensation(reader, compensation, dtype), stats, settings)

    def layer(i: int) -> dict[str, torch.Tensor]:
        if fitted is not None:
            return latent_layer_state(reader.state(layer_prefix(i), dtype), fitted[i])
        latent, row = layer_latent(i, ranks[i], kv_weights, stats, settings, qo_weights, config)
        fields["layers"].append(row)
        return latent_layer_state(reader.state(layer_prefix(i), dtype), latent)

    target = CareMlaConfig.from_base(config, kv_latent=settings.latent, kv_lora_ranks=ranks)
    return _Stream(CareMlaForCausalLM, target, lambda name: reader.get(name, dtype), layer, fields)


def _streamed_compensation(reader: CheckpointReader, compensation: Compensation | None, dtype: torch.dtype):
    """(layer state, embedding, compensation) of a compensated stream read from the checkpoint: the layers in the
    conversion's `dtype`, as an in-memory model holds them (the streams cast them to the compensation's dtype;
    what is fitted against them, e.g. the refit's pull towards the original o_proj, sees the same numbers)."""
    from care_mla.pipeline.layerwise import layer_prefix

    if compensation is None:
        raise ValueError("error compensation needs the calibration windows, dtype and device (Compensation)")
    return (lambda i: reader.state(layer_prefix(i), dtype), reader.get("model.embed_tokens.weight"), compensation)


def _decoupled_stream(config, reader: CheckpointReader, stats: CalibrationStats, settings: ConvertSettings,
                      dtype: torch.dtype, split: deepseek.RopeSplit | None = None,
                      compensation: Compensation | None = None) -> _Stream:
    """The decoupled-RoPE model's stream (care_mla or DeepSeek format); `split`: a RoPE plan already made (the
    candidates of a choice share it); with ``settings.sequential_fit`` the layouts are fitted first, as
    `compensation` says."""
    from care_mla.formats.mapping import decoupled_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
    from care_mla.pipeline.layerwise import layer_prefix, skeleton

    def attention_state(i: int) -> dict[str, torch.Tensor]:  # the RoPE and rank plans read attention only
        return {"self_attn." + k: v for k, v in reader.state(layer_prefix(i) + "self_attn.", dtype).items()}

    split, ranks = plan_decoupled(skeleton(config), stats, settings, dtype=dtype, layer_state=attention_state,
                                  split=split)
    target, fields = decoupled_target(config, split, ranks, settings)
    fields["layers"] = []
    deepseek_format = settings.format == "deepseek"
    fitted = None
    if settings.sequential_fit:
        fitted, fields["layers"] = compensated_layouts(config, split, ranks,
                                                       *_streamed_compensation(reader, compensation, dtype), stats, settings)

    def layer(i: int) -> dict[str, torch.Tensor]:
        if fitted is not None:
            e = completed_layout(split, i, fitted[i])
        else:
            e, row = decoupled_layer(split, i, ranks[i], stats, settings)
            fields["layers"].append(row)
        source = reader.state(layer_prefix(i), dtype)
        if deepseek_format:
            return deepseek.deepseek_layer_state(source, e, config, target)
        return decoupled_layer_state(source, e, qk_rope_head_dim=split.qk_rope_head_dim,
                                     rope_attention_scaling=split.rope_scaling)

    if deepseek_format:
        from transformers import DeepseekV3ForCausalLM

        def tensor(name: str) -> torch.Tensor:
            return deepseek.deepseek_global_tensor(name, lambda n: reader.get(n, dtype), config, target)

        return _Stream(DeepseekV3ForCausalLM, target, tensor, layer, fields, split)
    return _Stream(CareMlaForCausalLM, target, lambda name: reader.get(name, dtype), layer, fields, split)


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
        "objective": settings.objective,
        "key_emphasis": settings.key_emphasis,
        "compensate": settings.compensate,
        "refit_output": settings.refit_output,
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
        "hardware": stats.meta.get("hardware"),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "loading": loading,
    }


def _evaluate_into(report: dict, timings: dict, original, converted, tokenizer, model_path: str,
                   settings: ConvertSettings, dtype) -> None:
    t = time.perf_counter()
    pair = evaluate_pair(original, converted, tokenizer, model_path, settings, dtype)
    for name, value in pair["ppl"].items():  # report.json never holds NaN (it would not be JSON)
        check_finite_ppl(value, f"the {name} model's perplexity")
    report.update(pair)
    report["ppl"]["ratio"] = report["ppl"]["converted"] / report["ppl"]["original"]
    timings["evaluate"] = time.perf_counter() - t
    if settings.zero_shot_tasks:
        t = time.perf_counter()
        report["zero_shot"] = zero_shot_pair(original, converted, tokenizer, settings)
        timings["zero_shot"] = time.perf_counter() - t


def _finish_report(report: dict, timings: dict, folder: Path, *, pending: bool = False) -> None:
    """Write report.json (atomically) into `folder`; `pending`: the evaluation is still to come."""
    if pending:
        report["evaluation_status"] = "pending"
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_text_atomic(Path(folder) / REPORT_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")


def evaluate_folder(path: str, *, eval_text: str = "austen", eval_samples: int = 64, eval_seq_len: int = 256,
                    dtype: str = "float32", device: str = "auto", batch_size: int = 8, progress: bool = True) -> dict:
    """Held-out perplexity and KV bytes per token of a saved model (converted or original)."""
    dev = resolve_device(device)
    dt = torch_dtype(dtype, dev)
    check_text_file(eval_text, "evaluation")
    model, tokenizer, model_path = load_model(path, dt, dev)
    windows, text_path = load_windows(tokenizer, eval_text, "evaluation", eval_samples, eval_seq_len)
    ppl = check_finite_ppl(perplexity(model, windows, batch_size=batch_size, progress=progress))
    return {
        "model": model_path,
        "ppl": ppl,
        "kv_bytes_per_token": kv_bytes_per_token(model.config, dt),
        "kv_bytes_per_token_measured": measured_kv_bytes_per_token(model, windows[:1, :32]),
        "evaluation": {"text": str(text_path), "samples": eval_samples, "seq_len": eval_seq_len},
        "dtype": str(dt).removeprefix("torch."),
    }
