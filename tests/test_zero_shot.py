"""Zero-shot CLIP: cosine logits against the prompts, and CLIP's prompt ensembling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedbench.baselines.zero_shot import LOGIT_SCALE, ZeroShot, ZeroShotHparams, parse_templates
from fedbench.core.spec import options_from
from fedbench.data.dataset import ClientIndices, FederatedDataset
from fedbench.errors import SpecError
from fedbench.federation.engine import run_federation
from fedbench.federation.method import RunContext, ServerContext

SERVER = ServerContext(0, torch.Generator(), torch.device("cpu"))


def make_ctx(text_features: torch.Tensor | None, class_names: list[str], backbone=None) -> RunContext:
    return RunContext(num_classes=len(class_names), class_names=class_names,
                      prompts=[f"a photo of a {c}." for c in class_names], num_clients=1, input_kind="features",
                      input_shape=(text_features.shape[1] if text_features is not None else 3,),
                      backbone=backbone, text_features=text_features)


class FakeTextTower:
    """encode_text from a fixed table: prompt -> vector (what a backbone would return)."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.tensor([self.table[t] for t in texts])


def test_predict_is_scaled_cosine_with_normalised_prompts():
    # Unequal norms on purpose: without normalising, class 0 (norm 10) would win every row.
    text = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, -0.5]])
    method = ZeroShot(ZeroShotHparams(), make_ctx(text, ["a", "b", "c"]))
    x = torch.tensor([[0.2, 1.0, 0.0], [0.0, 0.3, -4.0], [5.0, 0.1, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float16)
    logits = method.predict(method.init(SERVER).broadcast, x)
    assert logits.argmax(1).tolist() == [1, 2, 0, 1]
    assert torch.allclose(logits[3], torch.tensor([0.0, LOGIT_SCALE, 0.0]))
    # Image features are normalised too: scaling a row changes nothing.
    assert torch.allclose(method.predict(method.init(SERVER).broadcast, 7 * x.float()), logits, atol=1e-4)


def test_template_ensemble_averages_normalised_embeddings():
    tower = FakeTextTower({
        "a cat": [3.0, 0.0, 0.0], "b cat": [0.0, 1.0, 0.0],
        "a dog": [0.0, 0.0, 2.0], "b dog": [0.0, 0.0, 5.0],
    })
    hp = options_from(ZeroShotHparams, {"templates": "a {}| b {} "}, "method 'zero-shot'")
    method = ZeroShot(hp, make_ctx(torch.zeros(2, 3), ["cat", "dog"], backbone=tower))
    emb = method.init(SERVER).broadcast["class_embeddings"]
    # Mean of the unit vectors, re-normalised: [1,1,0]/sqrt2 (the raw mean would lean to [3,1,0]).
    assert torch.allclose(emb, torch.tensor([[0.70710678, 0.70710678, 0.0], [0.0, 0.0, 1.0]]))
    assert tower.calls == [["a cat", "a dog"], ["b cat", "b dog"]]
    # The ensemble changes a decision: with "a {}" alone this image reads as a dog.
    x = torch.tensor([[0.1, 1.0, 0.5]])
    assert method.predict(method.init(SERVER).broadcast, x).argmax(1).item() == 0
    single = ZeroShot(ZeroShotHparams(templates="a {}"), make_ctx(torch.zeros(2, 3), ["cat", "dog"], backbone=tower))
    assert single.predict(single.init(SERVER).broadcast, x).argmax(1).item() == 1


def test_empty_templates_use_the_tasks_text_features_without_encoding():
    text = torch.randn(4, 6)
    method = ZeroShot(ZeroShotHparams(), make_ctx(text, list("wxyz"), backbone=None))
    assert torch.allclose(method.init(SERVER).broadcast["class_embeddings"], F.normalize(text, dim=-1))


def test_bad_templates_and_missing_backbone():
    for bad in ("a photo", "a {} of {}", "a {0} photo", "{x}"):
        with pytest.raises(SpecError, match="template"):
            options_from(ZeroShotHparams, {"templates": bad}, "method 'zero-shot'")
    assert parse_templates("") == []
    method = ZeroShot(ZeroShotHparams(templates="a {}"), make_ctx(torch.zeros(2, 3), ["p", "q"]))
    with pytest.raises(SpecError, match="backbone"):
        method.init(SERVER)
    with pytest.raises(SpecError, match="dims"):
        ZeroShot(ZeroShotHparams(), make_ctx(torch.eye(3), list("abc"))).predict(
            {"class_embeddings": torch.eye(3)}, torch.ones(2, 4))


def test_engine_runs_no_round_and_sends_nothing():
    """Through the real engine: one evaluation (round 0), zero bytes, accuracy from the prompts."""
    text = torch.eye(3)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    feats = F.one_hot(labels, 3).float() * 5 + 0.3 * torch.randn(30, 3, generator=g)
    feats[-1], labels[-1] = torch.tensor([0.0, 0.0, 1.0]), 0  # one test example the prompts get wrong
    ds = FederatedDataset(
        images=torch.zeros(30, 1, 1, 1, dtype=torch.uint8), labels=labels, class_names=["a", "b", "c"],
        clients=[ClientIndices(torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 30))],
        global_test=torch.arange(20, 30),
    )
    assert not ZeroShot.trains and ZeroShot.input_kind(ZeroShotHparams()) == "features"
    out = run_federation(ZeroShot, ZeroShotHparams(), make_ctx(text, ["a", "b", "c"]), ds, feats, rounds=5, sample=1.0)
    assert len(out.rounds) == 1 and out.rounds[0]["round"] == 0
    assert out.channel.up_bytes == 0 and out.channel.down_bytes == 0
    assert out.rounds[0]["global_acc"] == pytest.approx(0.9)
    assert out.rounds[0]["val_acc"] == pytest.approx(1.0)


def test_registered_as_reference():
    from fedbench.core.registry import METHODS

    entry = METHODS._entries["zero-shot"]  # registered at import, without loading every built-in
    assert entry.fidelity == "reference" and "2103.00020" in entry.source
    assert ZeroShot(ZeroShotHparams(), make_ctx(torch.eye(2), ["a", "b"])).trainable_parameters() == 0
