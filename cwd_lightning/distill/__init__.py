"""The engine, the same for every task: the DistillationModule, its terms and the distiller that records and
compares the tapped tensors, the connectors, the teacher and where its tensors come from, the guards, the terms'
weight schedules and calibrations, the time budget."""

from cwd_lightning.distill.budget import TimeBudget
from cwd_lightning.distill.cached_run import TeacherCacheOptions
from cwd_lightning.distill.connectors import build_connector, match_size
from cwd_lightning.distill.distiller import Distiller, DistillPair, StepContext
from cwd_lightning.distill.guards import NonFiniteGuard
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.distill.recorder import ForwardRecorder
from cwd_lightning.distill.teacher import CachedTeacher, LiveTeacher, fingerprint, fingerprint_file
from cwd_lightning.distill.teacher_cache import TeacherCache
from cwd_lightning.distill.terms import DistillTerm
from cwd_lightning.distill.weights import Calibration, WeightSchedule

__all__ = [
    "CachedTeacher",
    "Calibration",
    "DistillPair",
    "DistillTerm",
    "DistillationModule",
    "Distiller",
    "ForwardRecorder",
    "LiveTeacher",
    "NonFiniteGuard",
    "StepContext",
    "TeacherCache",
    "TeacherCacheOptions",
    "TimeBudget",
    "WeightSchedule",
    "build_connector",
    "fingerprint",
    "fingerprint_file",
    "match_size",
]
