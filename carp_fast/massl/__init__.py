"""MaSSL on carp_fast's machinery: a memory of teacher embeddings in place of prototypes.

Silva & Ramirez Rivera, "Learning from Memory: A Non-Parametric Memory Augmented
Self-Supervised Learning of Visual Features", ICML 2024 (official code: github sthalles/MaSSL).
The student, EMA teacher, multi-crop views, random partitions, callbacks, pipelines and
checkpoints are CARP's; this package adds what differs:

    memory        Memory: FIFO of teacher embeddings [K, D], all-gathered writes
    loss          massl_block_loss, MaSSLLoss, MaSSLOutput
    temperature   teacher_temperature, TeacherTemperatureWarmup (the tau_t warm-up)
    networks      build_backbone (timm ViT-S/16, ViT-B/16, ResNets), MaSSLHead, MaSSLStudentTeacher
    clipping      clip_per_parameter, ClipGradPerParameter (the official per-parameter clipping)
    stats         MaSSLStats
    learner       MaSSLConfig, massl_learner, build_massl_model
    export        export_massl_backbone
"""

from .learner import MaSSLConfig, build_massl_model, massl_learner
from .loss import MaSSLLoss, MaSSLOutput, massl_block_loss
from .memory import Memory
from .networks import MaSSLHead, MaSSLStudentTeacher, build_backbone
from .temperature import TeacherTemperatureWarmup, teacher_temperature

__all__ = [
    "MaSSLConfig", "MaSSLHead", "MaSSLLoss", "MaSSLOutput", "MaSSLStudentTeacher", "Memory", "TeacherTemperatureWarmup",
    "build_backbone", "build_massl_model", "massl_block_loss", "massl_learner", "teacher_temperature",
]
