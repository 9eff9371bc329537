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
one more forward of the original attention per layer (it stops at ``o_proj``): the converted layer's heads are
computed once and the layer finishes from them. An exact conversion (ô = the original heads) gives W' = W_o.

The maths lives here (the refit from the streamed moments); the two streams that collect them run in
`care_mla.pipeline.sequential`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OutputMoments:
    """Streamed statistics of an output refit over N tokens: ``heads = E[ô ôᵀ]`` (m, m), ``cross = E[ô yᵀ]``
    (m, D) and ``energy = E‖y‖²``, with ô the converted attention's ``o_proj`` input and y the target output."""

    heads: torch.Tensor
    cross: torch.Tensor
    energy: float


def ridge_system(moments: OutputMoments, weight: torch.Tensor,
                 damping: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(M, R, λ) of the output refit's normal equations ``M W'ᵀ = R``: M = E[ôôᵀ] + λI, R = E[ôyᵀ] + λWᵀ, λ = damping
    × the mean of diag E[ôôᵀ] (`refit_output_weight`), in float64."""
    A, B = moments.heads.double(), moments.cross.double()
    W = weight.to(device=A.device, dtype=torch.float64)
    if A.shape != (W.shape[1], W.shape[1]) or B.shape != (W.shape[1], W.shape[0]):
        raise ValueError(f"output moments {tuple(A.shape)}, {tuple(B.shape)} do not fit o_proj {tuple(W.shape)}")
    lam = damping * float(torch.diagonal(A).mean())
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return A + lam * eye, B + lam * W.T, lam


def refit_output_weight(moments: OutputMoments, weight: torch.Tensor, damping: float) -> torch.Tensor:
    """``W' = argmin E‖ô W'ᵀ − y‖² + λ‖W' − W‖²`` = ``((E[ôôᵀ] + λI)⁻¹(E[ôyᵀ] + λWᵀ))ᵀ``, λ = damping × the mean
    of diag E[ôôᵀ]: the ridge pulls towards the original ``weight`` (D, m), not towards zero, so directions the
    calibration does not excite keep their weights. float64, same shape as ``weight``."""
    M, R, _ = ridge_system(moments, weight, damping)
    return torch.linalg.solve(M, R).T.contiguous()


def output_refit_error(moments: OutputMoments, weight: torch.Tensor) -> float:
    """``E‖ô Wᵀ − y‖² / E‖y‖²`` from the moments: the relative error of the layer's attention output under
    ``weight``."""
    W = weight.to(device=moments.heads.device, dtype=torch.float64)
    err = torch.trace(W @ moments.heads.double() @ W.T) - 2 * torch.trace(W @ moments.cross.double()) + moments.energy
    return max(float(err), 0.0) / max(moments.energy, 1e-30)
