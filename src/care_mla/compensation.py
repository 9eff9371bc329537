"""Error compensation across layers (GPTQ's "true sequential"): factorize layer l on the inputs the *converted*
layers < l produce, to reproduce the *original* layer's K/V outputs.

Two hidden-state streams run through the model one decoder layer at a time: the original one (the original
layers) and the converted one (each layer converted as soon as its factors are known). For layer l, with
X the original stream's attention inputs and X̃ the converted one's, the statistics are ``C̃ = X̃ᵀX̃/N`` and
the cross moment ``X̃ᵀX/N``; `factorization.care_factorize(cross=)` / `joint_factorize(cross=)` then fit
``X̃Ŵ ≈ XW`` in closed form — the error upstream layers left in X̃ is corrected where it can be. With an
exact upstream (X̃ = X) this is plain CARE. Cost: one forward pass of each stream per layer, i.e. about
twice a calibration; memory: the two streams' hidden states (2 × samples × length × hidden) and one layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import _layer_output, _materialised, capture_layer_inputs

logger = logging.getLogger(__name__)

__all__ = ["sequential_moments"]

#: (layer index, C̃ (D, D) float64, cross X̃ᵀX/N (D, D) float64) → the converted layer's tensors (names relative
#: to the layer), after whatever bookkeeping the caller does with its factors.
ConvertLayer = Callable[[int, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _stream(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    return [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


@torch.no_grad()
def sequential_moments(original: nn.Module, converted: nn.Module, original_layer: Callable[[int], dict],
                       convert_layer: ConvertLayer, input_ids: torch.Tensor, *, embedding: torch.Tensor,
                       dtype: torch.dtype, device: torch.device, batch_size: int = 8,
                       progress: bool = True) -> list[float]:
    """Run the two streams over `input_ids` (N, T), converting layer after layer; returns, per layer, the drift
    of the converted stream after it, ``Σ‖h̃ − h‖² / Σ‖h‖²`` over the calibration tokens.

    `original` and `converted` are skeletons (meta-device decoder layers, RoPE tables on `device`) of the
    original and the converted architecture; ``original_layer(i)`` gives the original layer i's tensors and
    ``convert_layer(i, C̃, cross)`` the converted one's, made from the compensated statistics.
    """
    streams = []
    for model in (original, converted):  # each architecture's own RoPE tables and mask
        embed = model.model.embed_tokens
        embed.to_empty(device=device)
        embed.load_state_dict({"weight": embedding.to(device=device, dtype=dtype)}, assign=True)
        streams.append(capture_layer_inputs(model, input_ids, batch_size))
        embed.to("meta")
    (h_orig, kw_orig), (h_conv, kw_conv) = streams
    layers = len(original.model.layers)
    bar = tqdm(range(layers), desc="converting with compensation", unit="layer", disable=not progress)
    drift = []
    for i in bar:
        t = time.perf_counter()
        with _materialised(original.model.layers[i], {k: v.to(dtype) for k, v in original_layer(i).items()},
                           device) as layer:
            norm = layer.input_layernorm
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
            state = convert_layer(i, moment / count, cross / count)
            h_orig = _stream(layer, h_orig, kw_orig)
        with _materialised(converted.model.layers[i], {k: v.to(dtype) for k, v in state.items()}, device) as layer:
            h_conv = _stream(layer, h_conv, kw_conv)
        error = sum(float((hc.float() - ho.float()).pow(2).sum()) for hc, ho in zip(h_conv, h_orig))
        drift.append(error / max(sum(float(ho.float().pow(2).sum()) for ho in h_orig), 1e-30))
        bar.set_postfix_str(f"{time.perf_counter() - t:.1f} s/layer, drift {drift[-1]:.3g}")
    return drift
