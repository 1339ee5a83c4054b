"""The ``standard`` ensemble (APGD-CE, APGD-T, FAB-T, Square in sequence) end to end, with the
reduced preset ``standard-fast`` (each attack's ``fast_config``): binary and multi-class tasks,
invariance to a logit scale that saturates cross-entropy, and gradient masking behind an input
quantization flagged in the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import medrobust as mr
from medrobust.data import ImageData

from evaluation_helpers import linear_data, linear_model  # isort: skip

COMPONENTS = ["apgd-ce", "apgd-t", "fab-t", "square"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Scaled(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def four_class(n: int, seed: int = 0) -> tuple[torch.nn.Module, ImageData]:
    """A small nonlinear 4-class network on 4x4 images and labels it mostly gets right."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 4))
    with torch.no_grad():
        net[1].weight.mul_(6)
        net[1].bias.copy_(-net[1].weight.sum(1) * 0.5)
    net.eval()
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::10] = (y[::10] + 1) % 4
    return net, ImageData(x, y, (0.0, 1.0), "intensity", "multi-class", list("abcd"))


def _standard(model: mr.Classifier, data: ImageData, **kw: object) -> dict:
    args: dict[str, object] = {"eps": "0,0.01,0.03", "batch_size": 128, "progress": False,
                               "gallery": 1, "seed": 0}
    args.update(kw)
    return mr.evaluate(model, data, "standard-fast", **args).results  # type: ignore[arg-type]


def _sequence_invariants(doc: dict) -> None:
    block = doc["attacks"]["standard-fast"]
    assert [c["attack"] for c in block["components"]] == COMPONENTS
    assert [c["gradient_free"] for c in block["components"]] == [False, False, False, True]
    clean_k = doc["clean"]["accuracy"]["k"]
    for e in block["per_eps"]:
        assert sum(e["broken_by"].values()) + e["robust_accuracy"]["k"] == clean_k
        left = clean_k
        for r, c in zip(e["robust_after"], e["cost"], strict=True):
            assert c["samples_attacked"] == (left if e["eps"] > 0 else 0)
            left = r["robust_accuracy"]["k"]
        assert left == e["robust_accuracy"]["k"]


def test_standard_on_a_binary_task(tmp_path: Path) -> None:
    doc = _standard(linear_model(), linear_data(), out=tmp_path)
    _sequence_invariants(doc)
    # exact on a linear model: the hand-computed robust accuracy (as PGD in test_evaluation)
    from evaluation_helpers import hand_robust

    for e in doc["attacks"]["standard-fast"]["per_eps"]:
        assert e["robust_accuracy"]["k"] == int(hand_robust(linear_data(), e["eps"]).sum())
    assert doc["sanity"]["passed"], doc["sanity"]["failed"]
    checks = {c["id"]: c for c in doc["sanity"]["checks"]}
    assert checks["classes"]["status"] == "info"  # binary: margin instead of DLR, said once
    assert checks["gradient_free:standard-fast"]["status"] == "pass"
    assert doc["config"]["attacks"][0]["components"][1]["config"]["n_target_classes"] == 1
    html = (tmp_path / "report.html").read_text()
    assert 'id="ensembles"' in html and all(f'data-attack="{c}"' in html for c in COMPONENTS)


def test_standard_on_a_multiclass_task() -> None:
    net, data = four_class(80)
    doc = _standard(mr.Classifier(net, num_classes=4), data)
    _sequence_invariants(doc)
    per = doc["attacks"]["standard-fast"]["per_eps"]
    assert per[-1]["robust_accuracy"]["k"] < per[0]["robust_accuracy"]["k"]
    assert doc["headline"][-1]["reliable"]


def test_standard_is_invariant_to_a_saturating_logit_scale() -> None:
    """Logits x 1000 saturate the softmax: cross-entropy gradients vanish, and CE-only attacks
    report an inflated robust accuracy. APGD-T (DLR), FAB-T and Square do not depend on the
    scale: the ensemble's robust accuracy stays within 2 points of the unscaled model's."""
    net, data = four_class(240, seed=1)
    plain = _standard(mr.Classifier(net, num_classes=4), data, eps="0.02", large_eps=False)
    big = _standard(mr.Classifier(Scaled(net, 1000.0), num_classes=4), data, eps="0.02",
                    large_eps=False)
    a = plain["attacks"]["standard-fast"]["per_eps"][0]["robust_accuracy"]
    b = big["attacks"]["standard-fast"]["per_eps"][0]["robust_accuracy"]
    assert a["n"] == b["n"] == 240 and a["value"] < plain["clean"]["accuracy"]["value"]
    assert abs(a["value"] - b["value"]) <= 0.02, (a, b)


def test_quantized_input_is_flagged_as_gradient_masking(tmp_path: Path) -> None:
    doc = _standard(linear_model(masked=True), linear_data(), out=tmp_path)
    s = doc["sanity"]
    assert s["gradient_masking_suspected"]
    assert "gradient_free:standard-fast" in s["failed"]  # Square breaks what APGD missed
    assert not doc["headline"][-1]["reliable"]
    html = (tmp_path / "report.html").read_text()
    assert "gradient masking" in html and 'data-reliable="false"' in html


def test_presets_resolve_as_autoattack_versions() -> None:
    from medrobust.evaluation.families import build_ensemble_spec

    std = build_ensemble_spec("standard", "linf", 10)
    assert [c.label for c in std.components] == COMPONENTS
    assert std.components[1].kwargs["n_target_classes"] == 9  # min(9, K - 1)
    assert std.components[2].kwargs["n_target_classes"] == 9
    assert std.components[3].kwargs["n_queries"] == 5000
    assert all(c.kwargs.get("steps", 100) == 100 for c in std.components[:3])
    binary = build_ensemble_spec("standard", "linf", 2)
    assert binary.components[1].kwargs["n_target_classes"] == 1  # the single other class
    l1 = build_ensemble_spec("standard", "l1", 5)
    assert [c.label for c in l1.components] == ["apgd-ce", "apgd-t", "fab-t"]  # no Square
    rand = build_ensemble_spec("standard-rand", "linf", 5)
    assert [c.label for c in rand.components] == ["apgd-ce", "apgd-dlr"]
    assert all(c.kwargs["eot_iter"] == 20 for c in rand.components)
    assert rand.components[1].kwargs["loss"] == "dlr"
    assert build_ensemble_spec("standard-rand", "linf", 2).components[1].kwargs["loss"] \
        == "margin"  # DLR needs 3 classes: said in the notes
    plus = build_ensemble_spec("plus", "linf", 5)
    labels = [c.label for c in plus.components]
    assert labels == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t", "square-t"]
    assert plus.components[0].kwargs["restarts"] == 5
    assert plus.components[3].kwargs["restarts"] == 5
    sq_t = plus.components[-1]
    assert sq_t.targets == 4 and not sq_t.loops_targets  # the ensemble loops over targets
    fast = build_ensemble_spec("standard-fast", "linf", 5)
    assert fast.components[0].kwargs["steps"] < 100 and fast.key != std.key


def test_cli_default_is_the_standard_ensemble() -> None:
    from medrobust.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["evaluate", "--model", "m", "--data", "d"])
    assert args.attacks == "standard"
