"""Peak RSS of a conversion by model depth: random-weight models of one width and 8, 32, 128 layers.

Each model is written to disk first (`random_model.py`, bf16), then converted in its own
process (CARE, F=0.5, bf16 output, no evaluation; by default separate latents with adjusted
ranks, `--format deepseek` for the DeepSeek-V3 export, `--latent` for another latent) layer by
layer and, with --compare-whole, with the whole model loaded (`--no-layerwise`). Layer by
layer, the peak must not grow with depth beyond the statistics (one D×D fp32 second moment
per layer); loading the whole model, it grows with the weights.

    python benchmarks/convert_memory.py [--layers 8,32,128] [--hidden 576] [--samples 32 --seq-len 256]
                                        [--format care_mla|deepseek] [--latent separate|joint|decoupled]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from convert_speed import PEAK_RSS  # noqa: E402
from random_model import random_llama_config, write_random_model  # noqa: E402

CONVERT = PEAK_RSS + """
import json, sys, time
from care_mla.pipeline.convert import convert
from care_mla.settings import ConvertSettings
args = json.loads(sys.argv[1])
t = time.perf_counter()
report = convert(ConvertSettings(model=args["model"], out=args["out"], kv_fraction=0.5, calib_samples=args["samples"],
                                 calib_seq_len=args["seq_len"], dtype="bfloat16", evaluate=False, progress=False,
                                 cache_dir=args["cache"], layerwise=args["layerwise"], overwrite=True,
                                 format=args["format"], latent=args["latent"]))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
                  "loading": report["loading"], "timings_s": report["timings_s"]}))
"""


def convert_in_process(model: Path, out: Path, cache: Path, layerwise: bool, samples: int, seq_len: int,
                       fmt: str = "care_mla", latent: str | None = None) -> dict:
    args = {"model": str(model), "out": str(out), "cache": str(cache), "layerwise": layerwise, "samples": samples,
            "seq_len": seq_len, "format": fmt, "latent": latent}
    run = subprocess.run([sys.executable, "-c", CONVERT, json.dumps(args)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"conversion failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="8,32,128")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--format", default="care_mla", choices=["care_mla", "deepseek"])
    p.add_argument("--latent", default=None, choices=["separate", "joint", "decoupled"])
    p.add_argument("--compare-whole", action="store_true", help="also convert with the whole model in memory")
    p.add_argument("--workdir", default=None, help="where the random models are written (default: a temp folder)")
    a = p.parse_args()
    depths = [int(x) for x in a.layers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        # token ids cached once (as any repeated conversion finds them): tokenising the 3 MB text
        # peaks at ~400 MB, which would otherwise weigh on the first depth only
        from transformers import AutoTokenizer

        from care_mla.io.text import resolve_text, tokenize_file

        for layers in depths:
            config = random_llama_config(layers, a.hidden, a.intermediate)
            model = tmp / f"random-{layers}"
            size = write_random_model(model, config)
            for mode in ("layerwise", "whole"):  # each mode calibrates afresh in its own cache
                tokenize_file(AutoTokenizer.from_pretrained(model), resolve_text("austen", "calibration"),
                              tmp / f"cache-{mode}")
            stats_mb = layers * (a.hidden**2 + a.hidden) * 4 / 2**20
            row = {"layers": layers, "weights_gb": size / 1e9, "stats_mb": stats_mb}
            for layerwise in (True, False) if a.compare_whole else (True,):
                t = time.perf_counter()
                cache = tmp / f"cache-{'layerwise' if layerwise else 'whole'}"
                r = convert_in_process(model, tmp / "out", cache, layerwise, a.samples, a.seq_len, a.format, a.latent)
                row["layerwise" if layerwise else "whole"] = r
                print(f"  {layers} layers, {'layer by layer' if layerwise else 'whole model'}: "
                      f"{r['peak_rss_mb']:.0f} MB peak RSS, {time.perf_counter() - t:.0f} s", flush=True)
            rows.append(row)
            subprocess.run(["rm", "-rf", str(model), str(tmp / "out")], check=True)
    print(f"\nrandom Llama-style models, hidden {a.hidden}, intermediate {a.intermediate}, bf16 weights; "
          f"calibration {a.samples} x {a.seq_len} tokens; CARE F=0.5, format {a.format}, latent {a.latent or 'default'}, "
          "bf16 output, no evaluation")
    head = f"{'layers':>6s} {'weights GB':>11s} {'stats MB':>9s} {'peak RSS MB':>12s} {'conv s':>7s}"
    print(head + (f" {'whole-model RSS MB':>19s}" if a.compare_whole else ""))
    for r in rows:
        line = (f"{r['layers']:6d} {r['weights_gb']:11.2f} {r['stats_mb']:9.1f} {r['layerwise']['peak_rss_mb']:12.0f} "
                f"{r['layerwise']['seconds']:7.1f}")
        print(line + (f" {r['whole']['peak_rss_mb']:19.0f}" if a.compare_whole else ""))
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        grow = last["layerwise"]["peak_rss_mb"] - first["layerwise"]["peak_rss_mb"]
        stats = last["stats_mb"] - first["stats_mb"]
        weights = (last["weights_gb"] - first["weights_gb"]) * 1e9 / 2**20
        print(f"{first['layers']} -> {last['layers']} layers: peak RSS +{grow:.0f} MB layer by layer, of which "
              f"statistics +{stats:.0f} MB; weights +{weights:.0f} MB")


if __name__ == "__main__":
    main()
