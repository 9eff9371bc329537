"""Peak RSS of held-out perplexity: full-vocabulary logits per batch (old) vs chunked logits (now).

A random-weight Qwen2-0.5B-like model (vocabulary 151,936, hidden 896, tied embeddings; only
2 layers, since the logits, not the depth, are measured) scores N x T random tokens in a child
process per variant; each child resets its peak RSS (VmHWM) once the model is built and reports
it after evaluating, so the difference is the evaluation's own peak.

    python benchmarks/eval_memory.py [--samples 8 --seq-len 512 --batch-size 8 --layers 2 --dtype float32]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

VARIANTS = ("full-logits", "chunked")


def peak_rss_mb() -> float:
    """VmHWM of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the peak is the evaluation's, not the model build's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def qwen2_like(layers: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True)


@torch.no_grad()
def full_logits_perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    """The computation `care_mla.evaluation.perplexity` replaced: a whole batch's logits at once."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def child(args) -> None:
    from care_mla.evaluation.perplexity import perplexity

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_like(args.layers)).to(getattr(torch, args.dtype)).eval()
    windows = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(1))
    reset_peak_rss()
    built = peak_rss_mb()
    t = time.perf_counter()
    if args.child == "full-logits":
        ppl = full_logits_perplexity(model, windows, args.batch_size)
    else:
        ppl = perplexity(model, windows, batch_size=args.batch_size)
    print(json.dumps({"variant": args.child, "ppl": ppl if math.isfinite(ppl) else str(ppl),
                      "seconds": round(time.perf_counter() - t, 1), "model_mb": round(built),
                      "peak_rss_mb": round(peak_rss_mb())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *passed, "--child", variant], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"Qwen2-0.5B-like, {args.layers} layers, {args.dtype}, {args.samples} x {args.seq_len} tokens, "
          f"batch {args.batch_size}")
    print(f"{'variant':<12} {'model RSS MiB':>14} {'peak RSS MiB':>13} {'eval MiB':>9} {'seconds':>8}  perplexity")
    for r in rows:
        print(f"{r['variant']:<12} {r['model_mb']:>14} {r['peak_rss_mb']:>13} {r['peak_rss_mb'] - r['model_mb']:>9} "
              f"{r['seconds']:>8}  {r['ppl']}")


if __name__ == "__main__":
    main()
