"""SHA-256 of every output file of a fixed set of conversions: the proof that a refactor moved no byte.

Runs the `care-mla` command line (the one interface a restructure must not move) on tiny random models of
every family — care_mla joint and separate latents, the DeepSeek-V3 export exact and portable, the
whole-model path, one sweep cell, one healing run — and on the embedded SmolLM2 at F = 0.5 (small
calibration), everything in float32 so the figures depend on this machine's kernels only. Writes a
manifest: each case's files with their SHA-256, and the numbers of each report.json (timings, memory and
paths left out: they differ run to run).

    python benchmarks/output_hashes.py --out runs/hashes.json            # record
    python benchmarks/output_hashes.py --out runs/after.json --compare runs/hashes.json

`--compare` exits 1 and names every file or number that differs. Hashes are a property of one machine
(BLAS kernels, CPU flags): compare two runs on the same machine, never across machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TINY = ["--calib-samples", "16", "--calib-seq-len", "32", "--eval-samples", "4", "--eval-seq-len", "32",
        "--calib-dtype", "float32", "--dtype", "float32", "--quiet"]
#: Report fields that differ between two runs of the same conversion.
VOLATILE = {"timings_s", "peak_rss_mb", "peak_rss_mb_conversion", "model", "text", "statistics", "cache_file",
            "wall_time_s", "tokens_per_s", "threads", "out", "converted", "teacher", "hardware", "created",
            "peak_rss_mb_by_stage", "seconds", "cache_dir", "calib_text", "eval_text", "rss_mb_by_stage",
            "train_text", "seconds_by_step", "rss_mb", "peak_rss_mb_by_step"}


#: Files compared by their numbers (less `VOLATILE`), not by their bytes; the first one found is a case's report.
REPORTS = ("report.json", "heal_report.json", "sweep.json")


def differences(after, before, path: str = "") -> list[str]:
    """Where two reports' numbers differ, as paths (``layers[3].k_rank``)."""
    if isinstance(after, dict) and isinstance(before, dict):
        return [d for k in sorted(set(after) | set(before), key=str)
                for d in (differences(after.get(k), before.get(k), f"{path}.{k}" if path else str(k)))]
    if isinstance(after, list) and isinstance(before, list) and len(after) == len(before):
        return [d for i, (a, b) in enumerate(zip(after, before)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if after == before else [f"{path}: {before!r} -> {after!r}"]


def tiny_models(folder: Path, text: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_text, make_tokenizer, tiny_model

    text.write_text(make_text())
    tokenizer = make_tokenizer(text.read_text())
    out = {}
    for family in FAMILIES:
        out[family] = folder / f"tiny-{family}"
        tiny_model(family).save_pretrained(out[family])
        tokenizer.save_pretrained(out[family])
    return out


def cases(models: dict[str, Path], text: Path) -> list[tuple[str, list[str]]]:
    texts = ["--calib-text", str(text), "--eval-text", str(text)]
    runs = []
    for family, path in models.items():
        base = ["convert", str(path), *TINY, *texts]
        runs += [
            (f"{family}-joint", [*base, "--kv-fraction", "0.5"]),
            (f"{family}-separate", [*base, "--kv-fraction", "0.5", "--latent", "separate", "--objective", "activation"]),
            (f"{family}-deepseek-exact", [*base, "--kv-fraction", "1.0", "--format", "deepseek"]),
            (f"{family}-deepseek-half", [*base, "--kv-fraction", "0.5", "--format", "deepseek",
                                         *([] if family == "qwen2" else ["--portable"])]),  # qwen2: biases
        ]
    llama = str(models["llama"])
    runs += [
        ("llama-joint-whole", ["convert", llama, *TINY, *texts, "--kv-fraction", "0.5", "--no-layerwise"]),
        ("llama-deepseek-whole", ["convert", llama, *TINY, *texts, "--kv-fraction", "0.5", "--format", "deepseek",
                                  "--no-layerwise"]),
        ("llama-compensate", ["convert", llama, *TINY, *texts, "--kv-fraction", "0.25", "--compensate"]),
        ("llama-sweep-cell", ["sweep", llama, *TINY, *texts, "--kv-fractions", "0.5", "--methods", "care",
                              "--allocations", "uniform", "--latents", "joint", "--no-zero-shot", "--keep-models"]),
    ]
    return runs


def digest(folder: Path, work: Path) -> dict[str, str]:
    """SHA-256 of every file (settings files with the run's temporary folder written as ``<work>``); reports are
    compared by their numbers instead, plots and tables not at all."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix in (".lock", ".png", ".md") or p.name in REPORTS:
            continue
        data = p.read_bytes()
        if p.suffix == ".json":
            data = data.replace(str(work).encode(), b"<work>")
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def numbers(value):
    """The report without what differs run to run."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return value


def run(args: list[str], out: Path, cache: Path) -> None:
    command = [sys.executable, "-m", "care_mla.cli", *args, "--out", str(out), "--cache-dir", str(cache)]
    if args[0] == "heal":
        command = command[:-2]  # heal keeps no calibration cache
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's package, whichever pip installed
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")


def record(smollm2: bool, convert_args: list[str] = ()) -> dict:
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "corpus.txt"
        models = tiny_models(tmp, text)
        todo = cases(models, text)
        todo.append(("llama-heal", ["heal", str(tmp / "llama-joint"), "--teacher", str(models["llama"]),
                                    "--tokens", "256", "--seq-len", "32", "--batch-size", "2", "--train-text",
                                    str(text), "--eval-text", str(text), "--eval-samples", "2", "--eval-seq-len",
                                    "32", "--dtype", "float32", "--device", "cpu", "--quiet"]))
        if smollm2:
            todo.append(("smollm2-default-F0.5", ["convert", "smollm2-135m-instruct", "--kv-fraction", "0.5",
                                                  "--calib-samples", "32", "--calib-seq-len", "128", "--eval-samples",
                                                  "8", "--eval-seq-len", "128", "--calib-dtype", "float32",
                                                  "--dtype", "float32", "--quiet"]))
        for name, args in todo:
            if args[0] == "convert":
                args = [*args, *convert_args]
            out = tmp / name
            print(f"{name} ...", flush=True)
            run(args, out, tmp / "cache")
            found = [out / n for n in REPORTS if (out / n).is_file()]
            report = json.loads(found[0].read_text()) if found else None
            manifest[name] = {"files": digest(out, tmp), "report": numbers(report)}
    return manifest


def compare(after: dict, before: dict) -> list[str]:
    diffs = []
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            diffs.append(f"{name}: only in {'after' if b is None else 'before'}")
            continue
        for f in sorted(set(b["files"]) | set(a["files"])):
            if b["files"].get(f) != a["files"].get(f):
                diffs.append(f"{name}/{f}: {b['files'].get(f)} -> {a['files'].get(f)}")
        diffs += [f"{name}/report: {d}" for d in differences(a["report"], b["report"])]
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="manifest to write (JSON)")
    p.add_argument("--compare", type=Path, help="a manifest recorded before: report every difference")
    p.add_argument("--no-smollm2", dest="smollm2", action="store_false", help="tiny models only")
    p.add_argument("--convert-args", default="",
                   help="appended to every convert case, e.g. '--two-pass' (to compare with a tree before that flag)")
    a = p.parse_args()
    manifest = record(a.smollm2, a.convert_args.split())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    files = sum(len(m["files"]) for m in manifest.values())
    print(f"{len(manifest)} cases, {files} files hashed -> {a.out}")
    if a.compare:
        diffs = compare(manifest, json.loads(a.compare.read_text()))
        print("\n".join(diffs) if diffs else "identical: every file and every report number")
        raise SystemExit(1 if diffs else 0)


if __name__ == "__main__":
    main()
