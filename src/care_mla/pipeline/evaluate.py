"""Stage 6, evaluate: held-out perplexity, KV bytes per token (from the config and measured from a real cache) and
zero-shot accuracy of the original and the written model; a failed evaluation keeps the model and says how to
re-run it alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from care_mla.evaluation.perplexity import (
    check_finite_ppl,
    kv_bytes_per_token,
    measured_kv_bytes_per_token,
    perplexity,
)
from care_mla.io import assets
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.io.text import check_text_file, load_windows
from care_mla.pipeline.calibration import (
    model_fingerprint,
)
from care_mla.pipeline.load import ModelSource, load_model, load_pretrained, resolve_device, torch_dtype
from care_mla.pipeline.reporting import StageTimer, write_report
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """The converted model was written but its evaluation failed; the message says how to re-run it alone."""


def original_perplexity(model, model_path: str, windows: torch.Tensor, settings: ConvertSettings, dtype) -> float:
    """Perplexity of the unconverted model, remembered per (model, windows, dtype) in the cache folder."""
    cache_root = assets.resolve_cache_dir(settings.cache_dir)
    h = hashlib.sha256(model_fingerprint(model_path, cache_root))
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


def evaluate_saved(report: dict, stage: StageTimer, folder: OutputFolder, source: ModelSource, settings: ConvertSettings,
                   dtype: torch.dtype, device: torch.device) -> None:
    """Stage 6: evaluate the model written to `folder` against the original (`source`'s model when it is in
    memory, else loaded) and rewrite its report.

    Whatever goes wrong (an error, Ctrl-C), the model stays written and report.json says what
    happened; an error is re-raised as `EvaluationError` naming the command that re-runs the
    evaluation alone.
    """
    try:
        original = source.model
        if original is None:
            original = load_model(source.path, dtype, device, settings.max_memory_map)[0]
        converted = load_pretrained(str(folder.out), dtype, device, settings.max_memory_map)
        evaluate_into(report, stage, original, converted, source.tokenizer, source.path, settings, dtype)
    except BaseException as err:
        reason = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else f"{type(err).__name__}: {err}"
        report["evaluation_status"] = f"failed: {reason}"
        write_report(report, stage, folder.out)
        if isinstance(err, Exception):
            raise EvaluationError(
                f"the converted model was written to {folder.out}, but its evaluation failed ({reason}); re-run only "
                f"the evaluation with: care-mla eval {folder.out}"
            ) from err
        raise
    report["evaluation_status"] = "done"
    write_report(report, stage, folder.out)


def evaluate_into(report: dict, stage: StageTimer, original, converted, tokenizer, model_path: str,
                  settings: ConvertSettings, dtype) -> None:
    with stage("evaluate"):
        pair = evaluate_pair(original, converted, tokenizer, model_path, settings, dtype)
    for name, value in pair["ppl"].items():  # report.json never holds NaN (it would not be JSON)
        check_finite_ppl(value, f"the {name} model's perplexity")
    report.update(pair)
    report["ppl"]["ratio"] = report["ppl"]["converted"] / report["ppl"]["original"]
    if settings.zero_shot_tasks:
        with stage("zero_shot"):
            report["zero_shot"] = zero_shot_pair(original, converted, tokenizer, settings)
        from care_mla.evaluation.zeroshot import paired_difference

        # converted − original on the same documents: the error of a difference, not of two scores
        report["zero_shot_difference"] = paired_difference(report["zero_shot"]["converted"],
                                                           report["zero_shot"]["original"])


def evaluate_folder(path: str, *, eval_text: str = "austen", eval_samples: int = 64, eval_seq_len: int = 256,
                    dtype: str = "float32", device: str = "auto", batch_size: int = 8, progress: bool = True,
                    zero_shot_tasks: tuple[str, ...] | list[str] = (), zero_shot_limit: int | None = 500,
                    cache_dir: str | None = None) -> dict:
    """Held-out perplexity and KV bytes per token of a saved model (converted or original), and its zero-shot
    accuracy (lm-eval) on `zero_shot_tasks` (``paper``: the paper's suite) when asked: ``report["zero_shot"]``."""
    dev = resolve_device(device)
    dt = torch_dtype(dtype, dev)
    check_text_file(eval_text, "evaluation")
    if zero_shot_tasks:  # a missing lm-eval, an unknown task or tasks that cannot be built: before the model loads
        from care_mla.evaluation.zeroshot import check_tasks

        check_tasks(zero_shot_tasks, eval_text, cache_dir=cache_dir)
    model, tokenizer, model_path = load_model(path, dt, dev)
    windows, text_path = load_windows(tokenizer, eval_text, "evaluation", eval_samples, eval_seq_len)
    ppl = check_finite_ppl(perplexity(model, windows, batch_size=batch_size, progress=progress))
    report = {
        "model": model_path,
        "ppl": ppl,
        "kv_bytes_per_token": kv_bytes_per_token(model.config, dt),
        "kv_bytes_per_token_measured": measured_kv_bytes_per_token(model, windows[:1, :32]),
        "evaluation": {"text": str(text_path), "samples": eval_samples, "seq_len": eval_seq_len},
        "dtype": str(dt).removeprefix("torch."),
    }
    if zero_shot_tasks:
        from care_mla.evaluation.zeroshot import evaluate_zero_shot

        report["zero_shot"] = evaluate_zero_shot(model, tokenizer, zero_shot_tasks, text=eval_text,
                                                 limit=zero_shot_limit, batch_size=batch_size, cache_dir=cache_dir)
    return report
