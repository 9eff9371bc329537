"""Conversion wall time and peak RSS next to a plain forward pass over the same calibration tokens.

Each measurement runs in its own process so their peak RSS figures do not mix. Usage:

    python benchmarks/convert_speed.py [--model smollm2-135m-instruct] [--samples 256] [--seq-len 256]
                                       [--device cpu|cuda] [--format care_mla|deepseek] [--compare-whole] [--paper]
                                       [--repeat N]

On a GPU (`--device cuda`) both sides run there and the peak GPU memory is printed as well. Both sides tokenise the
calibration text before their clock starts (the conversion's first run on a text pays that once, ~2 s for the Austen
novels; the time is printed, and the ratio with it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

#: Prepended to every child script: the child's own peak RSS (ru_maxrss would include the
#: parent's, inherited at exec).
PEAK_RSS = """
def peak_rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
def peak_gpu_mb():
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
"""

FORWARD = PEAK_RSS + """
import json, sys, time, torch
from transformers import AutoConfig
from care_mla.pipeline.load import calib_dtype, load_model, resolve_model_path
from care_mla.io.text import load_windows
from care_mla.settings import ConvertSettings
args = json.loads(sys.argv[1])
device = torch.device(args["device"])
# the dtype the conversion's calibration uses ("auto": this machine's fastest safe one, same probe and cache)
settings = ConvertSettings(calib_dtype=args["calib_dtype"], calib_seq_len=args["seq_len"], batch_size=args["batch_size"],
                           cache_dir=args["cache"])
dtype, _ = calib_dtype(settings, AutoConfig.from_pretrained(resolve_model_path(args["model"])), device, torch.float32)
model, tok, _ = load_model(args["model"], dtype, device)
ids, _ = load_windows(tok, "austen", "calibration", args["samples"], args["seq_len"])
t = time.perf_counter()
with torch.no_grad():
    for start in range(0, ids.shape[0], args["batch_size"]):
        # decoder stack, as calibration runs it
        model.model(ids[start:start + args["batch_size"]].to(device), use_cache=False)
if device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
                  "dtype": str(dtype).removeprefix("torch.")}))
"""

CONVERT = PEAK_RSS + """
import json, sys, time
from transformers import AutoTokenizer
from care_mla.pipeline.calibration import calibration_windows
from care_mla.pipeline.convert import convert
from care_mla.pipeline.load import resolve_model_path
from care_mla.settings import ConvertSettings
args = json.loads(sys.argv[1])
settings = ConvertSettings(model=args["model"], out=args["out"], kv_fraction=0.5, calib_samples=args["samples"],
                           calib_seq_len=args["seq_len"], calib_dtype=args["calib_dtype"], batch_size=args["batch_size"],
                           evaluate=False, progress=False, cache_dir=args["cache"], layerwise=args["layerwise"],
                           overwrite=True, device=args["device"], format=args["format"], **args.get("settings", {}))
# the calibration text tokenised before the clock, as the plain forward's is (the conversion then reads its tokens
# from the cache, as any run after the first one on this text does)
t = time.perf_counter()
calibration_windows(AutoTokenizer.from_pretrained(resolve_model_path(args["model"])), settings)
tokenize = time.perf_counter() - t
t = time.perf_counter()
report = convert(settings)
print(json.dumps({"seconds": time.perf_counter() - t, "tokenize_s": tokenize, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
                  "timings_s": report["timings_s"], "calibration_dtype": report["calibration"]["dtype"],
                  "single_pass_s": (report.get("single_pass") or {}).get("seconds_by_step"),
                  "single_pass_mb": (report.get("single_pass") or {}).get("peak_rss_mb_by_step")}))
"""


def run(code: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-dtype", default="auto",
                   help="forward dtype of both sides: auto (default) = the conversion's own choice for this machine")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--format", default="care_mla", choices=["care_mla", "deepseek"])
    p.add_argument("--compare-whole", action="store_true", help="also time the conversion with the whole model loaded")
    p.add_argument("--paper", action="store_true",
                   help="also time the paper's CARE (separate latents, activation objective, no output refit: no choice, "
                        "no converted stream), its own calibration")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the plain forward and the default conversion this many times, alternately, and report "
                        "each pair's ratio and their median (a shared machine's speed drifts between runs)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args = {"model": a.model, "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
                "calib_dtype": a.calib_dtype, "out": f"{tmp}/out", "cache": f"{tmp}/cache", "device": a.device,
                "format": a.format}
        t = time.perf_counter()
        pairs = []
        for k in range(a.repeat):  # each conversion its own empty cache: it calibrates
            pairs.append((run(FORWARD, args), run(CONVERT, {**args, "layerwise": True, "cache": f"{tmp}/cache-{k}"})))
        fwd, conv = pairs[0]
        whole = run(CONVERT, {**args, "layerwise": False, "cache": f"{tmp}/cache-whole"}) if a.compare_whole else None
        paper = run(CONVERT, {**args, "layerwise": True, "cache": f"{tmp}/cache-paper", "settings": {
            "latent": "separate", "objective": "activation", "refit_output": False}}) if a.paper else None
        total = time.perf_counter() - t
    tokens = a.samples * a.seq_len
    from hardware_probe import probe_summary  # benchmarks/ is on the path of a script run from it

    print("hardware:", json.dumps(probe_summary(device=a.device)))
    print(f"model {a.model}, {a.samples} x {a.seq_len} = {tokens:,} calibration tokens, forward dtype {fwd['dtype']} "
          f"(conversion: {conv['calibration_dtype']}), device {a.device}, format {a.format}")
    gpu = a.device == "cuda"
    print(f"{'':44s}{'wall s':>10s}{'peak RSS MB':>14s}" + (f"{'peak GPU MB':>14s}" if gpu else ""))
    for name, r in (("plain forward (decoder stack)", fwd), ("conversion, layer by layer (default)", conv),
                    ("conversion, whole model loaded", whole), ("the paper's CARE (no levers)", paper)):
        if r:
            print(f"{name:44s}{r['seconds']:10.1f}{r['peak_rss_mb']:14.0f}" + (f"{r['peak_gpu_mb']:14.0f}" if gpu else ""))
    print(f"ratio conversion / forward: {conv['seconds'] / fwd['seconds']:.2f}   stages: {conv['timings_s']}")
    print(f"   tokenising the calibration text, before the clock on both sides (a first run on a text pays it once; "
          f"then cached): {conv['tokenize_s']:.1f} s; ratio with it: {(conv['seconds'] + conv['tokenize_s']) / fwd['seconds']:.2f}")
    if conv.get("single_pass_s"):
        print(f"   the one pass by step (s): {conv['single_pass_s']}")
        print(f"   the one pass's peak RSS by step (MB): {conv['single_pass_mb']}")
    if len(pairs) > 1:
        ratios = sorted(c["seconds"] / f["seconds"] for f, c in pairs)
        for k, (f, c) in enumerate(pairs[1:], 2):
            print(f"run {k}: plain forward {f['seconds']:.1f} s, conversion {c['seconds']:.1f} s, ratio "
                  f"{c['seconds'] / f['seconds']:.2f}, peak RSS {f['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} MB"
                  + (f"; one pass by step (s): {c['single_pass_s']}" if c.get("single_pass_s") else ""))
        print(f"median ratio conversion / forward over {len(pairs)} alternating runs: "
              f"{ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1:][:2]) / 2:.2f}")
    if whole:
        print(f"ratio whole-model conversion / forward: {whole['seconds'] / fwd['seconds']:.2f}   stages: {whole['timings_s']}")
    if paper:
        print(f"ratio paper's CARE / forward: {paper['seconds'] / fwd['seconds']:.2f}   stages: {paper['timings_s']}")
    print(f"(benchmark wall time {total:.0f} s)")


if __name__ == "__main__":
    main()
