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

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from care_mla.pipeline.calibration import _layer_output, _materialised, capture_layer_inputs
from care_mla.pipeline.layerwise import skeleton

logger = logging.getLogger(__name__)

__all__ = ["SELECTION_WINDOWS", "KEY_EMPHASIS_GRID", "OBJECTIVE_CHOICES", "ROPE_SHARES", "streamed_losses", "best"]

#: Calibration windows (evenly spaced over the calibration set) that candidates are scored on.
SELECTION_WINDOWS = 16
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
                    device: torch.device, batch_size: int = 8) -> list[float]:
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
    for i in range(len(inner.layers)):
        for c, (model, (_, state)) in enumerate(zip(models, candidates)):
            layer = model.model.layers[i]
            with _materialised(layer, {k: v.to(dtype) for k, v in state(i).items()}, device):
                streams[c] = [_layer_output(layer(h, **kw)) for h, kw in zip(streams[c], kwargs[c])]
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


def best(values: Sequence, losses: Sequence[float], what: str) -> tuple[object, dict]:
    """(the value with the lowest finite loss, a report of every tried value and its loss); the first on ties."""
    finite = [(loss, k) for k, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise ValueError(f"every candidate {what} gave a non-finite calibration loss: {list(zip(values, losses))}")
    k = min(finite)[1]
    table = {str(v): round(loss, 6) for v, loss in zip(values, losses)}
    logger.info("%s by calibration loss: %s (tried %s)", what, values[k], table)
    return values[k], {"chosen": values[k], "calibration_loss": table}
