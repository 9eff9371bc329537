"""Typed, validated settings of a conversion; saved next to every output."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

METHODS = ("care", "svd", "asvd", "svd-llm")
ALLOCATIONS = ("uniform", "adjusted")
LATENTS = ("separate", "joint", "decoupled")
FORMATS = ("care_mla", "deepseek")
ROPE_STRATEGIES = ("pca", "partial")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


class SettingsError(ValueError):
    """Settings that cannot work; the message names the fix."""


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides a conversion. Unknown keys are refused by `from_dict`.

    `latent` and `allocation` left as None take the format's default (care_mla: separate,
    adjusted — uniform for a decoupled latent; deepseek: decoupled, uniform) and are stored
    resolved.
    """

    model: str = "smollm2-135m-instruct"
    out: str = "runs/convert"
    format: Literal["care_mla", "deepseek"] = "care_mla"  # output: latent-cache model or stock DeepseekV3
    kv_fraction: float = 0.5  # kept fraction of the GQA KV width (1.0 = parity)
    method: Literal["care", "svd", "asvd", "svd-llm"] = "care"
    allocation: Literal["uniform", "adjusted"] | None = None
    allocation_score: Literal["energy", "paper"] = "energy"
    latent: Literal["separate", "joint", "decoupled"] | None = None
    rope_dim: int | None = None  # decoupled: qk_rope_head_dim (default: a third of the cache, ≤ d_h)
    rope_strategy: Literal["pca", "partial"] = "pca"  # decoupled: how RoPE components are chosen
    rope_context: int | None = None  # decoupled: relative distance the RoPE choice is judged over
    portable: bool = False  # deepseek: only what vLLM/SGLang run (default RoPE, no biases)
    balance_kv: bool = True  # joint latent: scale K against V before the SVD
    whitening: Literal["cholesky", "sqrt"] = "cholesky"
    damping: float = 1e-2
    rank_min_ratio: float = 0.5  # adjusted: r_min = ratio · mean rank
    rank_max_ratio: float = 2.0  # adjusted: r_max = ratio · mean rank (capped at the layer width)
    calib_text: str = "austen"
    calib_samples: int = 256
    calib_seq_len: int = 256
    eval_text: str = "austen"
    eval_samples: int = 64
    eval_seq_len: int = 256
    batch_size: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # factors, output and evaluation
    calib_dtype: Literal["same", "float32", "bfloat16", "float16"] = "bfloat16"  # forward passes of calibration
    evaluate: bool = True
    overwrite: bool = False
    progress: bool = True
    cache_dir: str | None = None  # where calibration statistics are kept; None = care-mla's cache

    def __post_init__(self) -> None:
        _one_of("format", self.format, FORMATS)
        deepseek = self.format == "deepseek"
        if self.latent is None:
            object.__setattr__(self, "latent", "decoupled" if deepseek else "separate")
        if self.allocation is None:
            # decoupled: adjusted widths measured worse than uniform on SmolLM2 (ppl ratio at F=0.5 /
            # 0.25: 1.352 / 1.990 vs 1.348 / 1.953), so uniform is its default too
            uniform = deepseek or self.latent == "decoupled"
            object.__setattr__(self, "allocation", "uniform" if uniform else "adjusted")
        if deepseek and self.latent != "decoupled":
            raise SettingsError(
                f"--format deepseek writes DeepSeek's decoupled-RoPE layout, not a {self.latent} latent; "
                "drop --latent, or use --format care_mla"
            )
        if deepseek and self.allocation == "adjusted":
            raise SettingsError(
                "DeepSeek-V3 has one kv_lora_rank for every layer, so --allocation adjusted cannot be written in "
                "--format deepseek; use --allocation uniform, or --format care_mla --latent decoupled for the same "
                "layout with per-layer ranks (absorbed decode in care-mla's runtime)"
            )
        if self.portable and not deepseek:
            raise SettingsError("--portable restricts a --format deepseek export to what vLLM/SGLang run; add --format deepseek")
        if self.latent != "decoupled":
            for name in ("rope_dim", "rope_context"):
                if getattr(self, name) is not None:
                    raise SettingsError(f"{name} sets the decoupled RoPE key; add --latent decoupled (or --format deepseek)")
        _one_of("rope_strategy", self.rope_strategy, ROPE_STRATEGIES)
        for name in ("rope_dim", "rope_context"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingsError(f"{name} must be a positive integer; got {value!r}")
        if not (0.0 < self.kv_fraction <= 1.0):
            raise SettingsError(
                f"kv_fraction must be in (0, 1] (1.0 = KV-parity, 0.25 = 75 % saving); got {self.kv_fraction}"
            )
        _one_of("method", self.method, METHODS)
        _one_of("allocation", self.allocation, ALLOCATIONS)
        _one_of("allocation_score", self.allocation_score, ("energy", "paper"))
        _one_of("latent", self.latent, LATENTS)
        _one_of("whitening", self.whitening, ("cholesky", "sqrt"))
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("calib_dtype", self.calib_dtype, ("same",) + DTYPES[1:])
        if self.latent in ("joint", "decoupled") and self.method != "care":
            raise SettingsError(
                f"a {self.latent} K/V latent is built with --method care; the baselines use separate latents"
            )
        if self.damping < 0:
            raise SettingsError(f"damping must be ≥ 0; got {self.damping}")
        if not (0 < self.rank_min_ratio <= 1 <= self.rank_max_ratio):
            raise SettingsError("need 0 < rank_min_ratio ≤ 1 ≤ rank_max_ratio")
        for name in ("calib_samples", "calib_seq_len", "eval_samples", "eval_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be a positive integer; got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConvertSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
