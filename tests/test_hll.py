"""The HyperLogLog sketches behind unique_users: merging and accuracy (no database)."""

import random

import numpy as np
import pytest

import analytics


def registers_of(users: np.ndarray) -> np.ndarray:
    index, rank = analytics.hll_updates(users)
    registers = np.zeros(analytics.M, dtype=np.uint8)
    np.maximum.at(registers, index, rank)
    return registers


@pytest.mark.parametrize("n", [0, 1, 37, 1_000, 5_000, 20_000, 300_000])
def test_sketch_merged_in_pieces_equals_one_built_at_once_and_is_within_2_percent(n):
    rng = random.Random(n)
    users = np.array([rng.randint(1, 2**40 - 1) for _ in range(n)], dtype=np.int64)
    blob = b""
    for piece in np.array_split(users, 7):  # as batches arrive
        blob = analytics.merge(blob, *analytics.hll_updates(piece))
    assert (analytics.decode(blob) == registers_of(users)).all()
    assert abs(analytics.estimate(analytics.decode(blob)) - n) <= 0.02 * n
    # small sets stay sparse (3 bytes a register), big ones go dense (one byte each)
    assert len(blob) <= max(1, 3 * n + 1) and len(blob) <= analytics.M + 1


def test_repeated_users_count_once():
    users = np.array([5, 5, 5, 6, 6, 7] * 100, dtype=np.int64)
    blob = analytics.merge(b"", *analytics.hll_updates(users))
    assert analytics.estimate(analytics.decode(blob)) == 3


def test_union_of_sketches_estimates_the_union():
    rng = random.Random(7)
    a = {rng.randint(1, 2**40) for _ in range(30_000)}
    b = {rng.randint(1, 2**40) for _ in range(30_000)} | set(list(a)[:10_000])
    merged = np.maximum(
        registers_of(np.fromiter(a, np.int64)), registers_of(np.fromiter(b, np.int64))
    )
    assert abs(analytics.estimate(merged) - len(a | b)) <= 0.02 * len(a | b)


@pytest.mark.parametrize(("n", "m"), [(0, 0), (0, 50), (40, 0), (300, 5_000), (20_000, 60_000)])
def test_union_of_stored_sketches_is_the_sketch_of_both(n, m):
    """What a migration does to a group's sketches and those of its new id: sparse or
    dense, overlapping users count once."""
    rng = random.Random(n + m)
    a = np.array([rng.randint(1, 2**40 - 1) for _ in range(n)], dtype=np.int64)
    b = np.array([rng.randint(1, 2**40 - 1) for _ in range(m)], dtype=np.int64)
    b = np.concatenate([b, a[: n // 2]])
    blob_a = analytics.merge(b"", *analytics.hll_updates(a))
    blob_b = analytics.merge(b"", *analytics.hll_updates(b))
    both = registers_of(np.concatenate([a, b]))
    for merged in (analytics.union(blob_a, blob_b), analytics.union(blob_b, blob_a)):
        assert (analytics.decode(merged) == both).all()
