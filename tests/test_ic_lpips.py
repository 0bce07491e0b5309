"""IC-LPIPS variants on scalar 'images' with an injected exact distance: every value below is computed by hand."""
import math

import numpy as np
import pytest

from ops.metrics.ic_lpips import assign_clusters, block_size, ic_ad, ic_dfm, pair_matrix


class AbsDistance:
    """d(a, b) = |a - b| on scalars (or a scaled asymmetric variant to see ordered pairs)."""

    def __init__(self, up: float = 1.0, down: float = 1.0):
        self.up, self.down = up, down

    def embed(self, items):
        return np.asarray(items, dtype=float)

    def pairwise(self, fa, fb):
        d = fb[None, :] - fa[:, None]
        return np.where(d > 0, self.up * d, -self.down * d)


CENTERS = [0.0, 10.0, 50.0, 100.0]
# 1, 2, 4 -> centre 0; 9, 11, 30 -> centre 10; 49 -> centre 50 (singleton); nothing near 100 (empty)
GENERATED = [1.0, 9.0, 2.0, 11.0, 49.0, 4.0, 30.0]


def test_assignment_nearest_centre_ties_to_lowest_index():
    labels = assign_clusters(GENERATED + [5.0], CENTERS, AbsDistance(), chunk=3)
    assert labels.tolist() == [0, 1, 0, 1, 2, 0, 1, 0]  # 5.0 is equidistant from 0 and 10 -> centre 0


def test_ad_variant_means_pairs_and_drops_small_clusters():
    r = ic_ad(GENERATED, CENTERS, AbsDistance(), max_members=50, seed=0)
    # cluster 0 {1,2,4}: (1+3+2)/3 = 2; cluster 1 {9,11,30}: (2+21+19)/3 = 14; singleton and empty dropped
    assert r.value == pytest.approx(8.0)
    assert r.sizes == (3, 3, 1, 0)
    assert r.cluster_values[:2] == pytest.approx((2.0, 14.0)) and all(math.isnan(v) for v in r.cluster_values[2:])


def test_dfm_variant_counts_small_clusters_as_zero_and_rz_drops_them():
    r = ic_dfm(GENERATED, CENTERS, AbsDistance(), cap=200)
    assert r.value == pytest.approx((2.0 + 14.0 + 0.0 + 0.0) / 4)
    assert r.value_rz == pytest.approx(8.0)


def test_dfm_cap_keeps_first_arrivals_in_generation_order():
    r = ic_dfm(GENERATED, CENTERS, AbsDistance(), cap=2)
    # cluster 0 keeps {1, 2} -> 1; cluster 1 keeps {9, 11} -> 2 (4.0 and 30.0 arrive too late)
    assert r.sizes == (2, 2, 1, 0)
    assert r.value == pytest.approx((1.0 + 2.0) / 4) and r.value_rz == pytest.approx(1.5)


def test_dfm_uses_all_ordered_pairs():
    # d(a,b) = 2(b-a) upwards, (a-b) downwards: each unordered pair contributes 3|a-b| over 2 ordered pairs
    r = ic_dfm([1.0, 2.0, 4.0], [0.0], AbsDistance(up=2.0, down=1.0))
    assert r.value == pytest.approx(3 * (1 + 3 + 2) / 6)


def test_dfm_rz_drops_zero_clusters_like_the_reference():
    r = ic_dfm([5.0, 5.0, 1.0, 2.0], [5.0, 0.0], AbsDistance())
    assert r.cluster_values == pytest.approx((0.0, 1.0))  # identical members give exactly 0
    assert r.value == pytest.approx(0.5) and r.value_rz == pytest.approx(1.0)


def test_all_singletons_give_nan_not_zero():
    assert math.isnan(ic_ad([1.0, 11.0], [0.0, 10.0], AbsDistance()).value)
    r = ic_dfm([1.0, 11.0], [0.0, 10.0], AbsDistance())
    assert r.value == 0.0 and math.isnan(r.value_rz)


def test_ad_seeded_subsampling_follows_the_documented_rule():
    members = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # all join the single centre 0 (k = 0)
    seed = 7
    kept = np.random.default_rng(seed + 0).permutation(np.arange(6))[:3]
    vals = [members[i] for i in kept]
    expected = np.mean([abs(vals[0] - vals[1]), abs(vals[0] - vals[2]), abs(vals[1] - vals[2])])
    r = ic_ad(members, [0.0], AbsDistance(), max_members=3, seed=seed)
    assert r.value == pytest.approx(expected) and r.sizes == (3,)
    assert ic_ad(members, [0.0], AbsDistance(), max_members=3, seed=seed).value == r.value  # reproducible
    assert len({ic_ad(members, [0.0], AbsDistance(), max_members=3, seed=s).value for s in range(10)}) > 1
    full = ic_ad(members, [0.0], AbsDistance(), max_members=50, seed=seed).value
    all_pairs = np.mean([abs(a - b) for i, a in enumerate(members) for b in members[i + 1:]])
    assert full == pytest.approx(all_pairs)


def test_no_centre_is_a_clear_error():
    with pytest.raises(ValueError, match="cluster centre"):
        ic_ad([1.0], [], AbsDistance())


class WideDistance(AbsDistance):
    """AbsDistance with ``width`` float64 features per item (so a byte budget bites) that records the size of
    every embed call."""

    def __init__(self, width: int = 1000, **kw):
        super().__init__(**kw)
        self.width, self.calls = width, []

    def embed(self, items):
        items = list(items)
        self.calls.append(len(items))
        return np.repeat(np.asarray(items, dtype=float)[:, None], self.width, axis=1)

    def pairwise(self, fa, fb):
        return super().pairwise(fa[:, 0], fb[:, 0])


def test_blocked_pair_matrix_equals_the_whole_one_ordered_pairs_included():
    items = list(np.random.default_rng(3).uniform(0, 10, 21))
    dist = AbsDistance(up=2.0, down=1.0)  # asymmetric: d[j, i] must come from pairwise(j, i), not a transpose
    expected = np.array([[dist.pairwise(np.array([a]), np.array([b]))[0, 0] for b in items] for a in items])
    np.testing.assert_array_equal(pair_matrix(items, dist, block=21), expected)
    np.testing.assert_array_equal(pair_matrix(items, dist, block=8), expected)


def test_ic_features_held_at_once_follow_the_budget_not_the_cluster_size():
    per_item = 1000 * 8
    budget = 3 * 16 * per_item  # two blocks and a temporary of 16 items
    generated = list(np.random.default_rng(4).uniform(0, 4, 100))  # one cluster of 100 around centre 0
    assert block_size(generated, WideDistance(), budget) == 16
    small, whole = WideDistance(), WideDistance()
    r = ic_dfm(generated, [0.0, 100.0], small, cap=200, budget_bytes=budget)
    ref = ic_dfm(generated, [0.0, 100.0], whole, cap=200, budget_bytes=10 ** 12)
    assert r.sizes == ref.sizes == (100, 0) and r.value == pytest.approx(ref.value, rel=1e-12)
    assert max(small.calls) == 16 and max(whole.calls) == 100
    a = ic_ad(generated, [0.0], small, max_members=50, budget_bytes=budget)
    assert a.value == pytest.approx(ic_ad(generated, [0.0], whole, max_members=50, budget_bytes=10 ** 12).value,
                                    rel=1e-12)
    assert max(small.calls) == 16
