"""fastai callbacks for CARP; each works in any Learner whose model has the named parts."""

from .accumulation import GradientAccumulation
from .epoch_sync import EpochSync
from .data_wait import DataWait
from ..checkpoint import NonFiniteError, NonFiniteStateError
from .carp_stats import CARPStats, CollapseWarning, NonFiniteLossError, assignment_stats
from .knn_monitor import KNNMonitor
from .precision import Autocast, FP16MixedPrecision, precision_callbacks
from .progress import RichProgress
from .recorder import DeviceRecorder
from .metrics_logger import MetricsLogger
from .checkpointer import Checkpointer
from .time_budget import TimeBudget
from .preemption import EXIT_PREEMPTED, Preemption
from .teacher_ema import TeacherEMA, ema_update, teacher_momentum
from .entropy_weight import EntropyWeightSchedule, entropy_weight

__all__ = [
    "EXIT_PREEMPTED", "Autocast", "CARPStats", "Checkpointer", "Preemption", "FP16MixedPrecision", "MetricsLogger", "TimeBudget", "CollapseWarning", "DataWait", "DeviceRecorder", "EntropyWeightSchedule", "EpochSync", "GradientAccumulation", "KNNMonitor", "NonFiniteError", "NonFiniteLossError", "NonFiniteStateError",
    "RichProgress", "TeacherEMA", "assignment_stats", "ema_update", "entropy_weight", "precision_callbacks", "teacher_momentum",
]
