"""Ready-made networks from the model zoos users have: torchvision's pretrained models and
segmentation-models-pytorch's ``from_pretrained`` (a hub repository id or a ``save_pretrained`` folder).

A network built here carries ``pretrained_source`` (where its weights came from), so a teacher built
this way needs no separate ``teacher_checkpoint``. Weights are read with ``weights_only=True`` (or from
safetensors); nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwd_lightning.models.detection import keep_box_outputs_in_float32
from cwd_lightning.safe_load import load_weights_only


def torchvision_model(
    name: str,
    weights: str | None = "DEFAULT",
    num_classes: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> nn.Module:
    """A torchvision model by name (``deeplabv3_resnet101``, ``fcn_resnet101``, ``retinanet_resnet50_fpn_v2``,
    ``fcos_resnet50_fpn``, …) with the pretrained ``weights`` (an enum member name or ``DEFAULT``; None for
    random init). Segmentation models keep their auxiliary head and return ``{"out", "aux"}``; a detector
    resizes its images to ``min_size``/``max_size`` in evaluation (torchvision's 800/1333 if unset), keeps the
    data pipeline's sizes in training, and computes anchors and its box/score outputs in fp32. The weights
    file is read from torch's hub cache (``$TORCH_HOME/hub/checkpoints``) and downloaded there on first use."""
    from torchvision.models import detection, get_model, get_model_weights, list_models, segmentation

    kwargs: dict[str, Any] = {key: value for key, value in (("min_size", min_size), ("max_size", max_size))
                              if value is not None}  # fmt: skip
    dense = list_models(module=segmentation)
    if name not in dense + list_models(module=detection):
        raise ValueError(
            f"torchvision has no segmentation or detection model {name!r}; it has {sorted(dense)} and the "
            "detectors that torchvision.models.list_models(module=torchvision.models.detection) lists"
        )
    if name in dense:
        kwargs.setdefault("aux_loss", True)
    else:
        kwargs["_skip_resize"] = True  # as build_detector: training keeps the data pipeline's sizes
    kwargs.setdefault("weights_backbone", None)  # ImageNet backbone weights would only be overwritten
    if weights is None:
        model = get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}), **kwargs)
        return model if name in dense else keep_box_outputs_in_float32(model)
    choices = get_model_weights(name)
    try:
        chosen = choices.DEFAULT if weights == "DEFAULT" else choices[weights]
    except KeyError:
        raise ValueError(
            f"{name}: no weights {weights!r}; choose DEFAULT or one of {[w.name for w in choices]}"
        ) from None
    categories = len(chosen.meta["categories"])
    if num_classes not in (None, categories):
        raise ValueError(f"{name} {chosen.name} predicts {categories} classes, not num_classes={num_classes}")
    model = get_model(name, weights=None, num_classes=categories, **kwargs)
    model.load_state_dict(load_weights_only(_cached(chosen.url), f"torchvision {name} weights"))
    model.pretrained_source = f"torchvision {name} {chosen}"
    return model if name in dense else keep_box_outputs_in_float32(model)


def _cached(url: str) -> Path:
    """The hub cache's copy of ``url``, downloaded there if missing (a clear error offline)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as error:
        raise RuntimeError(
            f"could not download {url} ({type(error).__name__}: {error}). Fetch it once on a machine with network "
            f"and put it at {path} (e.g. `curl -L -o {path} {url}`), or set TORCH_HOME to where it already is."
        ) from error
    return path


def smp_pretrained(source: str, **overrides: Any) -> nn.Module:
    """A segmentation-models-pytorch model saved with ``save_pretrained``: a local folder, or a Hugging Face
    hub repository id (e.g. ``smp-hub/segformer-b5-1024x1024-city-160k``). Its encoder is built without
    ImageNet weights (the saved weights replace them), so a local folder loads offline."""
    import segmentation_models_pytorch as smp

    overrides.setdefault("encoder_weights", None)
    try:
        model = smp.from_pretrained(source, **overrides)
    except Exception as error:
        where = "the folder" if Path(source).is_dir() else "the hub repository"
        raise RuntimeError(
            f"could not load the smp model from {where} {source!r} ({type(error).__name__}: {error}). A hub model is "
            "downloaded on first use (connect once, or copy it with `huggingface-cli download` and give the folder)."
        ) from error
    model.pretrained_source = f"smp {source}"
    return model
