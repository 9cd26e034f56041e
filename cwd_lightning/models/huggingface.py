"""Segmentation models from Hugging Face ``transformers`` (SegFormer, UPerNet, DPT, BEiT … anything
``AutoModelForSemanticSegmentation`` builds) as teachers and students.

The optional extra ``pip install '.[hf]'`` installs ``transformers``; nothing else imports it.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn


class HuggingFaceSegmenter(nn.Module):
    """A ``transformers`` segmentation model as a network here: normalised images in, logits out at the model's
    own stride (SegFormer's are at 1/4; the task upsamples logits to the labels' size). Its modules are reachable
    by dotted path under ``model.`` (e.g. ``model.decode_head.classifier``, ``model.segformer.encoder``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits


def huggingface_model(source: str, num_labels: int | None = None, pretrained: bool = True,
                      revision: str | None = None) -> HuggingFaceSegmenter:  # fmt: skip
    """A hub id (``nvidia/segformer-b0-finetuned-ade-512-512``) or a ``save_pretrained`` folder: with its weights
    (``pretrained``), or its architecture alone at random init. ``num_labels`` replaces the classifier when the
    checkpoint predicts other classes (a new head, trained from scratch). Offline (``HF_HUB_OFFLINE=1``) a hub id
    must be in the local cache; a missing one is an error naming what to fetch."""
    try:
        from transformers import AutoConfig, AutoModelForSemanticSegmentation
    except ImportError as error:
        raise ImportError("Hugging Face models need transformers: pip install -e '.[hf]'") from error
    labels = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        if pretrained:
            model = AutoModelForSemanticSegmentation.from_pretrained(
                source, revision=revision, ignore_mismatched_sizes=bool(labels), **labels
            )
        else:
            config = AutoConfig.from_pretrained(source, revision=revision, **labels)
            model = AutoModelForSemanticSegmentation.from_config(config)
    except (OSError, ValueError) as error:
        where = "the folder" if Path(source).is_dir() else "the Hugging Face hub repository"
        raise RuntimeError(
            f"could not load the transformers model from {where} {source!r} ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}). A hub model is downloaded on first use: connect once, or "
            f"fetch it elsewhere with `huggingface-cli download {source}` and copy the cache (~/.cache/huggingface), "
            "or give a save_pretrained folder."
        ) from error
    segmenter = HuggingFaceSegmenter(model)
    if pretrained:
        segmenter.pretrained_source = f"transformers {source}" + (f"@{revision}" if revision else "")
    return segmenter
