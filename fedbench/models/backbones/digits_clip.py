"""``digits-clip``: a digits dual encoder pretrained in-repo, the offline stand-in for CLIP on digits.

No CLIP weights can be downloaded offline, and ``offline-pair`` is at chance on digits. So this
backbone is made the way a foundation model is made: contrastive pretraining on one pool of
images, federated tasks on another. ``fedbench prepare digits-clip`` trains it; the weights
ship in the package (``fedbench/models/weights/digits-clip``), so a clone never retrains.

- Data: the 60,000 MNIST *train* images, upright (no rotation). The MNIST *test* images are
  never read by the builder: the digit tasks federate on them.
- Captions: every image is paired with one caption drawn from :data:`TRAIN_TEMPLATES` (digit and
  word forms, the task prompt ``a photo of the number: "7".`` among them). The
  :data:`HELD_OUT_TEMPLATES` never appear in pretraining; zero-shot with them shows that an
  unseen prompt still lands near its class.
- Text tower: all-MiniLM-L6-v2 (the packaged copy, frozen; mean pooling, L2-normalised 384-d,
  as sentence-transformers does), then a trained linear projection to the 128-d joint space.
  MiniLM is frozen, so each caption is embedded once per pretraining run.
- Image tower: a small CNN on grey 1x28x28 (three 3x3 conv + BN + ReLU blocks, max-pool, global
  average pool, ``nn.Linear`` to the joint space; the Linear is what LoRA adapts).
  Preprocessing: uint8 -> [0,1] -> (x - 0.1307) / 0.3081 (MNIST train statistics), 28x28 grey.
- Loss: CLIP's symmetric contrastive loss with a learnable temperature (``logit_scale``, init
  log(1/0.07), clipped at log(100)), in a class-aware form, since a batch of 256 holds ~25
  images of each digit and captions repeat. Image -> text: cross-entropy over the 10 captions of
  the image's sampled template (one per class, so a same-class caption is never a negative and
  the loss is exactly the zero-shot classification it is used for). Text -> image: for each
  distinct caption of the batch, cross-entropy over the batch's images with the target spread
  uniformly over every image of that caption's class (all same-caption images and the other
  same-class ones are positives, SupCon's "L_out" form), not a one-hot on one image that would
  push its same-class neighbours away.
- Recipe (:data:`RECIPE`): AdamW lr 3e-3, weight decay 1e-4 (none on BN, biases, temperature),
  torch's OneCycleLR (cosine, 10% warm-up), batch 256, 3 epochs (702 steps); augmentation:
  random scale 0.9-1.1 and shift +-2 px (never rotation). A seeded torch.Generator for init,
  shuffling, captions and augmentation, one thread: same seed, bit-identical weights. Stored as
  float16 safetensors (320 KB, ~160k parameters).

Measured with the committed weights (seed 0, 702 steps, 213 s on one CPU thread, learned logit
scale 14.1; ``benchmarks/digits_clip_zero_shot.py``): zero-shot top-1 % on the 10,000 MNIST test
images, rotated counter-clockwise (``rotate_batch``). Upright it is far above chance; rotation,
never seen in pretraining, costs what it should:

=============================================  ====  ====  ====  ====  ====  ====
prompt                                         0     15    30    45    60    75
=============================================  ====  ====  ====  ====  ====  ====
task prompt ``a photo of the number: "7".``    99.2  97.9  86.0  56.2  31.4  19.6
held out ``a black and white photo of the      99.0  97.8  86.4  56.8  33.2  21.3
numeral seven.``
held out ``a scan of a handwritten 7.``        99.1  97.6  85.1  55.1  30.5  19.2
held out, both (ensemble)                      99.1  97.8  86.1  56.5  32.1  20.5
=============================================  ====  ====  ====  ====  ====  ====

One epoch (234 steps, 56 s) already reaches 98.6 % upright (30 degrees: 77.8 %, 75: 15.5 %);
three epochs add 0.6 points upright and 8 at 30 degrees, in ~3 minutes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbench.errors import SpecError
from fedbench.models.backbones.base import Backbone, weights_fingerprint
from fedbench.models.backbones.offline_pair_towers import MiniLMSentence, load_minilm, minilm_sentence, minilm_tokens
from fedbench.models.pretrained import BuildRequest, locate, register_pretrained

NAME = "digits-clip"
WEIGHTS_FILE = "digits-clip.safetensors"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: the digit ("7"), {w}: the word ("seven"). The first is the digit tasks' prompt (MNIST_PROMPT).
TRAIN_TEMPLATES = (
    'a photo of the number: "{d}".',
    "a photo of the number {w}.",
    "a photo of the number {d}.",
    "handwritten {d}",
    "the digit {d}",
    "the digit {w}",
    "a picture of a {d}",
    "an image of the number {w}",
    "a handwritten digit {w}",
    "the number {d}, written by hand",
)
HELD_OUT_TEMPLATES = ("a black and white photo of the numeral {w}.", "a scan of a handwritten {d}.")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the 60,000 train images, x/255
RECIPE: dict[str, Any] = {
    "arch": {"width": 32, "embed_dim": 128, "text_dim": 384},
    "epochs": 3, "batch_size": 256, "lr": 3e-3, "weight_decay": 1e-4, "warmup": 0.1,
    "init_logit_scale": math.log(1 / 0.07), "max_logit_scale": math.log(100.0),
    "augment": {"scale": [0.9, 1.1], "shift_px": 2},
}
QUICK = {"images": 512, "steps": 4}


def captions(template: str) -> list[str]:
    """The 10 class captions of ``template`` (``{d}`` digit, ``{w}`` word), in class order."""
    return [template.format(d=str(c), w=DIGIT_WORDS[c]) for c in range(10)]


@dataclass(frozen=True)
class GreyPreprocess:
    """uint8 [N, C, H, W] -> normalised grey [N, 1, size, size] (colour is averaged to grey)."""

    size: int = 28
    mean: float = MNIST_MEAN
    std: float = MNIST_STD

    @property
    def id(self) -> str:
        return f"v1-grey{self.size}-bilinear-mean{self.mean:.4g}-std{self.std:.4g}"

    def __call__(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise SpecError(f"backbones take uint8 images [N, C, H, W]; got "
                            f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}.")
        if images.shape[1] not in (1, 3, 4):
            raise SpecError(f"images must have 1, 3 or 4 channels (got {images.shape[1]}).")
        x = images.to(device)[:, :3].float().div_(255.0).mean(1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True).clamp_(0, 1)
        return (x - self.mean) / self.std


class GreyInput(nn.Module):
    """Colour input averaged to grey (the LoRA probe and colour tasks send 3 channels)."""

    def forward(self, pixels: Tensor) -> Tensor:
        return pixels if pixels.shape[1] == 1 else pixels.mean(1, keepdim=True)


class DigitsImageTower(nn.Module):
    """Three conv blocks (width w, 2w, 4w) + global average pool + Linear to the joint space.

    A 3-channel input is averaged to grey (the LoRA probe and colour tasks send 3 channels)."""

    def __init__(self, width: int = 32, embed_dim: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [1, width, 2 * width, 4 * width]
        for i in range(3):
            layers += [nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels[i + 1]), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.proj = nn.Linear(4 * width, embed_dim)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(self.features(GreyInput()(pixels)))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """Conv blocks 1-3 (block 3 ends pooled and flat) and the projection, bottom to top."""
        f = self.features
        return [("block1", nn.Sequential(GreyInput(), *f[0:4])), ("block2", f[4:8]), ("block3", f[8:13]),
                ("proj", self.proj)]


class DigitsClip(nn.Module):
    """What pretraining trains: the image tower, the text projection and the temperature."""

    def __init__(self, width: int = 32, embed_dim: int = 128, text_dim: int = 384,
                 init_logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.image = DigitsImageTower(width, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))


class DigitsTextTower(nn.Module):
    """Frozen MiniLM (mean pooling, L2-normalised) followed by the trained projection."""

    def __init__(self, bert: nn.Module, proj: nn.Linear, pad_id: int) -> None:
        super().__init__()
        self.bert, self.proj, self.pad_id = bert, proj, pad_id

    def sentence(self, tokens: Tensor) -> Tensor:
        return F.normalize(minilm_sentence(self.bert, tokens, self.pad_id), dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.sentence(tokens))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """MiniLM sentence embedding (tokens -> unit 384-d), then the trained projection."""
        return [("minilm", MiniLMSentence(self.bert, self.pad_id, normalize=True)), ("proj", self.proj)]


class DigitsClipBackbone(Backbone):
    """The pretrained ``digits-clip`` from a verified folder (see the module docstring).

    ``model`` is the :class:`DigitsClip` (its ``logit_scale`` is the learned temperature that
    :func:`fedbench.models.clip.clip_logit_scale` reads), ``image_model`` its CNN tower and
    ``text_model`` MiniLM + projection.
    """

    encode_batch_size = 1000

    def __init__(self, name: str, folder: Path, manifest: dict[str, Any], device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_file

        super().__init__(name, GreyPreprocess(), device)
        arch = manifest["recipe"]["arch"]
        self.model = DigitsClip(**arch)
        state = load_file(str(folder / WEIGHTS_FILE))
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        bert, self._tokenizer, self._max_length = load_minilm()
        self.model.to(self.device).eval()
        self.image_model = self.model.image
        self.text_model = DigitsTextTower(bert, self.model.text_proj, int(self._tokenizer.pad_token_id or 0))
        self.text_model.to(self.device).eval()
        self.embed_dim = int(arch["embed_dim"])
        self.recipe = {"family": NAME, "format": 1, "arch": arch, "preprocess": self.preprocess_id,
                       "text_pool": "mean-normalised", "text_weights": weights_fingerprint({"text": bert}, {})}
        self.fingerprint = weights_fingerprint({"model": self.model}, self.recipe)
        self.manifest = manifest

    def tokenize(self, texts: list[str]) -> Tensor:
        return minilm_tokens(self._tokenizer, self._max_length, texts)

    def encode_image_trainable(self, pixels: Tensor) -> Tensor:
        return self.image_model(pixels)

    def encode_text_trainable(self, tokens: Tensor) -> Tensor:
        return self.text_model(tokens)

    def image_stages(self) -> list[tuple[str, nn.Module]]:
        return self.image_model.stages()

    def text_stages(self) -> list[tuple[str, nn.Module]]:
        return self.text_model.stages()


def digits_clip_backbone(
    argument: str | None, *, device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> DigitsClipBackbone:
    """``digits-clip`` (packaged weights, else the cache) or ``digits-clip:FOLDER`` (a prepared folder)."""
    folder, manifest = locate(NAME, argument)
    return DigitsClipBackbone(NAME + (f":{argument}" if argument else ""), folder, manifest, device)


def zero_shot_accuracy(backbone: Backbone, images: Tensor, labels: Tensor, templates: list[str] | tuple[str, ...],
                       image_features: Tensor | None = None) -> float:
    """Top-1 of the nearest class caption; several templates are averaged (unit means, CLIP's ensemble)."""
    feats = F.normalize(backbone.encode_image(images) if image_features is None else image_features, dim=-1)
    text = torch.stack([F.normalize(backbone.encode_text(captions(t)), dim=-1) for t in templates]).mean(0)
    pred = (feats @ F.normalize(text, dim=-1).T).argmax(1)
    return float((pred == labels).float().mean())


# ------------------------------------------------------------------------------------------------
# Pretraining


def contrastive_loss(image: Tensor, text: Tensor, template: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """Class-aware CLIP loss (see the module docstring). ``image`` [B, D] and ``text`` [T, 10, D]
    unit vectors, ``template`` [B] the template drawn for each image, ``labels`` [B]."""
    i2t = scale * torch.einsum("bd,bcd->bc", image, text[template])
    caption = template * 10 + labels  # the caption of each image, as an index into text.view(-1, D)
    unique = torch.unique(caption)
    t2i = scale * text.reshape(-1, text.shape[-1])[unique] @ image.T  # [U, B]
    positive = (labels[None, :] == (unique % 10)[:, None]).float()
    return 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, positive / positive.sum(1, keepdim=True)))


def augment(pixels01: Tensor, gen: torch.Generator, scale: tuple[float, float], shift_px: float) -> Tensor:
    """Random zoom and shift of [0,1] images (bilinear, black fill); never a rotation."""
    n, _, h, _ = pixels01.shape
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    t = torch.empty(n, 2).uniform_(-1.0, 1.0, generator=gen) * (2.0 * shift_px / h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(pixels01.shape), align_corners=False)
    return F.grid_sample(pixels01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _caption_embeddings(templates: tuple[str, ...]) -> Tensor:
    """[T, 10, 384] frozen MiniLM sentence embeddings of every training caption (computed once)."""
    bert, tokenizer, max_length = load_minilm()
    tower = DigitsTextTower(bert, nn.Linear(1, 1), int(tokenizer.pad_token_id or 0)).eval()
    texts = [c for t in templates for c in captions(t)]
    with torch.no_grad():
        return tower.sentence(minilm_tokens(tokenizer, max_length, texts)).reshape(len(templates), 10, -1)


def _optimizer(model: DigitsClip, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr)


def pretrain(images: Tensor, labels: Tensor, recipe: dict[str, Any], seed: int, steps: int | None = None,
             progress: bool = False) -> tuple[DigitsClip, dict[str, Any]]:
    """Train a :class:`DigitsClip` on uint8 ``images`` [N,1,28,28]; returns it and training facts."""
    from tqdm.auto import tqdm

    text_emb = _caption_embeddings(TRAIN_TEMPLATES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClip(**recipe["arch"], init_logit_scale=recipe["init_logit_scale"])
    gen = torch.Generator().manual_seed(seed)
    n, bs = int(images.shape[0]), int(recipe["batch_size"])
    per_epoch = max(1, n // bs)  # the last partial batch of each epoch is dropped
    total = steps if steps is not None else per_epoch * int(recipe["epochs"])
    optimizer = _optimizer(model, recipe["lr"], recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=total,
                                                   pct_start=recipe["warmup"], anneal_strategy="cos")
    prep, aug = GreyPreprocess(), recipe["augment"]
    model.train()
    bar = tqdm(total=total, desc="digits-clip pretraining", disable=not progress, unit="step")
    step, correct, seen, order = 0, 0, 0, torch.empty(0, dtype=torch.long)
    while step < total:
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(step % per_epoch) * bs : (step % per_epoch + 1) * bs]
        x = augment(images[idx].float().div_(255.0), gen, tuple(aug["scale"]), aug["shift_px"])
        y = labels[idx]
        template = torch.randint(len(TRAIN_TEMPLATES), (len(idx),), generator=gen)
        img = F.normalize(model.image((x - prep.mean) / prep.std), dim=-1)
        txt = F.normalize(model.text_proj(text_emb), dim=-1)
        loss = contrastive_loss(img, txt, template, y, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, recipe["max_logit_scale"])
            if step >= total - per_epoch:  # train accuracy (task prompt) over the last epoch
                correct += int(((img @ txt[0].T).argmax(1) == y).sum())
                seen += len(idx)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}", refresh=False)
    bar.close()
    model.eval()
    facts = {"steps": total, "final_loss": round(loss.item(), 4),
             "logit_scale": round(model.logit_scale.exp().item(), 2),
             "train_accuracy_last_epoch": round(correct / max(seen, 1), 4)}
    return model, facts


@register_pretrained(NAME, description="digits dual encoder: CNN + frozen MiniLM, CLIP loss on MNIST train")
def build_digits_clip(req: BuildRequest) -> dict[str, Any]:
    """Pretrain on the 60,000 MNIST train images (``quick``: 512 of them, 4 steps) into ``req.folder``."""
    from safetensors.torch import save_file

    from fedbench.data.mnist import load_mnist

    raw = load_mnist("")
    images, labels = torch.from_numpy(raw.train_x), torch.from_numpy(raw.train_y)
    if req.quick:
        images, labels = images[: QUICK["images"]], labels[: QUICK["images"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: bit-identical weights for a seed, and one core for the rest
    try:
        model, facts = pretrain(images, labels, RECIPE, req.seed, QUICK["steps"] if req.quick else None, req.progress)
    finally:
        torch.set_num_threads(threads)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(req.folder / WEIGHTS_FILE), metadata={"format": "digits-clip/1"})
    return {**json.loads(json.dumps(RECIPE)), **facts, "seed": req.seed, "dtype": "float16",
            "data": f"MNIST train, {len(images)} images, upright ({raw.source})",
            "train_templates": list(TRAIN_TEMPLATES), "held_out_templates": list(HELD_OUT_TEMPLATES),
            "loss": "class-aware symmetric CLIP loss (i2t over the template's 10 captions, t2i same-class positives)"}
