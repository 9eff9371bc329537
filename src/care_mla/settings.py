"""Typed, validated settings of a conversion; saved next to every output."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

METHODS = ("care", "svd", "asvd", "svd-llm", "mha2mla", "transmla")
#: Methods that can build one joint K/V latent (mha2mla builds nothing else).
JOINT_METHODS = ("care", "mha2mla", "transmla")
ALLOCATIONS = ("uniform", "adjusted")
LATENTS = ("separate", "joint", "decoupled")
OBJECTIVES = ("activation", "value", "attention")
FORMATS = ("care_mla", "deepseek")
#: Serving engines an export can be shaped for (`deepseek.ENGINE_GEOMETRIES`).
ENGINES = ("vllm", "vllm-cpu", "sglang")
ROPE_STRATEGIES = ("pca", "partial")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Dtypes of the calibration forward passes: "auto" measures (`hardware`), "same" follows --dtype.
CALIB_DTYPES = ("auto", "same", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


class SettingsError(ValueError):
    """Settings that cannot work; the message names the fix."""


def method_latent_error(method: str, latent: str) -> str | None:
    """Why `method` cannot build a `latent` K/V latent (None when it can), naming the fix."""
    if latent == "decoupled" and method != "care":
        return "a decoupled K/V latent is built with --method care; drop --method or use another --latent"
    if latent == "joint" and method not in JOINT_METHODS:
        return (f"a joint K/V latent is built with --method {', '.join(JOINT_METHODS)}; --method {method} "
                "builds separate latents (use --latent separate)")
    if method == "mha2mla" and latent != "joint":
        return ("--method mha2mla is the weight SVD of the stacked [W_k W_v], one joint latent: use --latent joint "
                "(with separate latents it is --method svd)")
    return None


def check_finite_numbers(settings) -> None:
    """Refuse NaN or infinite numbers in any field of a settings dataclass (``--damping nan`` passes every
    comparison-based range check, since NaN compares false)."""
    import math

    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, float) and not math.isfinite(x):
                raise SettingsError(f"{f.name} must be a finite number; got {x}")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


class SettingsFile:
    """What every settings dataclass of care-mla does with its fields: `to_dict`, `from_dict` (unknown keys refused,
    missing required ones named) and `save` (the JSON written next to every output)."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in data]
        if missing:
            raise SettingsError(f"missing setting(s): {', '.join(missing)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class ConvertSettings(SettingsFile):
    """Everything that decides a conversion. Unknown keys are refused by `from_dict`.

    `latent` and `allocation` left as None take the format's default (care_mla: joint — separate for the
    methods that build no joint latent: svd, asvd, svd-llm —, uniform — adjusted for separate latents;
    deepseek: decoupled, uniform) and are stored resolved; so do `objective` and `refit_output`.
    """

    model: str = "smollm2-135m-instruct"
    out: str = "runs/convert"
    format: Literal["care_mla", "deepseek"] = "care_mla"  # output: latent-cache model or stock DeepseekV3
    kv_fraction: float = 0.5  # kept fraction of the GQA KV width (1.0 = parity)
    method: Literal["care", "svd", "asvd", "svd-llm", "mha2mla", "transmla"] = "care"
    allocation: Literal["uniform", "adjusted"] | None = None
    allocation_score: Literal["energy", "paper"] = "energy"
    latent: Literal["separate", "joint", "decoupled"] | None = None
    rope_dim: int | None = None  # decoupled: qk_rope_head_dim (None: chosen by calibration loss, `selection`)
    rope_strategy: Literal["pca", "partial"] = "pca"  # decoupled: how RoPE components are chosen
    rope_context: int | None = None  # decoupled: relative distance the RoPE choice is judged over
    portable: bool = False  # deepseek: only what vLLM/SGLang run (default RoPE, no biases)
    # shape the export for a serving engine: implies format deepseek + portable and picks the engine's MLA
    # geometry nearest to kv_fraction (`deepseek.engine_geometry`; resolved by `convert.resolve_engine`)
    engine: Literal["vllm", "vllm-cpu", "sglang"] | None = None
    balance_kv: bool = True  # joint latent of care/transmla: scale K against V first (mha2mla never does)
    # care: what the factors minimise. "activation": the K/V activation error (the paper's CARE); "value": V's
    # error as o_proj writes it to the residual stream; "attention": that and K's error as the queries read it
    # (`objectives`); "auto": activation, value or attention, whichever gives the lowest calibration loss. None: auto for the
    # joint and decoupled latents of care below parity (measured better, README), activation otherwise (the paper's CARE;
    # at parity every objective is exact)
    objective: Literal["auto", "activation", "value", "attention"] | None = None
    # joint/decoupled latents of care: weight of K's error against V's after balancing (>1: K counts more);
    # "auto": the value of `selection.KEY_EMPHASIS_GRID` with the lowest calibration loss (1.0 with the
    # activation objective, which keeps the paper's/TransMLA's balance)
    key_emphasis: float | str = "auto"
    # care, any layout: fit each layer on the converted layers' outputs to the original layer's
    # (`compensation`; about twice a calibration's forward passes)
    compensate: bool = False
    # any layout: refit each layer's o_proj (not cached) by least squares from the converted attention's heads
    # to the original attention's output on the same inputs (`compensation.refit_output_weight`; on the original
    # stream in the one-pass conversion, else on the converted stream layer by layer, as compensation does). None: on for care below parity (measured better on
    # both models, README), off at parity (exact: nothing to refit) and for the baselines (as their authors made them)
    refit_output: bool | None = None
    # calibration windows (evenly spaced) the output refit is fitted on: of the original stream in the one-pass
    # conversion (`single_pass`), of the converted stream in two passes; compensation runs every window. Two passes,
    # SmolLM2, 256 × 256 calibration, held-out ppl ratio at F = 0.25 with the refit over 64 / 128 / all 256 windows:
    # 1.224 / 1.217 / 1.210 (docs/benchmarks.md); 128 stays within 1 % at half the passes. None: all
    refit_samples: int | None = 128
    # the default layout (care, joint latent, uniform ranks, refit, no compensation) converts in one pass over the
    # calibration windows: each layer's statistics, its objective (chosen per layer by its attention-output error),
    # factors and refit on the original stream (`pipeline.single_pass`); False (--two-pass): calibrate, choose one
    # objective for all layers by calibration loss of whole candidate models, then refit on the converted stream
    single_pass: bool = True
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
    # forward passes of calibration; "auto": the fastest numerically safe dtype of this machine, measured
    # (`hardware.resolve_auto_dtype`: bf16 where it is native, fp32 on AVX2-only CPUs where bf16 is ~47x slower)
    calib_dtype: Literal["auto", "same", "float32", "bfloat16", "float16"] = "auto"
    evaluate: bool = True
    zero_shot_tasks: tuple[str, ...] = ()  # lm-eval tasks for original and converted (lastword, nextsent, arc_easy…)
    zero_shot_limit: int | None = 500  # items per zero-shot task (None: all)
    overwrite: bool = False
    progress: bool = True
    cache_dir: str | None = None  # where calibration statistics are kept; None = care-mla's cache
    layerwise: bool = True  # read, calibrate and write one decoder layer at a time (every latent and format)
    # devices and their budgets, accelerate style ("0=20GiB,1=20GiB,cpu=64GiB"): a decoder layer too large for
    # the first is spread over the others (layer by layer); the whole-model path loads with device_map="auto"
    max_memory: str | None = None

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        if self.engine is not None:
            _one_of("engine", self.engine, ENGINES)
            object.__setattr__(self, "format", "deepseek")
            object.__setattr__(self, "portable", True)
        _one_of("format", self.format, FORMATS)
        deepseek = self.format == "deepseek"
        if self.latent is None:
            # the best measured care_mla layout is the default: one joint K/V latent (SmolLM2 ppl ratio at
            # F = 0.5 / 0.25 / 0.125: 1.125 / 1.411 / 2.247 against 1.352 / 1.705 / 2.547 for the paper's separate
            # latents; a held-out model of another family: 1.78 vs 2.86 at F = 0.25). Methods that build no joint
            # latent (svd, asvd, svd-llm) keep separate ones; --latent separate is the paper's CARE.
            default = "joint" if self.method in JOINT_METHODS else "separate"
            object.__setattr__(self, "latent", "decoupled" if deepseek else default)
        if self.allocation is None:
            # decoupled: adjusted widths measured worse than uniform on SmolLM2 (ppl ratio at F=0.5 /
            # 0.25: 1.352 / 1.990 vs 1.348 / 1.953), so uniform is its default too; the joint latent's measured
            # numbers above are uniform
            uniform = deepseek or self.latent in ("decoupled", "joint")
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
        _one_of("calib_dtype", self.calib_dtype, CALIB_DTYPES)
        latent_error = method_latent_error(self.method, self.latent)
        if latent_error:
            raise SettingsError(latent_error)
        self._resolve_objective()
        if self.refit_output is None:
            object.__setattr__(self, "refit_output", self.method == "care" and self.kv_fraction < 1.0)
        if self.compensate and self.method != "care":
            raise SettingsError(f"--compensate refits CARE's factors; --method {self.method} has no compensated form: "
                                "use --method care or drop --compensate")
        tasks = self.zero_shot_tasks
        object.__setattr__(self, "zero_shot_tasks", (tasks,) if isinstance(tasks, str) else tuple(tasks))
        if self.zero_shot_tasks and not self.evaluate:
            raise SettingsError("zero-shot tasks are part of the evaluation; drop --no-eval or the zero-shot tasks")
        limit = self.zero_shot_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise SettingsError(f"zero_shot_limit must be a positive integer (or None for all); got {limit!r}")
        if self.damping < 0:
            raise SettingsError(f"damping must be ≥ 0; got {self.damping}")
        if not (0 < self.rank_min_ratio <= 1 <= self.rank_max_ratio):
            raise SettingsError("need 0 < rank_min_ratio ≤ 1 ≤ rank_max_ratio")
        if self.max_memory is not None:  # always parsed, whichever stages run (cached statistics, --no-eval)
            devices = set(parse_max_memory(self.max_memory))
            if self.device == "cpu" and devices != {"cpu"}:
                raise SettingsError("--max-memory names GPUs but --device is cpu; use --device cuda (or auto)")
        if self.refit_samples is not None and self.refit_samples < 1:
            raise SettingsError(f"refit_samples must be a positive integer (or None for every calibration window); "
                                f"got {self.refit_samples}")
        for name in ("calib_samples", "calib_seq_len", "eval_samples", "eval_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be a positive integer; got {getattr(self, name)}")

    @property
    def sequential_fit(self) -> bool:
        """The conversion runs the converted stream layer after layer (`compensate` or `refit_output`)."""
        return self.compensate or self.refit_output

    def _resolve_objective(self) -> None:
        if self.objective is None:
            # at parity (F = 1) every objective reconstructs the layer exactly: nothing to choose
            joint = self.method == "care" and self.latent in ("joint", "decoupled") and self.kv_fraction < 1.0
            object.__setattr__(self, "objective", "auto" if joint else "activation")
        _one_of("objective", self.objective, ("auto", *OBJECTIVES))
        if self.objective != "activation" and self.method != "care":
            raise SettingsError(f"--objective {self.objective} weights CARE's factorization; --method {self.method} has "
                                "its own objective (use --method care, or --objective activation)")
        emphasis = self.key_emphasis
        if emphasis == "auto":
            if self.objective == "activation" or self.latent == "separate":
                object.__setattr__(self, "key_emphasis", 1.0)
            return
        if isinstance(emphasis, bool) or not isinstance(emphasis, (int, float)) or not (0 < emphasis < math.inf):
            raise SettingsError(f"key_emphasis must be 'auto' or a number > 0; got {emphasis!r}")
        object.__setattr__(self, "key_emphasis", float(emphasis))

    @property
    def max_memory_map(self) -> dict[int | str, int] | None:
        """`max_memory` as accelerate takes it (device → bytes), None when not set."""
        return None if self.max_memory is None else parse_max_memory(self.max_memory)



def parse_max_memory(text: str) -> dict[int | str, int]:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` → ``{0: 21474836480, 1: ..., "cpu": ...}`` (GPU index or "cpu" = size)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, size = item.partition("=")
        key = key.strip()
        if not sep or not (key.isdigit() or key == "cpu"):
            raise SettingsError(f"--max-memory entries are DEVICE=SIZE with DEVICE a GPU index or 'cpu' "
                                f"(e.g. 0=20GiB,1=20GiB,cpu=64GiB); got {item!r}")
        device = int(key) if key.isdigit() else key
        if device in out:
            raise SettingsError(f"--max-memory names device {key!r} twice; give each device one size")
        try:
            out[device] = convert_file_size_to_int(size.strip())
        except ValueError as err:
            raise SettingsError(f"--max-memory size {size.strip()!r} is not a size like 20GiB or 500MB") from err
    if not out:
        raise SettingsError("--max-memory names no device (e.g. 0=20GiB,1=20GiB,cpu=64GiB)")
    return out
