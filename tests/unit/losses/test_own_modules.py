"""The losses with modules of their own (FitNets, MGD, holistic adversarial) against float64 references: built
from the shapes, gradients to the student and their own modules only, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.losses import (
    DistillationLoss,
    FitNets,
    HolisticAdversarial,
    MaskedGenerativeDistillation,
)
from tests.helpers import H, N, W, random_maps


def built_fitnets(student_channels: int, teacher_channels: int) -> FitNets:
    loss = FitNets()
    loss.build(torch.Size((N, student_channels, H, W)), torch.Size((N, teacher_channels, H, W)))
    return loss


def test_fitnets_build_creates_a_bias_free_1x1_regressor():
    loss = built_fitnets(3, 5)
    assert isinstance(loss, DistillationLoss)
    regressor = loss.regressor
    assert isinstance(regressor, nn.Conv2d)
    assert (regressor.in_channels, regressor.out_channels) == (3, 5)
    assert regressor.kernel_size == (1, 1) and regressor.bias is None
    assert regressor.weight.shape == (5, 3, 1, 1)
    assert [p is regressor.weight for p in loss.parameters()] == [True]
    assert loss.auxiliary_parameters() == [] and loss.auxiliary_optimizer is None


def test_fitnets_value_matches_float64_einsum_reference():
    loss = built_fitnets(3, 5)
    student, teacher = random_maps(N, 3, H, W, seed=20), random_maps(N, 5, H, W, seed=21)
    weight = loss.regressor.weight.detach().double()[:, :, 0, 0]  # C_t×C_s
    regressed = torch.einsum("oc,nchw->nohw", weight, student.double())
    expected = float((regressed - teacher.double()).pow(2).mean())
    value = loss(student, teacher)
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_fitnets_zero_with_identity_regressor_and_equal_maps():
    loss = built_fitnets(4, 4)
    with torch.no_grad():
        loss.regressor.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    maps = random_maps(N, 4, H, W, seed=22)
    assert loss(maps, maps.clone()).item() == pytest.approx(0.0, abs=1e-10)
    # and the regressor is applied even when C_s = C_t: a doubled weight gives mean(S²)
    with torch.no_grad():
        loss.regressor.weight.mul_(2.0)
    assert loss(maps, maps.clone()).item() == pytest.approx(float(maps.double().pow(2).mean()), rel=1e-5)


def test_fitnets_gradients_reach_student_and_regressor_not_teacher():
    loss = built_fitnets(3, 5)
    student = random_maps(N, 3, H, W, seed=23).requires_grad_(True)
    teacher = random_maps(N, 5, H, W, seed=24).requires_grad_(True)
    loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert loss.regressor.weight.grad is not None and loss.regressor.weight.grad.abs().sum() > 0


def test_fitnets_before_build_raises():
    with pytest.raises(RuntimeError, match="build"):
        FitNets()(torch.zeros(N, 3, H, W), torch.zeros(N, 5, H, W))


@pytest.mark.parametrize(
    "teacher_shape",
    [(N + 1, 5, H, W), (N, 5, H + 1, W), (N, 5, H, W + 1), (N, 5, H * W)],
    ids=["batch", "height", "width", "ndim"],
)
def test_fitnets_rejects_mismatched_n_h_w(teacher_shape):
    with pytest.raises(ValueError, match="same N, H, W"):
        built_fitnets(3, 5)(torch.zeros(N, 3, H, W), torch.zeros(*teacher_shape))


@pytest.mark.parametrize(("student_channels", "teacher_channels"), [(4, 5), (3, 6), (5, 3)])
def test_fitnets_rejects_channels_other_than_built_for(student_channels, teacher_channels):
    with pytest.raises(ValueError, match="3 → 5"):
        built_fitnets(3, 5)(torch.zeros(N, student_channels, H, W), torch.zeros(N, teacher_channels, H, W))


def built_mgd(student_channels: int, teacher_channels: int, mask_ratio: float, h: int = H, w: int = W, n: int = N):
    loss = MaskedGenerativeDistillation(mask_ratio)
    loss.build(torch.Size((n, student_channels, h, w)), torch.Size((n, teacher_channels, h, w)))
    return loss


def reference_mgd(loss: MaskedGenerativeDistillation, student: Tensor, teacher: Tensor, keep: Tensor | None) -> float:
    """Σ (G(align(S) ⊙ M) − T)² / N in float64, G and align re-implemented with F.conv2d on the weights."""
    x = student.double()
    if isinstance(loss.align, nn.Conv2d):
        x = F.conv2d(x, loss.align.weight.detach().double(), loss.align.bias.detach().double())
    if keep is not None:
        x = x * keep.double()
    first, _, second = loss.generator
    x = F.conv2d(x, first.weight.detach().double(), first.bias.detach().double(), padding=1)
    x = F.relu(x)
    x = F.conv2d(x, second.weight.detach().double(), second.bias.detach().double(), padding=1)
    return float((x - teacher.double()).pow(2).sum() / student.shape[0])


class Recorder(nn.Module):
    """Stands in for the generator: returns its input and keeps a copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return x


def test_mgd_build_with_different_channels():
    loss = built_mgd(3, 5, 0.75)
    assert isinstance(loss, DistillationLoss)
    align = loss.align
    assert isinstance(align, nn.Conv2d)
    assert (align.in_channels, align.out_channels, align.kernel_size) == (3, 5, (1, 1))
    assert align.bias is not None
    generator = loss.generator
    assert isinstance(generator, nn.Sequential) and len(generator) == 3
    first, relu, second = generator
    assert isinstance(relu, nn.ReLU)
    for conv in (first, second):
        assert isinstance(conv, nn.Conv2d)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (5, 5, (3, 3), (1, 1))
        assert conv.bias is not None
    assert loss.auxiliary_parameters() == [] and loss.auxiliary_optimizer is None


def test_mgd_build_with_equal_channels_has_identity_align():
    loss = built_mgd(4, 4, 0.75)
    assert isinstance(loss.align, nn.Identity)
    assert loss.generator[0].in_channels == 4 and loss.generator[2].out_channels == 4
    names = {name for name, _ in loss.named_parameters()}
    assert names == {"generator.0.weight", "generator.0.bias", "generator.2.weight", "generator.2.bias"}


@pytest.mark.parametrize(("student_channels", "teacher_channels"), [(3, 5), (4, 4)])
def test_mgd_unmasked_value_matches_float64_reference(student_channels, teacher_channels):
    loss = built_mgd(student_channels, teacher_channels, 0.0)
    student = random_maps(N, student_channels, H, W, seed=30)
    teacher = random_maps(N, teacher_channels, H, W, seed=31)
    expected = reference_mgd(loss, student, teacher, keep=None)
    value = loss(student, teacher)
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_mgd_masked_value_is_seeded_and_matches_reproduced_mask():
    loss = built_mgd(3, 5, 0.75)
    unmasked = built_mgd(3, 5, 0.0)
    unmasked.load_state_dict(loss.state_dict())
    student, teacher = random_maps(N, 3, H, W, seed=32), random_maps(N, 5, H, W, seed=33)

    torch.manual_seed(123)
    first = loss(student, teacher).item()
    torch.manual_seed(123)
    again = loss(student, teacher).item()
    assert first == again
    torch.manual_seed(124)
    assert loss(student, teacher).item() != pytest.approx(first, rel=1e-6)
    assert first != pytest.approx(unmasked(student, teacher).item(), rel=1e-3)

    torch.manual_seed(123)
    keep = torch.rand(N, 1, H, W) >= 0.75
    assert first == pytest.approx(reference_mgd(loss, student, teacher, keep), rel=1e-5)


def test_mgd_mask_fraction_and_layout():
    n, c, h, w = 8, 2, 64, 64
    loss = built_mgd(c, c, 0.75, h, w, n)
    recorder = Recorder()
    loss.generator = recorder
    ones = torch.ones(n, c, h, w)
    torch.manual_seed(7)
    loss(ones, torch.zeros(n, c, h, w))
    (masked,) = recorder.seen
    assert masked.shape == (n, c, h, w)
    assert set(masked.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masked[:, 0], masked[:, 1])  # one mask per position, shared by the channels
    fraction = (masked[:, 0] == 0).double().mean().item()
    assert fraction == pytest.approx(0.75, abs=0.02)
    per_sample = (masked[:, 0] == 0).double().mean(dim=(1, 2))
    assert ((per_sample - 0.75).abs() < 0.05).all()
    assert not torch.equal(masked[0], masked[1])  # a mask per sample
    torch.manual_seed(7)
    assert torch.equal(masked[:, :1], (torch.rand(n, 1, h, w) >= 0.75).float())
    # with Identity align and generator the value is Σ (S ⊙ M − 0)² / N = kept positions × C / N
    torch.manual_seed(7)
    assert loss(ones, torch.zeros(n, c, h, w)).item() == pytest.approx(masked.sum().item() / n, rel=1e-6)


def test_mgd_zero_mask_ratio_masks_nothing():
    loss = built_mgd(2, 2, 0.0, 16, 16)
    loss.generator = Recorder()
    loss(torch.ones(N, 2, 16, 16), torch.zeros(N, 2, 16, 16))
    assert torch.equal(loss.generator.seen[0], torch.ones(N, 2, 16, 16))


def test_mgd_gradients_reach_student_align_generator_not_teacher():
    loss = built_mgd(3, 5, 0.5)
    student = random_maps(N, 3, H, W, seed=34).requires_grad_(True)
    teacher = random_maps(N, 5, H, W, seed=35).requires_grad_(True)
    torch.manual_seed(0)
    loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    for name, parameter in loss.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert {name.split(".")[0] for name, _ in loss.named_parameters()} == {"align", "generator"}


@pytest.mark.parametrize("mask_ratio", [-0.1, 1.0, 1.5])
def test_mgd_rejects_mask_ratio_outside_unit_interval(mask_ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedGenerativeDistillation(mask_ratio)


def test_mgd_before_build_raises():
    with pytest.raises(RuntimeError, match="build"):
        MaskedGenerativeDistillation(0.5)(torch.zeros(N, 3, H, W), torch.zeros(N, 5, H, W))


def test_mgd_rejects_teacher_channels_other_than_built_for_and_bad_shapes():
    loss = built_mgd(3, 5, 0.5)
    with pytest.raises(ValueError, match="built for 3 → 5 channels"):
        loss(torch.zeros(N, 3, H, W), torch.zeros(N, 6, H, W))
    with pytest.raises(ValueError, match="same N, H, W"):
        loss(torch.zeros(N, 3, H, W), torch.zeros(N, 5, H + 1, W))


CLASSES = 19


def built_holistic(size: int = 32, classes: int = CLASSES, **kwargs) -> HolisticAdversarial:
    """Width 16 (a quarter of the reference's 64) keeps the value tests fast; the size test uses 64."""
    kwargs.setdefault("width", 16)
    loss = HolisticAdversarial(**kwargs)
    shape = torch.Size((N, classes, size, size))
    loss.build(shape, shape)
    return loss


def holistic_pair(size: int = 32, classes: int = CLASSES) -> tuple[Tensor, Tensor]:
    return random_maps(N, classes, size, size, seed=40), random_maps(N, classes, size, size, seed=41, scale=2.0)


def double_discriminator(loss: HolisticAdversarial) -> nn.Module:
    """An eval-mode float64 copy of the loss's discriminator, for the references."""
    return copy.deepcopy(loss.discriminator).double().eval()


def test_holistic_discriminator_size_and_output_at_64():
    loss = built_holistic(64, width=64)
    assert isinstance(loss, DistillationLoss)
    count = sum(p.numel() for p in loss.discriminator.parameters())
    assert 3.0e6 <= count <= 3.4e6
    assert loss.discriminator.last.kernel_size == (4, 4)
    assert loss.discriminator.preprocess.num_features == CLASSES
    loss.eval()
    with torch.no_grad():
        assert loss.discriminator(torch.randn(N, CLASSES, 64, 64)).shape == (N, 1, 1, 1)


def test_holistic_smaller_maps():
    loss = built_holistic(32)
    assert loss.discriminator.last.kernel_size == (2, 2)
    loss.eval()
    with torch.no_grad():
        assert loss.discriminator(torch.randn(N, CLASSES, 32, 32)).shape == (N, 1, 1, 1)
    assert built_holistic(16).discriminator.last.kernel_size == (1, 1)
    for shape in [(N, CLASSES, 15, 15), (N, CLASSES, 64, 8)]:
        with pytest.raises(ValueError, match="16×16"):
            HolisticAdversarial().build(torch.Size(shape), torch.Size(shape))


def test_holistic_forward_is_minus_mean_discriminator_score():
    loss = built_holistic(32)
    loss.eval()
    student, teacher = holistic_pair(32)
    value = loss(student, teacher)
    assert value.shape == ()
    with torch.no_grad():
        direct = -loss.discriminator(student).mean().item()
        reference = -double_discriminator(loss)(student.double()).mean().item()
    assert value.item() == pytest.approx(direct, rel=1e-6, abs=1e-7)
    assert value.item() == pytest.approx(reference, rel=1e-4, abs=1e-6)
    # it depends on the student only
    assert loss(student, torch.zeros_like(teacher)).item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)


def test_holistic_forward_gradient_to_student_only():
    loss = built_holistic(32)
    loss.eval()
    student, teacher = (t.requires_grad_(True) for t in holistic_pair(32))
    loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_holistic_hinge_auxiliary_loss_matches_reference():
    loss = built_holistic(32, gan_loss="hinge")
    loss.eval()
    student, teacher = holistic_pair(32)
    value = loss.auxiliary_loss(student, teacher)
    with torch.no_grad():
        discriminator = double_discriminator(loss)
        score_s, score_t = discriminator(student.double()), discriminator(teacher.double())
    expected = 0.1 * (F.relu(1 - score_t).mean() + F.relu(1 + score_s).mean()).item()
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_holistic_wgan_gp_auxiliary_loss_matches_reference():
    weight, penalty_weight = 0.1, 10.0
    loss = built_holistic(32, discriminator_weight=weight, gradient_penalty=penalty_weight)
    loss.eval()
    student, teacher = holistic_pair(32)
    torch.manual_seed(5)
    value = loss.auxiliary_loss(student, teacher)

    torch.manual_seed(5)
    alpha = torch.rand(N, 1, 1, 1)  # the loss draws nothing else from the RNG before α
    discriminator = double_discriminator(loss)
    s, t = student.double(), teacher.double()
    mixed = (alpha.double() * t + (1 - alpha.double()) * s).requires_grad_(True)
    (gradient,) = torch.autograd.grad(discriminator(mixed).sum(), mixed)
    norms = torch.sqrt(gradient.pow(2).sum(dim=(1, 2, 3)))
    penalty = (norms - 1).pow(2).mean()
    with torch.no_grad():
        wasserstein = discriminator(s).mean() - discriminator(t).mean()
    expected = (weight * wasserstein + weight * penalty_weight * penalty).item()
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # a different α gives a different penalty, the same seed the same value
    torch.manual_seed(6)
    assert loss.auxiliary_loss(student, teacher).item() != pytest.approx(value.item(), rel=1e-7)
    torch.manual_seed(5)
    assert loss.auxiliary_loss(student, teacher).item() == value.item()


@pytest.mark.parametrize("gan_loss", ["wgan_gp", "hinge"])
def test_holistic_auxiliary_loss_trains_the_discriminator_only(gan_loss):
    loss = built_holistic(16, gan_loss=gan_loss)
    student, teacher = (t.requires_grad_(True) for t in holistic_pair(16))
    torch.manual_seed(0)
    loss.auxiliary_loss(student, teacher).backward()
    assert student.grad is None and teacher.grad is None
    grads = [p.grad for p in loss.auxiliary_parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert loss.discriminator.last.weight.grad.abs().sum() > 0


def test_holistic_auxiliary_parameters_are_exactly_the_discriminators():
    assert HolisticAdversarial().auxiliary_parameters() == []
    loss = built_holistic(16)
    auxiliary = loss.auxiliary_parameters()
    own = list(loss.discriminator.parameters())
    assert len(auxiliary) == len(own) > 0
    assert all(a is b for a, b in zip(auxiliary, own, strict=True))
    assert {id(p) for p in loss.parameters()} == {id(p) for p in auxiliary}


def test_holistic_auxiliary_optimizer_is_adam_with_reference_settings():
    loss = built_holistic(16)
    optimizer = loss.auxiliary_optimizer(loss.auxiliary_parameters())
    assert type(optimizer) is torch.optim.Adam
    (group,) = optimizer.param_groups
    assert group["lr"] == pytest.approx(4e-4)
    assert tuple(group["betas"]) == pytest.approx((0.9, 0.99))
    assert len(group["params"]) == len(loss.auxiliary_parameters())
    custom = HolisticAdversarial(discriminator_lr=1e-3, discriminator_betas=(0.5, 0.9))
    group = custom.auxiliary_optimizer([nn.Parameter(torch.zeros(1))]).param_groups[0]
    assert group["lr"] == pytest.approx(1e-3) and tuple(group["betas"]) == pytest.approx((0.5, 0.9))


def test_holistic_before_build_and_bad_shapes_raise():
    with pytest.raises(RuntimeError, match="build"):
        HolisticAdversarial()(torch.zeros(N, 3, 16, 16), torch.zeros(N, 3, 16, 16))
    with pytest.raises(RuntimeError, match="build"):
        HolisticAdversarial().auxiliary_loss(torch.zeros(N, 3, 16, 16), torch.zeros(N, 3, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        built_holistic(16)(torch.zeros(N, CLASSES, 16, 16), torch.zeros(N, CLASSES + 1, 16, 16))


@pytest.mark.parametrize("gan_loss", ["wgan", "lsgan", "Hinge"])
def test_holistic_rejects_bad_gan_loss(gan_loss):
    with pytest.raises(ValueError, match="gan_loss"):
        HolisticAdversarial(gan_loss=gan_loss)


def test_mgd_rejects_student_channels_other_than_built_for():
    loss = MaskedGenerativeDistillation(0.5)
    loss.build(torch.Size((2, 4, 8, 8)), torch.Size((2, 4, 8, 8)))
    with pytest.raises(ValueError, match=r"built for 4 → 4 channels, got student \(2, 3, 8, 8\)"):
        loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
