"""``--device``: a GPU that is not there is a clear error before anything runs; where one is,
the batched arithmetic lands within float tolerance of the CPU run."""

from __future__ import annotations

import pytest
import torch

from fedbench.cli.main import main
from fedbench.errors import SpecError
from fedbench.harness.run import execute, resolve_device, resolve_spec

FAST = ["local_epochs=1", "batch_size=32"]


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "", "gpu"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(SpecError, match="--device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_exits_2_naming_the_fix(blobs_task, tmp_path, capsys):
    code = main(["run", "fedavg", blobs_task, "--device", "cuda", "--rounds", "1", "--results-dir", str(tmp_path)])
    assert code == 2
    assert "--device cpu" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.json"))  # refused before anything ran


def test_device_is_recorded_and_cpu_is_the_default(blobs_task):
    spec = resolve_spec("fedavg", blobs_task, rounds=1, sets=FAST)
    default, explicit = execute(spec, None), execute(spec, None, device="cpu")
    assert default["provenance"]["device"] == explicit["provenance"]["device"] == "cpu"
    assert default["metrics"] == explicit["metrics"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, backbone", [("fedavg", None), ("fedprox", None), ("local", None),
                                              ("fedclip", "tiny-clip"), ("zero-shot", "tiny-clip")])
def test_cuda_run_matches_the_cpu_run(blobs_task, method, backbone):
    spec = resolve_spec(method, blobs_task, rounds=2, backbone=backbone,
                        sets=FAST if method in ("fedavg", "fedprox", "local") else [])
    cpu, gpu = execute(spec, None), execute(spec, None, device="cuda")
    assert gpu["provenance"]["device"].startswith("cuda")
    assert gpu["comm"] == cpu["comm"]
    for a, b in zip(cpu["metrics"]["rounds"], gpu["metrics"]["rounds"], strict=True):
        for key in ("global_acc", "client_acc_mean"):
            if a.get(key) is not None:
                assert abs(a[key] - b[key]) <= 0.05, (key, a[key], b[key])
