"""Norm parts: measure, projection, steepest direction and uniform random start."""

from __future__ import annotations

import pytest
import torch

from medrobust.norms import L1, L2, Linf, get_norm, measure_all, project_l1_ball


def test_measure_all_counts_elements_and_pixels():
    delta = torch.zeros(2, 3, 4, 4)
    delta[0, :, 1, 1] = 0.5  # one pixel, three channels
    delta[1, 0, 0, 0] = -2.0
    m = measure_all(delta)
    assert m["l0"].tolist() == [3, 1]
    assert m["pixels"].tolist() == [1, 1]
    assert m["linf"].tolist() == [0.5, 2.0]
    assert torch.allclose(m["l2"], torch.tensor([0.75**0.5, 2.0]))
    assert torch.allclose(m["l1"], torch.tensor([1.5, 2.0]))


def test_l1_projection_matches_a_brute_force_solution():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, generator=g) * 3
    eps = torch.tensor([0.5, 1.0, 2.0, 100.0, 0.0])
    p = project_l1_ball(v, eps)
    assert torch.all(p.abs().sum(1) <= eps + 1e-5)
    assert torch.equal(p[3], v[3])  # inside the ball: unchanged
    # optimality: soft-thresholding by the theta found by bisection gives the same point
    for i in range(3):
        lo, hi = 0.0, float(v[i].abs().max())
        for _ in range(100):
            mid = (lo + hi) / 2
            if (v[i].abs() - mid).clamp_min(0).sum() > eps[i]:
                lo = mid
            else:
                hi = mid
        ref = v[i].sign() * (v[i].abs() - hi).clamp_min(0)
        assert torch.allclose(p[i], ref, atol=1e-5)


@pytest.mark.parametrize("norm", [Linf(), L2(), L1()])
def test_random_start_lies_in_the_ball(norm):
    g = torch.Generator().manual_seed(0)
    eps = torch.tensor([0.1, 1.0, 3.0])
    r = norm.random(torch.Size((3, 2, 5, 5)), eps, g)
    assert torch.all(norm.measure(r) <= eps * (1 + 1e-5))
    assert torch.all(norm.measure(r) > 0)


@pytest.mark.parametrize("norm", [Linf(), L2(), L1(0.1)])
def test_direction_has_unit_norm_and_ascends(norm):
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    d = norm.direction(g)
    assert torch.all((d * g).sum(1) > 0)
    if isinstance(norm, L2):
        assert torch.allclose(d.norm(dim=1), torch.ones(4))
    if isinstance(norm, L1):
        assert torch.allclose(d.abs().sum(1), torch.ones(4))
        assert torch.all((d != 0).sum(1) == 5)  # 10% of 50 coordinates


def test_l1_direction_skips_coordinates_blocked_by_the_box():
    g = torch.tensor([[5.0, 1.0, -0.5]])
    x = torch.tensor([[1.0, 0.5, 0.5]])  # the first coordinate is at the upper bound
    d = L1(0.34).direction(g, x, (0.0, 1.0))
    assert d[0, 0] == 0 and d[0, 1] > 0


def test_get_norm_names_and_errors():
    assert isinstance(get_norm("Linf"), Linf) and isinstance(get_norm("l2"), L2)
    with pytest.raises(ValueError, match="unknown norm"):
        get_norm("l3")
