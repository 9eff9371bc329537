"""A log line every few seconds while a call that shows no progress of its own runs (a third-party loader, say),
so that no stage of a run is silent for long."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def heartbeat(logger: logging.Logger, what: str, every: float = 5.0) -> Iterator[None]:
    """Log ``"<what>: still running (N s)"`` on `logger` every `every` seconds until the block ends (from a daemon
    thread, stopped and joined on exit, also when the block raises)."""
    if every <= 0:
        raise ValueError(f"every must be > 0 seconds, got {every}")
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            logger.info("%s: still running (%.0f s)", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, name="care-mla-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
