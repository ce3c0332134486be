"""carp_fast: high-throughput CARP self-supervised training (fastai + Accelerate + DALI).

Public API:
    carp_fast.loss        random_partition, carp_loss, carp_block_loss, CARPLoss, CARPLossParts, BlockLogits
    carp_fast.networks    StudentTeacher, CARPNetwork, ProjectionHead, Prototypes, CARPOutput
    carp_fast.backbones   build_backbone
    carp_fast.lars        LARS
    carp_fast.learner     CARPConfig, carp_learner, build_model
    carp_fast.callbacks   TeacherEMA, CARPStats, KNNMonitor, Autocast, GradientAccumulation, ...
    carp_fast.eval        k-NN, k-means, linear, few-shot, retrieval, load_backbone
"""

from .backbones import build_backbone
from .loss import BlockLogits, CARPLoss, CARPLossParts, carp_block_loss, carp_loss, random_partition
from .networks import CARPNetwork, CARPOutput, Prototypes, ProjectionHead, StudentTeacher

__version__ = "0.1.0"

__all__ = [
    "BlockLogits", "CARPLoss", "CARPLossParts", "CARPNetwork", "CARPOutput", "Prototypes", "ProjectionHead", "StudentTeacher",
    "build_backbone", "carp_block_loss", "carp_loss", "random_partition",
]
