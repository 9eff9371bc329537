"""The default conversion in one layer-sequential pass over the calibration windows: each decoder layer's
statistics, the choice of its objective, its factors and its output refit, before the next layer runs.

The two-pass conversion (`calibration` → `selection` → `sequential`) calibrates, scores whole converted models
over windows to choose one objective for all layers, then runs the converted stream again to refit every
``o_proj``: about three forward passes. Here everything a layer needs is made from what the calibration pass has
in hand when it reaches the layer — the original stream's inputs of that layer:

1. the layer's second moment C over every window (the attention inputs, as `calibration.collect_statistics`
   accumulates them from ``input_layernorm``'s outputs: the same numbers), taken first;
2. the original attention on the `selection.SELECTION_WINDOWS` windows the choice runs on: its outputs (the
   targets) and ``q_proj`` outputs (`_replaying`);
3. each candidate objective (`selection.objective_candidates`) factorized from C (`factorization.stack_gram`: one
   eigendecomposition of an m × m Gram each) and scored by **what its output refit leaves of the layer's
   attention-output error** on those windows (`refitted_error`), in the two rounds of `selection.screened_losses`
   (every candidate on `selection.SCREEN_WINDOWS` of them, the `selection.FINALISTS` best on the rest, added to
   their moments); the layer keeps its best, so the objective is chosen per layer;
4. the winner's factors as they were scored (`factorization.joint_factorize_gram`: the whitened SVD's latent, without
   its SVD; SmolLM2, every candidate at F = 0.5 and 0.125: down·up within 3e-9 relative, often the same float32 bits);
   then the original layer runs over every window — the next layer's inputs, in place of its own — and, as it reaches
   them, the winner's heads on the rows of the ``settings.refit_samples`` refit windows are summed against the
   original attention's output there, a batch-sized group of rows at a time (`_forward_refitting`): at most one
   group's refit inputs, targets and queries are held, so the pass holds one stream and a layer, as a calibration
   does. Its ``o_proj`` is then refitted by least squares from those moments (`compensation.refit_output_weight`).

Held-out ppl ratio (docs/results.md), SmolLM2 at F = 0.25 / 0.125 with the objectives pinned, the refit on the
original stream against the converted one: 1.213 / 1.519 against 1.217 / 1.548. Applies to the default layout (a
joint latent of care at uniform ranks, refit on, no compensation, one device); anything else runs the two passes
(`single_pass_applies`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.mapping import LayerLatent, latent_layer_state
from care_mla.io.memory import trim_heap
from care_mla.method.compensation import OutputMoments, output_refit_error, refit_output_weight, ridge_system
from care_mla.method.statistics import CalibrationCacheError, CalibrationStats, SecondMoment, product_dtype
from care_mla.pipeline import calibration
from care_mla.pipeline.build import ConvertedStream, sequential_windows
from care_mla.pipeline.calibration import (
    StatisticsCache,
    calibration_windows,
    capture_layer_inputs,
    layer_output,
    materialised,
    record_hardware,
)
from care_mla.pipeline.load import ModelSource, calib_dtype
from care_mla.pipeline.plan import SharedWeightings, layer_latent, plan_ranks
from care_mla.pipeline.reporting import RssSampler
from care_mla.pipeline.sequential import DRIFT_WINDOWS, MomentSum, attention_parts
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)

__all__ = ["single_pass_applies", "PassWindows", "SinglePass", "single_pass", "calibrate_and_fit", "single_pass_stream"]


def single_pass_applies(settings: ConvertSettings) -> bool:
    """Whether `settings` convert in one pass: a care joint latent at uniform ranks with the output refit and
    without compensation, one device (no ``--max-memory`` placement), unless ``--two-pass``."""
    return (settings.single_pass and settings.method == "care" and settings.latent == "joint"
            and settings.allocation == "uniform" and bool(settings.refit_output) and not settings.compensate
            and settings.format == "care_mla" and not settings.max_memory_map)


@dataclass(frozen=True)
class PassWindows:
    """Which calibration windows (indices into the N windows) the pass runs and what each serves: `main` the
    original stream (every window while the statistics are collected; with cached statistics only those the
    others need), `selection` the choice's, `refit` the output refit's, `drift` the converted stream's."""

    main: list[int]
    selection: list[int]
    refit: list[int]
    drift: list[int]
    screen: list[int]  # the selection windows every candidate is scored on (all of them when one round does)
    rest: list[int]  # the selection's other windows, the finalists' second round (empty: one round)

    @classmethod
    def of(cls, n: int, settings: ConvertSettings, *, statistics: bool) -> PassWindows:
        from care_mla.pipeline.selection import SELECTION_WINDOWS, objective_candidates, screening_split, screens

        everything = torch.arange(n)
        refit = sequential_windows(everything, settings).tolist()
        selection = everything[:: max(1, n // SELECTION_WINDOWS)][:SELECTION_WINDOWS].tolist()
        drift = refit[:DRIFT_WINDOWS]
        main = list(range(n)) if statistics else sorted(set(selection) | set(refit))
        screen, rest = selection, []
        if screens(len(objective_candidates(settings)), len(selection)):  # as `selection.screened_losses` does
            screen, rest = ([selection[k] for k in ks] for ks in screening_split(len(selection)))
        return cls(main, selection, refit, drift, screen, rest)


@dataclass
class SinglePass:
    """What the pass made: the statistics (collected, or the cached ones), each layer's factors with its refitted
    ``o_weight``, and the report fields: ``ranks``, ``layers`` (the per-layer table), ``objective_choice`` (the
    choice per layer) and ``single_pass`` (windows run, seconds by step)."""

    stats: CalibrationStats
    latents: list[LayerLatent]
    fields: dict

    @property
    def choice(self) -> dict:
        """The report fields of the choice (what `selection.choose_settings` returns in two passes)."""
        return {"objective_choice": self.fields["objective_choice"]}


def _gather(hidden: list[torch.Tensor], positions: list[int], batch_size: int) -> list[torch.Tensor]:
    """The rows at `positions` (of the stream whose batches are `hidden`), re-batched by `batch_size`."""
    rows = [hidden[p // batch_size][p % batch_size] for p in positions]
    return [torch.stack(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]


#: The GEMM dtype of the refit's and the choice's output moments (`sequential.MomentSum`): float32, half the time of
#: float64 on a CPU (the two-pass refit keeps float64, its bytes unchanged) — even for a bfloat16 stream, unlike the
#: statistics (`statistics.product_dtype`): the refit's residual is 1e-5 to 1e-1 of the output's energy, the difference
#: of sums that bfloat16 would round to 2⁻⁹ each. Tried (637b57a) on SmolLM2 at F = 0.5: candidates' errors rounded
#: below zero, the choice lost, layer 0's drift 0.044 instead of 3e-5, held-out ppl 1.387 instead of 1.012.
MOMENT_DTYPE = torch.float32


def refitted_error(moments: OutputMoments, weight: torch.Tensor, damping: float) -> float:
    """Relative error of a converted layer's attention output against the original attention's, both summed into
    `moments` (`_moment_sum`), once its ``o_proj`` is refitted on them from `weight`
    (`compensation.refit_output_weight`): what the refit leaves of a candidate, the choice's score."""
    M, R, lam = ridge_system(moments, weight, damping)
    Wt = torch.linalg.solve(M, R)  # the refit, (m, D)
    # E‖ô Wᵀ − y‖² = tr(W A Wᵀ) − 2 tr(W B) + E‖y‖², and at the ridge's solution (A + λI) Wᵀ = R, so
    # tr(W A Wᵀ) = tr(W R) − λ‖W‖²: elementwise products only, no m × m × D product
    error = float((Wt * (R - 2 * moments.cross.double())).sum() - lam * Wt.pow(2).sum()) + moments.energy
    return max(error, 0.0) / max(moments.energy, 1e-30)


def _moment_sum(layer, hidden: list[torch.Tensor], kwargs: list[dict], targets: list[torch.Tensor],
                queries: list[torch.Tensor] | None = None, total: MomentSum | None = None) -> MomentSum:
    """Converted decoder `layer`'s heads on `hidden` against the original attention's `targets` summed into `total`
    (a new `MomentSum` when None; `queries`: its ``q_proj`` outputs there, `_replaying`)."""
    o_proj = layer.self_attn.o_proj
    if total is None:
        total = MomentSum(o_proj.in_features, o_proj.out_features, o_proj.bias, o_proj.weight.device, MOMENT_DTYPE)
    with _replaying(layer.self_attn.q_proj, queries):
        for h, k, y in zip(hidden, kwargs, targets):  # batch by batch: one batch's heads held at a time
            (heads,) = attention_parts(layer, [h], [k], "heads")
            total.add(heads, y)
    return total


@contextmanager
def _replaying(module: torch.nn.Module, outputs: list[torch.Tensor] | None):
    """`module` returning `outputs`, one per call in order, instead of computing them (nothing changes without
    `outputs`). The conversion leaves ``q_proj`` as it was, so the original layer's queries, kept as it ran on the
    same inputs, are the converted one's: each candidate and the refit skip that GEMM (a third of what their
    attention computes)."""
    if outputs is None:
        yield module
        return
    batches = iter(outputs)
    module.forward = lambda _x: next(batches)
    try:
        yield module
    finally:
        del module.forward


def _attention_keeping(layer, hidden: list[torch.Tensor], kwargs: list[dict]) -> tuple[list, list]:
    """Decoder `layer`'s attention outputs and ``q_proj`` outputs on each batch of `hidden`, the layer stopped after
    its attention: the choice's targets and the queries its candidates replay (`_replaying`)."""
    caught: dict[str, torch.Tensor] = {}
    handle = layer.self_attn.q_proj.register_forward_hook(lambda _m, _a, out: caught.__setitem__("query", out))
    attention, queries = [], []
    try:
        for h, k in zip(hidden, kwargs):
            attention += attention_parts(layer, [h], [k], "output")
            queries.append(caught.pop("query"))
    finally:
        handle.remove()
    return attention, queries


def _forward_refitting(layer, hidden: list[torch.Tensor], kwargs: list[dict], positions: list[int], fitted,
                       fitted_kwargs: list[dict], total: MomentSum, *, replay: bool = True,
                       whole: bool = True) -> float:
    """Replace each batch of `hidden` by decoder `layer`'s output on it (in place: one stream is held, not two) and,
    as the batches run, add the converted layer `fitted`'s heads on the rows at the stream `positions` (ascending)
    against `layer`'s attention output there to `total`: the output refit's moments. The rows are taken in groups
    of the stream's batch size, in order (`fitted_kwargs`: the converted model's keyword arguments for each group),
    each group summed as soon as its last row has run, so at most one group's inputs, targets and queries are held.
    `replay`: `fitted` takes `layer`'s ``q_proj`` outputs (`_replaying`). Not `whole`: the layer stops after its
    attention (its MLP never runs), only the batches with refit rows run, and `hidden` is left as it was — the last
    layer, whose outputs no layer after it needs. Returns the seconds the refit's own work took."""
    size = hidden[0].shape[0]
    groups = [positions[s : s + size] for s in range(0, len(positions), size)]
    rows = _rows_by_batch(positions, size)
    caught: dict[str, torch.Tensor] = {}
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (inputs, targets, queries) of a group

    def catch(what: str):
        return lambda _module, _args, out: caught.__setitem__(what, out)

    handles = [layer.self_attn.o_proj.register_forward_hook(catch("attention")),
               layer.self_attn.q_proj.register_forward_hook(catch("query"))]
    spent, done = 0.0, 0
    try:
        for b, k in enumerate(kwargs):
            picks = rows.get(b)
            if not whole and not picks:
                continue
            x = hidden[b][picks] if picks else None  # copied before the batch is replaced
            if whole:  # written into the batch's own buffer: the stream stays where it is
                hidden[b].copy_(layer_output(layer(hidden[b], **k)))
            else:
                attention_parts(layer, [hidden[b]], [k], "output")
            if picks:
                start = time.perf_counter()
                pending.append((x, caught["attention"][picks], caught["query"][picks]))
                while done < len(groups) and sum(p[0].shape[0] for p in pending) >= len(groups[done]):
                    x, y, q = (torch.cat(parts) for parts in zip(*pending))
                    n = len(groups[done])
                    with _replaying(fitted.self_attn.q_proj, [q[:n]] if replay else None):
                        (heads,) = attention_parts(fitted, [x[:n]], [fitted_kwargs[done]], "heads")
                    total.add(heads, y[:n])
                    pending = [(x[n:], y[n:], q[n:])] if x.shape[0] > n else []
                    done += 1
                spent += time.perf_counter() - start
            caught.clear()
        return spent
    finally:
        for handle in handles:
            handle.remove()


def _rows_by_batch(positions: list[int], batch_size: int) -> dict[int, list[int]]:
    """The stream `positions` as {batch: its rows}, batches of `batch_size`, in order."""
    rows: dict[int, list[int]] = {}
    for p in positions:
        rows.setdefault(p // batch_size, []).append(p % batch_size)
    return rows


def _significant(x: float, digits: int = 6) -> float:
    """`x` to `digits` significant digits: errors of a small model are ~1e-5, where six decimals would tie them."""
    return float(f"{x:.{digits}g}")


def _relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    error = sum(float((o.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets))
    return error / max(sum(float(t.double().pow(2).sum()) for t in targets), 1e-30)


#: Settings that do not change what the pass computes (a progress file made under other values still serves).
_NOT_PASS_SETTINGS = {"out", "overwrite", "evaluate", "progress", "eval_text", "eval_samples", "eval_seq_len",
                      "zero_shot_tasks", "zero_shot_limit", "cache_dir"}


class _Progress:
    """The pass's progress, saved at most every `interval` seconds after a layer is done (what a killed run needs to
    go on after that layer: the statistics so far, both hidden-state streams, each layer's factors and refitted
    o_proj, the report rows) and loaded by the next run of the same pass (`key`: the statistics' key, the pass's
    settings and dtypes) — as `calibration.collect_statistics` does for a calibration."""

    def __init__(self, path: Path | None, key: str, interval: float):
        self.path, self.key, self.interval = path, key, interval
        self.last = time.perf_counter()

    def due(self) -> bool:
        return self.path is not None and time.perf_counter() - self.last >= self.interval

    def save(self, done: int, moments: list, abs_means: list, count: int, latents: list[LayerLatent], record: dict,
             streams: dict[str, list[torch.Tensor]]) -> None:
        tensors = {f"{name}.{j}": h.detach().contiguous().cpu() for name, hs in streams.items() for j, h in enumerate(hs)}
        for i, latent in enumerate(latents):
            (f,) = latent.factors
            tensors.update({f"latent.{i}.down": f.down, f"latent.{i}.up": f.up, f"latent.{i}.spectrum": f.spectrum,
                            f"latent.{i}.o_weight": latent.o_weight})
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        CalibrationStats(moments[:done], abs_means[:done], count, record).save(self.path, key=self.key, extra=tensors)
        self.last = time.perf_counter()

    def load(self, streams: dict[str, list[torch.Tensor]]):
        """(layers done, statistics so far, latents, record, streams) of a run killed after them, else None."""
        from care_mla.method.factorization import Factors

        if self.path is None or not self.path.is_file():
            return None
        try:
            done, extra = CalibrationStats.load(self.path, key=self.key, extra=True)
            restored = {name: [extra[f"{name}.{j}"].to(device=h.device, dtype=h.dtype) for j, h in enumerate(hs)]
                        for name, hs in streams.items()}
            n = done.num_layers
            latents = [LayerLatent((Factors(extra[f"latent.{i}.down"], extra[f"latent.{i}.up"],
                                            extra[f"latent.{i}.spectrum"]),), o_weight=extra[f"latent.{i}.o_weight"])
                       for i in range(n)]
        except (CalibrationCacheError, KeyError) as err:
            logger.warning("ignoring the one pass's progress file: %s", err)
            return None
        if any(r.shape != h.shape for name in streams for r, h in zip(restored[name], streams[name])):
            logger.warning("ignoring the one pass's progress file %s: other shapes", self.path)
            return None
        return n, done, latents, done.meta, restored

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _pass_key(settings: ConvertSettings, statistics_key: str, dtype: torch.dtype, stream_dtype: torch.dtype,
              collect: bool) -> str:
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_PASS_SETTINGS}
    text = json.dumps([statistics_key, fields, str(dtype), str(stream_dtype), collect], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def single_pass(config, reader, windows: torch.Tensor, settings: ConvertSettings, *, dtype: torch.dtype,
                stream_dtype: torch.dtype, device: torch.device, stats: CalibrationStats | None = None,
                meta: dict | None = None, resume: Path | None = None) -> SinglePass:
    """Convert every layer of the checkpoint `reader` (its `config`) in one pass over the calibration `windows`
    (N, T), the streams in `stream_dtype` on `device`, the written tensors in `dtype`. With `stats` (cached for
    these windows) the statistics are not collected again and the original stream runs only over the windows the
    choice and the refit need; else they are collected (with `meta`) and returned. With `resume`, the progress is
    saved there (at most every `calibration.RESUME_INTERVAL_S`) and a killed run of the same pass goes on after its
    last layer saved; the file is removed once the pass is done."""
    with RssSampler() as rss:
        return _single_pass(config, reader, windows, settings, dtype=dtype, stream_dtype=stream_dtype, device=device,
                            stats=stats, meta=meta, resume=resume, rss=rss)


@torch.no_grad()
def _single_pass(config, reader, windows: torch.Tensor, settings: ConvertSettings, *, dtype: torch.dtype,
                 stream_dtype: torch.dtype, device: torch.device, stats: CalibrationStats | None,
                 meta: dict | None, resume: Path | None, rss: RssSampler) -> SinglePass:
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
    from care_mla.pipeline.layerwise import (
        LayerMemo,
        kv_weights_reader,
        layer_prefix,
        qo_weights_reader,
        skeleton,
    )
    from care_mla.pipeline.selection import FINALISTS, objective_candidates

    reader = LayerMemo(reader)  # each layer's tensors read from the checkpoint once, whatever asks for them
    collect = stats is None
    picks = PassWindows.of(windows.shape[0], settings, statistics=collect)
    bs = settings.batch_size
    kv_weights, qo_weights = kv_weights_reader(reader, dtype), qo_weights_reader(reader, dtype)
    ranks = plan_ranks(config, kv_weights, stats, settings, qo_weights)
    target = CareMlaConfig.from_base(config, kv_latent="joint", kv_lora_ranks=ranks)
    original, converted = skeleton(config, device), skeleton(target, device, CareMlaForCausalLM)

    def inputs(model, which: list[int], embedding: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
        embed = model.model.embed_tokens
        embed.to_empty(device=device)
        embed.load_state_dict({"weight": embedding.to(device)}, assign=True)
        try:
            return capture_layer_inputs(model, windows[which], bs)
        finally:
            embed.to("meta")

    embedding = reader.get("model.embed_tokens.weight", stream_dtype)
    hidden, kw_main = inputs(original, picks.main, embedding)
    position = {w: p for p, w in enumerate(picks.main)}
    rounds = ("screen", "rest") if picks.rest else ("screen",)  # of the choice: every candidate, the finalists
    # the choice runs on the selection windows gathered apart: the original attention there, then each candidate
    kw = {name: inputs(converted, getattr(picks, name), embedding)[1] for name in rounds}
    kw_original = {name: inputs(original, getattr(picks, name), embedding)[1] for name in rounds}
    # the refit runs inside the forward, on the refit windows' rows in batches of `bs` as the stream reaches them
    refit_positions = [position[w] for w in picks.refit]
    kw_refit = inputs(converted, picks.refit, embedding)[1]
    drift_stream, kw_drift = inputs(converted, picks.drift, embedding)
    kw_drift_original = inputs(original, picks.drift, embedding)[1]
    del embedding

    candidates = objective_candidates(settings)
    names = [f"{c.objective}, key_emphasis {c.key_emphasis:g}" for c in candidates]
    moments, abs_means, count = [], [], 0
    latents, rows, chosen, errors, screened = [], [], [], [], []
    if not collect:
        moments, abs_means, count = list(stats.second_moments), list(stats.abs_means), stats.num_tokens
    tokens = windows[picks.main].numel()
    spent = dict.fromkeys(("statistics", "forward", "choice", "refit", "drift"), 0.0)  # seconds, summed over layers
    progress = _Progress(resume, _pass_key(settings, (meta or stats.meta).get("key", ""), dtype, stream_dtype, collect),
                         calibration.RESUME_INTERVAL_S)
    start = 0
    restored = progress.load({"hidden": hidden, "drift": drift_stream})
    if restored is not None:
        start, so_far, latents, record, streams = restored
        hidden, drift_stream = streams["hidden"], streams["drift"]
        rows, chosen, errors, spent = record["rows"], record["chosen"], record["errors"], record["spent"]
        screened = record.get("screened", [{}] * start)
        if collect:
            moments, abs_means, count = list(so_far.second_moments), list(so_far.abs_means), so_far.num_tokens
        logger.info("resuming the one pass after layer %d of %d (%s)", start, config.num_hidden_layers, resume)
    peaks: dict[str, float] = {}  # MB, the largest resident set of each step over the layers (this run's)
    clock = _Clock(spent, peaks, rss)
    bar = tqdm(total=config.num_hidden_layers, initial=start, unit="layer", disable=not settings.progress,
               desc=f"one pass: statistics, {len(candidates)} candidate objectives, output refit")
    for i in range(start, config.num_hidden_layers):
        t = time.perf_counter()
        source = reader.state(layer_prefix(i), dtype)
        with materialised(original.model.layers[i], reader.state(layer_prefix(i), stream_dtype), device) as layer:
            clock("forward")  # reading the layer

            def attention_state(s: ConvertSettings, shared: SharedWeightings, errors: bool = False):
                latent, row = layer_latent(i, ranks[i], kv_weights, so_far, s, qo_weights, config, shared=shared,
                                           errors=errors)
                return latent, row, latent_layer_state(source, latent)

            # the statistics as `collect_statistics` accumulates them: input_layernorm's outputs, batch by batch —
            # first, as the choice factorizes from them before the layer runs over the stream
            if collect:
                moment = SecondMoment(layer.input_layernorm.weight.shape[0], device=device,
                                      dtype=product_dtype(stream_dtype))
                for h in hidden:
                    moment.add_batch(layer.input_layernorm(h))
                moments.append(moment.second_moment.float().cpu())
                abs_means.append(moment.abs_mean.float().cpu())
                count = moment.count
                del moment
            so_far = CalibrationStats(moments[: i + 1], abs_means[: i + 1], count)
            clock("statistics")
            # the original attention on the selection windows: the choice's targets and the queries it replays
            selected = {name: _gather(hidden, [position[w] for w in getattr(picks, name)], bs) for name in rounds}
            kept = {name: _attention_keeping(layer, selected[name], kw_original[name]) for name in rounds}
            targets, queries = ({name: kept[name][j] for name in rounds} for j in (0, 1))
            del kept
            q_proj = dict(layer.self_attn.q_proj.state_dict())
            # the choice in two rounds, as `selection.screened_losses` makes it: every candidate scored on the
            # screening windows, then the `FINALISTS` best on the rest added to their moments; the lowest error wins
            shared = SharedWeightings()
            streamed, o_weights, sums, screening = [], [], [], []
            replay = True
            for c in candidates:
                state = attention_state(c, shared)[2]
                streamed.append(_cast(state, stream_dtype))
                o_weights.append(state["self_attn.o_proj.weight"])
                if not _same_query(streamed[-1], q_proj):  # the written dtype rounded q_proj: queries are computed
                    queries, replay = dict.fromkeys(rounds), False
                with materialised(converted.model.layers[i], streamed[-1], device) as candidate:
                    sums.append(_moment_sum(candidate, selected["screen"], kw["screen"], targets["screen"],
                                            queries["screen"]))
                screening.append(refitted_error(sums[-1].moments(), o_weights[-1], settings.damping))
                if "rest" in rounds:  # only the best `FINALISTS` so far keep their moments (m × (m + D) float64 each)
                    for _, k in sorted((e if math.isfinite(e) else math.inf, k)
                                       for k, e in enumerate(screening))[FINALISTS:]:
                        sums[k] = streamed[k] = None
            losses = list(screening)
            if "rest" in rounds:
                ranked = sorted((e, k) for k, e in enumerate(screening) if math.isfinite(e))
                finalists = {k for _, k in ranked[:FINALISTS]}
                for k in range(len(candidates)):
                    if k not in finalists:
                        losses[k] = math.nan
                        continue
                    with materialised(converted.model.layers[i], streamed[k], device) as candidate:
                        _moment_sum(candidate, selected["rest"], kw["rest"], targets["rest"], queries["rest"], sums[k])
                    losses[k] = refitted_error(sums[k].moments(), o_weights[k], settings.damping)
            del selected, targets, queries, streamed, o_weights, sums
            trim_heap()  # what the choice freed goes back before the forward allocates: the two peaks do not stack
            best = min(range(len(candidates)), key=lambda k: (losses[k] if math.isfinite(losses[k]) else math.inf, k))
            clock("choice")
            # the winner's factors as it was scored (from the layer's Gram: the whitened SVD's latent to rounding),
            # with its error table; the original layer then runs over the stream and the winner's heads on the
            # refit rows are summed into the refit's moments as it reaches them
            latent, row, state = attention_state(candidates[best], shared, errors=True)
            del shared
            last = i == config.num_hidden_layers - 1  # its outputs are needed only on the drift figure's windows
            clock("refit")
            with materialised(converted.model.layers[i], _cast(state, stream_dtype), device) as fitted:
                o_proj = fitted.self_attn.o_proj
                total = MomentSum(o_proj.in_features, o_proj.out_features, o_proj.bias, o_proj.weight.device,
                                  MOMENT_DTYPE)
                refitting = _forward_refitting(layer, hidden, kw_main, refit_positions, fitted, kw_refit, total,
                                               replay=replay, whole=not last)
            drift_positions = [position[w] for w in picks.drift]
            reference = [layer_output(layer(h, **k)) for h, k in
                         zip(_gather(hidden, drift_positions, bs), kw_drift_original)] if last else None
        clock("forward", refit=refitting)
        outputs = total.moments()
        del total
        before = state["self_attn.o_proj.weight"]
        weight = refit_output_weight(outputs, before, settings.damping).cpu()
        row.update(o_error=output_refit_error(outputs, before), o_refit_error=output_refit_error(outputs, weight),
                   choice_error=losses[best])
        latent = dataclasses.replace(latent, o_weight=weight)
        clock("refit")
        with materialised(converted.model.layers[i], _cast(latent_layer_state(source, latent), stream_dtype),
                          device) as fitted:
            drift_stream = [layer_output(fitted(h, **k)) for h, k in zip(drift_stream, kw_drift)]
        if reference is None:
            reference = _gather(hidden, drift_positions, bs)
        row["drift"] = _relative_error(drift_stream, reference)
        del reference
        clock("drift")
        latents.append(latent)
        rows.append(row)
        chosen.append(names[best])
        errors.append({n: _significant(e) for n, e in zip(names, losses) if math.isfinite(e)})
        screened.append({n: _significant(e) for n, e in zip(names, screening) if math.isfinite(e)}
                        if "rest" in rounds else {})
        bar.update(1)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t):,.0f} tok/s, {names[best]}")
        if i + 1 < config.num_hidden_layers and progress.due():
            progress.save(i + 1, moments, abs_means, count, latents,
                          {"rows": rows, "chosen": chosen, "errors": errors, "screened": screened, "spent": spent},
                          {"hidden": hidden, "drift": drift_stream})
    bar.close()
    progress.remove()
    if collect:
        stats = CalibrationStats(moments, abs_means, count, dict(meta or {}))
    tally = {n: chosen.count(n) for n in names if n in chosen}
    logger.info("objective per layer by attention-output error on %d windows: %s", len(picks.selection), tally)
    logger.info("one pass over %d windows, seconds by step: %s; peak memory by step (MB): %s", len(picks.main),
                {k: round(v, 1) for k, v in spent.items()}, {k: round(v) for k, v in peaks.items()})
    fields = {"ranks": ranks, "layers": rows,
              "objective_choice": {"per_layer": chosen, "layers_by_candidate": tally, "attention_error": errors,
                                   "windows": len(picks.selection),
                                   # two rounds: each candidate's error on the screening windows, per layer
                                   "screening": {"windows": len(picks.screen), "finalists": FINALISTS,
                                                 "attention_error": screened} if picks.rest else None},
              "single_pass": {"windows": len(picks.main), "statistics_collected": collect,
                              "seconds_by_step": {k: round(v, 3) for k, v in spent.items()},
                              "peak_rss_mb_by_step": peaks}}
    return SinglePass(stats, latents, fields)


class _Clock:
    """``clock(step)`` adds the seconds since its last call to ``spent[step]`` and raises ``peaks[step]`` to the
    largest resident set size `rss` saw since then (MB)."""

    def __init__(self, spent: dict[str, float], peaks: dict[str, float], rss: RssSampler):
        self.spent, self.peaks, self.rss, self.last = spent, peaks, rss, time.perf_counter()

    def __call__(self, step: str, **within: float) -> None:
        """`within`: seconds of other steps that ran inside this one (``statistics=2.0``), counted there."""
        now = time.perf_counter()
        self.spent[step] += now - self.last - sum(within.values())
        for other, seconds in within.items():
            self.spent[other] += seconds
        self.peaks[step] = max(self.peaks.get(step, 0.0), round(self.rss.take(), 1))
        self.last = now


def _same_query(state: dict[str, torch.Tensor], q_proj: dict[str, torch.Tensor]) -> bool:
    """Whether converted layer `state` keeps the original ``q_proj`` tensors `q_proj` bit for bit."""
    return all(torch.equal(state[f"self_attn.q_proj.{k}"], v) for k, v in q_proj.items())


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in state.items()}


def single_pass_stream(config, reader, done: SinglePass, dtype: torch.dtype) -> ConvertedStream:
    """The latent model's stream of what `single_pass` fitted (what `layerwise.write_model` writes)."""
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
    from care_mla.pipeline.layerwise import layer_prefix

    target = CareMlaConfig.from_base(config, kv_latent="joint", kv_lora_ranks=done.fields["ranks"])
    fields = {k: v for k, v in done.fields.items() if k != "objective_choice"}  # the choice is reported apart
    return ConvertedStream(CareMlaForCausalLM, target, lambda name: reader.get(name, dtype),
                           lambda i: latent_layer_state(reader.state(layer_prefix(i), dtype), done.latents[i]), fields)


def calibrate_and_fit(source: ModelSource, settings: ConvertSettings, dtype: torch.dtype,
                      device: torch.device) -> SinglePass:
    """Stages 2–4 of `convert` in one pass (`single_pass`) over `source`: the statistics come from the cache when
    this calibration was made before (then only the windows of the choice and the refit run), else they are
    collected on the way and cached, as `calibration.calibrate` does."""
    stream_dtype, hardware = calib_dtype(settings, source.config, device, dtype)
    store = StatisticsCache.of(source.path, settings, stream_dtype)
    cached = store.load()
    done = single_pass(source.config, source.reader, calibration_windows(source.tokenizer, settings), settings,
                       dtype=dtype, stream_dtype=stream_dtype, device=device, stats=cached, meta=store.meta,
                       resume=store.path.with_name(store.path.stem + ".pass.partial.safetensors"))
    if cached is None:
        store.save(done.stats)
    record_hardware(done.stats, hardware, stream_dtype, settings)
    return done
