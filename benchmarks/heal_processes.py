"""Healing in one process, two data-parallel processes and two FSDP processes: memory per process and the curves.

Writes a random-weight Llama (`random_model.py`, fp32, SmolLM2's tokenizer; 8 layers of width 1024
by default, about 140 M parameters) into OUT/model and its CARE conversion (F = 0.5) into
OUT/converted, unless they are there, then heals the conversion three times with the same global
batch, each a `care-mla heal` command of its own:

- one process, ``--batch-size 2·B``;
- ``accelerate launch --multi_gpu --num_processes 2`` (gloo on the CPU: DDP), ``--batch-size B``;
- ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2``, ``--batch-size B``.

and prints, per process, the student's parameter bytes and Adam state it holds, the teacher's
bytes, its resident memory at the end of training and at its peak, with the loss curve's largest
relative gap to the one-process run, then each process's resident memory (and peak so far) at the
end of each stage, with its anonymous part (without mapped files' pages): start (before any
model), load, evaluate_before (under FSDP both models are sharded first, from the main process's
weights), prepare, train. The allocator's retention is part of the figures: run it with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment (inherited by every process) to see without it.

    python benchmarks/heal_processes.py [--out runs/heal-processes] [--layers 8 --hidden 1024] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from random_model import random_llama_config, write_random_model  # noqa: E402

import torch  # noqa: E402

from care_mla.pipeline.convert import convert  # noqa: E402
from care_mla.settings import ConvertSettings  # noqa: E402

LAUNCHES = {
    "one process": [],
    "DDP, 2 processes": ["--multi_gpu", "--num_processes", "2"],
    "FSDP2, 2 processes": ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2"],
}
MiB = 2**20


def prepare(out: Path, a: argparse.Namespace) -> Path:
    model, converted = out / "model", out / "converted"
    if not (model / "config.json").is_file():
        config = random_llama_config(a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim)
        size = write_random_model(model, config, torch.float32)
        print(f"wrote {model}: {size / 1e6:.0f} MB of fp32 weights")
    if not (converted / "config.json").is_file():
        convert(ConvertSettings(model=str(model), out=str(converted), kv_fraction=0.5, calib_samples=8,
                                calib_seq_len=a.seq_len, evaluate=False, progress=False, cache_dir=str(out / "cache")))
    return converted


def heal_command(name: str, converted: Path, out: Path, a: argparse.Namespace) -> list[str]:
    processes = 2 if LAUNCHES[name] else 1
    heal = ["-m", "care_mla.cli", "heal", str(converted), "--teacher", str(out / "model"), "--out", str(out / "healed"),
            "--tokens", str(a.steps * 2 * a.batch * a.seq_len), "--batch-size", str(2 * a.batch // processes),
            "--seq-len", str(a.seq_len), "--lr", "1e-4", "--eval-every", "0", "--eval-samples", "2",
            "--eval-seq-len", str(a.seq_len), "--log-every", "1", "--save-every", str(10 * a.steps), "--quiet",
            "--device", "cpu", "--overwrite", "--threads", str(max(1, a.threads // processes))]
    if processes == 1:
        return [sys.executable, *heal]
    return [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHES[name], "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *heal]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/heal-processes"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="windows per process and step in the 2-process runs")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (each of 2 processes gets half)")
    a = p.parse_args()

    converted = prepare(a.out, a)
    rows, reference = [], None
    for name in LAUNCHES:
        t = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, a.threads // (2 if LAUNCHES[name] else 1)))}
        done = subprocess.run(heal_command(name, converted, a.out, a), capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
        report = json.loads((a.out / "healed" / "heal_report.json").read_text())
        shutil.rmtree(a.out / "healed")
        losses = [loss for _, loss in report["loss_curve"]]
        reference = reference or losses
        gap = max(abs(x - y) / abs(y) for x, y in zip(losses, reference))
        rows.append((name, time.perf_counter() - t, report, gap))

    first = rows[0][2]["processes"]
    print(f"student {first['student_param_bytes'] / MiB:.0f} MiB of fp32 parameters whole, teacher "
          f"{first['teacher_param_bytes'] / MiB:.0f} MiB; global batch {2 * a.batch} x {a.seq_len} tokens, "
          f"{a.steps} steps\n")
    print("| run | process | student params held | Adam state | teacher params | RSS after training | peak RSS "
          "| loss curve vs one process | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, seconds, report, gap in rows:
        for proc in report["processes"]["per_process"]:
            print(f"| {name} | {proc['rank']} | {proc['student_param_bytes'] / MiB:.0f} MiB "
                  f"| {proc['optimizer_state_bytes'] / MiB:.0f} MiB | {proc['teacher_param_bytes'] / MiB:.0f} MiB "
                  f"| {proc['rss_mb']:.0f} MiB | {proc['peak_rss_mb']:.0f} MiB | {gap:.1e} | {seconds:.0f} s |")
    print("\nRSS / peak RSS so far / anonymous RSS at the end of each stage, MiB:")
    for name, _, report, _ in rows:
        for proc in report["processes"]["per_process"]:
            stages = ", ".join(f"{stage} {rss:.0f} / {peak:.0f} / {anon:.0f}"
                               for stage, (rss, peak, anon) in proc["rss_mb_by_stage"].items())
            print(f"- {name}, process {proc['rank']}: {stages}")
    print("\nthe main process's peak RSS over the whole run (with the export: under FSDP it gathers the student whole):")
    for name, _, report, _ in rows:
        print(f"- {name}: {report['peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
