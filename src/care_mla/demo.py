"""The README's demo: SmolLM2-135M at half the KV cache, CARE (its default layout) against weight SVD.

Sized to finish in minutes on a 2-core CPU without native bf16: calibration on 64 windows × 256
tokens (16K tokens; `convert`'s default is 256 × 256) and held-out perplexity on 16 × 256
tokens (default 64 × 256). Both methods share one calibration (the statistics are cached), so
the second conversion skips it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from care_mla.io.outputs import write_text_atomic
from care_mla.pipeline.convert import convert
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)

DEMO_RUNS = (
    ("CARE (default, one pass: joint K/V latent, objective chosen per layer, output refit)", dict(method="care")),
    ("weight SVD, uniform ranks", dict(method="svd", allocation="uniform")),
)
#: The demo's token budget (see the module docstring).
DEMO_SIZES = dict(calib_samples=64, calib_seq_len=256, eval_samples=16, eval_seq_len=256)


def format_table(rows: list[dict]) -> str:
    """Markdown table: method, KV bytes/token, held-out ppl and its ratio to the original."""
    lines = [
        "| model | KV cache / token / layer | KV bytes / token | held-out ppl | × original |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['width']:g} | {r['bytes']:,.0f} | {r['ppl']:.3f} | {r['ratio']:.3f}× |"
        )
    return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", *, kv_fraction: float = 0.5, overwrite: bool = False, **overrides) -> str:
    """Convert the default model with each demo method; return (and write) the comparison table."""
    out = Path(out)
    common = dict(kv_fraction=kv_fraction, overwrite=overwrite, **{**DEMO_SIZES, **overrides})
    base = ConvertSettings(**common)
    rows, original = [], None
    start = time.perf_counter()
    for n, (name, change) in enumerate(DEMO_RUNS, 1):
        logger.info("demo stage %d/%d: %s at F=%g (calibrate %d x %d tokens, evaluate %d x %d)", n, len(DEMO_RUNS),
                    name, kv_fraction, base.calib_samples, base.calib_seq_len, base.eval_samples, base.eval_seq_len)
        t = time.perf_counter()
        report = convert(ConvertSettings(**{**common, "out": str(out / change["method"]), **change}))
        done = time.perf_counter() - t
        logger.info("demo stage %d/%d done in %.0f s (%s)", n, len(DEMO_RUNS), done,
                    ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items()))
        if original is None:
            original = {
                "name": "original (GQA)",
                "width": report["kv_cache_width_per_layer"]["original"],
                "bytes": report["kv_bytes_per_token"]["original_measured"],
                "ppl": report["ppl"]["original"],
                "ratio": 1.0,
            }
            rows.append(original)
        rows.append(
            {
                "name": f"{name}, F={kv_fraction:g}",
                "width": report["kv_cache_width_per_layer"]["converted"],
                "bytes": report["kv_bytes_per_token"]["converted_measured"],
                "ppl": report["ppl"]["converted"],
                "ratio": report["ppl"]["ratio"],
            }
        )
    table = format_table(rows)
    footer = (f"SmolLM2-135M-Instruct, calibration {base.calib_samples} x {base.calib_seq_len} tokens, held-out "
              f"{base.eval_samples} x {base.eval_seq_len} tokens; {time.perf_counter() - start:.0f} s")
    write_text_atomic(out / "demo.md", table + "\n\n" + footer + "\n")
    return table + "\n\n" + footer
