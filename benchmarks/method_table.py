"""Held-out perplexity of every method at several KV budgets on one model, as a Markdown table.

Calibrates once (the statistics are cached), converts each combination, evaluates it, and
prints ppl (and its ratio to the original) per cell. Usage:

    python benchmarks/method_table.py [--model smollm2-135m-instruct] [--fractions 1.0,0.5,0.25,0.125]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from care_mla.pipeline.convert import convert
from care_mla.settings import ConvertSettings

ROWS = {
    "weight SVD (uniform)": dict(method="svd", allocation="uniform"),
    "ASVD (uniform)": dict(method="asvd", allocation="uniform"),
    "SVD-LLM (uniform)": dict(method="svd-llm", allocation="uniform"),
    "CARE uniform": dict(method="care", allocation="uniform"),
    "CARE adjusted (paper score)": dict(method="care", allocation="adjusted", allocation_score="paper"),
    "CARE adjusted (energy score)": dict(method="care", allocation="adjusted", allocation_score="energy"),
    "MHA2MLA joint weight SVD (uniform)": dict(method="mha2mla", allocation="uniform", latent="joint"),
    "TransMLA output PCA, joint (uniform)": dict(method="transmla", allocation="uniform", latent="joint"),
    "CARE joint K/V uniform": dict(method="care", allocation="uniform", latent="joint"),
    "CARE joint K/V adjusted": dict(method="care", allocation="adjusted", latent="joint"),
    "CARE decoupled RoPE adjusted (latent cache)": dict(method="care", allocation="adjusted", latent="decoupled"),
    "DeepSeek format PCA RoPE": dict(format="deepseek"),
    "DeepSeek format partial RoPE": dict(format="deepseek", rope_strategy="partial"),
    "DeepSeek format PCA RoPE portable": dict(format="deepseek", portable=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--fractions", default="1.0,0.5,0.25,0.125")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--json", default=None, help="also write every report here")
    a = p.parse_args()
    fractions = [float(f) for f in a.fractions.split(",")]
    rows = a.rows.split(",")
    results: dict[str, dict[float, dict]] = {}
    original = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            results[name] = {}
            for f in fractions:
                s = ConvertSettings(model=a.model, out=str(Path(tmp) / "out"), kv_fraction=f, overwrite=True, progress=False,
                                    calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len,
                                    eval_samples=a.eval_samples, eval_seq_len=a.eval_seq_len, **ROWS[name])
                r = convert(s)
                shutil.rmtree(s.out)
                original = r["ppl"]["original"]
                results[name][f] = r
                kv = r["kv_bytes_per_token"]["converted_measured"]
                print(f"{name:44s} F={f:<6g} ppl {r['ppl']['converted']:10.3f} ({r['ppl']['ratio']:.3f}×) "
                      f"{kv:.0f} B/token", flush=True)
    header = "| method | " + " | ".join(f"F={f:g} ({(1 - f) * 100:g} % saved)" for f in fractions) + " |"
    print(f"\noriginal held-out ppl {original:.3f}; cells: ppl (× original), KV-cache bytes per token "
          f"(measured after generate, all layers)\n")
    print(header)
    print("|---" * (len(fractions) + 1) + "|")
    for name in rows:
        cells = [
            f"{r['ppl']['converted']:.2f} ({r['ppl']['ratio']:.3f}×) · {r['kv_bytes_per_token']['converted_measured']:.0f} B"
            for r in (results[name][f] for f in fractions)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({n: {str(f): r for f, r in v.items()} for n, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
