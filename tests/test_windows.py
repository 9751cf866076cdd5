"""Unit tests for stream_detector.windows.WindowStore."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.windows import SnapshotError, EVICTED_CAPACITY, EVICTED_IDLE, WindowStore


def row(i: int, n_features: int = 2) -> np.ndarray:
    return np.arange(n_features, dtype=np.float32) + 10.0 * i


def window_of(store: WindowStore, slot: int) -> np.ndarray:
    out = np.full((store.window, store.n_features), np.nan, dtype=np.float32)
    store.copy_window(slot, out)
    return out


class Evictions:
    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, reason: str, n: int) -> None:
        self.calls.append((reason, n))


def test_window_is_oldest_first_after_the_ring_wraps():
    store = WindowStore(window=3, n_features=2)
    slot = store.slot("k", now=0.0)
    for i in range(3):
        store.push(slot, row(i))
    np.testing.assert_array_equal(window_of(store, slot), np.stack([row(0), row(1), row(2)]))
    for i in range(3, 8):  # wraps more than once, ending mid-ring
        count = store.push(slot, row(i))
        expected = np.stack([row(j) for j in range(i - 2, i + 1)])
        np.testing.assert_array_equal(window_of(store, slot), expected)
        assert count == i + 1
    assert store.count(slot) == 8


def test_next_row_and_commit_write_in_place():
    store = WindowStore(window=2, n_features=2)
    slot = store.slot("k", 0.0)
    for i in range(3):
        store.next_row(slot)[:] = row(i)
        assert store.commit(slot) == i + 1
    np.testing.assert_array_equal(window_of(store, slot), np.stack([row(1), row(2)]))


def test_window_not_full_refuses_copy():
    store = WindowStore(window=4, n_features=2)
    slot = store.slot("k", 0.0)
    for i in range(3):
        store.push(slot, row(i))
    assert not store.is_full(slot)
    with pytest.raises(ValueError, match="not full"):
        window_of(store, slot)
    store.push(slot, row(3))
    assert store.is_full(slot)
    np.testing.assert_array_equal(window_of(store, slot)[0], row(0))


def test_keys_do_not_share_windows():
    store = WindowStore(window=2, n_features=2)
    a, b = store.slot("a", 0.0), store.slot("b", 0.0)
    assert a != b
    for i in range(2):
        store.push(a, row(i))
        store.push(b, row(100 + i))
    np.testing.assert_array_equal(window_of(store, a), np.stack([row(0), row(1)]))
    np.testing.assert_array_equal(window_of(store, b), np.stack([row(100), row(101)]))
    assert store.slot("a", 1.0) == a  # a known key keeps its slot


def test_lru_eviction_at_max_keys_evicts_least_recently_seen_and_reports_capacity():
    evictions = Evictions()
    store = WindowStore(window=2, n_features=2, state_size=1, max_keys=3, on_evict=evictions)
    slots = {k: store.slot(k, now=t) for t, k in enumerate("abc")}
    for k, s in slots.items():
        store.push(s, row(1))
        store.state(s)[0] = 5.0
    store.slot("a", now=3.0)  # a is now the most recent; b the least
    new = store.slot("d", now=4.0)
    assert evictions.calls == [(EVICTED_CAPACITY, 1)]
    assert "b" not in store and {"a", "c", "d"} <= {k for k in "abcd" if k in store}
    assert len(store) == 3
    # The new key reuses the evicted slot, wiped: no history leaks from b to d.
    assert new == slots["b"]
    assert store.count(new) == 0 and store.state(new)[0] == 0.0
    assert store.count(slots["a"]) == 1 and store.state(slots["a"])[0] == 5.0
    store.slot("e", now=5.0)
    assert "c" not in store and evictions.calls == [(EVICTED_CAPACITY, 1)] * 2


def test_idle_ttl_eviction_reports_idle():
    evictions = Evictions()
    store = WindowStore(window=2, n_features=1, ttl_s=10.0, on_evict=evictions)
    store.slot("a", now=0.0)
    store.slot("b", now=5.0)
    store.slot("c", now=1.0)
    store.slot("c", now=8.0)  # touched again: fresh
    assert store.evict_idle(now=9.0) == 0
    assert store.evict_idle(now=12.0) == 1
    assert "a" not in store and "b" in store and "c" in store
    assert evictions.calls == [(EVICTED_IDLE, 1)]
    assert store.evict_idle(now=15.0) == 1  # exactly TTL old counts as idle
    assert "b" not in store and "c" in store
    assert store.evict_idle(now=1e9) == 1 and len(store) == 0
    assert evictions.calls == [(EVICTED_IDLE, 1)] * 3


def test_no_ttl_never_evicts_idle():
    store = WindowStore(window=2, n_features=1)
    store.slot("a", now=0.0)
    assert store.evict_idle(now=1e18) == 0 and "a" in store


def test_growth_beyond_initial_capacity_preserves_windows_and_state():
    store = WindowStore(window=3, n_features=2, state_size=2, max_keys=100, initial_capacity=2)
    assert store.capacity == 2
    before = {}
    for k in range(2):
        s = store.slot(f"k{k}", now=float(k))
        for i in range(4):
            store.push(s, row(10 * k + i))
        store.state(s)[:] = [k + 0.5, -k]
        before[f"k{k}"] = (s, window_of(store, s).copy(), store.state(s).copy(), store.count(s))
    for k in range(2, 9):
        s = store.slot(f"k{k}", now=float(k))
        store.push(s, row(k))
    assert store.capacity == 16 and len(store) == 9
    for key, (s, window, state, count) in before.items():
        assert store.slot(key, now=100.0) == s
        np.testing.assert_array_equal(window_of(store, s), window)
        np.testing.assert_array_equal(store.state(s), state)
        assert store.count(s) == count
    assert len({store.slot(f"k{k}", 100.0) for k in range(9)}) == 9


def test_growth_is_capped_at_max_keys():
    store = WindowStore(window=1, n_features=1, max_keys=5, initial_capacity=4)
    for k in range(5):
        store.slot(str(k), 0.0)
    assert store.capacity == 5


def test_many_distinct_keys_stay_within_max_keys():
    evictions = Evictions()
    max_keys, n = 1000, 200_000
    store = WindowStore(window=4, n_features=2, state_size=3, max_keys=max_keys, on_evict=evictions)
    values = np.ones(2, dtype=np.float32)
    for i in range(n):
        store.push(store.slot(f"key-{i}", float(i)), values)
    assert store.capacity <= max_keys
    assert len(store) == max_keys
    assert len(evictions.calls) == n - max_keys
    assert all(call == (EVICTED_CAPACITY, 1) for call in evictions.calls[:10])
    assert f"key-{n - 1}" in store and f"key-{n - max_keys}" in store and f"key-{n - max_keys - 1}" not in store
    assert store._data.shape[0] <= max_keys  # memory is bounded, not just the key count


@pytest.mark.parametrize("args", [dict(window=0, n_features=1), dict(window=1, n_features=0),
                                  dict(window=1, n_features=1, max_keys=0)])
def test_rejects_non_positive_sizes(args):
    with pytest.raises(ValueError):
        WindowStore(**args)


def test_bytes_per_key():
    store = WindowStore(window=4, n_features=3, state_size=2)
    # window + count + state + last seen + source partition and offset + repartition offset + newest event
    # time + event-time gap average + persisted flag
    assert store.bytes_per_key == 4 * 3 * 4 + 8 + 2 * 8 + 8 + 4 + 8 + 8 + 8 + 8 + 1


def test_snapshot_restores_window_state_and_position_in_another_store():
    source = WindowStore(window=4, n_features=2, state_size=3)
    slot = source.slot("k", 0.0)
    for i in range(6):  # wraps the ring
        source.push(slot, np.array([i, 10 * i], dtype=np.float32))
    source.state(slot)[:] = [1.5, 2.5, 3.5]
    source.set_position(slot, 2, 41)
    blob = source.snapshot(slot)

    target = WindowStore(window=4, n_features=2, state_size=3)
    restored = target.restore("k", blob, 5.0)
    got = np.empty((4, 2), dtype=np.float32)
    target.copy_window(restored, got)
    assert got[:, 0].tolist() == [2, 3, 4, 5]
    assert target.state(restored).tolist() == [1.5, 2.5, 3.5]
    assert target.position(restored) == (2, 41)
    target.push(restored, np.array([6, 60], dtype=np.float32))  # continues where it left off
    target.copy_window(restored, got)
    assert got[:, 0].tolist() == [3, 4, 5, 6]


def test_snapshot_of_a_partial_window_restores_its_rows():
    source = WindowStore(window=4, n_features=1)
    slot = source.slot("k", 0.0)
    source.push(slot, np.array([7.0], dtype=np.float32))
    target = WindowStore(window=4, n_features=1)
    restored = target.restore("k", source.snapshot(slot), 0.0)
    assert target.count(restored) == 1
    for v in (8.0, 9.0, 10.0):
        target.push(restored, np.array([v], dtype=np.float32))
    got = np.empty((4, 1), dtype=np.float32)
    target.copy_window(restored, got)
    assert got[:, 0].tolist() == [7, 8, 9, 10]


def test_snapshots_carry_trailing_bytes_and_version_1_snapshots_still_restore():
    source = WindowStore(window=2, n_features=1)
    slot = source.slot("k", 0.0)
    source.push(slot, np.array([3.0], dtype=np.float32))
    with_extra = source.snapshot(slot, b"alert state")
    assert with_extra[source.snapshot_body_size:] == b"alert state"
    assert WindowStore(window=2, n_features=1).restore("k", with_extra, 0.0) is not None
    version_1 = bytes([1]) + source.snapshot(slot)[1:]  # written before snapshots had trailing bytes
    target = WindowStore(window=2, n_features=1)
    assert target.count(target.restore("k", version_1, 0.0)) == 1
    with pytest.raises(SnapshotError):  # version 1 has nothing after the state
        WindowStore(window=2, n_features=1).restore("k", version_1 + b"x", 0.0)
    with pytest.raises(SnapshotError):
        WindowStore(window=2, n_features=1).restore("k", with_extra[:10], 0.0)


def test_snapshot_of_another_shape_is_refused():
    blob = WindowStore(window=4, n_features=2).snapshot(WindowStore(window=4, n_features=2).slot("k", 0.0))
    with pytest.raises(SnapshotError):
        WindowStore(window=8, n_features=2).restore("k", blob, 0.0)


def test_dropping_revoked_partitions_forgets_only_their_keys_and_reports_evicted_keys():
    evicted: list[tuple[str, int]] = []
    store = WindowStore(window=2, n_features=1, max_keys=2,
                        on_evict_key=lambda k, slot: evicted.append((k, store.position(slot)[0])))
    a, b = store.slot("a", 0.0), store.slot("b", 0.0)
    store.set_position(a, 0, 1)
    store.set_position(b, 3, 1)
    assert store.drop_partitions({3}) == 1
    assert "a" in store and "b" not in store
    store.slot("c", 1.0)
    store.slot("d", 2.0)  # over capacity: the least recently seen key "a" goes
    assert evicted == [("a", 0)]
