"""carp_fast: high-throughput CARP self-supervised training (fastai + Accelerate + DALI).

Public API:
    carp_fast.method      MethodConfig, Method: the seam every method is an instance of
    carp_fast.carp        CARPConfig, CARPStudentTeacher, CARP, carp_learner
    carp_fast.massl       MaSSLConfig, MaSSLStudentTeacher, MASSL, massl_learner
    carp_fast.learner     method_learner, PretrainLearner: the one Learner of every method
    carp_fast.run         pretrain (the steps of a run), TrainSettings
    carp_fast.budget      plan_steps, replan, Plan: a time budget's arithmetic (pure functions)
    carp_fast.loss        random_partition, carp_loss, carp_block_loss, CARPLoss, CARPLossParts, BlockLogits
    carp_fast.networks    StudentTeacher, Branch, ProjectionHead, Prototypes
    carp_fast.backbones   build_backbone, ARCHITECTURES (ResNets and ViTs)
    carp_fast.export      export_backbone
    carp_fast.lars        LARS
    carp_fast.callbacks   TeacherEMA, CARPStats, KNNMonitor, Autocast, GradientAccumulation, ...
    carp_fast.eval        k-NN, k-means, linear, few-shot, retrieval, load_backbone
"""

from .backbones import ARCHITECTURES, build_backbone
from .loss import BlockLogits, CARPLoss, CARPLossParts, carp_block_loss, carp_loss, random_partition
from .networks import Branch, Prototypes, ProjectionHead, StudentTeacher

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "BlockLogits", "Branch", "CARPLoss", "CARPLossParts", "Prototypes", "ProjectionHead", "StudentTeacher",
    "build_backbone", "carp_block_loss", "carp_loss", "random_partition",
]
