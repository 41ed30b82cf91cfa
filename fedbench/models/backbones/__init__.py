"""Backbones: frozen image and text encoders behind one small interface (see :mod:`.base`).

Registered families (``create_backbone(name)``; ``family:argument`` names):

- ``openclip:ARCH/TAG`` any open_clip architecture with a pretrained tag (hub or hub cache),
  ``openclip:ARCH@/path/to/checkpoint.pt`` a local checkpoint, ``openclip:ARCH`` random init
  (seeded, for timing), ``openclip:hf-hub:ORG/REPO`` / ``openclip:local-dir:/path``;
- ``tiny-clip[:SEED]``: a tiny random-init CLIP (32 px, width 64, 2 layers) for fast tests;
- ``offline-pair[:OPTIONS]``: ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2, joined without any
  image-text pairs (see :class:`OfflinePairBackbone`); the default where no CLIP weights exist;
- ``digits-clip[:FOLDER]``: a digits dual encoder pretrained in-repo on MNIST train (CNN + frozen
  MiniLM, CLIP loss; see :mod:`.digits_clip`), packaged weights or a ``fedbench prepare`` folder.

Importing this package registers the four families (the registry imports it to load its
built-ins); the modules behind it define them without registering anything.
"""

from __future__ import annotations

from fedbench.core.registry import register_backbone
from fedbench.models.backbones.base import Backbone, create_backbone, weights_fingerprint
from fedbench.models.backbones.digits_clip import DigitsClipBackbone, digits_clip_backbone
from fedbench.models.backbones.offline_pair import (
    BRIDGE_TAU,
    IMAGENET_PROMPT,
    RIDGE_LAMBDA,
    OfflinePairBackbone,
    offline_pair_backbone,
)
from fedbench.models.backbones.offline_pair_heads import OfflineImageTower, RidgeProjection, SoftLabelBridge, fit_ridge
from fedbench.models.backbones.offline_pair_towers import OFFLINE_PAIR_IMAGE_FILE
from fedbench.models.backbones.openclip import OpenClipBackbone, openclip_backbone
from fedbench.models.backbones.preprocess import ImagePreprocess
from fedbench.models.backbones.tiny import TINY_CLIP_CONFIG, tiny_clip_backbone

DEFAULT_OFFLINE_BACKBONE = "offline-pair"
DEFAULT_REAL_BACKBONE = "openclip:ViT-B-32/openai"

register_backbone("openclip", description="open_clip model: openclip:ARCH/TAG, ARCH@CHECKPOINT or ARCH")(
    openclip_backbone
)
register_backbone("tiny-clip", description="tiny random-init CLIP (32 px, width 64, 2 layers) for tests")(
    tiny_clip_backbone
)
register_backbone("offline-pair", description="EfficientNet-Lite0 + MiniLM joined without pairs (offline)")(
    offline_pair_backbone
)
register_backbone("digits-clip", description="digits CNN + MiniLM pretrained in-repo on MNIST train (offline)")(
    digits_clip_backbone
)

__all__ = [
    "BRIDGE_TAU",
    "DEFAULT_OFFLINE_BACKBONE",
    "DEFAULT_REAL_BACKBONE",
    "IMAGENET_PROMPT",
    "OFFLINE_PAIR_IMAGE_FILE",
    "RIDGE_LAMBDA",
    "TINY_CLIP_CONFIG",
    "Backbone",
    "DigitsClipBackbone",
    "ImagePreprocess",
    "OfflineImageTower",
    "OfflinePairBackbone",
    "OpenClipBackbone",
    "RidgeProjection",
    "SoftLabelBridge",
    "create_backbone",
    "digits_clip_backbone",
    "fit_ridge",
    "offline_pair_backbone",
    "openclip_backbone",
    "tiny_clip_backbone",
    "weights_fingerprint",
]
