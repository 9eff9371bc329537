"""Write a random-weight Llama folder with Llama-3-8B's attention geometry, for serving checks.

Attention as in Llama-3-8B: hidden 4096, 32 query heads, 8 KV heads, head_dim 128, so the GQA
cache holds 2·8·128 = 2048 numbers per layer and token, and DeepSeek's 512 + 64 MLA geometry
(the only one vLLM's CPU decode kernel takes) is a real saving: `care-mla convert --format
deepseek --portable --kv-fraction 0.28125 --rope-dim 64` (576 / 2048). Only a few layers and a
small MLP, with the embedded SmolLM2 tokenizer (vocab 49,152; see benchmarks/random_model.py),
so the folder is ~2 GB in fp32 and a 2-core CPU runs it.

Weights are random: normal with std 0.02 (norms 1), except the untied `lm_head`, whose std is
chosen so that logits spread (std ≈ --logit-std) and greedy decoding is not degenerate. With a
tied lm_head a random model repeats its last token (e·e dominates); untied, the next token
depends on the whole context through attention (at std 0.02 the layers' outputs outweigh the
embedding in the residual stream), which is what a token-agreement check of MLA serving needs.

    python benchmarks/geometry_model.py OUT [--layers 2] [--intermediate 1024] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from care_mla.io import assets
from care_mla.io.checkpoint import ShardWriter
from care_mla.pipeline.layerwise import save_config, weight_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from random_model import random_llama_config  # noqa: E402

LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128)


def geometry_config(layers: int = 2, intermediate: int = 1024, rope_theta: float = 500000.0):
    config = random_llama_config(layers, LLAMA3_8B["hidden"], intermediate, LLAMA3_8B["heads"],
                                 LLAMA3_8B["kv_heads"], LLAMA3_8B["head_dim"])
    config.tie_word_embeddings = False
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    rope["rope_theta"] = rope_theta
    config.rope_parameters = rope
    return config


def write_geometry_model(folder: Path, layers: int = 2, intermediate: int = 1024, dtype: torch.dtype = torch.float32,
                         seed: int = 0, std: float = 0.02, logit_std: float = 4.0) -> tuple[int, object]:
    config = geometry_config(layers, intermediate)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    plan = weight_plan(config, ((k, v.shape, dtype) for k, v in skeleton.state_dict().items()))
    writer = ShardWriter(folder, plan, 2 * 1024**3)
    gen = torch.Generator().manual_seed(seed)
    # the final norm leaves elements of rms 1, so a logit is a sum of `hidden` products: std = s·√hidden
    head_std = logit_std / math.sqrt(config.hidden_size)
    for name, shape, dt in plan:
        if "norm" in name:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * (head_std if name == "lm_head.weight" else std)
        writer.add(name, t.to(dt))
    writer.close()
    save_config(folder, config, None, "LlamaForCausalLM", dtype)
    AutoTokenizer.from_pretrained(assets.default_model_dir()).save_pretrained(folder)
    return writer.total_bytes, config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=4.0, help="std of the random lm_head's logits")
    a = p.parse_args()
    size, config = write_geometry_model(a.out, a.layers, a.intermediate, getattr(torch, a.dtype), a.seed,
                                        logit_std=a.logit_std)
    gqa = 2 * config.num_key_value_heads * config.head_dim
    print(f"wrote {a.out}: {size / 1e9:.2f} GB of {a.dtype} weights, {a.layers} layers, GQA cache {gqa} numbers per "
          f"layer and token (512 + 64 MLA = {576 / gqa:.5f} of it)")


if __name__ == "__main__":
    main()
