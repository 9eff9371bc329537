"""The converted model, made from the plan: in memory (`build_converted`, what sweeps and tests use) or as a stream of
tensors one decoder layer at a time (`stream_converted`, what `convert` writes), the same numbers either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from care_mla.formats import deepseek
from care_mla.formats.configuration_care_mla import CareMlaConfig
from care_mla.formats.mapping import LayerLatent, build_decoupled_model, build_latent_model
from care_mla.io.checkpoint import CheckpointReader
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.method import decoupled
from care_mla.method.statistics import CalibrationStats
from care_mla.pipeline.calibration import calibration_windows
from care_mla.pipeline.load import ModelSource, calib_dtype
from care_mla.pipeline.plan import (
    SharedWeightings,
    decoupled_layer,
    decoupled_target,
    format_layer_table,
    layer_kv_weights,
    layer_latent,
    layer_qo_weights,
    plan_decoupled,
    plan_ranks,
)
from care_mla.pipeline.sequential import (
    Compensation,
    compensated_latents,
    compensated_layouts,
    completed_layout,
    streamed_compensation,
)
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)


def plan_latents(model, stats: CalibrationStats, settings: ConvertSettings,
                 windows: torch.Tensor | None = None) -> tuple[list[LayerLatent], list[dict]]:
    """Factors of every layer of an in-memory `model` at the budgeted ranks, and the per-layer table; with
    ``settings.sequential_fit``, made layer after layer on the calibration `windows` (`compensated_latents`)."""
    weights = [layer_kv_weights(layer) for layer in model.model.layers]
    qo = [layer_qo_weights(layer) for layer in model.model.layers]
    ranks = plan_ranks(model.config, weights.__getitem__, stats, settings, qo.__getitem__)
    if settings.sequential_fit:
        return compensated_latents(model.config, ranks, weights.__getitem__, qo.__getitem__,
                                   decoupled.module_layer_state(model), model.model.embed_tokens.weight.detach(),
                                   in_memory_compensation(model, windows, settings), stats, settings)
    planned = [layer_latent(i, r, weights.__getitem__, stats, settings, qo.__getitem__, model.config)
               for i, r in enumerate(ranks)]
    return [p[0] for p in planned], [p[1] for p in planned]


def in_memory_compensation(model, windows: torch.Tensor | None, settings: ConvertSettings) -> Compensation:
    """The two streams of an in-memory model run in the calibration's dtype, as the layer-by-layer path's do
    (so both write the same bytes)."""
    if windows is None:
        raise ValueError("error compensation and output refit run the calibration windows through the model: "
                         "pass them (windows=), or set compensate=False, refit_output=False")
    parameter = next(model.parameters())
    dtype = calib_dtype(settings, model.config, parameter.device, parameter.dtype)[0]
    return Compensation(sequential_windows(windows, settings), dtype, parameter.device)


def sequential_windows(windows: torch.Tensor, settings: ConvertSettings) -> torch.Tensor:
    """The calibration `windows` the converted stream runs over: all of them for compensation (its statistics are
    the calibration's), else (the output refit alone) ``settings.refit_samples`` of them, evenly spaced."""
    if settings.compensate or settings.refit_samples is None or settings.refit_samples >= windows.shape[0]:
        return windows
    picks = torch.linspace(0, windows.shape[0] - 1, settings.refit_samples).round().long()
    return windows[picks]


def build_converted(model, stats: CalibrationStats, settings: ConvertSettings,
                    windows: torch.Tensor | None = None) -> tuple[torch.nn.Module, dict]:
    """The converted model in the asked format, and the report fields that describe it (`windows`: the calibration
    windows, needed by error compensation and output refit)."""
    if settings.latent == "decoupled":
        split, ranks = plan_decoupled(model, stats, settings)
        _, fields = decoupled_target(model.config, split, ranks, settings)  # a DeepSeek budget is refused here
        if settings.sequential_fit:
            fitted, fields["layers"] = compensated_layouts(
                model.config, split, ranks, decoupled.module_layer_state(model),
                model.model.embed_tokens.weight.detach(), in_memory_compensation(model, windows, settings), stats,
                settings)
            layers = [completed_layout(split, i, e) for i, e in enumerate(fitted)]
        else:
            made = [decoupled_layer(split, i, r, stats, settings) for i, r in enumerate(ranks)]
            layers, fields["layers"] = [e for e, _ in made], [row for _, row in made]
        layout = decoupled.assemble_layout(split, layers)
        logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(fields["layers"]))
        if settings.format == "deepseek":
            return deepseek.layout_to_deepseek(model, split, layout, portable=settings.portable), fields
        return build_decoupled_model(model, layout), fields
    latents, table = plan_latents(model, stats, settings, windows)
    logger.info("per-layer ranks and relative activation errors:\n%s", format_layer_table(table))
    return build_latent_model(model, latents), {"ranks": [l.ranks for l in latents], "layers": table}


@dataclass
class ConvertedStream:
    """What `layerwise.write_model` streams: the converted model's class and config, its tensors outside the
    decoder layers by name, each layer's by index, and the report fields (the per-layer rows fill as it runs)."""

    model_class: type
    config: object
    tensor: Callable[[str], torch.Tensor]
    layer: Callable[[int], dict[str, torch.Tensor]]
    fields: dict
    split: decoupled.RopeSplit | None = None  # decoupled layouts: the shared RoPE plan


def latent_stream(config, reader: CheckpointReader, stats: CalibrationStats, settings: ConvertSettings,
                   dtype: torch.dtype, compensation: Compensation | None = None, *,
                   shared: SharedWeightings | None = None, errors: bool = True) -> ConvertedStream:
    """The latent model's stream; with ``settings.sequential_fit`` its factors are fitted first, layer after layer,
    as `compensation` says. A candidate of a choice passes the `shared` weightings of its fellow candidates and
    no `errors` (its per-layer table is never shown)."""
    from care_mla.formats.mapping import latent_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
    from care_mla.pipeline.layerwise import kv_weights_reader, layer_prefix, qo_weights_reader

    kv_weights = kv_weights_reader(reader, dtype)
    qo_weights = qo_weights_reader(reader, dtype)
    ranks = plan_ranks(config, kv_weights, stats, settings, qo_weights)
    fields = {"ranks": ranks, "layers": []}
    fitted = None
    if settings.sequential_fit:
        fitted, fields["layers"] = compensated_latents(
            config, ranks, kv_weights, qo_weights, *streamed_compensation(reader, compensation, dtype), stats, settings)

    def layer(i: int) -> dict[str, torch.Tensor]:
        if fitted is not None:
            return latent_layer_state(reader.state(layer_prefix(i), dtype), fitted[i])
        latent, row = layer_latent(i, ranks[i], kv_weights, stats, settings, qo_weights, config, shared=shared,
                                   errors=errors)
        fields["layers"].append(row)
        return latent_layer_state(reader.state(layer_prefix(i), dtype), latent)

    target = CareMlaConfig.from_base(config, kv_latent=settings.latent, kv_lora_ranks=ranks)
    return ConvertedStream(CareMlaForCausalLM, target, lambda name: reader.get(name, dtype), layer, fields)


def decoupled_stream(config, reader: CheckpointReader, stats: CalibrationStats, settings: ConvertSettings,
                      dtype: torch.dtype, split: decoupled.RopeSplit | None = None,
                      compensation: Compensation | None = None, *, shared: SharedWeightings | None = None,
                      errors: bool = True) -> ConvertedStream:
    """The decoupled-RoPE model's stream (care_mla or DeepSeek format); `split`: a RoPE plan already made (the
    candidates of a choice share it, and then what `shared` holds of each layer, and build no per-layer error
    table without `errors`); with ``settings.sequential_fit`` the layouts are fitted first, as `compensation`
    says."""
    from care_mla.formats.mapping import decoupled_layer_state
    from care_mla.formats.modeling_care_mla import CareMlaForCausalLM
    from care_mla.pipeline.layerwise import layer_prefix, skeleton

    def attention_state(i: int) -> dict[str, torch.Tensor]:  # the RoPE and rank plans read attention only
        return {"self_attn." + k: v for k, v in reader.state(layer_prefix(i) + "self_attn.", dtype).items()}

    split, ranks = plan_decoupled(skeleton(config), stats, settings, dtype=dtype, layer_state=attention_state,
                                  split=split)
    target, fields = decoupled_target(config, split, ranks, settings)
    fields["layers"] = []
    deepseek_format = settings.format == "deepseek"
    fitted = None
    if settings.sequential_fit:
        fitted, fields["layers"] = compensated_layouts(config, split, ranks,
                                                       *streamed_compensation(reader, compensation, dtype), stats, settings)

    def layer(i: int) -> dict[str, torch.Tensor]:
        if fitted is not None:
            e = completed_layout(split, i, fitted[i])
        else:
            e, row = decoupled_layer(split, i, ranks[i], stats, settings, shared=shared, errors=errors)
            fields["layers"].append(row)
        source = reader.state(layer_prefix(i), dtype)
        if deepseek_format:
            return deepseek.deepseek_layer_state(source, e, config, target)
        return decoupled_layer_state(source, e, qk_rope_head_dim=split.qk_rope_head_dim,
                                     rope_attention_scaling=split.rope_scaling)

    if deepseek_format:
        def tensor(name: str) -> torch.Tensor:
            return deepseek.deepseek_global_tensor(name, lambda n: reader.get(n, dtype), config, target)

        return ConvertedStream(deepseek.export_class(target), target, tensor, layer, fields, split)
    return ConvertedStream(CareMlaForCausalLM, target, lambda name: reader.get(name, dtype), layer, fields, split)


def stream_converted(source: ModelSource, stats: CalibrationStats, settings: ConvertSettings, dtype: torch.dtype,
                     device: torch.device) -> ConvertedStream:
    """Stages 4–5: the converted model of `source` as a stream of tensors in `dtype`, in `settings`' layout and
    format; with ``settings.sequential_fit`` every layer is fitted first on the converted stream (compensation
    and/or output refit), whose two hidden-state streams run in the calibration's dtype on `device`."""
    compensation = None
    if settings.sequential_fit:
        windows = sequential_windows(calibration_windows(source.tokenizer, settings), settings)
        compensation = Compensation(windows, calib_dtype(settings, source.config, device, dtype)[0], device)
    make = decoupled_stream if settings.latent == "decoupled" else latent_stream
    return make(source.config, source.reader, stats, settings, dtype, compensation=compensation)
