"""Pretrained-model folders: written whole or not at all, readable, verified on load."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from fedbench.core.registry import METHODS  # noqa: F401  (loads the built-ins first)
from fedbench.errors import BackboneUnavailableError
from fedbench.models.pretrained import PRETRAINED, locate, prepare, register_pretrained


@pytest.fixture(scope="module")
def toy():
    @register_pretrained("toy-weights", description="a test builder")
    def build(req):
        save_file({"w": torch.ones(3)}, str(req.folder / "w.safetensors"))  # safetensors writes 0600
        if req.seed < 0:
            raise RuntimeError("the build failed half-way")
        return {"seed": req.seed}

    yield "toy-weights"
    PRETRAINED._entries.pop("toy-weights")


def test_prepared_files_are_readable_and_verify(toy, tmp_path):
    old = os.umask(0o022)
    try:
        folder = prepare(toy, tmp_path / "toy", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "w.safetensors").stat().st_mode) == 0o644
    assert locate(toy, folder)[1]["recipe"] == {"seed": 0}


def test_a_failed_build_leaves_nothing_behind(toy, tmp_path):
    with pytest.raises(RuntimeError, match="half-way"):
        prepare(toy, tmp_path / "toy", seed=-1, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BackboneUnavailableError, match="fedbench prepare toy-weights"):
        locate(toy, tmp_path / "toy")
