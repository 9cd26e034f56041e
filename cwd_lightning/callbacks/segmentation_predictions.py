"""Segmentation predictions in W&B: overlays, per-class IoU, confusion matrix."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from cwd_lightning.analysis.render import confusion_figure, figure_to_array, prediction_grid
from cwd_lightning.callbacks.fixed_batch import FixedBatchCallback
from cwd_lightning.distill.distiller import evaluating


class SegmentationPredictionMonitor(FixedBatchCallback):
    """Every ``every_n_epochs`` validations and at the end of training, logs to W&B:

    - ``predictions/overlays``: input | ground truth | teacher | student, in the dataset palette, for
      ``num_images`` samples of a fixed validation batch;
    - ``predictions/per_class_iou`` (table) and ``per_class_iou_bar`` from the validation just run;
    - ``predictions/confusion``: the row-normalised confusion matrix of the whole validation set.
    """

    def __init__(self, every_n_epochs: int = 2, num_images: int = 4) -> None:
        super().__init__(every_n_epochs, num_samples=num_images)

    def log_batch(self, trainer: L.Trainer, module: L.LightningModule, logger: WandbLogger, batch: Any) -> None:
        import wandb

        images, masks = batch
        columns = {"ground truth": masks.cpu().numpy()}
        teacher = getattr(module, "teacher", None)
        predicted = module.task.predict(teacher, images) if teacher is not None else None
        if predicted is not None:  # a feature teacher (a ViT's maps) has no class map to show
            columns["teacher"] = predicted.cpu().numpy()
        with evaluating(module.student):
            columns["student"] = module.task.predict(module.student, images).cpu().numpy()
        shown = [self.display_image(trainer, image) for image in images]
        payload: dict[str, Any] = {
            "trainer/global_step": trainer.global_step,
            "predictions/overlays": wandb.Image(figure_to_array(prediction_grid(shown, columns))),
        }
        names = module.task.class_names
        ious = trainer.callback_metrics
        if all(f"val/IoU/{name}" in ious for name in names):
            table = wandb.Table(columns=["class", "iou"], data=[[n, float(ious[f"val/IoU/{n}"])] for n in names])
            payload["predictions/per_class_iou"] = table
            payload["predictions/per_class_iou_bar"] = wandb.plot.bar(table, "class", "iou", title="val IoU per class")
        confusion = getattr(module.task, "last_confusion", None)
        if confusion is not None:
            figure = confusion_figure(confusion.numpy(), names, title=f"val confusion, step {trainer.global_step}")
            payload["predictions/confusion"] = wandb.Image(figure_to_array(figure))
        logger.experiment.log(payload)
