#!/usr/bin/env python
"""Decode speed of an original model and its DeepSeek exports in llama.cpp, every runtime setting side by side.

One table, one run: for each model (the original GQA model and each `care-mla convert --format deepseek
--portable` export), each GGUF weight type (`--outtypes`, default f16 and q8_0) and flash attention off and on,
the decode speed at each context (`--contexts`, default 512, 2048, 8192; add 16384 if the time allows) in wall
tokens per second **and tokens per CPU-second** of the llama.cpp process (all its threads; the figure that stays
comparable when the machine is shared), and the KV cache llama.cpp allocated. Each (model, type, flash) runs in
a child process of its own: one load, one prefill to the largest context, timed decodes at each context on the
way (`scripts/llamacpp_check.py: decode_speeds`).

Needs llama-cpp-python and llama.cpp's converter (`scripts/serving_llamacpp.sh` builds both into
`.venv-llamacpp` and unpacks the converter under `~/.cache/care-mla/llamacpp/src`):

    .venv-llamacpp/bin/python benchmarks/llamacpp_decode.py \\
        --convert-script ~/.cache/care-mla/llamacpp/src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \\
        --original ORIGINAL_HF_FOLDER --export F=0.5:EXPORT_DIR [--export F=0.25:DIR ...] \\
        --work /tmp/llamacpp-decode --md decode.md --json decode.json

Why the export's decode can be slower than the original's at equal or smaller cache, per cached token and layer
(llama.cpp's `deepseek2` graph, absorbed MLA): the scores read the latent and the RoPE part once per query head,
n_h·(r + d_r) multiply-adds, and the values the latent again, n_h·r: n_h·(2r + d_r) against GQA's 2·n_h·d_h;
without flash attention the latent is also copied into a transposed, contiguous V each step (r numbers per
cached token and layer). `--geometry` prints these counts next to the measured speeds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from llamacpp_check import convert_gguf, expected_cache_width, run_worker  # noqa: E402


def attention_work(folder: Path) -> dict:
    """Per cached token and layer: numbers cached, multiply-adds of one decode step's attention (every query head),
    and numbers the non-flash MLA path copies into a transposed V."""
    cfg = json.loads((folder / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    if cfg.get("model_type", "").startswith("deepseek"):
        r, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        return {"geometry": f"{r} + {rope}", "cached": r + rope, "macs": heads * (2 * r + rope), "copied": r}
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {"geometry": f"{cfg['num_key_value_heads']} x 2 x {d}", "cached": 2 * cfg["num_key_value_heads"] * d,
            "macs": 2 * heads * d, "copied": 0}


def markdown(rows: list[dict], contexts: list[int], threads: int, decode_tokens: int, repeats: int) -> str:
    best_original = {c: max((s["decode_tok_per_cpu_s"] for r in rows if r["label"] == "original"
                             for s in r["runs"] if s["context"] == c), default=None) for c in contexts}
    head = ("| model | cache / token / layer | attention MACs / cached token | weights | flash_attn | KV MiB @ "
            f"{max(contexts)} |" + "".join(f" tok/s @ {c} (wall · per CPU-s) |" for c in contexts)
            + f" per CPU-s @ {max(contexts)} ÷ original's best |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed = {s["context"]: s for s in r["runs"]}
        cells = "".join(f" {speed[c]['decode_tok_s']:.1f} · {speed[c]['decode_tok_per_cpu_s']:.1f} |" if c in speed
                        else " — |" for c in contexts)
        last = speed.get(max(contexts))
        ratio = (f"{last['decode_tok_per_cpu_s'] / best_original[max(contexts)]:.2f}"
                 if last and best_original[max(contexts)] else "—")
        kv = r.get("kv_mib")
        w = r["work"]
        lines.append(f"| {r['label']} | {w['geometry']} = {w['cached']} | {w['macs']} (+{w['copied']} copied) | "
                     f"{r['outtype']} | {'on' if r['flash'] else 'off'} | {kv if kv is not None else '—'} |{cells} {ratio} |")
    lines.append("")
    lines.append(f"Decode: {decode_tokens} greedy steps after a prefill of random token ids to each context (one prefill "
                 f"per row, contexts in turn), fastest of {repeats}; {threads} llama.cpp thread(s); f16 KV cache. "
                 "Per CPU-s: decode tokens per second of the process's CPU time (all threads). MACs: the attention's "
                 "multiply-adds per cached token and layer in one decode step, over every query head "
                 "(GQA 2·n_h·d_h, absorbed MLA n_h·(2r + d_r)); copied: numbers per cached token and layer that "
                 "the non-flash MLA path copies into a transposed V each step.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert-script", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--original", type=Path, required=True, help="the original HF folder")
    ap.add_argument("--export", action="append", default=[], metavar="LABEL:DIR", help="a DeepSeek export (repeatable)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder: GGUFs, job files, llama.cpp logs")
    ap.add_argument("--outtypes", default="f16,q8_0", help="GGUF weight types (llama.cpp converter --outtype)")
    ap.add_argument("--flash", default="off,on", help="flash attention settings to run: off, on or both")
    ap.add_argument("--contexts", type=lambda s: sorted(int(x) for x in s.split(",") if x), default=[512, 2048, 8192])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)

    flashes = [{"off": False, "on": True}[f] for f in args.flash.split(",") if f]
    models = [("original", args.original)] + [(e.rpartition(":")[0] or Path(e).name, Path(e.rpartition(":")[2]))
                                              for e in args.export]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, folder in models:
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        layers, width = expected_cache_width(folder)
        work = attention_work(folder)
        for outtype in [t for t in args.outtypes.split(",") if t]:
            gguf = args.work / f"{slug}-{outtype}.gguf"
            convert_gguf(args.convert_script, folder, gguf, outtype, args.work / f"{slug}-{outtype}.convert.log")
            for flash in flashes:
                name = f"{slug}-{outtype}-flash{int(flash)}"
                res = run_worker({"task": "speed", "gguf": str(gguf), "contexts": args.contexts, "kv_type": "f16",
                                  "threads": args.threads, "flash": flash, "repeats": args.repeats,
                                  "decode_tokens": args.decode_tokens}, args.work, name)
                row = {"label": label, "folder": str(folder), "outtype": outtype, "flash": flash, "work": work,
                       "layers": layers, "cache_width": width, "runs": res["runs"],
                       "kv_mib": res.get("kv_mib", {}).get("total"), "flash_attn_log": res.get("flash_attn_log")}
                rows.append(row)
                print(f"{label} {outtype} flash {'on' if flash else 'off'}: " + ", ".join(
                    f"{s['context']}: {s['decode_tok_s']:.1f} tok/s ({s['decode_tok_per_cpu_s']:.1f}/CPU-s)"
                    for s in res["runs"]), flush=True)
    import llama_cpp

    md = markdown(rows, args.contexts, args.threads, args.decode_tokens, args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "rows": rows,
                                         "settings": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}}, indent=1))
    if args.md:
        args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
