"""FedCMI (adaptation) and the two-modality task it is judged on: the glimpse view, the loss term by
term, the server's prototypes and class-wise temperatures, what travels, per-class and per-modality
scores, bad inputs refused before data, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedbench.baselines.fedcmi import STATISTICS, FedCMI, FedCMIHparams
from fedbench.core.registry import TASKS
from fedbench.data.dataset import ClientIndices, FederatedDataset
from fedbench.errors import SpecError
from fedbench.federation.channel import Channel
from fedbench.federation.engine import build_sides, run_federation
from fedbench.federation.evaluate import Evaluator
from fedbench.federation.method import Message, Method, RunContext, ServerContext
from fedbench.harness.run import execute, resolve_spec
from fedbench.tasks.glimpse_mnist import glimpse


@pytest.fixture(scope="module")
def digits():
    from fedbench.models.backbones import create_backbone

    return create_backbone("digits-clip")


@pytest.fixture(scope="module")
def world(digits):
    """rotated-mnist-glimpse, 200 images per domain; features [N, 2, D] as the harness stacks them."""
    task = TASKS.get("rotated-mnist-glimpse").obj
    dataset = task().load(task.Options(samples_per_domain=200), 0)
    features = torch.stack([digits.encode_image(dataset.images), digits.encode_image(dataset.views["glimpse"])], 1)
    return dataset, features, digits.encode_text(dataset.prompts())


def context(digits, world, mode: str = "two-view", seed: int = 0) -> RunContext:
    dataset, features, text = world
    shape = tuple(features.shape[1:]) if mode == "two-view" else (features.shape[-1],)
    return RunContext(num_classes=dataset.num_classes, class_names=list(dataset.class_names),
                      prompts=dataset.prompts(), num_clients=len(dataset.clients), input_kind="features",
                      input_shape=shape, backbone=digits, text_features=text, seed=seed,
                      modalities=dataset.modalities if mode == "two-view" else ("image",))


def federate(digits, world, rounds: int = 3, mode: str = "two-view", **options):
    dataset, features, _ = world
    inputs = features if mode == "two-view" else features[:, 0]
    return run_federation(FedCMI, FedCMIHparams(mode=mode, **options), context(digits, world, mode), dataset,
                          inputs, rounds=rounds, sample=1.0)


# --- the task ----------------------------------------------------------------------------------------


def test_glimpse_is_the_block_average_plus_seeded_noise():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    coarse = glimpse(images, 7, 0.0, np.random.default_rng(0)).double()
    blocks = images.double().reshape(3, 1, 7, 4, 7, 4).mean((3, 5))
    assert torch.equal(coarse, torch.floor(blocks + 0.5).repeat_interleave(4, 2).repeat_interleave(4, 3))
    noisy = glimpse(images, 7, 48.0, np.random.default_rng(1)).double()
    assert 30 < (noisy - coarse).std() < 50  # clipping at 0 and 255 trims the std a little
    assert torch.equal(glimpse(images, 7, 48.0, np.random.default_rng(1)).double(), noisy)


def test_the_task_is_rotated_mnist_plus_a_view():
    plain, two = TASKS.get("rotated-mnist").obj, TASKS.get("rotated-mnist-glimpse").obj
    a = plain().load(plain.Options(samples_per_domain=100), 3)
    b = two().load(two.Options(samples_per_domain=100), 3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(x.train, y.train) and torch.equal(x.test, y.test) for x, y in zip(a.clients, b.clients,
                                                                                             strict=True))
    assert b.modalities == ("image", "glimpse") == two.modalities and a.modalities == ("image",) == plain.modalities
    assert b.views["glimpse"].shape == b.images.shape and b.views["glimpse"].dtype == torch.uint8
    assert a.fingerprint() != b.fingerprint()  # the view is part of the data a record names
    other = two().load(two.Options(samples_per_domain=100, glimpse_noise=10.0), 3)
    assert other.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("sets, message", [({"glimpse_size": "5"}, "divide 28"),
                                           ({"glimpse_noise": "-1"}, "glimpse_noise"),
                                           ({"glimpse_noise": "inf"}, "glimpse_noise")])
def test_bad_glimpse_options(sets, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec("fedcmi", "rotated-mnist-glimpse", backbone="digits-clip", sets=sets)


# --- bad inputs: refused when the spec resolves, before any data ---------------------------------------


@pytest.mark.parametrize("sets, message", [
    ({"tau": "0"}, "tau=0"), ({"tau_min": "-1"}, "tau_min"), ({"tau_max": "inf"}, "tau_max"),
    ({"tau_min": "3", "tau_max": "2"}, "range is empty"), ({"kd_weight": "nan"}, "kd_weight"),
    ({"mu": "-0.1"}, "mu"), ({"lr": "0"}, "lr"),
])
def test_bad_options_are_spec_errors(sets, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec("fedcmi", "rotated-mnist", backbone="digits-clip", sets=sets)


def test_two_view_mode_on_a_one_modality_task_fails_before_data(monkeypatch):
    task = TASKS.get("rotated-mnist").obj
    monkeypatch.setattr(task, "load", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(SpecError, match="two modalities.*rotated-mnist-glimpse"):
        resolve_spec("fedcmi", "rotated-mnist", backbone="digits-clip", sets={"mode": "two-view"})
    resolve_spec("fedcmi", "rotated-mnist-glimpse", backbone="digits-clip", sets={"mode": "two-view"})


def test_a_multi_modal_method_on_pixels_fails_before_data(monkeypatch):
    """The harness stacks modalities as backbone features only: a method asking for every modality as
    pixels is refused from the spec, before the task's data is read."""
    from fedbench.baselines.fedavg import FedAvg
    from fedbench.core.registry import METHODS, register_method

    @register_method("views-on-pixels", description="test only", fidelity="reference", source="test")
    class ViewsOnPixels(FedAvg):
        @classmethod
        def uses_views(cls, hp):
            return True

    task = TASKS.get("rotated-mnist-glimpse").obj
    try:
        spec = resolve_spec("views-on-pixels", "rotated-mnist-glimpse", rounds=1)
        monkeypatch.setattr(task, "load", lambda *a, **k: pytest.fail("data was read"))
        with pytest.raises(SpecError, match="frozen features only"):
            execute(spec, None)
    finally:
        METHODS._entries.pop("views-on-pixels")


def test_cli_exit_2_names_the_fix(tmp_path, capsys):
    from fedbench.cli.main import main

    assert main(["run", "fedcmi", "rotated-mnist", "--set", "tau_min=0", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tau_min" in err and "Traceback" not in err
    assert not any(tmp_path.rglob("*.json"))


# --- the client loss, term by term -------------------------------------------------------------------


def test_loss_terms_match_the_formula(digits, world):
    hp = FedCMIHparams(mode="two-view", kd_weight=0.7, mu=0.3)
    method = FedCMI(hp, context(digits, world))
    torch.manual_seed(0)
    d, w = F.normalize(torch.randn(6, 128), dim=-1), F.normalize(torch.randn(6, 128), dim=-1)
    y, teacher = torch.tensor([0, 1, 2, 2, 5, 9]), torch.randn(6, 10) * 5
    tau = torch.linspace(1.0, 4.0, 10)
    params = dict(method.model.named_parameters())
    anchors = {k: v.detach() + 0.01 * torch.randn_like(v) for k, v in params.items()}
    terms = method.loss_terms(d, w, y, teacher, tau, params, anchors)
    m = method.model
    pd, ps, pi = m.dominant(d), m.self_proj(w), m.infiltration(w)
    assert torch.allclose(terms["fused"], F.cross_entropy(m.classifier(pd + ps + pi), y))
    assert torch.allclose(terms["self"], F.cross_entropy(m.classifier(ps), y))
    kd = []
    for i in range(6):  # sample by sample, each at its own class's temperature
        t = tau[y[i]]
        p, q = F.softmax(teacher[i] / t, 0), F.softmax(m.classifier(pi[i]) / t, 0)
        kd.append(t**2 * (p * (p.log() - q.log())).sum())
    assert torch.allclose(terms["infiltration"], 0.7 * torch.stack(kd).mean(), rtol=1e-5)
    prox = 0.3 / 2 * sum(((params[k] - anchors[k]) ** 2).sum() for k in params)
    assert torch.allclose(terms["proximal"], prox)


def test_ablations_drop_their_term(digits, world):
    no_inf = FedCMI(FedCMIHparams(mode="two-view", infiltration=False, mu=0.0), context(digits, world))
    assert no_inf.model.infiltration is None
    d = w = F.normalize(torch.randn(4, 128), dim=-1)
    params = dict(no_inf.model.named_parameters())
    terms = no_inf.loss_terms(d, w, torch.tensor([0, 1, 2, 3]), torch.zeros(4, 10), torch.ones(10), params, {})
    assert set(terms) == {"fused", "self"}
    text = FedCMI(FedCMIHparams(), context(digits, world, mode="text-image"))
    assert text.model.dominant is None and text.model.infiltration is not None


def test_teacher_uses_the_servers_prototypes_and_fills_unknown_classes_locally(digits, world):
    method = FedCMI(FedCMIHparams(mode="two-view", logit_scale=10.0), context(digits, world))
    d = F.normalize(torch.randn(5, 128), dim=-1)
    y = torch.tensor([0, 0, 1, 2, 2])
    server = F.normalize(torch.randn(10, 128), dim=-1)
    known = torch.tensor([1.0, 0.0] + [1.0] * 8)  # class 1 unknown to the server
    t, sums, counts = method.teacher_logits({"prototypes": server, "prototype_known": known}, d, y)
    expected = server.clone()
    expected[1] = F.normalize(d[2], dim=0)  # the client's own mean of class 1
    assert torch.allclose(t, 10.0 * d @ expected.T, atol=1e-6)
    assert counts.tolist() == [2, 1, 2] + [0] * 7 and torch.allclose(sums[0], d[0] + d[1])
    text = FedCMI(FedCMIHparams(logit_scale=10.0), context(digits, world, mode="text-image"))
    prompts = text.text
    t, _, _ = text.teacher_logits({"prototypes": prompts, "prototype_known": torch.ones(10)}, None, y)
    assert torch.allclose(t, 10.0 * prompts[y] @ prompts.T, atol=1e-6)  # d = the class prompt's embedding


def test_validation_confidence_is_the_true_class_probability(digits, world):
    dataset, features, _ = world
    method = FedCMI(FedCMIHparams(mode="two-view"), context(digits, world))
    client = dataset.client_data(features)[0]
    out = method.val_confidence(client)
    with torch.no_grad():
        p = F.softmax(method.fused_logits(client.val.x), 1)[torch.arange(len(client.val)), client.val.y]
    assert torch.allclose(out["conf_sum"], torch.zeros(10).index_add_(0, client.val.y, p), atol=1e-6)
    assert out["conf_count"].tolist() == torch.bincount(client.val.y, minlength=10).float().tolist()


# --- the server: sample-count average, prototypes, temperatures ---------------------------------------


def upload(method, cid, n, scale, conf_sum, conf_count, proto=None):
    payload = {k: torch.full_like(v, scale) for k, v in method.init(ServerContext(0, torch.Generator(),
                                                                                  torch.device("cpu"))).broadcast.items()
               if k not in ("prototypes", "prototype_known", "tau")}
    payload.update(conf_sum=torch.tensor(conf_sum), conf_count=torch.tensor(conf_count))
    if proto is not None:
        payload.update(proto_sum=proto[0], proto_count=proto[1])
    return Message(payload, cid, 1, n)


def test_server_update(digits, world):
    hp = FedCMIHparams(mode="two-view", tau_min=1.0, tau_max=5.0, tau=2.0)
    server = FedCMI(hp, context(digits, world))
    ctx = ServerContext(1, torch.Generator(), torch.device("cpu"))
    state = server.init(ctx)
    assert not state.broadcast["prototype_known"].any()
    conf_a, count_a = [0.9] * 5 + [0.0] * 5, [1.0] * 5 + [0.0] * 5
    conf_b, count_b = [0.3] * 5 + [0.0] * 5, [1.0] * 4 + [2.0] + [0.0] * 5
    def sums(mean, count):  # per-class sums of d and counts, as a client uploads them
        count = torch.tensor([float(count)] * 3 + [0.0] * 7)
        return mean * count[:, None] * torch.ones(10, 128), count

    proto_a, proto_b = sums(1.0, 1), sums(3.0, 3)  # means 1 and 3 over 1 and 3 samples: pooled (1 + 9) / 4
    state = server.aggregate(state, [upload(server, 0, 10, 1.0, conf_a, count_a, proto_a),
                                     upload(server, 1, 30, 5.0, conf_b, count_b, proto_b)], ctx)
    b = state.broadcast
    assert torch.allclose(b["classifier.weight"], torch.full_like(b["classifier.weight"], (10 * 1 + 30 * 5) / 40))
    expected = [1 + 4 * (1 - 1.2 / 2)] * 4 + [1 + 4 * (1 - 1.2 / 3)] + [2.0] * 5  # unseen classes keep tau
    assert torch.allclose(b["tau"], torch.tensor(expected))
    assert torch.allclose(b["prototypes"][:3], torch.full((3, 128), (1 + 9) / 4)) and not b["prototypes"][3:].any()
    assert b["prototype_known"].tolist() == [1.0] * 3 + [0.0] * 7
    # A client absent from the next round still counts in the prototypes: the server keeps its latest sums.
    proto_c = sums(0.0, 6)
    state = server.aggregate(state, [upload(server, 2, 10, 1.0, conf_a, count_a, proto_c)], ctx)
    assert torch.allclose(state.broadcast["prototypes"][:3], torch.full((3, 128), 10 / 10))
    fixed = FedCMI(FedCMIHparams(mode="two-view", temperature="fixed", tau=2.5), context(digits, world))
    after = fixed.aggregate(fixed.init(ctx), [upload(fixed, 0, 10, 1.0, conf_a, count_a, proto_a)], ctx)
    assert torch.equal(after.broadcast["tau"], torch.full((10,), 2.5))


def test_what_travels(digits, world, monkeypatch):
    sent = []
    up = Channel.up
    monkeypatch.setattr(Channel, "up", lambda self, m, device: (sent.append(m), up(self, m, device))[1])
    federate(digits, world, rounds=1)
    model_keys = {k for k, _ in FedCMI(FedCMIHparams(mode="two-view"), context(digits, world)).model.named_parameters()}
    n = len(world[0].labels)
    for message in sent:
        assert set(message.payload) == model_keys | set(STATISTICS)
        # No per-sample tensor leaves a client: everything is per class or a weight.
        assert all(n not in v.shape for v in message.payload.values())
    text = []
    monkeypatch.setattr(Channel, "up", lambda self, m, device: (text.append(m), up(self, m, device))[1])
    federate(digits, world, rounds=1, mode="text-image")
    assert all("proto_sum" not in m.payload for m in text)  # the text prototypes are the server's own


# --- scores: per class and per modality ---------------------------------------------------------------


class FixedLogits(Method):
    """Predicts the logits stored in its model for each example index (a scripted model for the scorer)."""

    def predict(self, model, x):
        return model["logits"][x.long().squeeze(1)]


def test_class_scores_are_exact():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 0])  # class 0: 2/3, class 1: 1/2, class 2: 3/4
    logits = F.one_hot(predicted, 4).float()  # class 3 has no test example
    idx = torch.arange(9)
    ds = FederatedDataset(images=torch.zeros(9, 1, 1, 1, dtype=torch.uint8), labels=labels,
                          class_names=["a", "b", "c", "d"], clients=[ClientIndices(idx[:0], idx[:0], idx)],
                          global_test=idx)
    out = Evaluator(ds, idx[:, None].float(), FixedLogits(None, None))({"logits": logits}, {})
    acc = [2 / 3, 1 / 2, 3 / 4]
    assert out["class_acc"] == [round(a, 6) for a in acc] + [None]
    assert out["class_acc_worst"] == 0.5
    assert out["class_acc_std"] == round(float(np.std(acc)), 6)
    assert "modality_acc" not in out  # a one-input method has no per-modality score


def test_modality_scores_show_the_weak_modality(digits, world):
    out = federate(digits, world, rounds=4, local_epochs=5)
    last = out.rounds[-1]
    acc = last["modality_acc"]
    assert set(acc) == {"image", "glimpse"} and last["modality_acc_worst"] == min(acc.values())
    assert acc["image"] > acc["glimpse"] > 0.15  # both above chance (0.10), the image far stronger
    assert last["global_acc"] > 0.7


# --- end to end ---------------------------------------------------------------------------------------


def test_it_learns_and_is_deterministic(digits, world):
    a, b = (federate(digits, world, rounds=3, mode="text-image", local_epochs=5) for _ in range(2))
    assert [r["global_acc"] for r in a.rounds] == [r["global_acc"] for r in b.rounds]
    assert [r["server"] for r in a.rounds] == [r["server"] for r in b.rounds]
    assert a.rounds[-1]["global_acc"] > 0.6 and a.rounds[-1]["global_acc"] > a.rounds[0]["global_acc"]
    # The temperatures move with the confidence: below the start for confident classes.
    assert a.rounds[-1]["server"]["tau"] != a.rounds[0]["server"]["tau"]


def test_the_sides_start_equal_and_the_run_records(digits, world, tmp_path):
    server, client = build_sides(FedCMI, FedCMIHparams(mode="two-view"), context(digits, world))
    assert all(torch.equal(p, q) for p, q in zip(server.model.parameters(), client.model.parameters(), strict=True))
    spec = resolve_spec("fedcmi", "rotated-mnist-glimpse", backbone="digits-clip", rounds=2,
                        sets={"mode": "two-view", "samples_per_domain": "100"})
    record = execute(spec, tmp_path, cache_dir=tmp_path / "cache")
    last = record["metrics"]["final"]["last"]
    assert set(last["modality_acc"]) == {"image", "glimpse"} and len(last["class_acc"]) == 10
    assert record["spec"]["task"] == "rotated-mnist-glimpse" and (tmp_path / "rotated-mnist-glimpse").is_dir()
