"""Networks: segmentation (smp), detection (torchvision), the paper's dilated segmentors and their heads,
ready-made models from the zoos (torchvision, smp, transformers, timm), and the portable (exportable) form of a
segmentation student."""

from cwd_lightning.models.detection import build_detector
from cwd_lightning.models.dilated import DilatedSegmentor, build_dilated_segmentor
from cwd_lightning.models.huggingface import HuggingFaceSegmenter, huggingface_model
from cwd_lightning.models.portable import PortableSegmenter, portable_segmenter
from cwd_lightning.models.segmentation import build_segmentation_model, main_logits
from cwd_lightning.models.timm_features import TimmFeatureMaps, timm_features
from cwd_lightning.models.vit import VitFeatureMaps, tokens_to_map, vit_features
from cwd_lightning.models.zoo import smp_pretrained, torchvision_model

__all__ = [
    "DilatedSegmentor",
    "HuggingFaceSegmenter",
    "PortableSegmenter",
    "TimmFeatureMaps",
    "VitFeatureMaps",
    "build_detector",
    "build_dilated_segmentor",
    "build_segmentation_model",
    "huggingface_model",
    "main_logits",
    "portable_segmenter",
    "smp_pretrained",
    "timm_features",
    "tokens_to_map",
    "torchvision_model",
    "vit_features",
]
