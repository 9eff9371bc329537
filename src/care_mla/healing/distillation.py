"""The healing loss: next-token cross-entropy plus distillation from the original model.

``loss = CE + β·τ²·KL(p_teacher ‖ p_student)`` per predicted token, both distributions at
temperature τ (the τ² keeps the gradient scale of the KL term independent of τ, as in Hinton
et al.). With ``top_k`` the teacher's distribution is cut to its k most likely tokens and
renormalised, and the KL is taken against the student's full distribution at those tokens:
still a KL (≥ 0, zero only when the student puts exactly that mass there, so it also pushes
the student's mass off every other token), equal to the full KL when k is the vocabulary.

Memory: the full KL holds a few (B, T, V) float32 tensors (student and teacher log-probs);
top-k keeps the teacher's side at (B, T, k). The teacher's forward still produces its full
logits once per step; that forward (no backward) is the extra cost of distillation, about a
third of a training step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F


class KdLoss(NamedTuple):
    total: Tensor  # what is minimised
    ce: Tensor  # mean next-token cross-entropy
    kl: Tensor  # mean KL(teacher ‖ student) at temperature τ (0 without a teacher)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, *, beta: float = 1.0,
            tau: float = 1.0, top_k: int | None = None, ignore_index: int = -100) -> KdLoss:
    """Healing loss averaged over the positions whose label is not `ignore_index`.

    Args:
        student_logits, teacher_logits: (..., V); position i predicts ``labels[i]`` (already
            shifted). ``teacher_logits`` None, or ``beta`` 0, gives CE alone.
        labels: (...) token ids.
        beta, tau: weight β of the KL term and temperature τ of both distributions.
        top_k: KL over the teacher's top-k tokens (renormalised) instead of the whole vocabulary.
    """
    vocab = student_logits.shape[-1]
    labels = labels.reshape(-1)
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    ce = F.nll_loss(log_s, labels, ignore_index=ignore_index)
    if teacher_logits is None or beta == 0:
        return KdLoss(ce, ce, torch.zeros((), device=ce.device))
    log_q = log_s if tau == 1 else F.log_softmax(student_logits.float().reshape(-1, vocab) / tau, dim=-1)
    t = teacher_logits.reshape(-1, vocab)
    keep = labels != ignore_index
    if not bool(keep.all()):
        log_q, t = log_q[keep], t[keep]
    if top_k is not None and top_k < vocab:  # τ > 0 keeps the order: pick before the float copy
        t, index = t.topk(top_k, dim=-1)
        log_q = log_q.gather(-1, index)
    log_p = F.log_softmax(t.float() / tau, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / keep.sum().clamp(min=1)
    return KdLoss(ce + beta * tau**2 * kl, ce, kl)
