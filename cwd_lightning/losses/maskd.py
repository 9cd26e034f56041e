"""MasKD (Huang et al., "Masked Distillation with Receptive Tokens", ICLR 2023), after the official segmentation
code ``hunto/MasKD segmentation/losses/maskd.py`` and ``train_mask_module.py``: learnable mask tokens trained on
the frozen teacher first (the engine's preparation), then a masked squared error per token."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_labels, check_maps, full_precision

#: added to each token mask's area before dividing, as in the reference
AREA_EPSILON = 1e-5


def dice_diversity(masks: Tensor) -> Tensor:
    """Mean Dice coefficient between every two different token masks of an image (N×T×H×W, the reference's
    ``dice_coeff``): low when the tokens look at different places."""
    flat = masks.flatten(2)  # N×T×HW
    overlap = flat @ flat.transpose(1, 2)  # N×T×T
    squares = flat.pow(2).sum(-1) + 1e-12  # N×T
    dice = 2 * overlap / (squares[:, None, :] + squares[:, :, None])
    tokens = masks.shape[1]
    off_diagonal = ~torch.eye(tokens, dtype=torch.bool, device=masks.device)
    return dice[:, off_diagonal].mean()


class MasKD(DistillationLoss):
    """A masked squared error, one mask per learnable "receptive token".

    Masks: m_t = σ(token_t · T) at each position (T×C_t tokens, N×T×H×W masks), computed from the teacher's map.
    Preparation (``prepare_steps`` on the teacher alone, the reference's ``train_mask_module.py``): the tokens
    are trained so that the teacher's map re-weighted by its masks, Σ_t m_t ⊙ T, still segments (cross-entropy
    with the labels, ``ignore_index`` ignored) while the masks differ (+ mean pairwise Dice between masks); SGD
    lr 0.1, momentum 0.9, weight decay 1e-3 (the reference's 10000 iterations of poly-decayed lr; here
    constant lr). Distillation: the tokens frozen,
    L = ½ · mean over N·T·C of Σ_hw (m_t·(S − T))² / (Σ_hw m_t + 1e-5): the reference squares the masked
    difference, so each position counts with m², and divides by the mask's area. Its weight is 1 in the reference
    (on the logits, with 0.4 on the auxiliary logits). Tokens start as N(0, 0.01) and are built from the probed
    teacher channels; same shapes required; needs dense labels for the preparation. Computed in fp32; the
    teacher side is detached.
    """

    def __init__(
        self,
        num_tokens: int = 8,
        prepare_steps: int = 10000,
        prepare_lr: float = 0.1,
        prepare_momentum: float = 0.9,
        prepare_weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        if num_tokens < 2:
            raise ValueError(f"MasKD: num_tokens must be ≥ 2 (their masks are kept apart), got {num_tokens}")
        if prepare_steps < 1:
            raise ValueError(f"MasKD: prepare_steps must be ≥ 1 (the tokens are trained first), got {prepare_steps}")
        self.num_tokens = int(num_tokens)
        self.prepare_steps = int(prepare_steps)
        self.prepare_optimizer = partial(torch.optim.SGD, lr=prepare_lr, momentum=prepare_momentum,
                                         weight_decay=prepare_weight_decay)  # fmt: skip
        self.tokens: nn.Parameter | None = None
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        # trained only by the preparation (which turns their gradient on meanwhile): frozen whenever DDP or an
        # optimiser of the training looks, so neither expects a gradient the distillation never gives them
        self.tokens = nn.Parameter(torch.randn(self.num_tokens, teacher_shape[1]) * 0.01, requires_grad=False)

    def prepare_parameters(self) -> list[nn.Parameter]:
        return [self.tokens] if self.tokens is not None else []

    def masks(self, teacher: Tensor) -> Tensor:
        """N×T×H×W token masks of an N×C×H×W teacher map."""
        if self.tokens is None:
            raise RuntimeError("MasKD: build() must run before the first call")
        if teacher.shape[1] != self.tokens.shape[1]:
            raise ValueError(f"MasKD: built for {self.tokens.shape[1]} teacher channels, got {tuple(teacher.shape)}")
        return torch.sigmoid(self.tokens @ teacher.flatten(2)).view(teacher.shape[0], -1, *teacher.shape[2:])

    def prepare_loss(self, teacher: Tensor, labels: Tensor | None, ignore_index: int | None = 255) -> Tensor:
        labels = check_labels(type(self).__name__, labels, teacher).to(teacher.device)
        with full_precision(teacher):
            teacher = teacher.detach().float()
            masks = self.masks(teacher)
            rebuilt = (teacher.unsqueeze(1) * masks.unsqueeze(2)).sum(1)
            ignore = -100 if ignore_index is None else ignore_index
            return F.cross_entropy(rebuilt, labels, ignore_index=ignore) + dice_diversity(masks)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        with full_precision(student):
            teacher = teacher.detach().float()
            with torch.no_grad():
                masks = self.masks(teacher)  # the tokens are frozen while distilling
            difference = (student.float() - teacher).unsqueeze(1) * masks.unsqueeze(2)  # N×T×C×H×W
            per_token = difference.pow(2).sum((3, 4)) / (masks.sum((2, 3)).unsqueeze(-1) + AREA_EPSILON)
            return 0.5 * per_token.mean()

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, prepare_steps={self.prepare_steps}"
