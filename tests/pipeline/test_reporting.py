"""Each stage of a conversion is timed, logged and its peak memory attributed to it."""

from __future__ import annotations

import logging
import mmap
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import settings_for

from care_mla.pipeline import convert as api
from care_mla.pipeline.reporting import RssSampler, StageTimer


@contextmanager
def _touched_block(mb: int = 300):
    """`mb` MB of anonymous memory mapped, written and unmapped on exit: resident while the block runs and given
    back after, whatever the allocator keeps (a freed numpy array can stay resident in a long test session)."""
    block = mmap.mmap(-1, mb * 2**20)
    view = np.frombuffer(block, dtype=np.uint8)
    view[:] = 1
    try:
        yield
    finally:
        del view
        block.close()


def test_stage_timer_attributes_a_peak_to_the_stage_that_made_it(caplog):
    stage = StageTimer(interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="care_mla.pipeline.reporting"):
        with stage("small"):
            pass
        with stage("large"):
            with _touched_block():
                pass
        with stage("after"):
            pass
    assert stage.peak_rss_mb["large"] >= stage.peak_rss_mb["small"] + 250
    assert stage.peak_rss_mb["after"] < stage.peak_rss_mb["large"] - 250  # freed: not counted again
    assert set(stage.seconds) == {"small", "large", "after"} and all(s >= 0 for s in stage.seconds.values())
    messages = [r.getMessage() for r in caplog.records]
    assert "stage large" in messages and any(m.startswith("stage large done in") for m in messages)


def test_rss_sampler_gives_the_peak_since_it_was_last_taken():
    """The one pass's steps alternate layer after layer: each `take` is the peak since the one before."""
    import time

    with RssSampler(interval_s=0.01) as rss:
        rss.take()
        before = rss.take()
        with _touched_block():
            time.sleep(0.05)
        large = rss.take()
        time.sleep(0.05)
        after = rss.take()
    assert large >= before + 250 and after < large - 250


def test_rss_sampler_never_gives_a_sample_read_before_a_take_to_the_step_after(monkeypatch):
    """The race that made the peak of a freed block land on the next step late in a long suite: the sampling thread
    reads the resident set while the block exists, the step ends (`take`), then the thread stores what it read."""
    import threading
    import time

    read = threading.Event()

    def rss_mb(self):
        if threading.current_thread() is self._thread and not read.is_set():
            read.set()
            time.sleep(0.2)  # what the thread read is stored only after the main thread's take() below
            return 1000.0
        return 10.0

    monkeypatch.setattr(RssSampler, "_rss_mb", rss_mb)
    with RssSampler(interval_s=0.001) as rss:
        assert read.wait(5)
        during = rss.take()  # waits for the sample in flight: it belongs to this step
        after = rss.take()
    assert during == 1000.0 and after == 10.0


@pytest.mark.parametrize("single_pass", [True, False])
def test_report_has_every_stage_with_its_time_and_memory(single_pass, tiny_model_dir, text_file, tmp_path):
    report = api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, kv_fraction=0.5,
                                      single_pass=single_pass))
    stages = (["load", "calibrate_choose_refit", "save", "evaluate"] if single_pass else
              ["load", "calibrate", "choose_settings", "factorize_and_save", "evaluate"])
    assert list(report["timings_s"]) == stages and list(report["peak_rss_mb_by_stage"]) == stages
    for name in stages:
        assert 0 < report["peak_rss_mb_by_stage"][name] <= report["peak_rss_mb"] + 1
    if single_pass:  # and the pass's own steps (statistics, forward, choice, refit, drift: peaks over the layers)
        steps = report["single_pass"]["peak_rss_mb_by_step"]
        assert set(steps) == {"statistics", "forward", "choice", "refit", "drift"}
        assert all(0 < mb <= report["peak_rss_mb"] + 1 for mb in steps.values())  # ru_maxrss: the true peak
