"""What differs per task: the task loss, the validation metrics, how to run a model for distillation, and
what the engine, the export and the tables need to know of a task."""

from cwd_lightning.tasks.base import Task, check_class_counts, monitored_metric
from cwd_lightning.tasks.detection import DetectionTask
from cwd_lightning.tasks.segmentation import SegmentationTask

__all__ = ["DetectionTask", "SegmentationTask", "Task", "check_class_counts", "monitored_metric"]
