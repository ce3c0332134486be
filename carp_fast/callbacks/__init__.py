"""fastai callbacks for CARP; each works in any Learner whose model has the named parts."""

from .accumulation import GradientAccumulation
from .carp_stats import CARPStats, CollapseWarning, assignment_stats
from .knn_monitor import KNNMonitor
from .precision import Autocast, precision_callbacks
from .progress import RichProgress
from .recorder import DeviceRecorder
from .teacher_ema import TeacherEMA, ema_update, teacher_momentum

__all__ = [
    "Autocast", "CARPStats", "CollapseWarning", "DeviceRecorder", "GradientAccumulation", "KNNMonitor",
    "RichProgress", "TeacherEMA", "assignment_stats", "ema_update", "precision_callbacks", "teacher_momentum",
]
