"""FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022), after the official
``yzd-v/FGD mmdet/distillation/losses/fgd.py`` (``FeatureLoss``): foreground and background imitation weighted by
the teacher's attention, an attention loss and a global relation loss; it asks for the batch's boxes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import align_conv, check_maps, full_precision


def box_masks(boxes: list[Tensor], size: torch.Size) -> tuple[Tensor, Tensor]:
    """N×H×W foreground and background masks from each image's M×4 boxes on an H×W grid (x1, y1, x2, y2 in
    grid cells): a box covers rows ⌊y1⌋ … ⌈y2⌉ and columns ⌊x1⌋ … ⌈x2⌉ with 1 / (its rows · its columns), the
    largest where boxes overlap; the background is 1 elsewhere, divided by its area (all 0 if there is none)."""
    height, width = size
    foreground = torch.zeros(len(boxes), height, width)
    for image, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.detach().float().cpu().tolist():
            top, bottom, left, right = math.floor(y1), math.ceil(y2), math.floor(x1), math.ceil(x2)
            area = 1.0 / ((bottom + 1 - top) * (right + 1 - left))
            cells = foreground[image, max(top, 0) : bottom + 1, max(left, 0) : right + 1]
            cells.copy_(cells.clamp_min(area))
    background = (foreground == 0).float()
    background = background / background.sum((1, 2), keepdim=True).clamp_min(1.0)
    return foreground, background


class FocalGlobalDistillation(DistillationLoss):
    """L = α·L_fg + β·L_bg + γ·L_at + λ·L_rel (defaults: the reference's α 1e-3, β 5e-4, γ 1e-3, λ 5e-6; set the
    term's weight to 1), on an FPN level; S is first aligned by a 1×1 conv when the channel counts differ.

    Attention of a map F: spatial A_s = H·W·softmax_HW(mean_C|F| / τ), channel A_c = C·softmax_C(mean_HW|F| / τ),
    τ = ``temperature`` (0.5). With the teacher's A_s, A_c and the box masks M_fg, M_bg (``box_masks``):
    L_fg = Σ M_fg·A_s·A_c·(S − T)² / N and L_bg the same with M_bg; L_at = (Σ|A_c(S) − A_c(T)| + Σ|A_s(S) −
    A_s(T)|) / N; L_rel = Σ (G_S(S) − G_T(T))² / N with G(F) = F + MLP(Σ_hw softmax(conv(F)) F), GcNet's global
    context block, one per side (own modules, their last conv zero-initialised as the reference does).

    Deviations from the reference, which maps the boxes with the unpadded image size onto the padded map and
    fills its masks as [x-range, y-range] of an N×H×W tensor (transposed): here the boxes come from the engine
    on the compared map's grid (the detector's resize and padding applied) and the masks are [y, x]. Computed in
    fp32; the teacher side is detached.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 1e-3,
        lambda_: float = 5e-6,
    ) -> None:
        super().__init__()
        if temperature <= 0 or min(alpha, beta, gamma, lambda_) < 0:
            raise ValueError("FocalGlobalDistillation: temperature must be > 0 and the part weights ≥ 0")
        self.temperature, self.alpha, self.beta, self.gamma, self.lambda_ = temperature, alpha, beta, gamma, lambda_
        self.align: nn.Module | None = None
        self.context: nn.ModuleDict | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        student_channels, channels = student_shape[1], teacher_shape[1]
        if channels < 2:
            raise ValueError("FocalGlobalDistillation: needs at least 2 teacher channels (its context MLP halves them)")
        self.align = align_conv(student_channels, channels)
        self.context = nn.ModuleDict({side: GlobalContext(channels) for side in ("student", "teacher")})

    def forward(self, student: Tensor, teacher: Tensor, boxes: list[Tensor]) -> Tensor:
        check_maps(type(self).__name__, student, teacher, same_channels=False)
        if self.context is None or self.align is None:
            raise RuntimeError("FocalGlobalDistillation: build() must run before the first call")
        if len(boxes) != student.shape[0]:
            raise ValueError(f"FocalGlobalDistillation: {len(boxes)} images' boxes for a batch of {student.shape[0]}")
        with full_precision(student):
            student, teacher = self.align(student.float()), teacher.detach().float()
            batch = student.shape[0]
            spatial_t, channel_t = self.attention(teacher)
            spatial_s, channel_s = self.attention(student)
            foreground, background = (mask.to(student.device) for mask in box_masks(boxes, student.shape[-2:]))
            weighted = spatial_t[:, None] * channel_t[:, :, None, None] * (student - teacher).pow(2)
            focal = (self.alpha * (weighted * foreground[:, None]).sum()
                     + self.beta * (weighted * background[:, None]).sum()) / batch  # fmt: skip
            attention = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / batch
            relation = (self.context["student"](student) - self.context["teacher"](teacher)).pow(2).sum() / batch
            return focal + self.gamma * attention + self.lambda_ * relation

    def attention(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """N×H×W spatial and N×C channel attention of an N×C×H×W map."""
        n, c, h, w = maps.shape
        value = maps.abs()
        spatial = h * w * F.softmax((value.mean(1) / self.temperature).flatten(1), dim=1).view(n, h, w)
        channel = c * F.softmax(value.mean((2, 3)) / self.temperature, dim=1)
        return spatial, channel

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
                f"lambda_={self.lambda_}")  # fmt: skip


class GlobalContext(nn.Module):
    """GcNet's global context block as FGD uses it: F + MLP(Σ_hw softmax_hw(conv1×1(F)) · F), the MLP
    conv1×1 (C → C/2) → LayerNorm → ReLU → conv1×1 (C/2 → C) with its last conv zero-initialised."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mask = nn.Conv2d(channels, 1, 1)
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        self.transform = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.LayerNorm([channels // 2, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(channels // 2, channels, 1))  # fmt: skip
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, maps: Tensor) -> Tensor:
        n, c = maps.shape[:2]
        weights = F.softmax(self.mask(maps).view(n, 1, -1), dim=2)  # N×1×HW
        context = (maps.view(n, c, -1) * weights).sum(-1).view(n, c, 1, 1)
        return maps + self.transform(context)
