"""care_mla.io.heartbeat: a call without progress of its own is not silent."""

from __future__ import annotations

import logging
import time

import pytest

from care_mla.io.heartbeat import heartbeat

logger = logging.getLogger("care_mla.test_heartbeat")


def test_a_line_every_interval_while_the_block_runs_and_none_after(caplog):
    caplog.set_level(logging.INFO, logger=logger.name)
    with heartbeat(logger, "loading", every=0.05):
        time.sleep(0.32)
    lines = [r.getMessage() for r in caplog.records]
    assert 3 <= len(lines) <= 7 and all(m.startswith("loading: still running (") for m in lines)
    time.sleep(0.15)
    assert len(caplog.records) == len(lines)  # the thread stopped with the block


def test_stops_when_the_block_raises_and_refuses_a_bad_interval(caplog):
    caplog.set_level(logging.INFO, logger=logger.name)
    with pytest.raises(RuntimeError, match="boom"):
        with heartbeat(logger, "x", every=0.05):
            raise RuntimeError("boom")
    time.sleep(0.12)
    assert not caplog.records
    with pytest.raises(ValueError, match="every"):
        with heartbeat(logger, "x", every=0):
            pass
