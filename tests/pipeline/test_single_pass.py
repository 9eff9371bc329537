"""The one-pass conversion (`pipeline.single_pass`): its statistics are the calibration's, its choice is each layer's
lowest attention-output error, its refit is the least-squares fit on the original stream."""

from __future__ import annotations

import pytest
import torch
from conftest import settings_for
from transformers import AutoModelForCausalLM

from care_mla.method.statistics import CalibrationStats
from care_mla.pipeline import convert as api
from care_mla.pipeline.calibration import StatisticsCache, calibration_windows, capture_layer_inputs
from care_mla.pipeline.layerwise import collect_statistics_layerwise
from care_mla.pipeline.load import checkpoint_reader
from care_mla.pipeline.sequential import attention_parts
from care_mla.pipeline.single_pass import PassWindows, single_pass_applies
from care_mla.settings import ConvertSettings


def _models(src, out):
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    return load(src), load(out)


def _layer_inputs(model, windows: torch.Tensor, layer: int) -> tuple[torch.Tensor, dict]:
    """Layer `layer`'s input hidden states of `model` on `windows`, and the keyword arguments its layers take."""
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states[layer]
    _, kwargs = capture_layer_inputs(model, windows, windows.shape[0])
    return hidden, kwargs[0]


def test_the_default_layout_converts_in_one_pass():
    assert single_pass_applies(ConvertSettings(kv_fraction=0.25))
    for other in (dict(single_pass=False), dict(compensate=True), dict(refit_output=False), dict(latent="separate"),
                  dict(allocation="adjusted"), dict(format="deepseek"), dict(method="transmla", latent="joint")):
        assert not single_pass_applies(ConvertSettings(kv_fraction=0.25, **other)), other
    assert not single_pass_applies(ConvertSettings(kv_fraction=1.0))  # parity: nothing to refit


def test_pass_windows_cover_what_the_choice_and_refit_need():
    s = ConvertSettings(refit_samples=8)
    fresh, cached = PassWindows.of(64, s, statistics=True), PassWindows.of(64, s, statistics=False)
    assert fresh.main == list(range(64)) and len(fresh.selection) == 16 and len(fresh.refit) == 8
    assert fresh.refit == torch.linspace(0, 63, 8).round().long().tolist() and fresh.drift == fresh.refit
    assert cached.main == sorted(set(fresh.selection) | set(fresh.refit)) and len(cached.main) < 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_are_the_calibrations(tiny_model_dir, text_file, tmp_path, dtype):
    """The second moments the pass collects (and caches) are those `collect_statistics` collects, bit for bit, in a
    float32 stream and in a bfloat16 one (whose products both take in bfloat16, `statistics.product_dtype`)."""
    src = tiny_model_dir("llama")
    s = settings_for(src, text_file, tmp_path, kv_fraction=0.25, evaluate=False,
                     calib_dtype=str(dtype).removeprefix("torch."))
    api.convert(s)
    cached = StatisticsCache.of(str(src), s, dtype).load()
    assert cached is not None and cached.num_tokens == 8 * 32
    from transformers import AutoConfig, AutoTokenizer

    windows = calibration_windows(AutoTokenizer.from_pretrained(src), s)
    direct = collect_statistics_layerwise(checkpoint_reader(str(src)), AutoConfig.from_pretrained(src), windows,
                                          dtype=dtype, device=torch.device("cpu"), progress=False)
    assert cached.num_layers == direct.num_layers == 3
    for a, b, c, d in zip(cached.second_moments, direct.second_moments, cached.abs_means, direct.abs_means):
        assert torch.equal(a, b) and torch.equal(c, d)


def test_choice_error_is_the_refitted_error_of_the_pinned_candidate(tiny_model_dir, text_file, tmp_path):
    """Layer 0's chosen objective, pinned in a plain two-pass conversion (no refit), leaves that attention-output
    error on the selection windows once o_proj is refitted there — measured here with the transformers modules of
    both models and a least-squares solve of its own."""
    src = tiny_model_dir("llama")
    report = api.convert(settings_for(src, text_file, tmp_path, kv_fraction=0.25, evaluate=False))
    chosen = report["objective_choice"]["per_layer"][0]
    objective, emphasis = chosen.split(", key_emphasis ")
    api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "pinned"), kv_fraction=0.25, evaluate=False,
                             single_pass=False, refit_output=False, objective=objective, key_emphasis=float(emphasis)))
    original, pinned = _models(src, tmp_path / "pinned")
    from transformers import AutoTokenizer

    windows = calibration_windows(AutoTokenizer.from_pretrained(src), settings_for(src, text_file, tmp_path))
    h, kw_o = _layer_inputs(original, windows, 0)
    _, kw_c = _layer_inputs(pinned, windows, 0)
    (y,) = attention_parts(original.model.layers[0], [h], [kw_o])
    (heads,) = attention_parts(pinned.model.layers[0], [h], [kw_c], "heads")
    W = original.model.layers[0].self_attn.o_proj.weight.detach().double()
    refitted = _ridge(heads, y, W, 1e-2) @ heads.reshape(-1, heads.shape[-1]).double().T
    y = y.reshape(-1, y.shape[-1]).double()
    error = float((refitted.T - y).pow(2).sum() / y.pow(2).sum())
    plain = float((heads.reshape(-1, heads.shape[-1]).double() @ W.T - y).pow(2).sum() / y.pow(2).sum())
    assert error == pytest.approx(report["objective_choice"]["attention_error"][0][chosen], rel=1e-4)
    assert error == pytest.approx(report["layers"][0]["choice_error"], rel=1e-4)
    assert error < plain  # the score is after the refit, not before


def _ridge(heads: torch.Tensor, y: torch.Tensor, W: torch.Tensor, damping: float) -> torch.Tensor:
    """argmin over W' of mean ‖ô W'ᵀ − y‖² + λ‖W' − W‖², λ = damping × mean diag E[ôôᵀ], in float64."""
    x, y = heads.reshape(-1, heads.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    A, B = x.T @ x / x.shape[0], x.T @ y / x.shape[0]
    lam = damping * float(torch.diagonal(A).mean())
    return torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), B + lam * W.T).T


def test_refit_is_least_squares_on_the_original_stream(tiny_model_dir, text_file, tmp_path):
    """Layer 1's written o_proj is the ridge fit (pulled to the original o_proj, λ = damping × mean diag) from the
    converted heads to the original attention output, both on the *original* model's layer-1 inputs."""
    src = tiny_model_dir("llama")
    s = settings_for(src, text_file, tmp_path, kv_fraction=0.25, evaluate=False)
    api.convert(s)
    original, converted = _models(src, tmp_path / "out")
    from transformers import AutoTokenizer

    windows = calibration_windows(AutoTokenizer.from_pretrained(src), s)  # 8 windows: the refit runs on all
    h, kw_o = _layer_inputs(original, windows, 1)
    _, kw_c = _layer_inputs(converted, windows, 1)
    (y,) = attention_parts(original.model.layers[1], [h], [kw_o])
    (heads,) = attention_parts(converted.model.layers[1], [h], [kw_c], "heads")
    W = original.model.layers[1].self_attn.o_proj.weight.detach().double()
    expected = _ridge(heads, y, W, s.damping)
    written = converted.model.layers[1].self_attn.o_proj.weight.detach().double()
    assert (written - expected).abs().max() <= 5e-4 * expected.abs().max()  # float32 moments (MOMENT_DTYPE)
    assert (written - W).abs().max() >= 100 * (written - expected).abs().max()  # it did move from the original


def test_cached_statistics_write_the_same_model(tiny_model_dir, text_file, tmp_path):
    """A second conversion finds the statistics cached and runs only the windows of the choice and the refit; the
    model it writes has the same logits."""
    src = tiny_model_dir("llama")
    common = dict(kv_fraction=0.25, evaluate=False, calib_samples=32, refit_samples=8)
    first = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "a"), **common))
    second = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "b"), **common))
    assert first["calibration"]["statistics"] == second["calibration"]["statistics"]
    assert second["objective_choice"]["per_layer"] == first["objective_choice"]["per_layer"]
    a, b = _models(tmp_path / "a", tmp_path / "b")
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() <= 1e-4
    assert isinstance(StatisticsCache.of(str(src), settings_for(src, text_file, tmp_path, **common),
                                         torch.float32).load(), CalibrationStats)


def test_killed_pass_resumes_after_the_layers_done(tiny_model_dir, text_file, tmp_path, monkeypatch, caplog):
    """A one pass that dies in layer 2 leaves its progress; the next run starts at layer 2 (layers 0 and 1 are not
    read again) and writes the model an uninterrupted pass writes, byte for byte."""
    import logging

    from care_mla.io.checkpoint import CheckpointReader
    from care_mla.pipeline import calibration

    monkeypatch.setattr(calibration, "RESUME_INTERVAL_S", 0.0)
    src = tiny_model_dir("llama")
    real_state = CheckpointReader.state
    reads: list[str] = []

    def dies_at_layer_2(self, prefix, dtype=None):
        reads.append(prefix)
        if prefix == "model.layers.2." and "resumed" not in reads:
            raise RuntimeError("killed")
        return real_state(self, prefix, dtype)

    monkeypatch.setattr(CheckpointReader, "state", dies_at_layer_2)
    s = settings_for(src, text_file, tmp_path, out=str(tmp_path / "a"), kv_fraction=0.25, evaluate=False)
    with pytest.raises(RuntimeError, match="killed"):
        api.convert(s)
    (partial,) = (tmp_path / "cache" / "calibration").glob("*.pass.partial.safetensors")
    reads[:] = ["resumed"]
    with caplog.at_level(logging.INFO):
        resumed = api.convert(s)
    assert "resuming the one pass after layer 2 of 3" in caplog.text
    assert "model.layers.0." not in reads[: reads.index("model.layers.2.")]  # layers 0, 1 were not run again
    assert not partial.exists()
    monkeypatch.setattr(CheckpointReader, "state", real_state)
    fresh = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "b"), kv_fraction=0.25,
                                     evaluate=False, cache_dir=str(tmp_path / "fresh-cache")))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert resumed["layers"] == fresh["layers"] and resumed["objective_choice"] == fresh["objective_choice"]
    other = StatisticsCache.of(str(src), settings_for(src, text_file, tmp_path, cache_dir=str(tmp_path / "fresh-cache")),
                               torch.float32).load()
    mine = StatisticsCache.of(str(src), s, torch.float32).load()
    assert all(torch.equal(x, y) for x, y in zip(mine.second_moments, other.second_moments))


def test_replayed_queries_are_the_computed_ones(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The candidates and the refit take the original layer's kept q_proj outputs (the conversion leaves q_proj as
    it was) instead of computing them: same choice, errors and written model as when every candidate computes its
    own (forced here by a q_proj that does not compare equal); and they are taken, not computed, by default."""
    from care_mla.pipeline import single_pass as sp

    src = tiny_model_dir("qwen2")  # q_proj with a bias
    replayed: list[bool] = []
    real_same = sp._same_query
    monkeypatch.setattr(sp, "_same_query", lambda state, q: replayed.append(real_same(state, q)) or replayed[-1])
    common = dict(kv_fraction=0.25, evaluate=False, batch_size=3)  # batches of 3, 3, 2: replayed in order
    a = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "a"), **common))
    assert replayed and all(replayed)
    monkeypatch.setattr(sp, "_same_query", lambda state, q: False)
    b = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "b"), **common))
    assert a["objective_choice"]["per_layer"] == b["objective_choice"]["per_layer"]
    for x, y in zip(a["objective_choice"]["attention_error"], b["objective_choice"]["attention_error"]):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-5 * max(y[k], 1e-3) for k in x)
    m, n = _models(tmp_path / "a", tmp_path / "b")
    for (name, p), q in zip(m.named_parameters(), n.parameters()):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max(), name


def test_choice_screens_every_candidate_then_scores_the_finalists_on_every_window(tiny_model_dir, text_file,
                                                                                 tmp_path, monkeypatch):
    """Two rounds, as `selection.screened_losses`: each candidate's refitted error on 4 of the 8 selection windows,
    then the 3 lowest on the other 4 added to their moments. A finalist's error is then the one a single round over
    all 8 windows gives it (seven finalists: nothing screened out), and the winner is the lowest of the finalists."""
    from care_mla.pipeline import selection

    src = tiny_model_dir("qwen2")
    common = dict(kv_fraction=0.125, evaluate=False, calib_seq_len=128)
    two = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "two"), **common))["objective_choice"]
    monkeypatch.setattr(selection, "FINALISTS", 7)  # as many as the candidates: one round scores them all
    one = api.convert(settings_for(src, text_file, tmp_path, out=str(tmp_path / "one"), **common))["objective_choice"]
    assert one["screening"] is None and all(len(e) == 7 for e in one["attention_error"])
    compared = 0
    for layer, (screen, final, every, chosen) in enumerate(zip(two["screening"]["attention_error"],
                                                               two["attention_error"], one["attention_error"],
                                                               two["per_layer"])):
        assert len(screen) == 7 and len(final) == 3, layer
        assert max(screen[n] for n in final) <= min(e for n, e in screen.items() if n not in final), layer
        assert chosen == min(final, key=final.get)
        if min(every.values()) < 1e-6:  # layer 0 of the tiny model is all but exact: float32 cancellation only
            continue
        compared += 1
        for name, error in final.items():
            assert error == pytest.approx(every[name], rel=1e-2), (layer, name)  # float32 moments, summed apart
        assert any(screen[n] != pytest.approx(every[n], rel=0.02) for n in final)  # the screen saw fewer windows
    assert compared == 2


def test_refit_moments_are_made_as_the_layer_runs_and_the_last_layer_stops_after_its_attention(
        tiny_model_dir, text_file, tmp_path):
    """`_forward_refitting` adds, group by group as the stream reaches them, the heads of a second layer on the refit
    rows against the layer's attention output there: the moments of those rows computed apart, in the same groups
    (one spans two batches). With ``whole=False`` (the last layer: no layer after it needs its outputs) it leaves the
    stream as it was and adds the same moments, bit for bit."""
    from transformers import AutoTokenizer

    from care_mla.pipeline.sequential import MomentSum
    from care_mla.pipeline.single_pass import _forward_refitting

    src = tiny_model_dir("llama")
    model = _models(src, src)[0]
    windows = calibration_windows(AutoTokenizer.from_pretrained(src), settings_for(src, text_file, tmp_path))
    hidden, kwargs = capture_layer_inputs(model, windows, 3)  # batches of 3, 3 and 2
    positions = [0, 2, 4, 7]  # groups of 3: windows 0, 2 (batch 0) and 4 (batch 1), then 7 (batch 2)
    _, group_kwargs = capture_layer_inputs(model, windows[positions], 3)
    layer, fitted = model.model.layers[2], model.model.layers[1]  # any decoder layer's heads will do
    m, D = fitted.self_attn.o_proj.in_features, fitted.self_attn.o_proj.out_features
    stopped, whole = [h.clone() for h in hidden], [h.clone() for h in hidden]
    sums = [MomentSum(m, D, None, torch.device("cpu"), torch.float32) for _ in range(3)]
    with torch.no_grad():
        _forward_refitting(layer, stopped, kwargs, positions, fitted, group_kwargs, sums[0], replay=False, whole=False)
        _forward_refitting(layer, whole, kwargs, positions, fitted, group_kwargs, sums[1], replay=False)
        rows = torch.cat(hidden)[positions]
        for group, kw in zip((rows[:3], rows[3:]), group_kwargs):
            (y,) = attention_parts(layer, [group], [kw])
            (heads,) = attention_parts(fitted, [group], [kw], "heads")
            sums[2].add(heads, y)
    assert all(torch.equal(s, h) for s, h in zip(stopped, hidden))  # the stream untouched
    assert not torch.equal(whole[0], hidden[0])  # a whole forward replaced it
    assert torch.equal(sums[0].AB, sums[1].AB) and sums[0].energy == sums[1].energy
    assert sums[0].count == sums[2].count == 4 * windows.shape[1]
    assert (sums[0].AB - sums[2].AB).abs().max() <= 1e-5 * sums[2].AB.abs().max()
    assert sums[0].energy == pytest.approx(sums[2].energy, rel=1e-6)
