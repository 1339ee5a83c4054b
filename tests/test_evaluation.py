"""The evaluation engine: numbers against hand computation on a linear model, sanity checks on a
gradient-masked model, minimum-norm attacks, directions, resumption and the output folder."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import medrobust as mr
from medrobust.attacks import ATTACKS, MinimumNormAttack, RunOutput
from medrobust.attacks.base import AttackContext
from medrobust.data import ImageData
from medrobust.evaluation import (
    EvaluationError,
    EvaluationResult,
    ResultsStoreError,
    stable_view,
)
from medrobust.evaluation.metrics import wilson_interval
from medrobust.evaluation.sanity import run_checks
from medrobust.evaluation.schema import validate

from evaluation_helpers import hand_robust, linear_data, linear_model, weights  # isort: skip

EPS = [0.0, 0.005, 0.01, 0.02, 0.05]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids thread-pool contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _eval(model: mr.Classifier | None = None, data: ImageData | None = None, **kw: object
          ) -> EvaluationResult:
    args: dict[str, object] = {
        "attacks": ["fgsm", "pgd"], "eps": EPS, "batch_size": 16, "progress": False,
        "attack_kwargs": {"pgd": {"steps": 10}}, "gallery": 2,
    }
    args.update(kw)
    return mr.evaluate(model or linear_model(), data or linear_data(), **args)  # type: ignore


@pytest.fixture(scope="module")
def linear_result() -> EvaluationResult:
    torch.set_num_threads(1)
    return _eval()


# ------------------------------------------------------------------------------------- numbers
def test_clean_and_robust_accuracy_match_hand_computation(linear_result: EvaluationResult
                                                          ) -> None:
    data = linear_data()
    doc = linear_result.results
    clean_ok = hand_robust(data, 0.0)
    acc = doc["clean"]["accuracy"]
    assert acc["k"] == int(clean_ok.sum()) and acc["n"] == len(data)
    lo, hi = wilson_interval(acc["k"], acc["n"])
    assert (acc["ci_low"], acc["ci_high"]) == (lo, hi)
    y = data.labels
    for i, eps in enumerate(EPS):
        want = hand_robust(data, eps)
        for name in ("fgsm", "pgd"):
            e = doc["attacks"][name]["per_eps"][i]
            assert e["eps"] == eps
            assert e["robust_accuracy"]["k"] == int(want.sum()), (name, eps)
            # success rate among the correctly classified samples
            assert e["success_on_correct"]["n"] == int(clean_ok.sum())
            assert e["success_on_correct"]["k"] == int((clean_ok & ~want).sum())
            # binary: sensitivity and specificity under attack, per class
            assert e["sensitivity"]["k"] == int(want[y == 1].sum())
            assert e["sensitivity"]["n"] == int((y == 1).sum())
            assert e["specificity"]["k"] == int(want[y == 0].sum())
            assert [c["k"] for c in e["per_class"]] == [int(want[y == c].sum()) for c in (0, 1)]
        w = doc["worst_case"][i]
        assert w["robust_accuracy"]["k"] == int(want.sum())
        assert linear_result.robust_accuracy[eps] == pytest.approx(float(want.float().mean()))
    # the sweep is not trivial: the accuracy falls from clean to low
    ks = [w["robust_accuracy"]["k"] for w in doc["worst_case"]]
    assert ks[0] > ks[-1] and ks == sorted(ks, reverse=True)


def test_perturbation_statistics_of_fgsm_by_hand(linear_result: EvaluationResult) -> None:
    """FGSM on a linear model moves every pixel by exactly eps (no pixel meets the bounds)."""
    for e in linear_result.results["attacks"]["fgsm"]["per_eps"][1:]:
        eps = e["eps"]
        s = e["perturbation"]["successful"]
        assert s["linf"]["n"] == e["success_on_correct"]["k"] > 0
        assert s["linf"]["median"] == pytest.approx(eps, rel=1e-5)
        assert s["l2"]["median"] == pytest.approx(eps * 4, rel=1e-5)  # sqrt(16) * eps
        assert s["psnr"]["median"] == pytest.approx(-20 * math.log10(eps), abs=1e-3)
        assert 0 < s["ssim"]["max"] <= 1


def test_clean_auc_is_the_pairwise_rank_statistic(linear_result: EvaluationResult) -> None:
    data = linear_data()
    w, b = weights()
    z = (data.images.flatten(1) @ w + b).numpy()
    y = data.labels.numpy() == 1
    pairs = [(p > q) + 0.5 * (p == q) for p in z[y] for q in z[~y]]
    auc = linear_result.results["clean"]["auc"]
    assert auc["value"] == pytest.approx(float(np.mean(pairs)), abs=1e-9)
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]


def test_results_document(linear_result: EvaluationResult) -> None:
    doc = linear_result.results
    validate(doc)
    assert doc["schema_version"] == 2 and doc["medrobust_version"] == mr.__version__
    assert doc["seed"] == 0
    assert len(doc["model"]["state_dict_sha256"]) == 64
    assert len(doc["data"]["content_sha256"]) == 64
    assert doc["config"]["eps"] == EPS and doc["config"]["large_eps"] == 1.0
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN
    assert len(doc["gallery"]) == 2 and all(g["reproduced"] for g in doc["gallery"])
    assert "0.005" in linear_result.summary_table()


# -------------------------------------------------------------------------------------- sanity
def test_sanity_checks_pass_on_an_honest_model(linear_result: EvaluationResult) -> None:
    s = linear_result.results["sanity"]
    assert s["passed"], s["failed"]
    statuses = {c["id"]: c["status"] for c in s["checks"]}
    for cid in ("eps0:fgsm", "eps0:pgd", "monotonic:fgsm", "monotonic:pgd", "iterative:pgd>fgsm",
                "large_eps:fgsm", "large_eps:pgd"):
        assert statuses[cid] == "pass", cid


def test_sanity_checks_fire_on_a_gradient_masked_model() -> None:
    """The input is rounded in the forward pass: every gradient is zero, FGSM does nothing and
    PGD only wanders with its random start. The robust accuracy looks high; the checks say why."""
    res = _eval(linear_model(masked=True))
    s = res.results["sanity"]
    assert not s["passed"] and s["gradient_masking_suspected"]
    statuses = {c["id"]: c["status"] for c in s["checks"]}
    assert statuses["large_eps:pgd"] == "fail"
    assert statuses["large_eps:fgsm"] == "warn"
    assert statuses["eps0:pgd"] == "pass"  # the eps = 0 check still holds: deterministic
    assert "large_eps:pgd" in s["failed"]


def _doc_for_checks(correct: dict[str, list[int]], clean_k: int = 90, n: int = 100,
                    large: dict[str, int] | None = None) -> dict:
    eps = [0.0, 0.01, 0.02]
    attacks = {}
    for name, ks in correct.items():
        per = [{"eps": e, "eps_label": str(e), "n_attacked": n,
                "raw_accuracy": {"k": k, "n": n}} for e, k in zip(eps, ks, strict=True)]
        big = None
        if large is not None:
            big = {"eps": 1.0, "eps_label": "1",
                   "success_on_correct": {"k": large[name], "n": clean_k}}
        attacks[name] = {"kind": "fixed-budget", "single_step": name == "fgsm", "per_eps": per,
                         "large_eps": big}
    return {"clean": {"accuracy": {"k": clean_k, "n": n}}, "attacks": attacks}


def test_each_check_fires_alone_with_its_tolerance() -> None:
    ok = run_checks(_doc_for_checks({"fgsm": [90, 60, 40], "pgd": [90, 50, 20]},
                                    large={"fgsm": 90, "pgd": 90}))
    assert ok["passed"] and ok["tolerance_samples"] == 1
    # accuracy rising by 2 samples (> 1% of 100) fails; by 1 sample is tolerated
    bad = run_checks(_doc_for_checks({"fgsm": [90, 60, 62], "pgd": [90, 50, 20]}))
    assert bad["failed"] == ["monotonic:fgsm"]
    assert run_checks(_doc_for_checks({"fgsm": [90, 60, 61], "pgd": [90, 50, 20]}))["passed"]
    # eps = 0 differs from clean
    assert run_checks(_doc_for_checks({"fgsm": [89, 60, 40], "pgd": [90, 50, 20]})
                      )["failed"] == ["eps0:fgsm"]
    # iterative weaker than single-step
    assert run_checks(_doc_for_checks({"fgsm": [90, 40, 20], "pgd": [90, 50, 20]})
                      )["failed"] == ["iterative:pgd>fgsm"]
    # unbounded attack misses samples: a failure for pgd, a warning for fgsm
    r = run_checks(_doc_for_checks({"fgsm": [90, 60, 40], "pgd": [90, 50, 20]},
                                   large={"fgsm": 50, "pgd": 80}))
    assert r["failed"] == ["large_eps:pgd"]
    assert {c["id"]: c["status"] for c in r["checks"]}["large_eps:fgsm"] == "warn"


# ------------------------------------------------------------------- minimum norm, directions
class ExactLinf(MinimumNormAttack):
    """The exact minimal L-inf perturbation of the linear test model (a stand-in for DeepFool)."""

    name = "exactlinf"

    def __init__(self, norm: str = "linf", *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(norm, seed=seed, generator=generator)

    def run(self, ctx: AttackContext) -> RunOutput:
        lin = ctx.model.module.lin  # type: ignore[union-attr]
        w, b = lin.weight[0].detach(), float(lin.bias.detach())
        z = ctx.x.flatten(1) @ w + b
        correct = (z > 0) == (ctx.labels == 1)
        t = torch.where(correct, z.abs() / w.abs().sum() * 1.001, torch.zeros_like(z))
        toward = torch.where(ctx.labels == 1, -1.0, 1.0)
        delta = (toward * t)[:, None] * w.sign()[None]
        return RunOutput(ctx.x + delta.view_as(ctx.x))


def test_minimum_norm_attack_is_judged_against_each_budget(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setitem(ATTACKS, "exactlinf", ExactLinf)
    data = linear_data()
    res = _eval(attacks=["exactlinf"], gallery=0)
    block = res.results["attacks"]["exactlinf"]
    assert block["kind"] == "minimum-norm"
    for e in block["per_eps"]:
        want = hand_robust(data, e["eps"])
        # within 0.1% of the boundary a sample may go either way
        assert abs(e["robust_accuracy"]["k"] - int(want.sum())) <= 1
    assert block["large_eps"]["success_on_correct"]["value"] == 1.0
    assert block["distance"]["n"] == res.results["clean"]["accuracy"]["k"]
    assert res.results["sanity"]["passed"]


def test_direction_pos2neg_attacks_only_the_positives(linear_result: EvaluationResult) -> None:
    data = linear_data()
    res = _eval(direction="pos2neg", attacks=["fgsm"], gallery=1)
    y = data.labels
    clean_ok = hand_robust(data, 0.0)
    for e in res.results["attacks"]["fgsm"]["per_eps"]:
        want = hand_robust(data, e["eps"])
        assert e["n_attacked"] == int((y == 1).sum())
        assert e["sensitivity"]["k"] == int(want[y == 1].sum())
        assert e["specificity"]["k"] == int(clean_ok[y == 0].sum())  # negatives untouched
        assert e["success_on_correct"]["n"] == int(clean_ok[y == 1].sum())
    assert res.results["config"]["direction"] == "pos2neg"
    assert res.results["config"]["positive_class"] == 1
    assert all(g["label"] == 1 for g in res.results["gallery"])
    # positive class 0: the other direction
    res0 = _eval(direction="pos2neg", attacks=["fgsm"], positive_class=0, gallery=0)
    assert res0.results["attacks"]["fgsm"]["per_eps"][0]["n_attacked"] == int((y == 0).sum())


def test_multiclass_model_has_per_class_numbers_and_no_sensitivity() -> None:
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(30, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    data = ImageData(x, y, (0.0, 1.0), "intensity", "multi-class", ["a", "b", "c"])
    res = _eval(mr.Classifier(net, num_classes=3), data, attacks=["pgd"], gallery=1)
    e = res.results["attacks"]["pgd"]["per_eps"][-1]
    assert len(e["per_class"]) == 3 and "sensitivity" not in e
    assert sum(c["n"] for c in e["per_class"]) == 30
    assert res.results["clean"]["accuracy"]["k"] == 27


# ------------------------------------------------------------------------------- resumability
def test_rerun_reuses_stored_units_and_gives_identical_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _eval(out=out)
    assert first.results["run"]["units_reused"] == 0
    total = first.results["run"]["units_computed"]
    # 3 batches x (clean + 2 attacks x (5 eps + the large one))
    assert total == 3 * (1 + 2 * 6)
    second = _eval(out=out)
    assert second.results["run"]["units_computed"] == 0
    assert second.results["run"]["units_reused"] == total
    # drop some units, as a killed run would have left them: only those are recomputed
    with sqlite3.connect(out / "results.sqlite") as con:
        con.execute("DELETE FROM batches WHERE batch = 2 OR (batch = 1 AND unit LIKE 'pgd:%')")
    third = _eval(out=out)
    assert third.results["run"]["units_computed"] == 13 + 6
    on_disk = json.loads((out / "results.json").read_text())
    assert stable_view(on_disk) == stable_view(first.results) == stable_view(third.results)
    # a different seed is another configuration: refused in the same folder ...
    with pytest.raises(EvaluationError, match="another evaluation"):
        _eval(out=out, seed=1)
    # ... unless asked to overwrite
    fresh = _eval(out=out, seed=1, overwrite=True)
    assert fresh.results["run"]["units_reused"] == 0
    assert json.loads((out / "results.json").read_text())["seed"] == 1


def test_resume_false_needs_overwrite(tmp_path: Path) -> None:
    _eval(out=tmp_path, attacks=["fgsm"], gallery=0)
    with pytest.raises(EvaluationError, match="overwrite"):
        _eval(out=tmp_path, attacks=["fgsm"], gallery=0, resume=False)
    res = _eval(out=tmp_path, attacks=["fgsm"], gallery=0, resume=False, overwrite=True)
    assert res.results["run"]["units_reused"] == 0


def test_a_corrupted_results_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "results.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ResultsStoreError, match="corrupted"):
        _eval(out=tmp_path, attacks=["fgsm"])
    assert (tmp_path / "results.sqlite").read_bytes().startswith(b"this is not")  # kept
    res = _eval(out=tmp_path, attacks=["fgsm"], overwrite=True, gallery=0)
    assert res.results["run"]["units_computed"] > 0


def test_output_files(tmp_path: Path) -> None:
    _eval(out=tmp_path, gallery=2)
    for name in ("results.json", "report.html", "results.sqlite", "figures/robust_accuracy.png",
                 "figures/gallery.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "figures/gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.html").read_text()
    assert 'id="summary-clean-accuracy"' in text and "data:image/png;base64," in text
    # self-contained: nothing is fetched from anywhere
    assert "http://" not in text and "https://" not in text
    assert " src=\"data:image/png" in text and text.count("<img") == 2


# --------------------------------------------------------------------------------- bad input
def test_bad_input_is_reported_clearly() -> None:
    with pytest.raises(EvaluationError, match="unknown attack 'nope'"):
        _eval(attacks=["fgsm", "nope"])
    with pytest.raises(EvaluationError, match="malformed eps"):
        _eval(eps="0,1/x")
    with pytest.raises(EvaluationError, match="set by the evaluation"):
        _eval(attack_kwargs={"pgd": {"eps": 0.1}})
    with pytest.raises(EvaluationError, match="direction"):
        _eval(direction="sideways")
    data = linear_data()
    rgb = ImageData(data.images.repeat(1, 3, 1, 1), data.labels, (0.0, 1.0), "intensity",
                    "binary", ["a", "b"])
    with pytest.raises(EvaluationError, match="does not accept"):
        _eval(data=rgb)
    three = ImageData(data.images, data.labels, (0.0, 1.0), "intensity", "multi-class",
                      ["a", "b", "c"])
    with pytest.raises(EvaluationError, match="2 classes but the data has 3"):
        _eval(data=three)
    hu = ImageData(data.images * 1000, data.labels, (-1024.0, 3071.0), "HU", "binary", ["a", "b"])
    with pytest.raises(EvaluationError, match="bounds"):
        _eval(data=hu)


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EvaluationError, match="not writable|not a folder"):
        _eval(out=blocker / "sub", attacks=["fgsm"])
    with pytest.raises(EvaluationError, match="not a folder"):
        _eval(out=blocker, attacks=["fgsm"])


def test_display_window_for_medical_images() -> None:
    from medrobust.evaluation.engine import display_window
    from medrobust.preprocessing import IntensityWindow

    data = linear_data()
    # a CT window in the model (HU): the gallery shows what the network sees
    hu = mr.Classifier(torch.nn.Flatten(), bounds=(-1024.0, 3071.0),
                       preprocess=IntensityWindow(40, 400))
    hu_data = ImageData(data.images * 100, data.labels, (-1024.0, 3071.0), "HU", "binary",
                        ["a", "b"], meta={"window": (-600, 1500)})
    assert display_window(hu, {}, hu_data) == (-160.0, 240.0)
    # else the data's own window, when it fits its range ...
    plain = mr.Classifier(torch.nn.Flatten(), bounds=(-1024.0, 3071.0))
    assert display_window(plain, {}, hu_data) == (-1350.0, 150.0)
    # ... a CT window on [0, 1] data is ignored: the bounds
    data.meta["window"] = (40, 400)
    assert display_window(linear_model(), {}, data) == (0.0, 1.0)
    meta = {"preprocessing": {"steps": {"type": "compose", "steps": [
        {"type": "window", "lo": -1000.0, "hi": 400.0}]}}}
    assert display_window(plain, meta, hu_data) == (-1000.0, 400.0)


def test_registered_deepfool_is_evaluated_as_a_minimum_norm_attack() -> None:
    if "deepfool" not in ATTACKS:
        pytest.skip("DeepFool is not registered")
    data = linear_data()
    res = _eval(attacks=["fgsm", "deepfool"], gallery=1)
    block = res.results["attacks"]["deepfool"]
    assert block["kind"] == "minimum-norm"
    for e in block["per_eps"]:
        # DeepFool is exact on a linear model, up to its small overshoot
        assert abs(e["robust_accuracy"]["k"] - int(hand_robust(data, e["eps"]).sum())) <= 2
    assert res.results["gallery"][0]["attack"] == "fgsm"  # fixed-budget examples first
