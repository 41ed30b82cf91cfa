"""FedCLIP pinned to its released code: the adapter, the loss, what travels, how the server
averages, the per-round optimiser, and that it learns."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import nn

from fedbench.baselines.fedclip import AttentionAdapter, FedCLIP, FedCLIPHparams, clip_contrastive_loss
from fedbench.core.registry import METHODS, TASKS
from fedbench.data.dataset import ClientData, ClientIndices, FederatedDataset, Split
from fedbench.federation.engine import run_federation
from fedbench.federation.method import ClientContext, Message, RunContext, ServerContext
from fedbench.harness.run import execute, resolve_spec
from fedbench.models.clip import CLIP_LOGIT_SCALE


def make_ctx(text: torch.Tensor, backbone=None) -> RunContext:
    c, d = text.shape
    return RunContext(num_classes=c, class_names=[str(i) for i in range(c)], prompts=[], num_clients=1,
                      input_kind="features", input_shape=(d,), backbone=backbone, text_features=text)


SERVER = ServerContext(0, torch.Generator(), torch.device("cpu"))


def init(method: FedCLIP) -> dict[str, torch.Tensor]:
    return method.init(SERVER).broadcast


def train(method: FedCLIP, weights: dict[str, torch.Tensor], data: ClientData, seed: int):
    """One client update from ``weights`` with a data-order generator seeded ``seed``."""
    at = ClientContext(0, 1, torch.Generator().manual_seed(seed), torch.device("cpu"), 0)
    return method.client_update(Message(weights, 0, 1), data, None, at)


def average(method: FedCLIP, weights: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]]):
    from fedbench.federation.method import ServerState

    messages = [Message(u, k, 1, 1) for k, u in enumerate(uploads)]
    return method.aggregate(ServerState(weights), messages, SERVER).broadcast


def small_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text features of 3 classes, 70 features of dim 8, their labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 8, generator=g), torch.randn(70, 8, generator=g), torch.randint(0, 3, (70,), generator=g)


def client(x: torch.Tensor, y: torch.Tensor) -> ClientData:
    empty = Split(x[:0], y[:0])
    return ClientData(client_id=0, train=Split(x, y), val=empty, test=empty)


def synthetic_task(seed: int = 0, clients: int = 4, per_client: int = 200, num_classes: int = 4, dim: int = 16):
    """Features = class text vector + a large offset on four coordinates + noise.

    The offset swamps the cosine, so zero-shot is near chance; an adapter that learns to gate the
    offset coordinates away recovers the classes. Returns (dataset, features, text features).
    """
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(num_classes, dim, generator=g)
    n = clients * per_client
    y = torch.randint(0, num_classes, (n,), generator=g)
    offset = torch.zeros(dim)
    offset[:4] = 15.0
    x = text[y] + offset + 0.5 * torch.randn(n, dim, generator=g)
    parts = [torch.arange(k * per_client, (k + 1) * per_client) for k in range(clients)]
    cl = [ClientIndices(p[:120], p[120:160], p[160:]) for p in parts]
    ds = FederatedDataset(images=torch.zeros(n, 1, 1, 1, dtype=torch.uint8), labels=y,
                          class_names=[str(i) for i in range(num_classes)], clients=cl,
                          global_test=torch.cat([c.test for c in cl]))
    return ds, x, text


# ------------------------------------------------------------------ the design, piece by piece


@pytest.mark.parametrize("dim", [8, 64, 512])
def test_adapter_is_linear_tanh_linear_softmax_with_2d2_plus_2d_weights(dim):
    adapter = AttentionAdapter(dim)
    kinds = [type(m) for m in adapter.attn]
    assert kinds == [nn.Linear, nn.Tanh, nn.Linear, nn.Softmax]
    assert adapter.attn[3].dim == 1 and all(adapter.attn[i].bias is not None for i in (0, 2))
    assert sum(p.numel() for p in adapter.parameters()) == 2 * dim * dim + 2 * dim
    method = FedCLIP(FedCLIPHparams(), make_ctx(torch.randn(3, dim)))
    assert method.trainable_parameters() == 2 * dim * dim + 2 * dim


def test_adapter_multiplies_the_softmax_gate_with_the_feature():
    torch.manual_seed(0)
    adapter = AttentionAdapter(6)
    f = torch.randn(5, 6)
    l1, l2 = adapter.attn[0], adapter.attn[2]
    gate = torch.softmax(l2(torch.tanh(l1(f))), dim=1)
    torch.testing.assert_close(adapter(f), gate * f)


def test_contrastive_loss_is_symmetric_clip_loss_with_same_class_negatives():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    logits = 30.0 * img @ txt.T
    t = torch.arange(4)
    expected = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    torch.testing.assert_close(clip_contrastive_loss(img, txt, 30.0), expected)
    # Two samples of one class: identical text rows. Perfectly aligned images still pay a loss,
    # because targets are arange(B) and each counts as the other's negative (released code).
    same = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    assert clip_contrastive_loss(same, same, 100.0).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_defaults_are_the_papers_and_rounds_stay_the_tasks():
    hp = FedCLIPHparams()
    assert (hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay) == (5e-5, 0.9, 0.98, 1e-6, 0.2)
    assert (hp.batch_size, hp.local_epochs) == (32, 1)
    entry = METHODS.get("fedclip")
    assert entry.fidelity == "reproduction" and "2302.13485" in entry.source
    assert FedCLIP.default_rounds is None and FedCLIP.input_kind(hp) == "features"


def test_logit_scale_is_the_backbones_else_100():
    text = torch.randn(3, 4)
    assert FedCLIP(FedCLIPHparams(), make_ctx(text)).logit_scale == CLIP_LOGIT_SCALE

    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.tensor(2.0))

    class Backbone:
        model = Clip()

    assert FedCLIP(FedCLIPHparams(), make_ctx(text, Backbone())).logit_scale == pytest.approx(torch.e**2)
    assert FedCLIP(FedCLIPHparams(logit_scale=7.0), make_ctx(text, Backbone())).logit_scale == 7.0


def test_predict_is_cosine_of_adapted_feature_with_normalised_prompts():
    torch.manual_seed(0)
    text = torch.randn(3, 6) * torch.tensor([[10.0], [0.1], [1.0]])  # unequal norms on purpose
    method = FedCLIP(FedCLIPHparams(), make_ctx(text))
    state = init(method)
    x = torch.randn(7, 6)
    adapted = F.normalize(method.adapter(x), dim=-1)
    expected = CLIP_LOGIT_SCALE * adapted @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(method.predict(state, x), expected.detach())


# ------------------------------------------------------------------ server and optimiser


def test_server_averages_adapters_with_equal_weights_not_sample_counts():
    text = torch.randn(3, 4)
    method = FedCLIP(FedCLIPHparams(lr=1e-2), make_ctx(text))
    state = init(method)
    g = torch.Generator().manual_seed(0)
    small = client(torch.randn(4, 4, generator=g), torch.tensor([0, 1, 2, 0]))
    big = client(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
    a = train(method, state, small, 1)
    b = train(method, state, big, 2)
    assert (a.num_samples, b.num_samples) == (4, 64)
    assert set(a.upload) == set(state)  # the adapter's tensors and nothing else (no sample count)
    new = average(method, state, [a.upload, b.upload])
    for k in state:
        torch.testing.assert_close(new[k], (a.upload[k] + b.upload[k]) / 2)


def _reference_rounds(state, x, y, text, hp, rounds, persistent_adam):
    """Two rounds of FedCLIP on one client written out by hand."""
    adapter = AttentionAdapter(x.shape[1])
    adapter.load_state_dict(state)
    make = lambda: torch.optim.Adam(adapter.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2),  # noqa: E731
                                    eps=hp.eps, weight_decay=hp.weight_decay)
    opt = make()
    t = F.normalize(text, dim=-1)
    for r in range(rounds):
        if not persistent_adam:
            opt = make()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(r))
        for s in range(0, len(y), hp.batch_size):
            idx = order[s : s + hp.batch_size]
            if len(idx) < 2:
                continue
            logits = CLIP_LOGIT_SCALE * F.normalize(adapter(x[idx]), dim=-1) @ t[y[idx]].T
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in adapter.state_dict().items()}


def test_adam_is_recreated_every_round():
    text, x, y = small_problem()
    hp = FedCLIPHparams(lr=1e-2)
    method = FedCLIP(hp, make_ctx(text))
    state = init(method)
    start = {k: v.clone() for k, v in state.items()}
    for r in range(2):
        up = train(method, state, client(x, y), r)
        state = average(method, state, [up.upload])
    fresh = _reference_rounds(start, x, y, text, hp, 2, persistent_adam=False)
    carried = _reference_rounds(start, x, y, text, hp, 2, persistent_adam=True)
    for k in state:
        torch.testing.assert_close(state[k], fresh[k])
    assert max((carried[k] - state[k]).abs().max().item() for k in state) > 1e-4  # the check can tell


@pytest.mark.parametrize(("n", "steps"), [(33, 1), (34, 2), (64, 2), (1, 0)])
def test_batches_of_one_are_skipped(monkeypatch, n, steps):
    counted = []

    class CountingAdam(torch.optim.Adam):
        def step(self, closure=None):
            counted.append(1)
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", CountingAdam)
    method = FedCLIP(FedCLIPHparams(), make_ctx(torch.randn(3, 4)))
    state = init(method)
    result = train(method, state, client(torch.randn(n, 4), torch.arange(n) % 3), 0)
    assert len(counted) == steps
    if steps == 0:  # nothing trained: the adapter goes back unchanged and no loss is reported
        assert all(torch.equal(result.upload[k], state[k]) for k in state)
        assert result.train_loss is None  # a NaN would make the engine stop the run as diverged


def test_shuffling_comes_from_the_engines_generator():
    text, x, y = small_problem()
    method = FedCLIP(FedCLIPHparams(lr=1e-2), make_ctx(text))
    state = init(method)
    a, b, c = (train(method, state, client(x, y), s).upload for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------ through the engine


def test_fedclip_beats_chance_and_zero_shot_on_an_easy_task():
    ds, x, text = synthetic_task()
    zero_shot = (F.normalize(x, dim=-1) @ F.normalize(text, dim=-1).T).argmax(1)
    zs_acc = (zero_shot[ds.global_test] == ds.labels[ds.global_test]).double().mean().item()
    out = run_federation(FedCLIP, FedCLIPHparams(lr=1e-2), make_ctx(text), ds, x, rounds=5, sample=1.0)
    acc = out.rounds[-1]["global_acc"]
    assert zs_acc < 0.4 and acc > 0.75, (zs_acc, acc)


@pytest.fixture(scope="module")
def tiny_record(blobs_task):
    spec = resolve_spec("fedclip", blobs_task, backbone="tiny-clip", rounds=2)
    return spec, execute(spec, None)


def test_only_the_adapter_crosses_the_channel(tiny_record):
    spec, record = tiny_record
    d = 64  # tiny-clip's embedding width
    adapter = dict(AttentionAdapter(d).named_parameters())
    sizes = [len(c.train) for c in TASKS.get(spec.task).obj().load(
        TASKS.get(spec.task).obj.Options(**spec.task_options), spec.seed).clients]

    def wire(**envelope) -> int:  # the adapter, and the envelope in the header
        return len(st_save(adapter, metadata={k: str(v) for k, v in envelope.items()}))

    for r, per_round in enumerate(record["comm"]["per_round"], start=1):
        assert per_round == {"up_bytes": sum(wire(client_id=k, round=r, num_samples=n) for k, n in enumerate(sizes)),
                             "down_bytes": sum(wire(client_id=k, round=r) for k in range(len(sizes)))}
    assert record["metrics"]["final"]["trainable_params"] == 2 * d * d + 2 * d
    assert record["fidelity"] == "reproduction"


def test_same_spec_and_seed_give_identical_metrics(tiny_record):
    spec, record = tiny_record
    again = execute(spec, None)  # a new process would build the same tiny-clip and read the same cache
    assert json.dumps(again["metrics"], sort_keys=True) == json.dumps(record["metrics"], sort_keys=True)
    assert again["comm"] == record["comm"]


# ------------------------------------------------------------------ the PACS protocol: heldout=all


@pytest.fixture(scope="module")
def domain_task() -> str:
    from pathlib import Path

    from fedbench.core.registry import include

    include(Path(__file__).parent / "plugins" / "domain_blobs_task.py")
    return "domain-blobs"


def fake_record(method: str, domain: str, last: float, best: float, best_round: int, options=None) -> dict:
    return {
        "spec": {"method": method, "task": "domain-blobs", "backbone": "b", "method_options": options or {},
                 "task_options": {"heldout": domain}},
        "metrics": {"final": {"last": {"heldout_acc": {domain: last}, "round": 10},
                              "best_val": {"heldout_acc": {domain: best}, "round": best_round},
                              "best_val_round": best_round}},
    }


def test_heldout_all_expands_into_one_spec_per_domain(domain_task):
    from fedbench.harness.protocols import expand_heldout_all, requests_heldout_all

    sets = ["heldout=all", "lr=0.001", "per_domain=30"]
    assert requests_heldout_all(sets) and not requests_heldout_all(["heldout=dim"])
    specs = expand_heldout_all("fedclip", domain_task, backbone="tiny-clip", seed=3, rounds=4, sets=sets)
    assert [s.task_options["heldout"] for s in specs] == ["dim", "mid", "bright"]
    assert {(s.seed, s.rounds, s.backbone, s.method_options["lr"], s.task_options["per_domain"]) for s in specs} == {
        (3, 4, "tiny-clip", 0.001, 30)}
    assert len({s.spec_hash for s in specs}) == 3
    with pytest.raises(Exception, match="lr"):  # a bad option fails before any run
        expand_heldout_all("fedclip", domain_task, backbone="tiny-clip", sets=["heldout=all", "lr=-1"])


def test_heldout_table_has_last_best_val_mean_and_published_only_on_the_papers_backbone(domain_task):
    from fedbench.core.registry import TASKS
    from fedbench.harness.protocols import format_heldout_table, summarize_heldout

    card = TASKS.get(domain_task).obj.card
    records = [fake_record("fedclip", "dim", 0.5, 0.6, 3), fake_record("fedclip", "mid", 0.7, 0.8, 7),
               fake_record("fedclip", "bright", 0.9, 0.7, 9)]
    rows = summarize_heldout(records, card, "tiny-clip")
    assert [r["held-out domain"] for r in rows] == ["dim", "mid", "bright", "mean"]
    assert rows[1] == {"held-out domain": "mid", "acc % (last round)": 70.0, "last round": 10,
                       "acc % (best-val round)": 80.0, "best-val round": 7}
    assert rows[3]["acc % (last round)"] == 70.0 and rows[3]["acc % (best-val round)"] == 70.0
    assert "not shown" in format_heldout_table(rows, "tiny-clip")

    paper = summarize_heldout(records, card, "openclip:ViT-B-32/openai")
    assert [r["published % (FedCLIP)"] for r in paper] == [90.0, 80.0, 70.0, 80.0]
    # FedAvg's published row is full fine-tuning: a head-only FedAvg is not set beside it.
    head = [fake_record("fedavg", d, 0.5, 0.5, 1, {"trainable": "head"}) for d in ("dim", "mid", "bright")]
    assert not any(k.startswith("published") for k in summarize_heldout(head, card, "openclip:ViT-B-32/openai")[0])
    full = [fake_record("fedavg", d, 0.5, 0.5, 1, {"trainable": "full"}) for d in ("dim", "mid", "bright")]
    mean_row = summarize_heldout(full, card, "openclip:ViT-B-32/openai")[-1]
    assert mean_row["published % (FedAvg (CLIP, full fine-tune))"] == 50.0


@pytest.mark.slow
def test_heldout_all_runs_end_to_end(domain_task):
    from fedbench.core.registry import TASKS
    from fedbench.harness.protocols import expand_heldout_all, summarize_heldout

    specs = expand_heldout_all("fedclip", domain_task, backbone="tiny-clip", rounds=2, sets=["heldout=all"])
    rows = summarize_heldout([execute(s, None) for s in specs], TASKS.get(domain_task).obj.card, "tiny-clip")
    assert len(rows) == 4 and all(0 <= r["acc % (last round)"] <= 100 for r in rows)
    assert all(r["last round"] == 2 for r in rows[:3])


def test_digit_tasks_default_to_the_digits_dual_encoder():
    from fedbench.harness.run import resolve_spec

    assert resolve_spec("fedclip", "rotated-mnist").backbone == "digits-clip"
    assert resolve_spec("zero-shot", "mnist-dirichlet").backbone == "digits-clip"
    assert resolve_spec("fedclip", "pacs-mini").backbone == "offline-pair"
    assert resolve_spec("fedclip", "rotated-mnist", backbone="tiny-clip").backbone == "tiny-clip"


@pytest.mark.slow
def test_fedclip_beats_zero_shot_on_the_heldout_rotation(tmp_path):
    """Issue 4's offline showcase: the paper's defaults, the default backbone, 50 rounds."""
    from fedbench.harness.run import execute, resolve_spec

    sets = ["samples_per_domain=100"]
    zero = execute(resolve_spec("zero-shot", "rotated-mnist", sets=sets), None, cache_dir=tmp_path)
    fed = execute(resolve_spec("fedclip", "rotated-mnist", sets=sets), None, cache_dir=tmp_path)
    held = [r["metrics"]["final"]["last"]["heldout_acc_mean"] for r in (zero, fed)]
    assert held[1] > held[0], held
