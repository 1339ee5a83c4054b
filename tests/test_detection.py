"""The detector (MONAI RetinaNet), box utilities, detection criteria and DAG on detection."""

from __future__ import annotations

import pytest
import torch

import medrobust as mr
from medrobust.attacks import PGD, DAGDetection, get_attack
from medrobust.boxes import (
    box_iou,
    boxes_from_masks,
    from_monai_boxes,
    match_detections,
    pack_boxes,
    sensitivity_at_fp,
    to_monai_boxes,
    unpack_boxes,
)
from medrobust.detection_criteria import BoxesAppear, BoxesVanish
from medrobust.detection_training import detection_phantoms, evaluate_detector, train_detector
from medrobust.models.detector import build_retinanet, load_detector, save_detector
from medrobust.modelstore import ModelError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained2d():
    """A 2D RetinaNet trained on 32-px CT phantoms (seconds), and held-out positives it detects."""
    tr, trb = detection_phantoms(192, 32, dim=2, seed=0, split="train")
    res = train_detector(tr.images, trb, epochs=4, batch_size=16, lr=3e-3, seed=0)
    te, teb = detection_phantoms(48, 32, dim=2, seed=0, split="test")
    det = res.detector
    crit = det.default_criterion(False).bind(pack_boxes(teb, 2), None, "ce")
    found = ~crit.is_adversarial(det.logits(te.images), torch.arange(48))
    pos = [i for i in range(48) if teb[i]["boxes"].shape[0] and bool(found[i])][:4]
    return res, te, teb, pos


def _mode_flags(module: torch.nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


# --------------------------------------------------------------------------- boxes
def test_box_order_round_trip_and_monai_order():
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # d0 h0 w0 d1 h1 w1
    m = to_monai_boxes(b, 3)
    assert m.tolist() == [[2.0, 3.0, 1.0, 5.0, 6.0, 4.0]]  # h0 w0 d0 h1 w1 d1
    assert torch.equal(from_monai_boxes(m, 3), b)
    b2 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(to_monai_boxes(b2, 2), b2)


def test_boxes_from_masks_and_iou_oracle():
    m = torch.zeros(2, 8, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:7, 4:6] = True
    out = boxes_from_masks(m)
    assert out[0]["boxes"].tolist() == [[2.0, 3.0, 4.0, 5.0, 7.0, 6.0]]
    assert out[1]["boxes"].shape == (0, 6)
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0]]))


def test_pack_unpack_and_bad_labels():
    items = [{"boxes": [[0, 0, 4, 4]], "labels": [0]}, {"boxes": [], "labels": []}]
    p = pack_boxes(items, 2)
    assert p.shape == (2, 1, 5) and p[1, 0, 4] == -1
    back = unpack_boxes(p)
    assert back[0]["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]] and back[1]["boxes"].shape[0] == 0
    with pytest.raises(ValueError, match="end > start"):
        pack_boxes([{"boxes": [[4, 0, 1, 4]], "labels": [0]}], 2)
    with pytest.raises(ValueError, match=r"shape \(M, 4\)"):
        pack_boxes([{"boxes": [[0, 0, 1, 1, 2, 2]], "labels": [0]}], 2)
    with pytest.raises(ValueError, match="NaN"):
        pack_boxes([{"boxes": [[0, 0, float("nan"), 4]], "labels": [0]}], 2)


def test_sensitivity_at_fp_oracle():
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([0])},
             {"boxes": torch.tensor([[10.0, 10.0, 14.0, 14.0]]), "labels": torch.tensor([0])}]
    dets = [
        {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [20.0, 20.0, 24.0, 24.0]]),
         "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])},
        {"boxes": torch.tensor([[30.0, 30.0, 34.0, 34.0], [10.0, 10.0, 14.0, 14.0]]),
         "scores": torch.tensor([0.7, 0.3]), "labels": torch.tensor([0, 0])},
    ]
    # ranked: TP(0.9) FP(0.8) FP(0.7) TP(0.3): at <= 1 FP/volume (2 FPs) all four are kept
    r = sensitivity_at_fp(dets, truth, fp_per_volume=1.0)
    assert r["sensitivity"] == 1.0 and r["fp_per_volume"] == 1.0
    # at <= 0.5 FP/volume only the first FP fits: one lesion of two
    r = sensitivity_at_fp(dets, truth, fp_per_volume=0.5)
    assert r["sensitivity"] == 0.5 and r["threshold"] == pytest.approx(0.8)
    tp, hit = match_detections(dets[0], truth[0], 0.5)
    assert tp.tolist() == [True, False] and hit.tolist() == [True]


# --------------------------------------------------------------------------- the wrapper
def test_detector_axis_order_3d_with_zero_regression():
    """With the regression head zeroed the boxes are the anchors: on a (D, H, W) = (16, 24, 32)
    volume they must extend along D at most to 16 and reach 32 along W (medrobust order)."""
    torch.manual_seed(0)
    net = build_retinanet(spatial_dims=3)
    head = net.network.regression_head
    for p in head.bbox_reg.parameters():
        torch.nn.init.zeros_(p)
    det = mr.Detector(net, bounds=(0.0, 1.0))
    out = det.logits(torch.rand(1, 1, 16, 24, 32))
    boxes = out[0, :, 1:]
    assert out.shape[2] == 1 + 6
    assert float(boxes[:, 3].max()) == 16 and float(boxes[:, 4].max()) == 24
    assert float(boxes[:, 5].max()) == 32
    assert (boxes[:, 3:] >= boxes[:, :3]).all()
    # padded sizes work (not divisible by 8)
    assert det.logits(torch.rand(1, 1, 12, 20, 28)).shape[0] == 1


def test_detector_refuses_wrong_inputs_and_classifier_attacks(trained2d):
    res, te, teb, _ = trained2d
    det = res.detector
    with pytest.raises(ValueError, match="expects"):
        det.detect(torch.zeros(1, 1, 8, 32, 32))
    with pytest.raises(TypeError, match="supports_boxes"):
        PGD(eps=10.0)(det, te.images[:1], [teb[0]])
    with pytest.raises(TypeError, match="list"):
        DAGDetection(max_iter=1)(det, te.images[:1], teb[0])
    with pytest.raises(ValueError, match="2 entries"):
        DAGDetection(max_iter=1)(det, te.images[:1], [teb[0], teb[1]])
    with pytest.raises(TypeError, match="RetinaNetDetector"):
        mr.Detector(torch.nn.Conv2d(1, 1, 3))
    assert isinstance(get_attack("dag-detection"), DAGDetection)


def test_trained_detector_finds_lesions(trained2d):
    res, te, teb, pos = trained2d
    r = evaluate_detector(res.detector, te.images, teb)
    assert r["sensitivity"] >= 0.7 and r["fp_per_volume"] <= 1.0
    assert len(pos) == 4


# --------------------------------------------------------------------------- DAG
def test_dag_makes_the_lesions_vanish(trained2d):
    res, te, teb, pos = trained2d
    det = res.detector
    x = te.images[pos]
    y = [teb[i] for i in pos]
    x0 = x.clone()
    net = det.module
    net.train()
    flags = _mode_flags(net)
    r = DAGDetection()(det, x, y)  # the paper's 150 iterations at most
    assert torch.equal(x, x0)  # inputs not mutated
    assert _mode_flags(net) == flags  # mode restored
    net.eval()
    assert r.success.all()
    lo, hi = det.bounds
    assert float(r.adversarial.min()) >= lo and float(r.adversarial.max()) <= hi
    # independent check on the returned tensor: no detection at the detector's threshold still
    # overlaps a lesion box, for every image reported as a success
    dets = det.detect(r.adversarial)
    for k, ok in enumerate(r.success.tolist()):
        _, hit = match_detections(dets[k], y[k], 0.1)
        assert hit.any() != ok
    assert r.predictions.shape[0] == len(pos) and r.predictions.shape[2] == 6
    assert (r.extra["iterations"] >= 1).all()


def test_dag_budget_and_mask(trained2d):
    res, te, teb, pos = trained2d
    det = res.detector
    x = te.images[pos[:2]]
    y = [teb[i] for i in pos[:2]]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    r = DAGDetection(max_iter=10, eps=20.0)(det, x, y, mask=mask)
    delta = r.adversarial - x
    assert float(delta.abs().max()) <= 20.0 + 1e-3
    assert float(delta[..., :8, :].abs().max()) == 0.0
    assert float(delta[..., :, 24:].abs().max()) == 0.0
    # the same call reproduces the same result (deterministic)
    r2 = DAGDetection(max_iter=10, eps=20.0)(det, x, y, mask=mask)
    assert torch.equal(r.adversarial, r2.adversarial)


def test_dag_targeted_makes_a_box_appear(trained2d):
    res, te, teb, _ = trained2d
    det = res.detector
    neg = [i for i in range(len(teb)) if teb[i]["boxes"].shape[0] == 0][:3]
    x = te.images[neg]
    # a lesion-sized box at the body's centre
    target = [{"boxes": torch.tensor([[13.0, 13.0, 19.0, 19.0]]), "labels": torch.tensor([0])}
              for _ in neg]
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0)} for _ in neg]
    crit = BoxesAppear(det, score_thresh=0.5)  # a confident detection (operating point 0.5)
    before = crit.bind(pack_boxes(empty, 2), pack_boxes(target, 2), "ce")
    assert not before.is_adversarial(det.logits(x), torch.arange(len(neg))).any()
    r = DAGDetection()(det, x, empty, target=target, criterion=crit)
    assert r.success.all()
    for d in det.detect(r.adversarial):
        confident = d["boxes"][d["scores"] >= 0.5]
        assert (box_iou(confident, target[0]["boxes"]) >= 0.3).any()


def test_dag_on_3d_volumes_invariants():
    """3D: an untrained RetinaNet with a low score threshold detects everywhere (prior 0.01);
    DAG must keep bounds, masks, inputs and modes while pushing the box's proposals down."""
    torch.manual_seed(1)
    net = build_retinanet(spatial_dims=3)
    det = mr.Detector(net, bounds=(-1024.0, 3071.0), score_thresh=0.005)
    x = torch.full((1, 1, 16, 16, 16), 40.0) + 10 * torch.randn(1, 1, 16, 16, 16)
    x0 = x.clone()
    y = [{"boxes": torch.tensor([[4.0, 4.0, 4.0, 12.0, 12.0, 12.0]]), "labels": torch.tensor([0])}]
    mask = torch.zeros_like(x)
    mask[..., 2:14, 2:14, 2:14] = 1
    crit = BoxesVanish(det).bind(pack_boxes(y, 3), None, "ce")
    loss0 = float(crit.loss(det.logits(x), torch.arange(1)))
    r = DAGDetection(max_iter=5, gamma=20.0)(det, x, y, mask=mask)
    assert torch.equal(x, x0)
    delta = r.adversarial - x
    assert float(delta[mask == 0].abs().max()) == 0.0
    assert float(r.adversarial.min()) >= -1024 and float(r.adversarial.max()) <= 3071
    assert float(crit.loss(det.logits(r.adversarial), torch.arange(1))) > loss0


def test_detector_folder_round_trip(trained2d, tmp_path):
    res, te, _, _ = trained2d
    save_detector(tmp_path / "det", res.detector, arch_args=res.arch_args)
    det2 = load_detector(tmp_path / "det")
    x = te.images[:4]
    assert torch.allclose(det2.logits(x), res.detector.logits(x), atol=1e-5)
    assert det2.selection == res.detector.selection
    from medrobust.tamper import load_generator

    with pytest.raises(ModelError, match="kind 'detector'; expected kind 'inpainting-generator'"):
        load_generator(tmp_path / "det")
    from medrobust.modelstore import load_model

    with pytest.raises(ModelError, match="holds a detector.*load_detector"):
        load_model(tmp_path / "det")


def test_train_cli_detection(tmp_path, capsys):
    from medrobust.cli import main

    out = tmp_path / "det"
    rc = main(["train", "--task", "detection", "--data", "phantom", "--size", "32", "--limit",
               "32", "--epochs", "1", "--out", str(out)])
    assert rc == 0
    assert "sensitivity at 1 FP/volume" in capsys.readouterr().out
    det = load_detector(out)
    assert det.spatial_dims == 2 and det.num_classes == 1 and det.bounds == (-1024.0, 3071.0)
    import json

    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "detector"
    assert 0.0 <= meta["training"]["test_sensitivity_at_1fp"]["sensitivity"] <= 1.0
    rc = main(["train", "--task", "detection", "--data", "pneumoniamnist", "--out",
               str(tmp_path / "x")])
    assert rc == 2 and "has no boxes" in capsys.readouterr().err
