"""Train a DeepSeek export whose latent norms were made linear, without breaking them.

`care_mla.formats.deepseek` makes ``kv_a_layernorm`` (and ``q_a_layernorm`` when Q has a bias) the
identity: ``kv_a_proj_with_mqa`` scales the latent by a tiny s (~1e-7) so that
``ms(s·c) ≪ ε``, and the norm's weight is the huge constant ``√ε/s``. Fine-tuned as it is:

- Adam moves every weight by about the learning rate per step, whatever its size: on latent
  rows of size ~s·|A| a step of 1e-5 is a hundredfold change of the latent, which the norm
  then multiplies back by 1/s. Measured on a tiny trained Llama exported at a quarter of its
  cache (held-out ppl 48.9, original 39.9), 5 and 30 steps at lr 1e-4 gave ppl 248 and 81;
  in the folded form below, 46.7 and 45.2.
- The norm weight (√ε/s, thousands or more) moves by ~lr per Adam step, a relative change
  too small to matter, and any change to it is a per-dimension rescale ``kv_b_proj`` can make
  as well.

So for training the pre-scale is folded out: the latent rows of the projection are divided by
p (the power of two nearest s) and the norm's ε by p², which is the same function exactly
(``w·(c/p)/√(ms(c/p) + ε/p²) = w·c/√(ms(c) + ε)``, and every scaling is by a power of two, so
even the float rounding is unchanged). Adam then trains unit-scale latent weights. Before
saving, the rows are multiplied back by p and ε restored, again exactly. The norm weights stay
frozen, so the saved norm is the linear one the export wrote, with the ε every runtime uses.
Healing may grow the latent rows and so loosen the export's bound ``ms(s·c) ≤ δ·ε`` (the
norm's gain within 2⁻²⁴ of 1 for every input); the saved model is still exactly the function
that was trained, which saw the same norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# (projection, its norm, config field with the number of leading projection rows the norm reads)
_PAIRS = (("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_lora_rank"), ("q_a_proj", "q_a_layernorm", "q_lora_rank"))

# A norm is in the linear regime when its pre-scale √ε/w is at least this small; a trained
# DeepSeek model's norm weights are O(1), the export's ≥ ~1e3.
MAX_PRESCALE = 1e-4


@dataclass(frozen=True)
class LinearNorm:
    """A projection whose first `rows` outputs feed a norm made linear by the pre-scale `scale`."""

    proj: str  # module names, resolved on each use: LoRA wraps and unwraps the projections
    norm: str
    rows: int
    scale: float  # the power of two nearest the export's s = √ε/w
    eps: float  # the norm's ε as saved


def frozen_norm_weights(model: nn.Module) -> list[str]:
    """Names of the latent-norm weights healing keeps fixed (kv_a_layernorm, q_a_layernorm)."""
    return [n for n, _ in model.named_parameters() if n.endswith(tuple(f"{norm}.weight" for _, norm, _ in _PAIRS))]


def find_linear_norms(model: nn.Module) -> list[LinearNorm]:
    """Every latent norm of `model` that an export made linear (constant weight, tiny pre-scale)."""
    found = []
    for name, module in model.named_modules():
        for proj, norm, rank_field in _PAIRS:
            n = getattr(module, norm, None)
            if n is None or getattr(module, proj, None) is None:
                continue
            w = n.weight.detach()
            if not bool((w == w[0]).all()) or float(w[0]) <= 0:
                continue
            s = math.sqrt(n.variance_epsilon) / float(w[0])
            if s > MAX_PRESCALE:
                continue
            prefix = f"{name}." if name else ""
            rows = getattr(module, rank_field, None) or w.numel()
            found.append(LinearNorm(prefix + proj, prefix + norm, rows, 2.0 ** round(math.log2(s)), n.variance_epsilon))
    return found


@torch.no_grad()
def fold(model: nn.Module, norms: list[LinearNorm]) -> None:
    """Training form: latent rows at unit scale, ε divided by scale² (the same function)."""
    for item in norms:
        _scale_rows(model.get_submodule(item.proj), item.rows, 1.0 / item.scale)
        model.get_submodule(item.norm).variance_epsilon = item.eps / item.scale**2


@torch.no_grad()
def unfold(model: nn.Module, norms: list[LinearNorm]) -> None:
    """Back to the exported form (rows × scale, ε as saved) after `fold` and training."""
    for item in norms:
        _scale_rows(model.get_submodule(item.proj), item.rows, item.scale)
        model.get_submodule(item.norm).variance_epsilon = item.eps


def _scale_rows(proj: nn.Linear, rows: int, factor: float) -> None:
    for param in (proj.weight, proj.bias):
        if param is not None:
            param[:rows] *= factor
