"""The README's demo: SmolLM2-135M at half the KV cache, CARE (adjusted) against weight SVD."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .convert import convert
from .settings import ConvertSettings

DEMO_RUNS = (
    ("CARE, adjusted ranks", dict(method="care", allocation="adjusted")),
    ("weight SVD, uniform ranks", dict(method="svd", allocation="uniform")),
)


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
    base = ConvertSettings(kv_fraction=kv_fraction, overwrite=overwrite, **overrides)
    rows, original = [], None
    for name, change in DEMO_RUNS:
        folder = out / change["method"]
        report = convert(replace(base, out=str(folder), **change))
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
    (out / "demo.md").write_text(table + "\n")
    return table
