"""Zero-shot CLIP: classify by cosine similarity with the class prompts' text embeddings.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021 (arXiv 2103.00020), Sec. 3.1.2 and 3.1.4; reference row: no training, no rounds,
nothing communicated.

  class embedding w_c = normalise(text_encoder(template(c)))     (one template)
  logits(x)        = 100 * normalise(image_encoder(x)) . w_c     (CLIP's logit scale, 100)

Prompt ensembling (Sec. 3.1.4): with several templates, each class embedding is the mean of
the normalised embeddings of that class's prompts, normalised again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.core.registry import register_method
from fedbench.errors import SpecError
from fedbench.federation.method import Method, Payload, RunContext, ServerContext, ServerState
from fedbench.federation.train import batched_logits

LOGIT_SCALE = 100.0  # CLIP's learned temperature, clipped at 100 in training


def parse_templates(text: str) -> list[str]:
    """``"a photo of a {}.|a sketch of a {}."`` -> the templates; each needs one ``{}``."""
    templates = [t.strip() for t in text.split("|") if t.strip()]
    for t in templates:
        try:
            ok = t.count("{}") == 1 and t.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise SpecError(
                f"template {t!r}: each |-separated template needs exactly one {{}} where the class "
                f"name goes and no other braces, e.g. templates='a photo of a {{}}.|a sketch of a {{}}.'"
            )
    return templates


@dataclass(frozen=True)
class ZeroShotHparams:
    # Empty: the task's own prompt template (the engine's text features). Otherwise a
    # |-separated list of templates, ensembled as CLIP does.
    templates: str = ""

    def __post_init__(self) -> None:
        parse_templates(self.templates)


@register_method(
    "zero-shot",
    description="Zero-shot CLIP: cosine similarity with the class prompts, no training (reference row)",
    fidelity="reference",
    source="Radford et al. 2021, arXiv 2103.00020",
)
class ZeroShot(Method):
    Hparams = ZeroShotHparams
    default_rounds = 1  # nothing trains; the spec should not inherit a task's long schedule
    trains = False

    @classmethod
    def input_kind(cls, hp: ZeroShotHparams) -> str:
        return "features"

    def __init__(self, hp: ZeroShotHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        self.templates = parse_templates(hp.templates)

    def class_embeddings(self) -> Tensor:
        """[num_classes, D], unit rows: the task's prompts, or the ensemble of ``templates``."""
        if not self.templates:
            if self.ctx.text_features is None:
                raise SpecError("zero-shot needs the class prompts' text features; run it with a backbone.")
            return F.normalize(self.ctx.text_features.float(), dim=-1)
        if self.ctx.backbone is None:
            raise SpecError("zero-shot with templates needs a backbone to encode them (--backbone NAME).")
        per_template = []
        for template in self.templates:
            prompts = [template.format(name) for name in self.ctx.class_names]
            with torch.no_grad():
                emb = self.ctx.backbone.encode_text(prompts)
            per_template.append(F.normalize(torch.as_tensor(emb).float(), dim=-1))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)

    def init(self, server: ServerContext) -> ServerState:
        # The server state is the classifier itself, so predict reads only what it is handed.
        return ServerState(broadcast={"class_embeddings": self.class_embeddings()})

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        w = model["class_embeddings"].to(x.device)
        if x.shape[-1] != w.shape[-1]:
            raise SpecError(f"image features have {x.shape[-1]} dims but text features {w.shape[-1]}: "
                            f"zero-shot needs a backbone whose two towers share one embedding space.")
        return batched_logits(lambda b: LOGIT_SCALE * F.normalize(b.float(), dim=-1) @ w.T, x)
