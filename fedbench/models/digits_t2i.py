"""``digits-t2i``: a small text-to-image diffusion model of handwritten digits, pretrained by
fedbench itself, the offline stand-in for Stable Diffusion (the server model that FedMMKT co-trains).

It is a diffusers ``UNet2DConditionModel`` with a diffusers scheduler, in the folder layout of a
Stable Diffusion checkpoint (``unet/``, ``scheduler/``), so the code that loads it through
``from_pretrained`` is the code that loads a real checkpoint where the hub is reachable.

- **Data**: the 60,000 MNIST *train* images, upright (``load_mnist``); the test images, which the
  federated tasks use, are never read.
- **Captions**: eight per class, drawn uniformly for each sample: the task prompt
  ``'a photo of the number: "7".'`` (:data:`MNIST_PROMPT`), "a photo of the number seven",
  "a photo of the number 7", "handwritten 7", "a handwritten seven", "the digit 7",
  "the number seven", "seven". Classifier-free guidance: 10 % of the samples get the empty caption.
- **Conditioning**: the packaged all-MiniLM-L6-v2 text tower (``load_minilm``), frozen: its last
  hidden states of the caption padded to 16 tokens, [B, 16, 384], as ``encoder_hidden_states``
  (Stable Diffusion's convention with CLIP: fixed-length padding, no mask in the UNet). The 81
  training captions are encoded once.
- **Model**: pixel space, 1x28x28 in [-1, 1] (28 -> 14 -> 7, no padding); block_out_channels
  (32, 64, 64), one ResNet per down block, GroupNorm 8, cross-attention (2 heads) only at 7x7 and
  in the mid block; 1.58 M parameters, saved in float16 (3.2 MB).
- **Recipe**: DDPM noise-prediction MSE, 1000 steps, ``squaredcos_cap_v2`` betas; AdamW lr 1e-3
  (100 warm-up steps, cosine decay), batch 32, 1,500 steps (0.8 epoch), gradient clip 1, bfloat16
  autocast, EMA 0.999 of the weights (the saved weights). Seed 0, one CPU thread.
- **Sampling** (:func:`generate`): ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) with dynamic
  thresholding, 20 steps, guidance 3, from the saved scheduler config.

Measured (``benchmarks/digits_t2i_eval.py``, seed 0; the committed weights, pretrained in 886 s on
one busy CPU core, 0.59 s/step; an independent second run wrote bit-identical files): of 500 images,
50 per class from the task prompt, an independent judge (NIID-Bench's SimpleCNN trained on MNIST
train, 98.4 % on held-out train images) recognises 99.0 %; per class 0-9: 98, 100, 100, 100, 98,
94, 100, 100, 100, 100 %. Other captions (100 images each): "a photo of the number seven" 99 %,
"handwritten 7" 99 %, unseen "a picture of a handwritten seven" 98 %, unseen "number 7" 97 %.
digits-clip: mean cosine of an image with its own prompt 0.776, with the other nine 0.176
(zero-shot 97.0 %). Sampling the 500 takes 150 s on one core.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.errors import BackboneUnavailableError
from fedbench.models.pretrained import BuildRequest, locate, register_pretrained

NAME = "digits-t2i"
SIDE = 28
TEXT_LENGTH = 16  # tokens; the longest caption is 12 ([CLS] a photo of the number : " 7 " . [SEP])
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (  # besides the task prompt
    "a photo of the number {word}",
    "a photo of the number {digit}",
    "handwritten {digit}",
    "a handwritten {word}",
    "the digit {digit}",
    "the number {word}",
    "{word}",
)
UNET_CONFIG: dict[str, Any] = {
    "sample_size": SIDE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": 2,  # diffusers' legacy name: the number of heads (head width 32)
    "norm_num_groups": 8,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}
# The saved sampler: the training schedule, plus dynamic thresholding of the predicted clean image
# (Imagen's, for pixel-space models; measured at 1,200 steps: recognised 89.5 % -> 99 %, no speckle).
SAMPLER_OPTIONS: dict[str, Any] = {"thresholding": True, "sample_max_value": 1.0}
RECIPE: dict[str, Any] = {
    "steps": 1500,  # 1,200 already gave 99 % recognition with thresholding; 15 minutes on one busy core
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "drop_caption": 0.1,
    "autocast": "bfloat16",
}
QUICK_RECIPE = {"steps": 3, "batch_size": 8, "warmup_steps": 1}
SAMPLING_STEPS = 20
GUIDANCE = 3.0
JUDGE = {"train": 55000, "epochs": 2, "batch_size": 64, "lr": 1e-3}  # the rest of train validates it

TextEncoder = Callable[[Sequence[str]], Tensor]


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise BackboneUnavailableError(
            f"{NAME} needs diffusers: pip install 'fedbench[offline]' (or pip install diffusers)."
        ) from exc
    return diffusers


def captions(digit: int) -> list[str]:
    """The training captions of ``digit``; the first is the task prompt."""
    from fedbench.data.mnist import MNIST_PROMPT

    d, word = str(digit), NUMBER_WORDS[digit]
    return [MNIST_PROMPT.format(d)] + [t.format(digit=d, word=word) for t in CAPTION_TEMPLATES]


def task_prompts() -> list[str]:
    """The task prompt of each class, class order."""
    return [captions(d)[0] for d in range(10)]


def load_text_encoder() -> TextEncoder:
    """The frozen conditioning: prompts -> MiniLM last hidden states float32 [B, TEXT_LENGTH, 384] (CPU)."""
    from fedbench.models.backbones.offline_pair_towers import load_minilm

    model, tokenizer, _ = load_minilm()
    model.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> Tensor:
        out = []
        for start in range(0, len(prompts), 256):
            tokens = tokenizer(list(prompts[start : start + 256]), padding="max_length", truncation=True,
                               max_length=TEXT_LENGTH, return_tensors="pt")
            hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            out.append(hidden.last_hidden_state.float())
        return torch.cat(out) if out else torch.zeros(0, TEXT_LENGTH, 384)

    return encode


@register_pretrained(NAME, description="text-to-image UNet of MNIST digits conditioned on MiniLM (diffusers folder)")
def build(req: BuildRequest) -> dict[str, Any]:
    """Pretrain digits-t2i into ``req.folder`` (``unet/`` and ``scheduler/``); returns the recipe."""
    _diffusers()
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    from fedbench.data.mnist import load_mnist

    recipe = {**RECIPE, **(QUICK_RECIPE if req.quick else {})}
    steps, batch = int(recipe["steps"]), int(recipe["batch_size"])
    raw = load_mnist("")
    images, labels = torch.from_numpy(raw.train_x), torch.from_numpy(raw.train_y)  # train split only
    table = [c for d in range(10) for c in captions(d)]
    per_class, empty = len(table) // 10, len(table)
    embeddings = load_text_encoder()(table + [""])  # [10 * per_class + 1, L, 384]

    torch.manual_seed(req.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG).train()
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    warmup = int(recipe["warmup_steps"])

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    g = torch.Generator().manual_seed(req.seed)
    order, pos, losses = torch.randperm(len(images), generator=g), 0, []
    started = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{NAME} pretraining", disable=not req.progress):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        x0 = images[idx].float() / 127.5 - 1.0
        caption = labels[idx] * per_class + torch.randint(per_class, (batch,), generator=g)
        caption = torch.where(torch.rand(batch, generator=g) < recipe["drop_caption"], empty, caption)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe["autocast"] == "bfloat16"):
            pred = unet(noisy, t, encoder_hidden_states=embeddings[caption]).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
        optimizer.step()
        lr_schedule.step()
        decay = min(recipe["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        losses.append(loss.item())
    seconds = time.perf_counter() - started

    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(float16) warns of fp32-only modules; this UNet has none
    try:
        unet.to(torch.float16).save_pretrained(Path(req.folder) / "unet", safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    sampler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config, **SAMPLER_OPTIONS)
    sampler.save_pretrained(Path(req.folder) / "scheduler")
    tail = losses[-min(len(losses), 500):]
    return {
        **recipe,
        "data": f"MNIST train split, {len(images)} images, upright ({raw.source})",
        "captions": [captions(d) for d in (0, 7)] + ["per digit; '' for classifier-free guidance"],
        "text_encoder": f"all-MiniLM-L6-v2 (packaged), frozen, last hidden states, {TEXT_LENGTH} tokens",
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "parameters": sum(p.numel() for p in params),
        "noise_schedule": SCHEDULER_CONFIG,
        "sampler": f"DPMSolverMultistepScheduler {SAMPLER_OPTIONS}, {SAMPLING_STEPS} steps, guidance {GUIDANCE}",
        "final_loss": round(sum(tail) / len(tail), 5),
        "seconds_per_step": round(seconds / steps, 4),
        "torch_threads": torch.get_num_threads(),
    }


def load_digits_t2i(folder: str | Path | None = None) -> tuple[Any, Any, TextEncoder]:
    """(unet, scheduler, text_encoder_fn) of the verified folder (explicit, else packaged, else cache).

    The UNet and scheduler load through diffusers' ``from_pretrained`` (float32, eval mode), as a
    Stable Diffusion checkpoint's would; ``text_encoder_fn`` is :func:`load_text_encoder`'s.
    """
    found, _ = locate(NAME, folder)
    _diffusers()
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    from fedbench.models.backbones.offline_pair_towers import hub_offline

    try:
        with hub_offline():
            unet = UNet2DConditionModel.from_pretrained(found, subfolder="unet", torch_dtype=torch.float32)
            scheduler = DPMSolverMultistepScheduler.from_pretrained(found, subfolder="scheduler")
    except (OSError, ValueError, RuntimeError) as exc:
        raise BackboneUnavailableError(f"{NAME}: {found} does not load ({type(exc).__name__}: {exc}); rebuild it "
                                       f"with `fedbench prepare {NAME} --out {found}`") from exc
    return unet.eval(), scheduler, load_text_encoder()


@torch.no_grad()
def generate(unet: Any, scheduler: Any, text_embeddings: Tensor, uncond_embedding: Tensor, *,
             generator: torch.Generator, steps: int = SAMPLING_STEPS, guidance: float = GUIDANCE,
             batch_size: int = 100, progress: bool = False) -> Tensor:
    """uint8 images [N, 1, 28, 28] (CPU; the task pools' layout) for ``text_embeddings`` [N, L, 384].

    Classifier-free guidance against ``uncond_embedding`` (the empty caption's, [1, L, 384]):
    ``eps = eps_empty + guidance * (eps_text - eps_empty)``. All initial noise is drawn first from
    ``generator`` (so an image's noise does not depend on ``batch_size``), which is also passed to every
    scheduler step; the same seed gives the same images. A fresh copy of ``scheduler`` (its class,
    its config) runs each batch, so the caller's is left untouched.

    A loop of our own rather than a diffusers pipeline: diffusers' text-to-image pipelines expect
    a VAE, a CLIP tokenizer and text encoder (this model is in pixel space, conditioned on MiniLM),
    and its pixel-space pipeline (``DDPMPipeline``) takes no text.
    """
    from tqdm.auto import tqdm

    device, dtype = unet.device, unet.dtype
    n = int(text_embeddings.shape[0])
    noise = torch.randn((n, unet.config.in_channels, SIDE, SIDE), generator=generator, device=generator.device)
    uncond = uncond_embedding.to(device, dtype)
    step_takes_generator = "generator" in inspect.signature(type(scheduler).step).parameters
    out = []
    bar = tqdm(total=n * steps, desc=f"{NAME} sampling", disable=not progress)
    for start in range(0, n, batch_size):
        cond = text_embeddings[start : start + batch_size].to(device, dtype)
        b = cond.shape[0]
        context = torch.cat([uncond.expand(b, -1, -1), cond]) if guidance != 1.0 else cond
        sched = type(scheduler).from_config(scheduler.config)
        sched.set_timesteps(steps, device=device)
        x = noise[start : start + b].to(device, dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            model_in = sched.scale_model_input(torch.cat([x, x]) if guidance != 1.0 else x, t)
            eps = unet(model_in, t, encoder_hidden_states=context).sample
            if guidance != 1.0:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_text - eps_uncond)
            extra = {"generator": generator} if step_takes_generator else {}
            x = sched.step(eps, t, x, **extra).prev_sample
            bar.update(b)
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, 1, SIDE, SIDE, dtype=torch.uint8)


def generate_from_prompts(loaded: tuple[Any, Any, TextEncoder], prompts: Sequence[str], seed: int,
                          **kwargs: Any) -> Tensor:
    """:func:`generate` for ``prompts`` with ``load_digits_t2i``'s output and a CPU generator seeded ``seed``."""
    unet, scheduler, encode = loaded
    return generate(unet, scheduler, encode(list(prompts)), encode([""]),
                    generator=torch.Generator().manual_seed(seed), **kwargs)


def train_judge(seed: int = 0, progress: bool = False) -> tuple[torch.nn.Module, float]:
    """The independent judge of generated digits: NIID-Bench's SimpleCNN trained on the first
    ``JUDGE["train"]`` MNIST train images; returns (model in eval mode, accuracy on the other train images)."""
    from tqdm.auto import tqdm

    from fedbench.data.mnist import load_mnist
    from fedbench.models.task_models import SimpleCNN

    raw = load_mnist("")
    x, y = torch.from_numpy(raw.train_x), torch.from_numpy(raw.train_y)
    n = JUDGE["train"]
    torch.manual_seed(seed)
    model = SimpleCNN(1, SIDE, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=JUDGE["lr"])
    g = torch.Generator().manual_seed(seed)
    for _ in range(JUDGE["epochs"]):
        order = torch.randperm(n, generator=g)
        for start in tqdm(range(0, n, JUDGE["batch_size"]), desc="judge", disable=not progress):
            idx = order[start : start + JUDGE["batch_size"]]
            loss = F.cross_entropy(model(judge_input(x[idx])), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    held_out = (judge_predict(model, x[n:]) == y[n:]).float().mean().item()
    return model, held_out


def judge_input(images: Tensor) -> Tensor:
    return (images.float() / 255.0 - 0.1307) / 0.3081  # MNIST mean / std


@torch.no_grad()
def judge_predict(model: torch.nn.Module, images: Tensor) -> Tensor:
    return torch.cat([model(judge_input(images[s : s + 1000])).argmax(1) for s in range(0, len(images), 1000)])
