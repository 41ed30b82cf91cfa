"""CLIP task models for FedAvg-style baselines: head (zero-shot-initialised linear probe), LoRA
and full fine-tuning of a copy of the image tower, on the tiny random-init CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import nn

from fedbench.data.dataset import Split
from fedbench.federation.method import RunContext
from fedbench.federation.train import run_local_epochs, state_of
from fedbench.harness.run import execute, resolve_spec
from fedbench.models.clip import (
    CLIP_LOGIT_SCALE,
    ClipImageClassifier,
    ZeroShotHead,
    add_lora,
    build_clip_model,
    clip_logit_scale,
    lora_targets,
    untrained_lora_tensors,
)

CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tiny():
    from fedbench.models.backbones import create_backbone

    backbone = create_backbone("tiny-clip")
    text = backbone.encode_text([f"a photo of a {c}." for c in CLASSES])
    return backbone, text


def ctx_for(backbone, text, input_kind="pixels", shape=(3, 32, 32)) -> RunContext:
    return RunContext(num_classes=len(CLASSES), class_names=CLASSES, prompts=[], num_clients=1, input_kind=input_kind,
                      input_shape=shape, backbone=backbone, text_features=text)


def pixels(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % len(CLASSES)


def one_sgd_epoch(model, inputs, x, y, lr=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    return run_local_epochs(model, inputs, Split(x, y), opt, 1, len(y), torch.Generator().manual_seed(0))


def tiny_clip_lora_params(rank: int) -> int:
    """2 blocks x rank x (in+out dims of attn's in-projection, its out-projection, c_fc, c_proj);
    width 64, MLP 256."""
    return 2 * rank * ((64 + 3 * 64) + (64 + 64) + (64 + 256) + (256 + 64))


def tower_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ head


def test_head_starts_as_zero_shot_clip_and_trains(tiny):
    backbone, text = tiny
    model, inputs = build_clip_model("head", ctx_for(backbone, text, "features", (text.shape[1],)))
    assert isinstance(inputs, nn.Identity) and isinstance(model, ZeroShotHead)
    feats = backbone.encode_image(pixels(6)[0])
    zero_shot = clip_logit_scale(backbone) * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(model(feats), zero_shot)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == text.numel() + len(CLASSES)
    before = state_of(model)
    one_sgd_epoch(model, inputs, feats, torch.arange(6) % 3)
    assert not torch.equal(state_of(model)["linear.weight"], before["linear.weight"])


def test_head_rejects_pixel_inputs(tiny):
    backbone, text = tiny
    with pytest.raises(Exception, match="cached image features"):
        build_clip_model("head", ctx_for(backbone, text, "pixels"))


def test_logit_scale_is_clips_when_the_backbone_has_one(tiny):
    backbone, _ = tiny
    assert clip_logit_scale(backbone) == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's init value
    assert clip_logit_scale(object()) == CLIP_LOGIT_SCALE


# ------------------------------------------------------------------ LoRA


def test_lora_targets_attention_modules_not_their_out_proj(tiny):
    backbone, _ = tiny
    targets = lora_targets(backbone.image_model)
    assert all(t.endswith(("attn", "mlp.c_fc", "mlp.c_proj")) for t in targets) and len(targets) == 6
    assert not any("out_proj" in t for t in targets)


def test_lora_targets_pointwise_convs_and_linears_of_conv_nets():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1, groups=8),
                        nn.Conv2d(8, 8, 3, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    assert lora_targets(net) == ["1", "6"]


def test_lora_trains_only_lora_and_head_and_every_adapter_moves(tiny):
    backbone, text = tiny
    original = tower_weights(backbone.image_model)
    model, inputs = build_clip_model("lora", ctx_for(backbone, text), rank=2)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k or k.startswith("head.") for k in trainable)
    assert set(state_of(model)) == trainable  # exactly what FedAvg communicates
    frozen_before = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    lora_b = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k}
    assert sum(model.get_parameter(k).numel() for k in trainable if "lora_" in k) == tiny_clip_lora_params(2)

    x, y = pixels(6)
    out_before = model(inputs(x)).detach()
    one_sgd_epoch(model, inputs, x, y)
    # Every LoRA B moved (a target that trains nothing would stay at its zero init)...
    still = [k for k, v in lora_b.items() if torch.equal(model.get_parameter(k).detach(), v)]
    assert not still, f"LoRA tensors that did not train: {still}"
    # ...the output moved, frozen weights did not, and the shared backbone is untouched.
    assert not torch.allclose(model(inputs(x)).detach(), out_before)
    for k, v in frozen_before.items():
        if ".attn.base_layer." in k:  # peft adds and subtracts B A around each forward: ulp-level drift
            torch.testing.assert_close(model.get_parameter(k), v, rtol=0, atol=1e-6)
        else:
            assert torch.equal(model.get_parameter(k), v), k
    assert all(torch.equal(v, original[k]) for k, v in tower_weights(backbone.image_model).items())


def test_a_lora_that_trains_nothing_is_caught(tiny):
    backbone, text = tiny
    import copy

    probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    good = ClipImageClassifier(add_lora(copy.deepcopy(backbone.image_model), 2), ZeroShotHead(text, 10.0))
    assert untrained_lora_tensors(good, probe) == []
    # The pitfall: nn.MultiheadAttention reads out_proj.weight directly, bypassing a LoRA there.
    names = [t + ".out_proj" for t in lora_targets(backbone.image_model) if t.endswith("attn")]
    bad = ClipImageClassifier(add_lora(copy.deepcopy(backbone.image_model), 2, names), ZeroShotHead(text, 10.0))
    dead = untrained_lora_tensors(bad, probe)
    assert len(dead) == len(names) and all("out_proj" in d for d in dead)


# ------------------------------------------------------------------ full


def test_full_trains_a_copy_of_the_whole_tower(tiny):
    backbone, text = tiny
    original = tower_weights(backbone.image_model)
    model, inputs = build_clip_model("full", ctx_for(backbone, text))
    n_tower = sum(p.numel() for p in backbone.image_model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_tower + text.numel() + len(CLASSES)
    x, y = pixels(6)
    one_sgd_epoch(model, inputs, x, y, lr=0.01)
    moved = [k for k, v in model.tower.state_dict().items() if not torch.equal(v, original[k])]
    assert len(moved) > len(original) // 2
    assert all(torch.equal(v, original[k]) for k, v in tower_weights(backbone.image_model).items())


def test_batchnorm_statistics_stay_pretrained_while_training():
    tower = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ClipImageClassifier(tower, ZeroShotHead(torch.randn(3, 4), 10.0))
    before = tower[1].running_mean.clone()
    model.train()
    assert model.training and not tower[1].training
    model(torch.randn(8, 3, 5, 5))
    assert torch.equal(tower[1].running_mean, before)


# ------------------------------------------------------------------ through FedAvg and the engine


@pytest.mark.parametrize("trainable", ["head", "lora"])
def test_fedavg_on_clip_runs_and_sends_only_the_trainable_part(blobs_task, trainable):
    spec = resolve_spec("fedavg", blobs_task, backbone="tiny-clip", rounds=1,
                        sets=[f"trainable={trainable}", "local_epochs=1", "batch_size=64"])
    record = execute(spec, None)
    last = record["metrics"]["final"]["last"]
    assert 0 <= last["global_acc"] <= 1
    from fedbench.baselines.fedavg import FedAvg

    head_params = 64 * 4 + 4  # blobs has 4 classes; tiny-clip embeds in 64 dims
    lora_params = tiny_clip_lora_params(4) if trainable == "lora" else 0  # FedAvg's default lora_rank
    assert record["metrics"]["final"]["trainable_params"] == head_params + lora_params
    per_round = record["comm"]["per_round"][0]
    assert per_round["down_bytes"] > 0 and per_round["up_bytes"] > per_round["down_bytes"]  # + num_samples
    if trainable == "head":  # the head's tensors and the envelope (client id, round 1), nothing else
        head = state_of(ZeroShotHead(torch.randn(4, 64), 1.0))
        assert per_round["down_bytes"] == sum(len(st_save(head, metadata={"client_id": str(k), "round": "1"}))
                                              for k in range(4))
    assert FedAvg.input_kind(FedAvg.Hparams(trainable=trainable)) == ("features" if trainable == "head" else "pixels")


@pytest.mark.slow
def test_lora_on_the_offline_pair_reaches_every_pointwise_layer():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from fedbench.models.backbones import create_backbone

    backbone = create_backbone("offline-pair")
    text = backbone.encode_text([f"a photo of a {c}." for c in CLASSES])
    targets = lora_targets(backbone.image_model)
    assert targets and all(t.rsplit(".", 1)[-1] in ("conv_pw", "conv_pwl", "conv_head", "classifier") for t in targets)
    model, inputs = build_clip_model("lora", ctx_for(backbone, text), rank=4)  # raises if an adapter is dead
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in k or k.startswith("head.") for k in trainable)
    logits = model(inputs(pixels(2)[0]))
    assert logits.shape == (2, len(CLASSES))


def test_fedavg_lora_on_cached_activations_equals_the_full_forward(blobs_task, monkeypatch):
    """The frozen stages below the LoRA run once per run; forcing them to run at every step
    (a cache budget of zero bytes) gives the same numbers."""
    from fedbench.models.clip import FrozenStages

    spec = resolve_spec("fedavg", blobs_task, backbone="tiny-clip", rounds=2,
                        sets=["trainable=lora", "local_epochs=1", "batch_size=64"])
    cached = execute(spec, None)["metrics"]["rounds"]
    calls = []
    run = FrozenStages.forward

    def counting(self, x):
        calls.append(x.dtype)
        return run(self, x)

    monkeypatch.setattr(FrozenStages, "forward", counting)
    monkeypatch.setattr(FrozenStages, "MAX_CACHE_BYTES", 0)
    full = execute(spec, None)["metrics"]["rounds"]
    assert calls.count(torch.uint8) > 10  # pixels went through the frozen stages at every step
    for a, b in zip(cached, full, strict=True):
        assert a["global_acc"] == pytest.approx(b["global_acc"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
