"""Watch CWD at work: teacher vs student spatial distributions per channel, logged to W&B."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from cwd_lightning.analysis.channel_maps import channel_entropy, spatial_distributions, top_k_channels
from cwd_lightning.analysis.render import channel_grid, figure_to_array
from cwd_lightning.callbacks.fixed_batch import FixedBatchCallback
from cwd_lightning.distill.inspection import distillation_pairs
from cwd_lightning.losses import ChannelWiseDivergence


class ChannelDistributionMonitor(FixedBatchCallback):
    """For every distillation term (and every pair of an expanded term), on a fixed validation batch
    every ``every_n_epochs`` validations and at the end of training, logs to W&B:

    - ``channels/<term>/maps``: the ``top_k`` channels with the largest teacher–student KL on one
      sample, input | teacher map | student map, softmax over H·W at the term's τ, one colour scale;
    - ``channels/<term>/kl_table`` and ``kl_bar``: KL(T‖S) of every channel (batch mean) with the
      entropy of the teacher and student maps; ``kl_hist``: the KL distribution, one per call, so W&B
      shows it over training; ``entropy_teacher`` / ``entropy_student``: channel means.
    """

    def __init__(self, every_n_epochs: int = 1, top_k: int = 4, num_samples: int = 8, sample_index: int = 0) -> None:
        super().__init__(every_n_epochs, num_samples)
        self.top_k = top_k
        self.sample_index = sample_index

    def log_batch(self, trainer: L.Trainer, module: L.LightningModule, logger: WandbLogger, batch: Any) -> None:
        import wandb

        pairs = distillation_pairs(module, batch) if getattr(module, "distiller", None) is not None else {}
        if not pairs:
            return
        index = min(self.sample_index, len(module.task.batch_inputs(batch)) - 1)
        image = self.display_image(trainer, module.task.batch_inputs(batch)[index])
        payload: dict[str, Any] = {"trainer/global_step": trainer.global_step}
        for key, (student, teacher, tau, channel_names) in pairs.items():
            p_student, p_teacher = spatial_distributions(student, tau), spatial_distributions(teacher, tau)
            kl_per_sample = ChannelWiseDivergence(tau).kl_per_sample_channel(student, teacher)  # N×C, KL(T‖S)
            kl = kl_per_sample.mean(0)
            entropy_teacher = channel_entropy(p_teacher).mean(0)
            entropy_student = channel_entropy(p_student).mean(0)
            sample_kl = kl_per_sample[index]
            channels = top_k_channels(sample_kl, self.top_k)
            figure = channel_grid(
                image,
                p_teacher[index].cpu().numpy(),
                p_student[index].cpu().numpy(),
                channels,
                channel_names,
                [float(sample_kl[c]) for c in channels],
                title=f"{key} · τ={tau:g} · step {trainer.global_step} · top-{len(channels)} KL(T‖S) channels",
            )
            names = channel_names or [str(c) for c in range(len(kl))]
            rows = [
                [c, names[c], float(kl[c]), float(entropy_teacher[c]), float(entropy_student[c])]
                for c in range(len(kl))
            ]
            table = wandb.Table(columns=["channel", "name", "kl", "entropy_teacher", "entropy_student"], data=rows)
            payload.update(
                {
                    f"channels/{key}/maps": wandb.Image(
                        figure_to_array(figure), caption=f"{key}, step {trainer.global_step}"
                    ),
                    f"channels/{key}/kl_table": table,
                    f"channels/{key}/kl_bar": wandb.plot.bar(table, "name", "kl", title=f"per-channel KL(T‖S) · {key}"),
                    f"channels/{key}/kl_hist": wandb.Histogram(kl.cpu().numpy()),
                    f"channels/{key}/entropy_teacher": float(entropy_teacher.mean()),
                    f"channels/{key}/entropy_student": float(entropy_student.mean()),
                }
            )
        logger.experiment.log(payload)
