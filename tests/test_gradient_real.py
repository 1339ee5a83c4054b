"""Behaviour of the gradient attacks on small CNNs trained on real MedMNIST data (conftest.py)."""

from __future__ import annotations

import torch

from medrobust.attacks import BIM, FGSM, MIFGSM, PGD


def assert_learned(m) -> None:
    assert m.clean_accuracy >= m.majority_rate + 0.10, (
        f"the test model did not learn: clean accuracy {m.clean_accuracy:.3f} vs majority-class "
        f"rate {m.majority_rate:.3f}"
    )


def test_models_beat_the_majority_class(pneumonia_model, retina_model):
    assert_learned(pneumonia_model)
    assert_learned(retina_model)


def test_pgd_is_at_least_as_strong_as_fgsm(pneumonia_model):
    m = pneumonia_model
    assert_learned(m)
    for eps in (1 / 255, 2 / 255):
        fgsm = FGSM(eps=eps)(m.model, m.x, m.y)
        pgd = PGD(eps=eps, steps=10, seed=0)(m.model, m.x, m.y)
        assert pgd.robust_accuracy <= fgsm.robust_accuracy
        bim = BIM(eps=eps, steps=10)(m.model, m.x, m.y)
        mi = MIFGSM(eps=eps, steps=10)(m.model, m.x, m.y)
        assert bim.robust_accuracy <= fgsm.robust_accuracy
        assert mi.robust_accuracy <= fgsm.robust_accuracy


def test_robust_accuracy_never_rises_with_eps(pneumonia_model):
    m = pneumonia_model
    assert_learned(m)
    accs = []
    for eps in (0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255):
        accs.append(PGD(eps=eps, steps=10, seed=0)(m.model, m.x, m.y).robust_accuracy)
    assert accs[0] == m.clean_accuracy
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[-1] < 0.2 * accs[0], accs  # a large budget breaks this undefended model


def test_l2_and_l1_pgd_reduce_accuracy(pneumonia_model):
    m = pneumonia_model
    l2 = [PGD(eps=e, norm="l2", steps=10, seed=0)(m.model, m.x, m.y).robust_accuracy
          for e in (0.1, 0.5)]
    l1 = [PGD(eps=e, norm="l1", steps=20, seed=0)(m.model, m.x, m.y).robust_accuracy
          for e in (1.0, 5.0)]
    assert l2[1] <= l2[0] < m.clean_accuracy
    assert l1[1] <= l1[0] < m.clean_accuracy


def test_early_stop_spends_fewer_passes_for_the_same_robust_accuracy(pneumonia_model):
    m = pneumonia_model
    full = PGD(eps=2 / 255, steps=10, seed=0)(m.model, m.x, m.y)
    fast = PGD(eps=2 / 255, steps=10, seed=0, early_stop=True)(m.model, m.x, m.y)
    assert fast.backward_passes < full.backward_passes
    assert abs(fast.robust_accuracy - full.robust_accuracy) <= 0.02
    # without early stop every sample spends the full budget
    assert full.backward_passes == 10 * len(m.y)


def test_restarts_never_hurt(pneumonia_model):
    m = pneumonia_model
    one = PGD(eps=1 / 255, steps=5, seed=3)(m.model, m.x, m.y)
    three = PGD(eps=1 / 255, steps=5, restarts=3, seed=3)(m.model, m.x, m.y)
    assert three.robust_accuracy <= one.robust_accuracy


def test_targeted_pgd_reaches_the_target_on_retinamnist(retina_model):
    m = retina_model
    assert_learned(m)
    g = torch.Generator().manual_seed(0)
    target = (m.y + torch.randint(1, 5, m.y.shape, generator=g)) % 5
    # a moderate budget: 24/255 is about 9% of the intensity range
    res = PGD(eps=24 / 255, steps=20, seed=0)(m.model, m.x, m.y, target=target)
    assert torch.all(target != m.y)
    assert res.success.float().mean() >= 0.90
    assert torch.equal(res.success, res.predictions == target)


def test_mask_confines_the_attack_to_a_region(pneumonia_model):
    m = pneumonia_model
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 8:20, 8:20] = 1  # a central region of interest
    res = PGD(eps=8 / 255, steps=10, seed=0)(m.model, m.x, m.y, mask=mask)
    delta = (res.adversarial - m.x).abs()
    assert delta[..., :8, :].max() == 0 and delta[..., 20:, :].max() == 0
    assert res.robust_accuracy < m.clean_accuracy
