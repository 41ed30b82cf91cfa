"""How well ``digits-t2i`` draws the digit a prompt names.

    python benchmarks/digits_t2i_eval.py                        # the committed weights
    python benchmarks/digits_t2i_eval.py --folder DIR --per-class 20 --grid /tmp/grid.png

Generates ``--per-class`` images (default 50) of each digit from the task prompt
('a photo of the number: "7".'), and prints:

- the fraction an independent judge recognises, overall and per class. The judge is NIID-Bench's
  SimpleCNN trained here (seeded, about a minute) on MNIST train images, not the dual encoder;
  its accuracy on held-out train images is printed beside it;
- where the ``digits-clip`` backbone is registered and its weights are found, the mean cosine of
  each generated image's embedding with its own prompt and with the other nine classes' prompts
  (and the zero-shot accuracy those cosines give);
- the pretraining time and recipe from the folder's manifest.

It saves a grid, one row per class (0 to 9) of the first 10 images, to ``--grid``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from fedbench.models.digits_t2i import (
    GUIDANCE,
    NAME,
    SAMPLING_STEPS,
    generate_from_prompts,
    judge_predict,
    load_digits_t2i,
    task_prompts,
    train_judge,
)
from fedbench.models.pretrained import locate


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, columns: int = 10, scale: int = 2) -> None:
    """Row c: the first ``columns`` images of class c, 2-pixel gaps, each pixel ``scale`` x ``scale``."""
    side, gap = images.shape[-1] * scale, 2
    grid = Image.new("L", (columns * (side + gap) + gap, 10 * (side + gap) + gap), color=128)
    for c in range(10):
        for j, i in enumerate((labels == c).nonzero().flatten()[:columns].tolist()):
            tile = Image.fromarray(images[i, 0].numpy()).resize((side, side), Image.NEAREST)
            grid.paste(tile, (gap + j * (side + gap), gap + c * (side + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def clip_cosines(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Own-prompt vs other-prompt cosine under digits-clip, or why it was skipped."""
    from fedbench.core.registry import BACKBONES
    from fedbench.errors import FedbenchError

    try:
        BACKBONES.get("digits-clip")
        from fedbench.models.backbones import create_backbone

        backbone = create_backbone("digits-clip")
    except (FedbenchError, ImportError, OSError) as exc:
        return f"digits-clip cosines: skipped ({type(exc).__name__}: {exc})"
    img = torch.nn.functional.normalize(backbone.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(backbone.encode_text(task_prompts()), dim=-1)
    sim = img @ txt.T  # [N, 10]
    own = sim.gather(1, labels[:, None]).squeeze(1)
    other = (sim.sum(1) - own) / 9
    zero_shot = (sim.argmax(1) == labels).float().mean().item()
    return (f"digits-clip cosine, image vs its own prompt {own.mean().item():.4f}, vs the other classes' prompts "
            f"{other.mean().item():.4f} (gap {(own - other).mean().item():+.4f}); zero-shot accuracy on the "
            f"generated images {zero_shot:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=None, help="a digits-t2i folder (default: packaged, else the cache)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the judge uses seed 0)")
    parser.add_argument("--steps", type=int, default=SAMPLING_STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--grid", default="leaderboard/digits_t2i_grid.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder, manifest = locate(NAME, args.folder)
    recipe = manifest["recipe"]
    print(f"{NAME}: {folder}; pretrained in {manifest['train_seconds']:.0f} s ({recipe['steps']} steps x batch "
          f"{recipe['batch_size']}, {recipe.get('torch_threads')} torch thread(s), seed {manifest['seed']}"
          f"{', QUICK' if manifest['quick'] else ''}); final loss {recipe.get('final_loss')}")

    labels = torch.arange(10).repeat_interleave(args.per_class)
    prompts = [task_prompts()[c] for c in labels.tolist()]
    started = time.perf_counter()
    images = generate_from_prompts(load_digits_t2i(folder), prompts, args.seed, steps=args.steps,
                                   guidance=args.guidance, progress=not args.no_progress)
    print(f"generated {len(images)} images ({args.steps} DPM-Solver++ steps, guidance {args.guidance}, "
          f"seed {args.seed}) in {time.perf_counter() - started:.0f} s")
    save_grid(images, labels, Path(args.grid))
    print(f"grid: {args.grid}")

    started = time.perf_counter()
    judge, held_out = train_judge(0, progress=not args.no_progress)
    print(f"judge: SimpleCNN, held-out MNIST train accuracy {held_out:.2%} ({time.perf_counter() - started:.0f} s)")
    hit = judge_predict(judge, images) == labels
    per_class = "  ".join(f"{c}:{hit[labels == c].float().mean().item():.0%}" for c in range(10))
    print(f"recognised: {hit.float().mean().item():.1%} of {len(images)}  |  per class  {per_class}")
    print(clip_cosines(images, labels))


if __name__ == "__main__":
    main()
