"""Holistic (adversarial) distillation of the score maps (Liu et al., "Structured Knowledge
Distillation for Semantic Segmentation", CVPR 2019), as the CWD authors' TorchDistiller and IFVD run
it: a SAGAN-style discriminator on the logits, WGAN-GP, trained by its own Adam optimiser."""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision


class SelfAttention(nn.Module):
    """SAGAN self-attention over positions: x + γ · softmax(QᵀK) V, γ starting at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.key = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        query, key, value = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # N×HW×HW
        return x + self.gamma * (value @ attention.transpose(1, 2)).view_as(x)


class Discriminator(nn.Module):
    """BN on the input score map, four spectral-normalised 4×4/2 convs (64-128-256-512, LeakyReLU 0.1)
    with self-attention after the third and fourth, then a 4×4 valid conv to one score per position
    (about 3.2 M parameters for 19 classes, as in the reference, which needs 65×65 maps). Smaller maps
    (≥ 16×16) get a last kernel of min(4, size/16) instead of failing."""

    def __init__(self, in_channels: int, width: int = 64, last_kernel: int = 4) -> None:
        super().__init__()

        def down(cin: int, cout: int) -> list[nn.Module]:
            return [spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]

        self.preprocess = nn.BatchNorm2d(in_channels)
        self.body = nn.Sequential(
            *down(in_channels, width),
            *down(width, 2 * width),
            *down(2 * width, 4 * width),
            SelfAttention(4 * width),
            *down(4 * width, 8 * width),
            SelfAttention(8 * width),
        )
        self.last = nn.Conv2d(8 * width, 1, last_kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.body(self.preprocess(x)))


def without_moving_state(module: nn.Module, inputs: Tensor) -> Tensor:
    """``module(inputs)`` as it runs in training (batch statistics), on copies of its buffers, so that its
    BatchNorm running statistics and spectral-norm vectors are left as they were (restoring them in place
    instead would break the backward pass, which reads them)."""
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
    return functional_call(module, buffers, (inputs,))


class HolisticAdversarial(DistillationLoss):
    """The student's score map should look like the teacher's to a discriminator D.

    Loss (the student's side): −E D(S); its weight is the reference λ_adv = 1e-3 (the term's weight).
    Auxiliary loss (D's side, its own optimiser, on detached maps), ``gan_loss``:
    - ``wgan_gp`` (TorchDistiller / IFVD): λ_d·(E D(S) − E D(T)) + λ_d·λ_gp·E(‖∇D(x̂)‖₂ − 1)²,
      x̂ = αT + (1−α)S, α ~ U(0, 1) per sample;
    - ``hinge`` (CIRKD): λ_d·(E ReLU(1 − D(T)) + E ReLU(1 + D(S))).
    Each E is the mean over D's output map. D is trained by Adam(lr 4e-4, betas 0.9/0.99), one step
    after each student step, constant lr (CIRKD; TorchDistiller also poly-decays it).

    Deviation from the references: they run D in train mode during the student's forward too, so every
    student step also moves D's BatchNorm running statistics and its spectral-norm vectors (one extra
    power iteration), a known way to distort a WGAN-GP critic. Here the student's step sees D with batch
    statistics as in training, but D's state is put back after it: only D's own update moves it.
    """

    def __init__(
        self,
        gan_loss: Literal["wgan_gp", "hinge"] = "wgan_gp",
        discriminator_weight: float = 0.1,
        gradient_penalty: float = 10.0,
        discriminator_lr: float = 4e-4,
        discriminator_betas: tuple[float, float] = (0.9, 0.99),
        width: int = 64,
    ) -> None:
        super().__init__()
        if gan_loss not in ("wgan_gp", "hinge"):
            raise ValueError(f"HolisticAdversarial: gan_loss must be 'wgan_gp' or 'hinge', got {gan_loss!r}")
        self.gan_loss = gan_loss
        self.discriminator_weight = discriminator_weight
        self.gradient_penalty = gradient_penalty
        self.width = width
        self.auxiliary_optimizer = partial(torch.optim.Adam, lr=discriminator_lr, betas=tuple(discriminator_betas))
        self.discriminator: Discriminator | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        smallest = min(teacher_shape[-2:])
        if smallest < 16:
            raise ValueError(
                f"HolisticAdversarial: the discriminator needs maps of at least 16×16, got {teacher_shape}"
            )
        self.discriminator = Discriminator(teacher_shape[1], self.width, last_kernel=min(4, smallest // 16))

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def _check(self, student: Tensor, teacher: Tensor) -> Discriminator:
        check_maps(type(self).__name__, student, teacher)
        if self.discriminator is None:
            raise RuntimeError("HolisticAdversarial: build() must run before the first call")
        return self.discriminator

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        discriminator = self._check(student, teacher)
        with full_precision(student):
            return -without_moving_state(discriminator, student.float()).mean()

    def auxiliary_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        discriminator = self._check(student, teacher)
        with full_precision(student):
            student, teacher = student.detach().float(), teacher.detach().float()
            score_student, score_teacher = discriminator(student), discriminator(teacher)
            if self.gan_loss == "hinge":
                return self.discriminator_weight * (F.relu(1 - score_teacher).mean() + F.relu(1 + score_student).mean())
            alpha = torch.rand(student.shape[0], 1, 1, 1, device=student.device)
            mixed = (alpha * teacher + (1 - alpha) * student).requires_grad_(True)
            (gradient,) = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
            penalty = (gradient.flatten(1).norm(dim=1) - 1).pow(2).mean()
            wasserstein = score_student.mean() - score_teacher.mean()
            return self.discriminator_weight * (wasserstein + self.gradient_penalty * penalty)

    def extra_repr(self) -> str:
        return f"gan_loss={self.gan_loss!r}, discriminator_weight={self.discriminator_weight}"
