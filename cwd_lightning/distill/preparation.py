"""The losses' preparation on the teacher alone, before distillation (``losses/base.py``: ``prepare_steps``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from cwd_lightning.distill.distiller import StepContext


def prepare_losses(module: Any) -> None:
    """Train every preparing pair's own parameters for its ``prepare_steps`` on the teachers' tensors of the
    training data (the live teachers, under ``no_grad``; the student not run), each with its own optimiser;
    under DDP every rank reads the same batches (the training loader, not split) and the gradients are averaged
    over the ranks, so every rank prepares the same parameters, as one process would. Then mark each loss
    prepared. Not counted as training steps (nor in a time budget)."""
    distiller, trainer = module.distiller, module.trainer
    pairs = distiller.preparing_pairs()
    if trainer.datamodule is None:
        raise ValueError(f"{type(pairs[0].loss).__name__} prepares on the training data: fit with a datamodule")
    for pair in pairs:
        for parameter in pair.loss.prepare_parameters():
            parameter.requires_grad_(True)  # for the preparation only (frozen before and after it)
    optimizers = [pair.loss.prepare_optimizer(pair.loss.prepare_parameters()) for pair in pairs]
    steps = max(int(pair.loss.prepare_steps) for pair in pairs)
    recorders = distiller.teacher_recorders
    done, last = 0, {}
    with torch.enable_grad():
        while done < steps:
            for batch in trainer.datamodule.train_dataloader():
                if done >= steps:
                    break
                batch = module.speed.inputs(module.transfer_batch_to_device(batch, module.device, 0))
                module.live_outputs.record(batch)
                context = StepContext(module.task.dense_labels(batch), module.task.ignore_index, done)
                try:
                    for pair, optimizer in zip(pairs, optimizers, strict=True):
                        if done >= pair.loss.prepare_steps:
                            continue
                        teacher = pair.teacher_tapped(recorders[pair.teacher_name]).detach()
                        value = pair.loss.prepare_loss(teacher, **context.for_loss(pair.declared.prepare_context,
                                                                                   teacher.shape[-2:]))  # fmt: skip
                        optimizer.zero_grad()
                        value.backward()
                        if trainer.world_size > 1:
                            for parameter in pair.loss.prepare_parameters():
                                if parameter.grad is not None:
                                    parameter.grad = trainer.strategy.reduce(parameter.grad, reduce_op="mean")
                        optimizer.step()
                        last[pair.key] = float(value.detach())
                finally:
                    distiller.clear()
                done += 1
    for pair in pairs:
        pair.loss.prepared.fill_(True)
        for parameter in pair.loss.prepare_parameters():
            parameter.requires_grad_(False)
    summary = ", ".join(f"{key} {value:.4g}" for key, value in last.items())
    rank_zero_info(f"prepared on the teacher for {steps} steps: last loss {summary}")
