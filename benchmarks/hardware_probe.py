"""What this machine does: CPU model, flags and cores, threads, GEMM GFLOPS per dtype at a model's shapes, memory GB/s.

Prints one JSON object. The GEMMs are the projections of one decoder layer (q/o, k/v, MLP up
and down) on `--tokens` tokens, timed by `care_mla.io.hardware.probe_dtypes` (fp32 first, a dtype
50x slower timed once); the bandwidth is the best of a few copies of a large tensor (bytes
read + written per second). Other benchmarks store the same figures with their results:

    from hardware_probe import probe_summary      # benchmarks/ is on sys.path when run as a script
    result["hardware"] = probe_summary()

Usage:

    python benchmarks/hardware_probe.py [--hidden 576 --kv 192 --mlp 1536 | --model-config config.json]
        [--tokens 2048] [--dtypes float32,bfloat16,float16] [--device cpu] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from care_mla.io import hardware

SMOLLM2_135M = {"hidden": 576, "kv": 192, "mlp": 1536}


def dims_from_config(path: str | Path) -> dict[str, int]:
    """hidden, kv (key/value heads x head dim) and mlp widths from a Hugging Face ``config.json``."""
    config = json.loads(Path(path).read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return {"hidden": hidden, "kv": kv_heads * head_dim, "mlp": config["intermediate_size"]}


@torch.inference_mode()
def memory_bandwidth(mib: int = 128, repeats: int = 3, device: str | torch.device = "cpu") -> float:
    """GB/s of a large tensor copy (read + write), best of `repeats` after a warm-up copy."""
    device = torch.device(device)
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(1 + repeats):
        hardware._sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        hardware._sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def probe_summary(dims: dict[str, int] | None = None, *, tokens: int = 512,
                  dtypes: Sequence[str] = hardware.DTYPE_NAMES, device: str | torch.device = "cpu",
                  bandwidth_mib: int = 128) -> dict:
    """The machine's description and measured speeds, as one JSON-ready dict to store with a result.

    `dims` (hidden, kv, mlp; SmolLM2-135M by default) and `tokens` set the GEMM shapes.
    """
    dims = dims or SMOLLM2_135M
    shapes = hardware.gemm_shapes(dims["hidden"], dims["kv"], dims["mlp"], tokens=tokens)
    report = hardware.hardware_report(device)
    start = time.perf_counter()
    gflops = hardware.probe_dtypes(list(dtypes), shapes, device)
    probe_s = time.perf_counter() - start
    flags = set(report["cpu_flags"])
    step = "calibration"
    chosen, reason = hardware.choose_dtype(gflops, device_type=torch.device(device).type, cpu_flags=flags,
                                           step=step,
                                           cuda_bf16_supported=report.get("cuda_bf16_supported", False))
    return {
        **report,
        "dims": dims,
        "tokens": tokens,
        "shapes": [list(s) for s in shapes],
        "gemm_gflops": {n: round(v, 2) for n, v in gflops.items()},
        "gemm_speedup_vs_fp32": {n: round(v / gflops["float32"], 3) for n, v in gflops.items()},
        "probe_seconds": round(probe_s, 3),
        "memory_bandwidth_gbs": round(memory_bandwidth(bandwidth_mib, device=device), 2),
        "calibration_dtype": chosen,
        "calibration_reason": reason,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=SMOLLM2_135M["hidden"])
    parser.add_argument("--kv", type=int, default=SMOLLM2_135M["kv"], help="key/value heads x head dim")
    parser.add_argument("--mlp", type=int, default=SMOLLM2_135M["mlp"])
    parser.add_argument("--model-config", help="a config.json to read hidden/kv/mlp widths from")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtypes", default=",".join(hardware.DTYPE_NAMES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: physical cores)")
    parser.add_argument("--bandwidth-mib", type=int, default=128)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = sorted(set(dtypes) - set(hardware.DTYPE_NAMES))
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {', '.join(hardware.DTYPE_NAMES)}")
    dims = dims_from_config(args.model_config) if args.model_config else {
        "hidden": args.hidden, "kv": args.kv, "mlp": args.mlp}
    hardware.configure_threads(args.threads)
    result = probe_summary(dims, tokens=args.tokens, dtypes=dtypes, device=args.device,
                           bandwidth_mib=args.bandwidth_mib)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
