"""digits-t2i: a quick build is a diffusers folder that loads through ``from_pretrained`` and draws
seeded uint8 digits; a damaged folder is refused; the committed weights verify and load."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from fedbench.errors import BackboneUnavailableError  # noqa: E402
from fedbench.models import digits_t2i  # noqa: E402
from fedbench.models.digits_t2i import NAME, generate_from_prompts, load_digits_t2i, task_prompts  # noqa: E402
from fedbench.models.pretrained import PACKAGED, PRETRAINED, locate, prepare  # noqa: E402

PROMPTS = ["a photo of the number seven", 'a photo of the number: "3".', "handwritten 0", ""]


@pytest.fixture(scope="module")
def quick_folder(tmp_path_factory):
    return prepare(NAME, tmp_path_factory.mktemp("t2i") / NAME, seed=0, quick=True, progress=False)


@pytest.fixture(scope="module")
def quick_model(quick_folder):
    return load_digits_t2i(quick_folder)


def test_registered_as_a_builtin():
    assert PRETRAINED.get(NAME).obj.build is digits_t2i.build
    # In a fresh process nothing imports the module but the registry's built-ins.
    code = "from fedbench.models.pretrained import PRETRAINED; print(PRETRAINED.get('digits-t2i').obj.build.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "fedbench.models.digits_t2i", out.stderr


def test_quick_build_is_a_diffusers_folder(quick_folder):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from safetensors import safe_open

    weights = quick_folder / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    unet = UNet2DConditionModel.from_pretrained(quick_folder, subfolder="unet")
    assert unet.config.cross_attention_dim == 384 and unet.config.sample_size == 28
    sampler = DPMSolverMultistepScheduler.from_pretrained(quick_folder, subfolder="scheduler")
    trainer = DDPMScheduler.from_pretrained(quick_folder, subfolder="scheduler")  # the training schedule
    for scheduler in (sampler, trainer):
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
        assert scheduler.config.num_train_timesteps == 1000


def test_generates_uint8_digits_in_the_task_layout(quick_model):
    unet, scheduler, encode = quick_model
    assert encode(PROMPTS).shape == (len(PROMPTS), digits_t2i.TEXT_LENGTH, 384)
    images = generate_from_prompts(quick_model, PROMPTS, seed=0, steps=3, batch_size=3)
    assert images.dtype == torch.uint8 and images.shape == (len(PROMPTS), 1, 28, 28)
    assert not unet.training and scheduler.num_inference_steps is None  # the caller's scheduler is untouched


def test_same_seed_same_images_other_seed_other_images(quick_model):
    first = generate_from_prompts(quick_model, PROMPTS, seed=0, steps=3)
    again = generate_from_prompts(quick_model, PROMPTS, seed=0, steps=3)
    other = generate_from_prompts(quick_model, PROMPTS, seed=1, steps=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_guidance_uses_the_prompt(quick_model):
    unconditional = generate_from_prompts(quick_model, PROMPTS[:2], seed=0, steps=3, guidance=0.0)
    guided = generate_from_prompts(quick_model, PROMPTS[:2], seed=0, steps=3, guidance=5.0)
    assert not torch.equal(unconditional, guided)


def test_truncated_unet_weights_are_refused(quick_folder, tmp_path):
    damaged = tmp_path / NAME
    shutil.copytree(quick_folder, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare digits-t2i"):
        load_digits_t2i(damaged)


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare digits-t2i"):
        load_digits_t2i(tmp_path / "nowhere")


def test_committed_weights_verify_and_load():
    folder, manifest = locate(NAME)
    assert folder == PACKAGED / NAME
    assert not manifest["quick"] and manifest["seed"] == 0
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10 * 2**20
    model = load_digits_t2i(None)
    images = generate_from_prompts(model, task_prompts()[:2], seed=0, steps=2)
    assert images.shape == (2, 1, 28, 28)


@pytest.mark.slow
def test_committed_weights_draw_recognisable_digits():
    model = load_digits_t2i(None)
    labels = torch.arange(10).repeat_interleave(10)
    images = generate_from_prompts(model, [task_prompts()[c] for c in labels.tolist()], seed=0)
    judge, held_out = digits_t2i.train_judge(0)
    assert held_out > 0.97
    recognised = (digits_t2i.judge_predict(judge, images) == labels).float().mean().item()
    assert recognised >= 0.70, recognised
