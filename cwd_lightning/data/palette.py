"""The Pascal VOC colour palette (index i → RGB), used for palette PNG masks and overlays."""

from __future__ import annotations


def voc_palette() -> list[int]:
    """768 values: the bit-interleaved VOC colour map; index 255 is (224, 224, 192) as in VOC."""
    palette = []
    for index in range(256):
        r = g = b = 0
        code = index
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette += [r, g, b]
    return palette
