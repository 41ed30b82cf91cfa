from __future__ import annotations

import pytest

from fedbench.core.registry import METHODS, TASKS, Registry, include
from fedbench.errors import PluginError, UnknownNameError


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
