"""Pure-maths tests of care_mla.method.allocation on synthetic spectra."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from care_mla.method.allocation import adjusted_ranks, allocation_error, default_bounds, uniform_ranks


def _random_spectra(seed: int, num_layers: int, length: int) -> list[torch.Tensor]:
    """Descending spectra with layer-specific decay rates and scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_layers):
        decay = torch.rand(1, generator=g).item() * 0.5 + 0.02
        scale = 10 ** (torch.rand(1, generator=g).item() * 4 - 2)
        noise = 1 + 0.2 * torch.rand(length, generator=g, dtype=torch.float64)
        s = scale * noise * torch.exp(-decay * torch.arange(length, dtype=torch.float64))
        out.append(torch.sort(s, descending=True).values.float())
    return out


def _reference_greedy(spectra, total, r_min, r_max, score):
    """Independent O(total·L) version: rescan every layer at every step, direct sums."""
    e = [[float(x) ** 2 for x in s.double().tolist()] for s in spectra]
    L = len(e)
    lo = [min(r_min, len(x)) for x in e]
    hi = [min(r_max, len(x)) for x in e]
    ranks = list(lo)
    while sum(ranks) < total:
        best, best_score = None, None
        for l in range(L):
            if ranks[l] >= hi[l]:
                continue
            r = ranks[l]
            denom = sum(e[l][r:]) if score == "paper" else sum(e[l])
            s = e[l][r] / denom if denom > 0 else 0.0
            if best is None or s > best_score:
                best, best_score = l, s
        ranks[best] += 1
    return ranks


def _round_robin(num_layers, total, caps):
    ranks = [0] * num_layers
    left = total
    while left:
        for i in range(num_layers):
            if left and ranks[i] < caps[i]:
                ranks[i] += 1
                left -= 1
    return ranks


# --------------------------------------------------------------------------- uniform


def test_uniform_remainder_goes_to_first_layers():
    assert uniform_ranks(4, 10) == [3, 3, 2, 2]
    assert uniform_ranks(3, 9) == [3, 3, 3]
    assert uniform_ranks(5, 3) == [1, 1, 1, 0, 0]
    assert uniform_ranks(3, 0) == [0, 0, 0]
    assert uniform_ranks(0, 0) == []


@pytest.mark.parametrize("seed", range(5))
def test_uniform_with_caps_matches_round_robin(seed):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(0, 12, (7,), generator=g).tolist()
    for total in range(sum(caps) + 1):
        ranks = uniform_ranks(7, total, r_max=caps)
        assert sum(ranks) == total
        assert all(r <= c for r, c in zip(ranks, caps))
        assert ranks == _round_robin(7, total, caps)


def test_uniform_scalar_cap_and_infeasible():
    assert uniform_ranks(3, 7, r_max=3) == [3, 2, 2]
    assert uniform_ranks(3, 9, r_max=3) == [3, 3, 3]
    with pytest.raises(ValueError, match=r"0 … 9"):
        uniform_ranks(3, 10, r_max=3)
    with pytest.raises(ValueError, match="3 entries for 2 layers"):
        uniform_ranks(2, 3, r_max=[1, 2, 3])
    with pytest.raises(ValueError):
        uniform_ranks(3, -1)
    with pytest.raises(ValueError):
        uniform_ranks(0, 5)


# --------------------------------------------------------------------------- adjusted: the rule


@pytest.mark.parametrize("score", ["paper", "energy"])
@pytest.mark.parametrize("seed", range(6))
def test_adjusted_follows_greedy_rule(score, seed):
    spectra = _random_spectra(seed, num_layers=6, length=20)
    r_min, r_max = default_bounds(6, 20)
    lo, hi = 6 * r_min, 6 * r_max
    for total in (lo, lo + 1, 36, 50, hi - 1, hi):
        ranks = adjusted_ranks(spectra, total, r_min=r_min, r_max=r_max, score=score)
        assert sum(ranks) == total
        assert all(r_min <= r <= r_max for r in ranks)
        assert ranks == _reference_greedy(spectra, total, r_min, r_max, score)


@pytest.mark.parametrize("score", ["paper", "energy"])
def test_adjusted_mixed_lengths_and_per_layer_bounds(score):
    spectra = _random_spectra(11, num_layers=5, length=16)
    spectra[1] = spectra[1][:3]  # a short layer: r_min 4 is clipped to 3, and so is r_max
    spectra[3] = spectra[3][:9]
    r_min, r_max = [2, 4, 0, 1, 3], [10, 8, 4, 12, 16]
    caps = [10, 3, 4, 9, 16]
    floor = [2, 3, 0, 1, 3]
    for total in range(sum(floor), sum(caps) + 1, 3):
        ranks = adjusted_ranks(spectra, total, r_min=r_min, r_max=r_max, score=score)
        assert sum(ranks) == total
        assert all(f <= r <= c for f, r, c in zip(floor, ranks, caps))


def test_adjusted_ties_go_to_lowest_layer():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    spectra = [s.clone(), s.clone(), s.clone()]
    assert adjusted_ranks(spectra, 1, r_min=0, r_max=4) == [1, 0, 0]
    assert adjusted_ranks(spectra, 2, r_min=0, r_max=4) == [1, 1, 0]
    assert adjusted_ranks(spectra, 4, r_min=0, r_max=4) == [2, 1, 1]
    # all-zero spectra score 0 everywhere: ranks still spent, lowest index first
    zeros = [torch.zeros(3), torch.zeros(3)]
    assert adjusted_ranks(zeros, 4, r_min=0, r_max=3) == [3, 1]


def test_energy_and_paper_scores_differ():
    """Same energy: energy-score picks the larger next σ²; paper-score the larger σ²/tail."""
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0]).sqrt()  # σ² = 1,1,1,1
    steep = torch.tensor([2.2, 1.0, 0.5, 0.3]).sqrt()  # σ² sums to 4 too
    # after r_min = 1: flat scores 1/4 (energy) or 1/3 (paper); steep 1/4 or 1/1.8
    assert adjusted_ranks([flat, steep], 3, r_min=1, r_max=4, score="energy") == [2, 1]
    assert adjusted_ranks([flat, steep], 3, r_min=1, r_max=4, score="paper") == [1, 2]


# --------------------------------------------------------------------------- adjusted: quality


def _equal_energy_spectra(num_layers: int, length: int) -> list[torch.Tensor]:
    """Very different decay (from nearly flat to steep), all with the same total energy."""
    out = []
    for l, decay in enumerate(torch.linspace(0.01, 1.0, num_layers).tolist()):
        s = torch.exp(-decay * torch.arange(length, dtype=torch.float64)) * (1 + 0.01 * l)
        out.append((s / s.norm()).float())
    return out


@pytest.mark.parametrize("mean_rank", [2, 4, 8, 12])
def test_energy_allocation_beats_uniform_on_different_decays(mean_rank):
    L, n = 8, 32
    spectra = _equal_energy_spectra(L, n)
    r_min, r_max = default_bounds(mean_rank, n)
    total = mean_rank * L
    energy = adjusted_ranks(spectra, total, r_min=r_min, r_max=r_max, score="energy")
    uniform = uniform_ranks(L, total)
    e_adj, e_uni = allocation_error(spectra, energy), allocation_error(spectra, uniform)
    assert e_adj <= e_uni
    assert e_adj < 0.95 * e_uni  # and by a clear margin on such spectra
    if mean_rank >= 4:  # beyond the first few directions, flat layers need more than steep ones
        assert energy[0] > mean_rank > energy[-1]
    # the paper's score, on the same spectra, loses to uniform (CARE.md §5b)
    paper = adjusted_ranks(spectra, total, r_min=r_min, r_max=r_max, score="paper")
    assert allocation_error(spectra, paper) > e_uni


@pytest.mark.parametrize("seed", range(4))
def test_energy_greedy_is_optimal_for_relative_error(seed):
    """Exhaustive check: no allocation within the bounds has a lower Σ tail_l/energy_l."""
    spectra = _random_spectra(100 + seed, num_layers=4, length=8)
    r_min, r_max = 1, 6
    for total in (6, 11, 17):
        ranks = adjusted_ranks(spectra, total, r_min=r_min, r_max=r_max, score="energy")
        best = min(
            allocation_error(spectra, list(c), relative=True)
            for c in itertools.product(range(r_min, r_max + 1), repeat=4)
            if sum(c) == total
        )
        assert allocation_error(spectra, ranks, relative=True) == pytest.approx(best, rel=1e-12)


def test_paper_score_runs_away_to_the_bounds():
    """CARE.md §5b: σ²/tail grows as the tail shrinks, so layers end at r_min or r_max."""
    L, n, mean_rank = 8, 64, 16
    spectra = _random_spectra(7, num_layers=L, length=n)
    r_min, r_max = default_bounds(mean_rank, n)
    paper = adjusted_ranks(spectra, L * mean_rank, r_min=r_min, r_max=r_max, score="paper")
    energy = adjusted_ranks(spectra, L * mean_rank, r_min=r_min, r_max=r_max, score="energy")
    at_bounds = lambda ranks: sum(r in (r_min, r_max) for r in ranks)  # noqa: E731
    assert at_bounds(paper) >= L - 1
    assert at_bounds(energy) < at_bounds(paper)


# --------------------------------------------------------------------------- errors & helpers


def test_infeasible_budgets_name_the_feasible_range():
    spectra = _random_spectra(3, num_layers=4, length=10)
    spectra[2] = spectra[2][:5]  # caps: 8, 8, 5, 8 -> largest 29; floors 2 each -> smallest 8
    for total in (7, 30):
        with pytest.raises(ValueError, match=re.escape("8 … 29")):
            adjusted_ranks(spectra, total, r_min=2, r_max=8)
    assert sum(adjusted_ranks(spectra, 8, r_min=2, r_max=8)) == 8
    assert sum(adjusted_ranks(spectra, 29, r_min=2, r_max=8)) == 29


def test_adjusted_rejects_bad_inputs():
    s = [torch.tensor([3.0, 2.0, 1.0])]
    with pytest.raises(ValueError, match="score"):
        adjusted_ranks(s, 2, r_min=0, r_max=3, score="tail")
    with pytest.raises(ValueError, match="descending"):
        adjusted_ranks([torch.tensor([1.0, 2.0])], 1, r_min=0, r_max=2)
    with pytest.raises(ValueError, match="non-negative"):
        adjusted_ranks([torch.tensor([1.0, -2.0])], 1, r_min=0, r_max=2)
    with pytest.raises(ValueError, match="r_min 3 is above r_max 1"):
        adjusted_ranks(s, 2, r_min=3, r_max=1)
    with pytest.raises(ValueError, match="2 entries for 1 layers"):
        adjusted_ranks(s, 2, r_min=[0, 0], r_max=3)


def test_default_bounds():
    assert default_bounds(64, 192) == (32, 128)
    assert default_bounds(128, 192) == (64, 192)
    assert default_bounds(5, 64) == (2, 10)
    assert default_bounds(0, 64) == (0, 0)
    with pytest.raises(ValueError, match="exceeds"):
        default_bounds(65, 64)


def test_allocation_error():
    spectra = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 0.0])]
    assert allocation_error(spectra, [0, 0]) == pytest.approx(18.0)
    assert allocation_error(spectra, [1, 0]) == pytest.approx(9.0)
    assert allocation_error(spectra, [3, 2]) == 0.0
    assert allocation_error(spectra, [1, 1], relative=True) == pytest.approx(5 / 14)
    with pytest.raises(ValueError, match="outside"):
        allocation_error(spectra, [4, 0])
    with pytest.raises(ValueError, match="2 ranks"):
        allocation_error(spectra[:1], [1, 1])
