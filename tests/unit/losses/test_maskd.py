"""MasKD against float64 references (the masked error, the preparation's loss and Dice diversity), and the
engine's preparation stage: the tokens trained once on the teacher, frozen, restored on resume, not retrained."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cwd_lightning.distill import DistillTerm
from cwd_lightning.losses import MasKD
from cwd_lightning.runs.record import RunRecord
from tests.helpers import cwd_module, random_maps, tiny_datamodule

N, C, H, W = 2, 4, 5, 6


def built(tokens: int = 3, steps: int = 5) -> MasKD:
    torch.manual_seed(0)
    loss = MasKD(num_tokens=tokens, prepare_steps=steps)
    loss.build(torch.Size((N, C, H, W)), torch.Size((N, C, H, W)))
    with torch.no_grad():
        loss.tokens.normal_(0, 0.5)  # masks away from 0.5 everywhere
    return loss


def reference_masks(loss: MasKD, teacher) -> torch.Tensor:
    tokens, teacher = loss.tokens.detach().double(), teacher.double()
    masks = torch.empty(N, tokens.shape[0], H, W, dtype=torch.float64)
    for n in range(N):
        for t in range(tokens.shape[0]):
            for h in range(H):
                for w in range(W):
                    masks[n, t, h, w] = torch.sigmoid((tokens[t] * teacher[n, :, h, w]).sum())
    return masks


def test_masked_error_matches_a_float64_reference():
    loss = built()
    student, teacher = random_maps(N, C, H, W, seed=1), random_maps(N, C, H, W, seed=2)
    masks = reference_masks(loss, teacher)
    total, count = 0.0, 0
    for n in range(N):
        for t in range(masks.shape[1]):
            area = float(masks[n, t].sum())
            for c in range(C):
                squares = ((masks[n, t] * (student[n, c].double() - teacher[n, c].double())) ** 2).sum()
                total += float(squares) / (area + 1e-5)
                count += 1
    assert loss(student, teacher).item() == pytest.approx(0.5 * total / count, rel=1e-5)
    assert loss(teacher, teacher.clone()).item() == 0.0


def test_distillation_gradient_reaches_the_student_only():
    loss = built()
    student = random_maps(N, C, H, W, seed=3).requires_grad_(True)
    teacher = random_maps(N, C, H, W, seed=4).requires_grad_(True)
    loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None and loss.tokens.grad is None


def test_preparation_loss_is_cross_entropy_of_the_masked_teacher_plus_dice():
    loss = built()
    teacher = random_maps(N, C, H, W, seed=5, scale=2.0)
    labels = torch.randint(0, C, (N, H, W), generator=torch.Generator().manual_seed(0))
    labels[0, 0, :3] = 255
    masks = reference_masks(loss, teacher)
    rebuilt = (teacher.double().unsqueeze(1) * masks.unsqueeze(2)).sum(1)
    cross_entropy = F.cross_entropy(rebuilt, labels, ignore_index=255)
    dice, pairs = 0.0, 0
    for n in range(N):
        for i in range(masks.shape[1]):
            for j in range(masks.shape[1]):
                if i != j:
                    a, b = masks[n, i].flatten(), masks[n, j].flatten()
                    dice += float(2 * (a * b).sum() / ((a * a).sum() + (b * b).sum() + 2e-12))
                    pairs += 1
    assert not loss.tokens.requires_grad  # frozen but during the preparation, which turns their gradient on
    loss.tokens.requires_grad_(True)
    value = loss.prepare_loss(teacher.requires_grad_(True), labels=labels, ignore_index=255)
    assert value.item() == pytest.approx(float(cross_entropy) + dice / pairs, rel=1e-5)
    value.backward()
    assert loss.tokens.grad.abs().sum() > 0 and teacher.grad is None  # the tokens learn, the teacher does not


@pytest.mark.parametrize(("kwargs", "match"), [({"num_tokens": 1}, "num_tokens"), ({"prepare_steps": 0}, "prepare")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MasKD(**kwargs)


class Prepared(L.Callback):
    """The tokens when the first training step starts."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if not hasattr(self, "tokens"):
            self.tokens = next(module.distiller.iter_pairs()).loss.tokens.detach().clone()


def maskd_module(teacher_file, steps: int = 3):
    term = DistillTerm("maskd_logits", "segmentation_head", "segmentation_head", MasKD(4, prepare_steps=steps), 1.0)
    return cwd_module(teacher_file, [term], lr_schedule="constant")


def test_the_tokens_are_prepared_once_frozen_and_restored_on_resume(teacher_file, tiny_shapes, tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = maskd_module(teacher_file)
    loss = next(module.distiller.iter_pairs()).loss
    initial = loss.tokens.detach().clone()
    assert not bool(loss.prepared)
    assert all(p is not loss.tokens for p in module.trainable_parameters())  # never the student's optimiser's
    seen = Prepared()
    from cwd_lightning.distill import preparation

    prepared = []
    monkeypatch.setattr("cwd_lightning.distill.module.prepare_losses",
                        lambda module: prepared.append(preparation.prepare_losses(module)))  # fmt: skip
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[seen, RunRecord(None)])  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))
    assert len(prepared) == 1  # prepared once, before the first step
    assert bool(loss.prepared) and trainer.global_step == 3  # preparation steps are not training steps
    assert not loss.tokens.requires_grad  # frozen after it
    assert not torch.equal(seen.tokens, initial)  # prepared before the first step
    assert torch.equal(loss.tokens, seen.tokens)  # and frozen while distilling
    path = tmp_path / "maskd.ckpt"
    trainer.save_checkpoint(path)

    calls = []
    monkeypatch.setattr("cwd_lightning.distill.module.prepare_losses", lambda module: calls.append(module))
    torch.manual_seed(1)  # other initial tokens: only the checkpoint can give the prepared ones back
    resumed = maskd_module(teacher_file)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)  # fmt: skip
    trainer.fit(resumed, tiny_datamodule(tiny_shapes), ckpt_path=str(path))
    restored = next(resumed.distiller.iter_pairs()).loss
    assert calls == [] and bool(restored.prepared) and torch.equal(restored.tokens, loss.tokens)
