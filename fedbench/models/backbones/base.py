"""The backbone interface: what every frozen image/text encoder pair offers, and how one is built.

A backbone turns uint8 images [N, C, H, W] and strings into vectors of one shared space:

- ``name``, ``embed_dim``; ``fingerprint`` (hash of the weights as loaded, plus any recipe that
  shapes the outputs; stable across processes) and ``preprocess_id`` (resolution, crop and
  normalisation): together with the data fingerprint they address the feature cache;
- ``preprocess(images)``: batched torch resize (shorter side) + center crop + normalise;
  grayscale images are repeated to three channels;
- ``encode_image(images)`` / ``encode_text(texts)``: float32 [N, D] on the CPU, no grad, eval
  mode, NOT normalised (callers normalise);
- for methods that fine-tune: ``image_model`` / ``text_model`` (the towers as ``nn.Module``, so
  peft can wrap them in place), ``encode_image_trainable(pixels)`` on preprocessed pixels and
  ``encode_text_trainable(tokens)`` on ``tokenize(texts)``, both with grad, in the mode the
  caller set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedbench.core.hashing import canonical_json
from fedbench.core.registry import BACKBONES
from fedbench.models.backbones.preprocess import ImagePreprocess

RANDOM_INIT_SEED = 0  # random-init towers are seeded so their fingerprint is the same in every process


class Backbone:
    """Common code of every backbone: batching, no-grad eval-mode encoding, CPU float32 output."""

    name: str
    embed_dim: int
    fingerprint: str
    image_model: nn.Module
    text_model: nn.Module
    encode_batch_size: int = 64

    def __init__(self, name: str, image_preprocess: ImagePreprocess, device: str | torch.device) -> None:
        self.name = name
        self.image_preprocess = image_preprocess
        self.device = torch.device(device)

    @property
    def preprocess_id(self) -> str:
        return self.image_preprocess.id

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> normalised float pixels on the backbone's device."""
        return self.image_preprocess(images, self.device)

    def encode_image(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """float32 [N, D] (CPU, not normalised) of uint8 ``images``; no grad, eval mode."""
        batch_size = batch_size or self.encode_batch_size
        out = []
        with torch.no_grad(), eval_mode(self.image_model):
            for start in range(0, int(images.shape[0]), batch_size):
                pixels = self.preprocess(images[start : start + batch_size])
                out.append(self.encode_image_trainable(pixels).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def encode_text(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """float32 [T, D] (CPU, not normalised) of ``texts``; no grad, eval mode."""
        out = []
        with torch.no_grad(), eval_mode(self.text_model):
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(list(texts[start : start + batch_size])).to(self.device)
                out.append(self.encode_text_trainable(tokens).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def tokenize(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def encode_image_trainable(self, pixels: Tensor) -> Tensor:
        """Image features of preprocessed ``pixels`` with grad (the caller sets train/eval)."""
        raise NotImplementedError

    def encode_text_trainable(self, tokens: Tensor) -> Tensor:
        """Text features of ``tokenize(...)`` output with grad (the caller sets train/eval)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, embed_dim={self.embed_dim}, fingerprint={self.fingerprint})"


def create_backbone(name: str, device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> Backbone:
    """Build the backbone ``name`` (``family`` or ``family:argument``) through the registry.

    A factory is called as ``factory(argument, device=..., cache_dir=...)`` where ``argument``
    is the text after the first ``:`` (None without one); ``cache_dir`` is where a backbone may
    keep what it derives once (the feature cache root; default ``$FEDBENCH_CACHE``).
    """
    entry = BACKBONES.get(name)
    argument = name.split(":", 1)[1] if ":" in name and entry.name != name else None
    return entry.obj(argument, device=device, cache_dir=cache_dir)


def weights_fingerprint(modules: dict[str, nn.Module], recipe: dict[str, Any]) -> str:
    """sha256 (16 hex) of every tensor of ``modules`` (name, dtype, shape, bytes) and ``recipe``."""
    h = hashlib.sha256(canonical_json(recipe).encode())
    for prefix, module in modules.items():
        state = module.state_dict()
        for key in sorted(state):
            t = state[key].detach().to("cpu").contiguous()
            h.update(f"{prefix}.{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (frozen encoding must not update BatchNorm statistics)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
