"""Conversion wall time of two source trees side by side: A, B, A, B, ... each run its own process and empty cache.

A shared machine's speed drifts by as much as a change saves (the plain forward of `convert_speed.py` spread over
48–53 s within one benchmark), so a before/after comparison alternates the two trees. Usage:

    python benchmarks/convert_ab.py --a /path/to/old/src --b src [--which default|paper] [--repeat 2]
                                    [--samples 256] [--seq-len 256]

``--a`` / ``--b``: folders that hold the ``care_mla`` package (a `git worktree` of the old commit's ``src``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from convert_speed import CONVERT  # benchmarks/ is on the path of a script run from it

#: The paper's CARE: separate latents, the activation objective, no output refit (as `convert_speed.py --paper`).
PAPER = {"latent": "separate", "objective": "activation", "refit_output": False}


def run(src: Path, args: dict) -> dict:
    if not (src / "care_mla").is_dir():
        raise SystemExit(f"{src} holds no care_mla package: give the src folder of a checkout or worktree")
    out = subprocess.run([sys.executable, "-c", CONVERT, json.dumps(args)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(src.resolve())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="src folder of the first tree (e.g. the code before)")
    p.add_argument("--b", type=Path, required=True, help="src folder of the second tree")
    p.add_argument("--which", choices=["default", "paper"], default="default")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-dtype", default="auto")
    a = p.parse_args()
    seconds: dict[str, list[float]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.repeat):
            for name, src in (("a", a.a), ("b", a.b)):
                r = run(src, {"model": a.model, "samples": a.samples, "seq_len": a.seq_len, "batch_size": 8,
                              "calib_dtype": a.calib_dtype, "out": f"{tmp}/out", "cache": f"{tmp}/cache-{name}-{k}",
                              "device": "cpu", "format": "care_mla", "layerwise": True,
                              "settings": PAPER if a.which == "paper" else {}})
                seconds[name].append(r["seconds"])
                print(f"round {k + 1}, {name} ({src}): {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"stages {r['timings_s']}"
                      + (f", one pass by step {r['single_pass_s']}" if r.get("single_pass_s") else ""), flush=True)
    ma, mb = statistics.median(seconds["a"]), statistics.median(seconds["b"])
    print(f"{a.which} conversion, median of {a.repeat}: a {ma:.1f} s, b {mb:.1f} s, b / a {mb / ma:.3f}")


if __name__ == "__main__":
    main()
