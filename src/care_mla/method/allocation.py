"""Per-layer rank allocation under one total budget (CARE.md §2).

Pure functions on whitened spectra (the singular values of S·W per layer, descending, as
returned by :func:`care_mla.method.factorization.whitened_spectrum`). Keeping r ranks of layer l
leaves the whitened tail ``Σ_{m>r} σ²_{l,m}`` as its activation error.

* :func:`uniform_ranks` spreads the budget evenly (always available).
* :func:`adjusted_ranks` is the greedy water-filling of the paper, with a choice of score:

  - ``"paper"``:  ``s_l(r) = σ²_{l,r+1} / Σ_{m>r} σ²_{l,m}`` (next gain relative to what
    is still missing). This ratio *grows* as a layer's tail shrinks, so allocations run
    away to the caps (CARE.md §5b).
  - ``"energy"``: ``s_l(r) = σ²_{l,r+1} / Σ_m σ²_{l,m}`` (next gain relative to the layer's
    total whitened energy). Since each spectrum is non-increasing, the greedy is exactly
    optimal for the *relative* error ``Σ_l tail_l / energy_l`` within the bounds; when all
    layers have the same total energy it also minimises :func:`allocation_error`.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "uniform_ranks",
    "adjusted_ranks",
    "default_bounds",
    "allocation_error",
]

Score = Literal["paper", "energy"]


# --------------------------------------------------------------------------- helpers


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _per_layer(value: int | Sequence[int], num_layers: int, name: str) -> list[int]:
    """Broadcast an int bound to every layer, or check a per-layer sequence; all >= 0."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} entries for {num_layers} layers")
        out = [_as_int(v, f"{name}[{i}]") for i, v in enumerate(value)]
    else:
        out = [_as_int(value, name)] * num_layers
    for i, v in enumerate(out):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v} for layer {i}")
    return out


def _energies(spectra: Sequence[Tensor]) -> list[list[float]]:
    """σ² per layer as Python floats (float64), after checking each spectrum."""
    out = []
    for i, s in enumerate(spectra):
        t = torch.as_tensor(s)
        if t.ndim != 1:
            raise ValueError(f"spectrum {i} must be 1-D, got shape {tuple(t.shape)}")
        t = t.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"spectrum {i} must hold finite, non-negative singular values")
        if t.numel() > 1 and bool((t[1:] > t[:-1]).any()):
            raise ValueError(f"spectrum {i} must be sorted in descending order")
        out.append((t * t).tolist())
    return out


def _suffix_sums(e: list[float]) -> list[float]:
    """tails[r] = Σ_{m >= r} e[m] (0-based), with tails[len(e)] = 0."""
    tails = [0.0] * (len(e) + 1)
    acc = 0.0
    for r in range(len(e) - 1, -1, -1):
        acc += e[r]
        tails[r] = acc
    return tails


# --------------------------------------------------------------------------- public API


def uniform_ranks(
    num_layers: int, total: int, *, r_max: int | Sequence[int] | None = None
) -> list[int]:
    """Spread ``total`` ranks over ``num_layers`` as evenly as possible.

    Every layer gets ``total // L`` and the first ``total % L`` layers one more. With
    ``r_max`` (one cap, or one per layer) a capped layer stays at its cap and the rest is
    spread evenly over the others, the remainder again to the lowest-index layers (the
    result equals handing out ranks one at a time round-robin, skipping full layers).
    The sum is exactly ``total``; ValueError if ``total`` exceeds the sum of the caps.
    """
    L = _as_int(num_layers, "num_layers")
    total = _as_int(total, "total")
    if L < 0:
        raise ValueError(f"num_layers must be >= 0, got {L}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if r_max is None:
        if L == 0:
            if total:
                raise ValueError(f"cannot spread {total} ranks over 0 layers")
            return []
        base, rem = divmod(total, L)
        return [base + 1 if i < rem else base for i in range(L)]

    caps = _per_layer(r_max, L, "r_max")
    capacity = sum(caps)
    if total > capacity:
        raise ValueError(
            f"total {total} is infeasible: with r_max the feasible totals are 0 … {capacity}"
        )
    # largest level t with Σ min(cap, t) <= total (binary search on t)
    lo, hi = 0, max(caps, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in caps) <= total:
            lo = mid
        else:
            hi = mid - 1
    ranks = [min(c, lo) for c in caps]
    left = total - sum(ranks)
    for i, c in enumerate(caps):
        if left == 0:
            break
        if c > ranks[i]:
            ranks[i] += 1
            left -= 1
    return ranks


def adjusted_ranks(
    spectra: Sequence[Tensor],
    total: int,
    *,
    r_min: int | Sequence[int],
    r_max: int | Sequence[int],
    score: Score = "energy",
) -> list[int]:
    """Greedy water-filling of ``total`` ranks over layers on their whitened spectra.

    Every layer starts at ``r_min`` (clipped to its spectrum length); then one rank at a
    time goes to the layer of largest score (see the module docstring), ties to the lowest
    layer index, never above ``min(r_max, len(spectrum))``, until the sum is exactly
    ``total``. A heap keeps this O(total · log L). Layers whose remaining spectrum is zero
    score 0 and only receive ranks when nothing else can.
    """
    if score not in ("paper", "energy"):
        raise ValueError(f"unknown score {score!r}; use 'paper' or 'energy'")
    energies = _energies(spectra)
    L = len(energies)
    total = _as_int(total, "total")
    mins = _per_layer(r_min, L, "r_min")
    maxs = _per_layer(r_max, L, "r_max")
    lo = [min(a, len(e)) for a, e in zip(mins, energies)]
    hi = [min(b, len(e)) for b, e in zip(maxs, energies)]
    for i, (a, b) in enumerate(zip(lo, hi)):
        if a > b:
            raise ValueError(
                f"layer {i}: r_min {mins[i]} is above r_max {maxs[i]} "
                f"(spectrum length {len(energies[i])})"
            )
    smallest, largest = sum(lo), sum(hi)
    if not smallest <= total <= largest:
        raise ValueError(
            f"total {total} is infeasible: with these r_min/r_max the feasible totals are "
            f"{smallest} … {largest}"
        )

    tails = [_suffix_sums(e) for e in energies]

    def priority(layer: int, r: int) -> float:
        gain = energies[layer][r]
        denom = tails[layer][r] if score == "paper" else tails[layer][0]
        return gain / denom if denom > 0 else 0.0

    ranks = list(lo)
    heap = [(-priority(i, ranks[i]), i) for i in range(L) if ranks[i] < hi[i]]
    heapq.heapify(heap)
    for _ in range(total - smallest):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < hi[i]:
            heapq.heappush(heap, (-priority(i, ranks[i]), i))
    return ranks


def default_bounds(mean_rank: int, width: int) -> tuple[int, int]:
    """The paper's bounds for mean rank r̄: ``r_min = r̄ // 2``, ``r_max = min(2·r̄, width)``."""
    mean_rank = _as_int(mean_rank, "mean_rank")
    width = _as_int(width, "width")
    if mean_rank < 0 or width < 0:
        raise ValueError(f"mean_rank and width must be >= 0, got {mean_rank} and {width}")
    if mean_rank > width:
        raise ValueError(f"mean rank {mean_rank} exceeds the layer width {width}")
    return mean_rank // 2, min(2 * mean_rank, width)


def allocation_error(
    spectra: Sequence[Tensor], ranks: Sequence[int], *, relative: bool = False
) -> float:
    """Total whitened tail ``Σ_l Σ_{m>r_l} σ²_{l,m}`` of an allocation.

    With ``relative=True`` each layer's tail is divided by its total energy ``Σ_m σ²_{l,m}``
    (layers with zero energy count 0): the objective the ``"energy"`` greedy minimises.
    """
    energies = _energies(spectra)
    if len(ranks) != len(energies):
        raise ValueError(f"{len(ranks)} ranks for {len(energies)} spectra")
    out = 0.0
    for i, (e, r) in enumerate(zip(energies, ranks)):
        r = _as_int(r, f"ranks[{i}]")
        if not 0 <= r <= len(e):
            raise ValueError(f"ranks[{i}] = {r} is outside 0 … {len(e)}")
        tail = sum(e[r:])
        if relative:
            energy = sum(e)
            tail = tail / energy if energy > 0 else 0.0
        out += tail
    return out
