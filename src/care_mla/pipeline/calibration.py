"""Layer-sequential calibration: streaming statistics of every attention input (CARE.md §0).

Per decoder layer we keep the uncentered second moment C = (1/N) Σ x xᵀ of the attention
input x (the output of `input_layernorm`) and the mean absolute value per channel (for ASVD).
Activations are never stored beyond the hidden states carried from one layer to the next:
the calibration set runs through layer l, its statistics are accumulated by a hook on that
layer's `input_layernorm`, and its outputs become layer l+1's inputs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from care_mla.io import assets
from care_mla.io.checkpoint import CheckpointReader
from care_mla.io.fingerprint import MEMO_FOLDER, model_digest
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.io.text import load_windows, resolve_text
from care_mla.method.statistics import CalibrationCacheError, CalibrationStats, SecondMoment, product_dtype
from care_mla.pipeline.load import calib_dtype, load_model, resolve_device, torch_dtype
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)


#: Seconds between two saves of the calibration's progress (hidden states + statistics so far).
RESUME_INTERVAL_S = 60.0


def _save_progress(path: Path, key: str, stats: list, hidden: list[torch.Tensor]) -> None:
    done = CalibrationStats([c for c, _, _ in stats], [a for _, a, _ in stats], stats[0][2], {})
    extra = {f"hidden.{j}": h.detach().contiguous().cpu() for j, h in enumerate(hidden)}
    done.save(path, key=key, extra=extra)


def _load_progress(path: Path, key: str, hidden: list[torch.Tensor]):
    """(per-layer stats rows, hidden states) saved by `_save_progress` for the same calibration, else None."""
    try:
        done, extra = CalibrationStats.load(path, key=key, extra=True)
        restored = [extra[f"hidden.{j}"].to(device=h.device, dtype=h.dtype) for j, h in enumerate(hidden)]
    except (CalibrationCacheError, KeyError) as err:
        logger.warning("ignoring the calibration progress file: %s", err)
        return None
    if any(r.shape != h.shape for r, h in zip(restored, hidden)):
        logger.warning("ignoring the calibration progress file %s: other shapes", path)
        return None
    rows = [(c, a, done.num_tokens) for c, a in zip(done.second_moments, done.abs_means)]
    return rows, restored


class _StopForward(Exception):
    pass


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def materialised(module: nn.Module, state: dict[str, torch.Tensor] | None, device: torch.device,
                  placement: dict[str, int | str] | None = None):
    """`module` holding `state` (its full state dict) for the block, then back on the meta device; no-op for None.

    With a `placement` (submodule name → device, `layerwise.layer_placement`) the module is spread
    over those devices with accelerate's hooks moving activations between them (submodules placed
    on "cpu" run on `device`, their weights streamed to it); outputs come back to `device`.
    """
    if state is None:
        yield module
        return
    if placement is None:
        module.to_empty(device=device)
        module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    else:
        from accelerate import dispatch_model

        # loaded as read, then moved: the module's load hooks see the checkpoint's names (a MoE layer's per-expert
        # tensors are fused by one, `moe.accept_checkpoint_names`), which name no placed parameter
        module.load_state_dict(state, strict=True, assign=True)
        for name, dev in placement.items():
            _move(module, name, dev)
        dispatch_model(module, device_map=placement, main_device=str(device))
    try:
        yield module
    finally:
        if placement is not None:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(module, recurse=True)
        module.to("meta")


def _move(module: nn.Module, name: str, device: int | str) -> None:
    """Move the submodule, or the single parameter or buffer, `name` of `module` to `device`."""
    try:
        (module.get_submodule(name) if name else module).to(device)
        return
    except AttributeError:  # accelerate placed one tensor of a module that holds tensors of its own
        pass
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        param = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
    else:
        owner._buffers[leaf] = owner._buffers[leaf].to(device)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states and keyword arguments (mask, RoPE, ...) that reach the first decoder layer.

    The model runs only up to the first layer; a pre-hook records its inputs and stops it.
    """
    first = model.model.layers[0]
    device = model.model.embed_tokens.weight.device
    hidden, kwargs = [], []

    def catch(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@contextmanager
def accumulating(norm: nn.Module, moment: SecondMoment | None):
    """While the block runs, `moment` accumulates each output of `norm` (a decoder layer's ``input_layernorm``: the
    attention inputs the statistics are of); nothing without `moment`. Yields a list whose one number is the
    seconds that took."""
    seconds = [0.0]
    if moment is None:
        yield seconds
        return

    def add(_module, _args, out):
        start = time.perf_counter()
        moment.add_batch(out)
        seconds[0] += time.perf_counter() - start

    handle = norm.register_forward_hook(add)
    try:
        yield seconds
    finally:
        handle.remove()


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
    meta: dict | None = None,
    layer_weights: Callable[[int], dict[str, torch.Tensor]] | None = None,
    layer_placement: dict[str, int | str] | None = None,
    resume: Path | None = None,
    resume_interval_s: float | None = None,
) -> CalibrationStats:
    """Stream the attention-input statistics of every decoder layer over `input_ids` (N, T).

    Peak memory is one layer's work plus the hidden states of the calibration set. With
    `layer_weights`, the model's decoder layers live on the meta device and layer i is
    materialised from ``layer_weights(i)`` for its pass only (see `layerwise`): the weights of
    one layer are in memory at a time; `layer_placement` spreads that layer over several devices
    (`layerwise.layer_placement`) when it does not fit one.

    With `resume`, the progress (the statistics of the layers done and the hidden states that
    enter the next one) is saved there at most every `resume_interval_s` seconds, and a run that
    finds a progress file of the same calibration (``meta["key"]``) continues after its last layer.
    The caller removes the file once the statistics are saved.
    """
    was_training = model.training
    model.eval()
    layers = model.model.layers
    hidden, kwargs = capture_layer_inputs(model, input_ids, batch_size)
    if layer_weights is not None:
        model.model.embed_tokens.to("meta")  # the layer-by-layer model needs its embedding no more
    device = hidden[0].device
    tokens = input_ids.numel()
    stats = []
    key = (meta or {}).get("key", "")
    start = 0
    if resume is not None and Path(resume).is_file():
        restored = _load_progress(Path(resume), key, hidden)
        if restored is not None:
            stats, hidden = restored
            start = len(stats)
            logger.info("resuming the calibration after layer %d of %d (%s)", start, len(layers), resume)
    interval = RESUME_INTERVAL_S if resume_interval_s is None else resume_interval_s
    last_save = time.perf_counter()
    bar = tqdm(layers, desc="calibrating", unit="layer", disable=not progress, initial=start,
               total=len(layers))
    for idx, layer in enumerate(layers):
        if idx < start:
            continue
        t = time.perf_counter()
        with materialised(layer, None if layer_weights is None else layer_weights(idx), device, layer_placement):
            moment = SecondMoment(layer.input_layernorm.weight.shape[0], device=device,
                                  dtype=product_dtype(hidden[0].dtype))
            with accumulating(layer.input_layernorm, moment):
                hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
        # kept in fp32 (half the memory of L·D² fp64): a relative rounding ≤ 2⁻²⁴ ≈ 6e-8 per entry,
        # 10⁵× below the relative damping (1e-2·mean diag C) every whitened factorization adds
        stats.append((moment.second_moment.float().cpu(), moment.abs_mean.float().cpu(), moment.count))
        del moment
        bar.update(1)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t):,.0f} tok/s")
        if resume is not None and idx + 1 < len(layers) and time.perf_counter() - last_save >= interval:
            _save_progress(Path(resume), key, stats, hidden)
            last_save = time.perf_counter()
    bar.close()
    model.train(was_training)
    return CalibrationStats(
        second_moments=[c for c, _, _ in stats],
        abs_means=[a for _, a, _ in stats],
        num_tokens=stats[0][2],
        meta=dict(meta or {}),
    )


#: Version of the cached statistics (2: second moments stored in float32; 3: keyed by content; 4: a bfloat16
#: stream's products in bfloat16, `statistics.product_dtype`); part of the key.
STATS_FORMAT = 4


def model_fingerprint(model_path: str, cache_root: Path) -> bytes:
    """Identity of a model folder by content (`fingerprint.model_digest`, digests remembered per file)."""
    return bytes.fromhex(model_digest(model_path, cache_root / MEMO_FOLDER))


def _fingerprint(model_path: str, text_path: Path, settings: ConvertSettings, dtype: torch.dtype,
                 cache_root: Path) -> str:
    """Key of the calibration cache: content of the model files and of the text, calibration shape and dtype."""
    h = hashlib.sha256(model_fingerprint(model_path, cache_root))
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
    record_hardware(stats, hardware_info, dtype, settings)
    return stats


def record_hardware(stats: CalibrationStats, hardware_info: dict | None, dtype: torch.dtype,
                    settings: ConvertSettings) -> None:
    """Note in `stats` why its forward passes ran in `dtype` (`load.calib_dtype`'s probe, or the setting) and on
    how many threads."""
    stats.meta["hardware"] = hardware_info or {"step": "calibration", "dtype": str(dtype).removeprefix("torch."),
                                               "reason": f"--calib-dtype {settings.calib_dtype}"}
    stats.meta["hardware"]["threads"] = torch.get_num_threads()


@dataclass(frozen=True)
class StatisticsCache:
    """Where the statistics of one calibration (model content, text, shape, dtype: `key`) are kept, and what
    they record of how they were made (`meta`)."""

    path: Path
    key: str
    meta: dict

    @classmethod
    def of(cls, model_path: str, settings: ConvertSettings, dtype: torch.dtype) -> StatisticsCache:
        cache_root = assets.resolve_cache_dir(settings.cache_dir)
        text_path = resolve_text(settings.calib_text, "calibration")
        key = _fingerprint(model_path, text_path, settings, dtype, cache_root)
        meta = {"model": model_path, "text": str(text_path), "samples": settings.calib_samples,
                "seq_len": settings.calib_seq_len, "dtype": str(dtype).removeprefix("torch."), "key": key}
        return cls(cache_root / "calibration" / f"{key[:20]}.safetensors", key, meta)

    def load(self) -> CalibrationStats | None:
        """The cached statistics, or None (none kept, or a file that is not this calibration's: warned)."""
        if not self.path.is_file():
            return None
        try:
            stats = CalibrationStats.load(self.path, key=self.key)
        except CalibrationCacheError as err:
            logger.warning("ignoring the cached calibration statistics: %s; calibrating again", err)
            return None
        logger.info("calibration statistics from %s", self.path)
        stats.meta["cache_file"] = str(self.path)
        return stats

    def save(self, stats: CalibrationStats) -> None:
        stats.save(self.path, key=self.key)
        stats.meta["cache_file"] = str(self.path)


def _calibrate(model, tokenizer, model_path: str, settings: ConvertSettings, reader, device, dtype,
               config, model_dtype) -> CalibrationStats:
    store = StatisticsCache.of(model_path, settings, dtype)
    stats = store.load()  # checked before tokenising: the statistics are all that is needed
    if stats is not None:
        return stats
    cache, meta = store.path, dict(store.meta)
    windows = calibration_windows(tokenizer, settings)
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
    store.save(stats)
    resume.unlink(missing_ok=True)
    return stats


def calibration_windows(tokenizer, settings: ConvertSettings) -> torch.Tensor:
    """The calibration token windows (N, T) of `settings` (tokenised once, kept in the cache folder)."""
    windows, _ = load_windows(tokenizer, settings.calib_text, "calibration", settings.calib_samples,
                              settings.calib_seq_len, assets.resolve_cache_dir(settings.cache_dir))
    return windows
