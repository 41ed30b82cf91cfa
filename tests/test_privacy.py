"""The privacy boundary of the method interface, and the seams core v2 added: server-private
state, the message envelope, the server's own generator, the cohort hook, personalised and
global scoring in one run, the example plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbench.baselines.fedavg import FedAvg
from fedbench.core.registry import METHODS, include, register_method
from fedbench.errors import PrivacyError
from fedbench.federation import channel as channel_module
from fedbench.federation.method import ServerState
from fedbench.harness.run import execute, resolve_spec

FAST = ["local_epochs=1", "batch_size=32"]
EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "personal_fedavgm.py"


@pytest.fixture
def method_named():
    """Register test methods under fresh names and remove them afterwards."""
    names = []

    def register(name: str):
        names.append(name)
        return register_method(name, description="test method")

    yield register
    for name in names:
        METHODS._entries.pop(name, None)


def run(task: str, method: str, rounds: int = 2, sets=FAST, **kw):
    return execute(resolve_spec(method, task, rounds=rounds, sets=sets, **kw), None)


def test_a_client_cannot_read_what_the_server_kept_on_self(blobs_task, method_named):
    @method_named("leaky-server")
    class LeakyServer(FedAvg):
        def aggregate(self, state, uploads, server):
            # an attribute on the server object: the client side is another object
            self.__dict__["secret"] = 42
            return super().aggregate(state, uploads, server)

        def client_update(self, message, data, client_state, client):
            if client.round > 1:
                assert self.secret == 42  # AttributeError: the client never sees the server's object
            return super().client_update(message, data, client_state, client)

    with pytest.raises(AttributeError, match="secret"):
        run(blobs_task, "leaky-server")


def test_a_client_cannot_keep_one_clients_data_on_self(blobs_task, method_named):
    @method_named("hoarding-client")
    class HoardingClient(FedAvg):
        def client_update(self, message, data, client_state, client):
            self.previous_client_data = data.train  # would reach the next client
            return super().client_update(message, data, client_state, client)

    with pytest.raises(PrivacyError, match="previous_client_data"):
        run(blobs_task, "hoarding-client")


def test_server_private_state_never_crosses_the_channel(blobs_task, method_named, monkeypatch):
    sent_down: list[set[str]] = []
    real_encode = channel_module.encode

    def spy(message, direction):
        if direction == "down":
            sent_down.append(set(message.payload))
        return real_encode(message, direction)

    monkeypatch.setattr(channel_module, "encode", spy)

    @method_named("private-momentum")
    class PrivateMomentum(FedAvg):
        def init(self, server):
            weights = super().init(server).broadcast
            return ServerState(weights, private={"momentum": {k: torch.zeros_like(v) for k, v in weights.items()},
                                                 "marker": torch.ones(3)})

        def aggregate(self, state, uploads, server):
            new = super().aggregate(state, uploads, server)
            return ServerState(new.broadcast, private=state.private)

    record = run(blobs_task, "private-momentum")
    weights = set(FedAvg(FedAvg.Hparams(**resolve_spec("fedavg", blobs_task, sets=FAST).method_options),
                         _ctx()).init(None).broadcast)
    assert sent_down and all(keys == weights for keys in sent_down)
    assert record["comm"]["down_messages"] == len(sent_down)


def _ctx():
    from fedbench.federation.method import RunContext

    return RunContext(num_classes=4, class_names=list("abcd"), prompts=[], num_clients=4, input_kind="pixels",
                      input_shape=(1, 16, 16))


def test_the_server_sees_who_sent_what_in_which_round(blobs_task, method_named):
    seen = []

    @method_named("envelope-spy")
    class EnvelopeSpy(FedAvg):
        def aggregate(self, state, uploads, server):
            seen.extend((server.round, m.round, m.client_id, m.num_samples) for m in uploads)
            return super().aggregate(state, uploads, server)

    run(blobs_task, "envelope-spy", rounds=2, sample=2)
    spec = resolve_spec("envelope-spy", blobs_task, rounds=2, sets=FAST, sample=2)
    from fedbench.core.registry import TASKS

    task = TASKS.get(blobs_task).obj
    sizes = [len(c.train) for c in task().load(task.Options(**spec.task_options), spec.seed).clients]
    assert len(seen) == 4 and [s[0] for s in seen] == [1, 1, 2, 2]
    assert all(server_round == msg_round for server_round, msg_round, _, _ in seen)
    assert all(n == sizes[cid] for _, _, cid, n in seen)  # the envelope survived the wire


def test_the_server_draws_from_its_own_stream_whatever_clients_draw(blobs_task, method_named):
    draws: dict[str, list[float]] = {"quiet": [], "noisy": []}

    def make(name: str, client_draws: int):
        @method_named(f"server-draws-{name}")
        class ServerDraws(FedAvg):
            def aggregate(self, state, uploads, server):
                draws[name].append(torch.rand(1, generator=server.rng).item())
                return super().aggregate(state, uploads, server)

            def client_update(self, message, data, client_state, client):
                torch.rand(client_draws)  # the global RNG, as dropout would draw
                return super().client_update(message, data, client_state, client)

    make("quiet", 0)
    make("noisy", 1000)
    run(blobs_task, "server-draws-quiet", rounds=3)
    run(blobs_task, "server-draws-noisy", rounds=3)
    assert draws["quiet"] == draws["noisy"] and len(set(draws["quiet"])) == 3


def test_the_cohort_hook_gets_every_sampled_client_of_a_round_at_once(blobs_task, method_named):
    cohorts = []

    @method_named("cohort-spy")
    class CohortSpy(FedAvg):
        def client_update_cohort(self, jobs):
            cohorts.append([(j.context.round, j.data.client_id) for j in jobs])
            return super().client_update_cohort(jobs)

    spied = run(blobs_task, "cohort-spy", rounds=2, sample=3)
    plain = run(blobs_task, "fedavg", rounds=2, sample=3)
    assert [[c for _, c in cohort] for cohort in cohorts] == [r["clients"] for r in spied["metrics"]["rounds"]]
    assert all(r == i + 1 for i, cohort in enumerate(cohorts) for r, _ in cohort)
    assert spied["metrics"] == plain["metrics"]  # the default hook is the plain loop


def test_one_run_scores_a_global_model_and_personal_models(blobs_task, method_named):
    @method_named("fine-tuned-personal")
    class FineTunedPersonal(FedAvg):
        """FedAvg whose clients also keep their own fine-tuned weights, scored per client."""

        def client_update(self, message, data, client_state, client):
            result = super().client_update(message, data, client_state, client)
            result.client_state = dict(result.upload)
            return result

        def personal_model(self, client_state, global_model):
            return client_state

    both = run(blobs_task, "fine-tuned-personal", rounds=2)["metrics"]["rounds"][-1]
    plain = run(blobs_task, "fedavg", rounds=2)["metrics"]["rounds"][-1]
    assert both["global_acc"] == plain["global_acc"]  # the same global model
    assert both["client_acc"] != plain["client_acc"]  # but clients scored with their own models


def test_the_example_plugin_runs_from_include_and_uses_its_private_state(blobs_task):
    include(EXAMPLE)
    sets = [*FAST, "lr=0.05"]
    momentum = run(blobs_task, "personal-fedavgm", rounds=3, sets=[*sets, "mix=0"])
    no_momentum = run(blobs_task, "personal-fedavgm", rounds=3, sets=[*sets, "mix=0", "beta=0"])
    fedavg = run(blobs_task, "fedavg", rounds=3, sets=sets)
    # beta=0, mix=0, server_lr=1 is FedAvg exactly; momentum and mixing each change the run
    assert no_momentum["metrics"]["rounds"][-1]["global_loss"] == fedavg["metrics"]["rounds"][-1]["global_loss"]
    assert momentum["metrics"]["rounds"][-1]["global_loss"] != fedavg["metrics"]["rounds"][-1]["global_loss"]
    mixed = run(blobs_task, "personal-fedavgm", rounds=3, sets=[*sets, "beta=0", "mix=0.5"])
    assert mixed["metrics"]["rounds"][-1]["global_loss"] != fedavg["metrics"]["rounds"][-1]["global_loss"]
    assert len(EXAMPLE.read_text().splitlines()) < 60
