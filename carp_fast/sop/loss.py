"""The SOP objective: cross-entropy between views of their votes over self-organizing prototypes.

Paper: Silva, Pedrini & Ramirez Rivera, ICML 2025, section 3 (official code: ``carp_loss.py``
and the training step of ``main_ibot.py`` of github sthalles/sop).

Dimension letters: V views (V_s student, V_t teacher: the global crops), N images, T tasks,
S supports per task, P' prototypes (SOPs) per task.

With cosines ``c`` ``[V, N, T, S]`` of the views to a task's supports and its votes ``Y``
``[T, S, P']`` (:func:`carp_fast.sop.prototypes.voting_matrix`):

    p_i = softmax(c_i / tau_s) Y       q_j = softmax(c_j / tau_t) Y        (over the P' SOPs)
    loss = mean over pairs (i, j), i != j, over N and T of  -sum_c q_jc log max(p_ic, eps)

in float32 whatever the autocast; eps is float32's machine epsilon, so the log is finite
where a probability underflows. No entropy term and no centering. Optionally (the official
``--koleo_loss_weight``, 0 by default) the KoLeo term of the student's global-crop embeddings,
:func:`koleo_loss`, weighted by ``koleo_weight``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

STUDENT_TEMPERATURE = 0.1  # tau_s (paper and official default)
TEACHER_TEMPERATURE = 0.04  # tau_t (official: 0.04, its warm-up from 0.04 to 0.04 is constant)
EPS = torch.finfo(torch.float32).eps  # the floor of a probability under the log


class _SOPFields(NamedTuple):
    student: Tensor  # [V_s, N, T, S] cosines of the student views to the supports
    teacher: Tensor  # [V_t, N, T, S] the same for the teacher's global views (no gradient)
    partition: Tensor  # [T, S] the supports' memory slots
    votes: Tensor  # [T, S, P'] the voting matrices
    embeddings: Tensor  # [V_t, N, D] the student's unit embeddings of the global crops (for KoLeo)


class _SOPMIMFields(NamedTuple):
    student: Tensor
    teacher: Tensor
    partition: Tensor
    votes: Tensor
    embeddings: Tensor
    patch_student: Tensor  # [V_t, N, L, T_p, S_p] cosines of the student's patch tokens to the patch supports
    patch_teacher: Tensor  # [V_t, N, L, T_p, S_p] the teacher's (no gradient)
    patch_votes: Tensor  # [T_p, S_p, P'_p]
    mask: Tensor  # [V_t, N, L] bool, the student's masked patches


def _one_iterable(values: tuple) -> tuple:
    """The fields themselves, or the fields of one iterable: fastai's ``apply`` (``to_float``,
    ``to_device``, ``to_detach``) rebuilds a tuple as ``type(x)([...])``."""
    return tuple(values[0]) if len(values) == 1 else values


class SOPOutputs(_SOPFields):
    """What SOP's network returns for a step: ``student``, ``teacher``, ``partition``, ``votes``,
    ``embeddings``.

    ``partition`` holds the supports' memory slots, so the statistics of
    :class:`~carp_fast.massl.stats.MaSSLStats` (agreement, slots hit) read it as they read a
    block partition. Also built from one iterable of the fields.
    """

    __slots__ = ()

    def __new__(cls, *fields, **named):
        return super().__new__(cls, *(_one_iterable(fields) if not named else fields), **named)


class SOPMIMOutputs(_SOPMIMFields):
    """:class:`SOPOutputs` with SOP-MIM's ``patch_student``, ``patch_teacher``, ``patch_votes`` and ``mask``."""

    __slots__ = ()

    def __new__(cls, *fields, **named):
        return super().__new__(cls, *(_one_iterable(fields) if not named else fields), **named)


def sop_probabilities(cosines: Tensor, votes: Tensor, temperature: float) -> Tensor:
    """A view's distribution over each task's SOPs: ``softmax(c / tau) Y``.

    Args:
        cosines: ``[..., T, S]`` similarities to the supports (no temperature).
        votes: ``[T, S, P']``.
        temperature: tau.

    Returns:
        ``[..., T, P']``, float32 at least (rows sum to 1).
    """
    dtype = torch.promote_types(cosines.dtype, torch.float32)
    with torch.autocast(cosines.device.type, enabled=False):
        weights = torch.softmax(cosines.to(dtype) / temperature, dim=-1)  # [..., T, S]
        return torch.einsum("...ts,tsc->...tc", weights, votes.to(dtype))  # contract the supports s


def sop_loss(student: Tensor, teacher: Tensor, votes: Tensor, *,
             student_temperature: float = STUDENT_TEMPERATURE, teacher_temperature: float = TEACHER_TEMPERATURE) -> Tensor:
    """SOP's [CLS] loss from cosines to the supports.

    Args:
        student: ``[V_s, N, T, S]``, global crops first.
        teacher: ``[V_t, N, T, S]`` (V_t <= V_s); detached.
        votes: ``[T, S, P']``.
        student_temperature, teacher_temperature: tau_s (0.1) and tau_t (0.04).

    Returns:
        the scalar loss, float32 (float64 for float64 inputs).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[1:] != teacher.shape[1:]:
        raise ValueError(f"student [V_s, N, T, S] and teacher [V_t, N, T, S] must agree beyond V; got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if votes.shape[:2] != student.shape[2:]:
        raise ValueError(f"votes must be [T, S, P'] with the cosines' T and S {tuple(student.shape[2:])}, got {tuple(votes.shape)}")
    n_student, n_teacher = student.shape[0], teacher.shape[0]
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)
    if n_teacher > n_student or n_pairs == 0:
        raise ValueError(f"need V_t <= V_s and at least one pair (i, j) with i != j; got V_s={n_student}, V_t={n_teacher}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got student {student_temperature}, teacher {teacher_temperature}")
    with torch.autocast(student.device.type, enabled=False):
        log_p = sop_probabilities(student, votes, student_temperature).clamp(min=EPS).log()  # [V_s, N, T, P']
        q = sop_probabilities(teacher.detach(), votes, teacher_temperature)  # [V_t, N, T, P']
        # i student view, j teacher view, n image, t task; contract the SOPs c.
        cross_entropy = -torch.einsum("intc,jntc->ijnt", log_p, q).mean(dim=(2, 3))  # [V_s, V_t]
        same_view = torch.eye(n_student, n_teacher, dtype=torch.bool, device=cross_entropy.device)
        return cross_entropy.masked_fill(same_view, 0.0).sum() / n_pairs


def mim_loss(student: Tensor, teacher: Tensor, votes: Tensor, mask: Tensor, *, student_temperature: float,
             teacher_temperature: float) -> Tensor:
    """SOP-MIM from patch cosines: the student's masked tokens against the teacher's of the same view.

    Args:
        student: ``[V_t, N, L, T, S]`` cosines of the student's (masked) global crops' patch tokens.
        teacher: ``[V_t, N, L, T, S]`` the teacher's, of the unmasked crops (detached).
        votes: ``[T, S, P']``.
        mask: ``[V_t, N, L]`` bool, the masked patches.
        student_temperature, teacher_temperature: tau_s and tau_t.

    Returns:
        the mean over views, images and tasks of the per-image mean over masked tokens of
        ``-sum q log max(p, eps)`` (an image with no masked token counts 0, as the official);
        float32 with autocast off.
    """
    with torch.autocast(student.device.type, enabled=False):
        log_p = sop_probabilities(student, votes, student_temperature).clamp(min=EPS).log()  # [V, N, L, T, P']
        q = sop_probabilities(teacher.detach(), votes, teacher_temperature)
        cross_entropy = -(q * log_p).sum(-1).mean(-1)  # [V, N, L]: mean over tasks
        m = mask.to(cross_entropy.dtype)
        per_image = (cross_entropy * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [V, N]
        return per_image.mean()


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """The KoLeo term (Sablayrolles et al., ICLR 2019; DINOv2's ``KoLeoLoss``) per view, averaged:
    minus the mean log distance of each embedding to its nearest other one in the same view.

    It falls as the embeddings spread over the sphere: the official SOP code adds it with weight
    ``--koleo_loss_weight`` (0 by default), over each global crop's student [CLS] embeddings.

    Args:
        embeddings: ``[V, N, D]``, N >= 2 per view (normalised here, in float32).
        eps: added to the distances under the log (DINOv2's 1e-8).

    Returns:
        the scalar ``mean_v -mean_i log(min_{j != i} ||x_vi - x_vj|| + eps)``.
    """
    if embeddings.dim() != 3 or embeddings.shape[1] < 2:
        raise ValueError(f"KoLeo needs embeddings [V, N, D] with N >= 2, got {tuple(embeddings.shape)}")
    with torch.autocast(embeddings.device.type, enabled=False):
        x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        dots = x @ x.transpose(1, 2)  # [V, N, N]
        dots.diagonal(dim1=1, dim2=2).fill_(-2.0)  # never one's own neighbour
        nearest = x.gather(1, dots.argmax(-1, keepdim=True).expand_as(x))  # [V, N, D]
        distances = (x - nearest).norm(dim=-1)  # [V, N]
        return -torch.log(distances + eps).mean()


class SOPLoss:
    """fastai ``loss_func``: ``SOPLoss()(pred, *yb)`` is :func:`sop_loss` of a :class:`SOPOutputs`,
    plus :func:`carp_fast.sop.mim.mim_loss` when it holds patch cosines (L_CLS + L_MIM).

    With ``koleo_weight > 0``, plus that weight times :func:`koleo_loss` of the student's
    global-crop embeddings. Labels are ignored. ``teacher_temperature`` may be set by a schedule
    (:class:`carp_fast.massl.temperature.TeacherTemperatureWarmup`); the detached loss of the
    last call stays in ``self.last`` and ``[total, L_CLS, L_MIM, KoLeo]`` in ``self.parts`` for
    logging, without a host synchronisation (L_MIM is 0 without patch cosines, KoLeo 0 at
    weight 0: not computed).
    """

    def __init__(self, student_temperature: float = STUDENT_TEMPERATURE, teacher_temperature: float = TEACHER_TEMPERATURE,
                 koleo_weight: float = 0.0):
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.koleo_weight = koleo_weight
        self.last: Tensor | None = None
        self.parts: Tensor | None = None

    def __call__(self, pred: SOPOutputs | SOPMIMOutputs, *yb) -> Tensor:
        cls = sop_loss(pred.student, pred.teacher, pred.votes, student_temperature=self.student_temperature,
                       teacher_temperature=self.teacher_temperature)
        mim = torch.zeros_like(cls)
        if isinstance(pred, SOPMIMOutputs):
            mim = mim_loss(pred.patch_student, pred.patch_teacher, pred.patch_votes, pred.mask,
                           student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature)
        koleo = koleo_loss(pred.embeddings) if self.koleo_weight > 0 else torch.zeros_like(cls)
        loss = cls + mim + self.koleo_weight * koleo
        self.last = loss.detach()
        self.parts = torch.stack([loss, cls, mim, koleo]).detach()
        return loss
