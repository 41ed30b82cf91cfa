"""modality-broadcast (FedAlign adaptation): what travels, how the server mixes LoRAs, the text
fine-tuning, the orthogonality term, the activation cache, bad options, and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedbench.baselines.modality_broadcast import (
    UPLOAD_EXTRAS,
    ModalityBroadcast,
    ModalityBroadcastHparams,
    orthogonality,
    query_weights,
)
from fedbench.core.registry import TASKS
from fedbench.errors import SpecError
from fedbench.federation.channel import Channel
from fedbench.federation.engine import build_sides, run_federation
from fedbench.federation.method import RunContext
from fedbench.harness.run import execute, resolve_spec


@pytest.fixture(scope="module")
def digits():
    from fedbench.models.backbones import create_backbone

    return create_backbone("digits-clip")


@pytest.fixture(scope="module")
def world(digits):
    """rotated-mnist with 200 images per domain (5 clients, 120 train and 40 test images each, 75 held out)."""
    task = TASKS.get("rotated-mnist").obj
    dataset = task().load(task.Options(samples_per_domain=200), 0)
    text = digits.encode_text(dataset.prompts())
    return dataset, text


def context(digits, world, seed: int = 0) -> RunContext:
    dataset, text = world
    return RunContext(num_classes=dataset.num_classes, class_names=list(dataset.class_names),
                      prompts=dataset.prompts(), num_clients=len(dataset.clients), input_kind="pixels",
                      input_shape=tuple(dataset.images.shape[1:]), backbone=digits, text_features=text, seed=seed)


def federate(digits, world, rounds: int = 2, spy: list | None = None, monkeypatch=None, **options):
    hp = ModalityBroadcastHparams(**options)
    if spy is not None:
        up = Channel.up

        def recording(self, message, device):
            spy.append(message)
            return up(self, message, device)

        monkeypatch.setattr(Channel, "up", recording)
    dataset = world[0]
    return run_federation(ModalityBroadcast, hp, context(digits, world), dataset, dataset.images, rounds=rounds,
                          sample=1.0)


def metrics(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("server",)} for r in out.rounds]


# --- options and backbones: refused before any data is read ------------------------------------------


@pytest.mark.parametrize("sets, message", [
    ({"lora_rank": "0"}, "rank"),
    ({"personal_layers": "3"}, "personal_layers"),
    ({"orth_weight": "nan"}, "orth_weight"),
    ({"query_temperature": "0"}, "query_temperature"),
    ({"lr": "inf"}, "lr"),
])
def test_bad_options_are_spec_errors(sets, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec("modality-broadcast", "rotated-mnist", backbone="digits-clip", sets=sets)


def test_split_outside_the_model_fails_before_the_data_is_read(monkeypatch, tmp_path):
    task = TASKS.get("rotated-mnist").obj

    def no_data(self, options, seed):
        raise AssertionError("the data was read before the options were checked")

    monkeypatch.setattr(task, "load", no_data)
    spec = resolve_spec("modality-broadcast", "rotated-mnist", backbone="digits-clip", sets={"lora_layers": "5"},
                        rounds=1)
    with pytest.raises(SpecError, match=r"lora_layers=5: the image tower of digits-clip has 4 stages"):
        execute(spec, None, cache_dir=tmp_path)
    spec = resolve_spec("modality-broadcast", "rotated-mnist", backbone="digits-clip",
                        sets={"text_lora_layers": "3"}, rounds=1)
    with pytest.raises(SpecError, match="text_lora_layers=3"):
        execute(spec, None, cache_dir=tmp_path)


def test_a_backbone_with_no_lora_layers_is_refused():
    class PoolOnly:
        name = "pool-only"
        device = torch.device("cpu")
        image_model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())

        def encode_image_trainable(self, pixels):
            return self.image_model(pixels)

    with pytest.raises(SpecError, match="no linear, attention or convolution layer for LoRA"):
        ModalityBroadcast.check_backbone(ModalityBroadcastHparams(lora_layers=1, text_steps=0), PoolOnly())


def test_cli_bad_option_exits_2_without_traceback(capsys):
    from fedbench.cli.main import main

    code = main(["run", "modality-broadcast", "rotated-mnist", "--set", "lora_rank=0"])
    err = capsys.readouterr().err
    assert code == 2 and "lora_rank=0" in err and "Traceback" not in err


# --- the parts -------------------------------------------------------------------------------------


def test_query_weights_follow_prototype_similarity():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 8, generator=g)
    protos = torch.stack([base, base + 0.01 * torch.randn(3, 8, generator=g), -base])
    counts = torch.ones(3, 3)
    alpha = query_weights(protos, counts, temperature=0.1)
    assert torch.allclose(alpha.sum(1), torch.ones(3))
    assert torch.all(alpha.diagonal() == 0)  # the keys are the *other* clients
    assert alpha[0, 1] > 0.99 and alpha[1, 0] > 0.99  # the look-alike wins
    assert alpha[2, 0] == pytest.approx(alpha[2, 1], abs=1e-3)  # equally far from both
    # A higher temperature is flatter.
    assert query_weights(protos, counts, temperature=10.0)[0, 1] < alpha[0, 1]
    # Only shared classes count; a client sharing no class with anyone keeps its own LoRA.
    lonely = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    alpha = query_weights(protos, lonely, temperature=0.1)
    assert alpha[2].tolist() == [0.0, 0.0, 1.0]


def test_orthogonality_is_zero_for_orthonormal_rank_directions():
    layer = nn.Linear(6, 6)
    lora = nn.Module()
    lora.lora_A = nn.Parameter(torch.eye(4, 6) * 3.0)  # orthogonal rows of any length
    assert orthogonality(lora).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        lora.lora_A[1] = lora.lora_A[0]  # two equal rank directions
    assert orthogonality(lora).item() == pytest.approx(2.0, abs=1e-5)
    assert orthogonality(layer).item() == 0.0  # no LoRA, no term


# --- a federation ----------------------------------------------------------------------------------


def test_uploads_are_lora_prototypes_and_features_never_images(digits, world, monkeypatch):
    spy: list = []
    federate(digits, world, rounds=1, spy=spy, monkeypatch=monkeypatch)
    dataset = world[0]
    server, _ = build_sides(ModalityBroadcast, ModalityBroadcastHparams(), context(digits, world))
    allowed = set(server.lora) | set(UPLOAD_EXTRAS)
    pixels = dataset.images.float().flatten(1) / 255
    assert len(spy) == len(dataset.clients)
    for message in spy:
        assert set(message.payload) <= allowed and set(UPLOAD_EXTRAS) <= set(message.payload)
        feats = message.payload["synth_features"]
        assert feats.shape[1] == digits.embed_dim and torch.allclose(feats.norm(dim=1), torch.ones(len(feats)))
        for tensor in message.payload.values():
            assert tensor.dtype != torch.uint8
            assert pixels.shape[1] not in tensor.shape  # no flattened 28x28 image
        labels = message.payload["synth_labels"]
        assert len(labels) <= 16 * dataset.num_classes
        assert torch.bincount(labels, minlength=dataset.num_classes).max() <= 16
        # The synthesized set holds only features the client classified correctly against the text
        # it was sent (round 1: the frozen text tower's, the text LoRA starts at zero).
        text = torch.nn.functional.normalize(world[1], dim=-1)
        assert torch.equal((feats @ text.T).argmax(1), labels)
        assert message.payload["class_counts"].sum().item() == message.num_samples
        protos = message.payload["prototypes"]
        assert torch.all(protos.norm(dim=1) <= 1 + 1e-5)  # means of unit vectors


def test_it_learns_beyond_zero_shot(digits, world):
    out = federate(digits, world, rounds=3, local_epochs=3, lr=0.005)
    first, last = out.rounds[0], out.rounds[-1]
    # Zero-shot on the same clients' test splits (the text features, no LoRA).
    dataset, text = world
    feats = torch.nn.functional.normalize(digits.encode_image(dataset.images), dim=-1)
    zero = (feats @ torch.nn.functional.normalize(text, dim=-1).T).argmax(1) == dataset.labels
    zero_client = sum(zero[c.test].float().mean().item() for c in dataset.clients) / len(dataset.clients)
    zero_heldout = zero[dataset.heldout["75"]].float().mean().item()
    assert last["client_acc_mean"] > zero_client + 0.03
    assert last["heldout_acc_mean"] > zero_heldout + 0.03
    assert last["train_loss"] < first["train_loss"]
    assert last["server"]["synth_samples"] > 0 and last["server"]["text_lora_params"] > 0


def test_activation_cache_gives_the_numbers_of_the_full_forward(digits, world):
    cached = federate(digits, world, rounds=2)
    full = federate(digits, world, rounds=2, cache_activations=False)
    for a, b in zip(metrics(cached), metrics(full), strict=True):
        for key in ("global_acc", "client_acc_mean", "heldout_acc_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["up_bytes"] == b["up_bytes"]


def test_same_seed_same_numbers(digits, world):
    assert metrics(federate(digits, world)) == metrics(federate(digits, world))


def _server_after_one_round(digits, world, **options):
    hp = ModalityBroadcastHparams(**options)
    dataset = world[0]
    out, states = {}, {}
    method = ModalityBroadcast
    original = method.aggregate

    def keep(self, state, uploads, server):
        new = original(self, state, uploads, server)
        states["state"], states["self"] = new, self
        return new

    try:
        method.aggregate = keep
        out = run_federation(method, hp, context(digits, world), dataset, dataset.images, rounds=1, sample=1.0)
    finally:
        method.aggregate = original
    return states["self"], states["state"], out


def test_low_layers_are_shared_and_high_layers_personal(digits, world):
    from fedbench.federation.method import ServerContext

    at = ServerContext(2, torch.Generator(), torch.device("cpu"))
    server, state, _ = _server_after_one_round(digits, world)
    messages = [server.configure(state, c, at) for c in range(5)]
    low = [n for n in server.lora if n not in server.personal]
    assert low and server.personal
    for m in messages[1:]:
        assert all(torch.equal(m[n], messages[0][n]) for n in low)
        assert torch.equal(m["text"], messages[0]["text"])
    assert any(not torch.equal(messages[1][n], messages[0][n]) for n in server.personal)

    # With plain averaging every client gets the same high layers too.
    server, state, _ = _server_after_one_round(digits, world, aggregation="average")
    messages = [server.configure(state, c, at) for c in range(5)]
    assert all(torch.equal(m[n], messages[0][n]) for m in messages for n in server.personal)
    # With the split at the top nothing is personal.
    server, state, _ = _server_after_one_round(digits, world, personal_layers=0)
    assert server.personal == []


def test_server_text_fine_tuning_moves_the_text_features(digits, world):
    tuned = federate(digits, world, rounds=2)
    frozen = federate(digits, world, rounds=2, text_steps=0)
    assert "server" not in frozen.rounds[-1]
    assert tuned.rounds[-1]["server"]["text_loss"] is not None
    # Without text fine-tuning no synthesized set travels: fewer bytes up.
    assert frozen.rounds[-1]["up_bytes"] < tuned.rounds[-1]["up_bytes"]
    server, state, _ = _server_after_one_round(digits, world)
    zero_shot = torch.nn.functional.normalize(world[1], dim=-1)
    assert not torch.allclose(state.private["T"], zero_shot, atol=1e-4)
    server, state, _ = _server_after_one_round(digits, world, text_steps=0)
    assert torch.allclose(state.private["T"], zero_shot, atol=1e-6)


def test_orthogonality_weight_shapes_the_trained_lora(digits, world):
    _, loose, _ = _server_after_one_round(digits, world, orth_weight=0.0, local_epochs=3)
    _, tight, _ = _server_after_one_round(digits, world, orth_weight=10.0, local_epochs=3)

    def penalty(state):
        holder = nn.Module()
        for i, (name, t) in enumerate(state.private["global"].items()):
            if "lora_A" in name:
                holder.register_parameter(f"lora_A_{i}", nn.Parameter(t.clone()))
        return orthogonality(holder).item()

    assert penalty(tight) < 0.5 * penalty(loose)



def test_aggregate_weights_low_layers_by_samples_and_high_layers_by_query(digits, world):
    from fedbench.federation.method import Message, ServerContext

    server, _ = build_sides(ModalityBroadcast, ModalityBroadcastHparams(text_steps=0), context(digits, world))
    at = ServerContext(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    state = server.init(at)
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(3, 10, digits.embed_dim, generator=g)
    uploads = []
    for k, n in enumerate((10, 30, 60)):
        payload = {name: torch.randn(t.shape, generator=g) for name, t in state.private["global"].items()}
        payload.update(prototypes=protos[k], class_counts=torch.ones(10))
        uploads.append(Message(payload, k, 1, n))
    new = server.aggregate(state, uploads, at)
    low = [n for n in server.lora if n not in server.personal]
    for name in low:
        want = (10 * uploads[0].payload[name] + 30 * uploads[1].payload[name] + 60 * uploads[2].payload[name]) / 100
        torch.testing.assert_close(new.private["global"][name], want)
    alpha = query_weights(protos, torch.ones(3, 10), 0.1)
    for k in range(3):
        for name in server.personal:
            want = sum(alpha[k, j] * uploads[j].payload[name] for j in range(3))
            torch.testing.assert_close(new.private["personal"][k][name], want)


def test_runs_on_an_open_clip_vit_with_text_lora_on_its_top_block(blobs_task):
    """tiny-clip (a random-init open_clip ViT): LoRA in the top image blocks, the text tower cut
    into blocks on the server; one round runs end to end and sends what it should."""
    spec = resolve_spec("modality-broadcast", blobs_task, backbone="tiny-clip", rounds=1,
                        sets={"lora_layers": "3", "personal_layers": "2", "text_lora_layers": "2"})
    record = execute(spec, None)
    last = record["metrics"]["rounds"][-1]
    assert 0 <= last["global_acc"] <= 1 and last["client_acc_mean"] is not None
    # Its head stage (ln_post and a projection matrix) holds no LoRA layer: personalising only it is refused.
    bad = resolve_spec("modality-broadcast", blobs_task, backbone="tiny-clip", rounds=1, sets={"personal_layers": "1"})
    with pytest.raises(SpecError, match=r"personal_layers=1: the top stages of tiny-clip \(head\) hold no LoRA"):
        execute(bad, None)
    assert last["server"]["text_lora_params"] > 0 and last["server"]["synth_samples"] >= 0
    assert record["metrics"]["final"]["trainable_params"] > 0


def test_no_synthesized_set_leaves_the_text_alone(digits, world):
    """synth_per_class=0: nothing to fine-tune the text on; the round runs and T stays put."""
    out = federate(digits, world, rounds=1, synth_per_class=0)
    assert out.rounds[-1]["server"]["synth_samples"] == 0 and out.rounds[-1]["server"]["text_loss"] is None
