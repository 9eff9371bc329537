"""The sweep on a tiny random model: settings, cells, files, plots, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import AutoModelForCausalLM

import care_mla  # noqa: F401
from care_mla.cli import add_sweep_parser, run_sweep_command
from care_mla.evaluation import plots
from care_mla.evaluation.report import add_report_parser, run_report_command
from care_mla.evaluation.sweep import SweepSettings, format_table, sweep
from care_mla.pipeline import build, calibration
from care_mla.settings import SettingsError

PNG = b"\x89PNG\r\n\x1a\n"


def sweep_settings(model_dir, text_file, tmp_path, **kw) -> SweepSettings:
    base = dict(
        model=str(model_dir), out=str(tmp_path / "sweep"), calib_text=str(text_file), eval_text=str(text_file),
        calib_samples=8, calib_seq_len=32, eval_samples=4, eval_seq_len=32, cache_dir=str(tmp_path / "cache"),
        progress=False, zero_shot=False, calib_dtype="float32",  # as `conftest.settings_for`: any machine alike
    )
    base.update(kw)
    return SweepSettings(**base)


def assert_png(path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > min_bytes, (path, len(data))


# ----------------------------------------------------------------------------- settings


def test_sweep_settings_are_validated():
    assert SweepSettings(methods=["care"], kv_fractions=[0.5]).methods == ("care",)  # lists become tuples
    cases = [
        (dict(methods=()), "methods is empty"),
        (dict(methods=("care", "care")), "twice"),
        (dict(methods=("pca",)), "methods must hold values of"),
        (dict(latents=("decoupled",)), "latents must hold values of separate, joint"),
        (dict(methods=("mha2mla",), latents=("separate",)), "--latent joint"),
        (dict(kv_fractions=(0.5, 1.5)), r"\(0, 1\]"),
        (dict(zero_shot_limit=0), "zero_shot_limit"),
        (dict(damping=-1.0), "damping"),
    ]
    for kw, message in cases:
        with pytest.raises(SettingsError, match=message):
            SweepSettings(**kw)
    with pytest.raises(SettingsError, match="unknown setting"):
        SweepSettings.from_dict({"methods": ["care"], "ratios": [2]})


# ----------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def grid(tiny_model_dir, text_file, tmp_path_factory):
    """One sweep over 2 budgets × 3 methods × 2 allocations × 2 latents, without zero-shot."""
    tmp = tmp_path_factory.mktemp("grid")
    s = sweep_settings(tiny_model_dir("llama"), text_file, tmp, kv_fractions=(1.0, 0.5),
                       methods=("svd", "care", "mha2mla"), latents=("separate", "joint"))
    return s, sweep(s), tmp


def test_sweep_evaluates_each_buildable_cell_once(grid):
    s, result, _ = grid
    cells = result["cells"]
    assert len(cells) == 2 * 3 * 2 * 2
    status = {c["key"]: c["status"] for c in cells}
    assert [c["key"] for c in cells][:4] == ["svd/uniform/separate@1", "svd/adjusted/separate@1",
                                              "care/uniform/separate@1", "care/adjusted/separate@1"]  # grid order
    assert sum(v == "skipped" for v in status.values()) == 8  # svd × joint, mha2mla × separate
    assert sum(v == "exact" for v in status.values()) == 6
    assert sum(v == "evaluated" for v in status.values()) == 10  # 2 at parity + 8 at F=0.5
    assert status["care/uniform/separate@1"] == status["care/uniform/joint@1"] == "evaluated"
    by_key = {c["key"]: c for c in cells}
    original = result["original"]
    for c in cells:
        if c["status"] == "skipped":
            assert c["reason"] and "ppl" not in c
            continue
        if c["kv_fraction"] == 1.0:  # full rank reproduces the model
            assert c["ppl"] == pytest.approx(original["ppl"], rel=1e-4) and c["kv_saving"] == 0.0
            assert c["kv_bytes_per_token"] == original["kv_bytes_per_token"] == 3 * 64 * 4
        else:  # GQA width 2·2·16 = 64 per layer, half of it, 3 layers, fp32
            assert c["kv_bytes_per_token"] == 3 * 32 * 4 and c["kv_saving"] == 0.5
            assert sum(sum(r) for r in c["ranks"]) == 3 * 32
            assert c["ppl_ratio"] == pytest.approx(c["ppl"] / original["ppl"])
        if c["status"] == "exact":
            assert by_key[c["same_as"]]["status"] == "evaluated" and c["ppl"] == by_key[c["same_as"]]["ppl"]
    assert by_key["svd/uniform/separate@0.5"]["ppl"] != by_key["care/uniform/separate@0.5"]["ppl"]
    assert by_key["svd/uniform/joint@0.5"]["status"] == "skipped"
    assert "joint" in by_key["svd/uniform/joint@0.5"]["reason"]


def test_sweep_writes_json_table_and_plots(grid):
    s, result, tmp = grid
    out = tmp / "sweep"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["sweep.json", "sweep.md", "sweep_settings.json", "ppl_vs_saving.png", "layer_ranks.png", "spectra.png"])
    assert sorted(p.name for p in tmp.iterdir()) == ["cache", "sweep"]  # no partial folder, no models
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved["cells"]) == 24 and saved["original"]["zero_shot"] is None and saved["zero_shot"] is None
    assert SweepSettings.from_dict(json.loads((out / "sweep_settings.json").read_text())) == s
    assert set(saved["spectra"]["branches"]) == {"K", "V"} and saved["spectra"]["layers"] == [0, 1, 2]
    table = (out / "sweep.md").read_text()
    assert table == format_table(saved)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | allocation | latent | F=1 (0 % saved) | F=0.5 (50 % saved) |")
    assert rows[1].startswith("| original (GQA) |")
    # separate: svd ×2, care ×2; joint: care ×2, mha2mla ×2 (rows that cannot be built are left out)
    assert [r.split(" | ")[0:3] for r in rows[2:]] == [
        ["| svd", "uniform", "separate"], ["| svd", "adjusted", "separate"], ["| care", "uniform", "separate"],
        ["| care", "adjusted", "separate"], ["| care", "uniform", "joint"], ["| care", "adjusted", "joint"],
        ["| mha2mla", "uniform", "joint"], ["| mha2mla", "adjusted", "joint"]]
    assert "×)" in rows[2] and "†" in rows[2] and "·" not in rows[2]  # no zero-shot: ppl only
    assert "not built: mha2mla with a separate latent" in table
    for name in saved["plots"]:
        assert_png(out / name)
    assert saved["plots"] == ["ppl_vs_saving.png", "layer_ranks.png", "spectra.png"]


def test_second_sweep_reuses_calibration_and_needs_overwrite(grid, monkeypatch):
    s, _, tmp = grid

    def boom(*a, **k):
        raise AssertionError("calibration should come from the cache")

    monkeypatch.setattr(calibration, "collect_statistics", boom)
    with pytest.raises(FileExistsError, match="--overwrite"):
        sweep(s)
    small = SweepSettings.from_dict({**s.to_dict(), "kv_fractions": [0.25], "methods": ["care"], "latents": ["separate"],
                                     "allocations": ["uniform"], "overwrite": True})
    result = sweep(small)
    assert [c["key"] for c in result["cells"]] == ["care/uniform/separate@0.25"]
    assert json.loads((tmp / "sweep" / "sweep.json").read_text())["cells"][0]["kv_fraction"] == 0.25
    assert len(list((tmp / "cache" / "calibration").glob("*.safetensors"))) == 1


def test_interrupted_sweep_leaves_no_output(tiny_model_dir, text_file, tmp_path, monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_converted", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep(sweep_settings(tiny_model_dir("llama"), text_file, tmp_path, kv_fractions=(0.5,), methods=("care",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_sweep_with_zero_shot_and_kept_models(tiny_model_dir, text_file, tmp_path):
    s = sweep_settings(tiny_model_dir("qwen3"), text_file, tmp_path, kv_fractions=(0.5,), methods=("care",),
                       allocations=("uniform",), zero_shot=True, zero_shot_limit=4, keep_models=True)
    result = sweep(s)
    (cell,) = result["cells"]
    zs = cell["zero_shot"]
    assert set(zs["tasks"]) == {"text_lastword", "text_nextsent"} and zs["limit"] == 4
    assert all(t["samples"] == 4 for t in zs["tasks"].values())
    assert result["zero_shot"]["tasks"] == ["text_lastword", "text_nextsent"]
    assert 0 <= result["original"]["zero_shot"]["average_acc"] <= 1
    out = tmp_path / "sweep"
    assert_png(out / "acc_vs_saving.png")
    row = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| care")][0]
    assert " · " in row and row.endswith("% |")
    kept = out / "models" / "care-uniform-separate-F0.5"
    model = AutoModelForCausalLM.from_pretrained(kept)
    assert model.config.kv_lora_ranks == cell["ranks"]
    report = json.loads((kept / "report.json").read_text())
    assert report["ppl"]["converted"] == cell["ppl"] and report["from_sweep"] == cell["key"]
    settings = json.loads((kept / "care_mla_settings.json").read_text())
    assert settings["out"] == str(kept)  # where the model is, not the staging folder it was written to
    assert report["zero_shot"] == {"original": result["original"]["zero_shot"], "converted": zs}


def test_plot_functions_write_pngs(tmp_path):
    plots.plot_vs_saving({"a": [(0.0, 1.0), (0.5, 1.3), (0.75, 2.0)], "b": [(0.5, 5.0), (0.75, 90.0)]},
                         tmp_path / "p.png", ylabel="ratio", title="t", log_y=True, reference=("original", 1.0))
    plots.plot_layer_ranks({"K": {"F=0.5": [3, 5, 4]}, "V": {"F=0.5": [4, 4, 4]}}, tmp_path / "r.png", title="t")
    plots.plot_spectra({"K": {"layer 0": [3.0, 2.0, 0.5, 0.0]}}, tmp_path / "s.png", title="t", marks={"F=0.5": 2})
    plots.plot_layer_errors({"K relative error": {"a": [0.1, 0.0, 0.3]}, "drift": {"b": [1e-3, 1e-2]}},
                            tmp_path / "e.png", title="t")
    for name in ("p.png", "r.png", "s.png", "e.png"):
        assert_png(tmp_path / name)


def test_cli_sweep_then_report(tiny_model_dir, text_file, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="care-mla")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sweep_parser(sub)
    add_report_parser(sub)
    out = tmp_path / "s"
    argv = ["sweep", str(tiny_model_dir("mistral")), "--out", str(out), "--kv-fractions", "0.5,0.25",
            "--methods", "care,transmla", "--allocations", "uniform", "--latents", "joint", "--no-zero-shot",
            "--calib-text", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32", "--eval-text",
            str(text_file), "--eval-samples", "2", "--eval-seq-len", "32", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    args = parser.parse_args(argv)
    assert args.kv_fractions == [0.5, 0.25] and args.zero_shot is False
    assert run_sweep_command(args) == 0
    printed = capsys.readouterr().out
    assert "| care | uniform |" in printed and "| transmla | uniform |" in printed
    assert run_report_command(parser.parse_args(["report", str(out)])) == 0
    text = capsys.readouterr().out
    assert text == (out / "REPORT.md").read_text() and "![ppl vs saving](ppl_vs_saving.png)" in text
    assert run_report_command(parser.parse_args(["report", str(tmp_path / "c")])) == 2
    assert "holds none of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--out", "x", "--kv-fractions", "half"])


def test_sweep_led_by_a_joint_only_method(tiny_model_dir, text_file, tmp_path):
    """mha2mla first in --methods with --latents joint: the budget check must not build it with a separate latent."""
    s = sweep_settings(tiny_model_dir("llama"), text_file, tmp_path, kv_fractions=(0.5,), methods=("mha2mla", "care"),
                       allocations=("uniform",), latents=("joint",))
    result = sweep(s)
    assert [c["key"] for c in result["cells"]] == ["mha2mla/uniform/joint@0.5", "care/uniform/joint@0.5"]
    assert all(c["status"] == "evaluated" for c in result["cells"])
    mha2mla, care = (c["ppl"] for c in result["cells"])
    assert care < mha2mla  # activation-aware beats weight-only on the same joint latent


def test_sweep_joint_cells_choose_their_objective_and_compensate(tiny_model_dir, text_file, tmp_path):
    s = sweep_settings(tiny_model_dir("llama"), text_file, tmp_path, kv_fractions=(0.25,), methods=("care", "svd"),
                       allocations=("uniform",), latents=("joint", "separate"), zero_shot=False, compensate=True,
                       refit_output=True)
    cells = {c["key"]: c for c in sweep(s)["cells"]}
    joint = cells["care/uniform/joint@0.25"]
    assert joint["status"] == "evaluated" and joint["objective"] in ("attention", "value")
    assert len(joint["objective_choice"]["screening_loss"]) == 7  # seven candidates screened, three finalists
    assert len(joint["objective_choice"]["calibration_loss"]) == 3
    separate = cells["care/uniform/separate@0.25"]
    assert "objective_choice" not in separate  # the paper's separate latents: activation objective, no choice
    care_cell, svd_cell = s.cell("care", "uniform", "joint", 0.25), s.cell("svd", "uniform", "separate", 0.25)
    assert care_cell.compensate and care_cell.refit_output  # the baselines stay as their authors made them
    assert not svd_cell.compensate and not svd_cell.refit_output
    assert not sweep_settings(tiny_model_dir("llama"), text_file, tmp_path).cell("care", "uniform", "joint", 0.25).refit_output


def test_sweep_refit_cell_is_the_default_conversion(tiny_model_dir, text_file, tmp_path):
    """With --refit-output (no compensation) a care joint uniform cell is made as `convert` makes its default, in
    one pass: the same objective per layer, the same held-out perplexity."""
    from conftest import settings_for

    from care_mla.pipeline import convert as api

    src = tiny_model_dir("llama")
    s = sweep_settings(src, text_file, tmp_path, kv_fractions=(0.25,), methods=("care",), allocations=("uniform",),
                       latents=("joint",), refit_output=True)
    (cell,) = sweep(s)["cells"]
    report = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "convert"), kv_fraction=0.25,
                                      cache_dir=str(tmp_path / "cache-convert")))
    assert cell["objective_choice"]["per_layer"] == report["objective_choice"]["per_layer"]
    assert cell["ranks"] == report["ranks"]
    assert cell["ppl"] == pytest.approx(report["ppl"]["converted"], rel=1e-5)
    assert all(0 < row["o_refit_error"] < row["o_error"] for row in cell["layers"])
