"""Checkpoints of other frameworks, loaded into the networks here without those frameworks.

mmsegmentation's ``*-d8`` segmentors (``EncoderDecoder`` with a ``ResNetV1c`` backbone, a ``PSPHead`` or
``ASPPHead`` and an ``FCNHead`` auxiliary head) are layer for layer the dilated segmentors of
``models/dilated.py``: only the key names differ. ``mmseg_to_dilated`` renames every key of such a model-zoo
file (``{"meta", "state_dict"}`` with ``backbone.``, ``decode_head.`` and ``auxiliary_head.`` keys, from mmseg
0.x or 1.x) or reports the ones it cannot map.
"""

from __future__ import annotations

import re

from torch import Tensor

#: (mmseg key pattern, our key) for the dilated segmentors, tried in order; \\1 … are the pattern's groups
MMSEG_DILATED = [
    (r"backbone\.stem\.([0134]|6)\.(.+)", r"encoder.conv1.\1.\2"),  # the deep stem: conv, BN, conv, BN, conv
    (r"backbone\.stem\.7\.(.+)", r"encoder.bn1.\1"),  # its last BN is timm's bn1
    (r"backbone\.(layer\d+\.\d+\.(?:conv\d|bn\d|downsample\.[01])\..+)", r"encoder.\1"),
    (r"decode_head\.psp_modules\.(\d+)\.1\.conv\.(.+)", r"decode_head.pools.\1.1.0.\2"),
    (r"decode_head\.psp_modules\.(\d+)\.1\.bn\.(.+)", r"decode_head.pools.\1.1.1.\2"),
    (r"decode_head\.image_pool\.1\.conv\.(.+)", r"decode_head.image_pool.1.0.\1"),
    (r"decode_head\.image_pool\.1\.bn\.(.+)", r"decode_head.image_pool.1.1.\1"),
    (r"decode_head\.aspp_modules\.(\d+)\.conv\.(.+)", r"decode_head.branches.\1.0.\2"),
    (r"decode_head\.aspp_modules\.(\d+)\.bn\.(.+)", r"decode_head.branches.\1.1.\2"),
    (r"decode_head\.bottleneck\.conv\.(.+)", r"decode_head.bottleneck.0.\1"),
    (r"decode_head\.bottleneck\.bn\.(.+)", r"decode_head.bottleneck.1.\1"),
    (r"decode_head\.conv_seg\.(.+)", r"decode_head.classifier.\1"),
    (r"auxiliary_head\.convs\.0\.conv\.(.+)", r"auxiliary_head.conv.0.\1"),
    (r"auxiliary_head\.convs\.0\.bn\.(.+)", r"auxiliary_head.conv.1.\1"),
    (r"auxiliary_head\.conv_seg\.(.+)", r"auxiliary_head.classifier.\1"),
]


def is_mmseg_state(state: dict[str, Tensor]) -> bool:
    """An mmsegmentation segmentor's state_dict: a backbone and a decode head, at the top level."""
    return any(k.startswith("backbone.") for k in state) and any(k.startswith("decode_head.") for k in state)


def rename(state: dict[str, Tensor], rules: list[tuple[str, str]]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` with every key renamed by the first rule whose pattern matches all of it, and the keys no rule
    matched."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed, unmapped = {}, []
    for key, tensor in state.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                renamed[pattern.sub(replacement, key)] = tensor
                break
        else:
            unmapped.append(key)
    return renamed, unmapped


def mmseg_to_dilated(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The state_dict of an mmseg PSPNet-D8 / DeepLabV3-D8 (ResNet-V1c) in ``build_dilated_segmentor``'s key
    names; a key that no rule maps is an error that lists them all (``source`` names the file)."""
    renamed, unmapped = rename(state, MMSEG_DILATED)
    if unmapped:
        more = f" … (+{len(unmapped) - 8} more)" if len(unmapped) > 8 else ""
        raise ValueError(
            f"{source}: an mmsegmentation checkpoint with {len(unmapped)} key(s) that match no layer of the dilated "
            f"segmentors here (PSPNet-D8 / DeepLabV3-D8 on ResNet-V1c with an FCN auxiliary head): "
            f"{', '.join(unmapped[:8])}{more}"
        )
    return renamed
