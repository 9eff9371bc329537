"""Peak RSS of converting a mixture-of-experts model layer by layer: random Qwen3-MoE models with many experts, of
one width and two depths, against loading the whole model.

Each model is written to disk first (bf16, the hub's per-expert tensor names, streamed one tensor at a time), then
converted in its own process (CARE, F = 0.5, bf16 output, no evaluation, objective pinned to activation; the output
refit runs, so the original and converted streams read every layer with its experts again) layer by layer and with
the whole model loaded (`--no-layerwise`). Layer by layer, the peak must stay about one decoder layer (its experts)
plus the calibration hidden states and statistics, whatever the depth.

    python benchmarks/moe_memory.py [--layers 4,16] [--experts 64] [--hidden 512] [--moe-intermediate 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

from care_mla.formats.moe import checkpoint_entries
from care_mla.io import assets
from care_mla.io.checkpoint import ShardWriter
from care_mla.pipeline.layerwise import save_config, weight_plan

sys.path.insert(0, str(Path(__file__).parent))
from convert_speed import PEAK_RSS  # noqa: E402

VOCAB = 49152  # the embedded SmolLM2 tokenizer's

CONVERT = PEAK_RSS + """
import json, sys, time
from care_mla.pipeline.convert import convert
from care_mla.settings import ConvertSettings
args = json.loads(sys.argv[1])
t = time.perf_counter()
report = convert(ConvertSettings(model=args["model"], out=args["out"], kv_fraction=0.5, calib_samples=args["samples"],
                                 calib_seq_len=args["seq_len"], dtype="bfloat16", evaluate=False, progress=False,
                                 cache_dir=args["cache"], layerwise=args["layerwise"], overwrite=True,
                                 objective="activation"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "loading": report["loading"]}))
"""


def moe_config(layers: int, experts: int, hidden: int, moe_intermediate: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=experts,
                          num_experts_per_tok=8, moe_intermediate_size=moe_intermediate, norm_topk_prob=True,
                          max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def write_random_moe(folder: Path, config: Qwen3MoeConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     scale: dict[str, float] | None = None) -> int:
    """`config` with random weights (std 0.02, or ``scale[part]`` for tensors whose name contains that part; norms 1)
    in the hub's checkpoint names; returns the weight bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        state = checkpoint_entries(config, Qwen3MoeForCausalLM(config).state_dict())
    plan = weight_plan(config, ((k, v.shape, dtype) for k, v in state.items()))
    writer = ShardWriter(folder, plan)
    gen = torch.Generator().manual_seed(seed)
    for name, shape, dt in plan:
        std = next((v for part, v in (scale or {}).items() if part in name), 0.02)
        writer.add(name, (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * std).to(dt))
    writer.close()
    save_config(folder, config, None, "Qwen3MoeForCausalLM", dtype)
    AutoTokenizer.from_pretrained(assets.default_model_dir()).save_pretrained(folder)
    return writer.total_bytes


def convert_in_process(model: Path, out: Path, cache: Path, layerwise: bool, samples: int, seq_len: int) -> dict:
    args = {"model": str(model), "out": str(out), "cache": str(cache), "layerwise": layerwise, "samples": samples,
            "seq_len": seq_len}
    run = subprocess.run([sys.executable, "-c", CONVERT, json.dumps(args)], capture_output=True, text=True, check=False)
    if run.returncode:
        raise RuntimeError(f"conversion failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,16")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        for layers in (int(x) for x in a.layers.split(",")):
            config = moe_config(layers, a.experts, a.hidden, a.moe_intermediate)
            model = tmp / f"moe-{layers}"
            size = write_random_moe(model, config)
            layer_mb = (size - 2 * VOCAB * a.hidden * 2) / layers / 2**20
            row = {"layers": layers, "weights_gb": size / 1e9, "layer_mb": layer_mb}
            for layerwise in (True, False):
                t = time.perf_counter()
                name = "layerwise" if layerwise else "whole"
                row[name] = convert_in_process(model, tmp / "out", tmp / f"cache-{name}", layerwise, a.samples,
                                               a.seq_len)
                print(f"  {layers} layers, {name}: {row[name]['peak_rss_mb']:.0f} MB peak RSS, "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
            rows.append(row)
            subprocess.run(["rm", "-rf", str(model), str(tmp / "out")], check=True)
    print(f"\nrandom Qwen3-MoE, hidden {a.hidden}, {a.experts} experts of {a.moe_intermediate} (top-8), bf16 weights; "
          f"calibration {a.samples} x {a.seq_len} tokens; CARE F = 0.5 (joint, activation objective, output refit), "
          "bf16 output, no evaluation")
    print(f"{'layers':>6s} {'weights GB':>11s} {'one layer MB':>13s} {'layerwise RSS MB':>17s} {'s':>6s} "
          f"{'whole-model RSS MB':>19s} {'s':>6s}")
    for r in rows:
        print(f"{r['layers']:6d} {r['weights_gb']:11.2f} {r['layer_mb']:13.0f} {r['layerwise']['peak_rss_mb']:17.0f} "
              f"{r['layerwise']['seconds']:6.0f} {r['whole']['peak_rss_mb']:19.0f} {r['whole']['seconds']:6.0f}")


if __name__ == "__main__":
    main()
