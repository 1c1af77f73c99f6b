"""Commit folds only verified positions; cancel and rollback never touch the committed part."""

from __future__ import annotations

import pytest
import torch

from compute.types import SamplingParams
from pipeline.kv_cache import KVBudgetExceeded, KVCacheError, StageKVCache
from pipeline.types import CommitKV, FreeSequence, Run


def make_run(run_id, start, n, parent=None, seq_id=0):
    return Run(run_id, seq_id, parent, start, tuple(range(n)), parent is not None, SamplingParams())


def fill(run_kv, n, value, layers=2):
    """Pretend to compute: keys/values [1, 1, n, 2] filled with `value`; returns what attention sees."""
    seen = None
    for layer in range(layers):
        k = torch.full((1, 1, n, 2), float(value))
        seen = run_kv.extend(layer, k, k.clone())
    return seen[0][0, 0, :, 0].tolist()


def test_run_sees_committed_then_ancestors_then_itself():
    cache = StageKVCache(num_layers=2)
    assert fill(cache.begin_run(make_run(0, 0, 3)), 3, 1) == [1, 1, 1]
    assert fill(cache.begin_run(make_run(1, 3, 2, parent=0)), 2, 2) == [1, 1, 1, 2, 2]
    assert fill(cache.begin_run(make_run(2, 5, 2, parent=1)), 2, 3) == [1, 1, 1, 2, 2, 3, 3]
    # Run 0 verified: fold it. Run 1's first token accepted only: fold 1 of 2.
    cache.apply(CommitKV(0, 0, 3))
    cache.apply(CommitKV(0, 1, 1))
    seq = cache.sequences[0]
    assert seq.committed_len == 4
    assert seq.committed(0)[0][0, 0, :, 0].tolist() == [1, 1, 1, 2]
    # Run 2 was built on the rejected token: its chain no longer lines up.
    with pytest.raises(KVCacheError, match="ancestor 2 starts at 5, context ends at 4"):
        cache.begin_run(make_run(3, 5, 1, parent=2))


def test_cancel_drops_chunks_and_leaves_committed_untouched():
    cache = StageKVCache(num_layers=2)
    fill(cache.begin_run(make_run(0, 0, 4)), 4, 1)
    cache.apply(CommitKV(0, 0, 4))
    fill(cache.begin_run(make_run(1, 4, 3)), 3, 9)
    fill(cache.begin_run(make_run(2, 7, 3, parent=1)), 3, 9)
    before = cache.sequences[0].committed(1)[0].clone()
    cache.cancel([1, 2])
    cache.drop_cancelled()
    assert cache.num_chunks() == 0
    assert torch.equal(cache.sequences[0].committed(1)[0], before)
    # A fresh root run at the committed length works after the rollback.
    assert fill(cache.begin_run(make_run(3, 4, 1)), 1, 5) == [1, 1, 1, 1, 5]


def test_committed_buffer_grows_past_its_capacity():
    cache = StageKVCache(num_layers=1)
    start, parent = 0, None
    for run_id in range(40):  # 40 commits of 3 tokens: several doublings
        fill(cache.begin_run(make_run(run_id, start, 3, parent)), 3, run_id, layers=1)
        cache.apply(CommitKV(0, run_id, 3))
        start += 3
    keys = cache.sequences[0].committed(0)[0][0, 0, :, 0].tolist()
    assert keys == [float(r) for r in range(40) for _ in range(3)]


def test_free_forgets_the_sequence_and_bad_commits_are_refused():
    cache = StageKVCache(num_layers=1)
    fill(cache.begin_run(make_run(0, 0, 2)), 2, 1, layers=1)
    with pytest.raises(KVCacheError, match="commit of 3 tokens of run 0"):
        cache.apply(CommitKV(0, 0, 3))
    cache.apply(FreeSequence(0))
    assert cache.num_bytes() == 0 and cache.sequences == {}


def test_a_full_budget_refuses_new_sequences_only():
    cache = StageKVCache(num_layers=1, budget_bytes=100)
    fill(cache.begin_run(make_run(0, 0, 8, seq_id=0)), 8, 1, layers=1)  # room for 16 positions: 256 B of k and v
    cache.apply(CommitKV(0, 0, 8))
    with pytest.raises(KVBudgetExceeded, match=r"KV cache full: \d+ of 100 bytes in use"):
        cache.begin_run(make_run(1, 0, 2, seq_id=1))
    fill(cache.begin_run(make_run(2, 8, 1, seq_id=0)), 1, 2, layers=1)  # the running sequence goes on
    cache.apply(FreeSequence(0))
    cache.begin_run(make_run(3, 0, 2, seq_id=1))  # room again


def test_a_run_writes_in_place_and_a_commit_moves_a_length():
    """No concatenation, no copy: what a run attends over, and what it
    commits, is the buffer it wrote its positions into."""
    cache = StageKVCache(num_layers=2)
    run_kv = cache.begin_run(make_run(0, 0, 3))
    k = torch.full((1, 1, 3, 2), 1.0)
    seen, _ = run_kv.extend(0, k, k.clone())
    with pytest.raises(KVCacheError, match="not fully computed"):
        cache.apply(CommitKV(0, 0, 3))  # layer 1 never ran
    run_kv = cache.begin_run(make_run(1, 0, 3))
    fill(run_kv, 3, 1)
    cache.apply(CommitKV(0, 1, 3))
    assert cache.sequences[0].committed(0)[0].data_ptr() == seen.data_ptr()
