"""The layer-sequential pass of error compensation and output refit: two hidden-state streams (original and
converted), one decoder layer at a time; each layer is fitted on the converted stream as soon as the layers before
it are converted (the maths: `care_mla.method.compensation` and `care_mla.method.factorization`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.mapping import LayerLatent, decoupled_config
from care_mla.io.checkpoint import CheckpointReader
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.method import decoupled
from care_mla.method.compensation import OutputMoments
from care_mla.method.statistics import CalibrationStats, gram
from care_mla.pipeline.calibration import capture_layer_inputs, layer_output, materialised
from care_mla.pipeline.plan import KvWeights, QoWeights, decoupled_layer, layer_latent
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)


#: (layer index, C̃ (D, D) float64, cross X̃ᵀX/N (D, D) float64) → the converted layer's tensors (names relative
#: to the layer), after whatever bookkeeping the caller does with its factors.
ConvertLayer = Callable[[int, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


#: (layer index, the layer's `OutputMoments`, the converted layer's tensors) → the tensors to stream (with its
#: ``o_proj`` refitted), after whatever bookkeeping the caller does.
RefitOutput = Callable[[int, "OutputMoments", dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _stream(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    return [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


#: Windows of the original stream that the drift of the converted stream is measured on when nothing else needs
#: that stream (no compensation): the drift is a diagnostic, and the original stream over every window would cost
#: a whole forward pass.
DRIFT_WINDOWS = 8


class _Stop(Exception):
    """Raised by a hook once the attention output is caught: the layer's MLP need not run."""


class MomentSum:
    """`OutputMoments` summed batch by batch into float64 totals: ô the converted attention's ``o_proj`` input (m
    wide), y the target output (D wide) less the converted ``o_proj``'s `bias`. Each batch's products are
    computed (`statistics.gram`) in `dtype`: float64 by default; float32 (as `statistics.SecondMoment` does)
    halves the time on a CPU, each batch's sum then rounded to ~1e-7 relative, far below the refit's ridge (1e-2
    of the mean diagonal)."""

    def __init__(self, m: int, D: int, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype = torch.float64):
        self.m, self.D, self.bias, self.dtype = m, D, bias, dtype
        self.AB = torch.zeros(m, m + D, dtype=torch.float64, device=device)  # [Σ ôôᵀ | Σ ôyᵀ]
        self.energy, self.count = 0.0, 0

    def add(self, heads: torch.Tensor, y: torch.Tensor) -> None:
        x = heads.reshape(-1, self.m).to(self.dtype)
        y = y.reshape(-1, self.D).to(self.dtype)
        if self.bias is not None:
            y = y - self.bias.to(self.dtype)
        self.AB += gram(x, right=y).double()  # [Σ ôôᵀ (upper block triangle, mirrored) | Σ ôyᵀ]
        self.energy += float(y.pow(2).sum(dtype=torch.float64))
        self.count += x.shape[0]

    def moments(self) -> OutputMoments:
        AB = self.AB / self.count
        return OutputMoments(AB[:, : self.m].contiguous(), AB[:, self.m :].contiguous(), self.energy / self.count)


def _catching(layer: nn.Module, caught: dict, what: str):
    """Hook on `layer`'s ``o_proj`` that catches its input (``what="heads"``) or output (``"output"``) into
    ``caught[what]`` and stops the layer there."""
    o_proj = layer.self_attn.o_proj

    def heads(_module, args):
        caught["heads"] = args[0]
        raise _Stop

    def output(_module, _args, out):
        caught["output"] = out
        raise _Stop

    return o_proj.register_forward_pre_hook(heads) if what == "heads" else o_proj.register_forward_hook(output)


@torch.no_grad()
def attention_parts(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
                    what: str = "output") -> list[torch.Tensor]:
    """Decoder `layer`'s attention output (after ``o_proj``; ``what="heads"``: ``o_proj``'s input) on each batch
    of `hidden`; the layer stops there (its MLP never runs)."""
    caught: dict[str, torch.Tensor] = {}
    out = []
    handle = _catching(layer, caught, what)
    try:
        for h, kw in zip(hidden, kwargs):
            try:
                layer(h, **kw)
            except _Stop:
                pass
            out.append(caught.pop(what))
    finally:
        handle.remove()
    return out


@torch.no_grad()
def output_moments(original: nn.Module, converted: nn.Module, hidden: list[torch.Tensor], original_kwargs: list[dict],
                   converted_kwargs: list[dict], heads: list[torch.Tensor] | None = None) -> OutputMoments:
    """`OutputMoments` of two decoder layers run on the same inputs `hidden` (each with its own architecture's
    keyword arguments): y is the `original` layer's attention output less the `converted` ``o_proj``'s bias, ô
    the `converted` ``o_proj``'s input. Each layer stops after its ``o_proj``. With a list `heads`, each batch's
    ô is appended to it (`_attention_from_heads` finishes the converted layer from them)."""
    o_conv = converted.self_attn.o_proj
    total = MomentSum(o_conv.in_features, o_conv.out_features, o_conv.bias, o_conv.weight.device)
    for h, kw_o, kw_c in zip(hidden, original_kwargs, converted_kwargs):
        (y,) = attention_parts(original, [h], [kw_o], "output")
        (x,) = attention_parts(converted, [h], [kw_c], "heads")
        if heads is not None:
            heads.append(x)
        total.add(x, y)
    return total.moments()


@contextmanager
def _attention_from_heads(layer: nn.Module, heads: list[torch.Tensor]):
    """`layer` whose attention, called once per batch in order, returns ``o_proj`` of that batch's `heads` (its
    own ``o_proj``: a refitted weight applies) instead of recomputing them — the heads `output_moments` caught
    on the same inputs, so the layer's output is the same tensor a full forward computes."""
    attention = layer.self_attn
    batches = iter(heads)
    attention.forward = lambda *args, **kwargs: (attention.o_proj(next(batches)), None)
    try:
        yield layer
    finally:
        del attention.forward


@torch.no_grad()
def sequential_moments(original: nn.Module, converted: nn.Module, original_layer: Callable[[int], dict],
                       convert_layer: ConvertLayer, input_ids: torch.Tensor, *, embedding: torch.Tensor,
                       dtype: torch.dtype, device: torch.device, batch_size: int = 8, compensate: bool = True,
                       refit_output: RefitOutput | None = None, progress: bool = True,
                       desc: str = "fitting layers on the converted stream") -> list[float]:
    """Run the converted stream over `input_ids` (N, T), converting layer after layer; returns, per layer, the
    drift of the converted stream after it, ``Σ‖h̃ − h‖² / Σ‖h‖²`` (over every window with `compensate`, else
    over the first `DRIFT_WINDOWS`).

    `original` and `converted` are skeletons (meta-device decoder layers, RoPE tables on `device`) of the
    original and the converted architecture; ``original_layer(i)`` gives the original layer i's tensors and
    ``convert_layer(i, C̃, cross)`` the converted one's, made from the compensated statistics — with
    `compensate`, which runs the original stream over every window beside the converted one; without it
    ``convert_layer(i, None, None)``. With ``refit_output`` the converted layer's tensors are then passed, with
    the `OutputMoments` of it and of the original layer's attention on the converted stream, to
    ``refit_output(i, moments, state)``, and what it returns is streamed — the converted attention's heads are
    computed once per layer for both (`_attention_from_heads`).
    """
    streams = []
    for model in (original, converted):  # each architecture's own RoPE tables and mask
        embed = model.model.embed_tokens
        embed.to_empty(device=device)
        embed.load_state_dict({"weight": embedding.to(device=device, dtype=dtype)}, assign=True)
        streams.append(capture_layer_inputs(model, input_ids, batch_size))
        embed.to("meta")
    (h_orig, kw_orig), (h_conv, kw_conv) = streams
    if not compensate:  # the original layers' arguments serve every batch (the refit's targets), their stream a few
        h_orig = h_orig[: -(-DRIFT_WINDOWS // batch_size)]
    layers = len(original.model.layers)
    bar = tqdm(range(layers), desc=desc, unit="layer", disable=not progress)
    drift = []
    for i in bar:
        t = time.perf_counter()
        heads: list[torch.Tensor] | None = None
        with materialised(original.model.layers[i], {k: v.to(dtype) for k, v in original_layer(i).items()},
                           device) as layer:
            if compensate:
                moment, cross = _input_moments(layer.input_layernorm, h_orig, h_conv, device)
                state = convert_layer(i, moment, cross)
            else:
                state = convert_layer(i, None, None)
            if refit_output is not None:
                heads = []
                with materialised(converted.model.layers[i], {k: v.to(dtype) for k, v in state.items()},
                                   device) as converted_layer:
                    outputs = output_moments(layer, converted_layer, h_conv, kw_orig, kw_conv, heads)
                state = refit_output(i, outputs, state)
            h_orig = _stream(layer, h_orig, kw_orig)
        with materialised(converted.model.layers[i], {k: v.to(dtype) for k, v in state.items()}, device) as layer:
            with _attention_from_heads(layer, heads) if heads is not None else nullcontext(layer):
                h_conv = _stream(layer, h_conv, kw_conv)
        del heads
        error = sum(float((hc.float() - ho.float()).pow(2).sum()) for hc, ho in zip(h_conv, h_orig))
        drift.append(error / max(sum(float(ho.float().pow(2).sum()) for ho in h_orig), 1e-30))
        bar.set_postfix_str(f"{time.perf_counter() - t:.1f} s/layer, drift {drift[-1]:.3g}")
    return drift


def _input_moments(norm: nn.Module, h_orig: list[torch.Tensor], h_conv: list[torch.Tensor],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C̃ = X̃ᵀX̃/N, X̃ᵀX/N) in float64 of a layer's attention inputs on the converted (X̃) and original (X) stream."""
    dim = norm.weight.shape[0]
    moment = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    cross = torch.zeros_like(moment)
    count = 0
    for ho, hc in zip(h_orig, h_conv):
        x = norm(ho).reshape(-1, dim).float()
        xc = norm(hc).reshape(-1, dim).float()
        moment += (xc.T @ xc).double()
        cross += (xc.T @ x).double()
        count += x.shape[0]
    return moment / count, cross / count


@dataclass(frozen=True)
class Compensation:
    """How error compensation runs its two hidden-state streams: over the calibration `windows` (N, T), in
    `dtype` on `device`."""

    windows: torch.Tensor
    dtype: torch.dtype
    device: torch.device


#: (layer index, (C̃, X̃ᵀX/N)) → (the layer's factors or layout, its table row, its converted tensors)
FitLayer = Callable[[int, tuple[torch.Tensor, torch.Tensor]], tuple[object, dict, dict[str, torch.Tensor]]]


def compensated_layers(config, target, model_class: type, fit: FitLayer, layer_state: Callable[[int], dict],
                       embedding: torch.Tensor, compensation: Compensation,
                       settings: ConvertSettings) -> tuple[list, list[dict]]:
    """Every layer made in turn while the converted stream runs (`compensation.sequential_moments`): the
    original stream runs `config`'s layers (tensors from `layer_state`), the converted one
    `model_class(target)`'s. With ``settings.compensate`` ``fit`` gets the compensated moments, else None
    (the plain factors); with ``settings.refit_output`` the layer's ``o_proj`` is then refitted
    (`compensation.refit_output_weight`) and set as the product's ``o_weight``. Returns each layer's product
    and table row, with the hidden-state drift after it (and the attention output's relative error before and
    after the refit)."""
    from care_mla.method.compensation import output_refit_error, refit_output_weight
    from care_mla.pipeline.layerwise import skeleton
    from care_mla.pipeline.sequential import sequential_moments

    products, rows = [], []

    def convert_layer(i: int, moment: torch.Tensor, cross: torch.Tensor) -> dict[str, torch.Tensor]:
        product, row, state = fit(i, (moment, cross) if settings.compensate else None)
        products.append(product)
        rows.append(row)
        return state

    def refit_output(i: int, outputs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        before = state["self_attn.o_proj.weight"]
        weight = refit_output_weight(outputs, before, settings.damping).cpu()
        rows[i]["o_error"] = output_refit_error(outputs, before)
        rows[i]["o_refit_error"] = output_refit_error(outputs, weight)
        products[i] = dataclasses.replace(products[i], o_weight=weight)
        return {**state, "self_attn.o_proj.weight": weight.to(before.dtype)}

    c = compensation
    drift = sequential_moments(skeleton(config, c.device), skeleton(target, c.device, model_class), layer_state,
                               convert_layer, c.windows, embedding=embedding, dtype=c.dtype, device=c.device,
                               batch_size=settings.batch_size, compensate=settings.compensate,
                               progress=settings.progress,
                               refit_output=refit_output if settings.refit_output else None,
                               desc="fitting layers on the converted stream (" + ", ".join(
                                   n for n, on in (("compensation", settings.compensate),
                                                   ("output refit", settings.refit_output)) if on) + ")")
    for row, d in zip(rows, drift):
        row["drift"] = d  # relative error of the converted hidden states after this layer
    return products, rows


def compensated_latents(config, ranks: list[list[int]], kv_weights: KvWeights, qo_weights: QoWeights,
                        layer_state: Callable[[int], dict], embedding: torch.Tensor, compensation: Compensation,
                        stats: CalibrationStats, settings: ConvertSettings) -> tuple[list[LayerLatent], list[dict]]:
    """Every layer's joint or separate latent factors (and table rows) at `ranks`, made on the converted stream
    (error compensation and/or output refit, as `settings` say)."""
    from care_mla.formats.mapping import latent_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM

    def fit(i: int, moments: tuple[torch.Tensor, torch.Tensor]):
        latent, row = layer_latent(i, ranks[i], kv_weights, stats, settings, qo_weights, config, moments=moments)
        return latent, row, latent_layer_state(layer_state(i), latent)

    target = CareMlaConfig.from_base(config, kv_latent=settings.latent, kv_lora_ranks=ranks)
    return compensated_layers(config, target, CareMlaForCausalLM, fit, layer_state, embedding, compensation, settings)


def compensated_layouts(config, split: decoupled.RopeSplit, ranks: list[int], layer_state: Callable[[int], dict],
                        embedding: torch.Tensor, compensation: Compensation, stats: CalibrationStats,
                        settings: ConvertSettings) -> tuple[list[decoupled.LayerLayout], list[dict]]:
    """Every layer's decoupled-RoPE layout (and table rows) at `ranks`, made on the converted stream (error
    compensation and/or output refit, as `settings` say), each kept without its query and output tensors but
    a refitted ``o_weight`` (complete it with `completed_layout`: they are copies of the source's, and all
    layers are fitted before any is written). The converted stream runs the decoupled latent model,
    which computes what the DeepSeek export does (without the export's residual scale), so one pass serves
    both formats."""
    from care_mla.formats.mapping import decoupled_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM

    def fit(i: int, moments: tuple[torch.Tensor, torch.Tensor]):
        e, row = decoupled_layer(split, i, ranks[i], stats, settings, moments=moments)
        state = decoupled_layer_state(layer_state(i), e, qk_rope_head_dim=split.qk_rope_head_dim,
                                      rope_attention_scaling=split.rope_scaling)
        return dataclasses.replace(e, q=None, o_weight=None, o_bias=None), row, state

    target = decoupled_config(config, split, ranks)
    return compensated_layers(config, target, CareMlaForCausalLM, fit, layer_state, embedding, compensation, settings)


def completed_layout(split: decoupled.RopeSplit, i: int, e: decoupled.LayerLayout) -> decoupled.LayerLayout:
    """A layout kept slim by `compensated_layouts` with its query and output tensors again (a refitted
    ``o_weight`` stays)."""
    tensors = decoupled.query_tensors(split, i)
    if e.o_weight is not None:
        del tensors["o_weight"]
    return dataclasses.replace(e, **tensors)


def streamed_compensation(reader: CheckpointReader, compensation: Compensation | None, dtype: torch.dtype):
    """(layer state, embedding, compensation) of a compensated stream read from the checkpoint: the layers in the
    conversion's `dtype`, as an in-memory model holds them (the streams cast them to the compensation's dtype;
    what is fitted against them, e.g. the refit's pull towards the original o_proj, sees the same numbers)."""
    from care_mla.pipeline.layerwise import layer_prefix

    if compensation is None:
        raise ValueError("error compensation needs the calibration windows, dtype and device (Compensation)")
    return (lambda i: reader.state(layer_prefix(i), dtype), reader.get("model.embed_tokens.weight"), compensation)
