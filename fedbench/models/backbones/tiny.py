"""``tiny-clip``: a tiny random-init CLIP (32 px, width 64, 2 layers) that makes tests fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedbench.errors import SpecError
from fedbench.models.backbones.base import RANDOM_INIT_SEED
from fedbench.models.backbones.openclip import OpenClipBackbone

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_clip_backbone(
    argument: str | None, *, device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> OpenClipBackbone:
    """Tiny random-init CLIP for tests; ``tiny-clip:SEED`` picks another (still fixed) init."""
    import open_clip

    try:
        seed = int(argument) if argument else RANDOM_INIT_SEED
    except ValueError:
        raise SpecError(f"tiny-clip:{argument}: the argument is an integer seed (tiny-clip:1).") from None
    # Built from the config dict (what add_model_config would register from a JSON file), under a
    # private seeded RNG: same seed, same weights, same fingerprint, and the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**json.loads(json.dumps(TINY_CLIP_CONFIG)), output_dict=True)
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    open_clip.model.set_model_preprocess_cfg(
        model,
        {
            "size": size,
            "mode": "RGB",
            "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    )
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    name = "tiny-clip" + (f":{seed}" if argument else "")
    return OpenClipBackbone(name, model, tokenizer, device, {"arch": "tiny-clip", "config": TINY_CLIP_CONFIG})
