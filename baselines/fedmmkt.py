"""FedMMKT: Co-Enhancing a Server Text-to-Image Model and Client Task Models in Multi-Modal
Federated Learning, arXiv 2510.12254 (2025); adaptation (only the abstract is public).

The paper's words (abstract): a server-side text-to-image model and client task models enhance
each other; the server's model synthesises data that transfer knowledge to the clients, and the
clients' knowledge steers the server's model, without client data leaving the clients.

Our design (each a field of :class:`FedMMKTHparams`):
- generator: a diffusers ``UNet2DConditionModel`` + scheduler (``from_pretrained``; the packaged
  ``digits-t2i`` offline), sampled with DPM-Solver++ in ``sampling_steps`` steps with classifier-free
  guidance; its initial noise comes from the server's own generator. Fine-tuned whole
  (``generator_trainable=full``) or through a peft LoRA on its attention projections.
- task model: FedAvg-head's (a linear head on the frozen backbone's image features, initialised
  from the class prompts), so that FedMMKT and FedAvg-head differ only by the synthetic data.
- the synthetic set travels as backbone features with labels (the server encodes the images with
  the same frozen tower the clients use); a client distils it with cross-entropy on its labels.
- the server's distillation is FedDF's: Adam on KL(softmax(mean client logits / T) || softmax(f(x) / T))
  over the synthetic set, from the averaged head.
- co-enhancement: sample i's weight is the client ensemble's probability of its prompt's class;
  the generator takes ``generator_steps`` AdamW steps on the weighted denoising loss
  sum_i w_i ||eps - eps_theta(x_i,t, t, c_i)||^2 / sum_i w_i over the synthetic images.

Per round t:
  server:   generate S_t = {(x_i, y_i)}: ``synth_per_class`` images per class prompt; send the
            global head f_t and the features phi(x_i) with y_i (no image leaves the server either)
  client k: f <- f_t; E epochs of SGD on CE(f(phi(x)), y) over its data
            + synth_weight CE(f(phi(x_i)), y_i) over S_t; send f_k, n_k and its logits f_k(phi(x_i))
  server:   f <- sum_k n_k f_k / sum_k n_k; ``distill_steps`` of FedDF distillation of the mean logits
            w_i <- softmax(mean_k logits_k(x_i))[y_i]; ``generator_steps`` of weighted denoising on S_t
  metrics:  the global head's accuracy on freshly generated images (fixed noise, so the generator's
            change shows) and their image-text cosine against their prompts, every round
``finetune=none`` is FedDF-style distillation without co-enhancement; ``finetune=unweighted`` sets w_i = 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.core.options import bounded
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData, Split
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
from fedbench.federation.rng import derive_seed
from fedbench.federation.train import batched_logits, load_state, run_local_epochs, state_of, weighted_average
from fedbench.models.task_models import build_task_model

SYNTH = ("synth_x", "synth_y")  # sent beside the head


@dataclass(frozen=True)
class FedMMKTHparams:
    generator: str = ""  # a diffusers folder (unet/, scheduler/); "": the packaged digits-t2i
    prompt_template: str = ""  # with one "{}" for the class name; "": the task's own prompts
    synth_per_class: int = bounded(5, ge=1)  # synthetic images per class and round
    sampling_steps: int = bounded(5, ge=1)  # DPM-Solver++ steps
    guidance: float = bounded(3.0, ge=0)
    eval_per_class: int = bounded(2, ge=0)  # fresh images per class for the generator metrics
    finetune: Literal["weighted", "unweighted", "none"] = "weighted"
    generator_trainable: Literal["lora", "full"] = "lora"
    lora_rank: int = bounded(4, ge=1)
    generator_steps: int = bounded(2, ge=0)
    generator_lr: float = bounded(1e-4, gt=0)
    generator_batch_size: int = bounded(32, ge=1)
    distill_steps: int = bounded(20, ge=0)  # FedDF's server distillation on the synthetic set
    distill_lr: float = bounded(1e-3, gt=0)
    distill_temperature: float = bounded(1.0, gt=0)
    synth_weight: float = bounded(1.0, ge=0)  # the client's cross-entropy on the synthetic set
    local_epochs: int = bounded(10, ge=1)  # FedAvg's NIID-Bench defaults for the head
    batch_size: int = bounded(64, ge=1)
    lr: float = bounded(0.01, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(1e-5, ge=0)

    def __post_init__(self) -> None:
        if self.synth_per_class < 1:
            raise ValueError(f"synth_per_class={self.synth_per_class}: FedMMKT needs a synthetic set (>= 1 per class)")
        if self.prompt_template and self.prompt_template.count("{}") != 1:
            raise ValueError(f"prompt_template={self.prompt_template!r}: needs exactly one '{{}}' for the class name, "
                             f"e.g. 'handwritten {{}}'")
        for name in ("sampling_steps", "local_epochs", "batch_size", "generator_batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("eval_per_class", "generator_steps", "distill_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("guidance", "synth_weight", "momentum", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)}: must be a finite number >= 0")
        for name in ("generator_lr", "distill_lr", "distill_temperature", "lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)}: must be a finite number > 0")


def check_generator_folder(folder: str) -> None:
    """A generator folder must be a diffusers checkpoint: refused before any data or training."""
    path = Path(folder).expanduser()
    missing = [p for p in ("unet/config.json", "scheduler/scheduler_config.json") if not (path / p).is_file()]
    if missing:
        raise SpecError(f"generator={folder}: not a diffusers text-to-image folder (missing {', '.join(missing)}); "
                        f"give a folder with unet/ and scheduler/ (e.g. `fedbench prepare digits-t2i --out DIR`)")
    if (path / "vae").is_dir() or (path / "text_encoder").is_dir():
        raise SpecError(f"generator={folder}: a latent-diffusion pipeline (vae/, text_encoder/, e.g. Stable "
                        f"Diffusion); fedmmkt drives pixel-space UNets conditioned on MiniLM, as digits-t2i. "
                        f"Latent pipelines are not wired in yet")


@register_method(
    "fedmmkt",
    description="FedMMKT: a server diffusion model synthesises data for the clients; their ensemble "
                "distils into the global model and weights the generator's fine-tuning",
    fidelity="adaptation",
    source="arXiv 2510.12254 (abstract only); FedDF distillation (Lin et al. 2020, arXiv 2006.07242)",
)
class FedMMKT(Method):
    Hparams = FedMMKTHparams

    @classmethod
    def input_kind(cls, hp: FedMMKTHparams) -> str:
        return "features"

    @classmethod
    def check_backbone(cls, hp: FedMMKTHparams, backbone: Any) -> None:
        if hp.generator:
            check_generator_folder(hp.generator)

    def __init__(self, hp: FedMMKTHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        self.head, _ = build_task_model("head", ctx)
        self.head = self.head.to(ctx.device)
        names = ctx.class_names
        self.prompts = [hp.prompt_template.format(n) for n in names] if hp.prompt_template else list(ctx.prompts)
        # Server-side bookkeeping the engine reads at the end (wall times, the first and last grids).
        self.seconds: dict[str, list[float]] = {"generation": [], "distillation": [], "generator_finetune": []}
        self.shown: dict[str, Tensor] = {}

    # --- the server's generator --------------------------------------------------------------------
    def load_generator(self) -> dict[str, Any]:
        from fedbench.models.digits_t2i import load_digits_t2i

        unet, scheduler, encode = load_digits_t2i(self.hp.generator or None)
        unet.to(self.ctx.device)
        if self.hp.finetune != "none" and self.hp.generator_trainable == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            unet.requires_grad_(False)
            config = LoraConfig(r=self.hp.lora_rank, lora_alpha=self.hp.lora_rank, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"])
            unet = inject_adapter_in_model(config, unet)
        trained = [p for p in unet.parameters() if p.requires_grad] if self.hp.finetune != "none" else []
        optimizer = torch.optim.AdamW(trained, lr=self.hp.generator_lr) if trained else None
        from diffusers import DDPMScheduler

        text = encode(self.prompts)
        # The training noise schedule (the sampler's config), for the fine-tuning's forward process.
        noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        return {"unet": unet, "scheduler": scheduler, "noise_scheduler": noise_scheduler, "text": text,
                "uncond": encode([""]), "optimizer": optimizer}

    def generate(self, gen: dict[str, Any], per_class: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        from fedbench.models.digits_t2i import generate

        labels = torch.arange(self.ctx.num_classes).repeat_interleave(per_class)
        gen["unet"].eval()
        images = generate(gen["unet"], gen["scheduler"], gen["text"][labels], gen["uncond"], generator=rng,
                          steps=self.hp.sampling_steps, guidance=self.hp.guidance)
        return images, labels

    def features(self, images: Tensor) -> Tensor:
        return self.ctx.backbone.encode_image(images).float().to(self.ctx.device)

    # server: f_0 (the zero-shot head); the generator and its optimiser stay in private state
    def init(self, server: ServerContext) -> ServerState:
        # peft initialises LoRA's A from torch's global RNG: seeded here, so the run is reproducible.
        with seeded_global_rng(derive_seed(self.ctx.seed, "generator-init"), server.device):
            generator = self.load_generator()
        return ServerState(broadcast=state_of(self.head), private={"generator": generator})

    def begin_round(self, state: ServerState, clients: list[int], server: ServerContext) -> ServerState:
        t0 = time.perf_counter()
        images, labels = self.generate(state.private["generator"], self.hp.synth_per_class, server.rng)
        x = self.features(images)
        self.seconds["generation"].append(time.perf_counter() - t0)
        broadcast = {**{k: v for k, v in state.broadcast.items() if k not in SYNTH}, "synth_x": x,
                     "synth_y": labels.to(x.device)}
        return ServerState(broadcast, {**state.private, "synth_images": images})

    # client k: f <- f_t; E epochs of SGD on its data + CE on the synthetic set; send f_k and its logits
    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        received = message.payload
        load_state(self.head, {k: v for k, v in received.items() if k not in SYNTH})
        synth = Split(received["synth_x"], received["synth_y"])

        def synthetic_loss(model: torch.nn.Module) -> Tensor:
            return self.hp.synth_weight * F.cross_entropy(model(synth.x), synth.y)

        params = [p for p in self.head.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.hp.lr, momentum=self.hp.momentum,
                                    weight_decay=self.hp.weight_decay)
        loss = run_local_epochs(self.head, torch.nn.Identity(), data.train, optimizer, self.hp.local_epochs,
                                self.hp.batch_size, client.rng, extra_loss=synthetic_loss)
        self.head.eval()
        with torch.no_grad():
            logits = self.head(synth.x)
        return ClientResult(upload={**state_of(self.head), "synth_logits": logits}, num_samples=len(data.train),
                            train_loss=loss)

    # server: average; FedDF distillation of the ensemble; co-enhancement of the generator
    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        counts = torch.tensor([m.num_samples for m in uploads], dtype=torch.float32)
        averaged = weighted_average([{k: v for k, v in m.payload.items() if k != "synth_logits"} for m in uploads],
                                    counts)
        ensemble = torch.stack([m.payload["synth_logits"] for m in uploads]).mean(0)
        x, y = state.broadcast["synth_x"], state.broadcast["synth_y"]
        t0 = time.perf_counter()
        head = self.distill(averaged, x, ensemble)
        t1 = time.perf_counter()
        self.seconds["distillation"].append(t1 - t0)
        agreement = agreement_weights(ensemble, y, "weighted")
        if self.hp.finetune != "none" and self.hp.generator_steps:
            weights = agreement_weights(ensemble, y, self.hp.finetune)
            self.finetune_generator(state.private["generator"], state.private["synth_images"], y, weights, server.rng)
        self.seconds["generator_finetune"].append(time.perf_counter() - t1)
        private = {**state.private, "agreement": float(agreement.mean())}
        return ServerState({**state.broadcast, **head}, private)

    def distill(self, start: Payload, x: Tensor, ensemble: Tensor) -> Payload:
        """FedDF: Adam on KL(softmax(ensemble / T) || softmax(f(x) / T)) over the synthetic set, from ``start``."""
        load_state(self.head, start)
        if not self.hp.distill_steps:
            return state_of(self.head)
        temperature = self.hp.distill_temperature
        target = F.softmax(ensemble / temperature, dim=1)
        optimizer = torch.optim.Adam([p for p in self.head.parameters() if p.requires_grad], lr=self.hp.distill_lr)
        self.head.train()
        for _ in range(self.hp.distill_steps):
            loss = F.kl_div(F.log_softmax(self.head(x) / temperature, dim=1), target, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return state_of(self.head)

    def finetune_generator(self, gen: dict[str, Any], images: Tensor, labels: Tensor, weights: Tensor,
                           rng: torch.Generator) -> None:
        """``generator_steps`` AdamW steps on sum_i w_i ||eps - eps_theta(x_t, t, c_i)||^2 / sum_i w_i."""
        unet, optimizer, noise_scheduler = gen["unet"], gen["optimizer"], gen["noise_scheduler"]
        device = unet.device
        x0 = images.to(device).float() / 127.5 - 1
        context, w = gen["text"][labels.cpu()].to(device), weights.to(device)
        unet.train()
        for _ in range(self.hp.generator_steps):
            idx = torch.randperm(len(x0), generator=rng)[: self.hp.generator_batch_size].to(device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=rng).to(device)
            noise = torch.randn(x0[idx].shape, generator=rng).to(device)
            loss = weighted_denoising_loss(unet, noise_scheduler, x0[idx], context[idx], w[idx], t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        unet.eval()

    # --- scoring -----------------------------------------------------------------------------------
    def server_metrics(self, state: ServerState) -> dict[str, Any]:
        """The generator's quality, on fresh images from fixed noise: the global head's accuracy on
        them and their image-text cosine against their prompts; the client ensemble's agreement."""
        out: dict[str, Any] = {}
        if "agreement" in state.private:
            out["synth_agreement"] = round(state.private["agreement"], 6)
        if not self.hp.eval_per_class:
            return out
        t0 = time.perf_counter()
        rng = torch.Generator().manual_seed(self.ctx.seed + 7919)  # the same noise every round
        images, labels = self.generate(state.private["generator"], self.hp.eval_per_class, rng)
        self.shown.setdefault("generated_first_round", images)
        self.shown["generated_last_round"] = images
        x = self.features(images)
        logits = self.predict(state.broadcast, x)
        text = F.normalize(self.ctx.text_features.float().to(x.device), dim=-1)
        cosine = (F.normalize(x, dim=-1) * text[labels.to(x.device)]).sum(1)
        out["generated_acc"] = round(float((logits.argmax(1).cpu() == labels).float().mean()), 6)
        out["generated_clip_score"] = round(float(cosine.mean()), 6)
        self.seconds.setdefault("generator_metrics", []).append(time.perf_counter() - t0)
        return out

    def stage_seconds(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.seconds.items() if v}

    def images(self) -> dict[str, Tensor]:
        return dict(self.shown)

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        load_state(self.head, {k: v for k, v in model.items() if k not in SYNTH})
        self.head.eval()
        return batched_logits(self.head, x)

    def global_model(self, state: ServerState) -> Payload:
        return {k: v for k, v in state.broadcast.items() if k not in SYNTH}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters() if p.requires_grad)


def weighted_denoising_loss(unet: Any, noise_scheduler: Any, x0: Tensor, context: Tensor, weights: Tensor,
                            t: Tensor, noise: Tensor) -> Tensor:
    """sum_i w_i ||eps_i - eps_theta(x_t_i, t_i, c_i)||^2 / sum_i w_i, x_t from the scheduler's ``add_noise``
    (as digits-t2i was pretrained)."""
    eps = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
    per_sample = ((eps - noise) ** 2).mean((1, 2, 3))
    return (weights * per_sample).sum() / weights.sum().clamp(min=1e-12)


def agreement_weights(ensemble: Tensor, labels: Tensor, finetune: str) -> Tensor:
    """w_i: the client ensemble's probability of sample i's prompt class (weighted), or 1 (unweighted)."""
    if finetune == "unweighted":
        return torch.ones(len(labels), device=ensemble.device)
    return F.softmax(ensemble, dim=1).gather(1, labels[:, None]).squeeze(1)

