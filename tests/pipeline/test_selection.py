"""Choices by calibration loss (care_mla.pipeline.selection, convert.choose_settings_*) and error compensation end to end,
on tiny random models."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import settings_for
from transformers import AutoModelForCausalLM

from care_mla.evaluation.perplexity import perplexity
from care_mla.io.checkpoint import CheckpointReader
from care_mla.io.text import load_windows
from care_mla.pipeline import build, calibration, load, plan, selection
from care_mla.pipeline import convert as api
from care_mla.pipeline.selection import best, streamed_losses
from care_mla.settings import ConvertSettings, SettingsError


def test_streamed_losses_equal_the_built_models_loss(tiny_model_dir, text_file, tmp_path):
    """The layer-by-layer scoring of candidates gives each candidate's own mean NLL (= log ppl of the model
    built whole), including candidates whose per-layer ranks differ."""
    folder = tiny_model_dir("llama")
    s = settings_for(folder, text_file, tmp_path, latent="joint", allocation="adjusted", kv_fraction=0.4,
                     objective="activation", refit_output=False)  # candidates are scored as plain conversions
    model, tokenizer, _ = load.load_model(str(folder), torch.float32, torch.device("cpu"))
    stats = calibration.calibrate(model, tokenizer, str(folder), s)
    windows = selection.selection_windows(tokenizer, s)
    candidates = [dataclasses.replace(s, objective=o, key_emphasis=e) for o, e in
                  (("activation", 1.0), ("value", 2.0), ("attention", 4.0))]
    expected = [math.log(perplexity(build.build_converted(model, stats, c)[0], windows)) for c in candidates]
    reader = CheckpointReader(folder)
    streams = [build.latent_stream(model.config, reader, stats, c, torch.float32) for c in candidates]
    assert len({tuple(map(tuple, p.fields["ranks"])) for p in streams}) > 1  # the rank plans differ
    got = streamed_losses(streams[0].model_class, streams[0].tensor, [(p.config, p.layer) for p in streams],
                          windows, dtype=torch.float32, device=torch.device("cpu"), batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    assert len(set(round(x, 6) for x in got)) == 3  # the objectives do make different models


def test_candidates_share_each_layers_weightings_and_gram_and_skip_the_error_table(tiny_model_dir, text_file, tmp_path):
    """The candidates of a choice reuse one layer's attention weightings and K/V stack Gram (each computed once per
    layer, whatever the objective or key emphasis) and build no error table: their layers are what each builds
    alone with the whitened SVD, to float32 rounding (the Gram's eigenvectors give the same latent)."""
    folder = tiny_model_dir("llama")
    s = settings_for(folder, text_file, tmp_path, latent="joint", allocation="uniform", kv_fraction=0.4,
                     objective="activation", refit_output=False)
    model, tokenizer, _ = load.load_model(str(folder), torch.float32, torch.device("cpu"))
    stats = calibration.calibrate(model, tokenizer, str(folder), s)
    candidates = [dataclasses.replace(s, objective=o, key_emphasis=e) for o, e in
                  (("value", 1.0), ("attention", 2.0), ("attention", 4.0), ("activation", 1.0))]
    reader = CheckpointReader(folder)
    alone = [build.latent_stream(model.config, reader, stats, c, torch.float32) for c in candidates]
    shared = plan.SharedWeightings()
    made = []
    get = shared.get
    shared.get = lambda i, make, what="weightings": get(i, lambda: made.append((i, what)) or make(), what)
    together = [build.latent_stream(model.config, reader, stats, c, torch.float32, shared=shared, errors=False)
                for c in candidates]
    for i in range(model.config.num_hidden_layers):
        for a, b in zip(alone, together):  # layer i of every candidate in turn, as the choice builds them
            x, y = a.layer(i), b.layer(i)
            assert x.keys() == y.keys()
            for k in x:  # the latent's basis may differ in sign; the layer's K and V do not
                if "kv_a_proj" not in k and "kv_b_proj" not in k:
                    assert torch.equal(x[k], y[k]), k
            a_name = next(k for k in x if "kv_a_proj" in k)
            b_name = next(k for k in x if "kv_b_proj" in k)
            wx, wy = (t[b_name].double() @ t[a_name].double() for t in (x, y))
            assert (wx - wy).norm() <= 1e-5 * wx.norm()
    layers = list(range(model.config.num_hidden_layers))
    assert sorted(made) == sorted([(i, "weightings") for i in layers] + [(i, "stack_gram") for i in layers])
    assert all("k_rel_error" in row for row in alone[0].fields["layers"])
    assert not any("k_rel_error" in row for p in together for row in p.fields["layers"])


@pytest.mark.parametrize("fmt", ["care_mla", "deepseek"])
def test_decoupled_candidates_on_one_rope_plan_share_weightings_and_gram(tiny_model_dir, text_file, tmp_path, fmt):
    """Candidates of a decoupled layout's objective choice that share the RoPE plan also share each layer's
    attention weightings and latent Gram: each scores the loss it scores built alone (1e-5), and each layer's
    values are made once, not once per candidate."""
    folder = tiny_model_dir("llama")
    s = settings_for(folder, text_file, tmp_path, latent="decoupled", format=fmt, kv_fraction=0.5,
                     objective="activation", refit_output=False)
    model, tokenizer, _ = load.load_model(str(folder), torch.float32, torch.device("cpu"))
    stats = calibration.calibrate(model, tokenizer, str(folder), s)
    windows = selection.selection_windows(tokenizer, s)
    candidates = [dataclasses.replace(s, objective=o, key_emphasis=e) for o, e in
                  (("activation", 1.0), ("value", 2.0), ("attention", 4.0))]
    reader = CheckpointReader(folder)
    alone = [build.decoupled_stream(model.config, reader, stats, c, torch.float32) for c in candidates]
    shared = plan.SharedWeightings()
    together = [build.decoupled_stream(model.config, reader, stats, candidates[0], torch.float32, shared=shared,
                                       errors=False)]
    together += [build.decoupled_stream(model.config, reader, stats, c, torch.float32, split=together[0].split,
                                        shared=shared, errors=False) for c in candidates[1:]]
    made = []
    layer = shared.layer
    shared.layer = lambda i: made.append((i, tuple(layer(i)))) or layer(i)

    def losses(streams):
        return streamed_losses(streams[0].model_class, streams[0].tensor, [(p.config, p.layer) for p in streams],
                               windows, dtype=torch.float32, device=torch.device("cpu"), batch_size=3)

    want, got = losses(alone), losses(together)
    assert got == pytest.approx(want, rel=1e-5)
    assert len(set(round(x, 6) for x in got)) == 3
    for i in range(model.config.num_hidden_layers):  # candidate 0 finds layer i new, the others find it made
        seen = [names for j, names in made if j == i]
        assert seen[0] == () and all(set(names) == {"stack_gram", "weightings"} for names in seen[2:])
    assert not any("v_rel_error" in row for p in together for row in p.fields["layers"])


def test_best_takes_the_lowest_finite_loss():
    assert best(["a", "b", "c"], [2.0, float("nan"), 1.5], "x")[0] == "c"
    assert best(["a", "b"], [1.0, 1.0], "x")[0] == "a"  # first on ties: deterministic
    with pytest.raises(ValueError, match="non-finite"):
        best(["a"], [float("inf")], "x")


def test_screening_scores_every_candidate_on_a_few_windows_and_the_finalists_on_the_rest():
    """Two rounds: each candidate's loss is a fixed per-window table here, so the means are known exactly."""
    n, candidates = selection.SELECTION_WINDOWS, ["a", "b", "c", "d", "e"]
    per_window = {c: torch.full((n,), float(k)) for k, c in enumerate(candidates)}
    per_window["e"][:] = 10.0
    per_window["e"][[1, 2, 3]] = -30.0  # best on the windows screening does not see, worst on those it does
    per_window["d"][[0, 5, 10, 15]] = 0.5  # second best when screened, worse than "a" over all windows
    calls = []

    def score(chosen, windows):
        calls.append((list(chosen), windows[:, 0].tolist()))
        return [float(per_window[c][windows[:, 0].long()].mean()) for c in chosen]

    windows = torch.arange(n).unsqueeze(1).repeat(1, 3)  # window k starts with token k
    losses, screening = selection.screened_losses(candidates, windows, score)
    assert calls[0] == (candidates, [0, 5, 10, 15])  # evenly spaced, the first and the last included
    assert calls[1][0] == ["a", "b", "d"]  # the three lowest screened losses: a 0, d 0.5, b 1
    assert sorted(calls[1][1]) == [k for k in range(n) if k not in (0, 5, 10, 15)]
    assert screening == {0: 0.0, 1: 1.0, 2: 2.0, 3: 0.5, 4: 10.0}
    assert losses[0] == 0.0 and losses[1] == 1.0 and losses[3] == pytest.approx((4 * 0.5 + 12 * 3.0) / 16)
    assert math.isnan(losses[2]) and math.isnan(losses[4])  # screened out ("e" never reaches its good windows)
    assert best(candidates, losses, "x")[0] == "a"
    # nothing to screen: as many candidates as finalists, or no more windows than the screening takes
    calls.clear()
    assert selection.screened_losses(candidates[:3], windows, score)[1] == {} and len(calls) == 1
    assert selection.screened_losses(candidates, windows[:4], score)[0] == [0.0, 1.0, 2.0, 2.375, -20.0]


def test_choices_are_deterministic_and_recorded(tiny_model_dir, text_file, tmp_path):
    folder = tiny_model_dir("qwen2")
    reports = [api.convert(settings_for(folder, text_file, tmp_path, out=str(tmp_path / n), kv_fraction=0.25,
                                        latent="decoupled", allocation="uniform")) for n in ("a", "b")]
    a, b = reports
    assert a["objective_choice"] == b["objective_choice"] and a["rope_dim_choice"] == b["rope_dim_choice"]
    losses, screening = a["objective_choice"]["calibration_loss"], a["objective_choice"]["screening_loss"]
    assert len(screening) == 7 and a["objective_choice"]["chosen"] == min(losses, key=losses.get)
    # the finalists are the three best screened candidates
    assert set(losses) == set(sorted(screening, key=screening.get)[:3])
    rope = a["rope_dim_choice"]["calibration_loss"]
    assert len(rope) >= 2 and all(k.startswith("qk_rope_head_dim ") for k in rope)
    saved = ConvertSettings.from_dict(__import__("json").loads((tmp_path / "a" / api.SETTINGS_FILE).read_text()))
    assert saved.objective == a["objective"] and saved.rope_dim == int(a["rope_dim_choice"]["chosen"].split()[-1])
    # pinned values are not searched
    pinned = api.convert(settings_for(folder, text_file, tmp_path, out=str(tmp_path / "c"), kv_fraction=0.25,
                                      latent="decoupled", allocation="uniform", objective="value", key_emphasis=2.0,
                                      rope_dim=8))
    assert "objective_choice" not in pinned and "rope_dim_choice" not in pinned


@pytest.mark.parametrize("layerwise,refit", [(True, False), (False, False), (True, True)])
def test_compensation_at_parity_is_exact(tiny_model_dir, text_file, tmp_path, layerwise, refit):
    """A full-rank joint latent reproduces every layer, so the converted stream equals the original one and the
    compensated factors are plain CARE (and the refitted o_proj the original): the model's logits equal the
    original's."""
    folder = tiny_model_dir("llama")
    s = settings_for(folder, text_file, tmp_path, latent="joint", allocation="uniform", kv_fraction=1.0,
                     objective="activation", compensate=True, layerwise=layerwise, calib_dtype="float32",
                     damping=0.0 if not refit else 1e-2, refit_output=refit)
    report = api.convert(s)
    assert report["ppl"]["converted"] == pytest.approx(report["ppl"]["original"], rel=1e-5)
    assert all(row["drift"] < 1e-8 for row in report["layers"])  # the two streams stay together
    if refit:
        assert all(row["o_refit_error"] < 1e-10 for row in report["layers"])
    original = AutoModelForCausalLM.from_pretrained(folder)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert (original(ids).logits - converted(ids).logits).abs().max().item() <= 1e-4


def _final_drift(original, converted, windows) -> float:
    """Relative error of the converted model's last hidden states (what the LM head reads) on `windows`."""
    with torch.no_grad():
        want = original(windows, output_hidden_states=True).hidden_states[-1]
        got = converted(windows, output_hidden_states=True).hidden_states[-1]
    return float((got - want).pow(2).sum() / want.pow(2).sum())


@pytest.mark.parametrize("layout", [dict(latent="joint"), dict(latent="decoupled", rope_dim=8),
                                    dict(format="deepseek", rope_dim=8)])
def test_compensation_reproduces_the_original_better(tiny_model_dir, text_file, tmp_path, layout):
    """On the calibration windows, the compensated model's last hidden states are closer to the original's than
    the plain conversion's (what compensation fits); for the joint latent the loss is lower too (the decoupled
    layouts of this random model are within noise of the original's loss, so loss is not asserted there)."""
    folder = tiny_model_dir("llama")
    common = dict(allocation="uniform", kv_fraction=0.25, objective="activation", calib_samples=16, layerwise=False,
                  key_emphasis=1.0, refit_output=False, **layout)
    model, tokenizer, _ = load.load_model(str(folder), torch.float32, torch.device("cpu"))
    plain_s = settings_for(folder, text_file, tmp_path, **common)
    comp_s = dataclasses.replace(plain_s, compensate=True)
    stats = calibration.calibrate(model, tokenizer, str(folder), plain_s)
    windows, _ = load_windows(tokenizer, str(text_file), "calibration", 16, 32)
    plain_model = build.build_converted(model, stats, plain_s)[0]
    converted, fields = build.build_converted(model, stats, comp_s, windows)
    assert _final_drift(model, converted, windows) < 0.95 * _final_drift(model, plain_model, windows)
    if plain_s.latent == "joint":
        assert perplexity(converted, windows) < perplexity(plain_model, windows)
    drift = [row["drift"] for row in fields["layers"]]
    assert 0 < drift[0] < drift[-1]  # the converted stream drifts from the original, more with depth


@pytest.mark.parametrize("layout", [dict(latent="joint"), dict(format="deepseek", rope_dim=8)])
def test_output_refit_reproduces_the_original_better(tiny_model_dir, text_file, tmp_path, layout):
    """Refitting o_proj on the converted stream (plain factors, no compensation): every layer's attention output
    error drops, and the last hidden states are closer to the original's than the plain conversion's; with
    compensation too, closer than compensation alone."""
    folder = tiny_model_dir("llama")
    common = dict(allocation="uniform", kv_fraction=0.25, objective="activation", calib_samples=16, layerwise=False,
                  key_emphasis=1.0, refit_output=False, **layout)
    model, tokenizer, _ = load.load_model(str(folder), torch.float32, torch.device("cpu"))
    plain_s = settings_for(folder, text_file, tmp_path, **common)
    stats = calibration.calibrate(model, tokenizer, str(folder), plain_s)
    windows, _ = load_windows(tokenizer, str(text_file), "calibration", 16, 32)

    def drift(**kw) -> tuple[float, dict]:
        converted, fields = build.build_converted(model, stats, dataclasses.replace(plain_s, **kw), windows)
        return _final_drift(model, converted, windows), fields

    plain, _ = drift()
    refit, fields = drift(refit_output=True)
    assert refit < 0.9 * plain
    assert all(row["o_refit_error"] < row["o_error"] for row in fields["layers"])
    assert fields["layers"][0]["o_refit_error"] < 0.9 * fields["layers"][0]["o_error"]
    assert drift(compensate=True, refit_output=True)[0] < drift(compensate=True)[0]


def test_decoupled_compensation_with_an_exact_upstream_is_the_plain_layout(tiny_model_dir, text_file, tmp_path):
    """moments = (C, C): the compensated latent and RoPE keys are those of the plain decoupled layout; a drifted
    upstream changes both (the RoPE keys become the least-squares map to the original ones)."""
    from care_mla.method import decoupled

    folder = tiny_model_dir("qwen2")  # with biases: the RoPE key's bias row must stay
    s = settings_for(folder, text_file, tmp_path, latent="decoupled", allocation="uniform", kv_fraction=0.25,
                     rope_dim=8, objective="attention", key_emphasis=2.0)
    model, tokenizer, _ = load.load_model(str(folder), torch.float32, torch.device("cpu"))
    stats = calibration.calibrate(model, tokenizer, str(folder), s)
    split, ranks = plan.plan_decoupled(model, stats, s)
    kw = plan.decoupled_kwargs(s)
    C = stats.second_moments[1].double()
    plain = decoupled.layer_layout(split, 1, ranks[1], **kw)
    same = decoupled.layer_layout(split, 1, ranks[1], moments=(C, C), **kw)
    for name in ("kv_latent", "k_pe", "up_k", "up_v", "q", "o_weight", "o_bias"):
        assert torch.allclose(getattr(same, name), getattr(plain, name), rtol=1e-6, atol=1e-7), name
    g = torch.Generator().manual_seed(0)
    A = torch.eye(C.shape[0], dtype=torch.float64) + 0.05 * torch.randn(C.shape, generator=g, dtype=torch.float64)
    drifted = decoupled.layer_layout(split, 1, ranks[1], moments=(A.T @ C @ A, A.T @ C), **kw)  # X̃ = X·A
    D = C.shape[0]
    assert torch.equal(drifted.k_pe[D:], plain.k_pe[D:])  # the bias row is not refitted

    def error(k: torch.Tensor) -> float:  # E‖X̃k − X·k_pe‖² per token, from the moments
        want = plain.k_pe[:D]
        return float(torch.trace(k.T @ A.T @ C @ A @ k - 2 * k.T @ A.T @ C @ want + want.T @ C @ want))

    assert error(drifted.k_pe[:D]) < 0.5 * error(plain.k_pe[:D])  # X̃ = X·A: the refit undoes most of A
    assert not torch.allclose(drifted.kv_latent, plain.kv_latent)


@pytest.mark.parametrize("layout,fit", [
    (dict(latent="decoupled", format="care_mla", rope_dim=8), dict(compensate=True, refit_output=False)),
    (dict(latent="decoupled", format="deepseek", rope_dim=8), dict(compensate=True, refit_output=False)),
    (dict(latent="decoupled", format="deepseek", rope_dim=8), dict(compensate=False, refit_output=True)),
    (dict(latent="joint"), dict(compensate=False, refit_output=True)),
])
def test_sequential_fit_streamed_equals_whole(tiny_model_dir, text_file, tmp_path, layout, fit):
    """The layer-by-layer path (layouts kept without their query tensors, completed when written; refitted
    o_proj weights carried by the latents and layouts) writes the model the whole-model path builds."""
    folder = tiny_model_dir("llama")
    reports = [api.convert(settings_for(folder, text_file, tmp_path, out=str(tmp_path / f"out{lw}"),
                                        allocation="uniform", kv_fraction=0.25, objective="value", key_emphasis=1.0,
                                        layerwise=lw, calib_dtype="float32", **layout, **fit))
               for lw in (True, False)]
    streamed, whole = reports
    assert streamed["loading"] == "layerwise" and whole["loading"] == "whole"
    assert streamed["ppl"]["converted"] == pytest.approx(whole["ppl"]["converted"], rel=1e-5)
    assert [r["drift"] for r in streamed["layers"]] == pytest.approx([r["drift"] for r in whole["layers"]], rel=1e-4)
    assert all(r["drift"] > 0 for r in streamed["layers"])
    assert streamed["compensate"] == fit["compensate"] and streamed["refit_output"] == fit["refit_output"]
    if fit["refit_output"]:  # the written model holds the refitted o_proj, not the source's
        source = AutoModelForCausalLM.from_pretrained(folder).model.layers[0].self_attn.o_proj.weight
        written = AutoModelForCausalLM.from_pretrained(tmp_path / "outTrue", trust_remote_code=True)
        assert not torch.allclose(written.model.layers[0].self_attn.o_proj.weight, source, atol=1e-4)


def test_compensation_settings_are_checked():
    ConvertSettings(compensate=True, format="deepseek")  # every layout of care is compensated
    # output refit: on by default for care below parity, off at parity and for the baselines, as asked otherwise
    assert ConvertSettings().refit_output and ConvertSettings(format="deepseek", kv_fraction=0.25).refit_output
    assert not ConvertSettings(kv_fraction=1.0).refit_output and not ConvertSettings(method="svd").refit_output
    assert ConvertSettings(method="svd", refit_output=True).sequential_fit
    assert not ConvertSettings(refit_output=False).sequential_fit
    with pytest.raises(SettingsError, match="--compensate"):
        ConvertSettings(compensate=True, method="svd")
    with pytest.raises(SettingsError, match="key_emphasis"):
        ConvertSettings(key_emphasis=-1.0)
    with pytest.raises(SettingsError, match="objective"):
        ConvertSettings(method="svd", objective="attention")
    assert ConvertSettings(latent="separate").objective == "activation"
    assert ConvertSettings().objective == "auto" and ConvertSettings(objective="activation").key_emphasis == 1.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_layer_finished_from_caught_heads_equals_its_forward(family):
    """The refit's converted stream: the heads `output_moments` caught, pushed through the layer's own o_proj, give
    the layer's output bit for bit — also after o_proj was changed (the refitted weight applies)."""
    from conftest import tiny_model

    from care_mla.pipeline.sequential import _attention_from_heads, output_moments

    model = tiny_model(family)
    hidden, kwargs = calibration.capture_layer_inputs(model, torch.randint(3, 200, (3, 24)), batch_size=2)
    layer = model.model.layers[1]
    with torch.no_grad():
        heads = []
        moments = output_moments(copy.deepcopy(layer), layer, hidden, kwargs, kwargs, heads)
        assert [h.shape[:2] for h in heads] == [h.shape[:2] for h in hidden]  # one batch of heads per batch
        assert moments.heads.shape == (layer.self_attn.o_proj.in_features,) * 2
        x = torch.cat([h.reshape(-1, h.shape[-1]) for h in heads]).double()
        assert torch.allclose(moments.heads, x.T @ x / x.shape[0], rtol=1e-12, atol=1e-15)
        assert torch.allclose(moments.cross, moments.heads @ layer.self_attn.o_proj.weight.double().T,
                              rtol=1e-6, atol=1e-9)  # y is the same layer's o_proj of the same heads
        for change in (0.0, 0.5):
            layer.self_attn.o_proj.weight.mul_(1 + change)
            with _attention_from_heads(layer, heads):
                finished = [calibration.layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            full = [calibration.layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            assert all(torch.equal(a, b) for a, b in zip(finished, full))
    assert "forward" not in vars(layer.self_attn)  # the attention is itself again


def test_the_refit_runs_over_refit_samples_windows_and_compensation_over_all(tiny_model_dir, text_file, tmp_path):
    settings = settings_for(tiny_model_dir("llama"), text_file, tmp_path, kv_fraction=0.5, refit_samples=4)
    windows = torch.arange(16).unsqueeze(1).repeat(1, 5)
    assert build.sequential_windows(windows, settings)[:, 0].tolist() == [0, 5, 10, 15]  # evenly spaced, both ends
    assert torch.equal(build.sequential_windows(windows, dataclasses.replace(settings, compensate=True)), windows)
    assert torch.equal(build.sequential_windows(windows, dataclasses.replace(settings, refit_samples=None)), windows)
    assert torch.equal(build.sequential_windows(windows[:3], settings), windows[:3])
    with pytest.raises(SettingsError, match="refit_samples"):
        dataclasses.replace(settings, refit_samples=0)
