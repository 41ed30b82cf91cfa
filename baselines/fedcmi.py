"""FedCMI: Balanced Multi-modal Federated Learning via Cross-Modal Infiltration.

Fan, Xu, Wang, Zhu, Guo, arXiv 2401.00894 (2024); adaptation (no code and no CLIP results are
public; the paper's experiments are audio-visual and image-text: CREMA-D, AVE, CrisisMMD).

The paper's words (from its abstract and summaries; the method section is not verified here):
knowledge is transferred from the *global dominant modality* to the weak one; the weak modality
has two projectors, a **Self-Projector** (its own features, so it is not reduced to imitating the
dominant modality) and an **Infiltration Projector** (the dominant modality's knowledge), feeding
one **shared classifier**; a **proximal term** against input heterogeneity; **class-wise
temperature adaptation** in the distillation, for fair accuracy across classes.

Our design (each a field of :class:`FedCMIHparams`):
- modes. ``text-image`` (image tasks): the dominant modality is the text side, the class-prompt
  embeddings T the server broadcasts; the weak modality is the client's frozen image feature w;
  a sample's dominant representation is its class prompt's embedding d = T_y. ``two-view``
  (tasks with two modalities per sample, e.g. ``rotated-mnist-glimpse``): the first modality
  (the image) is dominant, d its frozen feature, and has a projector P_d of its own; the second
  is weak, w its frozen feature.
- global knowledge: class prototypes Pi (text-image: T itself; two-view: the sample-count mean
  of every client's per-class mean d, updated by the server each round); a client fills classes
  the server has no prototype for yet with its own class means. Teacher logits of a sample:
  t_c = s cos(d, Pi_c), s the backbone's logit scale.
- projectors: Linear(D, D) + ReLU each; classifier: Linear(D, C) on the sum of the projections.
- class-wise temperatures: tau_c = tau_min + (tau_max - tau_min) (1 - conf_c), conf_c the mean
  softmax probability of the true class on the clients' validation splits (pooled by the server
  from per-class sums the clients upload), so lagging classes get softer targets; every class
  starts at ``tau``; ``temperature=fixed`` keeps ``tau`` throughout.
- client: a fresh Adam every round; ``local_epochs`` shuffled passes in batches of ``batch_size``.
  What it uploads beside the weights is per class, never per sample, but it is not nothing: the
  confidence counts reveal its validation label histogram, and (two-view) the class sums of d its
  training histogram and class means (the price of server-side prototypes and temperatures).

Per round t, for every sampled client k:
  server:   send theta_t = (P_d, P_s, P_i, g), the prototypes Pi_t and the temperatures tau_t
  client k: E epochs of Adam on (no P_d in text-image)
              CE(g(P_d(d) + P_s(w) + P_i(w)), y)                         (the fused model, local labels)
            + CE(g(P_s(w)), y)                                           (Self-Projector, local labels alone)
            + kd_weight tau_y^2 KL(softmax(t / tau_y) || softmax(g(P_i(w)) / tau_y))   (infiltration)
            + (mu / 2) ||theta - theta_t||^2                              (proximal)
            send theta_k, per-class sums of the validation confidence, and (two-view) per-class
            sums of d over its training split
  server:   theta_{t+1} = sum_k n_k theta_k / sum_k n_k; Pi_{t+1} from the latest class sums of
            every client seen; tau_{t+1} from the round's validation confidences
  predict:  g(P_d(d) + P_s(w) + P_i(w)); each modality alone: g(P_d(d)), g(P_s(w) + P_i(w))
``infiltration=False`` drops P_i and its term (the ablation): the joint model with the weak
modality's own loss; ``mu=0`` drops the proximal term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbench.core.options import bounded
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData
from fedbench.errors import SpecError
from fedbench.federation.method import (
    ClientContext,
    ClientResult,
    Message,
    Method,
    Payload,
    RunContext,
    ServerContext,
    ServerState,
)
from fedbench.federation.train import batched_logits, load_state, state_of, weighted_average
from fedbench.models.clip import clip_logit_scale

Mode = Literal["text-image", "two-view"]
STATISTICS = ("conf_sum", "conf_count", "proto_sum", "proto_count")  # uploaded beside the weights
GLOBAL_KNOWLEDGE = ("prototypes", "prototype_known", "tau")  # sent beside the weights


@dataclass(frozen=True)
class FedCMIHparams:
    mode: Mode = "text-image"
    infiltration: bool = True  # False: no Infiltration Projector (the ablation)
    kd_weight: float = bounded(1.0, ge=0)
    temperature: Literal["class-wise", "fixed"] = "class-wise"
    tau: float = bounded(2.0, gt=0)  # every class's temperature before any confidence is known; fixed: always
    tau_min: float = bounded(1.0, gt=0)  # the most confident class's temperature (conf 1)
    tau_max: float = bounded(4.0, gt=0)  # the least confident class's temperature (conf 0)
    mu: float = bounded(0.01, ge=0)  # proximal weight (FedProx's NIID-Bench value; the paper's is not public)
    local_epochs: int = bounded(1, ge=1)
    batch_size: int = bounded(32, ge=1)
    lr: float = bounded(1e-3, gt=0)
    logit_scale: float = bounded(0.0, ge=0)  # s of the teacher logits; 0: the backbone's exp(logit_scale)

    def __post_init__(self) -> None:
        for name in ("tau", "tau_min", "tau_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value}: a temperature must be a finite number > 0")
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min={self.tau_min} > tau_max={self.tau_max}: the range is empty")
        for name in ("kd_weight", "mu", "logit_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value}: must be a finite number >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr}: must be a finite number > 0")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be >= 1")


class TwoProjectorModel(nn.Module):
    """P_d (two-view only), P_s, P_i (with infiltration) and the shared classifier g."""

    def __init__(self, dim: int, num_classes: int, two_view: bool, infiltration: bool) -> None:
        super().__init__()
        def projector() -> nn.Module:
            return nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.dominant = projector() if two_view else None
        self.self_proj = projector()
        self.infiltration = projector() if infiltration else None
        self.classifier = nn.Linear(dim, num_classes)

    def heads(self, dominant: Tensor | None, weak: Tensor) -> dict[str, Tensor]:
        """Each projection of a batch (rows unit-norm features)."""
        out = {"self": self.self_proj(weak)}
        if self.dominant is not None:
            out["dominant"] = self.dominant(dominant)
        if self.infiltration is not None:
            out["infiltration"] = self.infiltration(weak)
        return out


@register_method(
    "fedcmi",
    description="FedCMI: self + infiltration projectors on the weak modality, distilled from the dominant one "
                "with class-wise temperatures",
    fidelity="adaptation",
    source="Fan et al. 2024, arXiv 2401.00894 (no code public); adapted to frozen vision-language features",
)
class FedCMI(Method):
    Hparams = FedCMIHparams

    @classmethod
    def input_kind(cls, hp: FedCMIHparams) -> str:
        return "features"

    @classmethod
    def uses_views(cls, hp: FedCMIHparams) -> bool:
        return hp.mode == "two-view"

    @classmethod
    def check_task(cls, hp: FedCMIHparams, task: Any) -> None:
        modalities = tuple(getattr(task, "modalities", ("image",)))
        if hp.mode == "two-view" and len(modalities) != 2:
            raise SpecError(f"fedcmi mode=two-view needs a task with two modalities per sample; this one has "
                            f"{len(modalities)} ({', '.join(modalities)}). Use a two-modality task such as "
                            f"rotated-mnist-glimpse, or --set mode=text-image")

    def __init__(self, hp: FedCMIHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        if ctx.text_features is None:
            raise SpecError("fedcmi needs the class prompts' text features: run it with a backbone (--backbone NAME)")
        self.two_view = hp.mode == "two-view"
        dim = int(ctx.input_shape[-1])
        if not self.two_view and ctx.text_features.shape[1] != dim:
            raise SpecError(f"fedcmi mode=text-image: image features have {dim} dims but text features "
                            f"{ctx.text_features.shape[1]}; the backbone's towers must share one space")
        self.num_classes = ctx.num_classes
        self.text = F.normalize(ctx.text_features.float(), dim=-1).to(ctx.device)
        self.scale = hp.logit_scale or clip_logit_scale(ctx.backbone)
        self.model = TwoProjectorModel(dim, ctx.num_classes, self.two_view, hp.infiltration).to(ctx.device)

    def split(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """(dominant, weak) unit-norm features of a batch: [n, 2, D] two-view, [n, D] image only."""
        x = F.normalize(x.float(), dim=-1)
        return (x[:, 0], x[:, 1]) if self.two_view else (None, x)

    # server: theta_0 from the seeded initialiser; Pi_0 = T (text-image) or none yet; tau_0 = tau
    def init(self, server: ServerContext) -> ServerState:
        c, dim = self.num_classes, int(self.ctx.input_shape[-1])
        prototypes = self.text.clone() if not self.two_view else torch.zeros(c, dim, device=server.device)
        broadcast = {**state_of(self.model), "prototypes": prototypes,
                     "prototype_known": torch.full((c,), float(not self.two_view), device=server.device),
                     "tau": torch.full((c,), float(self.hp.tau), device=server.device)}
        return ServerState(broadcast=broadcast, private={"class_sums": {}})

    # client k: E epochs of CE (self) + KD (infiltration, class-wise tau) + proximal; send theta_k and statistics
    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        received = message.payload
        weights = {k: v for k, v in received.items() if k not in GLOBAL_KNOWLEDGE}
        load_state(self.model, weights)
        dominant, weak = self.split(data.train.x)
        y = data.train.y
        teacher, proto_sum, proto_count = self.teacher_logits(received, dominant, y)
        loss = self.train_epochs(dominant, weak, y, teacher, received["tau"], weights, client.rng)
        upload = {**state_of(self.model), **self.val_confidence(data)}
        if self.two_view:
            upload.update(proto_sum=proto_sum, proto_count=proto_count)
        return ClientResult(upload=upload, num_samples=len(data.train), train_loss=loss)

    def teacher_logits(self, received: Payload, dominant: Tensor | None, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """t = s cos(d, Pi) for each training sample, and the client's per-class sums of d and counts.

        d is the dominant modality's representation of a sample: its feature (two-view) or its class
        prompt's embedding (text-image). A class the server has no prototype for yet takes this
        client's own mean of d (zero where the client has none either)."""
        anchor = dominant if dominant is not None else self.text[y]
        proto_sum = torch.zeros(self.num_classes, anchor.shape[1], device=y.device).index_add_(0, y, anchor)
        proto_count = torch.bincount(y, minlength=self.num_classes).float()
        local = proto_sum / proto_count.clamp(min=1)[:, None]
        known = received["prototype_known"][:, None] > 0
        prototypes = F.normalize(torch.where(known, received["prototypes"], local), dim=-1)
        return self.scale * anchor @ prototypes.T, proto_sum, proto_count

    def train_epochs(self, dominant: Tensor | None, weak: Tensor, y: Tensor, teacher: Tensor, tau: Tensor,
                     anchors: Payload, rng: torch.Generator) -> float | None:
        params = dict(self.model.named_parameters())
        optimizer = torch.optim.Adam(params.values(), lr=self.hp.lr)
        self.model.train()
        losses: list[float] = []
        for _ in range(self.hp.local_epochs):
            losses = []
            order = torch.randperm(len(y), generator=rng).to(y.device)
            for start in range(0, len(y), self.hp.batch_size):
                idx = order[start : start + self.hp.batch_size]
                batch_dominant = None if dominant is None else dominant[idx]
                terms = self.loss_terms(batch_dominant, weak[idx], y[idx], teacher[idx], tau, params, anchors)
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return sum(losses) / len(losses) if losses else None  # not NaN: no batch is no divergence

    def loss_terms(self, dominant: Tensor | None, weak: Tensor, y: Tensor, teacher: Tensor, tau: Tensor,
                   params: dict[str, Tensor], anchors: Payload) -> dict[str, Tensor]:
        """One batch's client loss, term by term (their sum is minimised)."""
        heads = self.model.heads(dominant, weak)
        g = self.model.classifier
        terms = {"fused": F.cross_entropy(g(sum(heads.values())), y),  # the multi-modal model on local labels
                 "self": F.cross_entropy(g(heads["self"]), y)}  # the Self-Projector on local labels alone
        if "infiltration" in heads:  # distilled toward the dominant modality, each sample at its class's tau
            t = tau[y][:, None]
            student = F.log_softmax(g(heads["infiltration"]) / t, dim=1)
            kl = F.kl_div(student, F.softmax(teacher / t, dim=1), reduction="none").sum(1)
            terms["infiltration"] = self.hp.kd_weight * (kl * t.squeeze(1) ** 2).mean()
        if self.hp.mu:
            terms["proximal"] = (self.hp.mu / 2) * sum(((params[k] - anchors[k]) ** 2).sum() for k in params)
        return terms

    def val_confidence(self, data: ClientData) -> Payload:
        """Per-class sums of p(true class) on the validation split: the server's fairness signal."""
        y = data.val.y
        conf_sum = torch.zeros(self.num_classes, device=y.device)
        if len(y):
            self.model.eval()
            with torch.no_grad():
                p = F.softmax(self.fused_logits(data.val.x), dim=1).gather(1, y[:, None]).squeeze(1)
            conf_sum.index_add_(0, y, p)
        return {"conf_sum": conf_sum, "conf_count": torch.bincount(y, minlength=self.num_classes).float()}

    # server: theta by sample count; prototypes from every client's latest class sums; tau from confidence
    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        weights = torch.tensor([m.num_samples for m in uploads], dtype=torch.float32)
        models = [{k: v for k, v in m.payload.items() if k not in STATISTICS} for m in uploads]
        broadcast = {**state.broadcast, **weighted_average(models, weights)}
        class_sums = dict(state.private["class_sums"])
        if self.two_view:
            for m in uploads:
                class_sums[m.client_id] = (m.payload["proto_sum"], m.payload["proto_count"])
            total = sum(s for s, _ in class_sums.values())
            count = sum(n for _, n in class_sums.values())
            broadcast["prototypes"] = total / count.clamp(min=1)[:, None]
            broadcast["prototype_known"] = (count > 0).float()
        if self.hp.temperature == "class-wise":
            conf = sum(m.payload["conf_sum"] for m in uploads)
            seen = sum(m.payload["conf_count"] for m in uploads)
            adapted = self.hp.tau_min + (self.hp.tau_max - self.hp.tau_min) * (1 - conf / seen.clamp(min=1))
            broadcast["tau"] = torch.where(seen > 0, adapted, state.broadcast["tau"])
        return ServerState(broadcast=broadcast, private={"class_sums": class_sums})

    def server_metrics(self, state: ServerState) -> dict[str, Any]:
        return {"tau": [round(float(t), 6) for t in state.broadcast["tau"]]}

    # --- scoring ---------------------------------------------------------------------------------
    def fused_logits(self, x: Tensor) -> Tensor:
        dominant, weak = self.split(x)
        return self.model.classifier(sum(self.model.heads(dominant, weak).values()))

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        self.load_global(model)
        return batched_logits(self.fused_logits, x)

    def modality_logits(self, model: Payload, x: Tensor) -> dict[str, Tensor]:
        if not self.two_view:
            return {}
        self.load_global(model)
        names = self.ctx.modalities

        def alone(b: Tensor, which: str) -> Tensor:
            heads = self.model.heads(*self.split(b))
            parts = [heads["dominant"]] if which == "dominant" else [v for k, v in heads.items() if k != "dominant"]
            return self.model.classifier(sum(parts))

        return {names[0]: batched_logits(lambda b: alone(b, "dominant"), x),
                names[1]: batched_logits(lambda b: alone(b, "weak"), x)}

    def load_global(self, model: Payload) -> None:
        load_state(self.model, {k: v for k, v in model.items() if k not in GLOBAL_KNOWLEDGE})
        self.model.eval()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
