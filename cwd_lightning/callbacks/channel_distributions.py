"""Watch CWD at work: teacher vs student spatial distributions per channel, logged to W&B."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from cwd_lightning.analysis.channel_maps import channel_entropy, channel_kl, spatial_distributions, top_k_channels
from cwd_lightning.analysis.render import channel_grid, figure_to_array
from cwd_lightning.callbacks.fixed_batch import FixedBatchCallback


class ChannelDistributionMonitor(FixedBatchCallback):
    """For every distillation term (and every pair of an expanded term), on one fixed validation
    batch every ``every_n_epochs`` validation epochs and at the end of training:

    - an image grid of the ``top_k`` channels with the largest teacher–student KL: input | teacher
      map | student map, softmax over H·W at the term's τ, one colour scale;
    - the per-channel KL of all channels as a W&B table and bar chart, and as a histogram over
      training; the per-channel entropy of teacher and student maps.

    It runs outside the training step on one batch; its own time is logged as ``channels/seconds``.
    A no-op without a ``WandbLogger``.
    """

    def __init__(self, every_n_epochs: int = 1, top_k: int = 4, sample_index: int = 0) -> None:
        super().__init__(every_n_epochs)
        self.top_k = top_k
        self.sample_index = sample_index

    def log_batch(self, trainer: L.Trainer, module: L.LightningModule, logger: WandbLogger, batch: Any) -> None:
        if not getattr(module, "terms", None):
            return
        import wandb

        started = time.perf_counter()
        pairs = module.distillation_pairs(batch)
        image = self.display_image(module, batch)
        payload: dict[str, Any] = {}
        for key, (student, teacher, tau, channel_names) in pairs.items():
            p_student = spatial_distributions(student, tau)
            p_teacher = spatial_distributions(teacher, tau)
            kl = channel_kl(p_teacher, p_student).mean(0)  # averaged over the batch, per channel
            entropy_teacher = channel_entropy(p_teacher).mean(0)
            entropy_student = channel_entropy(p_student).mean(0)
            index = min(self.sample_index, p_student.shape[0] - 1)
            sample_kl = channel_kl(p_teacher[index : index + 1], p_student[index : index + 1])[0]
            channels = top_k_channels(sample_kl, self.top_k)
            figure = channel_grid(
                image,
                p_teacher[index].cpu().numpy(),
                p_student[index].cpu().numpy(),
                channels,
                channel_names,
                [float(sample_kl[c]) for c in channels],
                title=f"{key} · τ={tau:g} · step {trainer.global_step} · top-{len(channels)} KL channels",
            )
            names = channel_names or [str(c) for c in range(len(kl))]
            table = wandb.Table(
                columns=["channel", "name", "kl", "entropy_teacher", "entropy_student"],
                data=[
                    [c, names[c], float(kl[c]), float(entropy_teacher[c]), float(entropy_student[c])]
                    for c in range(len(kl))
                ],
            )
            payload.update(
                {
                    f"channels/{key}/maps": wandb.Image(figure_to_array(figure)),
                    f"channels/{key}/kl_table": table,
                    f"channels/{key}/kl_bar": wandb.plot.bar(table, "name", "kl", title=f"per-channel KL · {key}"),
                    f"channels/{key}/kl_hist": wandb.Histogram(kl.cpu().numpy()),
                    f"channels/{key}/entropy_teacher": float(entropy_teacher.mean()),
                    f"channels/{key}/entropy_student": float(entropy_student.mean()),
                }
            )
        payload["channels/seconds"] = time.perf_counter() - started
        payload["trainer/global_step"] = trainer.global_step
        logger.experiment.log(payload)
        self.seconds_spent += payload["channels/seconds"]

    @staticmethod
    def display_image(module: L.LightningModule, batch: Any, index: int = 0) -> np.ndarray:
        """The input image of sample ``index``, de-normalised to H×W×3 uint8 for display."""
        images = module.task.batch_inputs(batch)
        image = images[index].detach().float().cpu()
        mean = torch.tensor(getattr(module.task, "mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
        std = torch.tensor(getattr(module.task, "std", (0.229, 0.224, 0.225))).view(3, 1, 1)
        return ((image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
