"""open_clip backbones: any architecture with a pretrained tag, a local checkpoint, or a seeded random init."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedbench.errors import BackboneUnavailableError, SpecError, UnknownNameError
from fedbench.models.backbones.base import RANDOM_INIT_SEED, Backbone, weights_fingerprint
from fedbench.models.backbones.preprocess import ImagePreprocess


class OpenClipBackbone(Backbone):
    """Any open_clip model (CLIP, CustomTextCLIP, CoCa...): ``visual`` is the image tower."""

    def __init__(
        self, name: str, model: nn.Module, tokenizer: Any, device: str | torch.device, recipe: dict[str, Any]
    ) -> None:
        """``recipe`` names what besides the weights shapes the outputs (architecture, activation)."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):  # open_clip keeps (h, w); our crop is square
            if size[0] != size[1]:
                raise BackboneUnavailableError(f"{name}: non-square input size {size} is not supported.")
            size = size[0]
        mode = cfg.get("resize_mode", "shortest")
        super().__init__(
            name,
            ImagePreprocess(
                size=int(size),
                resize=int(size),
                mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                interpolation=cfg.get("interpolation", "bicubic"),
                mode="squash" if mode == "squash" else "shortest",
            ),
            device,
        )
        self.model = model.to(self.device).eval()
        self.image_model = model.visual
        # CLIP keeps its text modules at the top level; CustomTextCLIP has a `text` tower.
        text = getattr(model, "text", None)
        self.text_model = text if isinstance(text, nn.Module) else model.transformer
        self._tokenizer = tokenizer
        self.fingerprint = weights_fingerprint({"model": model}, {"family": "openclip", **recipe})
        self.embed_dim = int(self.encode_text(["a"]).shape[1])

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def encode_image_trainable(self, pixels: Tensor) -> Tensor:
        return self.image_model(pixels)

    def encode_text_trainable(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)


def openclip_backbone(
    argument: str | None, *, device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> OpenClipBackbone:
    """open_clip model: ``openclip:ARCH/TAG``, ``openclip:ARCH@CHECKPOINT`` or ``openclip:ARCH``."""
    import open_clip

    if not argument:
        raise SpecError(
            "openclip needs an architecture: openclip:ViT-B-32/openai (pretrained tag), "
            "openclip:ViT-B-32@/path/to/checkpoint.pt (local file) or openclip:ViT-B-32 (random init)."
        )
    name = f"openclip:{argument}"
    if argument.startswith(("hf-hub:", "local-dir:")):
        model = _openclip_create(name, argument, argument, pretrained=None)
        tokenizer = _openclip_tokenizer(name, argument, argument)
        return OpenClipBackbone(name, model, tokenizer, device, {"arch": argument})

    arch, tag, checkpoint = _parse_openclip(argument)
    quick_gelu = False
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise BackboneUnavailableError(
                f"{name}: no checkpoint file at {path}. Copy the weights there, or point at a local "
                f"copy with --backbone openclip:{arch}@/path/to/checkpoint.pt."
            )
        model = _openclip_create(name, arch, arch, pretrained=str(path))
    elif tag is not None:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            known = ", ".join(tags) if tags else "none (give a local checkpoint with @PATH)"
            raise UnknownNameError(f"{name}: unknown pretrained tag {tag!r} for {arch}. Known tags: {known}.")
        # OpenAI's weights were trained with QuickGELU; open_clip only warns when the arch lacks it.
        quick_gelu = bool(cfg.get("quick_gelu"))
        model = _openclip_create(name, arch, _hub_id(cfg), pretrained=tag, force_quick_gelu=quick_gelu)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _openclip_create(name, arch, arch, pretrained=None)
    tokenizer = _openclip_tokenizer(name, arch, arch)
    return OpenClipBackbone(name, model, tokenizer, device, {"arch": arch, "force_quick_gelu": quick_gelu})


def _parse_openclip(argument: str) -> tuple[str, str | None, str | None]:
    """``ARCH@PATH`` / ``ARCH/TAG`` / ``ARCH`` -> (arch, tag, checkpoint). ``ViT-B/32`` reads as ``ViT-B-32``."""
    import open_clip

    if "@" in argument:
        arch, checkpoint = argument.split("@", 1)
        return _resolve_arch(arch), None, checkpoint
    known = set(open_clip.list_models())
    if "/" in argument:
        arch, tag = argument.rsplit("/", 1)
        if arch.replace("/", "-") in known or argument.replace("/", "-") not in known:
            return _resolve_arch(arch), tag, None
    return _resolve_arch(argument), None, None


def _resolve_arch(arch: str) -> str:
    import open_clip

    models = open_clip.list_models()
    cleaned = arch.replace("/", "-")
    if cleaned in models:
        return cleaned
    by_lower = {m.lower(): m for m in models}
    if cleaned.lower() in by_lower:
        return by_lower[cleaned.lower()]
    close = difflib.get_close_matches(cleaned.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(by_lower[c] for c in close)}." if close else ""
    raise UnknownNameError(
        f"unknown open_clip architecture {arch!r}.{hint} open_clip.list_models() names all {len(models)} architectures."
    )


def _hub_id(cfg: dict[str, Any]) -> str:
    return str(cfg.get("hf_hub") or cfg.get("url") or "?").rstrip("/")


def _openclip_create(name: str, arch: str, source: str, pretrained: str | None, **kwargs: Any) -> nn.Module:
    """open_clip.create_model on the CPU (seeded init is device-independent); errors -> a clear message."""
    import open_clip

    try:
        return open_clip.create_model(arch, pretrained=pretrained, device="cpu", output_dict=True, **kwargs)
    except Exception as exc:
        what = f"the checkpoint {pretrained}" if pretrained and os.path.isfile(pretrained) else source
        shown = arch if arch in open_clip.list_models() else "ARCH"
        raise BackboneUnavailableError(
            f"{name}: could not load {what}: hub weights need the network or a copy in the hub cache. "
            f"Point at a local copy with --backbone openclip:{shown}@/path/to/checkpoint.pt. "
            f"(open_clip: {type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _openclip_tokenizer(name: str, arch: str, source: str) -> Any:
    import open_clip

    try:
        return open_clip.get_tokenizer(arch)
    except Exception as exc:  # HF tokenizers come from the hub
        raise BackboneUnavailableError(
            f"{name}: could not load the tokenizer of {source} ({type(exc).__name__}: {str(exc)[:300]})."
        ) from exc
