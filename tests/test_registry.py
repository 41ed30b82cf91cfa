"""The registry: lookups, plugins (files and entry points), and one owner per name."""

from __future__ import annotations

import importlib.util
import warnings
from importlib.metadata import EntryPoint

import pytest

from fedbench.baselines.fedavg import FedAvg
from fedbench.baselines.fedprox import FedProx
from fedbench.core.metrics import Metric
from fedbench.core.registry import METHODS, TASKS, PluginWarning, Registry, include, register_method
from fedbench.errors import DuplicateNameError, PluginError, UnknownNameError


def test_unknown_name_lists_known_names_and_closest_match():
    with pytest.raises(UnknownNameError) as err:
        METHODS.get("fedavgg")
    msg = str(err.value)
    assert "Did you mean 'fedavg'?" in msg
    assert "fedprox" in msg and "local" in msg


def test_builtins_register_with_metadata():
    entry = METHODS.get("fedavg")
    assert entry.fidelity == "reproduction"
    assert "McMahan" in entry.source
    assert "mnist-dirichlet" in TASKS.names()


def test_family_names_resolve_to_their_family():
    reg: Registry[object] = Registry("backbone", "fedbench.nothing")
    reg._entry_points_loaded = True
    reg.register("openclip", description="d")(object)
    assert reg.get("openclip:ViT-B-32/openai").name == "openclip"


def test_include_registers_a_local_plugin(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from fedbench.baselines.fedavg import FedAvg\n"
        "from fedbench.core.registry import register_method\n"
        "@register_method('my-fedavg', description='a plugin copy of FedAvg', fidelity='adaptation')\n"
        "class MyFedAvg(FedAvg):\n    pass\n"
    )
    include(plugin)
    assert METHODS.get("my-fedavg").description == "a plugin copy of FedAvg"


def test_include_of_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(PluginError, match="no such file"):
        include(tmp_path / "absent.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="boom"):
        include(broken)


def test_entry_points_are_loaded(monkeypatch):
    class FakeEntryPoint:  # an installed package's entry point, without installing one
        name, value = "ep-method", "pkg.module:Method"

        def load(self):
            return type("EpMethod", (), {"__doc__": "from an entry point"})

    reg: Registry[object] = Registry("method", "fedbench.methods")
    monkeypatch.setattr("fedbench.core.registry.entry_points", lambda group: [FakeEntryPoint()])
    assert reg.get("ep-method").description == "from an entry point"


# --------------------------------------------------------------------------- one owner per name


def _fresh(kind: str = "method") -> Registry[object]:
    reg: Registry[object] = Registry(kind, "fedbench.nothing")
    reg._entry_points_loaded = True
    return reg


def first_factory():
    """the first owner"""


def second_factory():
    """the second owner"""


@pytest.fixture
def methods_restored(monkeypatch):
    """METHODS with its built-ins loaded, on a copy of its entries that is put back after the test."""
    METHODS.names()
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))


@pytest.fixture
def method_entry_points(monkeypatch, methods_restored):
    """Install fake ``fedbench.methods`` entry points; METHODS loads them on its next lookup."""

    def install(*eps: EntryPoint) -> None:
        monkeypatch.setattr(
            "fedbench.core.registry.entry_points", lambda group: list(eps) if group == "fedbench.methods" else []
        )
        monkeypatch.setattr(METHODS, "_entry_points_loaded", False)

    return install


def test_duplicate_name_is_an_error_naming_both_sources_and_the_fix():
    reg = _fresh()
    reg.register("x")(first_factory)
    with pytest.raises(DuplicateNameError) as err:
        reg.register("x")(second_factory)
    msg = str(err.value)
    assert f"{__name__}:first_factory" in msg and f"{__name__}:second_factory" in msg
    assert "override=True" in msg and "--override" in msg
    assert isinstance(err.value, PluginError)
    assert reg.get("x").obj is first_factory  # the refused registration changed nothing


def test_plugin_file_claiming_a_builtin_name_is_refused_with_the_file_named(tmp_path, methods_restored):
    plugin = tmp_path / "claims_fedavg.py"
    plugin.write_text(
        "from fedbench.core.registry import register_method\n"
        "@register_method('fedavg')\nclass NotFedAvg:\n    pass\n"
    )
    with pytest.raises(DuplicateNameError) as err:
        include(plugin)
    msg = str(err.value)
    assert "fedbench.baselines.fedavg:FedAvg" in msg and f"NotFedAvg in the plugin file {plugin}" in msg
    assert METHODS.get("fedavg").obj is FedAvg


def test_a_plugin_file_that_fails_registers_nothing(tmp_path, methods_restored):
    plugin = tmp_path / "half.py"
    plugin.write_text(
        "from fedbench.core.registry import register_method\n"
        "@register_method('half-first')\nclass First:\n    pass\n"
        "raise RuntimeError('boom after one registration')\n"
    )
    with pytest.raises(PluginError, match="boom"):
        include(plugin)
    assert "half-first" not in METHODS.names()


def test_registering_the_same_code_again_is_fine(tmp_path):
    reg = _fresh()
    reg.register("x")(first_factory)
    reg.register("x")(first_factory)  # the very same object
    # A module imported twice makes new objects with the same module and qualified name.
    source = tmp_path / "reimported_plugin.py"
    source.write_text("class Thing:\n    pass\n")
    things = []
    for _ in range(2):
        spec = importlib.util.spec_from_file_location("fedbench_test_reimported_plugin", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        things.append(module.Thing)
    assert things[0] is not things[1]
    reg.register("thing")(things[0])
    reg.register("thing")(things[1])
    assert reg.get("thing").obj is things[1] and reg.get("thing").replaced is None
    # Values (metrics are instances) count as the same when equal, not merely of one class.
    reg.register("value")(Metric("value", ("a",), True, "d"))
    reg.register("value")(Metric("value", ("a",), True, "d"))
    with pytest.raises(DuplicateNameError):
        reg.register("value")(Metric("value", ("b",), True, "d"))


def test_override_replaces_and_records_what_it_replaced():
    reg = _fresh()
    reg.register("x")(first_factory)
    reg.register("x", override=True)(second_factory)
    entry = reg.get("x")
    assert entry.obj is second_factory and entry.replaced == f"{__name__}:first_factory"
    assert entry.origin == f"{__name__}:second_factory"


def test_include_with_override_replaces_a_builtin_and_only_while_the_file_runs(tmp_path, methods_restored):
    plugin = tmp_path / "my_fedavg.py"
    plugin.write_text(
        "from fedbench.core.registry import register_method\n"
        "@register_method('fedavg', description='a patched FedAvg')\nclass PatchedFedAvg:\n    pass\n"
    )
    include(plugin, override=True)
    entry = METHODS.get("fedavg")
    assert entry.obj.__name__ == "PatchedFedAvg" and entry.description == "a patched FedAvg"
    assert entry.replaced == "fedbench.baselines.fedavg:FedAvg"
    assert str(plugin) in entry.origin
    with pytest.raises(DuplicateNameError):  # the permission ended with the file
        register_method("fedavg")(second_factory)


# --------------------------------------------------------------------------- installed entry points


def test_a_broken_entry_point_warns_and_the_builtins_still_work(method_entry_points):
    method_entry_points(EntryPoint(name="broken", value="no_such_module_xyz:thing", group="fedbench.methods"))
    with pytest.warns(PluginWarning) as caught:
        names = METHODS.names()
    msg = str(caught[0].message)
    assert "'broken'" in msg and "no_such_module_xyz:thing" in msg and "ModuleNotFoundError" in msg
    assert {"fedavg", "fedprox", "local", "zero-shot"} <= set(names) and "broken" not in names
    assert METHODS.get("fedavg").obj is FedAvg
    assert "mnist-dirichlet" in TASKS.names()


def test_an_entry_point_colliding_with_a_builtin_warns_and_keeps_the_builtin(method_entry_points):
    method_entry_points(EntryPoint(name="fedavg", value="fedbench.baselines.fedprox:FedProx", group="fedbench.methods"))
    with pytest.warns(PluginWarning) as caught:
        entry = METHODS.get("fedavg")
    msg = str(caught[0].message)
    assert "'fedavg'" in msg and "fedbench.baselines.fedprox:FedProx" in msg
    assert "fedbench.baselines.fedavg:FedAvg" in msg
    assert entry.obj is FedAvg and entry.replaced is None


def test_an_entry_point_naming_the_builtin_itself_is_silent(method_entry_points):
    method_entry_points(EntryPoint(name="fedavg", value="fedbench.baselines.fedavg:FedAvg", group="fedbench.methods"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        assert METHODS.get("fedavg").obj is FedAvg


def test_an_entry_point_module_that_collides_while_importing_loads_nothing(
    method_entry_points, tmp_path, monkeypatch
):
    (tmp_path / "fedbench_test_ep_plugin.py").write_text(
        "from fedbench.core.registry import register_method\n"
        "@register_method('ep-extra')\nclass Extra:\n    pass\n"
        "@register_method('fedprox')\nclass NotFedProx:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    method_entry_points(EntryPoint(name="ep-extra", value="fedbench_test_ep_plugin:Extra", group="fedbench.methods"))
    with pytest.warns(PluginWarning, match="'fedprox' is already registered by fedbench.baselines.fedprox:FedProx"):
        names = METHODS.names()
    assert "ep-extra" not in names and METHODS.get("fedprox").obj is FedProx


def test_entry_point_groups_are_the_documented_ones():
    from pathlib import Path

    from fedbench.core.registry import BACKBONES, METHODS, METRICS, TASKS

    groups = [r.entry_point_group for r in (METHODS, TASKS, BACKBONES, METRICS)]
    assert groups == ["fedbench.methods", "fedbench.tasks", "fedbench.backbones", "fedbench.metrics"]
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert all(f"`{g}`" in readme for g in groups[:3])  # a plugin author's contract
