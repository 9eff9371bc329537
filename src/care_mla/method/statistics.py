"""Calibration statistics (CARE.md §0): per layer, the running second moment C = (1/N) Σ x xᵀ of the attention input
and its mean absolute value per channel, accumulated in float64 with a token count; saved and loaded with a key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CalibrationCacheError(ValueError):
    """A cached statistics file that is corrupt or was computed for something else."""


def gram(x: torch.Tensor, *, right: torch.Tensor | None = None) -> torch.Tensor:
    """``xᵀx`` of `x` (N, D), symmetric by construction, with ``xᵀ right`` appended as columns when `right` (N, E)
    is given: ``[xᵀx | xᵀ right]`` (D, D + E), in `x`'s dtype.

    ``xᵀx`` is computed as its upper block triangle (blocks of about D/6 columns) and mirrored: ~7/12 of the
    multiply-adds of one GEMM. On a 2-core AVX-512 CPU in float32 that took 5.5 ms instead of 8.8 for N = 2048,
    D = 576, and 148 instead of 277 for N = 1024, D = 4096 (`benchmarks/convert_speed.py` measures the conversion).
    """
    n, d = x.shape
    out = torch.empty(d, d + (0 if right is None else right.shape[1]), dtype=x.dtype, device=x.device)
    block = min(384, max(64, math.ceil(d / 6 / 32) * 32))  # a sixth, in multiples of 32 columns
    for s in range(0, d, block):
        e = min(s + block, d)
        out[s:e, s:d] = x[:, s:e].T @ x[:, s:]
        diagonal = out[s:e, s:e]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)  # a GEMM's own block need not be exactly symmetric
        out[e:d, s:e] = out[s:e, e:d].T
    if right is not None:
        out[:, d:] = x.T @ right
    return out


def product_dtype(stream_dtype: torch.dtype) -> torch.dtype:
    """The dtype a batch's products (`gram`) are computed in for inputs from a hidden-state stream in
    `stream_dtype`: bfloat16 for a bfloat16 stream, else float32.

    A bfloat16 stream's values are exact in bfloat16, and a bfloat16 GEMM accumulates in float32: only each
    batch's result is rounded, to 2⁻⁹ relative per entry, and the roundings of successive batches (summed in
    float64) average out. SmolLM2, 8 batches of 2,048 tokens, median over layers: C moved by 5e-4 of ‖C‖
    (Frobenius), a third of what the stream's own rounding moves it (1.6e-3 from a float32 stream's C). On a
    2-core CPU with native bf16 (avx512_bf16) the products take half float32's time: `gram` 2.8 instead of
    5.4 ms for 2,048 × 576. A float16 stream keeps float32 products: a batch's sums would overflow float16.
    The refit's output moments do not use this (`single_pass.MOMENT_DTYPE`: their residual is below bf16's
    rounding)."""
    return torch.bfloat16 if stream_dtype == torch.bfloat16 else torch.float32


class SecondMoment:
    """Running Σ x xᵀ, Σ |x| and token count of one layer's input.

    Each batch is reduced in `dtype` (`gram`; float32, or bfloat16 for a bfloat16 stream: `product_dtype`) and
    added to float64 totals, so the accumulation error does not grow with the number of batches.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.dim, self.dtype = dim, dtype
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).to(device=self.sum_outer.device)
        self.sum_outer += gram(x.to(self.dtype)).to(torch.float64)
        # one batch's sum in float32 (~1e-7 relative), whatever the products' dtype
        self.sum_abs += x.abs().sum(0, dtype=torch.float32).to(torch.float64)
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
