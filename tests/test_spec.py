from __future__ import annotations

import json

import pytest

from fedbench.core.spec import RunSpec
from fedbench.errors import SpecError
from fedbench.harness.run import resolve_spec


def test_canonical_json_is_sorted_and_hash_is_stable(blobs_task):
    a = resolve_spec("fedavg", blobs_task, seed=1, rounds=2, sets=["lr=0.05", "alpha=0.3"])
    b = resolve_spec("fedavg", blobs_task, seed=1, rounds=2, sets=["alpha=0.3", "lr=0.05"])
    assert a.canonical_json() == b.canonical_json()
    assert a.spec_hash == b.spec_hash and len(a.spec_hash) == 16
    d = json.loads(a.canonical_json())
    assert list(d) == sorted(d)
    assert RunSpec.from_dict(d) == a


def test_every_default_is_resolved_into_the_spec(blobs_task):
    spec = resolve_spec("fedavg", blobs_task)
    # The method's paper defaults and the task's protocol defaults are all spelled out.
    assert spec.method_options["lr"] == 0.01 and spec.method_options["local_epochs"] == 10
    assert spec.task_options["alpha"] == 0.5 and spec.task_options["clients"] == 4
    assert spec.rounds == 3  # the task's default_rounds
    assert spec.backbone == "none"  # simple-cnn trains from pixels


def test_changing_any_option_changes_the_hash(blobs_task):
    base = resolve_spec("fedavg", blobs_task).spec_hash
    assert resolve_spec("fedavg", blobs_task, sets=["momentum=0.5"]).spec_hash != base
    assert resolve_spec("fedavg", blobs_task, seed=1).spec_hash != base
    assert resolve_spec("fedavg", blobs_task, clients=3).spec_hash != base


@pytest.mark.parametrize(
    "sets, message",
    [
        (["nosuch=1"], "unknown option"),
        (["lr=fast"], "expected a number"),
        (["local_epochs=2.5"], "expected an integer"),
        (["trainable=mlp"], "must be one of"),
        (["lr"], "expected KEY=VALUE"),
        (["method.alpha=1"], "the method has no option 'alpha'"),
        (["lr=-1"], "lr must be > 0"),
    ],
)
def test_bad_set_values_are_refused_with_the_fix(blobs_task, sets, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec("fedavg", blobs_task, sets=sets)


def test_prefixed_keys_route_to_method_or_task(blobs_task):
    spec = resolve_spec("fedavg", blobs_task, sets=["task.alpha=2.0", "method.lr=0.2"])
    assert spec.task_options["alpha"] == 2.0 and spec.method_options["lr"] == 0.2


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 0}, "--rounds 0"),
    ({"rounds": -3}, "--rounds -3"),
    ({"sample": 1.5}, "fraction must be in"),
    ({"sample": 0}, "count must be >= 1"),
    ({"clients": 0}, "must be >= 1"),
])
def test_out_of_range_run_options(blobs_task, kwargs, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec("fedavg", blobs_task, **kwargs)


def test_a_spec_runs_only_with_the_code_it_names(blobs_task):
    import dataclasses

    from fedbench.harness.run import execute, resolve_spec

    spec = resolve_spec("fedavg", blobs_task, rounds=1, sets=["local_epochs=1"])
    assert spec.method_class == "fedbench.baselines.fedavg.FedAvg" and spec.method_version == 1
    for other in (dataclasses.replace(spec, method_version=2),
                  dataclasses.replace(spec, method_class="fedbench.baselines.fedprox.FedProx"),
                  dataclasses.replace(spec, spec_version=1, method_class="", method_version=0)):
        with pytest.raises(SpecError, match="Resolve the spec again"):
            execute(other, None)


def test_version_one_specs_keep_their_hash_and_version_two_hashes_the_code():
    # The spec of a record written before core v2, and the hash it was filed under then.
    v1 = RunSpec.from_dict({
        "backbone": "none", "eval_every": 1, "method": "fedavg", "rounds": 3, "sample": 1.0, "seed": 0,
        "method_options": {"batch_size": 64, "local_epochs": 10, "lora_rank": 4, "lr": 0.01, "momentum": 0.9,
                           "trainable": "simple-cnn", "weight_decay": 1e-05},
        "spec_version": 1, "task": "mnist-dirichlet",
        "task_options": {"alpha": 0.5, "clients": 10, "data_dir": "", "max_test": 500, "max_train": 3000,
                         "min_samples": 10, "partition": "dirichlet", "val_fraction": 0.1}})
    assert v1.spec_hash == "306e137c320d8135" and "method_version" not in v1.to_dict()
    import dataclasses

    v2 = dataclasses.replace(v1, spec_version=2, method_class="m.C", method_version=1)
    assert v2.spec_hash != v1.spec_hash
    assert dataclasses.replace(v2, method_version=2).spec_hash != v2.spec_hash


def test_a_plugin_methods_spec_hash_is_the_same_in_every_process():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    code = (
        "from fedbench.core.registry import include; from fedbench.harness.run import resolve_spec; "
        f"include({str(root / 'docs/examples/personal_fedavgm.py')!r}); "
        f"include({str(root / 'tests/plugins/blobs_task.py')!r}); "
        "s = resolve_spec('personal-fedavgm', 'blobs'); print(s.spec_hash, s.method_class)"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] and runs[0].split()[1:] == ["file", "personal_fedavgm.py:PersonalFedAvgM"]
