"""Each quality lever alone and together, at several KV budgets, in one run: held-out ppl ÷ original.

Rows (one-shot, no healing; every row at the same cache width per token and layer):

* paper CARE — separate K and V latents, activation objective (the paper's method);
* joint, activation — one K/V latent, K balanced against V by output energy (the default before the levers);
* joint, objective by calibration loss — the attention-aware objectives of `care_mla.method.objectives` (V through
  o_proj, optionally K through the queries) and the K/V balance, chosen on held-in calibration windows;
* joint, activation + compensation — error compensation across layers alone (`care_mla.method.compensation`);
* joint, objective by calibration loss + compensation — both;
* joint, activation + output refit — each layer's o_proj refitted on the converted stream alone;
* joint, objective by calibration loss + output refit — today's default conversion;
* joint, objective by calibration loss + compensation + output refit — every lever;
* DeepSeek export, before — activation objective, a third of the cache for RoPE (the former fixed rule);
* DeepSeek export, objective and split by calibration loss — the choice alone;
* DeepSeek export + compensation — that, each layer's latent and RoPE keys fitted to the original outputs;
* DeepSeek export + output refit — the choice and the o_proj refit (today's default export);
* DeepSeek export + compensation + output refit — every lever.

The statistics are calibrated once per model and text (cached). Usage:

    python benchmarks/ablation.py [--model smollm2-135m-instruct] [--text austen]
        [--fractions 0.5,0.25,0.125,0.0625] [--rows "NAME;..."] [--json out.json]

A second model and text domain: ``python benchmarks/prepare_second.py --out DIR`` then
``--model DIR/qwen2.5-coder-0.5b --text DIR/foldoc.txt``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from transformers import AutoConfig

from care_mla.formats.families import head_dim
from care_mla.method.rope_split import default_rope_dim
from care_mla.pipeline.convert import convert
from care_mla.pipeline.load import resolve_model_path
from care_mla.settings import ConvertSettings

ACTIVATION = dict(objective="activation", key_emphasis=1.0)
BEFORE = dict(ACTIVATION, refit_output=False)
NO_REFIT = dict(refit_output=False)
ROWS = {
    "paper CARE (separate latents)": dict(latent="separate", allocation="uniform", **NO_REFIT),
    "joint, activation": dict(latent="joint", **BEFORE),
    "joint, objective by calibration loss": dict(latent="joint", **NO_REFIT),
    "joint, activation + compensation": dict(latent="joint", compensate=True, **BEFORE),
    "joint, objective by calibration loss + compensation": dict(latent="joint", compensate=True, **NO_REFIT),
    "joint, activation + output refit": dict(latent="joint", refit_output=True, **ACTIVATION),
    "joint, objective by calibration loss + output refit": dict(latent="joint", refit_output=True),
    "joint, objective + compensation + output refit": dict(latent="joint", compensate=True, refit_output=True),
    "DeepSeek export, before": dict(format="deepseek", rope_dim="rule", **BEFORE),
    "DeepSeek export, objective and split by calibration loss": dict(format="deepseek", **NO_REFIT),
    "DeepSeek export + compensation": dict(format="deepseek", compensate=True, **NO_REFIT),
    "DeepSeek export + output refit": dict(format="deepseek", refit_output=True),
    "DeepSeek export + compensation + output refit": dict(format="deepseek", compensate=True, refit_output=True),
}


def _cell(row: dict, config, fraction: float) -> dict:
    """The row's settings at `fraction`: the former RoPE rule spelled out (a pinned --rope-dim is not searched)."""
    row = dict(row)
    if row.get("rope_dim") == "rule":
        g, d = config.num_key_value_heads, head_dim(config)
        cache = round(fraction * 2 * g * d)
        row["rope_dim"] = None if cache >= 2 * g * d else default_rope_dim(cache, g, d)
    return row


def write_plots(results: dict, fractions: list[float], folder: Path, model: str) -> None:
    """Per budget: each row's per-layer relative K and V activation errors (rows made on the original inputs),
    the hidden-state drift after each layer of the rows made on the converted stream (compensation, output
    refit), and the attention output's relative error before and after the refit."""
    from care_mla.evaluation.plots import plot_layer_errors

    for f in fractions:
        drift = "hidden-state drift (converted stream)"
        panels: dict[str, dict[str, list[float]]] = {"K relative error": {}, "V relative error": {}, drift: {},
                                                      "attention output error (before → after refit)": {}}
        for name, cells in results.items():
            layers = cells.get(str(f), {}).get("layers")
            if not layers or "k_rel_error" not in layers[0]:
                continue
            if "o_refit_error" in layers[0]:
                outputs = panels["attention output error (before → after refit)"]
                outputs[f"{name}, before"] = [row["o_error"] for row in layers]
                outputs[f"{name}, after"] = [row["o_refit_error"] for row in layers]
            if "drift" in layers[0]:
                panels[drift][name] = [row["drift"] for row in layers]
                continue
            panels["K relative error"][name] = [row["k_rel_error"] for row in layers]
            panels["V relative error"][name] = [row["v_rel_error"] for row in layers]
        panels = {k: v for k, v in panels.items() if v}
        if panels:
            path = plot_layer_errors(panels, folder / f"layer_errors_F{f:g}.png", title=f"{model}, F = {f:g}")
            print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default="austen", help="calibration and held-out text ('austen' or a UTF-8 file)")
    p.add_argument("--fractions", default="0.5,0.25,0.125,0.0625")
    p.add_argument("--rows", default=";".join(ROWS), help="semicolon-separated row names")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--json", default=None, help="also write every report here (updated after each cell)")
    p.add_argument("--plots", default=None, help="folder for per-layer error plots (one PNG per budget)")
    a = p.parse_args()
    fractions = [float(f) for f in a.fractions.split(",")]
    rows = a.rows.split(";")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    config = AutoConfig.from_pretrained(resolve_model_path(a.model))
    results: dict[str, dict[str, dict]] = {name: {} for name in rows}
    original = None
    with tempfile.TemporaryDirectory() as tmp:
        for f in fractions:
            for name in rows:
                s = ConvertSettings(model=a.model, out=str(Path(tmp) / "out"), kv_fraction=f, overwrite=True,
                                    progress=False, calib_text=a.text, eval_text=a.text,
                                    calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len,
                                    eval_samples=a.eval_samples, eval_seq_len=a.eval_seq_len,
                                    **_cell(ROWS[name], config, f))
                t = time.perf_counter()
                try:
                    r = convert(s)
                except Exception as err:  # a row that cannot be built at this budget is reported, not fatal
                    results[name][str(f)] = {"error": str(err).splitlines()[0]}
                    print(f"{name:52s} F={f:<7g} {err}", flush=True)
                    continue
                finally:
                    shutil.rmtree(s.out, ignore_errors=True)
                original = r["ppl"]["original"]
                r["seconds"] = round(time.perf_counter() - t, 1)
                results[name][str(f)] = r
                chosen = ", ".join(f"{k} {r[k]}" for k in ("objective", "key_emphasis") if k in r)
                rope = r.get("rope_dim_choice", {}).get("chosen", "")
                print(f"{name:52s} F={f:<7g} ppl {r['ppl']['converted']:9.3f} ({r['ppl']['ratio']:.3f}×) "
                      f"{r['kv_bytes_per_token']['converted']:.0f} B/token {chosen} {rope} [{r['seconds']:.0f} s]",
                      flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps({"model": a.model, "text": a.text, "rows": results}, indent=1))
    if a.plots:
        write_plots(results, fractions, Path(a.plots), a.model)
    print(f"\n{a.model}, text {a.text}: original held-out ppl {original:.3f}; cells: held-out ppl ÷ original "
          f"(calibration {a.calib_samples}×{a.calib_seq_len}, held-out {a.eval_samples}×{a.eval_seq_len})\n")
    print("| lever | " + " | ".join(f"F={f:g}" for f in fractions) + " |")
    print("|---" * (len(fractions) + 1) + "|")
    for name in rows:
        cells = []
        for f in fractions:
            r = results[name].get(str(f), {})
            cells.append(f"{r['ppl']['ratio']:.3f}" if "ppl" in r else "—")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
