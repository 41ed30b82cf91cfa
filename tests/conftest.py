"""Shared fixtures. The synthetic ``blobs`` plugin task keeps core tests fast; real tasks
have tests of their own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PLUGIN_DIR = Path(__file__).parent / "plugins"

# Tests train tiny models: one intra-op thread is as fast as two on an idle machine and avoids
# OpenMP spin-wait slowdowns (measured tenfold) when the machine is busy.
torch.set_num_threads(int(os.environ.get("FEDBENCH_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def blobs_task() -> str:
    from fedbench.core.registry import include

    include(PLUGIN_DIR / "blobs_task.py")
    return "blobs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never write into the user's real feature cache.
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
