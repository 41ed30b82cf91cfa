"""Task models on a CLIP backbone for FedAvg-style baselines (``--trainable head | lora | full``).

``build_clip_model(trainable, ctx, rank)`` returns ``(model, inputs)``: ``inputs`` maps what the
engine stores (cached features, or uint8 pixels) to what ``model`` eats; ``model`` returns class
logits. Every choice starts from zero-shot CLIP, so round 0 of each baseline is the zero-shot row:

- ``head`` ("CLIP FedAvg-head", the linear probe): on cached frozen image features, a linear
  classifier over L2-normalised features whose weight rows start as the L2-normalised class
  prompt embeddings times CLIP's logit scale, bias zero (the zero-shot head of WiSE-FT, Wortsman
  et al. 2022, arXiv 2109.01903, and of LP-FT's "zero-shot init"). A random init would throw away
  what the text tower knows and start the federation from chance.
- ``lora``: a copy of the image tower with peft LoRA of rank ``rank`` on its channel-mixing
  layers (:func:`lora_targets`) plus the same zero-shot head; only the LoRA matrices and the
  head train, so only they cross the channel (``state_of`` takes the tensors that require grad).
  The tower is cut into stages (``fedbench.models.stages``); the frozen stages below the lowest
  adapted one run once per run (``FrozenStages.encode_once``), not at every step.
- ``full``: a copy of the whole image tower, every tensor trainable, plus the head.

The backbone object is shared with the feature cache and with other methods of the run, so the
trainable towers are deep copies: fine-tuning never moves the frozen features anyone else reads.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedbench.errors import SpecError
from fedbench.models.stages import StagedTower, image_stages, lora_layer_names, probe_pixels

CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature ends at (and is clipped to) 100


def clip_logit_scale(backbone: Any) -> float:
    """``exp(logit_scale)`` of the backbone's CLIP model when it has one (100 for OpenAI CLIP,
    1/0.07 for a random-init open_clip), else 100, CLIP's trained value."""
    scale = getattr(getattr(backbone, "model", None), "logit_scale", None)
    if isinstance(scale, Tensor):
        return float(scale.detach().float().exp())
    return CLIP_LOGIT_SCALE


class ZeroShotHead(nn.Module):
    """``logits = W normalise(f) + b`` with W = scale * normalise(text features), b = 0 at init."""

    def __init__(self, text_features: Tensor, logit_scale: float) -> None:
        super().__init__()
        num_classes, dim = text_features.shape
        self.linear = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.linear.weight.copy_(logit_scale * F.normalize(text_features.float(), dim=-1))
            self.linear.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(F.normalize(features.float(), dim=-1))


class ClipImageClassifier(nn.Module):
    """Image tower (a trainable copy) followed by the zero-shot head."""

    def __init__(self, tower: nn.Module, head: ZeroShotHead) -> None:
        super().__init__()
        self.tower = tower
        self.head = head

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.tower(pixels))

    def train(self, mode: bool = True) -> ClipImageClassifier:
        # BatchNorm statistics are buffers: state_of never communicates them, and one model object
        # serves every client in turn, so updating them would carry one client's statistics into
        # the next client's training and into evaluation. They stay as pretrained.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        return self


class BackbonePreprocess(nn.Module):
    """uint8 pixels -> the backbone's normalised float input (resize, crop, normalise)."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self._preprocess = backbone.preprocess  # a function, not a module: no weights travel with it

    def forward(self, images: Tensor) -> Tensor:
        return self._preprocess(images)


def lora_targets(tower: nn.Module) -> list[str]:
    """Names of the modules LoRA wraps: every channel-mixing layer of the tower.

    - ``nn.MultiheadAttention`` modules themselves (peft adapts their in-projection and
      out-projection). Never ``attn.out_proj`` alone: MultiheadAttention reads
      ``out_proj.weight`` directly, so a LoRA there would train nothing.
    - ``nn.Linear`` layers outside attention modules (open_clip ViT: ``mlp.c_fc``, ``mlp.c_proj``;
      the offline pair: the classifier inside its joining head).
    - pointwise convolutions (1x1, ungrouped: EfficientNet's ``conv_pw``, ``conv_pwl``,
      ``conv_head``), the convolutional nets' channel-mixing layers. Depthwise and spatial
      convolutions hold few weights and are left frozen.
    """
    return lora_layer_names(tower, spatial_convs=False)


def add_lora(tower: nn.Module, rank: int, targets: list[str] | None = None) -> nn.Module:
    """Wrap ``targets`` (default :func:`lora_targets`) with peft LoRA in place; freeze all else.

    ``lora_alpha = rank`` (scaling 1), no dropout: the update is exactly ``B A``. On
    ``nn.MultiheadAttention`` peft merges ``B A`` into the frozen projection weights for each
    forward pass and subtracts it afterwards, so those "frozen" weights move by a float32 rounding
    step or two (measured: <= 2.3e-8 after 200 passes); they never train.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise SpecError(f"lora_rank={rank}: must be >= 1")
    targets = lora_targets(tower) if targets is None else targets
    if not targets:
        raise SpecError(f"{type(tower).__name__} has no attention, linear or pointwise-conv layer for LoRA")
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    tower = inject_adapter_in_model(config, tower)
    for name, p in tower.named_parameters():
        p.requires_grad = "lora_" in name
    return tower


def untrained_lora_tensors(model: nn.Module, pixels: Tensor) -> list[str]:
    """LoRA ``B`` matrices that get no gradient from ``model(pixels)``: adapters that would
    silently train nothing (the ``attn.out_proj`` pitfall). ``B`` starts at zero, so its gradient
    is the first signal to reach a LoRA; ``A``'s gradient is zero until ``B`` has moved."""
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    for p in lora_b.values():
        p.grad = None
    was_training = model.training
    model.eval()
    try:
        out = model(pixels)
        if out.requires_grad:
            out.float().pow(2).sum().backward()
    finally:
        model.train(was_training)
    dead = [n for n, p in lora_b.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    for p in model.parameters():
        p.grad = None
    return dead


def build_clip_model(trainable: str, ctx: Any, rank: int = 4) -> tuple[nn.Module, nn.Module]:
    """``(model, inputs)`` for ``trainable`` in head | lora | full on ``ctx.backbone``.

    ``head`` expects cached features (the method declares ``input_kind`` "features"); ``lora`` and
    ``full`` expect uint8 pixels and fine-tune a deep copy of ``ctx.backbone.image_model``, called
    on preprocessed pixels as the backbone's ``encode_image_trainable`` calls it.
    """
    if trainable not in ("head", "lora", "full"):
        raise SpecError(f"trainable={trainable!r}: CLIP task models are head, lora or full")
    backbone = ctx.backbone
    if backbone is None or ctx.text_features is None:
        raise SpecError(f"trainable={trainable}: needs a backbone and its class prompt embeddings (--backbone NAME)")
    head = ZeroShotHead(ctx.text_features, clip_logit_scale(backbone))
    if trainable == "head":
        if ctx.input_kind != "features" or ctx.input_shape[-1] != ctx.text_features.shape[1]:
            raise SpecError(f"trainable=head runs on cached image features of dim {ctx.text_features.shape[1]}; "
                            f"got input {ctx.input_kind} {tuple(ctx.input_shape)}")
        return head, nn.Identity()

    if trainable == "full":
        tower = copy.deepcopy(backbone.image_model)
        for p in tower.parameters():
            p.requires_grad = True
        return ClipImageClassifier(tower, head.to(backbone.device)), BackbonePreprocess(backbone)

    # LoRA: the stages below the lowest adapted one are frozen; their output can be computed once.
    stages = image_stages(backbone)
    targets = [lora_targets(stage) for stage in stages.stages]
    if not any(targets):
        raise SpecError(f"{type(backbone.image_model).__name__} has no attention, linear or pointwise-conv "
                        f"layer for LoRA")
    first = next(i for i, t in enumerate(targets) if t)
    for p in stages.parameters():
        p.requires_grad = False
    for i in range(first, len(stages)):
        if targets[i]:
            stages.stages[i] = add_lora(stages.stages[i], rank, targets[i])
    model = ClipImageClassifier(StagesFrom(stages, first), head.to(backbone.device))
    inputs = FrozenStages(backbone, stages, first)
    with torch.no_grad():
        probe = stages.run(probe_pixels(backbone), 0, first)
    dead = untrained_lora_tensors(model, probe)
    if dead:
        raise SpecError(f"LoRA on {type(backbone.image_model).__name__}: {len(dead)} adapters get no gradient and "
                        f"would train nothing (first: {dead[0]}); target the modules the forward pass uses")
    return model, inputs


class StagesFrom(nn.Module):
    """The adapted top of a staged tower: stages[first:] (a module, so its LoRA tensors are named)."""

    def __init__(self, stages: StagedTower, first: int) -> None:
        super().__init__()
        self.stages, self.first = stages, first

    def forward(self, activations: Tensor) -> Tensor:
        return self.stages.run(activations, self.first)


class FrozenStages(nn.Module):
    """Stored inputs -> the activations at the lowest adapted stage.

    uint8 pixels are preprocessed and run through the frozen stages below it; float inputs are
    such activations already (made once per run by :meth:`encode_once`), so they pass unchanged.
    The frozen stages run in eval mode without grad: their output is the same every round.
    """

    MAX_CACHE_BYTES = 2 * 1024**3  # a pool whose activations would take more is encoded every step

    def __init__(self, backbone: Any, stages: StagedTower, first: int) -> None:
        super().__init__()
        self._preprocess, self.stages, self.first = backbone.preprocess, stages, first

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            return x
        if self.first == 0:
            return self._preprocess(x)
        with torch.no_grad():
            was_training = [m.training for m in self.stages.stages[: self.first]]
            for m in self.stages.stages[: self.first]:
                m.eval()
            out = self.stages.run(self._preprocess(x), 0, self.first)
            for m, mode in zip(self.stages.stages[: self.first], was_training, strict=True):
                m.train(mode)
        return out

    def encode_once(self, pixels: Tensor, batch_size: int = 500) -> Tensor:
        """The pool's activations, or the pixels themselves where caching saves nothing (no frozen
        stage) or would hold more than ``MAX_CACHE_BYTES``."""
        if self.first == 0 or not len(pixels):
            return pixels
        head = self(pixels[:1])
        if head.element_size() * head.numel() * len(pixels) > self.MAX_CACHE_BYTES:
            return pixels
        return torch.cat([self(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])
