"""Run an original HF model and its `care-mla convert --format deepseek` exports in llama.cpp
(through llama-cpp-python) and compare with transformers: greedy tokens, KV-cache size, decode speed.

Not part of the test suite: it needs llama-cpp-python and the converter that llama.cpp ships
(`convert_hf_to_gguf.py` + `gguf-py`, vendored in the llama-cpp-python sdist).
`scripts/serving_llamacpp.sh` builds both and calls this script.

    python scripts/llamacpp_check.py --convert-script VENDOR/llama.cpp/convert_hf_to_gguf.py \
        --original HF_FOLDER --export F=1.0:EXPORT_DIR [--export F=0.5:DIR ...] \
        --work /tmp/llamacpp-work/gguf --json out.json --md out.md

For every model:
1. GGUF: llama.cpp's own converter through `gguf_export.py` (q_lora_rank null -> 0 in a copy of
   the config; `attn_kv_a_mqa` kept F32), f32 and f16 (`--outtypes`). A DeepseekV3 export becomes
   llama.cpp's `deepseek2` architecture (its MLA path: `attn_k_b`/`attn_v_b`, `key_length_mla`).
2. Greedy tokens: transformers (fp32) on the HF folder vs llama.cpp on each GGUF, the same token
   ids fed to both (chat template of the HF tokenizer), `--new-tokens` steps, no EOS stop.
   f32 GGUF runs with an f32 KV cache (exact), f16 GGUF with llama.cpp's default f16 cache.
   Reported: the agreeing prefix per prompt, and the largest |logit| difference at the first step.
3. KV cache: llama.cpp's own log line `llama_kv_cache: size = ...` for n_ctx `--kv-ctx`
   (default 8192) and an f16 cache, next to the expected layers x width x n_ctx x 2 bytes.
4. Decode speed: prefill to each `--contexts` value in turn (default 2048 and 8192) and time
   `--decode-tokens` greedy steps there (`decode_speeds`), on the `--decode-outtype` GGUF (default f16)
   with `--decode-flash` (off, on, or mla: on for the exports only — the fastest measured on a CPU;
   every setting side by side: `benchmarks/llamacpp_decode.py`).
Every llama.cpp load runs in a child process (clean memory, captured logs).
Exit status 0 when every f32 GGUF gives transformers' tokens on every prompt, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_export import F32_TENSORS, conversion_source  # noqa: E402

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The capital of France is",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    "Explain in two sentences why the sky is blue.",
]


# ----------------------------------------------------------------------------- GGUF conversion

def convert_gguf(convert_script: Path, folder: Path, out: Path, outtype: str, log: Path) -> float:
    if out.exists():
        return 0.0
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_export.py")), str(convert_script),
                             str(folder), "--outtype", outtype, "--outfile", str(out)],
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"convert_hf_to_gguf.py failed (rc {rc}) on {folder}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    out = {}
    for name, field in r.fields.items():
        if name.startswith(("tokenizer.", "general.")) and name != "general.architecture":
            continue
        if not field.types:
            continue
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - metadata is informational
            pass
    out["tensors"] = {t.name: [int(x) for x in t.shape] for t in r.tensors if t.name.startswith("blk.0.")}
    return out


# ----------------------------------------------------------------------------- transformers side

def prompt_ids(folder: Path, prompts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = []
    for p in prompts:
        if tok.chat_template:
            enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)
            ids.append(list(enc["input_ids"]))
        else:
            ids.append(tok(p).input_ids)
    return ids


def transformers_greedy(folder: Path, ids: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens (no EOS stop) and first-step logits, fp32 CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, first_logits = [], []
    with torch.no_grad():
        for seq in ids:
            x = torch.tensor([seq])
            out = model(input_ids=x, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
            first_logits.append(logits.clone())
            gen = []
            for _ in range(new_tokens):
                nxt = int(logits.argmax())
                gen.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1]
            tokens.append(gen)
    del model
    return {"tokens": tokens, "first_logits": [t.numpy().tolist() for t in first_logits]}


# ----------------------------------------------------------------------------- llama.cpp side (child)

def _llama(path: str, n_ctx: int, kv_type: str, threads: int, flash: bool, n_batch: int = 512,
           threads_batch: int | None = None):
    """A llama.cpp model: `threads` for one-token steps (decode), `threads_batch` (default `threads`) for longer
    batches (prefill) — llama.cpp picks between the two by the batch's token count."""
    import llama_cpp

    t = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, type_k=t, type_v=t,
                           n_threads=threads, n_threads_batch=threads_batch or threads, flash_attn=flash,
                           verbose=True, logits_all=False)


def _last_logits(llm):
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def _greedy(llm, ids: list[int], n: int) -> tuple[list[int], list[float], float]:
    llm.reset()
    llm.eval(ids)
    logits = _last_logits(llm)
    first = logits.tolist()
    gen = []
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(logits.argmax())
        gen.append(nxt)
        llm.eval([nxt])
        logits = _last_logits(llm)
    return gen, first, time.perf_counter() - t0


def decode_speeds(job: dict) -> list[dict]:
    """Decode speed at each of ``job["contexts"]`` (ascending) from one load and one prefill: the cache is filled to
    each context in turn (random token ids, n_ctx = the largest context; llama.cpp attends over the cells in use,
    not over n_ctx), then ``decode_tokens`` greedy steps are timed ``repeats`` times from the same prefilled
    cache, in wall time and in this process's CPU time (all its threads: tokens per CPU-second stay comparable on a
    shared machine)."""
    import random

    contexts = sorted(job["contexts"])
    llm = _llama(job["gguf"], contexts[-1], job["kv_type"], job["threads"], job["flash"],
                 threads_batch=job.get("prefill_threads"))
    rng = random.Random(0)
    tokens = [rng.randrange(100, llm.n_vocab()) for _ in range(contexts[-1])]
    llm.reset()
    runs, done = [], 0
    for ctx in contexts:
        n = ctx - job["decode_tokens"] - 8
        t0, c0 = time.perf_counter(), time.process_time()
        llm.n_tokens = done  # drop the cells the last decode wrote
        llm.eval(tokens[done:n])
        prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        done, first = n, _last_logits(llm)
        wall, cpu = [], []
        for _ in range(job["repeats"]):  # decode again from the same prefilled cache
            llm.n_tokens, logits = n, first  # eval() drops the cells past n_tokens
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(job["decode_tokens"]):
                llm.eval([int(logits.argmax())])
                logits = _last_logits(llm)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        k = min(range(len(wall)), key=wall.__getitem__)
        runs.append({"context": ctx, "prompt_tokens": n, "prefill_s": prefill, "prefill_cpu_s": prefill_cpu,
                     "prefill_tok_s": (n - (runs[-1]["prompt_tokens"] if runs else 0)) / prefill,
                     "decode_tokens": job["decode_tokens"], "decode_s_each": wall, "decode_cpu_s_each": cpu,
                     "decode_s": wall[k], "decode_cpu_s": cpu[k], "decode_tok_s": job["decode_tokens"] / wall[k],
                     "decode_tok_per_cpu_s": job["decode_tokens"] / max(min(cpu), 1e-9)})
    del llm
    return runs


def worker(job: dict) -> dict:
    """Runs in a child process; llama.cpp's log goes to the captured stderr."""
    log = io.StringIO()
    res: dict = {}
    with contextlib.redirect_stderr(log):
        if job["task"] == "greedy":
            llm = _llama(job["gguf"], job["n_ctx"], job["kv_type"], job["threads"], job["flash"])
            res["tokens"], res["first_logits"] = [], []
            for ids in job["ids"]:
                gen, first, _ = _greedy(llm, ids, job["new_tokens"])
                res["tokens"].append(gen)
                res["first_logits"].append(first)
        elif job["task"] == "kv":
            llm = _llama(job["gguf"], job["n_ctx"], job["kv_type"], job["threads"], job["flash"])
        elif job["task"] == "speed":
            res["runs"] = decode_speeds(job)
    text = log.getvalue()
    res["log_kv"] = [ln.strip() for ln in text.splitlines() if "kv_cache" in ln and ("size" in ln or "KV" in ln)]
    res["log_mla"] = [ln.strip() for ln in text.splitlines()
                      if re.search(r"print_info: (arch|n_lora_kv|n_lora_q|n_embd_head_k_mla|n_embd_head_v_mla"
                                   r"|n_rot|n_head_kv|n_embd_k_gqa|n_embd_v_gqa)\b", ln)]
    res["flash_attn_log"] = [ln.strip() for ln in text.splitlines() if "flash_attn" in ln][:3]
    m = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB .*K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB", text)
    if m:
        total, kt, k, vt, v = m[-1]
        res["kv_mib"] = {"total": float(total), "k_type": kt, "k": float(k), "v_type": vt, "v": float(v)}
    return res


def run_worker(job: dict, log_dir: Path, name: str) -> dict:
    jf = log_dir / f"{name}.job.json"
    jf.write_text(json.dumps(job))
    p = subprocess.run([sys.executable, __file__, "_worker", str(jf)], capture_output=True, text=True)
    (log_dir / f"{name}.stderr.txt").write_text(p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp worker {name} failed (rc {p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-25:]))
    return json.loads(p.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------- report

def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def expected_cache_width(folder: Path) -> tuple[int, int]:
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type", "").startswith("deepseek"):
        return cfg["num_hidden_layers"], cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    d_h = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], 2 * cfg["num_key_value_heads"] * d_h


def markdown(results: list[dict], args) -> str:
    lines = []
    n_p = len(results[0]["greedy"]["f32"]["prefix"]) if results and "f32" in results[0]["greedy"] else 0
    head = ("| model | cache/token/layer | llama.cpp f32 vs HF (prefix per prompt) | f16 vs HF | "
            f"vs original HF | max abs Δlogit f32 / f16 | KV MiB @ {args.kv_ctx} (llama.cpp / expected) | "
            + (" decode: weights, flash_attn |" if args.contexts else "")
            + "".join(f" decode tok/s @ {c} |" for c in args.contexts))
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    for r in results:
        g = r["greedy"]
        pre = lambda t: "/".join(str(x) for x in g[t]["prefix"]) if t in g else "-"  # noqa: E731
        dl = " / ".join(f"{g[t]['max_abs_dlogit']:.2g}" for t in ("f32", "f16") if t in g)
        kv = r.get("kv", {})
        d = kv.get("detail") or {}
        kvs = (f"{kv.get('llamacpp_mib') or float('nan'):.2f} (K {d.get('k', float('nan')):.2f}, V {d.get('v', float('nan')):.2f})"
               f" / {kv.get('expected_mib', float('nan')):.2f}")
        sp = {s["context"]: s["decode_tok_s"] for s in r.get("speed", [])}
        ds = r.get("decode_setting")
        lines.append(f"| {r['label']} | {r['cache_width']} | {pre('f32')} | {pre('f16')} | "
                     f"{'/'.join(str(x) for x in r.get('vs_original_prefix', [])) or '-'} | {dl} | {kvs} |"
                     + (f" {ds['outtype']}, {'on' if ds['flash_attn'] else 'off'} |" if ds else
                        (" - |" if args.contexts else ""))
                     + "".join(f" {sp[c]:.1f} |" if c in sp else " - |" for c in args.contexts))
    lines.append("")
    lines.append(f"Prefix: greedy tokens (of {args.new_tokens}) equal before the first difference, one number per "
                 f"prompt ({n_p} prompts), same token ids fed to both. KV: f16 cache, llama.cpp's "
                 "`llama_kv_cache: size` log line; expected = layers x width x n_ctx x 2 B. "
                 f"Decode: {args.decode_tokens} greedy steps after a prefill to the context, best of {args.repeats}, "
                 f"{args.decode_outtype} GGUF, {args.threads} thread(s), f16 KV cache, flash attention "
                 + {"off": "off", "on": "on", "mla": "on for the MLA exports and off for the original (the fastest "
                    "measured for each, docs/serving.md)"}[args.decode_flash] + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert-script", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--original", type=Path, required=True, help="original HF folder (Llama/Qwen/Mistral)")
    ap.add_argument("--export", action="append", default=[], metavar="LABEL:DIR",
                    help="a --format deepseek export (repeatable), e.g. F=0.5:out/f05")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for GGUFs and logs")
    ap.add_argument("--outtypes", default="f32,f16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-ctx", type=int, default=8192)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048, 8192])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per context; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (default 1: ggml's OpenMP threads spin at barriers, and on a shared "
                         "2-core machine 2 threads ran prefill 6x slower than 1)")
    ap.add_argument("--skip-speed", type=lambda s: [x for x in s.split(",") if x], default=[], metavar="LABELS",
                    help="comma-separated labels (original, or an --export's) whose decode is not timed")
    ap.add_argument("--prefill-threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads of the prefills before the timed decodes (default: every usable core; the decode "
                         "itself runs --threads)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention for the greedy and KV loads "
                    "(default off)")
    ap.add_argument("--decode-outtype", default="f16",
                    help="GGUF type whose decode is timed (default f16; one not in --outtypes is converted for the "
                         "timing only, e.g. q8_0)")
    ap.add_argument("--decode-flash", choices=["off", "on", "mla"], default="off",
                    help="flash attention for the timed decode: off, on, or mla = on for the MLA exports (deepseek2) "
                         "and off for the GQA original — the fastest measured on a CPU (docs/serving.md)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)

    outtypes = [t for t in args.outtypes.split(",") if t]
    models = [("original", args.original)]
    for e in args.export:
        label, _, d = e.rpartition(":")
        models.append((label or Path(d).name, Path(d)))
    args.work.mkdir(parents=True, exist_ok=True)
    ids = prompt_ids(args.original, PROMPTS)
    import numpy as np

    results, ok, original_tokens = [], True, None
    for label, folder in models:
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        print(f"== {label}: {folder}", flush=True)
        r: dict = {"label": label, "folder": str(folder)}
        layers, width = expected_cache_width(folder)
        r["cache_width"], r["layers"] = width, layers
        r["converter_config_changes"] = conversion_source(folder, args.work / f"{slug}-convert-src")[1]
        r["converter_f32_tensors"] = list(F32_TENSORS)
        r["gguf"], r["convert_s"] = {}, {}
        for t in dict.fromkeys(outtypes + ([args.decode_outtype] if args.contexts and label not in args.skip_speed
                                           else [])):
            out = args.work / f"{slug}-{t}.gguf"
            r["convert_s"][t] = convert_gguf(args.convert_script, folder, out, t, args.work / f"{slug}-{t}.convert.log")
            r["gguf"][t] = str(out)
        meta = gguf_metadata(Path(r["gguf"][outtypes[0]]))
        r["gguf_meta"] = {k: v for k, v in meta.items() if k != "tensors"}
        r["gguf_blk0_tensors"] = meta["tensors"]
        print(f"   gguf: {meta.get('general.architecture')}", flush=True)

        hf = transformers_greedy(folder, ids, args.new_tokens)
        r["hf_tokens"] = hf["tokens"]
        if original_tokens is None:
            original_tokens = hf["tokens"]
        else:
            r["vs_original_prefix"] = [agreeing_prefix(a, b) for a, b in zip(hf["tokens"], original_tokens)]
        r["greedy"] = {}
        for t in outtypes:
            res = run_worker({"task": "greedy", "gguf": r["gguf"][t], "n_ctx": 1024, "kv_type": t if t == "f32" else "f16",
                              "threads": args.threads, "flash": args.flash_attn, "ids": ids,
                              "new_tokens": args.new_tokens}, args.work, f"{slug}-{t}-greedy")
            prefix = [agreeing_prefix(a, b) for a, b in zip(res["tokens"], hf["tokens"])]
            dl = max(float(np.abs(np.array(a) - np.array(b)).max()) for a, b in zip(res["first_logits"], hf["first_logits"]))
            r["greedy"][t] = {"tokens": res["tokens"], "prefix": prefix, "max_abs_dlogit": dl,
                              "llama_info": res["log_mla"], "kv_log": res["log_kv"]}
            print(f"   {t}: prefix {prefix}, max |dlogit| {dl:.3g}", flush=True)
            if t == "f32" and min(prefix) < args.new_tokens:
                ok = False
        kv_gguf = r["gguf"].get("f16", r["gguf"][outtypes[0]])
        res = run_worker({"task": "kv", "gguf": kv_gguf, "n_ctx": args.kv_ctx, "kv_type": "f16", "threads": args.threads,
                          "flash": args.flash_attn}, args.work, f"{slug}-kv")
        r["kv"] = {"n_ctx": args.kv_ctx, "type": "f16", "log": res["log_kv"], "llama_info": res["log_mla"],
                   "llamacpp_mib": res.get("kv_mib", {}).get("total"), "detail": res.get("kv_mib"),
                   "expected_mib": layers * width * args.kv_ctx * 2 / 2**20}
        print(f"   KV @ {args.kv_ctx}: {r['kv']['llamacpp_mib']} MiB (expected {r['kv']['expected_mib']:.2f})", flush=True)
        if args.contexts and label not in args.skip_speed:
            mla = meta.get("general.architecture") == "deepseek2"
            flash = args.decode_flash == "on" or (args.decode_flash == "mla" and mla)
            r["decode_setting"] = {"outtype": args.decode_outtype, "flash_attn": flash}
            res = run_worker({"task": "speed", "gguf": r["gguf"][args.decode_outtype], "contexts": args.contexts,
                              "kv_type": "f16", "threads": args.threads, "flash": flash, "repeats": args.repeats,
                              "prefill_threads": args.prefill_threads,
                              "decode_tokens": args.decode_tokens}, args.work, f"{slug}-speed")
            r["speed"] = res["runs"]
            for s in res["runs"]:
                print(f"   ctx {s['context']}: prefill {s['prefill_tok_s']:.0f} tok/s, decode {s['decode_tok_s']:.1f} tok/s",
                      flush=True)
        results.append(r)

    import llama_cpp

    report = {"llama_cpp_python": llama_cpp.__version__, "prompts": PROMPTS, "prompt_ids": ids,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "models": results, "all_f32_exact": ok}
    md = markdown(results, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.md:
        args.md.write_text(md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        print(json.dumps(worker(json.loads(Path(sys.argv[2]).read_text()))))
        sys.exit(0)
    sys.exit(main())
