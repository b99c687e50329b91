"""Byzantine attacks: seeded client choice, exact transforms, determinism, label flipping."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from fedsqueeze.algorithms.attacks import ALIE, ATTACKS, flip_labels, make_attack
from fedsqueeze.errors import ConfigError


def updates(n: int = 10, d: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) for _ in range(n)]


def test_byzantine_subset_is_seeded_and_sized() -> None:
    a = make_attack("sign_flip", 0.2, seed=1)
    byz = a.byzantine_clients(50)
    assert len(byz) == 10 and all(0 <= c < 50 for c in byz)
    assert byz == make_attack("gaussian", 0.2, seed=1).byzantine_clients(50)  # same seed, same set
    assert byz != make_attack("sign_flip", 0.2, seed=2).byzantine_clients(50)
    assert len(make_attack("sign_flip", 0.25, seed=1).byzantine_clients(10)) == 2  # floor
    assert make_attack("sign_flip", 0.0).byzantine_clients(10) == frozenset()


def test_sign_flip_and_scaled_exact() -> None:
    ups = updates()
    ids = list(range(10))
    cases = [("sign_flip", {}, -1.0), ("sign_flip", {"scale": 3.0}, -3.0), ("scaled", {"scale": 7.5}, 7.5)]
    for name, opts, factor in cases:
        att = make_attack(name, 0.3, seed=4, **opts)
        byz = att.byzantine_clients(10)
        out = att(ups, ids, num_clients=10, round=2)
        for c in ids:
            if c in byz:
                assert torch.equal(out[c], ups[c] * factor)
            else:
                assert out[c] is ups[c]  # honest updates are passed through untouched


def test_gaussian_is_deterministic_per_round_and_client_not_order() -> None:
    att = make_attack("gaussian", 0.5, seed=9, std=2.0)
    ups = updates(n=10, d=20_000)
    ids = list(range(10))
    byz = sorted(att.byzantine_clients(10))
    r0 = att(ups, ids, num_clients=10, round=0)
    assert all(torch.equal(a, b) for a, b in zip(r0, att(ups, ids, num_clients=10, round=0), strict=True))
    r1 = att(ups, ids, num_clients=10, round=1)
    assert not torch.equal(r0[byz[0]], r1[byz[0]])
    # a client's draw does not depend on where it sits in the round's list
    rev = att(ups[::-1], ids[::-1], num_clients=10, round=0)[::-1]
    assert all(torch.equal(a, b) for a, b in zip(r0, rev, strict=True))
    noise = r0[byz[0]]
    assert float(noise.std()) == pytest.approx(2.0, rel=0.03)
    assert abs(float(noise.mean())) < 0.05
    assert float((noise - ups[byz[0]]).norm()) > 1.0  # replaced, not added


def test_subset_of_clients_in_a_round() -> None:
    att = make_attack("sign_flip", 0.2, seed=0)
    byz = att.byzantine_clients(100)
    sampled = sorted(byz)[:2] + [c for c in range(100) if c not in byz][:3]
    ups = updates(n=5)
    out = att(ups, sampled, num_clients=100)
    assert [not torch.equal(o, u) for o, u in zip(out, ups, strict=True)] == [True, True] + [False] * 3


def test_alie_matches_paper_formula() -> None:
    ups = updates(n=10, d=50)
    att = make_attack("alie", 0.2, seed=3)
    byz = att.byzantine_clients(10)
    out = att(ups, list(range(10)), num_clients=10)
    n, f = 10, 2
    s = n // 2 + 1 - f
    z = NormalDist().inv_cdf((n - s) / n)
    assert ALIE.z_max(n, f) == pytest.approx(z)
    stacked = torch.stack(ups).double()
    want = (stacked.mean(0) - z * stacked.std(0)).float()
    for c in range(10):
        if c in byz:
            assert torch.allclose(out[c], want, atol=1e-6)
        else:
            assert out[c] is ups[c]
    assert ALIE.z_max(5, 4) > 0  # Byzantine majority: s clamped to 1, still finite
    fixed = make_attack("alie", 0.2, seed=3, z=1.5)(ups, list(range(10)), num_clients=10)
    c = min(byz)
    assert torch.allclose(fixed[c], (stacked.mean(0) - 1.5 * stacked.std(0)).float(), atol=1e-6)


def test_flip_labels_mapping() -> None:
    y = torch.arange(10)
    assert torch.equal(flip_labels(y, 10), torch.arange(9, -1, -1))
    assert torch.equal(flip_labels(flip_labels(y, 10), 10), y)  # an involution
    y2 = torch.tensor([[0, 1], [2, 2]], dtype=torch.int32)
    out = flip_labels(y2, 3)
    assert out.dtype == torch.int32 and torch.equal(out, torch.tensor([[2, 1], [0, 0]], dtype=torch.int32))
    half = flip_labels(torch.zeros(100, dtype=torch.long), 10, seed=5, flip_fraction=0.3)
    assert int((half == 9).sum()) == 30 and int((half == 0).sum()) == 70
    assert torch.equal(half, flip_labels(torch.zeros(100, dtype=torch.long), 10, seed=5, flip_fraction=0.3))


@pytest.mark.parametrize(
    ("y", "k", "err", "match"),
    [
        (torch.tensor([0, 10]), 10, ValueError, r"\[0, 10\)"),
        (torch.tensor([-1, 1]), 10, ValueError, "labels must be in"),
        (torch.tensor([0.0, 1.0]), 10, ValueError, "integer"),
        (torch.tensor([0, 1]), 1, ConfigError, "num_classes"),
    ],
)
def test_flip_labels_rejects_bad_input(y: torch.Tensor, k: int, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        flip_labels(y, k)


def test_label_flip_attack_acts_on_data_only() -> None:
    att = make_attack("label_flip", 0.3, seed=2)
    assert att.poisons_data and not make_attack("sign_flip", 0.3).poisons_data
    ups = updates()
    out = att(ups, list(range(10)), num_clients=10)
    assert all(o is u for o, u in zip(out, ups, strict=True))
    y = torch.tensor([0, 3, 9])
    assert torch.equal(
        att.poison_labels(y, 10, client=min(att.byzantine_clients(10))), torch.tensor([9, 6, 0])
    )
    assert make_attack("sign_flip", 0.3).poison_labels(y, 10, client=0) is y


@pytest.mark.parametrize(
    ("name", "fraction", "opts", "match"),
    [
        ("sign_flp", 0.1, {}, "did you mean 'sign_flip'"),
        ("sign_flip", 1.0, {}, r"\[0, 1\)"),
        ("sign_flip", -0.1, {}, r"\[0, 1\)"),
        ("sign_flip", 0.1, {"scale": 0.0}, "scale"),
        ("sign_flip", 0.1, {"std": 1.0}, "no option 'std'"),
        ("gaussian", 0.1, {"std": -1.0}, "std"),
        ("scaled", 0.1, {"scale": float("inf")}, "finite"),
        ("label_flip", 0.1, {"flip_fraction": 0.0}, "flip_fraction"),
    ],
)
def test_make_attack_errors(name: str, fraction: float, opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_attack(name, fraction, **opts)


def test_call_validation() -> None:
    att = make_attack("sign_flip", 0.2)
    with pytest.raises(ValueError, match="client ids"):
        att(updates(n=3), [0, 1], num_clients=10)
    with pytest.raises(ValueError, match="outside"):
        att(updates(n=2), [0, 10], num_clients=10)
    with pytest.raises(ConfigError, match="num_clients"):
        att.byzantine_clients(0)


def test_registry_names() -> None:
    assert set(ATTACKS) == {"sign_flip", "scaled", "gaussian", "alie", "label_flip"}
