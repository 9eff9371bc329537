"""Sweep: every method × allocation × latent at several KV budgets, from one calibration.

`sweep(settings)` loads the model once, takes the calibration statistics from the on-disk
cache (collecting them only the first time), evaluates the original once, then for every
combination builds the converted model in memory from the saved statistics, evaluates it
(held-out perplexity, KV bytes per token, optionally zero-shot accuracy through lm-eval)
and discards it (``keep_models`` saves each one instead). The output folder, written
atomically at the end, holds:

* ``sweep.json`` — every cell: method, allocation, latent, kv_fraction, ppl and its ratio
  to the original, zero-shot accuracy per task and their average, KV bytes per token,
  per-layer ranks and relative activation errors; the original's numbers; the settings;
* ``sweep.md`` — one table: rows method/allocation (and latent), columns the budgets, cells
  "ppl (ratio×) · acc %", with the original's row;
* ``ppl_vs_saving.png`` (and ``acc_vs_saving.png`` with zero-shot), ``layer_ranks.png``
  (per-layer ranks of the adjusted allocation), ``spectra.png`` (whitened K/V spectra of
  the first, middle and last layer).

Which cells are evaluated:

* ``kv_fraction = 1.0`` keeps every layer at full rank, where every method and allocation
  reproduces W exactly (the SVD of a full-rank factorization loses nothing; ranks cannot
  move between layers that are all at their cap). One model per latent layout is evaluated
  (CARE uniform when swept, else the first combination) and the other cells are recorded as
  ``"status": "exact"`` with its numbers and ``same_as`` naming it.
* A method/latent pair that cannot be built (``svd`` with a joint latent, ``mha2mla`` with
  separate ones) is recorded as ``"status": "skipped"`` with the reason; a method with no
  buildable latent among those asked for is an error, as is a budget the model cannot meet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from care_mla.io import assets
from care_mla.settings import (
    ALLOCATIONS,
    METHODS,
    ConvertSettings,
    SettingsError,
    SettingsFile,
    check_finite_numbers,
    method_latent_error,
)

logger = logging.getLogger(__name__)

__all__ = ["SweepSettings", "sweep", "format_table"]

SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.md"
SETTINGS_FILE = "sweep_settings.json"
SWEEP_LATENTS = ("separate", "joint")
_BASE = ConvertSettings()
#: ConvertSettings fields every cell shares with the sweep (the rest are the sweep's axes).
SHARED_FIELDS = (
    "model", "allocation_score", "balance_kv", "whitening", "damping", "rank_min_ratio", "rank_max_ratio",
    "calib_text", "calib_samples", "calib_seq_len", "eval_text", "eval_samples", "eval_seq_len", "batch_size",
    "device", "dtype", "calib_dtype", "progress", "cache_dir",
)


@dataclass(frozen=True)
class SweepSettings(SettingsFile):
    """Everything that decides a sweep; lists are stored as tuples. Unknown keys are refused by `from_dict`."""

    model: str = assets.DEFAULT_MODEL
    out: str = "runs/sweep"
    kv_fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    methods: tuple[str, ...] = ("svd", "asvd", "svd-llm", "care")
    allocations: tuple[str, ...] = ("uniform", "adjusted")
    latents: tuple[str, ...] = ("separate",)
    zero_shot: bool = True
    zero_shot_tasks: tuple[str, ...] = ("lastword", "nextsent")  # offline tasks of eval_text, or lm-eval names
    zero_shot_limit: int | None = 500  # documents per task (None: all)
    keep_models: bool = False  # save every converted model under OUT/models/ (else built, evaluated, discarded)
    compensate: bool = False  # care cells: error compensation across layers
    refit_output: bool = False  # care cells: o_proj refitted to the original attention outputs
    overwrite: bool = False
    # shared by every cell, as in ConvertSettings
    allocation_score: str = _BASE.allocation_score
    balance_kv: bool = _BASE.balance_kv
    whitening: str = _BASE.whitening
    damping: float = _BASE.damping
    rank_min_ratio: float = _BASE.rank_min_ratio
    rank_max_ratio: float = _BASE.rank_max_ratio
    calib_text: str = _BASE.calib_text
    calib_samples: int = _BASE.calib_samples
    calib_seq_len: int = _BASE.calib_seq_len
    eval_text: str = _BASE.eval_text
    eval_samples: int = _BASE.eval_samples
    eval_seq_len: int = _BASE.eval_seq_len
    batch_size: int = _BASE.batch_size
    device: str = _BASE.device
    dtype: str = _BASE.dtype
    calib_dtype: str = _BASE.calib_dtype
    progress: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        for name, allowed in (("kv_fractions", None), ("methods", METHODS), ("allocations", ALLOCATIONS),
                              ("latents", SWEEP_LATENTS), ("zero_shot_tasks", None)):
            value = getattr(self, name)
            values = (value,) if isinstance(value, (str, int, float)) else tuple(value)  # one value for a list
            object.__setattr__(self, name, values)
            if not values and not (name == "zero_shot_tasks" and not self.zero_shot):
                raise SettingsError(f"{name} is empty; give at least one value")
            if len(set(values)) != len(values):
                raise SettingsError(f"{name} lists a value twice: {', '.join(map(str, values))}")
            for v in values if allowed else ():
                if v not in allowed:
                    raise SettingsError(f"{name} must hold values of {', '.join(allowed)}; got {v!r}")
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in self.kv_fractions):
            raise SettingsError(f"kv_fractions must be numbers; got {self.kv_fractions!r}")
        object.__setattr__(self, "kv_fractions", tuple(float(f) for f in self.kv_fractions))
        if self.zero_shot_limit is not None and (isinstance(self.zero_shot_limit, bool) or self.zero_shot_limit < 1):
            raise SettingsError(
                f"zero_shot_limit must be a positive integer (or None for all); got {self.zero_shot_limit!r}"
            )
        # every buildable cell must be valid settings; this also checks the shared fields
        for method in self.methods:
            built = [latent for latent in self.latents if self.cell_error(method, latent) is None]
            if not built:
                raise SettingsError(
                    f"--methods {method} builds none of the latents asked for ({', '.join(self.latents)}): "
                    f"{self.cell_error(method, self.latents[0])}"
                )
            for f in self.kv_fractions:
                for allocation in self.allocations:
                    for latent in built:
                        self.cell(method, allocation, latent, f)

    def cell(self, method: str, allocation: str, latent: str, kv_fraction: float) -> ConvertSettings:
        """The ConvertSettings of one combination (raises SettingsError when it cannot be built)."""
        shared = {k: getattr(self, k) for k in SHARED_FIELDS}
        care = method == "care"  # the baselines stay as their authors made them
        return ConvertSettings(**shared, out=self.out, method=method, allocation=allocation, latent=latent,
                               kv_fraction=kv_fraction, evaluate=True, compensate=self.compensate and care,
                               refit_output=self.refit_output and care)

    def cell_error(self, method: str, latent: str) -> str | None:
        """Why `method` cannot build `latent` (None when it can)."""
        return method_latent_error(method, latent)


def cell_key(method: str, allocation: str, latent: str, kv_fraction: float) -> str:
    return f"{method}/{allocation}/{latent}@{kv_fraction:g}"


def _single_pass_cell(model, stats, settings, windows, dtype, device):
    """(converted model, its report fields, the choice's fields) of a cell that `convert` makes in one pass
    (`single_pass`), from the sweep's statistics and in-memory model."""
    from care_mla.formats.mapping import build_latent_model
    from care_mla.pipeline.load import ModuleReader, calib_dtype
    from care_mla.pipeline.single_pass import single_pass

    stream_dtype = calib_dtype(settings, model.config, device, dtype)[0]
    done = single_pass(model.config, ModuleReader(model), windows, settings, dtype=dtype, stream_dtype=stream_dtype,
                       device=device, stats=stats)
    fields = {"ranks": done.fields["ranks"], "layers": done.fields["layers"]}
    return build_latent_model(model, done.latents), fields, done.choice


def _representatives(s: SweepSettings) -> dict[str, tuple[str, str]]:
    """Per latent, the (method, allocation) evaluated at kv_fraction 1.0, where all are exact."""
    reps = {}
    for latent in s.latents:
        pairs = [(m, a) for m in s.methods for a in s.allocations if s.cell_error(m, latent) is None]
        reps[latent] = ("care", "uniform") if ("care", "uniform") in pairs else pairs[0]
    return reps


# ----------------------------------------------------------------------------- formatting


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _cell_text(cell: dict) -> str:
    if cell["status"] == "skipped":
        return "—"
    text = f"{cell['ppl']:.4g} ({cell['ppl_ratio']:.3f}×)"
    acc = (cell.get("zero_shot") or {}).get("average_acc")
    if acc is not None:
        text += f" · {_pct(acc)}"
    return text + (" †" if cell["status"] == "exact" else "")


def format_table(result: dict) -> str:
    """Markdown of a sweep.json: one table, rows method/allocation(/latent), columns budgets."""
    cells = result["cells"]
    fractions = list(dict.fromkeys(c["kv_fraction"] for c in cells))
    latents = list(dict.fromkeys(c["latent"] for c in cells))
    rows = list(dict.fromkeys((c["method"], c["allocation"], c["latent"]) for c in cells))
    by_key = {(c["method"], c["allocation"], c["latent"], c["kv_fraction"]): c for c in cells}
    original = result["original"]
    width = original["kv_cache_width_per_layer"]
    zs = result.get("zero_shot")
    lines = [f"# KV-budget sweep: {Path(result['model']).name}", ""]
    ev = result["evaluation"]
    lines.append(f"Held-out perplexity on {Path(ev['text']).name} ({ev['samples']} × {ev['seq_len']} tokens)"
                 + (f"; zero-shot accuracy (lm-eval, ≤ {zs['limit']} items per task) averaged over "
                    f"{', '.join(zs['tasks'])}" if zs else "") + ".")
    lines.append("Cells: ppl (× original)" + (" · average zero-shot accuracy" if zs else "")
                 + f". F = kept fraction of the GQA KV cache ({width} numbers per token and layer).")
    lines.append("")
    lead = ["method", "allocation"] + (["latent"] if len(latents) > 1 else [])
    heads = [f"F={f:g} ({100 * (1 - f):g} % saved)" for f in fractions]
    lines.append("| " + " | ".join(lead + heads) + " |")
    lines.append("|" + "---|" * (len(lead) + len(heads)))
    orig = f"{original['ppl']:.4g} (1.000×)"
    if original.get("zero_shot") and original["zero_shot"].get("average_acc") is not None:
        orig += f" · {_pct(original['zero_shot']['average_acc'])}"
    blank = ["—"] * (len(lead) - 1)
    lines.append("| " + " | ".join(["original (GQA)", *blank] + [orig] * len(fractions)) + " |")
    for method, allocation, latent in rows:
        row_cells = [by_key.get((method, allocation, latent, f)) for f in fractions]
        if all(c is None or c["status"] == "skipped" for c in row_cells):
            continue
        lead_cells = [method, allocation] + ([latent] if len(latents) > 1 else [])
        lines.append("| " + " | ".join(lead_cells + [_cell_text(c) if c else "—" for c in row_cells]) + " |")
    notes = []
    if any(c["status"] == "exact" for c in cells):
        notes.append("† F=1 keeps every layer at full rank, where every method and allocation reproduces the weights "
                     "exactly: one model per latent layout was evaluated and its numbers are shown in each row.")
    skipped = sorted({f"{c['method']} with a {c['latent']} latent: {c['reason']}"
                      for c in cells if c["status"] == "skipped"})
    if skipped:
        notes.append("— not built: " + "; ".join(skipped))
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _series_label(c: dict, latents: int) -> str:
    return f"{c['method']} {c['allocation']}" + (f" ({c['latent']})" if latents > 1 else "")


def write_plots(result: dict, folder: Path) -> list[str]:
    """The sweep's PNGs in `folder` (file names returned): quality vs saving, ranks, spectra."""
    from care_mla.evaluation import plots

    cells = [c for c in result["cells"] if c["status"] != "skipped"]
    latents = len({c["latent"] for c in cells})
    written = []
    series: dict[str, list] = {}
    for c in cells:
        series.setdefault(_series_label(c, latents), []).append((c["kv_saving"], c["ppl_ratio"]))
    # colour per method, line style per allocation, marker per latent: a grid stays readable
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(c["method"] for c in cells))}
    styles = {_series_label(c, latents): {"color": colours[c["method"]],
                                          "linestyle": "-" if c["allocation"] == "uniform" else "--",
                                          "marker": "o" if c["latent"] == "separate" else "s"} for c in cells}
    plots.plot_vs_saving(series, folder / "ppl_vs_saving.png", ylabel="held-out ppl / original (log)",
                         title=f"{Path(result['model']).name}: perplexity ratio vs KV saving", log_y=True,
                         reference=("original", 1.0), styles=styles)
    written.append("ppl_vs_saving.png")
    original_acc = (result["original"].get("zero_shot") or {}).get("average_acc")
    if original_acc is not None:
        acc_series = {label: [] for label in series}
        for c in cells:
            acc = (c.get("zero_shot") or {}).get("average_acc")
            if acc is not None:
                acc_series[_series_label(c, latents)].append((c["kv_saving"], 100 * acc))
        plots.plot_vs_saving(acc_series, folder / "acc_vs_saving.png", ylabel="average zero-shot accuracy (%)",
                             title=f"{Path(result['model']).name}: zero-shot accuracy vs KV saving "
                                   f"({', '.join(result['zero_shot']['tasks'])})",
                             reference=("original", 100 * original_acc), styles=styles)
        written.append("acc_vs_saving.png")

    # per-layer ranks of the adjusted allocation (CARE's when swept), one line per budget
    adjusted = [c for c in cells if c["allocation"] == "adjusted" and c["status"] == "evaluated"]
    if adjusted:
        methods = [c["method"] for c in adjusted]
        method = "care" if "care" in methods else methods[0]
        panels: dict[str, dict] = {}
        for c in (c for c in adjusted if c["method"] == method):
            names = ["K", "V"] if c["latent"] == "separate" else ["K+V (joint)"]
            for b, name in enumerate(names):
                panels.setdefault(name, {})[f"F={c['kv_fraction']:g}"] = [r[b] for r in c["ranks"]]
        plots.plot_layer_ranks(panels, folder / "layer_ranks.png", title=f"{method}, adjusted allocation: rank per layer")
        written.append("layer_ranks.png")

    spectra = result.get("spectra")
    if spectra:
        width = result["original"]["kv_cache_width_per_layer"] // 2
        marks = {f"F={f:g}": f * width for f in sorted({c["kv_fraction"] for c in cells}) if f < 1}
        plots.plot_spectra(spectra["branches"], folder / "spectra.png", marks=marks,
                           title=f"whitened spectra (S·W, CARE) of layers {', '.join(map(str, spectra['layers']))}; "
                                 "dotted: uniform rank per budget")
        written.append("spectra.png")
    return written


# ----------------------------------------------------------------------------- API


def _whitened_spectra(model, stats, s: SweepSettings) -> dict:
    """Whitened K/V spectra (CARE at rank 0) of the first, middle and last layer."""
    from care_mla.method.factorization import whitened_spectrum
    from care_mla.pipeline.plan import layer_kv_weights

    n = model.config.num_hidden_layers
    layers = sorted({0, n // 2, n - 1})
    branches: dict[str, dict] = {"K": {}, "V": {}}
    for i in layers:
        for name, W in zip(("K", "V"), layer_kv_weights(model.model.layers[i])):
            sigma = whitened_spectrum(W, stats.second_moments[i], method=s.whitening, damping=s.damping)
            branches[name][f"layer {i}"] = [round(float(x), 6) for x in sigma]
    return {"layers": layers, "branches": branches}


def sweep(settings: SweepSettings) -> dict:
    """Run the sweep of `settings` and write its folder; returns what sweep.json holds."""
    from care_mla.io.outputs import OutputFolder
    from care_mla.io.text import check_text_file
    from care_mla.pipeline.convert import input_paths

    s = settings
    inputs = input_paths(s.model, s.calib_text, s.eval_text, s.cache_dir)
    folder = OutputFolder(s.out, overwrite=s.overwrite, purpose="sweep", inputs=inputs)
    folder.check()  # fail before any work
    check_text_file(s.calib_text, "calibration")
    check_text_file(s.eval_text, "evaluation")
    if s.zero_shot:
        from care_mla.evaluation.zeroshot import check_tasks

        check_tasks(s.zero_shot_tasks, s.eval_text, cache_dir=s.cache_dir)  # a missing lm-eval or an unknown task is said now
    with folder:
        return _sweep(s, folder)


def _sweep(s: SweepSettings, folder) -> dict:
    from care_mla.evaluation.perplexity import kv_bytes_per_token, kv_cache_width, perplexity
    from care_mla.formats.families import get_family, gqa_kv_width
    from care_mla.io.text import load_windows
    from care_mla.pipeline import build, calibration, evaluate, load, plan, reporting, selection
    from care_mla.pipeline.single_pass import single_pass_applies

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    device = load.resolve_device(s.device)
    dtype = load.torch_dtype(s.dtype, device)
    base = s.cell(*_first_buildable(s))

    t = time.perf_counter()
    model, tokenizer, model_path = load.load_model(s.model, dtype, device)
    get_family(model.config)
    for f in s.kv_fractions:  # a budget the model cannot meet is the user's to fix, not a cell to skip
        plan.rank_budget(model.config, dataclasses.replace(base, kv_fraction=f, method="care", latent="separate"))
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = calibration.calibrate(model, tokenizer, model_path, base)
    timings["calibrate"] = time.perf_counter() - t

    windows, text_path = load_windows(tokenizer, s.eval_text, "evaluation", s.eval_samples, s.eval_seq_len)

    def zero_shot(m):
        if not s.zero_shot:
            return None
        from care_mla.evaluation.zeroshot import evaluate_zero_shot

        return evaluate_zero_shot(m, tokenizer, s.zero_shot_tasks, text=s.eval_text, limit=s.zero_shot_limit,
                                  batch_size=s.batch_size, cache_dir=s.cache_dir)

    t = time.perf_counter()
    gqa_width = gqa_kv_width(model.config)
    original = {
        "ppl": evaluate.original_perplexity(model, model_path, windows, base, dtype),
        "kv_cache_width_per_layer": gqa_width,
        "kv_bytes_per_token": kv_bytes_per_token(model.config, dtype),
        "zero_shot": zero_shot(model),
    }
    timings["evaluate_original"] = time.perf_counter() - t

    reps = _representatives(s)
    grid = [(m, a, lat, f) for lat in s.latents for f in s.kv_fractions for m in s.methods for a in s.allocations]
    position = {cell_key(*g): i for i, g in enumerate(grid)}  # cells are reported in grid order
    grid.sort(key=lambda g: g[3] != 1.0 or (g[0], g[1]) != reps[g[2]])  # (stable) exact cells' model first
    # the folder is staged from the start, so kept models go to disk at once (not all held in memory);
    # it replaces OUT only when the sweep is complete
    calib_windows = None  # loaded when a cell made on the converted stream needs them
    with folder.staging() as tmp:
        cells: list[dict] = []
        done: dict[str, dict] = {}
        t = time.perf_counter()
        for n, (method, allocation, latent, f) in enumerate(grid, 1):
            key = cell_key(method, allocation, latent, f)
            cell = {"key": key, "method": method, "allocation": allocation, "latent": latent, "kv_fraction": f}
            reason = s.cell_error(method, latent)
            if reason is None and latent == "joint":
                try:  # a joint latent can need more dims than the input has (2·g·d_h > D)
                    plan.rank_budget(model.config, s.cell(method, allocation, latent, f))
                except SettingsError as err:
                    reason = str(err)
            if reason is not None:
                cells.append({**cell, "status": "skipped", "reason": reason})
                continue
            if f == 1.0 and (method, allocation) != reps[latent]:
                rep = cell_key(*reps[latent], latent, f)
                cells.append({**cell, "status": "exact", "same_as": rep, **_metrics(done[rep])})
                continue
            c0 = time.perf_counter()
            cs = s.cell(method, allocation, latent, f)
            if cs.sequential_fit and calib_windows is None:
                calib_windows, _ = load_windows(tokenizer, s.calib_text, "calibration", s.calib_samples,
                                                s.calib_seq_len, assets.resolve_cache_dir(s.cache_dir))
            if single_pass_applies(cs):  # as `convert` makes it: choice per layer and refit in one pass
                converted, fields, choice = _single_pass_cell(model, stats, cs, calib_windows, dtype, device)
            else:
                cs, choice = selection.choose_settings_whole(model, tokenizer, stats, cs)
                converted, fields = build.build_converted(model, stats, cs, calib_windows if cs.sequential_fit else None)
            ppl = perplexity(converted, windows, batch_size=s.batch_size, progress=s.progress)
            width = kv_cache_width(converted.config) / converted.config.num_hidden_layers
            measured = {
                "status": "evaluated",
                "ppl": ppl,
                "ppl_ratio": ppl / original["ppl"],
                "kv_cache_width_per_layer": width,
                "kv_saving": 1 - width / gqa_width,
                "kv_bytes_per_token": kv_bytes_per_token(converted.config, dtype),
                "zero_shot": zero_shot(converted),
                "ranks": fields["ranks"],
                **choice,
                "layers": fields["layers"],
                "seconds": round(time.perf_counter() - c0, 3),
            }
            done[key] = measured
            cells.append({**cell, **measured})
            acc = (measured["zero_shot"] or {}).get("average_acc")
            logger.info("cell %d/%d %s: ppl %.4g (%.3f×)%s, %d B/token, %.1f s", n, len(grid), key, ppl,
                        measured["ppl_ratio"], "" if acc is None else f", zero-shot {100 * acc:.1f} %",
                        measured["kv_bytes_per_token"], measured["seconds"])
            if s.keep_models:
                name = _folder_name(key)  # its settings name where it will be, not the staging folder
                _save_model(tmp / "models" / name, converted, tokenizer, dataclasses.replace(
                    cs, out=str(Path(s.out) / "models" / name)), cells[-1], original, model_path)
            del converted
        timings["cells"] = time.perf_counter() - t
        cells.sort(key=lambda c: position[c["key"]])

        result = {
            "model": model_path,
            "settings": s.to_dict(),
            "original": original,
            "calibration": {"text": stats.meta.get("text", s.calib_text), "samples": s.calib_samples,
                            "seq_len": s.calib_seq_len, "tokens": stats.num_tokens, "dtype": stats.meta.get("dtype"),
                            "statistics": stats.meta.get("cache_file")},
            "evaluation": {"text": str(text_path), "samples": s.eval_samples, "seq_len": s.eval_seq_len},
            "zero_shot": {"tasks": list(original["zero_shot"]["tasks"]), "limit": s.zero_shot_limit,
                          "text": str(text_path)} if original["zero_shot"] else None,
            "cells": cells,
            "spectra": _whitened_spectra(model, stats, s),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
        }
        t = time.perf_counter()
        result["plots"] = write_plots(result, tmp)
        (tmp / TABLE_FILE).write_text(format_table(result))
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        result["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        result["peak_rss_mb"] = round(reporting.peak_rss_mb(), 1)
        (tmp / SWEEP_FILE).write_text(json.dumps(result, indent=1) + "\n")
        (tmp / SETTINGS_FILE).write_text(json.dumps(s.to_dict(), indent=2) + "\n")
    return result


def _first_buildable(s: SweepSettings) -> tuple[str, str, str, float]:
    for latent in s.latents:
        for method in s.methods:
            if s.cell_error(method, latent) is None:
                return method, s.allocations[0], latent, s.kv_fractions[0]
    raise SettingsError("no combination of the sweep can be built")  # unreachable: __post_init__ checks


def _metrics(cell: dict) -> dict:
    """The measured fields of an evaluated cell, for a cell known to give the same model."""
    keys = ("ppl", "ppl_ratio", "kv_cache_width_per_layer", "kv_saving", "kv_bytes_per_token", "zero_shot", "ranks")
    return {k: cell[k] for k in keys}


def _folder_name(key: str) -> str:
    return key.replace("/", "-").replace("@", "-F")


def _save_model(folder: Path, converted, tokenizer, cs: ConvertSettings, cell: dict, original: dict, model_path: str):
    """A kept model: the same files `care-mla convert` writes (so `care-mla report` reads it)."""
    from care_mla.pipeline.convert import SETTINGS_FILE as CONVERT_SETTINGS
    from care_mla.pipeline.reporting import REPORT_FILE

    folder.mkdir(parents=True)
    converted.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cs.save(folder / CONVERT_SETTINGS)
    report = {
        "model": model_path, "format": cs.format, "architecture": type(converted).__name__, "method": cs.method,
        "allocation": cs.allocation, "latent": cs.latent, "kv_fraction": cs.kv_fraction,
        "kv_cache_width_per_layer": {"original": original["kv_cache_width_per_layer"],
                                     "converted": cell["kv_cache_width_per_layer"]},
        "ranks": cell["ranks"], "layers": cell["layers"],
        "ppl": {"original": original["ppl"], "converted": cell["ppl"], "ratio": cell["ppl_ratio"]},
        "kv_bytes_per_token": {"original": original["kv_bytes_per_token"], "converted": cell["kv_bytes_per_token"]},
        "zero_shot": {"original": original["zero_shot"], "converted": cell["zero_shot"]} if cell["zero_shot"] else None,
        "from_sweep": cell["key"],
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
