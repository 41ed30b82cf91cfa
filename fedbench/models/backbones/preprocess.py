"""Batched image preprocessing of the backbones: resize, center crop, normalise, in torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedbench.errors import SpecError


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter side to ``resize``, center-crop ``size``, scale to [0,1], normalise.

    Done in torch on whole batches (the cache feeds hundreds of images at a time); matches the
    usual PIL pipeline up to interpolation rounding. ``mode="squash"`` resizes straight to
    ``size`` x ``size`` without a crop (open_clip's ``resize_mode="squash"``).
    """

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    mode: str = "shortest"

    @property
    def id(self) -> str:
        def fmt(v: Sequence[float]) -> str:
            return ",".join(f"{x:.4g}" for x in v)

        return (
            f"v1-{self.mode}{self.resize}-crop{self.size}-{self.interpolation}-mean{fmt(self.mean)}-std{fmt(self.std)}"
        )

    def __call__(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise SpecError(
                "backbones take uint8 images [N, C, H, W]; got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}."
            )
        channels = images.shape[1]
        if channels not in (1, 3, 4):
            raise SpecError(f"images must have 1, 3 or 4 channels (got {channels}).")
        x = images.to(device)[:, :3].float().div_(255.0)
        if channels == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if self.mode == "squash":
            target = (self.size, self.size)
        else:  # torchvision's Resize(int): shorter side -> resize, longer side truncated
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.resize * long / short)
            target = (self.resize, new_long) if h <= w else (new_long, self.resize)
        if tuple(target) != (h, w):
            antialias = self.interpolation in ("bilinear", "bicubic")
            align = False if self.interpolation != "nearest" else None
            x = nn.functional.interpolate(
                x, size=target, mode=self.interpolation, align_corners=align, antialias=antialias
            )
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clamps to uint8
        top = int(round((x.shape[-2] - self.size) / 2.0))
        left = int(round((x.shape[-1] - self.size) / 2.0))
        x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
