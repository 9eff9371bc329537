"""Decode speed and KV-cache bytes: the original GQA model vs its MLA conversion, side by side.

Converts the model once into the decoupled-RoPE latent-cache format (`--latent decoupled`, the
layout of the DeepSeek export, per-layer ranks), then for each context length prefills a
prompt of that many tokens (Austen evaluation text) and times greedy one-token decode steps
with the KV cache, for

* the original model (GQA cache, 2·g·d_h numbers per token and layer),
* the MLA model with absorbed decode (W_UK folded into the query, W_UV applied after
  attention: a step reads only the latent cache, r_l + rope numbers per token and layer),
* the same MLA model decoding without absorption (up-projects the whole cache every step),
  to show what absorption buys.

All in one process and threads; the decode steps of the models are interleaved in rounds so
background load hits them alike (median step time); cache bytes are read from the cache
tensors after decoding. Usage:

    python benchmarks/decode_speed.py [--contexts 2048,8192] [--new-tokens 32] [--kv-fraction 0.5]
        [--dtype auto] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import care_mla  # noqa: F401  (registers the latent-cache model)
from care_mla.evaluation.perplexity import cache_bytes
from care_mla.formats.transformers_api import cache_kwargs, returned_cache
from care_mla.io import assets
from care_mla.io.text import load_windows
from care_mla.pipeline.convert import convert
from care_mla.pipeline.load import resolve_model_path
from care_mla.settings import ConvertSettings


@torch.no_grad()
def decode_side_by_side(models: dict, prompt: torch.Tensor, new_tokens: int, rounds: int = 4) -> list[dict]:
    """Prefill `prompt` (1, L) in every model, then greedy decode steps in interleaved rounds.

    Interleaving (round 1: a few steps of each model, round 2: ...) exposes every model to the
    same background load; each model's step time is the median of its steps.
    """
    state = {}
    for name, model in models.items():
        t = time.perf_counter()
        out = model(prompt, use_cache=True)
        state[name] = {"cache": returned_cache(out), "token": out.logits[:, -1:].argmax(-1), "steps": [],
                       "prefill_s": time.perf_counter() - t}
    per_round = max(1, new_tokens // rounds)
    for _ in range(rounds):
        for name, model in models.items():
            st = state[name]
            for _ in range(per_round):
                t = time.perf_counter()
                out = model(st["token"], **cache_kwargs(st["cache"]), use_cache=True)
                st["token"] = out.logits[:, -1:].argmax(-1)
                st["steps"].append(time.perf_counter() - t)
    results = []
    for name, st in state.items():
        per_step = statistics.median(st["steps"])
        cache, tokens = st["cache"], st["cache"].get_seq_length()
        results.append({
            "model": name,
            "prefill_s": st["prefill_s"],
            "decode_tokens_per_s": 1.0 / per_step,
            "ms_per_token": 1000 * per_step,
            "cache_bytes": cache_bytes(cache),
            "cache_tokens": tokens,
            "cache_bytes_per_token": cache_bytes(cache) / tokens,
        })
    return results


def set_absorb(model, mode: str) -> None:
    for layer in model.model.layers:
        layer.self_attn.absorb = mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=assets.DEFAULT_MODEL)
    p.add_argument("--contexts", default="2048,8192", help="prompt lengths (tokens)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--kv-fraction", type=float, default=0.5)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: this machine's fastest safe dtype, measured (care_mla.io.hardware)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-expanded", action="store_true", help="do not time the non-absorbed MLA decode")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from care_mla.pipeline.load import torch_dtype

    dtype = torch_dtype(a.dtype, torch.device("cpu"))
    path = resolve_model_path(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    contexts = [int(c) for c in a.contexts.split(",")]
    limit = AutoModelForCausalLM.from_pretrained(path).config.max_position_embeddings
    if max(contexts) + a.new_tokens > limit:
        raise SystemExit(f"context + new tokens exceeds the model's {limit} positions; lower --contexts")
    windows, _ = load_windows(tokenizer, "austen", "evaluation", 1, max(contexts))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mla"
        t = time.perf_counter()
        convert(ConvertSettings(model=a.model, out=str(out), kv_fraction=a.kv_fraction, latent="decoupled",
                                evaluate=False, progress=False))
        print(f"converted to the decoupled latent-cache format in {time.perf_counter() - t:.1f} s", flush=True)
        models = {
            "original (GQA)": AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(),
            "MLA absorbed": AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval(),
        }
        set_absorb(models["MLA absorbed"], "decode")
        if not a.skip_expanded:
            models["MLA expanded"] = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
            set_absorb(models["MLA expanded"], "never")

    results = []
    for ctx in contexts:
        for r in decode_side_by_side(models, windows[:, :ctx], a.new_tokens):
            r = {"context": ctx, **r}
            results.append(r)
            print(f"ctx {ctx:6d}  {r['model']:16s} decode {r['decode_tokens_per_s']:7.2f} tok/s "
                  f"({r['ms_per_token']:7.2f} ms/token)  cache {r['cache_bytes'] / 2**20:7.2f} MiB "
                  f"({r['cache_bytes_per_token']:.0f} B/token)  prefill {r['prefill_s']:.2f} s", flush=True)

    print(f"\n{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, {a.new_tokens} decode steps after the prompt, "
          f"kv_fraction {a.kv_fraction}\n")
    print("| context | model | decode tok/s | ms/token | KV cache | bytes/token | speed vs original | cache vs original |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["context"] == r["context"] and x["model"] == "original (GQA)")
        print(f"| {r['context']} | {r['model']} | {r['decode_tokens_per_s']:.2f} | {r['ms_per_token']:.2f} | "
              f"{r['cache_bytes'] / 2**20:.2f} MiB | {r['cache_bytes_per_token']:.0f} | "
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× | "
              f"{r['cache_bytes'] / base['cache_bytes']:.2f}× |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
