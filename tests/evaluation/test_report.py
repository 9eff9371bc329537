"""`care-mla report`: Markdown of convert, sweep and heal folders."""

from __future__ import annotations

import json

import pytest
from conftest import settings_for

from care_mla.evaluation import plots
from care_mla.evaluation.report import REPORT_FILE, ReportError, report
from care_mla.pipeline import convert as api


def _png(path) -> None:
    plots.plot_layer_ranks({"K": {"F=0.5": [1, 2, 3]}}, path, title="a plot")


def test_convert_folder(tiny_model_dir, text_file, tmp_path):
    api.convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, kv_fraction=0.5,
                             zero_shot_tasks=("lastword",), zero_shot_limit=4))
    out = tmp_path / "out"
    text = report(out)
    assert (out / REPORT_FILE).read_text() == text
    assert text.startswith("# Conversion: ") and "CareMlaForCausalLM" in text
    assert "kv_fraction **0.5** (50 % of the GQA cache saved)" in text
    saved = json.loads((out / "report.json").read_text())
    assert f"| held-out perplexity | {saved['ppl']['original']:.4g} | {saved['ppl']['converted']:.4g} (" in text
    assert "| KV bytes per token, measured after generate | 768 | 384 |" in text
    assert "## Per-layer ranks and relative activation errors" in text
    assert text.count("\n| 2 | ") == 1  # one row per layer (3 layers: 0, 1, 2)
    assert "Calibration: corpus.txt, 8 × 32 tokens (256)" in text and "## Plots" not in text
    # the one pass's choice: every layer under the candidate it took
    assert "objective and key emphasis **chosen per layer** (one pass)" in text
    assert "on 8 calibration windows (every candidate screened on 4 of them, the 3 best scored on all):" in text
    for name, count in saved["objective_choice"]["layers_by_candidate"].items():
        layers = [str(i) for i, c in enumerate(saved["objective_choice"]["per_layer"]) if c == name]
        assert f"| {name} | {count} | {', '.join(layers)} |" in text
    steps = saved["single_pass"]
    assert "The one pass by step: statistics " in text and all(
        f"{k} {v:.3g} s" in text for k, v in steps["seconds_by_step"].items() if v >= 0.01)
    assert f"(peak {steps['peak_rss_mb_by_step']['refit']:.4g} MB)" in text
    assert "| task | original | converted |" in text
    zs = saved["zero_shot"]
    assert set(zs) == {"original", "converted"} and zs["converted"]["tasks"]["text_lastword"]["samples"] == 4
    assert f"| average | **{100 * zs['original']['average_acc']:.1f} %** |" in text
    paired = saved["zero_shot_difference"]["mean"]
    assert paired["difference"] == pytest.approx(zs["converted"]["average_acc"] - zs["original"]["average_acc"])
    assert f"(paired): {100 * paired['difference']:+.1f} ± {100 * paired['stderr']:.1f} points" in text
    _png(out / "extra.png")  # any plot in the folder is embedded
    assert "## Plots\n\n![extra](extra.png)" in report(out)


HEAL = {
    "converted": "/runs/convert-0.25", "teacher": "/models/SmolLM2", "format": "care_mla",
    "architecture": "CareMlaForCausalLM", "mode": "full",
    "ppl": {"original": 11.0, "before": 30.0, "after": 13.0, "gap_closed": 17 / 19},
    "tokens_seen": 2_000_000, "steps": 120, "wall_time_s": 1800.5, "tokens_per_s": 1110.8,
    "loss_curve": [[16384, 3.9], [1_000_000, 2.6], [2_000_000, 2.5]],
    "ce_curve": [[16384, 3.2], [2_000_000, 2.4]],
    "eval_curve": [[0, 30.0], [1_000_000, 14.2], [2_000_000, 13.0]],
}


def test_heal_folder(tmp_path):
    (tmp_path / "heal_report.json").write_text(json.dumps(HEAL))
    _png(tmp_path / "heal_curve.png")
    text = report(tmp_path)
    assert text.startswith("# Healing: convert-0.25")
    assert "| held-out perplexity | 11 | 30 | 13 | 89.5 % |" in text
    assert "Training tokens 2,000,000; steps 120; wall time (s) 1800; tokens/s 1111; mode full" in text
    assert "Training loss: 3.9 at 16,384 tokens → 2.5 at 2,000,000 tokens (lowest 2.5; 3 points)." in text
    assert "| 1,000,000 | 14.2 |" in text
    assert "![heal curve](heal_curve.png)" in text and "## Plots" not in text
    assert "zero-shot" not in text
    scored = {**HEAL, "accuracy": {"original": 0.40, "before": 0.30, "after": 0.395, "gap_closed": 0.95,
                                   "tasks": ["paper"], "limit": 100,
                                   "slice": {"limit": 20, "original": 0.41, "tokens_to_within_1_point": 40960}},
              "accuracy_curve": [[0, 0.3], [20480, 0.38], [40960, 0.405]]}
    (tmp_path / "heal_report.json").write_text(json.dumps(scored))
    text = report(tmp_path)
    assert "| mean zero-shot accuracy (paper; 100 documents/task) | 40.0 % | 30.0 % | 39.5 % | 95.0 % |" in text
    assert "the original scores 41.0 % on it; within 1 point after 40,960 training tokens." in text
    assert "| 20,480 | 38.0 % |" in text
    minimal = {"ppl": {"original": 11.0, "before": 30.0, "after": 13.0}}  # fields a report lacks are left out
    (tmp_path / "heal_report.json").write_text(json.dumps(minimal))
    assert "| held-out perplexity | 11 | 30 | 13 | — |" in report(tmp_path)


def _sweep_json() -> dict:
    cell = dict(method="care", allocation="uniform", latent="separate", kv_fraction=0.5, status="evaluated",
                key="care/uniform/separate@0.5", ppl=15.0, ppl_ratio=1.5, kv_cache_width_per_layer=192.0,
                kv_saving=0.5, kv_bytes_per_token=23040, ranks=[[96, 96]] * 30, layers=[],
                zero_shot={"tasks": {"austen_lastword": {"acc": 0.2, "score": 0.2, "score_metric": "acc", "samples": 9},
                                     "arc_easy": {"unavailable": "ConnectionError: offline"}},
                           "average_acc": 0.2, "limit": 9})
    skipped = dict(method="svd", allocation="uniform", latent="joint", kv_fraction=0.5, status="skipped",
                   key="svd/uniform/joint@0.5", reason="no joint latent for svd")
    original_zs = {"tasks": {"austen_lastword": {"acc": 0.4, "score": 0.4, "score_metric": "acc", "samples": 9},
                             "arc_easy": {"unavailable": "ConnectionError: offline"}}, "average_acc": 0.4, "limit": 9}
    return {
        "model": "/cache/SmolLM2-135M-Instruct", "cells": [cell, skipped], "plots": ["ppl_vs_saving.png"],
        "original": {"ppl": 10.0, "kv_cache_width_per_layer": 384, "kv_bytes_per_token": 46080, "zero_shot": original_zs},
        "evaluation": {"text": "/cache/austen-evaluation.txt", "samples": 64, "seq_len": 256},
        "calibration": {"text": "/cache/austen-calibration.txt", "samples": 256, "seq_len": 256},
        "zero_shot": {"tasks": ["austen_lastword", "arc_easy"], "limit": 9}, "timings_s": {"total": 12.0},
    }


def test_sweep_folder(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps(_sweep_json()))
    _png(tmp_path / "ppl_vs_saving.png")
    text = report(tmp_path)
    assert text.startswith("# KV-budget sweep: SmolLM2-135M-Instruct")
    assert "| original (GQA) | — | — | 10 (1.000×) · 40.0 % |" in text
    assert "| care | uniform | separate | 15 (1.500×) · 20.0 % |" in text
    assert "| svd |" not in text and "not built: svd with a joint latent: no joint latent for svd" in text
    assert "| model | austen_lastword | average |" in text
    assert "| care uniform separate F=0.5 | 20.0 % | 20.0 % |" in text
    assert "- arc_easy: unavailable (ConnectionError: offline)" in text
    assert text.count("![ppl vs saving](ppl_vs_saving.png)") == 1 and "## Plots" not in text


def test_folder_without_reports_is_refused(tmp_path):
    with pytest.raises(ReportError, match="convert, sweep or heal"):
        report(tmp_path)
    with pytest.raises(ReportError, match="not a folder"):
        report(tmp_path / "missing")
    (tmp_path / "report.json").write_text("{truncated")
    with pytest.raises(ReportError, match="not valid JSON"):
        report(tmp_path)
