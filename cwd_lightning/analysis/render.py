"""Matplotlib figures rendered to RGB arrays for W&B and to PNG files for reports. Figures are made on their
own Agg canvas, without pyplot, so nothing here changes matplotlib's global backend or figure registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cwd_lightning.data.palette import voc_palette


def new_figure(**kwargs: Any) -> Figure:
    """A figure on an Agg canvas (no screen needed); ``kwargs`` as for ``matplotlib.figure.Figure``."""
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """H×W×3 uint8 pixels of a figure."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def colourise(mask: np.ndarray) -> np.ndarray:
    """Class-index mask → RGB with the VOC palette (255, ignored, in its usual cream colour)."""
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[mask.astype(np.int64).clip(0, 255)]


def channel_grid(
    image: np.ndarray,
    teacher_maps: np.ndarray,
    student_maps: np.ndarray,
    channels: Sequence[int],
    channel_names: Sequence[str] | None,
    kl: Sequence[float],
    title: str,
) -> Figure:
    """One row per channel: input | teacher distribution | student distribution, one colour scale.

    ``teacher_maps``/``student_maps`` are C×H×W distributions (each map sums to 1), shown as they
    are, so the colours compare probability mass directly."""
    shown = np.concatenate([teacher_maps[list(channels)], student_maps[list(channels)]])
    vmax = float(shown.max()) if shown.size else 1.0
    rows = max(1, len(channels))
    figure = new_figure(figsize=(8.0, 2.3 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, 3, squeeze=False)
    image_artist = None
    for row, channel in enumerate(channels):
        name = f"ch {channel}" + (f" · {channel_names[channel]}" if channel_names else "")
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("input", fontsize=8)
        for column, (side, maps) in enumerate((("teacher", teacher_maps), ("student", student_maps)), start=1):
            image_artist = axes[row, column].imshow(maps[channel], cmap="magma", vmin=0.0, vmax=vmax)
            suffix = f"\nKL(T‖S) = {kl[row]:.3f}" if side == "student" else ""
            axes[row, column].set_title(f"{side} · {name}{suffix}", fontsize=8)
        for axis in axes[row]:
            axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    if image_artist is not None:
        figure.colorbar(image_artist, ax=axes[:, 1:].ravel().tolist(), shrink=0.8, label="p (per map, sums to 1)")
    return figure


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the palette colour of every non-background pixel over the image (255 shown too)."""
    colours = colourise(mask).astype(np.float32)
    blend = np.where((mask > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    return blend.clip(0, 255).astype(np.uint8)


def prediction_grid(images: Sequence[np.ndarray], columns: dict[str, Sequence[np.ndarray]]) -> Figure:
    """One row per sample: input, then one palette overlay per named column (ground truth, teacher…)."""
    titles = ["input", *columns]
    figure = new_figure(figsize=(2.2 * len(titles), 2.2 * len(images)))
    axes = figure.subplots(len(images), len(titles), squeeze=False)
    for row, image in enumerate(images):
        panels = [image, *(overlay(image, masks[row]) for masks in columns.values())]
        for column, (title, panel) in enumerate(zip(titles, panels, strict=True)):
            axes[row, column].imshow(panel)
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "confusion (rows: truth)") -> Figure:
    """Row-normalised confusion matrix (each row: where the pixels of that true class went)."""
    rows = matrix.astype(np.float64)
    rows = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(class_names) + 1.5)
    figure = new_figure(figsize=(size, size))
    axis = figure.subplots()
    artist = axis.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=9)
    figure.colorbar(artist, ax=axis, shrink=0.8)
    figure.tight_layout()
    return figure
