"""Convert a random-weight Llama-style model whose bf16 weights exceed the memory limit the conversion runs under.

The model (default: hidden 2048, 24 layers, MLP 8192, 32 heads / 8 KV heads: 1.56 B parameters,
3.1 GB in bf16) is written to disk first; the conversion (CARE, F=0.5, layer by layer, bf16,
small calibration set, no evaluation; `--format deepseek` for the DeepSeek-V3 export) then runs in a child process inside a memory cgroup
limited to --limit-mb (default 1536), created under /sys/fs/cgroup/memory (cgroup v1) or by
`systemd-run --scope -p MemoryMax=` (cgroup v2). Anonymous memory over the limit is killed by
the kernel; page cache is reclaimed. Prints the weights' size, the limit, the child's peak RSS
and the cgroup's peak usage (which includes page cache).

    python benchmarks/convert_larger_than_memory.py [--limit-mb 1536] [--layers 24 --hidden 2048] [--format deepseek]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from convert_memory import CONVERT  # noqa: E402
from random_model import random_llama_config, write_random_model  # noqa: E402

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def run_limited(cmd: list[str], limit_bytes: int) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cmd` in a memory cgroup of `limit_bytes`; returns the process and the cgroup's figures."""
    if (CGROUP_V1 / "memory.limit_in_bytes").is_file() and os.access(CGROUP_V1, os.W_OK):
        group = CGROUP_V1 / f"care-mla-bench-{os.getpid()}"
        group.mkdir()
        try:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if (group / "memory.memsw.limit_in_bytes").is_file():
                try:  # no swapping around the limit either
                    (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                except OSError:
                    pass
            procs = str(group / "cgroup.procs")

            def enter():
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

            proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter)
            figures = {"mechanism": "cgroup v1 memory.limit_in_bytes",
                       "cgroup_peak_mb": int((group / "memory.max_usage_in_bytes").read_text()) / 2**20,
                       "limit_hits": int((group / "memory.failcnt").read_text())}
        finally:
            group.rmdir()
        return proc, figures
    if shutil.which("systemd-run"):
        proc = subprocess.run(["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={limit_bytes}", *cmd],
                              capture_output=True, text=True)
        return proc, {"mechanism": "systemd-run MemoryMax"}
    raise SystemExit("no way to limit memory here: need a writable cgroup v1 memory hierarchy or systemd-run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-mb", type=int, default=1536)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--format", default="care_mla", choices=["care_mla", "deepseek"])
    p.add_argument("--workdir", default=None, help="where the model is written (default: a temp folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        config = random_llama_config(a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.hidden // a.heads)
        t = time.perf_counter()
        size = write_random_model(tmp / "model", config)
        print(f"wrote the random model: {size / 1e9:.2f} GB bf16 in {time.perf_counter() - t:.0f} s", flush=True)
        args = {"model": str(tmp / "model"), "out": str(tmp / "out"), "cache": str(tmp / "cache"), "layerwise": True,
                "samples": a.samples, "seq_len": a.seq_len, "format": a.format, "latent": None}
        proc, figures = run_limited([sys.executable, "-c", CONVERT, json.dumps(args)], a.limit_mb * 2**20)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"conversion failed under the {a.limit_mb} MB limit (exit {proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out_size = sum(f.stat().st_size for f in (tmp / "out").glob("*.safetensors"))
    params = size / 2
    print(f"model: Llama-style, hidden {a.hidden}, {a.layers} layers, MLP {a.intermediate}, {a.heads}/{a.kv_heads} heads, "
          f"{params / 1e9:.2f} B parameters")
    print(f"weights (bf16):            {size / 2**20:10.0f} MB")
    print(f"memory limit:              {a.limit_mb:10d} MB   ({figures['mechanism']})")
    print(f"conversion peak RSS:       {result['peak_rss_mb']:10.0f} MB")
    if "cgroup_peak_mb" in figures:
        print(f"cgroup peak (with cache):  {figures['cgroup_peak_mb']:10.0f} MB   limit reached {figures['limit_hits']} times")
    print(f"output weights:            {out_size / 2**20:10.0f} MB")
    print(f"conversion wall time:      {result['seconds']:10.1f} s   stages: {result['timings_s']}")
    print(f"calibration: {a.samples} x {a.seq_len} tokens; CARE F=0.5 layer by layer, format {a.format}, bf16, "
          "no evaluation")


if __name__ == "__main__":
    main()
