"""MaSSL on carp_fast's method seam: a memory of teacher embeddings in place of prototypes.

Silva & Ramirez Rivera, "Learning from Memory: A Non-Parametric Memory Augmented
Self-Supervised Learning of Visual Features", ICML 2024 (official code: github sthalles/MaSSL).
The method is :mod:`carp_fast.massl.method` (its settings, model and :data:`MASSL`); the
student/teacher pair, learner, pipelines, checkpoints and export are shared with CARP. The
pieces only MaSSL uses:

    memory        Memory: FIFO of teacher embeddings [K, D], all-gathered writes
    loss          massl_block_loss, MaSSLLoss
    temperature   teacher_temperature, TeacherTemperatureWarmup (the tau_t warm-up)
    clipping      clip_per_parameter, ClipGradPerParameter (the official per-parameter clipping)
    stats         MaSSLStats
"""

from .loss import MaSSLLoss, massl_block_loss
from .memory import Memory
from .method import MASSL, MaSSLConfig, MaSSLStudentTeacher, build_model, massl_head, massl_learner
from .temperature import TeacherTemperatureWarmup, teacher_temperature

__all__ = [
    "MASSL", "MaSSLConfig", "MaSSLLoss", "MaSSLStudentTeacher", "Memory", "TeacherTemperatureWarmup",
    "build_model", "massl_block_loss", "massl_head", "massl_learner", "teacher_temperature",
]
