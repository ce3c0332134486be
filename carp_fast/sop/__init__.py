"""SOP on carp_fast's method seam: self-organizing prototypes built from a memory each step.

Silva, Pedrini & Ramirez Rivera, "Self-Organizing Visual Prototypes for Non-Parametric
Representation Learning", ICML 2025 (official code: github sthalles/sop). The method is
:mod:`carp_fast.sop.method` (its settings, model and :data:`SOP`); the memory, head, schedules
and clipping are MaSSL's, the learner, pipelines, checkpoints and export everyone's. The
pieces only SOP uses:

    prototypes   AnchorSampler, nearest_neighbours, keep_anchors, voting_matrix, build_tasks
    loss         sop_probabilities, sop_loss, mim_loss, koleo_loss, SOPLoss, SOPOutputs, SOPMIMOutputs
    mim          block_masks, vit_tokens (SOP-MIM's masked ViT forward)
"""

from .loss import SOPLoss, SOPMIMOutputs, SOPOutputs, koleo_loss, mim_loss, sop_loss, sop_probabilities
from .mim import block_masks, vit_tokens
from .method import SOP, SOPConfig, SOPStudentTeacher, build_model, sop_learner
from .prototypes import AnchorSampler, build_tasks, keep_anchors, nearest_neighbours, voting_matrix

__all__ = [
    "SOP", "AnchorSampler", "SOPConfig", "SOPLoss", "SOPMIMOutputs", "SOPOutputs", "SOPStudentTeacher", "block_masks", "build_model",
    "build_tasks", "keep_anchors", "koleo_loss", "mim_loss", "nearest_neighbours", "sop_learner", "sop_loss", "sop_probabilities",
    "vit_tokens", "voting_matrix",
]
