"""Task models that methods train, and the pixel pipeline for models trained from pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SimpleCNN(nn.Module):
    """NIID-Bench's simple CNN: conv 6@5x5 - pool - conv 16@5x5 - pool - fc 120 - fc 84 - fc classes.

    Source: Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study"
    (NIID-Bench), models ``SimpleCNNMNIST`` (1x28x28 -> 16*4*4) and ``SimpleCNN`` (3x32x32 -> 16*5*5).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    @staticmethod
    def stacked_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        """K copies of the network at once: ``params`` holds each parameter stacked [K, ...] (as
        torch.func.stack_module_state does), ``x`` is [K, B, C, H, W]; returns [K, B, classes].

        For the batched client engine. vmap would run the K convolutions as one grouped
        convolution in NCHW, which mkldnn runs no faster per sample than K small ones; here the
        groups run channels-last (measured about 2x faster per sample on CPU), and max-pool comes
        before ReLU (they commute: relu(max(x)) = max(relu(x)), gradients included) so ReLU
        touches a quarter of the values. Equal to K calls of ``forward`` up to float
        reassociation of the convolutions' sums."""
        k, b, c, height, width = x.shape
        h = x.transpose(0, 1).reshape(b, k * c, height, width).contiguous(memory_format=torch.channels_last)
        for name in ("conv1", "conv2"):  # client j owns channels j*C .. (j+1)*C - 1 of every layer
            weight = params[f"{name}.weight"]
            h = F.conv2d(h, weight.flatten(0, 1), params[f"{name}.bias"].flatten(), groups=k)
            h = F.relu(F.max_pool2d(h, 2))
        h = h.reshape(b, k, -1).transpose(0, 1)  # [K, B, 16*s*s] in each client's own (C, H, W) order
        for name in ("fc1", "fc2", "fc3"):
            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
            if name != "fc3":
                h = F.relu(h)
        return h


class PixelInput(nn.Module):
    """uint8 pixels -> float, as torchvision's ToTensor (+ Normalize when the task gives mean/std)."""

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        super().__init__()
        # Buffers (not sent: state_of takes parameters only) so that .to(device) moves them.
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


def augment_crop_flip(x: Tensor, rng: torch.Generator, pad: int = 4) -> Tensor:
    """Batched NIID-Bench CIFAR train transform: reflect-pad 4, random crop back, random h-flip."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)  # N,H',W',C
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=rng)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=rng)
    rows = (dy + torch.arange(h)).view(n, h, 1)
    cols = (dx + torch.arange(w)).view(n, 1, w)
    out = padded[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)  # N,C,H,W
    flip = torch.rand(n, generator=rng) < 0.5
    out[flip] = out[flip].flip(3)
    return out.to(x.dtype)  # crops and flips move whole pixels: casting back is lossless


def build_task_model(trainable: str, ctx, lora_rank: int = 4) -> tuple[nn.Module, nn.Module]:
    """(model, input pipeline) for a ``trainable`` choice of FedAvg-style methods.

    ``simple-cnn`` trains NIID-Bench's CNN from pixels; CLIP-based choices are added in
    ``fedbench.models.clip``.
    """
    if trainable == "simple-cnn":
        c, h, w = ctx.input_shape
        if h != w:
            raise ValueError(f"simple-cnn expects square images, got {h}x{w}")
        return SimpleCNN(c, h, ctx.num_classes), PixelInput(ctx.pixel_mean, ctx.pixel_std)
    from fedbench.models.clip import build_clip_model

    return build_clip_model(trainable, ctx, rank=lora_rank)
