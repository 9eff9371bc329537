"""Layer-sequential calibration: streaming statistics of every attention input (CARE.md §0).

Per decoder layer we keep the uncentered second moment C = (1/N) Σ x xᵀ of the attention
input x (the output of `input_layernorm`) and the mean absolute value per channel (for ASVD).
Activations are never stored beyond the hidden states carried from one layer to the next:
the calibration set runs through layer l, its statistics are accumulated by a hook on that
layer's `input_layernorm`, and its outputs become layer l+1's inputs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Seconds between two saves of the calibration's progress (hidden states + statistics so far).
RESUME_INTERVAL_S = 60.0


class CalibrationCacheError(ValueError):
    """A cached statistics file that is corrupt or was computed for something else."""


class SecondMoment:
    """Running Σ x xᵀ, Σ |x| and token count of one layer's input.

    Each batch is reduced with one fp32 GEMM and added to fp64 totals, so the accumulation
    error does not grow with the number of batches.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).to(device=self.sum_outer.device, dtype=torch.float32)
        self.sum_outer += (x.T @ x).to(torch.float64)
        self.sum_abs += x.abs().sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sum_outer / max(self.count, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.sum_abs / max(self.count, 1)


@dataclass
class CalibrationStats:
    """Per-layer statistics of the attention inputs, what every factorization needs."""

    second_moments: list[torch.Tensor]  # (D, D) float32 each (accumulated in float64, see `SecondMoment`)
    abs_means: list[torch.Tensor]  # (D,) float32 each
    num_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.second_moments)

    def save(self, path: Path, *, key: str = "", extra: dict[str, torch.Tensor] | None = None) -> None:
        """Write atomically (temp file + rename), so a killed run leaves no partial file; `key` (what the
        statistics were computed from) is stored inside and checked by `load`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = dict(extra or {})
        for i, (c, a) in enumerate(zip(self.second_moments, self.abs_means)):
            tensors[f"layers.{i}.second_moment"] = c.contiguous().cpu()
            tensors[f"layers.{i}.abs_mean"] = a.contiguous().cpu()
        meta = {"num_tokens": str(self.num_tokens), "meta": json.dumps(self.meta, sort_keys=True), "key": key,
                "layers": str(self.num_layers)}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, *, key: str | None = None, extra: bool = False):
        """Statistics saved by `save`; raises `CalibrationCacheError` for a corrupt file or another `key`.

        With `extra`, returns ``(stats, other tensors of the file)``.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
            n = int(header["layers"]) if "layers" in header else len([k for k in tensors if k.endswith(".second_moment")])
            stats = cls(
                second_moments=[tensors.pop(f"layers.{i}.second_moment") for i in range(n)],
                abs_means=[tensors.pop(f"layers.{i}.abs_mean") for i in range(n)],
                num_tokens=int(header["num_tokens"]),
                meta=json.loads(header["meta"]),
            )
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise CalibrationCacheError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
        if key is not None and header.get("key") != key:
            raise CalibrationCacheError(f"{path} was computed for other inputs (its key does not match)")
        bad = [i for i, c in enumerate(stats.second_moments) if not bool(torch.isfinite(c).all())]
        if bad:
            raise CalibrationCacheError(f"{path} holds non-finite statistics (layer {bad[0]})")
        return (stats, tensors) if extra else stats


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


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _materialised(module: nn.Module, state: dict[str, torch.Tensor] | None, device: torch.device,
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

        for name, dev in placement.items():
            (module.get_submodule(name) if name else module).to_empty(device=dev)
        targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        module.load_state_dict({k: v.to(targets[k].device) for k, v in state.items()}, strict=True, assign=True)
        dispatch_model(module, device_map=placement, main_device=str(device))
    try:
        yield module
    finally:
        if placement is not None:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(module, recurse=True)
        module.to("meta")


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
        with _materialised(layer, None if layer_weights is None else layer_weights(idx), device, layer_placement):
            moment = SecondMoment(layer.input_layernorm.weight.shape[0], device=device)
            handle = layer.input_layernorm.register_forward_hook(lambda _m, _a, out: moment.add_batch(out))
            try:
                hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            finally:
                handle.remove()
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
