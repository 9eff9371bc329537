"""Layer by layer: convert a model that is never in memory whole.

The original architecture is built on the meta device (a module tree without storage); the
embedding and RoPE tables are materialised for calibration's first step, then every decoder
layer is read from the memory-mapped safetensors for its calibration pass and released
(`collect_statistics(layer_weights=...)`), the calibration hidden states carried from layer to
layer. The rank plan reads K/V weights one layer at a time, and `write_model` reads a layer,
converts it (latent factors, or the decoupled / DeepSeek layout) and streams its tensors to their
shard file one by one.

Peak memory: one decoder layer, the calibration hidden states, the per-layer statistics
(D² each), the embedding (first step) and the tensors of one layer being written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from care_mla.formats.moe import accept_checkpoint_names, checkpoint_entries, checkpoint_layer_state, checkpoint_layout
from care_mla.formats.transformers_api import model_class_for
from care_mla.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, ShardWriter
from care_mla.method.statistics import CalibrationStats
from care_mla.pipeline.calibration import collect_statistics


def skeleton(config, device: torch.device | str = "cpu", model_class: type[nn.Module] | None = None) -> nn.Module:
    """The architecture of `config` (``model_class(config)``, by default the Auto class's) on the meta device, its
    RoPE tables (computed, not stored) on `device`; its layers also load the checkpoint's per-expert names of a
    mixture-of-experts model (`moe.accept_checkpoint_names`)."""
    model_class = model_class_for(config, model_class)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config) if model_class is None else model_class(config)
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    return accept_checkpoint_names(model).eval()


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class PlacementError(ValueError):
    """One decoder layer does not fit the memory given to the devices; the message names the fix."""


def layer_placement(config, max_memory: dict[int | str, int | str], dtype: torch.dtype) -> dict[str, int | str] | None:
    """Where one decoder layer's submodules go within `max_memory` (accelerate's ``{0: "20GiB", 1: ..., "cpu": ...}``),
    filled in that order by `accelerate.infer_auto_device_map`; None when the whole layer fits the first device.

    Every decoder layer of the supported families has the same shapes, so one placement serves all
    of them. The budgets are for the layer's weights: leave room on the first device for the
    calibration hidden states (samples × length × hidden size in the calibration dtype).
    """
    from accelerate import infer_auto_device_map

    with torch.device("meta"):
        layer = AutoModelForCausalLM.from_config(config).model.layers[0].to(dtype)
    placement = dict(infer_auto_device_map(layer, max_memory=max_memory, dtype=dtype, no_split_module_classes=[]))
    if "disk" in placement.values() or not placement:
        need = sum(p.numel() for p in layer.parameters()) * dtype.itemsize
        raise PlacementError(f"one decoder layer ({need / 2**20:,.0f} MiB in {dtype}) does not fit --max-memory "
                             f"{max_memory}: raise the budgets or add \"cpu\" (its submodules then run on the GPU, "
                             "their weights streamed from RAM)")
    devices = list(dict.fromkeys(placement.values()))
    return None if len(devices) == 1 and devices[0] == next(iter(max_memory)) else placement


def collect_statistics_layerwise(
    reader: CheckpointReader, config, input_ids: torch.Tensor, *, dtype: torch.dtype, device: torch.device,
    batch_size: int = 8, progress: bool = True, meta: dict | None = None,
    max_memory: dict[int | str, int | str] | None = None, resume: Path | None = None,
) -> CalibrationStats:
    """`collect_statistics` over the checkpoint of `reader`, one decoder layer in memory (in `dtype`) at a time,
    on `device`, or spread over the devices of `max_memory` when it does not fit the first (`layer_placement`)."""
    placement = layer_placement(config, max_memory, dtype) if max_memory else None
    model = skeleton(config, device)
    embed = model.model.embed_tokens
    embed.load_state_dict({"weight": reader.get("model.embed_tokens.weight", dtype).to(device)}, assign=True)
    stats = collect_statistics(
        model, input_ids, batch_size=batch_size, progress=progress, meta=meta,
        layer_weights=lambda i: reader.state(layer_prefix(i), dtype), layer_placement=placement, resume=resume,
    )
    del model, embed
    return stats


def kv_weights_reader(reader: CheckpointReader, dtype: torch.dtype) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Layer index → (W_k, W_v) as ``(D, m)`` float32, rounded through `dtype` exactly as a model loaded in it holds them."""

    def kv_weights(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = layer_prefix(i) + "self_attn."
        return tuple(reader.get(p + f"{b}_proj.weight", dtype).T.float() for b in ("k", "v"))

    return kv_weights


def qo_weights_reader(reader: CheckpointReader, dtype: torch.dtype) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Layer index → (W_q (D, n·d), W_o (n·d, D)) float32, rounded through `dtype` like `kv_weights_reader`."""

    def qo_weights(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = layer_prefix(i) + "self_attn."
        return tuple(reader.get(p + f"{b}_proj.weight", dtype).T.float() for b in ("q", "o"))

    return qo_weights


class LayerMemo:
    """A `CheckpointReader` that keeps what it read of the decoder layer read last: candidates of a choice
    (`convert.choose_settings_layerwise`) read the same layer one after another, from disk once.

    Tensors outside the decoder layers are read through; every result is a copy the caller owns.
    """

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self._layer: str | None = None
        self._kept: dict = {}

    def __getattr__(self, name: str):
        return getattr(self.reader, name)

    def _cached(self, name: str, dtype, read: Callable):
        parts = name.split(".")
        if name.startswith("model.layers.") and len(parts) > 2:
            layer = parts[2]
            if layer != self._layer:
                self._layer, self._kept = layer, {}
            if (name, dtype) not in self._kept:
                self._kept[(name, dtype)] = read()
            return self._kept[(name, dtype)]
        return read()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._cached(name, dtype, lambda: self.reader.get(name, dtype)).clone()

    def state(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        kept = self._cached(prefix, dtype, lambda: self.reader.state(prefix, dtype))
        return {k: v.clone() for k, v in kept.items()}


def save_config(folder: Path, config, generation_config: GenerationConfig | None, architecture: str,
                dtype: torch.dtype) -> None:
    """config.json (and generation_config.json) as `save_pretrained` writes them for a model of `architecture`."""
    config.architectures = [architecture]
    config.dtype = dtype
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def weight_plan(config, state: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> list:
    """The ``(name, shape, dtype)`` of every tensor to write, in order; a tied ``lm_head.weight`` is not stored."""
    tied = getattr(config, "tie_word_embeddings", False)
    return [(n, tuple(shape), dt) for n, shape, dt in state if not (tied and n == "lm_head.weight")]


def save_model(folder: Path, model: nn.Module, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write an in-memory converted model exactly as `write_model` streams one (same files, same bytes)."""
    dtype = next(model.parameters()).dtype
    save_config(folder, model.config, model.generation_config, type(model).__name__, dtype)
    state = checkpoint_entries(model.config, model.state_dict())
    plan = weight_plan(model.config, ((k, v.shape, v.dtype) for k, v in state.items()))
    writer = ShardWriter(folder, plan, max_shard_bytes)
    for name, _, _ in plan:
        writer.add(name, state[name].detach())
    writer.close()


def write_model(
    folder: Path, model_class: type[nn.Module], config, *, tensor: Callable[[str], torch.Tensor],
    layer: Callable[[int], dict[str, torch.Tensor]], dtype: torch.dtype,
    generation_config: GenerationConfig | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> list[str]:
    """Stream the weights of ``model_class(config)`` to `folder`, each cast to `dtype`, never holding more than one
    decoder layer: ``layer(i)`` gives layer i's tensors (names relative to the layer; called once per layer, in
    order), ``tensor(name)`` every other tensor. Returns the weight files. Experts are written one tensor each,
    the checkpoint names ``save_pretrained`` writes (`moe.checkpoint_layer_state`; ``layer(i)`` may give either).
    """
    model_class = model_class_for(config, model_class)
    save_config(folder, config, generation_config, model_class.__name__, dtype)
    with torch.device("meta"):
        target = model_class(config)
    entries = checkpoint_entries(config, target.state_dict())  # per-expert names, as save_pretrained writes them
    plan = weight_plan(config, ((k, v.shape, dtype) for k, v in entries.items()))
    del target
    moe = checkpoint_layout(config)
    bar = tqdm(total=config.num_hidden_layers, desc="factorizing and writing", unit="layer", disable=not progress)

    writer = ShardWriter(folder, plan, max_shard_bytes)
    current, state, started = -1, {}, time.perf_counter()
    try:
        for name, _, _ in plan:
            if name.startswith("model.layers."):
                i = int(name.split(".")[2])
                if i != current:
                    if state:
                        raise RuntimeError(f"layer {current} made tensors the model has no place for: {sorted(state)}")
                    bar.update(current >= 0)
                    current, state = i, checkpoint_layer_state(moe, layer(i))
                t = state.pop(name[len(layer_prefix(i)):])
            else:
                t = tensor(name)
            writer.add(name, t.to(dtype))
            del t
        if state:
            raise RuntimeError(f"layer {current} made tensors the model has no place for: {sorted(state)}")
        bar.update(1)
        bar.set_postfix_str(f"{time.perf_counter() - started:.1f} s")
        return writer.close()
    finally:
        bar.close()

