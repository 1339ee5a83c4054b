"""Ensembles run in sequence (the machinery of ``standard``), tested with the attacks every
medrobust has (FGSM, PGD, DeepFool): each attack sees only the samples still robust, each sample
is credited to the first attack that broke it, the result is the per-sample worst case; a
gradient-free attack that succeeds where the gradient attacks failed is flagged; when a check
fails, the card shows the figure as unreliable next to the fallback's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import medrobust as mr
from medrobust.attacks import ATTACKS, FixedBudgetAttack, RunOutput
from medrobust.attacks.base import AttackContext
from medrobust.data import ImageData
from medrobust.evaluation import ComponentDef, EvaluationError, register_preset, stable_view
from medrobust.evaluation.families import PRESETS

from evaluation_helpers import linear_data, linear_model  # isort: skip

EPS = "0,0.01,0.03,0.06"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def presets() -> Iterator[None]:
    """A three-stage ensemble of classic attacks: weak FGSM first, then a targeted PGD over the
    top classes with the margin loss, then DeepFool (minimum-norm, counted within eps)."""
    before = dict(PRESETS)
    register_preset("seq", lambda norm, k: [
        ComponentDef("fgsm", "fgsm"),
        ComponentDef("pgd-t", "pgd", {"loss": "margin", "steps": 10}, targets=min(9, k - 1)),
        ComponentDef("deepfool", "deepfool"),
    ])
    yield
    PRESETS.clear()
    PRESETS.update(before)


def three_class() -> tuple[mr.Classifier, ImageData]:
    """A small nonlinear 3-class model on 4x4 images in [0.3, 0.7] (FGSM is not optimal),
    centred so that it predicts every class."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                                  torch.nn.Linear(12, 3))
    with torch.no_grad():
        net[1].weight.mul_(6)
        net[1].bias.copy_(-net[1].weight.sum(1) * 0.5)
    net.eval()
    x = 0.3 + 0.4 * torch.rand(60, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3
    data = ImageData(x, y, (0.0, 1.0), "intensity", "multi-class", ["a", "b", "c"])
    return mr.Classifier(net, num_classes=3), data


def _run(model: mr.Classifier, data: ImageData, attacks: object = "seq", **kw: object
         ) -> mr.evaluation.EvaluationResult:  # type: ignore[name-defined]
    args: dict[str, object] = {"eps": EPS, "batch_size": 16, "progress": False, "gallery": 1}
    args.update(kw)
    return mr.evaluate(model, data, attacks, **args)  # type: ignore[arg-type]


def _check_sequence(doc: dict, name: str) -> None:
    block = doc["attacks"][name]
    clean_k = doc["clean"]["accuracy"]["k"]
    labels = [c["attack"] for c in block["components"]]
    for e in block["per_eps"]:
        by = e["broken_by"]
        robust_k = e["robust_accuracy"]["k"]
        # every correct sample is either still robust or credited to exactly one attack
        assert sum(by.values()) + robust_k == clean_k
        after = [r["robust_accuracy"]["k"] for r in e["robust_after"]]
        assert after == sorted(after, reverse=True) and after[-1] == robust_k
        if e["eps"] == 0:  # a zero budget changes nothing: no attack is run
            assert robust_k == clean_k and not any(by.values())
            assert all(c["forward_passes"] == c["samples_attacked"] == 0 for c in e["cost"])
            continue
        # each attack saw only the samples the attacks before it left robust
        left = clean_k
        for lab, r, cost in zip(labels, e["robust_after"], e["cost"], strict=True):
            assert cost["attack"] == lab
            if lab != "pgd-t":  # a targeted attack runs once per target class
                assert cost["samples_attacked"] == left
            else:
                assert cost["samples_attacked"] >= left
            assert (cost["forward_passes"] > 0) == (left > 0)
            left = r["robust_accuracy"]["k"]


def test_sequence_on_a_three_class_model() -> None:
    model, data = three_class()
    res = _run(model, data, ["seq", "fgsm"])
    doc = res.results
    _check_sequence(doc, "seq")
    seq, fgsm = doc["attacks"]["seq"], doc["attacks"]["fgsm"]
    assert seq["kind"] == "ensemble"
    assert [c["targets"] for c in seq["components"]] == [0, 2, 0]
    for e_s, e_f in zip(seq["per_eps"], fgsm["per_eps"], strict=True):
        # FGSM is deterministic and the ensemble's first stage: never weaker than it alone
        assert e_s["robust_accuracy"]["k"] <= e_f["robust_accuracy"]["k"]
        assert e_s["broken_by"]["fgsm"] == e_f["success_on_correct"]["k"]
    # the later stages do add something
    assert sum(e["broken_by"]["pgd-t"] for e in seq["per_eps"]) > 0
    assert any(e_s["robust_accuracy"]["k"] < e_f["robust_accuracy"]["k"]
               for e_s, e_f in zip(seq["per_eps"], fgsm["per_eps"], strict=True))
    # per-attack cost and time are reported; time only under the volatile "run"
    timing = doc["run"]["timing"]["seq"]
    assert set(timing["components"]) == {"fgsm", "pgd-t", "deepfool"}
    assert all(v >= 0 for v in timing["components"].values())
    assert "time" not in str(stable_view(doc)["attacks"]["seq"])
    assert doc["sanity"]["passed"], doc["sanity"]["failed"]
    assert doc["headline"][-1]["reliable"]


def test_sequence_on_a_binary_model_targets_the_single_other_class(tmp_path: Path) -> None:
    model, data = linear_model(), linear_data()
    out = tmp_path / "seq"
    first = _run(model, data, out=out)
    doc = first.results
    _check_sequence(doc, "seq")
    assert doc["attacks"]["seq"]["components"][1]["targets"] == 1
    # FGSM is exact on a linear model: the later stages find nothing more
    assert all(e["broken_by"]["pgd-t"] == 0 and e["broken_by"]["deepfool"] == 0
               for e in doc["attacks"]["seq"]["per_eps"])
    # resumable like any unit: a rerun recomputes nothing and gives the same numbers
    again = _run(model, data, out=out)
    assert again.results["run"]["units_computed"] == 0
    assert stable_view(again.results) == stable_view(doc)
    html = (out / "report.html").read_text()
    assert 'id="ensembles"' in html and 'data-attack="seq"' in html


def test_unknown_ensemble_and_missing_attacks_are_clear() -> None:
    register_preset("needs-missing", lambda norm, k: [ComponentDef("x", "no-such-attack")])
    with pytest.raises(EvaluationError, match="needs the attacks no-such-attack"):
        _run(linear_model(), linear_data(), "needs-missing")
    with pytest.raises(EvaluationError, match="unknown attack 'nope'"):
        _run(linear_model(), linear_data(), "nope")


class RandomSearch(FixedBudgetAttack):
    """A gradient-free test double: random sign vectors at the corners of the L-inf ball, keep
    any that succeeds (what Square does, minus its schedule)."""

    name = "randomsearch"
    requires_gradients = False

    def __init__(self, eps: float, norm: str = "linf", *, queries: int = 300,
                 seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(eps, norm, seed=seed, generator=generator)
        self.queries = queries

    def run(self, ctx: AttackContext) -> RunOutput:
        best = ctx.x.clone()
        done = torch.zeros(ctx.n, dtype=torch.bool)
        eps = float(self.eps)
        for _ in range(self.queries):
            if bool(done.all()):
                break
            idx = (~done).nonzero().flatten()
            xs = ctx.clip(ctx.x[idx] + eps * (2 * (ctx.rand(*ctx.x[idx].shape) > 0.5) - 1))
            ok = ctx.is_adversarial(ctx.logits(xs), idx).cpu()
            best[idx[ok]] = xs[ok]
            done[idx[ok]] = True
        return RunOutput(best)


def test_gradient_free_success_is_flagged_and_the_card_marks_the_figure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model behind an input quantization (zero gradients): FGSM and PGD find nothing, the
    random search does. The report flags gradient masking and shows the gradient attacks' figure
    as unreliable; the worst case including the gradient-free attack is the one to quote."""
    monkeypatch.setitem(ATTACKS, "randomsearch", RandomSearch)
    register_preset("masked-seq", lambda norm, k: [
        ComponentDef("pgd", "pgd", {"steps": 10}), ComponentDef("random", "randomsearch")])
    res = _run(linear_model(masked=True), linear_data(), ["masked-seq"], eps="0,0.05,0.1")
    doc = res.results
    s = doc["sanity"]
    assert "gradient_free:masked-seq" in s["failed"] and s["gradient_masking_suspected"]
    last = doc["attacks"]["masked-seq"]["per_eps"][-1]
    # PGD only wanders with its random start; the random search does better
    assert last["broken_by"]["random"] > last["broken_by"]["pgd"]
    head = doc["headline"][-1]
    assert not head["reliable"] and head["quote_value"] == head["value"]
    assert "already includes" in head["advice"]
    assert "UNRELIABLE" in res.summary_table()


def test_a_failed_check_runs_the_fallback_and_the_card_shows_both(tmp_path: Path) -> None:
    """FGSM and PGD on the quantized model fail the large-eps check: the engine runs its
    fallback (margin-loss attack, and Square when registered) and the summary card shows the
    inflated figure marked unreliable next to it."""
    res = _run(linear_model(masked=True), linear_data(), ["fgsm", "pgd"], out=tmp_path,
               attack_kwargs={"pgd": {"steps": 10}, "square": {"n_queries": 100}})
    doc = res.results
    assert not doc["sanity"]["passed"]
    alt = doc["alternative"]
    assert alt["attacks"] and alt["reason"].startswith("checks failed")
    for h, w, aw in zip(doc["headline"], doc["worst_case"], alt["worst_case"], strict=True):
        assert not h["reliable"] and h["value"] == w["robust_accuracy"]["value"]
        assert h["alternative"]["value"] == aw["robust_accuracy"]["value"] <= h["value"]
        assert h["quote_value"] == min(h["value"], aw["robust_accuracy"]["value"])
    html = (tmp_path / "report.html").read_text()
    assert 'data-reliable="false"' in html and 'class="badge">unreliable' in html
    assert 'td class="alternative-accuracy"' in html and 'id="summary-advice"' in html
    assert 'data-state="failed"' in html and "All sanity checks passed" not in html


def test_minimum_norm_distance_line_in_the_report(tmp_path: Path) -> None:
    """DeepFool's median distance to the nearest adversarial is over the samples it broke that
    were classified correctly (never zeros of failures or of misclassified samples), and is
    labelled in the report."""
    data = linear_data()
    res = _run(linear_model(), data, ["fgsm", "deepfool"], out=tmp_path)
    d = res.results["attacks"]["deepfool"]["distance"]
    clean_k = res.results["clean"]["accuracy"]["k"]
    assert d["n"] == clean_k and d["min"] > 0  # every correct sample broken, none at zero
    html = (tmp_path / "report.html").read_text()
    assert ('class="min-norm-distance" data-attack="deepfool" '
            f'data-value="{d["median"]!r}"') in html
    assert "median distance to the nearest adversarial" in html


def test_every_curve_stays_visible_over_the_worst_case() -> None:
    """FGSM equals the worst case on a linear model (it is exact there): its line must still show
    — drawn above the wide, pale worst-case line, with its own marker and dashes, and a small
    horizontal offset from the other attacks — and DeepFool's median distance is a labelled
    vertical line."""
    from medrobust.evaluation.figures import robust_accuracy_figure

    res = _run(linear_model(), linear_data(), ["fgsm", "pgd", "deepfool"], gallery=0)
    ax = robust_accuracy_figure(res.results).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    worst = lines["worst case"]
    attacks = [lines[n] for n in ("fgsm", "pgd", "deepfool")]
    assert all(a.get_zorder() > worst.get_zorder() for a in attacks)
    assert worst.get_linewidth() > max(a.get_linewidth() for a in attacks)
    assert worst.get_alpha() is not None and worst.get_alpha() < 1
    assert len({a.get_marker() for a in attacks}) == 3
    assert len({a.get_linestyle() for a in attacks}) == 3
    xs = [tuple(a.get_xdata()) for a in attacks]
    assert len(set(xs)) == 3  # offset: no two attacks drawn at exactly the same x
    # fgsm's values equal the worst case's, and its line is not hidden under it
    assert list(lines["fgsm"].get_ydata()) == list(worst.get_ydata())
    label = [k for k in lines if "median distance to the nearest adversarial" in k]
    assert len(label) == 1 and label[0].startswith("deepfool")
