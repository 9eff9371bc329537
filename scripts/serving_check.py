"""Serve a `care-mla convert --format deepseek` folder with vLLM (and SGLang if installed) on a GPU
and compare greedy generations with transformers' `DeepseekV3ForCausalLM` on the same folder.

Needs a CUDA GPU and `vllm` (tested pins: see README, "Serving"); never part of the test suite.
Exit status 0 when every prompt's greedy tokens agree (up to `--min-prefix` tokens when the
export is bf16 and the runtimes round differently), 1 otherwise, 2 when a runtime is missing.

    python scripts/serving_check.py OUT_FOLDER [--max-tokens 32] [--dtype bfloat16]
        [--attention-backend TRITON_MLA] [--min-prefix 16] [--json result.json]

Which exports a runtime can run is decided by the config (`care_mla.deepseek.runtime_support`):
vLLM/SGLang build DeepSeek attention without biases and map non-default RoPE types to yarn,
so export with `--portable` (default RoPE, ≤ d_h RoPE dims, no biases). Their fast MLA
kernels (FlashMLA, FlashInfer, TRT-LLM) also fix the widths (kv_lora_rank 512 or 256,
qk_rope_head_dim 64); other widths run on vLLM's Triton MLA backend, the default here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The capital of France is",
    "def fibonacci(n):",
    "Emma Woodhouse, handsome, clever, and rich,",
]


def transformers_tokens(folder: str, prompts: list[str], max_tokens: int, dtype: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).cuda().eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)
        out.append(seq[0, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return out


def vllm_tokens(folder: str, prompts: list[str], max_tokens: int, dtype: str, backend: str | None) -> list[list[int]]:
    import os

    if backend:
        os.environ.setdefault("VLLM_ATTENTION_BACKEND", backend)
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, dtype=dtype, trust_remote_code=False, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=2048)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    results = llm.generate(prompts, params)
    return [list(r.outputs[0].token_ids) for r in results]


def sglang_tokens(folder: str, prompts: list[str], max_tokens: int, dtype: str) -> list[list[int]]:
    import sglang

    engine = sglang.Engine(model_path=folder, dtype=dtype, mem_fraction_static=0.5)
    try:
        params = {"temperature": 0.0, "max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "ignore_eos": True}
        return [list(r["output_ids"]) for r in engine.generate(prompts, params)]
    finally:
        engine.shutdown()


def agreement(reference: list[list[int]], other: list[list[int]]) -> list[int]:
    """Per prompt, how many leading tokens agree."""
    out = []
    for a, b in zip(reference, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        out.append(n)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--attention-backend", default="TRITON_MLA", help="vLLM MLA backend ('' for vLLM's choice)")
    p.add_argument("--min-prefix", type=int, default=None,
                   help="leading tokens that must agree (default: all of --max-tokens)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    config = json.loads((Path(a.folder) / "config.json").read_text())
    if config.get("model_type") != "deepseek_v3":
        print(f"{a.folder} is not a DeepSeek-V3 folder (model_type {config.get('model_type')!r}); convert with "
              "--format deepseek", file=sys.stderr)
        return 2
    need = a.min_prefix if a.min_prefix is not None else a.max_tokens
    report = {"folder": a.folder, "prompts": PROMPTS, "dtype": a.dtype}
    report["transformers"] = transformers_tokens(a.folder, PROMPTS, a.max_tokens, a.dtype)
    ok, ran = True, 0
    for name, run in (("vllm", lambda: vllm_tokens(a.folder, PROMPTS, a.max_tokens, a.dtype, a.attention_backend)),
                      ("sglang", lambda: sglang_tokens(a.folder, PROMPTS, a.max_tokens, a.dtype))):
        try:
            tokens = run()
        except ImportError as err:
            print(f"{name}: not installed ({err})")
            report[name] = None
            continue
        ran += 1
        agree = agreement(report["transformers"], tokens)
        report[name] = {"tokens": tokens, "agreeing_prefix": agree}
        passed = all(n >= need for n in agree)
        ok &= passed
        print(f"{name}: leading tokens equal to transformers per prompt {agree} → {'PASS' if passed else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if ran == 0:
        print("neither vllm nor sglang is installed: nothing was compared", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
