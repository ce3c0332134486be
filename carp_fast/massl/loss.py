"""The MaSSL objective: cross-entropy between views over random blocks of the memory.

Paper: Silva & Ramirez Rivera, ICML 2024, section 3 (official code: ``criterion.py``,
``random_partition.py`` and the training step of ``main_massl.py``).

Dimension letters: V views (V_s student, V_t teacher: the global crops), N images, P blocks,
B memory slots per block.

With student embeddings ``z`` and teacher embeddings ``w`` (unit vectors) and a random
partition of the memory ``M`` into blocks ``M_p``, per block:

    s_i = log_softmax(z_i M_p^T / tau_s)       t_j = softmax(w_j M_p^T / tau_t)
    loss = mean over pairs (i, j), i != j, over N and P of  -<t_j, s_i>

No entropy term and no centering: the memory's random blocks alone keep the assignments
spread (paper section 3). Teacher probabilities are targets (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..loss import BlockLogits, check_block_logits

STUDENT_TEMPERATURE = 0.1  # tau_s (paper and official default)


def massl_block_loss(
    student_block_logits: Tensor,
    teacher_block_logits: Tensor,
    *,
    student_temperature: float = STUDENT_TEMPERATURE,
    teacher_temperature: float = 0.07,
) -> Tensor:
    """MaSSL loss from similarities already arranged by memory block.

    Computed in float32 at least, with autocast off, whatever the inputs' dtype.

    Args:
        student_block_logits: ``[V_s, N, P, B]`` similarities ``z_i . m`` (no temperature),
            global crops first.
        teacher_block_logits: ``[V_t, N, P, B]`` for the global crops (V_t <= V_s); detached.
        student_temperature: tau_s (0.1).
        teacher_temperature: tau_t (0.04 -> 0.07 over the first epochs; see
            :func:`carp_fast.massl.temperature.teacher_temperature`).

    Returns:
        the scalar loss.
    """
    check_block_logits(student_block_logits, teacher_block_logits)
    n_student, n_teacher = student_block_logits.shape[0], teacher_block_logits.shape[0]
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)
    if n_teacher > n_student or n_pairs == 0:
        raise ValueError(
            f"need V_t <= V_s and at least one pair (i, j) with i != j; got V_s={n_student}, V_t={n_teacher}"
        )
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got student {student_temperature}, teacher {teacher_temperature}")

    dtype = torch.promote_types(student_block_logits.dtype, torch.float32)
    with torch.autocast(student_block_logits.device.type, enabled=False):
        log_s = F.log_softmax(student_block_logits.to(dtype) / student_temperature, dim=-1)  # [V_s, N, P, B]
        t = F.softmax(teacher_block_logits.detach().to(dtype) / teacher_temperature, dim=-1)  # [V_t, N, P, B]
        # i student view, j teacher view, n image, p block; contract b.
        cross_entropy = -torch.einsum("inpb,jnpb->ijnp", log_s, t).mean(dim=(2, 3))  # [V_s, V_t]
        same_view = torch.eye(n_student, n_teacher, dtype=torch.bool, device=cross_entropy.device)
        return cross_entropy.masked_fill(same_view, 0.0).sum() / n_pairs


class MaSSLLoss:
    """fastai ``loss_func``: ``MaSSLLoss()(pred, *yb)`` returns the MaSSL loss of ``pred``.

    ``pred`` is a :class:`~carp_fast.loss.BlockLogits` (or any object with ``student`` and ``teacher``
    block logits); labels in ``yb`` are ignored. ``teacher_temperature`` is set before every
    batch by :class:`carp_fast.massl.temperature.TeacherTemperatureWarmup`; the detached loss of
    the last call stays in ``self.last`` for logging, without a host synchronisation.

    Args:
        student_temperature: tau_s.
        teacher_temperature: tau_t until a schedule sets it.
    """

    def __init__(self, student_temperature: float = STUDENT_TEMPERATURE, teacher_temperature: float = 0.04):
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.last: Tensor | None = None

    def __call__(self, pred, *yb) -> Tensor:
        loss = massl_block_loss(
            pred.student, pred.teacher,
            student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature,
        )
        self.last = loss.detach()
        return loss
