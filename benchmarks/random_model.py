"""Write a random-weight Llama-style model folder of any size without holding it in memory (benchmark helper).

Tensors are generated one at a time (normal, std 0.02; norms 1) and streamed to disk with
`care_mla.io.checkpoint.ShardWriter`; the tokenizer is the embedded SmolLM2's, so the vocabulary
is 49,152 and the embedded Austen text calibrates it.

    python benchmarks/random_model.py OUT --layers 32 [--hidden 576 --intermediate 1536 --heads 9 --kv-heads 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from care_mla.io import assets
from care_mla.io.checkpoint import ShardWriter
from care_mla.pipeline.layerwise import save_config, weight_plan

VOCAB = 49152


def random_llama_config(layers: int, hidden: int = 576, intermediate: int = 1536, heads: int = 9, kv_heads: int = 3,
                        head_dim: int = 64, vocab: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
                       bos_token_id=1, eos_token_id=2)


def write_random_model(folder: Path, config: LlamaConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       max_shard_bytes: int = 2 * 1024**3) -> int:
    """Write `config` with random weights to `folder` (with SmolLM2's tokenizer); returns the weight bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    plan = weight_plan(config, ((k, v.shape, dtype) for k, v in skeleton.state_dict().items()))
    writer = ShardWriter(folder, plan, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for name, shape, dt in plan:
        t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02
        writer.add(name, t.to(dt))
    writer.close()
    save_config(folder, config, None, "LlamaForCausalLM", dtype)
    AutoTokenizer.from_pretrained(assets.default_model_dir()).save_pretrained(folder)
    return writer.total_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    config = random_llama_config(a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim)
    size = write_random_model(a.out, config, getattr(torch, a.dtype))
    print(f"wrote {a.out}: {size / 1e9:.2f} GB of {a.dtype} weights")


if __name__ == "__main__":
    main()
