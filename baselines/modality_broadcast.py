"""modality-broadcast: FedAlign, text encoder on the server, LoRA image encoders on the clients.

Ma, Tang, Xu, Cheng, "Modality Alignment Meets Federated Broadcasting", arXiv 2411.15837 (2024);
adaptation (no code is public). From the paper and its supplementary: each client trains only a
rank-4 LoRA on its own image encoder against the text features the server broadcasts, with
cross-entropy over cosine logits plus a weighted orthogonality term on the LoRA matrices; clients
upload per-class prototypes, a "synthesized dataset" (image features they predicted correctly, with
labels) and their LoRA; the server fine-tunes a LoRA on the text encoder with the synthesized sets
and aggregates the client LoRAs by query (a client's prototypes the query, the other clients'
prototypes the keys, their LoRAs the values): low layers get one weighted-average global LoRA, high
layers a client-specific one; the split layer is a hyper-parameter.

Our design, where the paper is silent (each a field of :class:`ModalityBroadcastHparams`):
- layers = the backbone's stages (``fedbench.models.stages``: digits-clip's conv blocks and
  projection, a ViT's blocks); LoRA on the top ``lora_layers`` of them, every linear, attention
  and convolution inside; the top ``personal_layers`` of those are personalised (split layer =
  stages - personal_layers). The frozen stages below run once per run (``encode_inputs``).
- orthogonality term: sum over adapted layers of ||A_n A_n^T - I||_F^2, A_n the LoRA ``A`` with
  unit rows (its rank directions kept distinct; ``B`` starts at zero and stays free).
- query weights: alpha_kj = softmax_j (sim(P_k, P_j) / temperature) over the other uploaders j,
  sim the mean cosine of the two clients' prototypes over the classes both hold; LoRA factors
  are mixed factor by factor (A with A, B with B), as FedAvg-style LoRA methods do.
- client: a fresh Adam every round, BatchNorm statistics frozen; at most ``synth_per_class``
  correctly-predicted features per class are uploaded.
- server: ``text_steps`` Adam steps on the text LoRA per round over the pooled synthesized set
  (minibatches drawn with the server's generator); the optimiser persists across rounds.

Per round t, for every sampled client k:
  server:   send T_t (text features of the class prompts), the global low LoRA and client k's
            high LoRA
  client k: E epochs of Adam on CE(s cos(f(x), T_t), y) + mu * orth(LoRA); send the LoRA, the
            prototypes P_k[c] = mean f(x) over class c, and the correctly predicted (f(x), y)
  server:   low layers  <- sum_k n_k LoRA_k / sum_k n_k
            high layers <- for each k, sum_{j != k} alpha_kj LoRA_j
            text LoRA   <- text_steps of Adam on CE(s cos(f, T(prompts)), y) over the synthesized sets
Scored: each client's own model on its own splits (personalised), and the global model (text T,
every layer the weighted average) on the pooled test set and the held-out domains.
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
    seeded_global_rng,
)
from fedbench.federation.train import batched_logits, load_state, state_of, weighted_average
from fedbench.models.clip import BackbonePreprocess, clip_logit_scale
from fedbench.models.stages import StagedTower, image_stages, lora_layer_names, text_stages

UPLOAD_EXTRAS = ("prototypes", "class_counts", "synth_features", "synth_labels")


@dataclass(frozen=True)
class ModalityBroadcastHparams:
    lora_rank: int = bounded(4, ge=1)  # the paper's rank
    # top image stages with LoRA (ours, for CPU cost; the paper adapts the whole encoder)
    lora_layers: int = bounded(2, ge=1)
    personal_layers: int = bounded(1, ge=0)  # top adapted stages aggregated per client; split layer = stages - this
    orth_weight: float = bounded(0.1, ge=0)  # mu, weight of the orthogonality term
    aggregation: Literal["query", "average"] = "query"  # average: the ablation without query aggregation
    query_temperature: float = bounded(0.1, gt=0)
    local_epochs: int = bounded(1, ge=1)
    batch_size: int = bounded(32, ge=1)
    lr: float = bounded(1e-3, gt=0)  # client Adam
    synth_per_class: int = bounded(16, ge=0)  # correctly predicted features per class a client uploads
    text_lora_layers: int = bounded(1, ge=1)  # top text stages with LoRA on the server
    text_steps: int = bounded(10, ge=0)  # server Adam steps on the text LoRA per round; 0: no server fine-tuning
    text_lr: float = bounded(1e-3, gt=0)
    text_batch_size: int = bounded(256, ge=1)
    logit_scale: float = bounded(0.0, ge=0)  # 0: the backbone's own exp(logit_scale)
    cache_activations: bool = True  # False runs the frozen stages every step (same numbers, slower)

    def __post_init__(self) -> None:
        for name in ("orth_weight", "query_temperature", "lr", "text_lr", "logit_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value}: must be a finite number >= 0")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank}: LoRA needs rank >= 1")
        if self.lora_layers < 1:
            raise ValueError(f"lora_layers={self.lora_layers}: at least one image stage must carry LoRA")
        if not 0 <= self.personal_layers <= self.lora_layers:
            raise ValueError(f"personal_layers={self.personal_layers}: must be in 0..lora_layers ({self.lora_layers})")
        if self.query_temperature <= 0 or self.lr <= 0 or self.text_lr <= 0:
            raise ValueError("query_temperature, lr and text_lr must be > 0")
        if min(self.local_epochs, self.batch_size, self.text_batch_size, self.text_lora_layers) < 1:
            raise ValueError("local_epochs, batch_size, text_batch_size and text_lora_layers must be >= 1")
        if self.synth_per_class < 0 or self.text_steps < 0:
            raise ValueError("synth_per_class and text_steps must be >= 0")


def add_stage_lora(tower: StagedTower, first: int, rank: int) -> list[str]:
    """peft LoRA (alpha = rank: scale 1, no dropout) on every LoRA-able layer of stages[first:];
    everything else frozen. Returns the trainable parameter names."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in tower.parameters():
        p.requires_grad = False
    for i in range(first, len(tower)):
        targets = lora_layer_names(tower.stages[i])
        if targets:
            config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
            tower.stages[i] = inject_adapter_in_model(config, tower.stages[i])
    for name, p in tower.named_parameters():
        p.requires_grad = "lora_" in name
    return [n for n, p in tower.named_parameters() if p.requires_grad]


def stage_of(name: str) -> int:
    return int(name.split(".")[1])  # "stages.<i>.0...."


def orthogonality(tower: nn.Module) -> Tensor:
    """sum over LoRA layers of ||A A^T - I||_F^2, A's rows (the rank directions) unit-norm."""
    total = torch.zeros(())
    for name, p in tower.named_parameters():
        if "lora_A" in name and p.requires_grad:
            a = F.normalize(p.flatten(1), dim=1)
            total = total + (a @ a.T - torch.eye(len(a), device=a.device)).pow(2).sum()
    return total


def query_weights(prototypes: Tensor, counts: Tensor, temperature: float) -> Tensor:
    """alpha [K, K]: row k weighs the other clients j by softmax(sim(P_k, P_j) / temperature);
    sim = mean cosine over the classes both hold. A client that shares no class with anyone
    keeps its own LoRA (alpha_kk = 1)."""
    p = F.normalize(prototypes, dim=-1)  # [K, C, D]
    both = (counts[:, None, :] > 0) & (counts[None, :, :] > 0)  # [K, K, C]
    cos = torch.einsum("kcd,jcd->kjc", p, p)
    sim = (cos * both).sum(-1) / both.sum(-1).clamp(min=1)
    eye = torch.eye(len(p), dtype=torch.bool)
    sim = sim.masked_fill(eye | ~both.any(-1), float("-inf"))
    alone = torch.isinf(sim).all(1)
    sim[eye & alone[:, None]] = 0.0
    return torch.softmax(sim / temperature, dim=1)


def check_image_layers(hp: ModalityBroadcastHparams, backbone: str, stages: StagedTower) -> None:
    """Refuse layer counts the image tower cannot honour, or that would adapt or personalise nothing."""
    if hp.lora_layers > len(stages):
        raise SpecError(f"lora_layers={hp.lora_layers}: the image tower of {backbone} has {len(stages)} "
                        f"stages ({', '.join(stages.names)}); choose 1..{len(stages)}")
    if not any(lora_layer_names(s) for s in stages.stages[len(stages) - hp.lora_layers:]):
        raise SpecError(f"{backbone}: its top {hp.lora_layers} image stages hold no linear, attention or "
                        f"convolution layer for LoRA; raise lora_layers or use another backbone")
    personal = len(stages) - hp.personal_layers  # the first personal stage
    if hp.personal_layers and not any(lora_layer_names(s) for s in stages.stages[personal:]):
        names = ", ".join(stages.names[personal:])
        raise SpecError(f"personal_layers={hp.personal_layers}: the top stages of {backbone} ({names}) hold "
                        f"no LoRA layer, so nothing would be personalised; raise personal_layers (and lora_layers)")


def check_text_layers(hp: ModalityBroadcastHparams, backbone: str, stages: StagedTower) -> None:
    if hp.text_lora_layers > len(stages):
        raise SpecError(f"text_lora_layers={hp.text_lora_layers}: the text tower of {backbone} has "
                        f"{len(stages)} stages ({', '.join(stages.names)}); choose 1..{len(stages)}")


@register_method(
    "modality-broadcast",
    description="FedAlign: server text encoder + LoRA image encoders, query-aggregated personal LoRA",
    fidelity="adaptation",
    source="Ma et al. 2024, arXiv 2411.15837 (FedAlign); no public code",
)
class ModalityBroadcast(Method):
    Hparams = ModalityBroadcastHparams

    @classmethod
    def needs_backbone(cls, hp: ModalityBroadcastHparams) -> bool:
        return True

    @classmethod
    def check_backbone(cls, hp: ModalityBroadcastHparams, backbone: Any) -> None:
        check_image_layers(hp, backbone.name, image_stages(backbone))
        if hp.text_steps:
            check_text_layers(hp, backbone.name, text_stages(backbone))

    def __init__(self, hp: ModalityBroadcastHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        if ctx.backbone is None or ctx.text_features is None:
            raise SpecError("modality-broadcast needs a CLIP-style backbone (--backbone NAME)")
        self.tower = image_stages(ctx.backbone).to(ctx.device).eval()  # eval: BatchNorm statistics stay frozen
        check_image_layers(hp, ctx.backbone.name, self.tower)
        self.first = len(self.tower) - hp.lora_layers  # lowest adapted stage; below it all is frozen
        self.split = len(self.tower) - hp.personal_layers  # stages >= split are personalised
        self.lora = add_stage_lora(self.tower, self.first, hp.lora_rank)
        self.personal = [n for n in self.lora if stage_of(n) >= self.split]
        self.preprocess = BackbonePreprocess(ctx.backbone)
        self.scale = hp.logit_scale or clip_logit_scale(ctx.backbone)

    # --- the image side: frozen stages once, adapted stages every step --------------------------
    def encode_inputs(self, inputs: Tensor) -> Tensor:
        if not self.hp.cache_activations:
            return inputs
        with torch.no_grad():
            return torch.cat([self.tower.run(self.preprocess(inputs[i : i + 500]), 0, self.first)
                              for i in range(0, len(inputs), 500)])

    def embed(self, x: Tensor) -> Tensor:
        """Unit image features of stored inputs (cached activations, or pixels)."""
        h = x if self.hp.cache_activations else self.tower.run(self.preprocess(x), 0, self.first)
        return F.normalize(self.tower.run(h, self.first), dim=-1)

    # --- server: T_0 from the frozen text tower (+ a zero LoRA), the seeded LoRA init --------------
    def init(self, server: ServerContext) -> ServerState:
        lora = state_of(self.tower)
        private: dict[str, Any] = {"global": lora, "personal": {}, "text_loss": None, "synth": 0}
        if self.hp.text_steps:
            seed = int(torch.randint(2**62, (1,), generator=server.rng))
            with seeded_global_rng(seed, server.device):  # the text LoRA's A init
                text = text_stages(self.ctx.backbone).to(server.device).eval()
                check_text_layers(self.hp, self.ctx.backbone.name, text)
                first = len(text) - self.hp.text_lora_layers
                names = add_stage_lora(text, first, self.hp.lora_rank)
            tokens = self.ctx.backbone.tokenize(self.ctx.prompts).to(server.device)
            with torch.no_grad():
                below = text.run(tokens, 0, first)  # the frozen text stages run once
            params = [p for n, p in text.named_parameters() if n in names]
            private.update(text=text, text_first=first, text_below=below, text_params=params,
                           text_opt=torch.optim.Adam(params, lr=self.hp.text_lr))
        with torch.no_grad():
            private["T"] = self.text_features(private)
        return ServerState(broadcast={"text": private["T"], **lora}, private=private)

    def text_features(self, private: dict[str, Any]) -> Tensor:
        if "text" not in private:
            return F.normalize(self.ctx.text_features.float().to(self.ctx.device), dim=-1)
        return F.normalize(private["text"].run(private["text_below"], private["text_first"]), dim=-1)

    # server: T, the global low LoRA and client k's own high LoRA
    def configure(self, state: ServerState, client_id: int, server: ServerContext) -> Payload:
        own = state.private["personal"].get(client_id, state.private["global"])
        return {"text": state.private["T"], **state.private["global"], **{n: own[n] for n in self.personal}}

    # client k: E epochs of CE over cosine logits + mu * orth; send LoRA, prototypes, synthesized set
    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        load_state(self.tower, {n: message.payload[n] for n in self.lora})
        text, train = message.payload["text"], data.train
        params = [p for p in self.tower.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.hp.lr)
        losses: list[float] = []
        for _ in range(self.hp.local_epochs):
            losses = []
            order = torch.randperm(len(train), generator=client.rng)
            for start in range(0, len(train), self.hp.batch_size):
                idx = order[start : start + self.hp.batch_size]
                ce = F.cross_entropy(self.scale * self.embed(train.x[idx]) @ text.T, train.y[idx])
                loss = ce + self.hp.orth_weight * orthogonality(self.tower) if self.hp.orth_weight else ce
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(ce.item())
        lora = state_of(self.tower)
        upload = {**lora, **self.summaries(train.x, train.y, text, client.rng)}
        return ClientResult(upload=upload, num_samples=len(train), train_loss=sum(losses) / max(len(losses), 1),
                            client_state={**lora, "text": text})

    @torch.no_grad()
    def summaries(self, x: Tensor, y: Tensor, text: Tensor, rng: torch.Generator) -> Payload:
        """Per-class prototypes and counts; up to synth_per_class correctly predicted features per class."""
        f = batched_logits(self.embed, x)
        counts = torch.bincount(y, minlength=self.ctx.num_classes)
        prototypes = torch.zeros(self.ctx.num_classes, f.shape[1], device=f.device).index_add_(0, y, f)
        out = {"prototypes": prototypes / counts.clamp(min=1)[:, None], "class_counts": counts.float()}
        if self.hp.text_steps and self.hp.synth_per_class:
            order = torch.randperm(len(y), generator=rng).to(y.device)
            right = order[(self.scale * f[order] @ text.T).argmax(1) == y[order]]
            keep = torch.cat([right[y[right] == c][: self.hp.synth_per_class] for c in range(self.ctx.num_classes)])
            out.update(synth_features=f[keep], synth_labels=y[keep])
        return out

    # server: low layers averaged by n_k, high layers by query, then the text LoRA on the synthesized sets
    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        private = state.private
        loras = [{n: m.payload[n] for n in self.lora} for m in uploads]
        average = weighted_average(loras, torch.tensor([float(m.num_samples) for m in uploads]))
        if self.hp.aggregation == "query" and len(uploads) > 1:
            alpha = query_weights(torch.stack([m.payload["prototypes"] for m in uploads]).cpu(),
                                  torch.stack([m.payload["class_counts"] for m in uploads]).cpu(),
                                  self.hp.query_temperature)
            for k, m in enumerate(uploads):
                private["personal"][m.client_id] = weighted_average([{n: s[n] for n in self.personal} for s in loras],
                                                                    alpha[k])
        else:
            for m in uploads:
                private["personal"][m.client_id] = {n: average[n] for n in self.personal}
        private["global"] = average
        if "text" in private:
            self.fine_tune_text(private, uploads, server.rng)
        with torch.no_grad():
            private["T"] = self.text_features(private)
        return ServerState(broadcast={"text": private["T"], **average}, private=private)

    def fine_tune_text(self, private: dict[str, Any], uploads: list[Message], rng: torch.Generator) -> None:
        sets = [m.payload for m in uploads if "synth_labels" in m.payload]
        labels = torch.cat([p["synth_labels"] for p in sets]) if sets else torch.zeros(0, dtype=torch.long)
        private["synth"], losses = len(labels), []
        if not len(labels):  # synth_per_class=0, or no client classified anything right
            return
        feats = torch.cat([p["synth_features"] for p in sets])
        private["text"].train()
        for _ in range(self.hp.text_steps):
            idx = torch.randint(len(labels), (min(self.hp.text_batch_size, len(labels)),), generator=rng)
            idx = idx.to(labels.device)
            loss = F.cross_entropy(self.scale * feats[idx] @ self.text_features(private).T, labels[idx])
            private["text_opt"].zero_grad(set_to_none=True)
            loss.backward()
            private["text_opt"].step()
            losses.append(loss.item())
        private["text"].eval()
        private["text_loss"] = sum(losses) / len(losses)

    def server_metrics(self, state: ServerState) -> dict[str, Any]:
        p = state.private
        if "text" not in p:
            return {}
        return {"text_loss": None if p["text_loss"] is None else round(p["text_loss"], 6),
                "synth_samples": p["synth"], "text_lora_params": sum(t.numel() for t in p["text_params"])}

    def global_model(self, state: ServerState) -> Payload:
        return {"text": state.private["T"], **state.private["global"]}

    def personal_model(self, client_state: Payload | None, global_model: Payload | None) -> Payload | None:
        return client_state  # a client that never trained is scored with the global model

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        load_state(self.tower, {n: model[n] for n in self.lora})
        return batched_logits(lambda b: self.scale * self.embed(b) @ model["text"].T, x)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.tower.parameters() if p.requires_grad)
