#!/usr/bin/env python
"""Write a small random Qwen3-MoE model with the embedded SmolLM2 tokenizer, for the engine checks of the MoE export.

    python scripts/random_moe.py --out DIR [--layers 2] [--experts 8] [--top-k 2] [--hidden 256]
                                 [--heads 4] [--kv-heads 2] [--head-dim 64]

GQA attention of Qwen3 (q_norm/k_norm, by default 4 query heads, 2 KV heads of 64), a sparse MoE block in every layer (no
shared expert; the top-k weights not renormalised unless `--norm-topk-prob`: transformers' DeepseekV2 ignores that
field, llama.cpp honours it, so only without it is transformers an exact reference for the export), float32, vocabulary 49,152 (the tokenizer llama.cpp's converter
recognises). Weights are random (seeded): the embedding and the LM head with standard deviation 1 so that the
logits are far apart (greedy tokens then do not hinge on rounding), every other matrix 0.02, norms 1.
`scripts/serving_llamacpp.sh` runs it with ``MODEL=tiny-qwen3-moe``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from moe_memory import moe_config, write_random_moe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--norm-topk-prob", action="store_true", help="renormalise the top-k weights (real Qwen3-MoE does)")
    args = ap.parse_args(argv)
    if (args.out / "config.json").exists():
        print(f"{args.out} exists; kept")
        return 0
    config = moe_config(args.layers, args.experts, args.hidden, args.moe_intermediate)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = args.heads, args.kv_heads, args.head_dim
    config.num_experts_per_tok, config.norm_topk_prob = args.top_k, args.norm_topk_prob
    size = write_random_moe(args.out, config, torch.float32, scale={"embed_tokens": 1.0, "lm_head": 1.0})
    print(f"random Qwen3-MoE: {args.layers} layers x {args.experts} experts (top {args.top_k}), {size / 2**20:.1f} MiB "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
