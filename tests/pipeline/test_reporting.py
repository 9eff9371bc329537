"""Each stage of a conversion is timed, logged and its peak memory attributed to it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import settings_for

from care_mla.pipeline import convert as api
from care_mla.pipeline.reporting import StageTimer


def test_stage_timer_attributes_a_peak_to_the_stage_that_made_it(caplog):
    stage = StageTimer(interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="care_mla.pipeline.reporting"):
        with stage("small"):
            pass
        with stage("large"):
            block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
            del block
        with stage("after"):
            pass
    assert stage.peak_rss_mb["large"] >= stage.peak_rss_mb["small"] + 250
    assert stage.peak_rss_mb["after"] < stage.peak_rss_mb["large"] - 250  # freed: not counted again
    assert set(stage.seconds) == {"small", "large", "after"} and all(s >= 0 for s in stage.seconds.values())
    messages = [r.getMessage() for r in caplog.records]
    assert "stage large" in messages and any(m.startswith("stage large done in") for m in messages)


@pytest.mark.parametrize("single_pass", [True, False])
def test_report_has_every_stage_with_its_time_and_memory(single_pass, tiny_model_dir, text_file, tmp_path):
    report = api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, kv_fraction=0.5,
                                      single_pass=single_pass))
    stages = (["load", "calibrate_choose_refit", "save", "evaluate"] if single_pass else
              ["load", "calibrate", "choose_settings", "factorize_and_save", "evaluate"])
    assert list(report["timings_s"]) == stages and list(report["peak_rss_mb_by_stage"]) == stages
    for name in stages:
        assert 0 < report["peak_rss_mb_by_stage"][name] <= report["peak_rss_mb"] + 1
