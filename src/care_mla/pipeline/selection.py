"""Choices by calibration loss: run candidate converted models over held-in windows, keep the best.

A conversion has knobs that no closed form settles — the balance between K's and V's error in a
joint latent (`factorization.joint_factorize(key_emphasis=)`) is the one this module serves. Each
candidate is a converted model described the way `layerwise.write_model` streams one: its class,
config, tensors outside the decoder layers by name, and its decoder layers by index. The models are
never built whole: one decoder layer of one candidate is in memory at a time, and the hidden
states of the (few) selection windows are carried per candidate, so the search costs
``candidates × windows × seq_len`` tokens of forward passes and nothing that grows with the model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from care_mla.evaluation.perplexity import (
    perplexity,
)
from care_mla.formats import deepseek
from care_mla.formats.families import head_dim
from care_mla.io.checkpoint import CheckpointReader
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.method import rope_split
from care_mla.method.statistics import CalibrationStats
from care_mla.pipeline.build import build_converted, decoupled_stream, latent_stream
from care_mla.pipeline.calibration import calibration_windows, capture_layer_inputs, layer_output, materialised
from care_mla.pipeline.layerwise import skeleton
from care_mla.pipeline.plan import SharedWeightings
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)

__all__ = ["SELECTION_WINDOWS", "SCREEN_WINDOWS", "FINALISTS", "KEY_EMPHASIS_GRID", "OBJECTIVE_CHOICES", "ROPE_SHARES",
           "streamed_losses", "screens", "screening_split", "screened_losses", "best"]

#: Calibration windows (evenly spaced over the calibration set) that candidates are scored on.
SELECTION_WINDOWS = 16
#: A choice runs in two rounds: every candidate on `SCREEN_WINDOWS` of the selection windows (evenly spaced), then
#: the `FINALISTS` with the lowest loss on the other ones; the winner has the lowest loss over all of them (the one
#: pass's choice per layer too, `single_pass`, its loss the attention-output error after the refit). Seven
#: candidates then cost 7 × 4 + 3 × 12 = 64 window passes instead of 112. SmolLM2 (64 × 256 calibration): the
#: margins between the best candidates were 0.008–0.018 nats on 16 windows, the screening kept the winner
#: (docs/benchmarks.md).
SCREEN_WINDOWS = 4
FINALISTS = 3
#: `key_emphasis` values tried by the "auto" balance (×2 steps). SmolLM2, held-out ppl ratio for 1 / 2 / 4 / 8:
#: F = 0.5, attention objective 1.124 / 1.075 / 1.054 / 1.085; F = 0.125, value objective 2.44 / 2.10 / 2.35 / 2.70.
KEY_EMPHASIS_GRID = (1.0, 2.0, 4.0)
#: Objectives an "auto" objective chooses from (`objectives`): the attention objective won at F = 0.5 on
#: SmolLM2, weighting V alone at F ≤ 0.25 (K's rotation-averaged weight then cost more than it saved); on
#: Qwen2.5-Coder-0.5B / FOLDOC at F = 0.5 neither beat the activation objective (held-out 1.164 for the chosen
#: attention K×4 vs 1.146), so the plain activation objective (K×1) stays a candidate.
OBJECTIVE_CHOICES = ("activation", "attention", "value")
#: Shares of a decoupled layout's cache tried for its RoPE part (``qk_rope_head_dim``; the rest is the latent)
#: when no ``--rope-dim`` is given: a sixth to a half. The former fixed rule was a third.
ROPE_SHARES = (1 / 6, 1 / 4, 1 / 3, 1 / 2)

LayerState = Callable[[int], dict[str, torch.Tensor]]


def _load(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    module.to_empty(device=device)
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)


@torch.no_grad()
def streamed_losses(model_class: type[nn.Module], tensor: Callable[[str], torch.Tensor],
                    candidates: Sequence[tuple[object, LayerState]], windows: torch.Tensor, *, dtype: torch.dtype,
                    device: torch.device, batch_size: int = 8, progress: bool = False,
                    desc: str = "scoring candidates") -> list[float]:
    """Mean next-token NLL (nats) of each candidate model on `windows` (N, T).

    Candidate c is ``model_class(config_c)`` with ``candidates[c] = (config_c, layer_c)``: its decoder
    layer i is ``layer_c(i)`` (names relative to the layer; called once, in order). The configs may
    differ in the layers' shapes (per-layer ranks, RoPE widths); the tensors outside the decoder
    layers (``tensor(name)``: embedding, final norm, LM head) are shared.
    """
    models = [skeleton(config, device, model_class) for config, _ in candidates]
    embedding = tensor("model.embed_tokens.weight")
    streams, kwargs = [], []
    for model in models:  # each candidate's own RoPE tables (their rotary widths may differ) and mask
        _load(model.model.embed_tokens, {"weight": embedding}, device, dtype)
        hidden, kw = capture_layer_inputs(model, windows, batch_size)
        model.model.embed_tokens.to("meta")
        streams.append(hidden)
        kwargs.append(kw)
    del embedding
    inner = models[0].model
    bar = tqdm(total=len(inner.layers) * len(models), desc=desc, unit="layer", disable=not progress)
    for i in range(len(inner.layers)):
        for c, (model, (_, state)) in enumerate(zip(models, candidates)):
            layer = model.model.layers[i]
            with materialised(layer, {k: v.to(dtype) for k, v in state(i).items()}, device):
                streams[c] = [layer_output(layer(h, **kw)) for h, kw in zip(streams[c], kwargs[c])]
            bar.update(1)
    bar.close()
    _load(inner.norm, {"weight": tensor("model.norm.weight")}, device, dtype)
    tied = getattr(candidates[0][0], "tie_word_embeddings", False)
    head = tensor("model.embed_tokens.weight" if tied else "lm_head.weight").to(device=device, dtype=dtype)
    losses = []
    for stream in streams:
        total, count = 0.0, 0
        for h, start in zip(stream, range(0, windows.shape[0], batch_size)):
            ids = windows[start : start + h.shape[0]].to(device)
            for b in range(h.shape[0]):  # one window's logits at a time: T × vocab
                logits = inner.norm(h[b : b + 1])[0, :-1] @ head.T
                total += float(F.cross_entropy(logits.float(), ids[b, 1:], reduction="sum"))
                count += ids.shape[1] - 1
        losses.append(total / count)
    inner.norm.to("meta")
    return losses


def screens(candidates: int, windows: int) -> bool:
    """Whether a choice among `candidates` on `windows` selection windows runs in two rounds."""
    return candidates > FINALISTS and windows > SCREEN_WINDOWS


def screening_split(n: int) -> tuple[list[int], list[int]]:
    """(the screening round's, the finalists' other) indices into `n` selection windows: `SCREEN_WINDOWS` evenly
    spaced, then the rest."""
    first = torch.linspace(0, n - 1, SCREEN_WINDOWS).round().long().tolist()
    return first, [k for k in range(n) if k not in set(first)]


def screened_losses(candidates: Sequence, windows: torch.Tensor,
                    score: Callable[[Sequence, torch.Tensor], list[float]]) -> tuple[list[float], dict[int, float]]:
    """The two rounds of a choice (`SCREEN_WINDOWS`, `FINALISTS`): ``score(candidates, windows)`` is the mean loss of
    each candidate on `windows`. Returns (each candidate's mean loss over all `windows`, NaN for those screened
    out; each candidate's loss on the screening windows, by index — empty when one round scored everything)."""
    n = windows.shape[0]
    if not screens(len(candidates), n):
        return list(score(candidates, windows)), {}
    screen, rest = (torch.tensor(ks) for ks in screening_split(n))
    first = score(candidates, windows[screen])
    ranked = sorted((loss, k) for k, loss in enumerate(first) if math.isfinite(loss))
    finalists = sorted(k for _, k in ranked[:FINALISTS])
    losses = [math.nan] * len(candidates)
    if finalists:
        second = score([candidates[k] for k in finalists], windows[rest])
        for k, loss in zip(finalists, second):  # windows of one length: the mean over windows is over tokens
            losses[k] = (first[k] * len(screen) + loss * len(rest)) / n
    return losses, dict(enumerate(first))


def best(values: Sequence, losses: Sequence[float], what: str) -> tuple[object, dict]:
    """(the value with the lowest finite loss, a report of every value with a finite loss); the first on ties."""
    finite = [(loss, k) for k, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise ValueError(f"every candidate {what} gave a non-finite calibration loss: {list(zip(values, losses))}")
    k = min(finite)[1]
    table = {str(v): round(loss, 6) for v, loss in zip(values, losses) if math.isfinite(loss)}
    logger.info("%s by calibration loss: %s (tried %s)", what, values[k], table)
    return values[k], {"chosen": values[k], "calibration_loss": table}


def selection_windows(tokenizer, settings: ConvertSettings) -> torch.Tensor:
    """`selection.SELECTION_WINDOWS` calibration windows, evenly spaced over the calibration set (held-in)."""
    from care_mla.pipeline.selection import SELECTION_WINDOWS

    windows = calibration_windows(tokenizer, settings)
    step = max(1, windows.shape[0] // SELECTION_WINDOWS)
    return windows[::step][:SELECTION_WINDOWS]


def objective_candidates(settings: ConvertSettings) -> list[ConvertSettings]:
    """The settings to choose from by calibration loss: every "auto" objective and key_emphasis spelled out
    (`selection.OBJECTIVE_CHOICES` × `selection.KEY_EMPHASIS_GRID`); one entry when nothing is left to choose."""
    from care_mla.pipeline.selection import KEY_EMPHASIS_GRID, OBJECTIVE_CHOICES

    objectives = OBJECTIVE_CHOICES if settings.objective == "auto" else (settings.objective,)
    out = []
    for objective in objectives:
        emphases = (settings.key_emphasis,)
        if settings.key_emphasis == "auto":
            emphases = (1.0,) if objective == "activation" else KEY_EMPHASIS_GRID
        out += [dataclasses.replace(settings, objective=objective, key_emphasis=e) for e in emphases]
    return out


def rope_dim_candidates(config, settings: ConvertSettings) -> list[ConvertSettings]:
    """Decoupled layouts below parity with no pinned ``--rope-dim``: splits of the cache between
    ``qk_rope_head_dim`` and ``kv_lora_rank`` to choose from by calibration loss (`selection.ROPE_SHARES` of the
    cache, even, valid for the export); one entry when there is nothing to choose."""
    from care_mla.pipeline.selection import ROPE_SHARES

    if settings.latent != "decoupled" or settings.rope_dim is not None or settings.engine is not None:
        return [settings]
    g, d = config.num_key_value_heads, head_dim(config)
    cache = round(settings.kv_fraction * 2 * g * d)
    if cache >= 2 * g * d:
        return [settings]  # parity: the exact layout
    dims = []
    for share in ROPE_SHARES:
        rope = max(2, int(cache * share) // 2 * 2)
        try:
            deepseek.export_budget(config, qk_rope_head_dim=rope, kv_fraction=settings.kv_fraction,
                                   portable=settings.portable)
        except rope_split.DeepseekExportError:
            continue
        if rope not in dims:
            dims.append(rope)
    return [dataclasses.replace(settings, rope_dim=r) for r in dims] or [settings]


#: The stages of a choice by calibration loss: (report field, candidates, how a candidate is named).
_STAGES = (
    ("objective_choice", lambda config, s: objective_candidates(s),
     lambda c: f"{c.objective}, key_emphasis {c.key_emphasis:g}"),
    ("rope_dim_choice", rope_dim_candidates, lambda c: f"qk_rope_head_dim {c.rope_dim}"),
)


def choose_settings(config, settings: ConvertSettings,
                    score: Callable[[list[ConvertSettings], torch.Tensor], list[float]],
                    windows: Callable[[], torch.Tensor]) -> tuple[ConvertSettings, dict]:
    """`settings` with what is "auto" resolved by calibration loss, one stage after the other (`_STAGES`: first
    the objective and the K/V balance, then, for a decoupled layout, the RoPE/latent split), and the report
    fields of each choice made. ``score(candidates, windows)`` gives each candidate's loss on `windows`, a subset
    of ``windows()`` (the selection windows, made once when a choice is needed): screened first
    (`screened_losses`)."""
    fields = {}
    selection = None
    for field, candidates_of, name_of in _STAGES:
        candidates = candidates_of(config, settings)
        if len(candidates) == 1:
            settings = candidates[0]
            continue
        names = [name_of(c) for c in candidates]
        selection = windows() if selection is None else selection
        # scored as plain conversions: compensation and output refit rerun every layer, multiplying the cost
        plain = [dataclasses.replace(c, compensate=False, refit_output=False) for c in candidates]
        losses, screening = screened_losses(plain, selection, score)
        name, info = best(names, losses, field.removesuffix("_choice"))
        if screening:
            info["screening_loss"] = {names[k]: round(loss, 6) for k, loss in screening.items()}
        info["windows"] = {"screening": SCREEN_WINDOWS if screening else None, "all": int(selection.shape[0])}
        settings = candidates[names.index(name)]
        fields[field] = info
    if fields:
        fields["objective"], fields["key_emphasis"] = settings.objective, settings.key_emphasis
    return settings, fields


def choose_settings_whole(model, tokenizer, stats: CalibrationStats,
                          settings: ConvertSettings) -> tuple[ConvertSettings, dict]:
    """`choose_settings` with each candidate built in memory and scored on `selection_windows`."""

    def score(candidates: list[ConvertSettings], windows: torch.Tensor) -> list[float]:
        losses = []
        for candidate in candidates:
            converted, _ = build_converted(model, stats, candidate)
            losses.append(math.log(perplexity(converted, windows, batch_size=settings.batch_size)))
            del converted
        return losses

    return choose_settings(model.config, settings, score, lambda: selection_windows(tokenizer, settings))


def choose_settings_streamed(config, reader: CheckpointReader, tokenizer, stats: CalibrationStats,
                              settings: ConvertSettings, dtype: torch.dtype,
                              device: torch.device) -> tuple[ConvertSettings, dict]:
    """Stage 3: `choose_settings` with one decoder layer of one candidate in memory at a time (`streamed_losses`);
    the candidates read each layer of `reader` (a checkpoint, or a model in memory) once (`layerwise.LayerMemo`)."""
    from care_mla.pipeline.layerwise import LayerMemo
    from care_mla.pipeline.selection import streamed_losses

    memo = LayerMemo(reader)
    decoupled = settings.latent == "decoupled"

    def score(candidates: list[ConvertSettings], windows: torch.Tensor) -> list[float]:
        make = decoupled_stream if decoupled else latent_stream
        # the candidates share each layer's attention weightings and K/V stack Gram (for a decoupled layout, those
        # that share the first one's RoPE plan: it depends on rope_dim only) and skip the per-layer error table
        shared = {"shared": SharedWeightings(), "errors": False}
        streams = [make(config, memo, stats, candidates[0], dtype, **shared)]
        for c in candidates[1:]:
            if not decoupled:
                streams.append(make(config, memo, stats, c, dtype, **shared))
            elif c.rope_dim == candidates[0].rope_dim:
                streams.append(make(config, memo, stats, c, dtype, split=streams[0].split, **shared))
            else:
                streams.append(make(config, memo, stats, c, dtype, errors=False))
        first = streams[0]
        return streamed_losses(first.model_class, first.tensor, [(p.config, p.layer) for p in streams], windows,
                               dtype=dtype, device=device, batch_size=settings.batch_size, progress=settings.progress,
                               desc=f"choosing by calibration loss: {len(streams)} candidates x layers "
                                    f"on {windows.shape[0]} windows")

    return choose_settings(config, settings, score, lambda: selection_windows(tokenizer, settings))
