"""The DataSketches HLL sketches behind unique_users: exact while small, within the
library's stated error past that, mergeable in pieces and across stored sketches (no
database)."""

import random

import numpy as np
import pytest
from datasketches import hll_sketch  # pyrefly: ignore[missing-module-attribute]

import analytics


def users_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.sample(range(1, 2**40), n)


def built_in_pieces(users: list[int], pieces: int = 7) -> bytes:
    blob = b""
    for piece in np.array_split(np.array(users, dtype=np.int64), pieces):  # as batches arrive
        blob = analytics.add_users(blob, (int(u) for u in piece))
    return blob


def test_small_sets_are_exact_but_for_coupon_collisions_and_not_flagged():
    """The issue's measure: 2,000 random sets of 150-300 users. Coupon mode keeps a 26-bit
    coupon per user, so two users collide with probability ~n^2 / 2^27 (0.06 % at 280):
    then it counts one less. Expected ~0.6 such sets in 2,000; seeded, this run has one."""
    rng = random.Random(1)
    off = []
    for trial in range(2_000):
        users = users_of(rng.randint(150, 300), trial)
        count, estimated = analytics.count_of(analytics.unite([built_in_pieces(users, 3)]))
        assert estimated is False
        if count != len(users):
            off.append(len(users) - count)
    assert len(off) <= 3 and all(d == 1 for d in off), off


@pytest.mark.parametrize("n", [10**2, 10**3, 10**4, 10**5, 10**6])
def test_error_within_the_stated_bound_at_each_size(n):
    """Exact in coupon mode (to ~1,500 users at lg_k 14); past it within the library's a
    priori relative error at 3 standard deviations, with the truth inside its bounds."""
    users = users_of(n, n)
    sketch = analytics.unite([built_in_pieces(users)])
    count, estimated = analytics.count_of(sketch)
    if n <= 1_000:
        assert (count, estimated) == (n, False)
        return
    assert estimated is True
    bound = abs(hll_sketch.get_rel_err(True, True, analytics.LG_K, 3))
    assert abs(count - n) <= bound * n, (count, n, bound)
    assert sketch.get_lower_bound(3) <= n <= sketch.get_upper_bound(3)


def test_repeated_users_count_once():
    blob = analytics.add_users(b"", [5, 5, 5, 6, 6, 7] * 100)
    assert analytics.count_of(analytics.sketch_of(blob)) == (3, False)


def test_empty_is_zero_and_exact():
    assert analytics.count_of(analytics.unite([])) == (0, False)
    assert analytics.count_of(analytics.unite([b"", analytics.add_users(b"", [])])) == (0, False)


@pytest.mark.parametrize(("n", "m"), [(0, 0), (0, 50), (40, 0), (300, 500), (20_000, 60_000)])
def test_union_of_stored_sketches_is_the_sketch_of_both(n, m):
    """What a migration and a window do with stored sketches: overlapping users count once,
    exact while the union is small."""
    a = users_of(n, n + 1)
    b = users_of(m, m + 2) + a[: n // 2]
    both = len(set(a) | set(b))
    for order in ((a, b), (b, a)):
        count, estimated = analytics.count_of(
            analytics.unite([built_in_pieces(order[0]), built_in_pieces(order[1])])
        )
        if both <= 1_000:
            assert (count, estimated) == (both, False)
        else:
            assert estimated and abs(count - both) <= 0.03 * both


def test_legacy_registers_read_as_before():
    """Pre-DataSketches registers (kept where the raw log could not rebuild them): sparse and
    dense encodings decode to the same registers, and the estimate is the old one's."""
    rng = np.random.default_rng(3)
    registers = np.zeros(analytics.LEGACY_M, dtype=np.uint8)
    index = rng.choice(analytics.LEGACY_M, 200, replace=False)
    registers[index] = 1
    dense = analytics.LEGACY_DENSE + registers.tobytes()
    order = np.sort(index)
    sparse = b"\x01" + order.astype(np.uint16).tobytes() + registers[order].tobytes()
    assert (analytics.legacy_registers(sparse) == registers).all()
    assert (analytics.legacy_union([sparse, dense, None]) == registers).all()
    # 200 registers at rank 1 out of 16384: about 201 users by linear counting
    assert 195 <= analytics.legacy_estimate(registers) <= 207
