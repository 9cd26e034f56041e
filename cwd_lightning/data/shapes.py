"""The embedded ``shapes`` dataset: procedurally drawn scenes written in the Pascal VOC 2012 layout.

Ten object classes told apart by shape only: colour and texture (stripes, checks, dots, noise) are
drawn at random for every object and so carry no class information. Scenes have textured noisy
backgrounds, clutter strokes that belong to the background, 2-6 objects at varied scales that
occlude each other, and 255 on ambiguous (anti-aliased) boundary pixels like VOC. Generation is
deterministic for a given seed; images are written as JPEG, masks as palette PNG, boxes as VOC XML.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cwd_lightning.data.palette import voc_palette

SHAPES_CLASSES = [
    "background", "circle", "square", "triangle", "cross", "ring",
    "hexagon", "star", "crescent", "ell", "frame",
]  # fmt: skip
_SUPERSAMPLE = 4
_MARKER = ".complete"


@dataclass
class ShapesSpec:
    """Size and seed of the generated dataset (the defaults fit the 20-minute CPU budget)."""

    num_train: int = 2000
    num_val: int = 300
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 6
    min_object_size: float = 0.2
    max_object_size: float = 0.5
    seed: int = 0


def _polygon(kind: str, radius: float) -> list[tuple[float, float]]:
    def regular(n: int, r: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [
            (r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)
        ]

    if kind == "square":
        return regular(4, radius * 1.2, math.pi / 4)
    if kind == "triangle":
        return regular(3, radius * 1.15)
    if kind == "hexagon":
        return regular(6, radius)
    if kind == "star":
        outer, inner = regular(5, radius * 1.1), regular(5, radius * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if kind == "cross":
        a, b = radius, radius * 0.36
        return [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
    if kind == "ell":
        a, b = radius, radius * 0.1
        return [(-a, -a), (-b, -a), (-b, b), (a, b), (a, a), (-a, a)]
    raise ValueError(kind)


def _draw_shape(kind: str, size: int, center: tuple[float, float], radius: float, angle: float) -> Image.Image:
    """Binary shape mask (mode 'L') at supersampled resolution."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = center
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif kind == "frame":
        a, b = radius * 0.85, radius * 0.45
        draw.polygon(_rotate([(-a, -a), (a, -a), (a, a), (-a, a)], angle, center), fill=255)
        draw.polygon(_rotate([(-b, -b), (b, -b), (b, b), (-b, b)], angle, center), fill=0)
    elif kind == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.5 * radius * math.cos(angle), 0.5 * radius * math.sin(angle)
        draw.ellipse(
            [
                cx + dx - radius * 0.85,
                cy + dy - radius * 0.85,
                cx + dx + radius * 0.85,
                cy + dy + radius * 0.85,
            ],
            fill=0,
        )
    else:
        draw.polygon(_rotate(_polygon(kind, radius), angle, center), fill=255)
    return mask


def _rotate(points: list[tuple[float, float]], angle: float, center: tuple[float, float]) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(center[0] + x * c - y * s, center[1] + x * s + y * c) for x, y in points]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """size×size×3 float texture from two random colours: plain, stripes, checks, dots or noise."""
    colours = rng.uniform(0, 255, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(5)
    period = rng.uniform(2.5, 6.0)
    if kind == 0:
        weight = np.zeros((size, size))
    elif kind == 1:
        theta = rng.uniform(0, math.pi)
        weight = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0).astype(float)
    elif kind == 2:
        weight = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(float)
    elif kind == 3:
        weight = ((np.hypot(xx % period - period / 2, yy % period - period / 2)) < period / 3.2).astype(float)
    else:
        weight = rng.uniform(0, 1, size=(size, size))
    weight = weight[..., None]
    return colours[0] * (1 - weight) + colours[1] * weight


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency coloured noise, sometimes overlaid with a texture patch, plus pixel noise."""
    coarse = rng.uniform(0, 255, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    if rng.random() < 0.5:
        patch = _texture(rng, size)
        weight = (
            np.asarray(
                Image.fromarray(rng.uniform(0, 255, size=(3, 3)).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                dtype=np.float32,
            )[..., None]
            / 255.0
        )
        image = image * (1 - 0.6 * weight) + patch * 0.6 * weight
    return image


def _clutter(rng: np.random.Generator, size: int) -> Image.Image:
    """Background strokes and arcs: edges and colours that are not objects."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(2, 7)):
        points = [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(2, 4))]
        draw.line(points, fill=255, width=int(rng.integers(1, 3) * _SUPERSAMPLE))
    for _ in range(rng.integers(0, 3)):
        x, y, r = *rng.uniform(0, size, 2), rng.uniform(0.05, 0.15) * size
        draw.arc(
            [x - r, y - r, x + r, y + r],
            rng.uniform(0, 360),
            rng.uniform(0, 360),
            fill=255,
            width=_SUPERSAMPLE,
        )
    return layer


def render_scene(
    spec: ShapesSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[int]]]]:
    """One scene: uint8 image H×W×3, uint8 mask H×W (255 = ambiguous boundary) and (class, box) per
    visible object, box = [xmin, ymin, xmax, ymax] in VOC's 1-based pixel coordinates."""
    size, big = spec.image_size, spec.image_size * _SUPERSAMPLE
    image = _background(rng, size)
    clutter = np.asarray(_clutter(rng, big).resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
    image = image * (1 - clutter) + rng.uniform(0, 255, 3) * clutter

    labels = np.zeros((size, size), dtype=np.uint8)
    ambiguous = np.zeros((size, size), dtype=bool)  # pixels partly covered by the topmost object edge
    owners = np.full((size, size), -1, dtype=np.int16)
    objects: list[int] = []
    for index in range(rng.integers(spec.min_objects, spec.max_objects + 1)):
        class_id = int(rng.integers(1, len(SHAPES_CLASSES)))
        radius = rng.uniform(spec.min_object_size, spec.max_object_size) * big / 2
        center = tuple(rng.uniform(radius * 0.6, big - radius * 0.6, 2))
        shape = _draw_shape(SHAPES_CLASSES[class_id], big, center, radius, rng.uniform(0, 2 * math.pi))
        alpha = np.asarray(shape.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
        texture = _texture(rng, size)
        image = image * (1 - alpha[..., None]) + texture * alpha[..., None]
        inside = alpha >= 0.5
        labels[inside] = class_id
        owners[inside] = index
        # a pixel 25-75% covered by the newest object is ambiguous; one it covers fully no longer is
        ambiguous = (ambiguous & (alpha < 0.75)) | ((alpha > 0.25) & (alpha < 0.75))
        objects.append(class_id)

    image = np.asarray(
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.4)),
        dtype=np.float32,
    )
    image += rng.normal(0, rng.uniform(3, 12), image.shape)
    mask = labels.copy()
    mask[ambiguous] = 255

    boxes: list[tuple[int, list[int]]] = []
    for index, class_id in enumerate(objects):
        ys, xs = np.nonzero(owners == index)
        if len(xs) >= 4:  # fully (or almost fully) occluded objects get no box
            boxes.append((class_id, [int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1]))
    return image.clip(0, 255).astype(np.uint8), mask, boxes


def _voc_xml(name: str, size: int, boxes: list[tuple[int, list[int]]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "shapes"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size_el = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, key).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for class_id, (x0, y0, x1, y1) in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = SHAPES_CLASSES[class_id]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, key).text = str(value)
    return ET.tostring(root)


def generate_shapes(root: str | Path, spec: ShapesSpec | None = None) -> Path:
    """Write the dataset into ``root`` (VOC 2012 layout) unless it is already complete there, generated
    from the same ``spec`` (stored beside the data; another spec is refused, nothing is deleted).

    Written into a temporary sibling folder and renamed at the end, so an interrupted run never
    leaves a half dataset that looks complete.
    """
    spec = spec or ShapesSpec()
    root = Path(root)
    if (root / _MARKER).is_file():
        stored = (root / _MARKER).read_text().strip()  # the spec the data was generated from
        if stored != repr(spec):  # else runs would silently train on other data than they say
            raise FileExistsError(
                f"{root} holds a shapes dataset generated from {stored}, not the requested {spec!r}. Nothing is "
                f"deleted: remove {root} to regenerate it, or give another folder (data.init_args.root)."
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but is not a complete generated shapes dataset; remove it first")
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    palette = voc_palette()
    splits = {"train": range(spec.num_train), "val": range(spec.num_train, spec.num_train + spec.num_val)}
    for split, indices in splits.items():
        names = []
        for index in indices:
            name = f"shapes_{index:05d}"
            image, mask, boxes = render_scene(spec, np.random.default_rng([spec.seed, index]))
            Image.fromarray(image).save(tmp / "JPEGImages" / f"{name}.jpg", quality=92)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(tmp / "SegmentationClass" / f"{name}.png")
            (tmp / "Annotations" / f"{name}.xml").write_bytes(_voc_xml(name, spec.image_size, boxes))
            names.append(name)
        for folder in ("Segmentation", "Main"):
            (tmp / "ImageSets" / folder / f"{split}.txt").write_text("\n".join(names) + "\n")
    (tmp / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")
    (tmp / _MARKER).write_text(repr(spec) + "\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    tmp.rename(root)
    return root
