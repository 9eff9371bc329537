"""Healing curve of the embedded SmolLM2-135M-Instruct: held-out perplexity against training tokens.

Converts the model (CARE, ``--kv-fraction 0.25`` by default) into OUT/converted unless
``--converted`` is given or OUT/converted already holds a conversion, heals it with
`care_mla.healing.heal` for ``--tokens`` into OUT/healed, and prints the (tokens, held-out ppl) curve,
wall time, tokens/s, the perplexities of the original, converted and healed models and the
fraction of the gap closed, ``(before − after) / (before − original)``. Usage:

    python benchmarks/heal_curve.py --tokens 2000000 [--out runs/heal-curve] [--format deepseek] [--lora]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from care_mla.healing.heal import HEAL_PLOT_FILE, HEAL_REPORT_FILE, heal
from care_mla.healing.settings import HealSettings
from care_mla.io import assets
from care_mla.pipeline.convert import convert
from care_mla.settings import FORMATS, ConvertSettings


def converted_folder(a: argparse.Namespace, out: Path) -> Path:
    if a.converted:
        return Path(a.converted)
    folder = out / "converted"
    if (folder / "config.json").is_file():
        print(f"reusing the conversion in {folder}")
        return folder
    convert(ConvertSettings(model=assets.DEFAULT_MODEL, out=str(folder), format=a.format, kv_fraction=a.kv_fraction,
                            calib_samples=a.calib_samples, evaluate=False, progress=not a.quiet))
    return folder


def format_curve(report: dict) -> str:
    lines = ["| training tokens | held-out ppl |", "|---:|---:|"]
    lines += [f"| {tokens:,} | {ppl:.3f} |" for tokens, ppl in report["eval_curve"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--out", default="runs/heal-curve")
    p.add_argument("--converted", default=None, help="an existing conversion of SmolLM2 (skips converting)")
    p.add_argument("--kv-fraction", type=float, default=0.25)
    p.add_argument("--format", choices=FORMATS, default="care_mla")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration windows of the conversion")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-top-k", type=int, default=None)
    p.add_argument("--no-kd", dest="kd_weight", action="store_const", const=0.0)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = Path(a.out)
    converted = converted_folder(a, out)
    settings = HealSettings(
        converted=str(converted), teacher=assets.DEFAULT_MODEL, out=str(out / "healed"), tokens=a.tokens, lr=a.lr,
        batch_size=a.batch_size, grad_accum=a.grad_accum, seq_len=a.seq_len, kd_weight=a.kd_weight,
        kd_temperature=a.kd_temperature, kd_top_k=a.kd_top_k, lora=a.lora, lora_rank=a.lora_rank,
        eval_every=a.eval_every, eval_samples=a.eval_samples, device=a.device, dtype=a.dtype, resume=a.resume,
        overwrite=a.overwrite, progress=not a.quiet,
    )
    report = heal(settings)

    ppl = report["ppl"]
    kd = f"CE + {settings.kd_weight:g}·τ²·KL, τ = {settings.kd_temperature:g}"
    loss = "CE only" if settings.kd_weight == 0 else kd
    print(f"\nSmolLM2-135M-Instruct, {report['format']} conversion in {converted}, healed ({report['mode']}, {loss}, "
          f"lr {settings.lr:g}) on {report['tokens_seen']:,} tokens")
    print(format_curve(report))
    gap = "n/a" if ppl["gap_closed"] is None else f"{100 * ppl['gap_closed']:.1f} %"
    ratio = {k: ppl[k] / ppl["original"] for k in ("before", "after")}
    print(f"held-out ppl: original {ppl['original']:.3f}, before {ppl['before']:.3f}, after {ppl['after']:.3f} "
          f"(× original {ratio['before']:.3f} → {ratio['after']:.3f}); gap closed {gap}")
    print(f"wall time {report['wall_time_s']:.0f} s (training {report['timings_s']['train']:.0f} s), "
          f"{report['tokens_per_s']:,.0f} training tokens/s on {report['device']}")
    print(f"report {Path(settings.out) / HEAL_REPORT_FILE}, plot {Path(settings.out) / HEAL_PLOT_FILE}")


if __name__ == "__main__":
    main()
