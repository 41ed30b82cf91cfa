"""One run, end to end: resolve the spec, load the task, prepare inputs, federate, record."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedbench.core.registry import BACKBONES, METHODS, TASKS, method_identity
from fedbench.core.results import (
    check_writable,
    git_commit,
    machine,
    package_versions,
    record_path,
    write_image_grids,
    write_record,
)
from fedbench.core.spec import RunSpec, options_from, parse_sets, split_sets
from fedbench.data.pool import pool_ram_bytes
from fedbench.errors import SpecError
from fedbench.federation.checkpoint import Checkpoints, checkpoint_identity
from fedbench.federation.cohort import batched_clients_requested
from fedbench.federation.engine import run_federation
from fedbench.federation.method import RunContext

DEFAULT_BACKBONE = "offline-pair"


def resolve_spec(
    method: str,
    task: str,
    *,
    backbone: str | None = None,
    seed: int = 0,
    rounds: int | None = None,
    clients: int | None = None,
    sample: float | int = 1.0,
    sets: Sequence[str] | dict[str, str] = (),
    eval_every: int = 1,
) -> RunSpec:
    """Every default resolved into the spec, every option type- and range-checked, before anything runs.

    A task class may declare ``check_options(options, seed)`` (a staticmethod) for the checks its
    options' bounds cannot express; it runs here, before any data is read.
    """
    import numbers

    method_entry, task_entry = METHODS.get(method), TASKS.get(task)
    method_cls, task_cls = method_entry.obj, task_entry.obj
    seed_max = 2**32 - 1
    # Every generator is seeded with [seed, stream, ...] as 32-bit words (numpy's SeedSequence):
    # a negative seed is refused deep in numpy, and one past 32 bits would alias another seed's streams.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= seed_max:
        raise SpecError(f"--seed {seed}: must be an integer in 0..{seed_max}, e.g. --seed 0")
    seed = int(seed)
    raw = dict(sets) if isinstance(sets, dict) else parse_sets(sets)
    method_opts, task_opts = split_sets(raw, method_cls.Hparams, task_cls.Options)
    if clients is not None:
        if not task_cls.clients_configurable:
            raise SpecError(f"--clients: task {task!r} has one client per domain; its client count is fixed")
        if clients < 1:
            raise SpecError(f"--clients {clients}: must be >= 1")
        task_opts["clients"] = clients
    hp = options_from(method_cls.Hparams, method_opts, f"method {method!r}")
    topts = options_from(task_cls.Options, task_opts, f"task {task!r}")
    task_check = getattr(task_cls, "check_options", None)
    if task_check is not None:
        task_check(topts, seed)
    method_cls.check_task(hp, task_cls)
    if rounds is None:
        rounds = method_cls.default_rounds or task_cls.default_rounds
    if rounds <= 0:
        raise SpecError(f"--rounds {rounds}: must be >= 1")
    if eval_every <= 0:
        raise SpecError(f"--eval-every {eval_every}: must be >= 1")
    if isinstance(sample, float) and not 0 < sample <= 1:
        raise SpecError(f"--sample {sample}: a fraction must be in (0, 1]; use an integer for a count")
    if isinstance(sample, int) and sample < 1:
        raise SpecError(f"--sample {sample}: a client count must be >= 1")
    if method_cls.needs_backbone(hp):
        backbone = backbone or task_cls.default_backbone or DEFAULT_BACKBONE
        BACKBONES.get(backbone)  # an unknown name fails here, before any data is read
    else:
        if backbone not in (None, "none"):
            warnings.warn(f"method {method!r} with these options uses no backbone; --backbone {backbone} "
                          f"is ignored and recorded as 'none'", stacklevel=2)
        backbone = "none"
    return RunSpec(
        method=method, task=task, backbone=backbone, seed=seed, rounds=rounds, sample=sample,
        method_options=dataclasses.asdict(hp), task_options=dataclasses.asdict(topts), eval_every=eval_every,
        **method_identity(method_cls),
    )


def _best_val(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in rounds if r.get("val_acc") is not None]
    return max(scored, key=lambda r: r["val_acc"]) if scored else None  # max keeps the first best


EVAL_KEYS = ("global_acc", "global_loss", "val_acc", "heldout_acc", "heldout_acc_mean",
             "client_acc_mean", "client_acc_weighted", "client_acc_worst", "class_acc", "class_acc_worst",
             "class_acc_std", "modality_acc", "modality_acc_worst", "round")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a GPU that is not there is a clear error, never a fallback."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SpecError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SpecError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise SpecError(f"--device {name}: no such CUDA device here (torch sees {torch.cuda.device_count()}); "
                        f"run with --device cpu")
    return device


def check_code_identity(spec: RunSpec) -> None:
    """A spec names the method code that may run it: running it with other code would write a
    record whose hash claims what did not happen."""
    here = tuple(method_identity(METHODS.get(spec.method).obj).values())
    if (spec.method_class, spec.method_version) != here:
        recorded = (f"{spec.method_class} version {spec.method_version}" if spec.spec_version >= 2
                    else "code that the spec (version 1) does not name")
        raise SpecError(f"spec {spec.spec_hash} was made for {recorded}; this installation has {here[0]} "
                        f"version {here[1]}. Resolve the spec again (fedbench run and sweep do) to run this code.")


def execute(
    spec: RunSpec,
    results_dir: str | Path | None = "results",
    *,
    cache_dir: str | Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    device: str = "cpu",
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``spec`` and return its record; write it under ``results_dir`` unless that is None.

    With a ``results_dir``, the run checkpoints beside its record (every ``checkpoint_every``
    rounds; None: every few minutes; 0: never) and ``resume`` continues from that checkpoint.
    A run whose loss turns non-finite stops; its record says so under ``"diverged"``.
    """
    if checkpoint_every is not None and checkpoint_every < 0:
        raise SpecError(f"--checkpoint-every {checkpoint_every}: a number of rounds >= 1, or 0 for none")
    run_device = resolve_device(device)
    batched_clients_requested()  # a bad FEDBENCH_BATCHED_CLIENTS or FEDBENCH_POOL_RAM_GB is refused
    pool_ram_bytes()  # before any data is read
    check_code_identity(spec)
    if results_dir is not None:
        check_writable(results_dir)
    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    method_entry = METHODS.get(spec.method)
    method_cls, task_cls = method_entry.obj, TASKS.get(spec.task).obj
    hp = method_cls.Hparams(**spec.method_options)
    topts = task_cls.Options(**spec.task_options)
    if (method_cls.uses_views(hp) and len(task_cls.modalities) > 1
            and (spec.backbone == "none" or method_cls.input_kind(hp) != "features")):
        raise SpecError(f"method {spec.method!r} takes every modality of {spec.task!r} but not as backbone "
                        f"features: multi-modal inputs are frozen features only; give it a backbone")
    backbone, backbone_fingerprint = None, None
    if spec.backbone != "none":
        from fedbench.models.backbones import create_backbone

        # Built before the data is read, so that options the backbone cannot honour fail first.
        backbone = create_backbone(spec.backbone, device=run_device, cache_dir=cache_dir)
        backbone_fingerprint = backbone.fingerprint
        method_cls.check_backbone(hp, backbone)
    t_backbone = time.perf_counter()
    dataset = task_cls().load(topts, spec.seed)
    t_data = time.perf_counter()

    text_features, inputs = None, dataset.images
    modalities = dataset.modalities if method_cls.uses_views(hp) else ("image",)
    if backbone is not None:
        from fedbench.models.cache import FeatureCache

        cache = FeatureCache(cache_dir)
        text_features = cache.text_features(backbone, dataset.prompts())
        if method_cls.input_kind(hp) == "features":
            inputs = cache.features(backbone, dataset.images)
            if len(modalities) > 1:  # [N, M, D]: each modality encoded (and cached) on its own
                inputs = torch.stack([inputs, *(cache.features(backbone, v) for v in dataset.views.values())], 1)
    t_inputs = time.perf_counter()

    ctx = RunContext(
        num_classes=dataset.num_classes, class_names=list(dataset.class_names), prompts=dataset.prompts(),
        num_clients=len(dataset.clients), input_kind=method_cls.input_kind(hp),
        input_shape=tuple(inputs.shape[1:]), backbone=backbone, text_features=text_features,
        pixel_mean=dataset.pixel_mean, pixel_std=dataset.pixel_std, train_augment=dataset.train_augment,
        seed=spec.seed, device=run_device, modalities=modalities,
    )
    data_fingerprint = dataset.fingerprint()  # hashes every pixel: once, for the checkpoint and the record
    checkpoints = None
    if results_dir is not None:
        identity = checkpoint_identity(spec.spec_hash, data_fingerprint, backbone_fingerprint)
        checkpoints = Checkpoints(checkpoint_path(results_dir, spec), identity, checkpoint_every, resume)
    out = run_federation(method_cls, hp, ctx, dataset, inputs, rounds=spec.rounds, sample=spec.sample,
                         eval_every=spec.eval_every, on_round=on_round, checkpoints=checkpoints)
    ended = datetime.now(timezone.utc)

    last = next(r for r in reversed(out.rounds) if any(k in r for k in EVAL_KEYS[:-1]))
    best = _best_val(out.rounds)
    final = {
        "last": {k: last[k] for k in EVAL_KEYS if k in last},
        "best_val": {k: best[k] for k in EVAL_KEYS if k in best} if best else None,
        "best_val_round": best["round"] if best else None,
        "rounds_run": len(out.rounds) if out.trains else 0,
        "trainable_params": out.trainable_params,
    }
    record = {
        "schema_version": 1,
        "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash,
        "fidelity": method_entry.fidelity,
        "method_source": method_entry.source,
        "task_source": dataset.source,
        "metrics": {"rounds": out.rounds, "final": final},
        "comm": {
            "up_bytes": out.channel.up_bytes,
            "down_bytes": out.channel.down_bytes,
            "up_messages": out.channel.up_messages,
            "down_messages": out.channel.down_messages,
            "per_round": out.channel.per_round,
        },
        "partition": dataset.partition_stats,
        # Wall times differ run to run; they live outside "metrics", which is deterministic.
        "timing": {
            "round_seconds": [round(s, 4) for s in out.round_seconds],
            "backbone_seconds": round(t_backbone - t_start, 4),
            "data_seconds": round(t_data - t_backbone, 4),
            "inputs_seconds": round(t_inputs - t_data + out.encode_seconds, 4),
            "client_seconds": [round(s, 4) for s in out.client_seconds],
            "server_seconds": [round(s, 4) for s in out.server_seconds],
            **({"server_stages": {k: [round(s, 4) for s in v] for k, v in out.stage_seconds.items()}}
               if out.stage_seconds else {}),
            "total_seconds": round(time.perf_counter() - t_start, 4),
        },
        "provenance": {
            "packages": package_versions(),
            "git_commit": git_commit(),
            "data_fingerprint": data_fingerprint,
            "backbone_fingerprint": backbone_fingerprint,
            "machine": machine(),
            "device": str(run_device),
            "started": started.isoformat(timespec="seconds"),
            "ended": ended.isoformat(timespec="seconds"),
            **({"resumed_from_round": out.resumed_from_round} if out.resumed_from_round is not None else {}),
            # like the device: the same protocol, the last digits of a metric may differ
            **({"batched_clients": True} if batched_clients_requested() else {}),
        },
    }
    if out.diverged is not None:
        record["diverged"] = out.diverged
    if results_dir is not None:
        if out.images:  # written first: a record never names a picture that is not there
            record["images"] = write_image_grids(out.images, record_path(results_dir, spec))
        record["path"] = str(write_record(record, results_dir))
        if checkpoints is not None:  # the record is whole: nothing is left to resume
            checkpoints.remove()
    return record


def checkpoint_path(results_dir: str | Path, spec: RunSpec) -> Path:
    """The run's checkpoint, beside where its record will be (no record reader looks at .ckpt)."""
    return record_path(results_dir, spec).with_suffix(".ckpt")
