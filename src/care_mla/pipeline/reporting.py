"""Stage 7, report: report.json, what was built from what and how, with each stage's time and the peak memory.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

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
    """Wall seconds and peak resident memory per stage (report.json's ``timings_s`` and ``peak_rss_mb_by_stage``);
    the log says when each stage starts and ends, and what it took."""

    def __init__(self, interval_s: float = 0.05):
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.interval_s = interval_s

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        logger.info("stage %s", name)
        start = time.perf_counter()
        with RssSampler(self.interval_s) as rss:  # ru_maxrss is the whole run's peak: it cannot tell stages apart
            yield
            peak = rss.take()
        self.seconds[name] = time.perf_counter() - start
        self.peak_rss_mb[name] = round(peak, 1)
        logger.info("stage %s done in %.1f s (peak memory %.0f MB)", name, self.seconds[name], peak)


class RssSampler:
    """A daemon thread sampling this process's resident set size every `interval_s`; `take()` returns the largest
    seen since the last `take()` (or the start) — the peak of each step of a loop whose steps alternate."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self._max = interval_s, 0.0
        self._process = psutil.Process()
        # A sample is read and stored under the lock, so one read before a take() cannot land after it.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="care-mla-rss-steps", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                self._max = max(self._max, self._rss_mb())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def take(self) -> float:
        with self._lock:
            peak, self._max = max(self._max, self._rss_mb()), 0.0
        return peak


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


def write_report(report: dict, stages: StageTimer, folder: Path, *, pending: bool = False) -> None:
    """Write report.json (atomically) into `folder`; `pending`: the evaluation is still to come."""
    if pending:
        report["evaluation_status"] = "pending"
    report["timings_s"] = {k: round(v, 3) for k, v in stages.seconds.items()}
    report["peak_rss_mb_by_stage"] = dict(stages.peak_rss_mb)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_text_atomic(Path(folder) / REPORT_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")
