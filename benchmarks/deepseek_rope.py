"""DeepSeek-V3 export of the default model: held-out perplexity per RoPE strategy and KV budget.

Calibrates once (bf16 forward passes, statistics cached by `convert.calibrate`), exports with
`care_mla.formats.deepseek.to_deepseek` at each cache fraction and RoPE strategy, and prints the
perplexity (and its ratio to the original) of each export, evaluated in float32 by the
upstream `DeepseekV3ForCausalLM`. `--split calibration` scores on held-in calibration windows
instead (for choosing defaults without looking at the evaluation text). Usage:

    python benchmarks/deepseek_rope.py [--fractions 1.0,0.5,0.25] [--strategies pca,partial,pca-portable]
        [--rope-dims 32,64] [--parity-rope 64] [--eval-samples 32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from care_mla.evaluation.perplexity import perplexity
from care_mla.formats.deepseek import to_deepseek
from care_mla.io.text import load_windows
from care_mla.pipeline.calibration import calibrate
from care_mla.pipeline.load import load_model
from care_mla.settings import ConvertSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--fractions", default="1.0,0.5,0.25")
    p.add_argument("--strategies", default="pca,partial,pca-portable",
                   help="rope strategies; a '-portable' suffix restricts the export to vLLM/SGLang-compatible RoPE")
    p.add_argument("--rope-dims", default="", help="comma-separated qk_rope_head_dim values (default: the export's rule)")
    p.add_argument("--parity-rope", type=int, default=64,
                   help="also export at the parity cache with this many RoPE dims (0: skip)")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--split", choices=("evaluation", "calibration"), default="evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    settings = ConvertSettings(model=a.model, calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len,
                               progress=False, dtype="float32", device="cpu")
    model, tokenizer, path = load_model(a.model, torch.float32, torch.device("cpu"))
    stats = calibrate(model, tokenizer, path, settings)
    windows, _ = load_windows(tokenizer, "austen", a.split, a.eval_samples, a.eval_seq_len)
    t = time.perf_counter()
    original = perplexity(model, windows)
    print(f"original ppl {original:.3f} ({a.split} split, {a.eval_samples}×{a.eval_seq_len}, {time.perf_counter() - t:.0f} s)", flush=True)

    rows = []
    strategies = a.strategies.split(",")
    rope_dims = [int(r) for r in a.rope_dims.split(",") if r] or [None]
    jobs = []
    for f in (float(x) for x in a.fractions.split(",")):
        if f == 1.0:
            jobs.append((1.0, "pca", None))  # exact parity: independent of the strategy
            if a.parity_rope:
                jobs += [(1.0, s_, a.parity_rope) for s_ in strategies]
            continue
        jobs += [(f, s_, rope) for s_ in strategies for rope in rope_dims]
    for f, strategy, rope in jobs:
        name, _, suffix = strategy.partition("-")
        t = time.perf_counter()
        ds = to_deepseek(model, stats, kv_fraction=f, qk_rope_head_dim=rope, rope_strategy=name,
                         portable=suffix == "portable")
        ppl = perplexity(ds, windows)
        ex = ds.care_export
        row = {
            "fraction": f, "strategy": strategy if not ex["exact"] else "exact", "kv_lora_rank": ex["kv_lora_rank"],
            "qk_rope_head_dim": ex["qk_rope_head_dim"], "ppl": ppl, "ratio": ppl / original,
            "kept_rope_energy": (sum(ex["kept_rope_energy"]) / len(ex["kept_rope_energy"])
                                 if ex["kept_rope_energy"] else 1.0),
            "rope_type": ds.config.rope_parameters["rope_type"],
            "vllm_sglang": ex["runtime_support"].vllm_sglang, "seconds": time.perf_counter() - t,
        }
        rows.append(row)
        print(f"F={f:<5g} {row['strategy']:13s} lora {row['kv_lora_rank']:4d} rope {row['qk_rope_head_dim']:4d} "
              f"ppl {ppl:9.3f} ({row['ratio']:.3f}×) kept RoPE energy {row['kept_rope_energy']:.3f} "
              f"[{row['rope_type']}, {row['seconds']:.0f} s]", flush=True)
        del ds
    print(f"\noriginal {a.split} ppl {original:.3f}\n")
    print("| cache (fraction) | strategy | kv_lora_rank + qk_rope_head_dim | ppl | × original | RoPE | vLLM/SGLang |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        width = r["kv_lora_rank"] + r["qk_rope_head_dim"]
        print(f"| {width} ({r['fraction']:g}) | {r['strategy']} | {r['kv_lora_rank']} + {r['qk_rope_head_dim']} "
              f"| {r['ppl']:.3f} | {r['ratio']:.3f} | {r['rope_type']} | {'yes' if r['vllm_sglang'] else 'no'} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"original": original, "split": a.split, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
