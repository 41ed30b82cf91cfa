"""A frozen tower cut into stages, bottom to top, so that methods can adapt only the top of it.

``image_stages(backbone)`` and ``text_stages(backbone)`` return trainable *copies* of a
backbone's towers as a :class:`StagedTower`: an ordered list of named modules whose composition
is the tower's own forward (``encode_image_trainable`` on preprocessed pixels, or
``encode_text_trainable`` on tokens). A backbone states its cut with ``image_stages()`` /
``text_stages()``; one that does not is one stage, the whole tower. The cut is checked on a
deterministic probe when it is built: a decomposition that does not reproduce the tower is
refused with a warning and the whole tower is used instead, so a wrong cut can cost speed but
never change a number.

Why: with LoRA only on the top stages, everything below them is frozen and deterministic, so
its output (the *activations* at the lowest adapted stage) can be computed once per run and
every round back-propagates through the adapted stages only (``StagedTower.run(x, start=k)``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fedbench.errors import SpecError

Stage = tuple[str, nn.Module]


class StagedTower(nn.Module):
    """Named stages applied in order; ``run(x, start, stop)`` applies stages[start:stop]."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__()
        if not stages:
            raise SpecError("a tower needs at least one stage")
        self.names = [name for name, _ in stages]
        # Each stage sits in a one-element Sequential, so that a stage which is itself one layer
        # (a projection) is still a named sub-module that peft can target.
        self.stages = nn.ModuleList([nn.Sequential(module) for _, module in stages])

    def __len__(self) -> int:
        return len(self.stages)

    def run(self, x: Any, start: int = 0, stop: int | None = None) -> Any:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: Any) -> Any:
        return self.run(x)


def lora_layer_names(module: nn.Module, spatial_convs: bool = True) -> list[str]:
    """The layers of ``module`` that LoRA can adapt: ``nn.MultiheadAttention`` (never its
    ``out_proj`` alone: MultiheadAttention reads that weight directly, so a LoRA there trains
    nothing), every ``nn.Linear`` outside attention, and every ungrouped ``nn.Conv2d`` (peft adapts
    a k x k convolution with a k x k ``A`` and a 1 x 1 ``B``); only the 1 x 1 ones unless
    ``spatial_convs``."""
    inside_attention = set()
    for name, m in module.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            inside_attention.update(f"{name}.{sub}" for sub, _ in m.named_modules() if sub)
    names = []
    for name, m in module.named_modules():
        if not name or name in inside_attention:
            continue
        conv = isinstance(m, nn.Conv2d) and m.groups == 1 and (spatial_convs or m.kernel_size == (1, 1))
        if isinstance(m, (nn.MultiheadAttention, nn.Linear)) or conv:
            names.append(name)
    return names


def image_stages(backbone: Any) -> StagedTower:
    """A trainable copy of the image tower, cut as the backbone states (checked on a probe)."""
    whole = [("tower", backbone.image_model)]
    stages = backbone.image_stages() if hasattr(backbone, "image_stages") else whole
    probe, what = probe_pixels(backbone), f"{backbone.name} image"
    tower = _checked(stages, probe, backbone.encode_image_trainable)
    if tower is None and stages is not whole:
        warnings.warn(f"{what} tower: its stages do not reproduce the tower's forward; using it as one stage",
                      stacklevel=2)
        tower = _checked(whole, probe, backbone.encode_image_trainable)
    if tower is None:
        raise SpecError(f"{what} tower: image_model(pixels) is not encode_image_trainable(pixels); the backbone "
                        f"must state its cut with image_stages()")
    return tower


def text_stages(backbone: Any) -> StagedTower:
    """A trainable copy of the text tower (input: ``backbone.tokenize(texts)``), checked likewise.
    There is no whole-tower fallback for text (a tower's text module is often not its whole text
    path), so a cut that does not reproduce ``encode_text_trainable`` is an error."""
    if not hasattr(backbone, "text_stages"):
        raise SpecError(f"backbone {backbone.name} does not expose its text tower in stages; "
                        f"methods that fine-tune the text tower need one that does (digits-clip, open_clip models)")
    probe = backbone.tokenize(["a photo of a cat.", "the digit 7"]).to(backbone.device)
    tower = _checked(backbone.text_stages(), probe, backbone.encode_text_trainable)
    if tower is None:
        raise SpecError(f"{backbone.name} text tower: its stages do not reproduce encode_text_trainable")
    return tower


def _checked(stages: list[Stage], probe: Tensor, reference: Callable[[Tensor], Tensor]) -> StagedTower | None:
    """A deep copy of ``stages`` if their composition reproduces ``reference`` on ``probe``, else None."""
    tower = StagedTower(copy.deepcopy(stages))
    try:
        with torch.no_grad():
            tower.eval()
            want, got = reference(probe).float(), tower(probe).float()
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None  # a cut that cannot even run (shapes that do not chain) is no cut
    scale = float(want.abs().max()) + 1.0
    if want.shape == got.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
        return tower
    return None


def probe_pixels(backbone: Any) -> Tensor:
    """Two deterministic, non-constant preprocessed images (no draw from any RNG)."""
    size = int(getattr(getattr(backbone, "image_preprocess", None), "size", 224))
    n = 2 * 3 * size * size
    return torch.sin(torch.arange(n, dtype=torch.float32) * 0.37).reshape(2, 3, size, size).to(backbone.device)
