"""Micro-benchmark of every distillation loss in ``cwd_lightning.losses`` (forward + backward) at the
paper's sizes, and the plain reference formulation of CWD it is compared with."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning import losses as loss_package
from cwd_lightning.bench.timing import summarize, time_interleaved, time_step
from cwd_lightning.losses.base import build_own_modules, declaration

#: the CWD temperature used for the CWD / reference comparison (the paper's setting for logits)
CWD_TAU = 4.0
#: classes of the random labels given to the losses that ask for labels (Cityscapes' 19)
LABEL_CLASSES = 19
#: a case is skipped when a loss's estimated working memory exceeds this share of the free memory
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class LossCase:
    """One N×C×H×W size: ``logits`` (class scores) or ``features`` (an FPN level)."""

    kind: str
    shape: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{'logits' if self.kind == 'logits' else 'FPN'} {self.shape[2]}×{self.shape[3]}"

    def scaled(self, scale: float) -> LossCase:
        """The same case with H and W times ``scale`` (quick smoke runs), at least 1×1."""
        n, c, h, w = self.shape
        return LossCase(self.kind, (n, c, max(1, round(h * scale)), max(1, round(w * scale))))


#: Cityscapes logits (N=8, C=19) at 64×64 and 128×256, and the five 256-channel FPN levels of an 800×1216
#: COCO image (P3-P7), the sizes of the CWD paper's segmentation and detection settings
PAPER_CASES = (
    LossCase("logits", (8, 19, 64, 64)),
    LossCase("logits", (8, 19, 128, 256)),
    *(LossCase("features", (8, 256, h, w)) for h, w in ((100, 152), (50, 76), (25, 38), (13, 19), (7, 10))),
)

#: losses defined on class scores only: on 256-channel features they are not a method of the paper
LOGITS_ONLY = {
    "DIST": "correlates per-pixel class distributions (softmax over classes): defined for class logits only",
    "HolisticAdversarial": "a discriminator of segmentation score maps: defined for class logits only",
}
#: losses defined on feature maps only: on class scores they are not a method of the paper
FEATURES_ONLY = {
    "AfDCD": "cuts the channels into 16 groups and the pooled map into 4×4 patches: defined for feature maps only",
    "FocalGlobalDistillation": "imitates detection FPN levels inside and outside the boxes: defined for feature "
    "maps only",
}

#: losses that run part of a teacher network: not a function of two maps alone
NEEDS_TEACHER = {
    "CrossHeadKD": "runs the rest of the teacher's detection head on the student's head features: its cost is "
    "that head's (convs of the teacher), not the loss's",
}


#: what a row times beyond the loss's formula
NOTES = {
    "FitNets": "includes its 1×1 regressor, built from the shapes",
    "MaskedGenerativeDistillation": "includes its generator (two 3×3 convs), built from the shapes",
    "HolisticAdversarial": "the student's side, −mean D(S) forward + backward through D; D's own WGAN-GP step "
    "(its second optimiser) is not timed",
    "IntraClassFeatureVariation": f"random labels of {LABEL_CLASSES} classes",
}


def reference_cwd(student: Tensor, teacher: Tensor, tau: float = CWD_TAU) -> Tensor:
    """CWD written the straightforward way: softmax over H·W of y/τ, its log for the student,
    ``KLDivLoss(reduction="sum")`` · τ² / (N·C). What ``ChannelWiseDivergence`` computes (Eq. 3-4)."""
    n, c, h, w = student.shape
    log_p_student = torch.log(torch.softmax(student.reshape(n * c, h * w) / tau, dim=1))
    p_teacher = torch.softmax(teacher.detach().reshape(n * c, h * w) / tau, dim=1)
    return nn.KLDivLoss(reduction="sum")(log_p_student, p_teacher) * tau**2 / (n * c)


class ReferenceCWD(nn.Module):
    """``reference_cwd`` as a (student, teacher) loss module, for pipelines that take modules."""

    def __init__(self, tau: float = CWD_TAU) -> None:
        super().__init__()
        self.tau = float(tau)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return reference_cwd(student, teacher, self.tau)


def loss_classes() -> dict[str, type[nn.Module]]:
    """Every loss the package exports (not the optional base class): a new loss is benchmarked without
    touching this file."""
    return {
        name: getattr(loss_package, name)
        for name in loss_package.__all__
        if getattr(loss_package, name) is not loss_package.DistillationLoss
    }


def make_loss(name: str, cls: type[nn.Module]) -> nn.Module:
    """The loss with its defaults (CWD at the compared τ)."""
    return cls(tau=CWD_TAU) if name == "ChannelWiseDivergence" else cls()


def estimated_bytes(name: str, loss: nn.Module, shape: tuple[int, int, int, int]) -> int:
    """Rough working memory of one forward + backward: a dozen map-sized fp32 tensors, or for the
    pair-wise affinity the half-dozen N×HW'×HW' matrices that dominate it."""
    n, c, h, w = shape
    if name == "PairwiseAffinity":
        nodes = math.ceil(h / loss.pool_size) * math.ceil(w / loss.pool_size)
        return 6 * n * nodes * nodes * 4
    return 12 * n * c * h * w * 4


def free_bytes(device: torch.device) -> int:
    """Memory a case may use: free GPU memory, or MemAvailable of /proc/meminfo (8 GiB if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def _context(loss: nn.Module, shape: tuple[int, int, int, int], device: torch.device) -> dict[str, Any]:
    """What the engine would give a loss that asks (see losses/base.py): random labels, the ignore index,
    the step, and per image two boxes, each a quarter of the map."""
    n, _, h, w = shape
    given = {
        "labels": torch.randint(0, LABEL_CLASSES, (n, h, w), device=device),
        "ignore_index": 255,
        "step": 0,
        "boxes": [torch.tensor([[0, 0, w / 2, h / 2], [w / 2, h / 2, w, h]], device=device)] * n,
    }
    return {field: given[field] for field in declaration(loss, has_labels=True, has_boxes=True).context}


def forward_backward(loss: nn.Module, student: Tensor, teacher: Tensor, context: dict) -> Callable[[], None]:
    """One forward + backward of ``loss``, gradients dropped first (the student's and the loss's own)."""

    def step() -> None:
        student.grad = None
        loss.zero_grad(set_to_none=True)
        loss(student, teacher, **context).backward()

    return step


def benchmark_case(
    name: str, loss: nn.Module, case: LossCase, repeats: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Time one loss on one case, or say why it was skipped."""
    row: dict[str, Any] = {"loss": name, "case": case.name, "shape": list(case.shape)}
    if name in NOTES:
        row["note"] = NOTES[name]
    if case.kind == "features" and name in LOGITS_ONLY:
        return {**row, "skipped": LOGITS_ONLY[name]}
    if case.kind == "logits" and name in FEATURES_ONLY:
        return {**row, "skipped": FEATURES_ONLY[name]}
    needed, available = estimated_bytes(name, loss, case.shape), free_bytes(device)
    if needed > MEMORY_SHARE * available:
        return {
            **row,
            "skipped": f"needs about {needed / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of the "
            f"{available / 2**30:.1f} GiB free on {device.type}",
        }
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(case.shape, generator=generator).to(device).requires_grad_(True)
    teacher = torch.randn(case.shape, generator=generator).to(device)
    try:
        build_own_modules(loss, student.shape, teacher.shape)  # as the distiller's probe builds them
        loss.to(device).train()
        step = forward_backward(loss, student, teacher, _context(loss, case.shape, device))
        timing = time_step(step, repeats, warmup, device)
    except ValueError as error:  # the loss refuses this size (e.g. a discriminator needs ≥ 16×16)
        return {**row, "skipped": f"{type(loss).__name__} refuses this size: {error}"}
    return {**row, **timing.as_dict()}


def benchmark_losses(
    cases: tuple[LossCase, ...], repeats: int, warmup: int, device: torch.device
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every loss on every case (rows of ms per forward + backward), and per case CWD against the
    reference formulation: both times, their ratio (target ≤ 1) and both values on the same inputs."""
    rows, comparison = [], []
    for case in cases:
        for name, cls in loss_classes().items():
            if name in NEEDS_TEACHER:
                skipped = {"loss": name, "case": case.name, "shape": list(case.shape), "skipped": NEEDS_TEACHER[name]}
                rows.append(skipped)
                continue
            row = benchmark_case(name, make_loss(name, cls), case, repeats, warmup, device)
            rows.append(row)
            if name == "ChannelWiseDivergence":  # the reference right after, in the same state of the machine
                comparison.append(compare_with_reference(row, case, repeats, warmup, device))
    return rows, comparison


def compare_with_reference(
    cwd: dict[str, Any], case: LossCase, repeats: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    if "skipped" in cwd:
        return {"case": case.name, "skipped": cwd["skipped"]}
    # paired: CWD and the reference timed in turn in each repetition, on the same maps, so that a slow
    # spell of the machine (large first-touch allocations vary a lot here) hits both alike
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(case.shape, generator=generator).to(device).requires_grad_(True)
    teacher = torch.randn(case.shape, generator=generator).to(device)
    samples = time_interleaved(
        {
            "cwd": forward_backward(loss_package.ChannelWiseDivergence(tau=CWD_TAU), student, teacher, {}),
            "reference": forward_backward(ReferenceCWD(), student, teacher, {}),
        },
        repeats,
        warmup,
        device,
    )
    ratios = summarize([ours / theirs for ours, theirs in zip(samples["cwd"], samples["reference"], strict=True)])
    ours, theirs = loss_values(case.shape, device)
    return {
        "case": case.name,
        "cwd_ms": summarize(samples["cwd"]).median_ms,
        "reference_ms": summarize(samples["reference"]).median_ms,
        "ratio": ratios.median_ms,  # the median of the per-repetition ratios
        "ratio_iqr": ratios.iqr_ms,
        "cwd_value": ours,
        "reference_value": theirs,
    }


def loss_values(shape: tuple[int, int, int, int], device: torch.device) -> tuple[float, float]:
    """CWD and the reference on the same random maps (they must agree)."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    with torch.no_grad():
        ours = loss_package.ChannelWiseDivergence(tau=CWD_TAU)(student, teacher)
        return float(ours), float(reference_cwd(student, teacher))
