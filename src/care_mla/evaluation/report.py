"""Markdown reports of output folders: `report(folder)` writes REPORT.md and returns it.

A folder is recognised by the JSON it holds — ``sweep.json`` (`care-mla sweep`),
``heal_report.json`` (`care-mla heal`), ``report.json`` (`care-mla convert`, or a model kept
by a sweep) — and each one present gets its section, in that order. PNG plots in the folder
are embedded by relative path, so REPORT.md renders wherever the folder is moved. Rendering
only reads what is there: fields a report lacks are left out, never guessed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["REPORT_FILE", "ReportError", "report", "add_report_parser", "run_report_command"]

REPORT_FILE = "REPORT.md"
_SOURCES = ("sweep.json", "heal_report.json", "report.json")


class ReportError(ValueError):
    """The folder holds nothing to report on; the message says what is expected."""


# ----------------------------------------------------------------------------- helpers


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _table(head: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _num(c) for c in row) + " |" for row in rows]
    return lines


def _images(folder: Path, names: list[str] | None = None) -> list[str]:
    """Markdown image lines for `names` (default: every PNG in the folder), by relative path."""
    names = names if names is not None else sorted(p.name for p in folder.glob("*.png"))
    return [f"![{Path(n).stem.replace('_', ' ')}]({n})" for n in names if (folder / n).is_file()]


def _name(path) -> str:
    return Path(str(path)).name or str(path)


def _metrics_text(r: dict) -> str:
    if "unavailable" in r:
        return f"unavailable ({r['unavailable']})"
    shown = ", ".join(f"{m} {_pct(r[m])}" for m in ("acc", "acc_norm", "acc_mutual_info") if m in r)
    return f"**{_pct(r.get('score', r.get('acc')))}** ({shown}; {_num(r.get('samples'))} items)"


def _zero_shot_lines(pair: dict | None) -> list[str]:
    """Per-task table of a convert report's ``zero_shot`` ({"original": …, "converted": …})."""
    if not pair or not pair.get("converted"):
        return []
    models = [m for m in ("original", "converted") if pair.get(m)]
    tasks = list(dict.fromkeys(t for m in models for t in pair[m].get("tasks", {})))
    rows = [[task] + [_metrics_text(pair[m]["tasks"].get(task, {"unavailable": "not run"})) for m in models]
            for task in tasks]
    rows.append(["average"] + [f"**{_pct(pair[m].get('average_acc'))}**" for m in models])
    limit = pair["converted"].get("limit")
    return ["", f"Zero-shot accuracy (lm-eval, ≤ {_num(limit)} items per task; bold: the task's score):", ""] \
        + _table(["task"] + models, rows)


# ----------------------------------------------------------------------------- sections


def _convert_section(folder: Path, r: dict) -> list[str]:
    lines = [f"# Conversion: {_name(r.get('model', '?'))} → {r.get('architecture', '?')}", ""]
    f = r.get("kv_fraction")
    what = [f"method **{r.get('method')}**", f"allocation **{r.get('allocation')}**", f"latent **{r.get('latent')}**"]
    if (r.get("objective_choice") or {}).get("per_layer"):
        what.append("objective and key emphasis **chosen per layer** (one pass)")
    elif r.get("objective") not in (None, "activation"):
        what.append(f"objective **{r['objective']}** (key emphasis {r.get('key_emphasis')})")
    if r.get("compensate"):
        what.append("**error compensation** across layers")
    if r.get("refit_output"):
        what.append("**o_proj refitted** to the original attention outputs")
    if f is not None:
        what.append(f"kv_fraction **{f:g}** ({100 * (1 - f):g} % of the GQA cache saved)")
    lines.append(", ".join(what) + f"; format {r.get('format', 'care_mla')}" +
                 (f"; from sweep cell `{r['from_sweep']}`" if r.get("from_sweep") else "") + ".")
    lines.append("")
    for field, title in (("objective_choice", "objective"), ("rope_dim_choice", "RoPE/latent split")):
        choice = r.get(field)
        if choice and "per_layer" in choice:  # the one pass: chosen per layer by what each candidate's refit leaves
            rounds = choice.get("screening")
            lines += [f"Chosen per layer ({title}) by the attention-output error each candidate leaves after its own "
                      f"o_proj refit, on {choice['windows']} calibration windows" +
                      (f" (every candidate screened on {rounds['windows']} of them, the {rounds['finalists']} best "
                       "scored on all)" if rounds else "") + ":", ""]
            rows = [[name, str(count), ", ".join(str(i) for i, c in enumerate(choice["per_layer"]) if c == name)]
                    for name, count in sorted(choice["layers_by_candidate"].items(), key=lambda kv: -kv[1])]
            lines += _table(["candidate", "layers", "which"], rows) + [""]
        elif choice:
            lines += [f"Chosen by calibration loss ({title}): **{choice['chosen']}**", ""]
            screening, final = choice.get("screening_loss") or {}, choice["calibration_loss"]
            windows = choice.get("windows") or {}
            header = ["candidate", f"loss on {windows['all']} windows (nats/token)" if windows else
                      "calibration loss (nats/token)"]
            if screening:  # two rounds: every candidate on a few windows, the finalists on all
                header.insert(1, f"screening, {windows['screening']} windows")
                rows = [[k, _num(v, 6), _num(final[k], 6) if k in final else "—"] for k, v in screening.items()]
            else:
                rows = [[k, _num(v, 6)] for k, v in final.items()]
            lines += _table(header, rows) + [""]
    rows = []
    width = r.get("kv_cache_width_per_layer") or {}
    if width:
        rows.append(["KV cache, numbers per token and layer", _num(width.get("original")), _num(width.get("converted"))])
    kv = r.get("kv_bytes_per_token") or {}
    if kv:
        rows.append(["KV bytes per token, from the config", _num(kv.get("original")), _num(kv.get("converted"))])
        if "converted_measured" in kv:
            rows.append(["KV bytes per token, measured after generate", _num(kv.get("original_measured")),
                         _num(kv.get("converted_measured"))])
    ppl = r.get("ppl") or {}
    if ppl:
        ratio = ppl.get("ratio")
        rows.append(["held-out perplexity", _num(ppl.get("original")),
                     _num(ppl.get("converted")) + (f" ({ratio:.3f}×)" if ratio is not None else "")])
    if rows:
        lines += _table(["", "original", "converted"], rows)
    status = r.get("evaluation_status")
    if status and status != "done":
        lines += ["", f"**Evaluation {status}**" + (" — re-run it with `care-mla eval`." if status != "pending" else ".")]
    lines += _zero_shot_lines(r.get("zero_shot"))
    paired = (r.get("zero_shot_difference") or {}).get("mean") or {}
    if paired.get("difference") is not None and paired.get("stderr") is not None:
        lines += ["", f"Converted − original on the same documents (paired): {100 * paired['difference']:+.1f} ± "
                      f"{100 * paired['stderr']:.1f} points in the mean over {len(paired['tasks'])} tasks."]
    cal = r.get("calibration")
    if cal:
        lines += ["", f"Calibration: {_name(cal.get('text'))}, {_num(cal.get('samples'))} × {_num(cal.get('seq_len'))} "
                      f"tokens ({_num(cal.get('tokens'))}), forward passes in {cal.get('dtype')}."]
    ev = r.get("evaluation")
    if ev:
        lines.append(f"Evaluation: {_name(ev.get('text'))}, {_num(ev.get('samples'))} × {_num(ev.get('seq_len'))} tokens "
                     "(held out from calibration).")
    layers = r.get("layers")
    if layers:
        keys = [k for k in layers[0] if k != "layer"]
        lines += ["", "## Per-layer ranks and relative activation errors", ""]
        lines += _table(["layer"] + keys, [[row.get("layer")] + [row.get(k) for k in keys] for row in layers])
    support = r.get("runtime_support")
    if support and support.get("engines"):
        lines += ["", "## Runtime support", ""]
        lines += _table(["engine", "runs it", "rule checked", "why not", "verified"],
                        [[name, "yes" if e.get("ok") else "no", e.get("rule"), "; ".join(e.get("reasons") or []) or "—",
                          e.get("verified")] for name, e in support["engines"].items()])
    elif support:
        lines += ["", f"Runtime support: transformers {support.get('transformers')}, "
                      f"vLLM/SGLang {support.get('vllm_sglang')}"
                      + (f" ({'; '.join(support.get('reasons') or [])})" if support.get("reasons") else "") + "."]
    timings = r.get("timings_s")
    if timings:
        lines += ["", "Timings: " + ", ".join(f"{k} {_num(v, 3)} s" for k, v in timings.items())
                  + (f"; peak RSS {_num(r.get('peak_rss_mb'))} MB" if r.get("peak_rss_mb") else "") + "."]
    if r.get("peak_rss_mb_by_stage"):
        lines += ["", "Peak memory by stage: " + ", ".join(f"{k} {_num(v)} MB"
                                                          for k, v in r["peak_rss_mb_by_stage"].items()) + "."]
    steps = r.get("single_pass") or {}
    if steps.get("seconds_by_step"):
        peaks = steps.get("peak_rss_mb_by_step") or {}
        lines += ["", "The one pass by step: " + ", ".join(
            f"{k} {_num(v, 3)} s" + (f" (peak {_num(peaks[k])} MB)" if k in peaks else "")
            for k, v in steps["seconds_by_step"].items()) + "."]
    return lines


def _heal_section(folder: Path, r: dict) -> list[str]:
    lines = [f"# Healing: {_name(r.get('converted', '?'))}", ""]
    ppl = r.get("ppl") or {}
    gap = ppl.get("gap_closed")
    rows = [["held-out perplexity", _num(ppl.get("original")), _num(ppl.get("before")), _num(ppl.get("after")),
             _pct(gap)]]
    acc = r.get("accuracy")
    if acc:
        rows.append([f"mean zero-shot accuracy ({', '.join(acc['tasks'])}; {_num(acc['limit'])} documents/task)",
                     *(_pct(acc.get(k)) for k in ("original", "before", "after", "gap_closed"))])
    lines += _table(["", "original (teacher)", "converted, before healing", "healed", "gap closed"], rows)
    facts = []
    for key, label in (("tokens_seen", "training tokens"), ("steps", "steps"), ("wall_time_s", "wall time (s)"),
                       ("tokens_per_s", "tokens/s"), ("mode", "mode"), ("format", "format")):
        if r.get(key) is not None:
            facts.append(f"{label} {_num(r[key])}")
    if facts:
        line = "; ".join(facts)
        lines += ["", line[0].upper() + line[1:] + "."]
    if r.get("teacher"):
        lines.append(f"Teacher: {_name(r['teacher'])}.")
    training = r.get("training") or {}
    if training.get("text"):
        lines.append(f"Training text: {_name(training['text'])} ({_num(training.get('windows'))} windows × "
                     f"{_num(training.get('seq_len'))} tokens); held out: {_name((r.get('evaluation') or {}).get('text'))}.")
    loss = r.get("loss_curve") or []
    if loss:
        values = [p[1] for p in loss]
        lines += ["", f"Training loss: {_num(values[0])} at {_num(loss[0][0])} tokens → {_num(values[-1])} at "
                      f"{_num(loss[-1][0])} tokens (lowest {_num(min(values))}; {len(loss)} points)."]
    curve = r.get("eval_curve") or []
    if curve:
        lines += ["", "## Held-out perplexity during healing", ""]
        lines += _table(["training tokens", "perplexity"], [[int(t), p] for t, p in curve])
    accuracy_curve = r.get("accuracy_curve") or []
    if accuracy_curve:
        sliced = acc["slice"]
        reached = sliced.get("tokens_to_within_1_point")
        lines += ["", "## Zero-shot accuracy during healing", "",
                  f"Mean accuracy on a slice of {_num(sliced['limit'])} documents per task; the original scores "
                  f"{_pct(sliced.get('original'))} on it; within 1 point "
                  + (f"after {_num(reached)} training tokens." if reached is not None else "at no point measured."), ""]
        lines += _table(["training tokens", "mean accuracy"], [[int(t), _pct(a)] for t, a in accuracy_curve])
    lines += [""] + _images(folder, ["heal_curve.png"])  # the plot `care-mla heal` writes
    return lines


def _sweep_section(folder: Path, r: dict) -> list[str]:
    from care_mla.evaluation.sweep import format_table

    lines = format_table(r).rstrip("\n").splitlines()
    cal = r.get("calibration") or {}
    if cal:
        lines += ["", f"Calibration: once, {_name(cal.get('text'))}, {_num(cal.get('samples'))} × "
                      f"{_num(cal.get('seq_len'))} tokens; every cell factorised from the same statistics."]
    zs = r.get("zero_shot")
    if zs:
        cells = [c for c in r["cells"] if c["status"] == "evaluated"]
        tasks = zs["tasks"]
        unavailable = {t: v["unavailable"] for t, v in r["original"]["zero_shot"]["tasks"].items() if "unavailable" in v}
        available = [t for t in tasks if t not in unavailable]
        lines += ["", "## Zero-shot accuracy per task", ""]
        head = ["model"] + available + ["average"]

        def row(label, z):
            return [label] + [_pct((z["tasks"].get(t) or {}).get("score")) for t in available] + [_pct(z.get("average_acc"))]

        rows = [row("original (GQA)", r["original"]["zero_shot"])]
        rows += [row(f"{c['method']} {c['allocation']} {c['latent']} F={c['kv_fraction']:g}", c["zero_shot"]) for c in cells]
        lines += _table(head, rows)
        if unavailable:
            lines += [""] + [f"- {t}: unavailable ({why})" for t, why in unavailable.items()]
        metrics = sorted({f"{t}: {v.get('score_metric')}" for t, v in r["original"]["zero_shot"]["tasks"].items()
                          if v.get("score_metric")})
        if metrics:
            lines += ["", "Score per task: " + ", ".join(metrics) + "."]
    lines += [""] + _images(folder, [p for p in r.get("plots", [])])
    timings = r.get("timings_s")
    if timings:
        lines += ["", "Timings: " + ", ".join(f"{k} {_num(v, 3)} s" for k, v in timings.items()) + "."]
    return lines


_SECTIONS = {"sweep.json": _sweep_section, "heal_report.json": _heal_section, "report.json": _convert_section}


# ----------------------------------------------------------------------------- API


def report(folder: str | Path) -> str:
    """Render the output folder `folder` as Markdown; write it to ``folder/REPORT.md`` and return it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; give an output folder of care-mla convert, sweep or heal")
    found = [name for name in _SOURCES if (folder / name).is_file()]
    if not found:
        raise ReportError(f"{folder} holds none of {', '.join(_SOURCES)}; give an output folder of care-mla "
                          "convert, sweep or heal")
    lines: list[str] = []
    embedded: set[str] = set()
    for name in found:
        try:
            data = json.loads((folder / name).read_text())
        except (ValueError, OSError) as err:
            raise ReportError(f"{folder / name} is not valid JSON ({err}); was the run interrupted?") from err
        if not isinstance(data, dict):
            raise ReportError(f"{folder / name} is not a care-mla report (a JSON object was expected)")
        try:
            section = _SECTIONS[name](folder, data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise ReportError(f"{folder / name} is not a complete care-mla report ({type(err).__name__}: {err}); "
                              "re-run the command that wrote it") from err
        embedded |= {line.split("](", 1)[1].rstrip(")") for line in section if line.startswith("![")}
        lines += ([""] if lines else []) + section
    rest = _images(folder, sorted(p.name for p in folder.glob("*.png") if p.name not in embedded))
    if rest:
        lines += ["", "## Plots", ""] + rest
    text = "\n".join(lines).rstrip("\n") + "\n"
    tmp = folder / f".{REPORT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(folder / REPORT_FILE)
    return text


# ----------------------------------------------------------------------------- CLI


def add_report_parser(sub) -> argparse.ArgumentParser:
    """The ``care-mla report`` subcommand (add to the CLI's subparsers)."""
    p = sub.add_parser("report", help="render an output folder (convert, sweep or heal) as Markdown: writes REPORT.md")
    p.add_argument("folder", help="a folder written by care-mla convert, sweep or heal")
    p.add_argument("--quiet", action="store_true", help="write REPORT.md without printing it")
    return p


def run_report_command(args: argparse.Namespace) -> int:
    """Run ``care-mla report`` from parsed arguments. Returns the exit status."""
    try:
        text = report(args.folder)
    except ReportError as err:
        print(f"care-mla: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(text, end="")
    return 0
