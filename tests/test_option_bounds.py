"""Every numeric option of every built-in method and task declares its range, and the range is
enforced when a spec resolves: before any data is read, and for a sweep before any run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedbench.harness.run as fb_run
from fedbench.core.options import Bounds, bounded, bounds_of, check_options, numeric_fields
from fedbench.core.registry import METHODS, TASKS, method_identity
from fedbench.core.spec import options_from
from fedbench.errors import SpecError
from fedbench.harness.run import resolve_spec
from fedbench.harness.sweep import plan, sweep

BUILTIN = ("fedbench.baselines.", "fedbench.tasks.")
ROOT = Path(__file__).parents[1]


def _owners() -> list[tuple[str, type]]:
    """(where, options class) of every built-in method and task (plugins loaded by other tests aside)."""
    out = [(f"method {e.name!r}", e.obj.Hparams) for e in METHODS.entries() if e.obj.__module__.startswith(BUILTIN)]
    out += [(f"task {e.name!r}", e.obj.Options) for e in TASKS.entries() if e.obj.__module__.startswith(BUILTIN)]
    return out


FIELDS = [pytest.param(where, cls, f, id=f"{where}.{f.name}".replace("'", ""))
          for where, cls in _owners() for f in dataclasses.fields(cls) if f.name in numeric_fields(cls)]
FLOATS = [p for p in FIELDS if numeric_fields(p.values[1])[p.values[2].name] is float]


def _bare(cls: type, **values) -> object:
    """The defaults with ``values`` written in, past ``__post_init__``: what the bounds alone say."""
    options = cls()
    for name, value in values.items():
        object.__setattr__(options, name, value)
    return options


def _edges(bounds: Bounds, kind: type) -> list[tuple[float, bool]]:
    """(value, admitted) pairs on each side of each bound: just outside is refused; the bound itself
    (inclusive) or the nearest value inside (exclusive) is admitted."""
    def step(x: float, direction: float) -> float:
        return x + direction if kind is int else math.nextafter(x, direction * math.inf)

    out = []
    if bounds.ge is not None:
        out += [(step(bounds.ge, -1), False), (bounds.ge, True)]
    if bounds.gt is not None:
        out += [(bounds.gt, False), (step(bounds.gt, 1), True)]
    if bounds.le is not None:
        out += [(step(bounds.le, 1), False), (bounds.le, True)]
    if bounds.lt is not None:
        out += [(bounds.lt, False), (step(bounds.lt, -1), True)]
    return [(kind(v), ok) for v, ok in out]


def test_the_registries_hold_every_builtin_with_numeric_options():
    names = {p.values[0] for p in FIELDS}
    assert {"method 'fedavg'", "method 'fedprox'", "method 'fedmmkt'", "task 'mnist-dirichlet'",
            "task 'rotated-mnist-glimpse'", "task 'pacs'", "task 'domainnet'"} <= names
    assert len(FIELDS) > 60


@pytest.mark.parametrize(("where", "cls", "field"), FIELDS)
def test_every_numeric_field_declares_bounds_its_default_meets(where, cls, field):
    bounds = bounds_of(field)
    assert bounds is not None, f"{where}: {field.name} declares no bounds; declare it with bounded(...)"
    assert bounds != Bounds(), f"{where}: {field.name} is bounded on neither side"
    assert bounds.admits(field.default)
    check_options(cls(), where)


@pytest.mark.parametrize(("where", "cls", "field"), FIELDS)
def test_just_outside_a_bound_is_refused_and_the_bound_admitted(where, cls, field):
    bounds, kind = bounds_of(field), numeric_fields(cls)[field.name]
    edges = _edges(bounds, kind)
    assert edges
    for value, admitted in edges:
        if not admitted:
            with pytest.raises(SpecError, match=rf"--set {field.name}=.*{where}.* e\.g\. --set {field.name}="):
                check_options(_bare(cls, **{field.name: value}), where)
            with pytest.raises(SpecError, match=field.name):  # and on the path every spec takes
                options_from(cls, {field.name: value}, where)
            continue
        check_options(_bare(cls, **{field.name: value}), where)
        if value in (bounds.ge, bounds.le):  # an inclusive bound passes the whole path too
            assert getattr(options_from(cls, {field.name: value}, where), field.name) == value


@pytest.mark.parametrize(("where", "cls", "field"), FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused(where, cls, field, value):
    with pytest.raises(SpecError, match=rf"{field.name} must be a finite number"):
        check_options(_bare(cls, **{field.name: value}), where)
    with pytest.raises(SpecError, match=field.name):
        options_from(cls, {field.name: value}, where)


@pytest.mark.parametrize(("cls", "name"), [(METHODS.get("fedavg").obj.Hparams, "local_epochs"),
                                           (TASKS.get("pacs").obj.Options, "image_size")])
def test_an_int_option_takes_no_float_or_bool(cls, name):
    for value in (float(getattr(cls(), name)), True):
        with pytest.raises(SpecError, match=rf"{name} must be an integer"):
            check_options(_bare(cls, **{name: value}), "an owner")


def test_bounds_helpers():
    assert Bounds(ge=0, lt=1).describe() == "in [0, 1)" and Bounds(gt=0).describe() == "> 0"
    assert Bounds(le=math.inf).admits(math.inf) and not Bounds(ge=0).admits(math.inf)
    with pytest.raises(ValueError, match="default"):
        bounded(0.0, gt=0)  # a declaration whose own default is out of range is a programming error
    with pytest.raises(TypeError):
        Bounds(ge=0, gt=0)

    @dataclasses.dataclass(frozen=True)
    class Opt:
        steps: int | None = bounded(3, ge=1)
        limit: float | None = bounded(None, gt=0)
        scale: float = 1.0  # undeclared (a plugin's): any finite number

    assert numeric_fields(Opt) == {"steps": int, "limit": float, "scale": float}
    check_options(Opt(steps=None, scale=-1e300), "method 'x'")  # an optional number may be None
    with pytest.raises(SpecError, match=r"limit must be a finite number > 0, e\.g\. --set limit=None$"):
        check_options(Opt(limit=0.0), "method 'x'")

    @dataclasses.dataclass
    class Required:
        rate: float

    with pytest.raises(SpecError, match="rate must be a finite number$"):  # no default to suggest
        check_options(Required(rate=math.nan), "task 'y'")
    with pytest.raises(SpecError, match="steps must be an integer >= 1"):
        check_options(Opt(steps=0), "method 'x'")
    for value in (math.nan, math.inf):
        with pytest.raises(SpecError, match=r"--set scale=(nan|inf): method 'x' option scale must be a finite number, "
                                            r"e\.g\. --set scale=1\.0$"):
            check_options(Opt(scale=value), "method 'x'")


# --- the seed, and the tasks' own checks: at resolve time, before any data ------------------------


@pytest.fixture
def no_data(monkeypatch):
    """Every built-in task's loader fails the test if called."""
    def refuse(self, options, seed):
        raise AssertionError("data was read while resolving a spec")

    for entry in TASKS.entries():
        if entry.obj.__module__.startswith(BUILTIN):
            monkeypatch.setattr(entry.obj, "load", refuse)


@pytest.mark.parametrize("task", ["rotated-mnist", "pacs-mini", "mnist-dirichlet"])
@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "3", True, None])
def test_a_bad_seed_is_refused_at_resolve_time(no_data, task, seed):
    with pytest.raises(SpecError, match=r"--seed .*: must be an integer in 0\.\.4294967295"):
        resolve_spec("fedavg", task, seed=seed, rounds=1)


def test_the_seed_range_ends_are_accepted(no_data):
    assert resolve_spec("fedavg", "rotated-mnist", seed=0).seed == 0
    assert resolve_spec("fedavg", "rotated-mnist", seed=2**32 - 1).seed == 2**32 - 1
    spec = resolve_spec("fedavg", "rotated-mnist", seed=np.int64(7))
    assert type(spec.seed) is int and spec.seed == 7
    assert spec.spec_hash == resolve_spec("fedavg", "rotated-mnist", seed=7).spec_hash


@pytest.mark.parametrize("task", ["mnist-dirichlet", "cifar10-dirichlet"])
def test_a_tasks_own_checks_run_at_resolve_time(no_data, task):
    with pytest.raises(SpecError, match="partition must be one of dirichlet, iid, quantity"):
        resolve_spec("fedavg", task, sets=["partition=shards"])


def test_a_task_declares_its_checks_with_a_class_attribute(blobs_task, monkeypatch):
    seen = []

    def check(options, seed):
        seen.append((options.clients, seed))
        if seed == 5:
            raise SpecError("seed 5 is refused by this task")

    monkeypatch.setattr(TASKS.get(blobs_task).obj, "check_options", staticmethod(check), raising=False)
    resolve_spec("fedavg", blobs_task, seed=4, clients=3)
    with pytest.raises(SpecError, match="seed 5 is refused"):
        resolve_spec("fedavg", blobs_task, seed=5)
    assert seen == [(3, 4), (4, 5)]


def test_a_bad_set_value_is_refused_before_any_data(no_data):
    for sets, message in [(["lr=nan"], "lr must be a finite number > 0"),
                          (["momentum=1"], r"momentum must be a finite number in \[0, 1\)"),
                          (["weight_decay=-5"], "weight_decay must be a finite number >= 0"),
                          (["val_fraction=1"], "task 'mnist-dirichlet' option val_fraction")]:
        with pytest.raises(SpecError, match=message):
            resolve_spec("fedavg", "mnist-dirichlet", sets=sets)


# --- spec hashes: the bounds live in field metadata, never in the spec ----------------------------


def _committed_specs() -> list[dict]:
    specs = []
    for path in sorted((ROOT / "results").rglob("*.json")):
        spec = json.loads(path.read_text()).get("spec")
        if spec and spec.get("spec_version", 1) >= 2:
            specs.append(spec)
    return specs


def test_resolving_a_committed_spec_again_gives_its_hash():
    checked = 0
    for spec in _committed_specs():
        method = METHODS.get(spec["method"]).obj
        if (spec["method_class"], spec["method_version"]) != tuple(method_identity(method).values()):
            continue  # recorded with other code; its options may differ
        sets = {f"method.{k}": str(v) for k, v in spec["method_options"].items()}
        sets |= {f"task.{k}": str(v) for k, v in spec["task_options"].items()}
        again = resolve_spec(spec["method"], spec["task"], backbone=spec["backbone"], seed=spec["seed"],
                             rounds=spec["rounds"], sample=spec["sample"], sets=sets, eval_every=spec["eval_every"])
        assert again.to_dict() == spec
        checked += 1
    assert checked >= 20


# --- a sweep: every spec is resolved before any runs ------------------------------------------------


@pytest.fixture
def runs(monkeypatch):
    calls = []
    monkeypatch.setattr(fb_run, "execute", lambda spec, *a, **kw: calls.append(spec) or {"path": "x"})
    return calls


@pytest.mark.parametrize(("seeds", "sets", "message"), [
    ([0, 1], ["fedprox.mu=nan"], r"fedprox on blobs: --set mu=nan: method 'fedprox' option mu must be"),
    ([0, -1], [], r"fedavg on blobs: --seed -1: must be an integer"),
])
def test_a_sweep_with_one_bad_spec_runs_none(blobs_task, tmp_path, runs, seeds, sets, message):
    with pytest.raises(SpecError, match=message) as err:
        sweep(["fedavg", "fedprox"], [blobs_task], seeds, ["local_epochs=1", *sets], rounds=1,
              results_dir=tmp_path / "results", log=lambda _: None)
    assert runs == [] and not (tmp_path / "results").exists()
    assert ("In a sweep, --set" in str(err.value)) == bool(sets)  # the scoping hint not for a seed


def test_a_sweep_names_every_distinct_problem(blobs_task):
    with pytest.raises(SpecError, match="3 problems in the sweep's grid; nothing was run") as err:
        plan(["fedavg", "fedprox"], [blobs_task], [0, -1, 1], ["fedprox.mu=-1"], rounds=1)
    lines = str(err.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["fedavg on blobs", "fedprox on blobs", "fedprox on blobs"]
    assert "--seed -1" in lines[0] and "mu must be >= 0" in lines[1] and "--seed -1" in lines[2]
    assert "In a sweep, --set fedprox.KEY=V" in lines[1] and "In a sweep" not in lines[0] + lines[2]


# --- the command line: exit 2, one line, no traceback -------------------------------------------------


def test_the_cli_refuses_a_bad_option_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for args, message in [(["--set", "lr=nan"], "fedbench: error: --set lr=nan: method 'fedavg' option lr must be"),
                          (["--seed", "-1"], "fedbench: error: --seed -1: must be an integer in 0..4294967295")]:
        out = subprocess.run([sys.executable, "-m", "fedbench.cli.console", "run", "fedavg", "mnist-dirichlet",
                              "--rounds", "1", "--results-dir", str(tmp_path / "r"), *args],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(message)
        assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "r").exists()
