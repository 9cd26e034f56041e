"""Vision transformers (timm) as dense networks: their tokens as maps on the patch grid.

A ViT's block outputs are N×T×C token sequences: a few prefix tokens (the class token, register tokens, a
distillation token) followed by one token per patch, row by row. ``tokens_to_map`` drops the prefix and
reshapes the patch tokens to the N×C×h×w grid that the distillation losses and connectors compare with a CNN's
maps. ``VitFeatureMaps`` runs a ViT and returns such maps by name, so a term taps ``/features`` (the final,
normalised patch tokens) or ``/block<i>`` of the teacher's output; with a classifier it is also a segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.models.weights import load_state, read_weights


def tokens_to_map(tokens: Tensor, prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """N×T×C tokens → the N×C×h×w map of their patch tokens: the first ``prefix_tokens`` (class, register,
    distillation) dropped, the rest read row by row onto the ``grid`` (h, w)."""
    count, channels = tokens.shape[1] - prefix_tokens, tokens.shape[2]
    if count != grid[0] * grid[1]:
        raise ValueError(f"{tokens.shape[1]} tokens minus {prefix_tokens} prefix tokens is {count}, not the "
                         f"{grid[0]}×{grid[1]} patch grid")  # fmt: skip
    return tokens[:, prefix_tokens:].transpose(1, 2).reshape(tokens.shape[0], channels, *grid)


class VitFeatureMaps(nn.Module):
    """``vit`` (a timm VisionTransformer) → ``{"features": final normalised patch map, "block<i>": block i's
    patch map, "out": logits}`` (``out`` only with ``num_classes``: a 1×1 classifier on ``features``, at the
    patch stride; the task upsamples it). An image side that is not a multiple of the patch is refused, or with
    ``pad`` padded with zeros on the bottom/right to the next multiple (the maps then cover the padding too)."""

    def __init__(self, vit: nn.Module, blocks: Sequence[int] = (), pad: bool = False, num_classes: int | None = None):
        super().__init__()
        for attribute in ("blocks", "patch_embed", "num_prefix_tokens", "forward_features"):
            if not hasattr(vit, attribute):
                raise ValueError(f"VitFeatureMaps needs a timm ViT; {type(vit).__name__} has no {attribute}")
        self.vit = vit
        self.blocks = [index % len(vit.blocks) for index in blocks]
        self.pad = pad
        self.classifier = nn.Conv2d(vit.num_features, num_classes, 1) if num_classes else None

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.vit.patch_embed.patch_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        (ph, pw), (height, width) = self.patch_size, images.shape[-2:]
        if height % ph or width % pw:
            if not self.pad:
                raise ValueError(
                    f"image of {height}×{width} is not a multiple of the ViT's {ph}×{pw} patch: give sizes that are, "
                    "or set pad: true to pad it with zeros to the next multiple"
                )
            images = F.pad(images, (0, -width % pw, 0, -height % ph))
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        recorded: dict[int, Tensor] = {}

        def keep(index: int):
            return lambda _module, _inputs, output: recorded.__setitem__(index, output)

        hooks = [self.vit.blocks[index].register_forward_hook(keep(index)) for index in self.blocks]
        try:
            tokens = self.vit.forward_features(images)
        finally:
            for hook in hooks:
                hook.remove()
        prefix = self.vit.num_prefix_tokens
        maps = {"features": tokens_to_map(tokens, prefix, grid)}
        maps |= {f"block{index}": tokens_to_map(recorded[index], prefix, grid) for index in self.blocks}
        if self.classifier is not None:
            maps["out"] = self.classifier(maps["features"])
        return maps


def without_classifier(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A timm model's state_dict without its classifier (timm's ``pretrained_cfg['classifier']``: ``head`` of a
    ViT, ``fc`` of a ResNet …), which the feature networks built here do not have."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    return {key: value for key, value in state.items() if not key.startswith(heads)}


def timm_weights_error(name: str, error: Exception) -> RuntimeError:
    """What to do when timm's pretrained weights for ``name`` could not be loaded (offline, most often)."""
    return RuntimeError(
        f"could not load timm's pretrained weights for {name!r} ({type(error).__name__}: {error}). They are "
        f"downloaded from the Hugging Face hub on first use: connect once, or fetch them elsewhere with "
        f"`huggingface-cli download timm/{name}` and copy the cache (~/.cache/huggingface), or give a "
        "state_dict file as checkpoint."
    )


def vit_features(
    name: str,
    blocks: Sequence[int] = (),
    pad: bool = False,
    pretrained: bool = False,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    timm_args: dict[str, Any] | None = None,
) -> VitFeatureMaps:
    """A timm ViT by name (``vit_small_patch14_dinov2.lvd142m``, ``vit_base_patch16_clip_224.openai``,
    ``eva02_small_patch14_224.mim_in22k`` …) as maps (``VitFeatureMaps``), with timm's pretrained weights
    (downloaded from the Hugging Face hub on first use) or a ``checkpoint`` (a state_dict of the timm model).
    ``timm_args`` go to ``timm.create_model`` (e.g. ``{img_size: 64, patch_size: 8}`` for a model trained
    here); the position embedding follows other image sizes (``dynamic_img_size``)."""
    import timm

    try:
        vit = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, dynamic_img_size=True,
                                **(timm_args or {}))  # fmt: skip
    except Exception as error:
        if not pretrained:
            raise
        raise timm_weights_error(name, error) from error
    if checkpoint is not None:
        state = without_classifier(read_weights(checkpoint, "vit_features checkpoint"), vit)
        load_state(vit, state, f"vit_features checkpoint {str(checkpoint)!r}")
    model = VitFeatureMaps(vit, blocks, pad, num_classes)
    if pretrained or checkpoint is not None:
        model.pretrained_source = f"timm {name} {checkpoint or 'pretrained'}"
    return model
