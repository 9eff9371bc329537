"""Typed, validated settings of a healing run (`care_mla.healing.heal`); saved next to every output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from care_mla.settings import DEVICES, SettingsError, SettingsFile, _one_of, check_finite_numbers

# float16 weights cannot be trained with Adam without loss scaling, and they cannot hold the
# ~1e-7 pre-norm latents of a DeepSeek export; bfloat16 and float32 can.
HEAL_DTYPES = ("float32", "bfloat16")

# Settings that change neither the training trajectory nor the curves, so a run may be resumed
# with other values.
RESUMABLE_CHANGES = ("overwrite", "resume", "progress", "cache_dir")


@dataclass(frozen=True)
class HealSettings(SettingsFile):
    """Everything that decides a healing run. Unknown keys are refused by `from_dict`.

    Loss per predicted token: ``CE + kd_weight·τ²·KL(teacher ‖ student)`` at temperature τ
    (``kd_temperature``); ``kd_weight = 0`` trains on CE alone and the teacher is then only
    evaluated. ``lr`` left as None takes 5e-5 for a full fine-tune and 2e-4 for LoRA, and
    ``lora_rank`` 16 with LoRA; both are stored resolved.
    """

    converted: str  # folder written by `care-mla convert` (either format)
    teacher: str  # the original model: folder, hub id, or "smollm2-135m-instruct"
    out: str
    tokens: int  # training tokens: ceil(tokens / seq_len) windows, one pass over them
    lr: float | None = None
    batch_size: int = 8  # windows per device and micro-batch
    seq_len: int = 256
    grad_accum: int = 1
    kd_weight: float = 1.0  # β
    kd_temperature: float = 1.0  # τ
    kd_top_k: int | None = None  # KL over the teacher's top-k tokens only (renormalised); None = full vocabulary
    lora: bool = False  # train LoRA adapters (merged into the weights before saving) instead of every weight
    lora_rank: int | None = None  # LoRA adapters' rank (default 16)
    train_text: str = "austen"  # 'austen' (its calibration novels) or a UTF-8 file
    eval_text: str = "austen"  # held-out: 'austen' (its evaluation novels) or a UTF-8 file
    eval_every: int = 100  # optimizer steps between held-out evaluations; 0 = before and after only
    eval_samples: int = 64
    eval_seq_len: int = 256
    zero_shot_tasks: tuple[str, ...] = ()  # scored on the original, before and after (paper, lastword, arc_easy…)
    zero_shot_limit: int | None = 200  # documents per task for those (seeded; None: all)
    eval_zero_shot_limit: int = 20  # documents per task of the slice also scored every eval_every steps (0: none)
    cache_dir: str | None = None  # where the zero-shot tasks are built; None = care-mla's cache
    save_every: int = 200  # optimizer steps between checkpoints (for --resume)
    log_every: int = 10  # optimizer steps between points of the loss curve
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights; CUDA adds bf16 autocast to float32 weights
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False
    resume: bool = False  # continue from the last checkpoint of an interrupted run (else start)
    progress: bool = True

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        for name in ("converted", "teacher", "out"):
            if not getattr(self, name):
                raise SettingsError(f"{name} must be given")
        if self.lr is None:
            object.__setattr__(self, "lr", 2e-4 if self.lora else 5e-5)
        if self.lora and self.lora_rank is None:
            object.__setattr__(self, "lora_rank", 16)
        if self.lora_rank is not None and not self.lora:
            raise SettingsError("lora_rank sets the rank of LoRA adapters; add --lora")
        for name in ("tokens", "batch_size", "grad_accum", "eval_samples", "save_every", "log_every"):
            _positive_int(name, getattr(self, name))
        if self.lora:
            _positive_int("lora_rank", self.lora_rank)
        for name in ("seq_len", "eval_seq_len"):
            _positive_int(name, getattr(self, name))
            if getattr(self, name) < 2:
                raise SettingsError(f"{name} must be at least 2 (one token in, one predicted); "
                                    f"got {getattr(self, name)}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise SettingsError(f"eval_every must be an integer ≥ 0 (0 = before and after only); "
                                f"got {self.eval_every!r}")
        tasks = self.zero_shot_tasks
        object.__setattr__(self, "zero_shot_tasks", (tasks,) if isinstance(tasks, str) else tuple(tasks))
        if self.zero_shot_limit is not None:
            _positive_int("zero_shot_limit", self.zero_shot_limit)
        if isinstance(self.eval_zero_shot_limit, bool) or not isinstance(self.eval_zero_shot_limit, int) \
                or self.eval_zero_shot_limit < 0:
            raise SettingsError(f"eval_zero_shot_limit must be an integer ≥ 0 (0 = no accuracy during training); "
                                f"got {self.eval_zero_shot_limit!r}")
        if not self.lr > 0:
            raise SettingsError(f"lr must be > 0; got {self.lr}")
        if not self.kd_weight >= 0:
            raise SettingsError(f"kd_weight must be ≥ 0 (0 = CE only, as --no-kd); got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise SettingsError(f"kd_temperature must be > 0; got {self.kd_temperature}")
        if self.kd_top_k is not None:
            _positive_int("kd_top_k", self.kd_top_k)
            if self.kd_weight == 0:
                raise SettingsError("kd_top_k picks the teacher logits to distil from; drop it, or drop --no-kd")
        _one_of("dtype", self.dtype, HEAL_DTYPES)
        _one_of("device", self.device, DEVICES)

    @property
    def num_windows(self) -> int:
        return -(-self.tokens // self.seq_len)

    def differences(self, other: HealSettings) -> list[str]:
        """Names of the settings that differ from `other`, except those a resumed run may change."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"{name} must be a positive integer; got {value!r}")
