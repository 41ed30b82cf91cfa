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

    def image_stages(self) -> list[tuple[str, nn.Module]]:
        """A ViT as ``stem``, ``block0``... (one per residual block), ``head``; any other tower
        (ModifiedResNet, timm, a ViT subclass with its own forward) as one stage."""
        return _vit_stages(self.image_model) or [("tower", self.image_model)]

    def text_stages(self) -> list[tuple[str, nn.Module]]:
        """A CLIP text transformer as ``embed``, ``block0``..., ``head`` (activations between
        stages are ``(x, tokens)``: the pooling reads the tokens); other text towers as one
        stage. No stage holds the image tower."""
        model = self.model
        source = _text_transformer_source(model)
        if source is not None:
            return _text_stages(source)
        text = getattr(model, "text", None)
        if isinstance(text, nn.Module):
            import open_clip

            if type(model).encode_text is open_clip.CustomTextCLIP.encode_text:
                return [("text", text)]  # CustomTextCLIP.encode_text(t) is text(t) (normalize=False)
            coca = getattr(open_clip, "CoCa", None)
            if coca is not None and type(model).encode_text is coca.encode_text:
                return [("text", _CocaText(text))]
        raise SpecError(f"{self.name}: the text tower of {type(model).__name__} is not cut into stages.")


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
        shown = arch if arch in open_clip.list_models() else "ARCH"
        said = " ".join(str(exc).split())[:300]  # one line: torch's messages span several
        if pretrained and os.path.isfile(pretrained):
            # The file is at fault (text, a truncated download, another architecture's weights), not a hub.
            raise BackboneUnavailableError(
                f"{name}: {pretrained} is not a valid open_clip checkpoint of {shown} (open_clip: "
                f"{type(exc).__name__}: {said}). A checkpoint is that architecture's state dict "
                f"(.pt/.bin via torch.save, or .safetensors): where a model hub is reachable, "
                f"open_clip.create_model('{shown}', pretrained=TAG) downloads one into the hub cache "
                f"(open_clip.list_pretrained_tags_by_model('{shown}') lists the tags); copy that file here "
                f"and give it with --backbone openclip:{shown}@/path/to/checkpoint.pt"
            ) from exc
        raise BackboneUnavailableError(
            f"{name}: could not load {source}: hub weights need the network or a copy in the hub cache. "
            f"Point at a local copy with --backbone openclip:{shown}@/path/to/checkpoint.pt. "
            f"(open_clip: {type(exc).__name__}: {said})"
        ) from exc


def _openclip_tokenizer(name: str, arch: str, source: str) -> Any:
    import open_clip

    try:
        return open_clip.get_tokenizer(arch)
    except Exception as exc:  # HF tokenizers come from the hub
        raise BackboneUnavailableError(
            f"{name}: could not load the tokenizer of {source} ({type(exc).__name__}: {str(exc)[:300]})."
        ) from exc


# ------------------------------------------------------------------------------------------------
# Stages (see fedbench.models.stages), written after open_clip 3.3's VisionTransformer.forward
# (_embeds, transformer, _pool, proj) and CLIP.encode_text / TextTransformer.forward. Every stage
# holds the model's own modules and parameters, never a whole tower, so a deep copy of the list
# copies each once and a stage's parameters are exactly what it runs.


def _same_methods(obj: Any, base: type, names: tuple[str, ...]) -> bool:
    """``obj`` runs ``base``'s own code for each of ``names`` (no subclass override)."""
    return all(getattr(type(obj), n, None) is getattr(base, n) for n in names if hasattr(base, n))


def _lnd(transformer: nn.Module) -> bool:
    """Whether the blocks run sequence-first (LND): open_clip < 2.23 always (no ``batch_first``),
    later versions when ``Transformer.batch_first`` is False (the Transformer transposes)."""
    return not getattr(transformer, "batch_first", False)


def _plain_transformer(transformer: Any) -> bool:
    from open_clip.transformer import Transformer

    return isinstance(transformer, Transformer) and _same_methods(transformer, Transformer, ("forward",))


def _vit_stages(visual: nn.Module) -> list[tuple[str, nn.Module]] | None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer) or getattr(visual, "output_tokens", False):
        return None
    if not _same_methods(visual, VisionTransformer, ("forward", "_embeds", "_pool", "_global_pool")):
        return None
    if not _plain_transformer(visual.transformer):
        return None
    blocks = [(f"block{i}", block) for i, block in enumerate(visual.transformer.resblocks)]
    return [("stem", _VitStem(visual)), *blocks, ("head", _VitHead(visual))]


class _VitStem(nn.Module):
    """conv1 -> patches [N, grid**2, width], class token, positional embedding, patch dropout,
    ln_pre (VisionTransformer._embeds); then [N, L, D] -> [L, N, D] if the blocks run LND."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.patch_dropout = visual.patch_dropout
        self.ln_pre = visual.ln_pre
        self.lnd = _lnd(visual.transformer)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(self.patch_dropout(x))
        return x.transpose(0, 1).contiguous() if self.lnd else x


class _VitHead(nn.Module):
    """Back to [N, L, D] if needed, then VisionTransformer._pool (attentional pool, ln_post,
    token / average pool, in the model's order) and the projection."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.attn_pool = visual.attn_pool
        self.attn_pool_contrastive = getattr(visual, "attn_pool_contrastive", None)
        self.attn_pool_type = getattr(visual, "attn_pool_type", "")
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))
        self.pool_type = visual.pool_type
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.lnd = _lnd(visual.transformer)

    def _global_pool(self, x: Tensor) -> Tensor:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return x[:, 0]
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.lnd:
            x = x.transpose(0, 1)
        if self.attn_pool is not None:
            if self.attn_pool_contrastive is not None:
                x = self.ln_post(x)
                pooled = self.attn_pool_contrastive(x if self.attn_pool_type == "parallel" else self.attn_pool(x))
            else:
                pooled = self._global_pool(self.ln_post(self.attn_pool(x)))
        elif self.final_ln_after_pool:
            pooled = self.ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(self.ln_post(x))
        if self.proj is None:
            return pooled
        return self.proj(pooled) if isinstance(self.proj, nn.Module) else pooled @ self.proj


def _text_transformer_source(model: nn.Module) -> nn.Module | None:
    """The module holding a plain causal text transformer whose output is ``encode_text``:
    ``CLIP`` itself (text modules at the top level) or a CustomTextCLIP's ``TextTransformer``
    without a class token or pad mask (CoCa's and bidirectional ones stay one stage)."""
    import open_clip
    from open_clip.transformer import TextTransformer

    if type(model).encode_text is open_clip.CLIP.encode_text:
        source = model
    elif type(model).encode_text is open_clip.CustomTextCLIP.encode_text and isinstance(
        getattr(model, "text", None), TextTransformer
    ):
        source = model.text
        if not _same_methods(source, TextTransformer, ("forward", "_embeds")):
            return None
        if source.cls_emb is not None or getattr(source, "use_pad_mask", False) or source.output_tokens:
            return None
    else:
        return None
    return source if _plain_transformer(source.transformer) else None


def _text_stages(source: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = source.transformer.resblocks
    mask = source.attn_mask
    stages: list[tuple[str, nn.Module]] = [("embed", _TextEmbed(source))]
    stages += [(f"block{i}", _TextBlock(block, mask)) for i, block in enumerate(blocks)]
    return [*stages, ("head", _TextHead(source))]


class _TextEmbed(nn.Module):
    """tokens -> (token + positional embeddings in the blocks' dtype, tokens)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.lnd = _lnd(source.transformer)
        # The blocks' dtype is read at each call (Transformer.get_cast_dtype): a plain list keeps
        # the first block out of this stage's parameters, and a deep copy of the whole list of
        # stages maps it onto the copied block.
        self._first_block = [source.transformer.resblocks[0]]

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        block = self._first_block[0]
        dtype = block.get_weight_dtype() if hasattr(block, "get_weight_dtype") else self.token_embedding.weight.dtype
        x = self.token_embedding(tokens).to(dtype)
        x = x + self.positional_embedding[: tokens.shape[1]].to(dtype)
        return (x.transpose(0, 1).contiguous() if self.lnd else x), tokens


class _TextBlock(nn.Module):
    """One residual block on (x, tokens), with the model's fixed causal mask."""

    def __init__(self, block: nn.Module, attn_mask: Tensor | None) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, tokens = inputs
        return self.block(x, attn_mask=self.attn_mask), tokens


class _TextHead(nn.Module):
    """ln_final, pooling (text_global_pool: argmax = end of text, eos, first, last) and the projection."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.ln_final = source.ln_final
        self.text_projection = source.text_projection
        self.pool_type = getattr(source, "text_pool_type", getattr(source, "pool_type", "argmax"))
        self.eos_id = getattr(source, "text_eos_id", getattr(source, "eos_id", None))
        self.lnd = _lnd(source.transformer)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        x, tokens = inputs
        x = self.ln_final(x.transpose(0, 1) if self.lnd else x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "argmax":
            x = x[rows, tokens.argmax(dim=-1)]
        elif self.pool_type == "eos":
            x = x[rows, (tokens == self.eos_id).int().argmax(dim=-1)]
        if self.text_projection is None:
            return x
        return self.text_projection(x) if isinstance(self.text_projection, nn.Module) else x @ self.text_projection


class _CocaText(nn.Module):
    """CoCa.encode_text: the text tower's pooled latent, normalised (CoCa's default)."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.text(tokens)
        return torch.nn.functional.normalize(out[0] if isinstance(out, tuple) else out, dim=-1)
