"""The CARP objective: consistent assignment of views over random partitions.

Paper: Silva & Ramirez Rivera, "Representation Learning via Consistent Assignment of Views
over Random Partitions", NeurIPS 2023, section 4, eq. (4) and appendix E; the multi-crop
and distributed semantics, and where they differ from the official code: FIDELITY.md.

Dimension letters, used in every docstring and comment of this module:
    V   views (crops) of one image: V_s student views, V_t teacher views
    N   images in the local batch
    K   prototypes
    P   blocks in a partition (P = K // B)
    B   prototypes per block (the paper's N_B)

Per block, a view's probabilities are ``softmax(logits[..., block])`` (no temperature). With
``s`` student and ``t`` teacher probabilities ``[V, N, P, B]``:

    consistency = mean over pairs (i, j), i != j, over N and P of -log clamp(<s_i, t_j>, eps, 1-eps)
    entropy     = mean over P of KL(pbar_p || uniform) = log B + sum_b pbar_pb log clamp(pbar_pb, eps, 1-eps)
    total       = consistency + lambda_e * entropy

with ``lambda_e = 1`` in CARP (CARL, its one-block predecessor, weights and decays it), where
``pbar`` ``[P, B]`` averages the student and (detached) teacher probabilities over all views and
over the global batch (all ranks; the all-reduce passes gradients back).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class CARPLossParts(NamedTuple):
    """The terms of the CARP loss, each a scalar tensor."""

    consistency: Tensor
    entropy: Tensor
    total: Tensor


class _BlockLogitsFields(NamedTuple):
    student: Tensor  # [V_s, N, P, B] student block logits
    teacher: Tensor  # [V_t, N, P, B] teacher block logits (no gradient)
    partition: Tensor  # [P, B] the step's partition of the prototypes (or memory slots)


class BlockLogits(_BlockLogitsFields):
    """What a method's network returns for one step: ``student``, ``teacher``, ``partition``.

    The one output type of every method (:class:`carp_fast.networks.StudentTeacher`'s
    forward, whatever scores the blocks: CARP's prototypes, MaSSL's memory). Also built from one
    iterable of the three fields, because fastai's ``apply`` (used by ``to_float`` in
    ``MixedPrecision.after_pred``, ``to_device``, ``to_detach``) rebuilds a tuple as
    ``type(x)([...])``, which a plain NamedTuple refuses.
    """

    __slots__ = ()

    def __new__(cls, *fields, **named):
        if len(fields) == 1 and not named:
            fields = tuple(fields[0])
        return super().__new__(cls, *fields, **named)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_block_logits(student_block_logits: Tensor, teacher_block_logits: Tensor) -> None:
    """Raise ValueError unless both are ``[V, N, P, B]`` with the same N, P and B."""
    if student_block_logits.dim() != 4 or teacher_block_logits.dim() != 4:
        raise ValueError(
            "block logits must be [V, N, P, B]; got student "
            f"{tuple(student_block_logits.shape)} and teacher {tuple(teacher_block_logits.shape)}"
        )
    if student_block_logits.shape[1:] != teacher_block_logits.shape[1:]:
        raise ValueError(
            f"student [V_s, N, P, B] = {tuple(student_block_logits.shape)} and teacher "
            f"{tuple(teacher_block_logits.shape)} differ beyond the view dimension"
        )


def random_partition(
    n_prototypes: int,
    block_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A uniformly random partition of the prototypes into blocks (paper section 4).

    Args:
        n_prototypes: K, the number of prototypes.
        block_size: B, prototypes per block; ``1 <= B <= K``. A remainder of ``K mod B``
            prototypes is left out of this step's partition.
        generator: random source; defaults to torch's global generator of ``device``.
        device: where the partition lives; defaults to the generator's device (or CPU).

    Returns:
        LongTensor ``[K // B, B]``: a random permutation of ``range(K)`` cut into blocks.
        In a distributed run rank 0's partition is broadcast, so every rank holds the same.
    """
    if not isinstance(n_prototypes, int) or n_prototypes < 1:
        raise ValueError(f"n_prototypes must be a positive int, got {n_prototypes!r}")
    if not isinstance(block_size, int) or not 1 <= block_size <= n_prototypes:
        raise ValueError(
            f"block_size must be an int in [1, n_prototypes={n_prototypes}], got {block_size!r}"
        )
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n_prototypes, generator=generator, device=device)
    if _distributed():
        # One small collective per step; on NCCL it does not block the host.
        dist.broadcast(perm, src=0)
    n_blocks = n_prototypes // block_size
    return perm[: n_blocks * block_size].view(n_blocks, block_size)


def _check_partition(partition: Tensor, n_prototypes: int) -> None:
    if not isinstance(partition, Tensor) or partition.dim() != 2 or partition.numel() == 0:
        raise ValueError(
            "partition must be a non-empty LongTensor [P, B] "
            f"(see random_partition), got {type(partition).__name__} "
            f"{tuple(partition.shape) if isinstance(partition, Tensor) else ''}"
        )
    if partition.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"partition must hold integer indices, got dtype {partition.dtype}")
    flat = partition.flatten()
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= n_prototypes:
        raise ValueError(
            f"partition indices must lie in [0, K={n_prototypes}), got range [{lo}, {hi}]"
        )
    if flat.unique().numel() != flat.numel():
        raise ValueError("partition must hold distinct prototype indices; found repeats")


def _check_logits(name: str, logits: Sequence[Tensor]) -> None:
    if isinstance(logits, Tensor) or len(logits) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of [N, K] tensors, one per view")
    first = logits[0]
    for v, x in enumerate(logits):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}[{v}] must be a floating-point tensor, got {kind}")
        if x.dim() != 2 or x.shape != first.shape:
            raise ValueError(
                f"{name}[{v}] has shape {tuple(x.shape)}; every view must be [N, K] "
                f"like {name}[0] {tuple(first.shape)}"
            )


def carp_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    partition: Tensor,
    *,
    eps: float | None = None,
) -> CARPLossParts:
    """CARP loss from full prototype logits (paper eq. 4; multi-crop: every student view against every other teacher view).

    Args:
        student_logits: V_s tensors ``[N, K]``, global crops first.
        teacher_logits: V_t tensors ``[N, K]`` for the global crops (V_t <= V_s); detached
            here, they are targets.
        partition: LongTensor ``[P, B]`` of distinct prototype indices, e.g. from
            :func:`random_partition`.
        eps: clamp of the dot products and of the entropy's log; defaults to the machine
            epsilon of the dtype in which the probabilities are computed (float32 for half inputs).

    Returns:
        :class:`CARPLossParts` of scalars.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if len(teacher_logits) > len(student_logits):
        raise ValueError(
            f"teacher_logits has {len(teacher_logits)} views but student_logits only "
            f"{len(student_logits)}; the teacher sees a subset (the global crops)"
        )
    if teacher_logits[0].shape != student_logits[0].shape:
        raise ValueError(
            f"teacher_logits views are {tuple(teacher_logits[0].shape)} but student_logits "
            f"views are {tuple(student_logits[0].shape)}; both must be [N, K]"
        )
    _check_partition(partition, student_logits[0].shape[1])
    index = partition.to(student_logits[0].device).flatten()
    n_blocks, block_size = partition.shape

    def blocks(views: Sequence[Tensor]) -> Tensor:
        # [N, K] -> [N, P*B] -> [N, P, B], then stack views -> [V, N, P, B]
        return torch.stack([x.index_select(1, index).view(-1, n_blocks, block_size) for x in views])

    return carp_block_loss(blocks(student_logits), blocks(teacher_logits), eps=eps)


def carp_block_loss(
    student_block_logits: Tensor,
    teacher_block_logits: Tensor,
    *,
    eps: float | None = None,
    entropy_weight: float = 1.0,
) -> CARPLossParts:
    """CARP loss from logits already arranged by partition block.

    This is what training calls: the prototype layer computes block logits directly from the
    permuted prototype matrix (``z @ W[partition].T``), so no ``[N, K]`` gather is needed.

    Args:
        student_block_logits: ``[V_s, N, P, B]``, global crops first.
        teacher_block_logits: ``[V_t, N, P, B]``, the global crops; detached here.
        eps: clamp of the dot products and of the entropy's log; defaults to the
            probabilities' machine epsilon.
        entropy_weight: lambda_e, the weight of the entropy term in ``total`` (CARP: 1;
            ``entropy`` itself is returned unweighted).

    Returns:
        :class:`CARPLossParts` of scalars.
    """
    check_block_logits(student_block_logits, teacher_block_logits)
    n_student, n_teacher = student_block_logits.shape[0], teacher_block_logits.shape[0]
    if n_teacher > n_student:
        raise ValueError(f"teacher has {n_teacher} views but the student only {n_student}")

    # Softmax and loss in float32 at least: bf16/fp16 probabilities lose the small ones, and
    # 1 - eps rounds to 1 in bf16. Autocast is turned off because it would run the einsum
    # (a bmm) in half precision again.
    with torch.autocast(student_block_logits.device.type, enabled=False):
        return _block_loss(student_block_logits, teacher_block_logits, eps, entropy_weight)


def _block_loss(student_block_logits: Tensor, teacher_block_logits: Tensor, eps: float | None,
                entropy_weight: float = 1.0) -> CARPLossParts:
    n_student, n_teacher = student_block_logits.shape[0], teacher_block_logits.shape[0]
    dtype = torch.promote_types(student_block_logits.dtype, torch.float32)
    s = F.softmax(student_block_logits.to(dtype), dim=-1)  # [V_s, N, P, B]
    t = F.softmax(teacher_block_logits.detach().to(dtype), dim=-1)  # [V_t, N, P, B]
    if eps is None:
        eps = torch.finfo(dtype).eps

    # Every (student i, teacher j) pair: i,j views, n batch, p blocks; contract b.
    agreement = torch.einsum("inpb,jnpb->ijnp", s, t)  # [V_s, V_t, N, P]
    pair_loss = -agreement.clamp(eps, 1 - eps).log().mean(dim=(2, 3))  # [V_s, V_t]
    same_view = torch.eye(n_student, n_teacher, dtype=torch.bool, device=s.device)
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)
    if n_pairs == 0:
        raise ValueError("need at least one (student i, teacher j) pair with i != j; got 1 view each")
    consistency = pair_loss.masked_fill(same_view, 0.0).sum() / n_pairs

    # pbar: average over views and the global batch, per block.
    n_local = student_block_logits.shape[1]
    prob_sum = s.sum(dim=(0, 1)) + t.sum(dim=(0, 1))  # [P, B]
    count = float((n_student + n_teacher) * n_local)  # a Python number: no host-to-device copy
    if _distributed():
        # all_reduce from torch.distributed.nn sums gradients back to every rank, which,
        # after DDP averages them over W ranks, equals the gradient of one process.
        import torch.distributed.nn.functional as dist_fn

        prob_sum = dist_fn.all_reduce(prob_sum)
        count = count * dist.get_world_size()
    pbar = prob_sum / count  # [P, B]
    block_size = pbar.shape[-1]
    # p log clamp(p), as the official code: 0 for a prototype no view touches, and a finite
    # gradient there (log eps). xlogy(p, p) has the same value but a NaN gradient at p = 0,
    # which float32 reaches when a prototype's logit is ~104 below its block's maximum in
    # every row; the NaN then fills the block's whole gradient.
    kl_to_uniform = math.log(block_size) + (pbar * pbar.clamp(eps, 1 - eps).log()).sum(-1)  # [P]
    entropy = kl_to_uniform.mean()
    return CARPLossParts(consistency, entropy, consistency + entropy_weight * entropy)


class CARPLoss:
    """fastai ``loss_func``: ``CARPLoss()(pred, *yb)`` returns the total CARP loss.

    ``pred`` is a :class:`BlockLogits` (block logits of one partition);
    labels in ``yb`` are ignored (self-supervised). The detached terms of the last call stay
    in ``self.parts`` for logging callbacks, without a host synchronisation.

    ``entropy_weight`` is lambda_e (CARP: 1); a schedule
    (:class:`carp_fast.callbacks.EntropyWeightSchedule`) sets it before every training batch.
    """

    def __init__(self, eps: float | None = None, entropy_weight: float = 1.0):
        self.eps, self.entropy_weight = eps, entropy_weight
        self.parts: CARPLossParts | None = None

    def __call__(self, pred, *yb) -> Tensor:
        parts = carp_block_loss(pred.student, pred.teacher, eps=self.eps, entropy_weight=self.entropy_weight)
        self.parts = CARPLossParts(*(x.detach() for x in parts))
        return parts.total
