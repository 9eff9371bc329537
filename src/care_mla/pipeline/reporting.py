"""Stage 7, report: report.json, what was built from what and how, with each stage's time and the peak memory.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from care_mla.evaluation.perplexity import (
    kv_cache_width,
)
from care_mla.formats.families import gqa_kv_width
from care_mla.io.outputs import write_text_atomic
from care_mla.method.statistics import CalibrationStats
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"


class StageTimer:
    """Wall seconds per stage (report.json's ``timings_s``); the log says when each stage starts and ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        logger.info("stage %s", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        logger.info("stage %s done in %.1f s", name, self.seconds[name])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report_head(model_path: str, config, converted_config, architecture: str, fields: dict,
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


def write_report(report: dict, timings: dict, folder: Path, *, pending: bool = False) -> None:
    """Write report.json (atomically) into `folder`; `pending`: the evaluation is still to come."""
    if pending:
        report["evaluation_status"] = "pending"
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_text_atomic(Path(folder) / REPORT_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")
