"""Zero-shot top-1 of ``digits-clip`` on the 10,000 MNIST test images, upright and rotated.

    python benchmarks/digits_clip_zero_shot.py                  # the committed weights: ~1 min on a CPU
    python benchmarks/digits_clip_zero_shot.py --weights FOLDER # a folder written by `fedbench prepare`

Rows: the digit tasks' prompt (seen in pretraining), each held-out template (never seen) and their
ensemble (mean of unit text embeddings); columns: rotations 0/15/30/45/60/75 degrees
counter-clockwise (``rotate_batch``, as the rotated-mnist task rotates). Pretraining saw only the
60,000 MNIST train images, upright; every image here is new to the model.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from fedbench.data.mnist import MNIST_PROMPT, load_mnist
from fedbench.models.backbones import create_backbone
from fedbench.models.backbones.digits_clip import HELD_OUT_TEMPLATES, NAME, TRAIN_TEMPLATES, zero_shot_accuracy
from fedbench.tasks.rotated_mnist import rotate_batch

ROTATIONS = (0, 15, 30, 45, 60, 75)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a prepared digits-clip folder (default: the committed one)")
    parser.add_argument("--limit", type=int, default=0, help="first N test images only (default: all 10,000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    backbone = create_backbone(NAME + (f":{args.weights}" if args.weights else ""))
    raw = load_mnist("")
    n = args.limit or len(raw.test_y)
    images, labels = torch.from_numpy(raw.test_x[:n]), torch.from_numpy(raw.test_y[:n])
    task_template = TRAIN_TEMPLATES[0]
    assert task_template.format(d="7") == MNIST_PROMPT.format("7")
    prompts = [(f"task prompt: {task_template.format(d='7')}", [task_template])]
    prompts += [(f"held out: {t.format(d='7', w='seven')}", [t]) for t in HELD_OUT_TEMPLATES]
    prompts.append(("held out, ensemble", list(HELD_OUT_TEMPLATES)))

    table = [[label] for label, _ in prompts]
    for degrees in ROTATIONS:
        features = backbone.encode_image(rotate_batch(images, degrees))
        for row, (_, templates) in zip(table, prompts, strict=True):
            row.append(f"{100 * zero_shot_accuracy(backbone, images, labels, templates, features):.1f}")
    print(f"digits-clip zero-shot top-1 (%) on {n} MNIST test images, rotated counter-clockwise")
    print(tabulate(table, headers=["prompt", *map(str, ROTATIONS)], tablefmt="github", disable_numparse=True))
    m = backbone.manifest
    print(f"\nweights: seed {m['seed']}, {m['recipe']['steps']} steps, learned logit scale "
          f"{m['recipe']['logit_scale']}, pretraining {m['train_seconds']} s ({m['recipe']['data']}); "
          f"fingerprint {backbone.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
