"""FedMMKT (adaptation): bad inputs refused before data, no client image (or feature) leaves a
client, the server's FedDF distillation and agreement weights, the generator fine-tuned only when
asked, its metrics and image grids in the record, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from fedbench.baselines.fedmmkt import FedMMKT, FedMMKTHparams, agreement_weights  # noqa: E402
from fedbench.core.registry import TASKS  # noqa: E402
from fedbench.errors import SpecError  # noqa: E402
from fedbench.federation.channel import Channel  # noqa: E402
from fedbench.harness.run import execute, resolve_spec  # noqa: E402
from fedbench.models.digits_t2i import NAME  # noqa: E402
from fedbench.models.pretrained import prepare  # noqa: E402

TINY = {"samples_per_domain": "60", "synth_per_class": "1", "sampling_steps": "2", "eval_per_class": "1",
        "generator_steps": "1", "local_epochs": "1", "distill_steps": "3"}


@pytest.fixture(scope="module")
def quick_generator(tmp_path_factory):
    """A digits-t2i folder trained for 3 steps: the real architecture and loading code, seconds to build."""
    return str(prepare(NAME, tmp_path_factory.mktemp("t2i") / NAME, seed=0, quick=True, progress=False))


def run(tmp_path, quick_generator, rounds=2, results=True, **sets):
    spec = resolve_spec("fedmmkt", "rotated-mnist", backbone="digits-clip", rounds=rounds,
                        sets={**TINY, "generator": quick_generator, **sets})
    return execute(spec, tmp_path / "results" if results else None, cache_dir=tmp_path / "cache")


# --- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sets, message", [
    ({"synth_per_class": "0"}, "synthetic set"),
    ({"prompt_template": "a photo of a digit"}, "one '{}'"),
    ({"prompt_template": "{} and {}"}, "one '{}'"),
    ({"sampling_steps": "0"}, "sampling_steps"),
    ({"generator_lr": "nan"}, "generator_lr"),
])
def test_bad_options_are_spec_errors(sets, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec("fedmmkt", "rotated-mnist", backbone="digits-clip", sets=sets)


def test_a_folder_that_is_not_a_diffusers_pipeline_fails_before_data(tmp_path, monkeypatch):
    (tmp_path / "gen" / "unet").mkdir(parents=True)
    (tmp_path / "gen" / "unet" / "weights.bin").write_bytes(b"not a model")
    task = TASKS.get("rotated-mnist").obj
    monkeypatch.setattr(task, "load", lambda *a, **k: pytest.fail("data was read"))
    spec = resolve_spec("fedmmkt", "rotated-mnist", backbone="digits-clip", sets={"generator": str(tmp_path / "gen")})
    with pytest.raises(SpecError, match="not a diffusers text-to-image folder.*unet/config.json"):
        execute(spec, None)


def test_a_latent_diffusion_pipeline_is_refused_by_name(tmp_path):
    from fedbench.baselines.fedmmkt import check_generator_folder

    for part in ("unet/config.json", "scheduler/scheduler_config.json", "vae/config.json"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("{}")
    with pytest.raises(SpecError, match="latent-diffusion pipeline"):
        check_generator_folder(str(tmp_path))


# --- the server's arithmetic ------------------------------------------------------------------------------


def test_agreement_weights_are_the_ensembles_probability_of_the_prompts_class():
    ensemble = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    expected = torch.stack([F.softmax(ensemble[i], 0)[y[i]] for i in range(3)])
    assert torch.allclose(agreement_weights(ensemble, y, "weighted"), expected)
    assert torch.equal(agreement_weights(ensemble, y, "unweighted"), torch.ones(3))


# --- end to end with the tiny generator --------------------------------------------------------------------


@pytest.fixture(scope="module")
def spied(tmp_path_factory, quick_generator):
    """One short run with every message recorded."""
    tmp = tmp_path_factory.mktemp("fedmmkt")
    sent = {"up": [], "down": []}
    up, down = Channel.up, Channel.down
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Channel, "up", lambda self, m, d: (sent["up"].append(m), up(self, m, d))[1])
        mp.setattr(Channel, "down", lambda self, m, d: (sent["down"].append(m), down(self, m, d))[1])
        record = run(tmp, quick_generator)
    return record, sent, tmp


def test_no_client_image_or_feature_leaves_a_client(spied):
    record, sent, _ = spied
    head_keys = {"linear.weight", "linear.bias"}
    for m in sent["up"]:
        assert set(m.payload) == head_keys | {"synth_logits"}
        assert m.payload["synth_logits"].shape == (10, 10)  # one row per synthetic sample, not per own sample
        assert all(v.dtype != torch.uint8 for v in m.payload.values())
    for m in sent["down"]:  # the synthetic set travels as features of generated images, with labels
        assert m.payload["synth_x"].shape == (10, 128) and m.payload["synth_y"].tolist() == list(range(10))


def test_the_record_has_generator_metrics_stage_times_and_grids(spied):
    record, _, tmp = spied
    for r in record["metrics"]["rounds"]:
        assert set(r["server"]) == {"generated_acc", "generated_clip_score", "synth_agreement"}
        assert 0 <= r["server"]["generated_acc"] <= 1 and -1 <= r["server"]["generated_clip_score"] <= 1
    stages = record["timing"]["server_stages"]
    assert set(stages) == {"generation", "distillation", "generator_finetune", "generator_metrics"}
    assert all(len(v) == 2 for v in stages.values())
    folder = tmp / "results" / "rotated-mnist" / "fedmmkt"
    assert set(record["images"]) == {"generated_first_round", "generated_last_round"}
    from PIL import Image

    for name in record["images"].values():
        image = Image.open(folder / name)
        assert image.mode == "L" and image.size[0] >= 28


def test_fine_tuning_moves_the_generator_only_when_asked(tmp_path, quick_generator):
    def scores(**sets):
        spec = resolve_spec("fedmmkt", "rotated-mnist", backbone="digits-clip", rounds=3,
                            sets={**TINY, "generator": quick_generator, **sets})
        rounds = execute(spec, None, cache_dir=tmp_path)["metrics"]["rounds"]
        return [r["server"]["generated_clip_score"] for r in rounds]

    # Same generator, same noise: the same images every round; fine-tuned: they change.
    assert len(set(scores(finetune="none"))) == 1
    assert len(set(scores(generator_steps="3", generator_lr="0.01"))) == 3


def test_lora_trains_only_the_adapters(quick_generator):
    task = TASKS.get("rotated-mnist").obj
    dataset = task().load(task.Options(samples_per_domain=30), 0)
    from fedbench.federation.method import RunContext
    from fedbench.models.backbones import create_backbone

    digits = create_backbone("digits-clip")
    ctx = RunContext(num_classes=10, class_names=list(dataset.class_names), prompts=dataset.prompts(),
                     num_clients=len(dataset.clients), input_kind="features", input_shape=(128,), backbone=digits,
                     text_features=digits.encode_text(dataset.prompts()))
    method = FedMMKT(FedMMKTHparams(generator=quick_generator), ctx)
    gen = method.load_generator()
    trained = [n for n, p in gen["unet"].named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    full = FedMMKT(FedMMKTHparams(generator=quick_generator, generator_trainable="full"), ctx).load_generator()
    assert all(p.requires_grad for p in full["unet"].parameters())
    none = FedMMKT(FedMMKTHparams(generator=quick_generator, finetune="none"), ctx).load_generator()
    assert none["optimizer"] is None


def test_deterministic(tmp_path, quick_generator, spied):
    again = run(tmp_path, quick_generator, results=False)
    for a, b in zip(again["metrics"]["rounds"], spied[0]["metrics"]["rounds"], strict=True):
        assert {k: v for k, v in a.items() if a[k] != b.get(k)} == {}


# --- the pieces, exactly ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(quick_generator):
    """A client-side FedMMKT and FedAvg-head on one rotated-mnist world (features from digits-clip)."""
    from fedbench.federation.method import RunContext
    from fedbench.models.backbones import create_backbone

    task = TASKS.get("rotated-mnist").obj
    dataset = task().load(task.Options(samples_per_domain=60), 0)
    digits = create_backbone("digits-clip")
    features = digits.encode_image(dataset.images)
    ctx = RunContext(num_classes=10, class_names=list(dataset.class_names), prompts=dataset.prompts(),
                     num_clients=len(dataset.clients), input_kind="features", input_shape=(128,), backbone=digits,
                     text_features=digits.encode_text(dataset.prompts()))
    return ctx, dataset.client_data(features), features


def test_weighted_denoising_loss_weights_each_sample(quick_generator):
    from diffusers import DDPMScheduler

    from fedbench.baselines.fedmmkt import weighted_denoising_loss
    from fedbench.models.digits_t2i import load_digits_t2i

    unet, scheduler, encode = load_digits_t2i(quick_generator)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(3, 1, 28, 28)
    context, t = encode(["one", "two", "three"]), torch.tensor([10, 500, 900])
    with torch.no_grad():
        each = [weighted_denoising_loss(unet, noise_scheduler, x0[i : i + 1], context[i : i + 1], torch.ones(1),
                                        t[i : i + 1], noise[i : i + 1]) for i in range(3)]
        a = alphas[t[1]]
        eps = unet(a.sqrt() * x0[1:2] + (1 - a).sqrt() * noise[1:2], t[1:2], encoder_hidden_states=context[1:2]).sample
        assert torch.allclose(each[1], ((eps - noise[1:2]) ** 2).mean(), rtol=1e-5)
        w = torch.tensor([0.2, 0.0, 0.6])
        weighted = weighted_denoising_loss(unet, noise_scheduler, x0, context, w, t, noise)
    assert torch.allclose(weighted, (0.2 * each[0] + 0.6 * each[2]) / 0.8, rtol=1e-4)


def test_feddf_distillation_moves_the_head_toward_the_ensemble(small, quick_generator):
    ctx, _, features = small
    method = FedMMKT(FedMMKTHparams(generator=quick_generator, distill_steps=30, distill_lr=0.01), ctx)
    start = {k: v.clone() for k, v in method.head.state_dict().items()}
    x = features[:40]
    ensemble = torch.randn(40, 10) * 3

    def kl(state):
        method.head.load_state_dict(state)
        with torch.no_grad():
            return F.kl_div(F.log_softmax(method.head(x), 1), F.softmax(ensemble, 1), reduction="batchmean")

    before = kl(start)
    after = kl(method.distill({k: v.clone() for k, v in start.items()}, x, ensemble))
    assert after < 0.7 * before
    none = FedMMKT(FedMMKTHparams(generator=quick_generator, distill_steps=0), ctx)
    assert all(torch.equal(none.distill(start, x, ensemble)[k], start[k]) for k in start)


def test_the_client_adds_the_synthetic_term_to_fedavg_heads_update(small, quick_generator):
    from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
    from fedbench.federation.method import ClientContext, Message

    ctx, clients, features = small
    synth = {"synth_x": features[-10:], "synth_y": torch.arange(10)}

    def update(method, payload):
        client = ClientContext(0, 1, torch.Generator().manual_seed(5), torch.device("cpu"), 0)
        return method.client_update(Message(payload, 0, 1), clients[0], None, client).upload

    torch.manual_seed(1)
    fedavg = FedAvg(FedAvgHparams(trainable="head"), ctx)
    start = {k: v.clone() for k, v in fedavg.model.state_dict().items()}
    plain = update(fedavg, dict(start))
    for weight, same in ((0.0, True), (1.0, False)):
        mmkt = FedMMKT(FedMMKTHparams(generator=quick_generator, synth_weight=weight), ctx)
        up = update(mmkt, {**start, **synth})
        assert up["synth_logits"].shape == (10, 10)
        assert all(torch.equal(up[k], plain[k]) for k in plain) == same


def test_the_server_averages_by_sample_count(small, quick_generator):
    from fedbench.federation.method import Message, ServerContext, ServerState

    ctx, _, features = small
    method = FedMMKT(FedMMKTHparams(generator=quick_generator, distill_steps=0, finetune="none"), ctx)
    keys = [k for k, _ in method.head.named_parameters()]
    uploads = [Message({**{k: torch.full_like(v, float(i)) for k, v in method.head.named_parameters()},
                        "synth_logits": torch.zeros(10, 10)}, i, 1, n) for i, n in ((1, 10), (3, 30))]
    synth = {"synth_x": features[:10], "synth_y": torch.arange(10)}
    state = ServerState(synth, {"generator": {}, "synth_images": None})
    out = method.aggregate(state, uploads, ServerContext(1, torch.Generator(), torch.device("cpu")))
    assert all(torch.allclose(out.broadcast[k], torch.full_like(out.broadcast[k], 2.5)) for k in keys)
