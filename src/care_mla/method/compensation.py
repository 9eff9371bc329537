"""Error compensation across layers (GPTQ's "true sequential"): factorize layer l on the inputs the *converted*
layers < l produce, to reproduce the *original* layer's K/V outputs.

Two hidden-state streams run through the model one decoder layer at a time: the original one (the original
layers) and the converted one (each layer converted as soon as its factors are known). For layer l, with
X the original stream's attention inputs and X̃ the converted one's, the statistics are ``C̃ = X̃ᵀX̃/N`` and
the cross moment ``X̃ᵀX/N``; `factorization.care_factorize(cross=)` / `joint_factorize(cross=)` then fit
``X̃Ŵ ≈ XW`` in closed form — the error upstream layers left in X̃ is corrected where it can be. With an
exact upstream (X̃ = X) this is plain CARE. Cost: one forward pass of each stream per layer, i.e. about
twice a calibration; memory: the two streams' hidden states (2 × samples × length × hidden) and one layer.

Output refit (`refit_output_weight`): the query and output projections are not cached, so they are free to
change. With ``refit_output`` each layer's ``o_proj`` becomes the damped least-squares map from the converted
attention's heads ô (its ``o_proj`` input) to what the original attention writes, y, on the same converted
inputs: ``W' = argmin E‖ô W'ᵀ − y‖² + λ‖W' − W_o‖²``. V's error reaches the residual stream only through
``o_proj``, and K's error changes which values are mixed; both are corrected where a linear map can. The
statistics are E[ôôᵀ] and E[ôyᵀ] (h_q·d_v squared and h_q·d_v × D numbers), never the activations; it costs
one more forward of the original and of the converted attention per layer (each stops at ``o_proj``). An exact
conversion (ô = the original heads) gives W' = W_o.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from care_mla.pipeline.calibration import _layer_output, _materialised, capture_layer_inputs

logger = logging.getLogger(__name__)

__all__ = ["OutputMoments", "output_moments", "output_refit_error", "refit_output_weight", "sequential_moments"]

#: (layer index, C̃ (D, D) float64, cross X̃ᵀX/N (D, D) float64) → the converted layer's tensors (names relative
#: to the layer), after whatever bookkeeping the caller does with its factors.
ConvertLayer = Callable[[int, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


#: (layer index, the layer's `OutputMoments`, the converted layer's tensors) → the tensors to stream (with its
#: ``o_proj`` refitted), after whatever bookkeeping the caller does.
RefitOutput = Callable[[int, "OutputMoments", dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class OutputMoments:
    """Streamed statistics of an output refit over N tokens: ``heads = E[ô ôᵀ]`` (m, m), ``cross = E[ô yᵀ]``
    (m, D) and ``energy = E‖y‖²``, with ô the converted attention's ``o_proj`` input and y the target output."""

    heads: torch.Tensor
    cross: torch.Tensor
    energy: float


def refit_output_weight(moments: OutputMoments, weight: torch.Tensor, damping: float) -> torch.Tensor:
    """``W' = argmin E‖ô W'ᵀ − y‖² + λ‖W' − W‖²`` = ``((E[ôôᵀ] + λI)⁻¹(E[ôyᵀ] + λWᵀ))ᵀ``, λ = damping × the mean
    of diag E[ôôᵀ]: the ridge pulls towards the original ``weight`` (D, m), not towards zero, so directions the
    calibration does not excite keep their weights. float64, same shape as ``weight``."""
    A, B = moments.heads.double(), moments.cross.double()
    W = weight.to(device=A.device, dtype=torch.float64)
    if A.shape != (W.shape[1], W.shape[1]) or B.shape != (W.shape[1], W.shape[0]):
        raise ValueError(f"output moments {tuple(A.shape)}, {tuple(B.shape)} do not fit o_proj {tuple(W.shape)}")
    lam = damping * float(torch.diagonal(A).mean())
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A + lam * eye, B + lam * W.T).T.contiguous()


def output_refit_error(moments: OutputMoments, weight: torch.Tensor) -> float:
    """``E‖ô Wᵀ − y‖² / E‖y‖²`` from the moments: the relative error of the layer's attention output under
    ``weight``."""
    W = weight.to(device=moments.heads.device, dtype=torch.float64)
    err = torch.trace(W @ moments.heads.double() @ W.T) - 2 * torch.trace(W @ moments.cross.double()) + moments.energy
    return max(float(err), 0.0) / max(moments.energy, 1e-30)


def _stream(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    return [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


class _Stop(Exception):
    """Raised by a hook once the attention output is caught: the layer's MLP need not run."""


@torch.no_grad()
def output_moments(original: nn.Module, converted: nn.Module, hidden: list[torch.Tensor], original_kwargs: list[dict],
                   converted_kwargs: list[dict]) -> OutputMoments:
    """`OutputMoments` of two decoder layers run on the same inputs `hidden` (each with its own architecture's
    keyword arguments): y is the `original` layer's attention output less the `converted` ``o_proj``'s bias, ô
    the `converted` ``o_proj``'s input. Each layer stops after its ``o_proj``."""
    caught: dict[str, torch.Tensor] = {}

    def output(_module, _args, out):
        caught["y"] = out
        raise _Stop

    def heads(_module, args):
        caught["heads"] = args[0]
        raise _Stop

    o_conv = converted.self_attn.o_proj
    bias = o_conv.bias
    m, D = o_conv.in_features, o_conv.out_features
    A = torch.zeros(m, m, dtype=torch.float64, device=o_conv.weight.device)
    B = torch.zeros(m, D, dtype=torch.float64, device=A.device)
    energy, count = 0.0, 0
    handles = [original.self_attn.o_proj.register_forward_hook(output), o_conv.register_forward_pre_hook(heads)]
    try:
        for h, kw_o, kw_c in zip(hidden, original_kwargs, converted_kwargs):
            for layer, kw in ((original, kw_o), (converted, kw_c)):
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
            x = caught["heads"].reshape(-1, m).double()
            y = caught["y"].reshape(-1, D).double()
            if bias is not None:
                y = y - bias.double()
            A += x.T @ x
            B += x.T @ y
            energy += float(y.pow(2).sum())
            count += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return OutputMoments(A / count, B / count, energy / count)


@torch.no_grad()
def sequential_moments(original: nn.Module, converted: nn.Module, original_layer: Callable[[int], dict],
                       convert_layer: ConvertLayer, input_ids: torch.Tensor, *, embedding: torch.Tensor,
                       dtype: torch.dtype, device: torch.device, batch_size: int = 8,
                       refit_output: RefitOutput | None = None, progress: bool = True) -> list[float]:
    """Run the two streams over `input_ids` (N, T), converting layer after layer; returns, per layer, the drift
    of the converted stream after it, ``Σ‖h̃ − h‖² / Σ‖h‖²`` over the calibration tokens.

    `original` and `converted` are skeletons (meta-device decoder layers, RoPE tables on `device`) of the
    original and the converted architecture; ``original_layer(i)`` gives the original layer i's tensors and
    ``convert_layer(i, C̃, cross)`` the converted one's, made from the compensated statistics. With
    ``refit_output`` the converted layer's tensors are then passed, with the `OutputMoments` of it and of the
    original layer on the converted stream, to ``refit_output(i, moments, state)``, and what it returns is
    streamed.
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
            if refit_output is not None:
                with _materialised(converted.model.layers[i], {k: v.to(dtype) for k, v in state.items()},
                                   device) as converted_layer:
                    outputs = output_moments(layer, converted_layer, h_conv, kw_orig, kw_conv)
                state = refit_output(i, outputs, state)
            h_orig = _stream(layer, h_orig, kw_orig)
        with _materialised(converted.model.layers[i], {k: v.to(dtype) for k, v in state.items()}, device) as layer:
            h_conv = _stream(layer, h_conv, kw_conv)
        error = sum(float((hc.float() - ho.float()).pow(2).sum()) for hc, ho in zip(h_conv, h_orig))
        drift.append(error / max(sum(float(ho.float().pow(2).sum()) for ho in h_orig), 1e-30))
        bar.set_postfix_str(f"{time.perf_counter() - t:.1f} s/layer, drift {drift[-1]:.3g}")
    return drift
