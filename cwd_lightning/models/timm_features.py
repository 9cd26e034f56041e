"""Any timm model as a feature teacher: a CNN's stage outputs, or a ViT's patch tokens as maps (``models/vit.py``),
under names a term taps (``/features``, ``/stage<i>``, ``/block<i>``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cwd_lightning.models.vit import VitFeatureMaps, timm_weights_error, vit_features, without_classifier
from cwd_lightning.models.weights import load_state, read_weights


class TimmFeatureMaps(nn.Module):
    """A timm ``features_only`` network → ``{"stage<i>": the map of stage i, "features": the last one}`` for
    the stages of ``out_indices`` (timm's indices: 0 is the stem's output at stride 2 for most CNNs)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.indices = list(network.feature_info.out_indices)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        maps = dict(zip((f"stage{index}" for index in self.indices), self.network(images), strict=True))
        return {**maps, "features": maps[f"stage{self.indices[-1]}"]}


def timm_features(
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    out_indices: Sequence[int] | None = None,
    timm_args: dict[str, Any] | None = None,
) -> TimmFeatureMaps | VitFeatureMaps:
    """A timm model by name as feature maps, with timm's pretrained weights (downloaded from the Hugging Face
    hub on first use) or a ``checkpoint`` (a state_dict of the timm model as ``timm.create_model`` builds it).
    A ViT (``vit_*``, ``eva02_*``, DINOv2 …) becomes ``vit_features`` (its final patch map ``/features``;
    ``out_indices`` picks blocks, ``/block<i>``); any other model timm's ``features_only`` network, whose
    ``out_indices`` stages (default: all) become ``/stage<i>``, the last also ``/features``."""
    import timm

    probe = timm.create_model(name, pretrained=False, **(timm_args or {}))
    if hasattr(probe, "patch_embed") and hasattr(probe, "num_prefix_tokens"):
        return vit_features(name, blocks=out_indices or (), pretrained=pretrained, checkpoint=checkpoint,
                            timm_args=timm_args)  # fmt: skip
    try:
        network = timm.create_model(name, pretrained=bool(pretrained) and checkpoint is None, features_only=True,
                                    out_indices=tuple(out_indices) if out_indices is not None else None,
                                    **(timm_args or {}))  # fmt: skip
    except Exception as error:
        if not pretrained:
            raise
        raise timm_weights_error(name, error) from error
    if checkpoint is not None:  # a state_dict of the whole model: its classifier is not part of the features
        state = without_classifier(read_weights(checkpoint, "timm_features checkpoint"), probe)
        load_state(network, state, f"timm_features checkpoint {str(checkpoint)!r}")
    model = TimmFeatureMaps(network)
    if pretrained or checkpoint is not None:
        model.pretrained_source = f"timm {name} {checkpoint or 'pretrained'}"
    return model
