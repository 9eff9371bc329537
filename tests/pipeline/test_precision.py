"""The calibration dtype is chosen by measurement (`hardware`), explicit flags win, and the statistics of a
bf16 calibration stay within the documented bound of fp32's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from care_mla.cli import main
from care_mla.io import hardware
from care_mla.pipeline import calibration

#: Documented bound (README, "Precision"): relative Frobenius distance between the second moments of a
#: bf16 and an fp32 calibration of the same model and tokens, per layer.
BF16_STATS_BOUND = 2e-2


def _args(tiny_model_dir, text_file, tmp_path, *extra):
    return ["convert", str(tiny_model_dir("llama")), "--out", str(tmp_path / "out"), "--calib-text", str(text_file),
            "--eval-text", str(text_file), "--calib-samples", "4", "--calib-seq-len", "16", "--no-eval",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]


_AVX2_EPYC = ["avx", "avx2", "f16c", "fma"]
_AMX_XEON = ["amx_bf16", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512f", "fma"]


@pytest.mark.parametrize("cpu, flags, figures, expected, probed", [
    ("AMD EPYC 7B13", _AVX2_EPYC, {"float32": 44.0, "bfloat16": 0.94}, "float32", ["float32"]),  # bf16 emulated
    ("Intel Xeon 8481C", _AMX_XEON, {"float32": 160.0, "bfloat16": 400.0}, "bfloat16", ["float32", "bfloat16"]),
    ("Neoverse-V1", [], {"float32": 44.0, "bfloat16": 0.94}, "float32", ["float32", "bfloat16"]),  # measured
    ("Neoverse-V2", [], {"float32": 100.0, "bfloat16": 250.0}, "bfloat16", ["float32", "bfloat16"]),
])
def test_default_calibration_dtype_follows_the_machine(tiny_model_dir, text_file, tmp_path, monkeypatch, cpu, flags,
                                                       figures, expected, probed):
    asked = []

    def probe(names, shapes, device):
        asked.append(list(names))
        return {n: figures[n] for n in names if n in figures}

    arch = "aarch64" if not flags else "x86_64"
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": cpu, "arch": arch, "flags": flags,
                                                       "physical_cores": 2, "logical_cores": 2})
    monkeypatch.setattr(hardware, "probe_dtypes", probe)
    assert main(_args(tiny_model_dir, text_file, tmp_path)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["dtype"] == expected
    hw = report["hardware"]
    assert hw["dtype"] == expected and hw["step"] == "calibration" and hw["threads"] >= 1 and hw["cpu_model"] == cpu
    assert hw["probe_gflops"]["float32"] == figures["float32"]
    assert asked == [probed]
    # a second conversion takes the figures from the hardware cache: no probe
    asked.clear()
    assert main(_args(tiny_model_dir, text_file, tmp_path, "--overwrite")) == 0
    assert asked == [] and json.loads((tmp_path / "out" / "report.json").read_text())["hardware"]["from_cache"]


def test_explicit_calibration_dtype_wins_over_the_probe(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "probe_dtypes", lambda *a, **k: pytest.fail("probed despite an explicit dtype"))
    assert main(_args(tiny_model_dir, text_file, tmp_path, "--calib-dtype", "bfloat16")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["dtype"] == "bfloat16"
    assert report["hardware"]["reason"] == "--calib-dtype bfloat16"


def test_threads_option_sets_torch_threads(tiny_model_dir, text_file, tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(_args(tiny_model_dir, text_file, tmp_path, "--threads", "1")) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "out" / "report.json").read_text())["hardware"]["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_statistics_are_within_the_documented_bound_of_fp32():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    fp32 = calibration.collect_statistics(model, ids, batch_size=4, progress=False)
    bf16 = calibration.collect_statistics(model.to(torch.bfloat16), ids, batch_size=4, progress=False)
    for a, b in zip(fp32.second_moments, bf16.second_moments):
        rel = (a - b).norm() / a.norm()
        assert 0 < rel <= BF16_STATS_BOUND, rel  # not identical (bf16 did run), and close
