"""SOP's self-organizing prototypes: each step's tasks of anchors, neighbours and votes.

Paper: Silva, Pedrini & Ramirez Rivera, "Self-Organizing Visual Prototypes for Non-Parametric
Representation Learning", ICML 2025, section 3 (official code: ``memory_bank.py`` of github
sthalles/sop; its defects and how this module differs: FIDELITY.md, "SOP").

Per step, T independent tasks are built from the memory ``M`` ``[K, D]`` of past teacher
embeddings. A task draws P anchor slots uniformly (the rest of the memory is its pool),
finds each anchor's k - 1 nearest neighbours in the pool (exact, cosine), keeps P' of the
anchors, and returns their supports: each kept anchor followed by its neighbours. Every
support votes for its own anchor's column of a voting matrix ``Y`` ``[S, P']`` (S = P' k):

    Y[(a, j), a] = w_aj,   Y[(a, j), c] = (1 - w_aj) / (P' - 1) for c != a

with w = 1 - eps for the anchor itself and w = its cosine to the anchor, clamped to [0, 1],
for a neighbour; rows sum to 1 and no entry is negative.

Dimension letters: K memory slots, D embedding width, T tasks, P anchors drawn per task,
P' anchors kept (SOPs), k supports per SOP (the anchor and k - 1 neighbours), S = P' k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..distributed import world_size
from ..networks import full_precision_matmul
from ..partition import SeededSampler

SELECTIONS = ("uniform", "spread")


class AnchorSampler(SeededSampler):
    """Draws the ``[T, P]`` anchor slots of every step from its own seeded generator.

    Every rank seeds the same generator and steps it once per call, and the anchors are
    also broadcast from rank 0 (one small collective; a no-op on one process): the ranks
    hold the same anchors by construction, not by a global seed. The generator's state is
    in the state dict (``get_extra_state``), so a resumed run draws what an uninterrupted
    one would.

    Args:
        memory_size: K.
        tasks: T.
        anchors: P anchors per task, distinct within a task (the pool is the other K - P).
        seed: seed of the generator, the same on every rank.
    """

    def __init__(self, memory_size: int, tasks: int, anchors: int, seed: int = 0):
        super().__init__(seed)
        if not (tasks >= 1 and 1 <= anchors < memory_size):
            raise ValueError(f"need tasks >= 1 and 1 <= anchors < memory_size={memory_size}; got tasks={tasks}, anchors={anchors}")
        self.memory_size, self.tasks, self.anchors = memory_size, tasks, anchors

    def forward(self, device: torch.device | str = "cpu") -> Tensor:
        """The next anchors: LongTensor ``[T, P]``, a uniformly random P-subset of the K slots per task."""
        device = torch.device(device)
        noise = torch.rand(self.tasks, self.memory_size, generator=self.generator(device), device=device)  # [T, K]
        anchors = noise.topk(self.anchors, dim=1).indices  # [T, P]: the P largest of iid uniforms, a uniform subset
        return broadcast_from_main(anchors)

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, tasks={self.tasks}, anchors={self.anchors}, seed={self.seed}"


def broadcast_from_main(tensor: Tensor) -> Tensor:
    """Rank 0's ``tensor`` on every rank (in place); a no-op on one process."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def nearest_neighbours(memory: Tensor, anchors: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each anchor's ``k`` nearest slots (cosine) in its task's pool, exact and in float32.

    One matrix product for all tasks; each task's own anchors are masked out of its pool
    before ``topk``. Autocast is off: a bf16 ranking of K cosines is not the fp32 one.

    Args:
        memory: ``[K, D]`` unit vectors.
        anchors: ``[T, P]`` slot indices, distinct within a task.
        k: neighbours per anchor (k - 1 of the paper's k supports), ``k <= K - P``.

    Returns:
        ``(scores [T, P, k], slots [T, P, k])``, nearest first; scores float32 (float64 stays).
    """
    n_tasks, n_anchors = anchors.shape
    if not 0 <= k <= memory.shape[0] - n_anchors:
        raise ValueError(f"k={k} neighbours must be in [0, K - P = {memory.shape[0] - n_anchors}]")
    if k == 0:  # anchors alone (SOP-MIM's patch task): no search
        return memory.new_empty(n_tasks, n_anchors, 0, dtype=torch.promote_types(memory.dtype, torch.float32)), anchors.new_empty(n_tasks, n_anchors, 0)
    queries = memory.index_select(0, anchors.flatten())  # [T*P, D]
    scores = full_precision_matmul(queries, memory.t()).view(n_tasks, n_anchors, -1)  # [T, P, K]
    own_anchors = anchors[:, None, :].expand(n_tasks, n_anchors, n_anchors)  # [T, P, P]
    scores.scatter_(2, own_anchors, float("-inf"))  # the pool is the rest of the memory
    return scores.topk(k, dim=2)


def keep_anchors(neighbour_scores: Tensor, kept: int, selection: str = "uniform", generator: torch.Generator | None = None) -> Tensor:
    """Which P' of each task's P anchors become SOPs: positions ``[T, P']`` into the anchors.

    ``"uniform"``: the first P' (the anchors are already in random order): what the
    official "low-energy" selection does in effect. ``"spread"``: drawn without replacement
    with weights ``max(mean, 0) / (std + 1e-6)`` of each anchor's neighbour scores (the
    inverse coefficient of variation that the official code means to use: anchors whose
    neighbours are uniformly close), floored at 1e-12 so that there are always P' to draw.

    Args:
        neighbour_scores: ``[T, P, k - 1]`` cosines of each anchor's neighbours.
        kept: P'.
        selection: ``"uniform"`` or ``"spread"`` (needs k - 1 >= 2).
        generator: the random source of ``"spread"`` (the anchor sampler's).
    """
    n_tasks, n_anchors, n_neighbours = neighbour_scores.shape
    if not 1 <= kept <= n_anchors:
        raise ValueError(f"kept={kept} anchors must be in [1, P={n_anchors}]")
    if selection == "uniform":
        return torch.arange(kept, device=neighbour_scores.device).expand(n_tasks, kept)
    if selection != "spread":
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if n_neighbours < 2:
        raise ValueError(f"the spread selection needs >= 2 neighbours per anchor for a standard deviation, got {n_neighbours}")
    scores = neighbour_scores.float()
    weights = scores.mean(-1).clamp(min=0) / (scores.std(-1) + 1e-6)  # [T, P]
    weights = weights.nan_to_num(0.0).clamp(min=1e-12)
    return broadcast_from_main(torch.multinomial(weights, kept, replacement=False, generator=generator))


def voting_matrix(support_scores: Tensor, smoothing: float = 0.1) -> Tensor:
    """The votes ``Y`` ``[T, S, P']`` of supports whose cosines to their anchors are given.

    Args:
        support_scores: ``[T, P', k]`` each support's cosine to its own anchor, the anchor
            first (its own score is replaced by ``1 - smoothing``).
        smoothing: eps; the anchor's vote is ``1 - eps``.

    Returns:
        ``[T, P' k, P']``, float32 at least: row (a, j) gives ``w = clamp(score, 0, 1)`` to
        column a and ``(1 - w) / (P' - 1)`` to every other column (rows sum to 1).
    """
    n_tasks, n_sops, k = support_scores.shape
    if n_sops < 2:
        raise ValueError(f"votes need P' >= 2 prototypes (the rest of a vote goes to the others), got {n_sops}")
    w = support_scores.to(torch.promote_types(support_scores.dtype, torch.float32)).clamp(0.0, 1.0)
    w = torch.cat([torch.full_like(w[..., :1], 1.0 - smoothing), w[..., 1:]], dim=-1)  # [T, P', k]
    rest = (1.0 - w) / (n_sops - 1)  # [T, P', k]
    own = torch.eye(n_sops, dtype=torch.bool, device=w.device)[:, None, :]  # [P', 1, P']: column a of row (a, j)
    votes = torch.where(own, w[..., None], rest[..., None])  # [T, P', k, P']
    return votes.reshape(n_tasks, n_sops * k, n_sops)


@torch.no_grad()
def build_tasks(memory: Tensor, anchors: Tensor, *, kept: int, neighbours: int, smoothing: float = 0.1,
                selection: str = "uniform", generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The step's supports and votes from the memory and the drawn anchors (no gradient).

    Args:
        memory: ``[K, D]`` unit vectors.
        anchors: ``[T, P]`` from :class:`AnchorSampler`.
        kept: P', anchors kept per task.
        neighbours: k, supports per SOP (the anchor and its k - 1 nearest neighbours).
        smoothing: eps of :func:`voting_matrix`.
        selection, generator: see :func:`keep_anchors`.

    Returns:
        ``(supports [T, S], votes [T, S, P'])``: memory slots, each SOP's anchor followed by
        its neighbours, and :func:`voting_matrix` of their cosines to their anchors.
    """
    scores, slots = nearest_neighbours(memory, anchors, neighbours - 1)  # [T, P, k-1] each
    keep = keep_anchors(scores, kept, selection, generator)  # [T, P']
    kept_anchors = anchors.gather(1, keep)  # [T, P']
    kept_slots = slots.gather(1, keep[..., None].expand(-1, -1, neighbours - 1))  # [T, P', k-1]
    supports = torch.cat([kept_anchors[..., None], kept_slots], dim=-1)  # [T, P', k]
    # Each support's cosine to its anchor, from the supports themselves (fp32, autocast off).
    with torch.autocast(memory.device.type, enabled=False):
        e = memory.float()[supports]  # [T, P', k, D]
        support_scores = (e * e[:, :, :1]).sum(-1)  # [T, P', k]
    return supports.flatten(1), voting_matrix(support_scores, smoothing)
