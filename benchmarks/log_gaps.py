"""Run a command and measure what its log showed: the longest silences, and how true its progress bars' ETAs were.

Every line and every progress-bar refresh (tqdm writes '\\r') of the command's stdout and stderr is stamped with
the time it arrived. Printed afterwards:

* the longest gaps between two outputs, each with the last output before it (which stage was silent);
* for each progress bar (tqdm's ``n/total [elapsed<remaining`` format, identified by its description), the
  remaining time the bar predicted when it was a quarter and half done against the time it then really took,
  as a ratio (1.0 = exact; the bar is the same description from its first refresh to its last).

    python benchmarks/log_gaps.py -- care-mla demo --out runs/demo --overwrite
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import time

BAR = re.compile(r"^(?P<desc>.*?):?\s*\d+%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:?]+)")


def seconds(stamp: str) -> float | None:
    if "?" in stamp:
        return None
    value = 0.0
    for part in stamp.split(":"):
        value = value * 60 + float(part)
    return value


def run(command: list[str]) -> tuple[list[tuple[float, str]], int]:
    """(time since start, text) of every line or bar refresh the command wrote, and its exit status."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    buffers = {}
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
        buffers[stream] = b""
    events = []
    while sel.get_map():
        for key, _ in sel.select():
            chunk = key.fileobj.read()
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            now = time.perf_counter() - start
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            parts = re.split(rb"[\r\n]", buffers[key.fileobj] + chunk)
            buffers[key.fileobj] = parts.pop()
            events += [(now, p.decode(errors="replace").strip()) for p in parts if p.strip()]
    proc.wait()
    return events + [(time.perf_counter() - start, "(exit)")], proc.returncode


def gaps(events: list[tuple[float, str]], top: int) -> list[tuple[float, float, str]]:
    """The `top` longest (gap s, at s, last output before it)."""
    out = [(b[0] - a[0], a[0], a[1]) for a, b in zip(events, events[1:])]
    return sorted(out, reverse=True)[:top]


def eta_accuracy(events: list[tuple[float, str]]) -> list[tuple[str, int, float, list[tuple[float, float]]]]:
    """Per bar: (description, total, duration s, [(fraction done, predicted ÷ real remaining)] at ¼ and ½)."""
    bars: dict[str, list[tuple[float, int, int, float | None]]] = {}
    order = []
    for t, text in events:
        m = BAR.match(text)
        if not m:
            continue
        key = f"{m['desc'].strip()} /{m['total']}"
        if key not in bars:
            bars[key] = []
            order.append(key)
        bars[key].append((t, int(m["n"]), int(m["total"]), seconds(m["remaining"])))
    out = []
    for key in order:
        rows = bars[key]
        total = rows[0][2]
        done = [r for r in rows if r[1] == total]
        if not done or total < 4:
            continue
        end = done[0][0]
        checks = []
        for fraction in (0.25, 0.5):
            at = next((r for r in rows if r[1] >= fraction * total and r[3] is not None), None)
            if at is not None and end - at[0] > 0:
                checks.append((fraction, at[3] / (end - at[0])))
        out.append((key, total, end - rows[0][0], checks))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=5, help="how many of the longest silences to print")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command to run after --")
    events, status = run(command)
    print(f"\nexit status {status}, {events[-1][0]:.0f} s, {len(events)} outputs")
    print("\n| longest silences | s | at s | after |")
    print("|---|---|---|---|")
    for gap, at, text in gaps(events, a.top):
        print(f"| | {gap:.1f} | {at:.0f} | {text[:110]} |")
    print("\n| progress bar | steps | s | predicted ÷ real remaining at ¼ done | at ½ done |")
    print("|---|---|---|---|---|")
    for key, total, duration, checks in eta_accuracy(events):
        cells = {f: f"{r:.2f}" for f, r in checks}
        print(f"| {key[:70]} | {total} | {duration:.0f} | {cells.get(0.25, '—')} | {cells.get(0.5, '—')} |")
    sys.exit(status)


if __name__ == "__main__":
    main()
