"""BatchIterator: static shapes, padding, deterministic order, resume, per-host slices."""

import json

import numpy as np
import pytest

from latentr3_jax.data.batches import BatchIterator
from latentr3_jax.data.prompts import Encoded
from latentr3_jax.errors import InputError

PAD = 0


def _rows(n=203, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(rng.choice([5, 17, 40, 70, 130]) + rng.integers(0, 5))
        t = int(rng.integers(2, 30))
        out.append(Encoded(prompt_ids=list(rng.integers(1, 99, p)), target_ids=list(rng.integers(1, 99, t)),
                           item_id=i))
    return out


KW = dict(buckets=(16, 64, 128), target_buckets=(8, 16, 32), pad_id=PAD, seed=7)


def _all(it, epoch):
    return [{k: v.copy() for k, v in b.items()} for b in it.epoch(epoch)]


def test_shapes_padding_and_content():
    rows = _rows()
    it = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    seen = []
    for b in it.epoch(0):
        P, T = b["prompt_ids"].shape[1], b["target_ids"].shape[1]
        assert P in KW["buckets"] and T in KW["target_buckets"]
        assert b["prompt_ids"].dtype == np.int32 and b["row"].dtype == np.int32
        assert b["valid"].all() and b["prompt_ids"].shape[0] == 8
        for j, r in enumerate(b["row"]):
            e = rows[r]
            p = e.prompt_ids[-P:]
            # left padding of prompts, right padding of targets
            assert list(b["prompt_ids"][j, P - len(p):]) == p
            assert (b["prompt_ids"][j, :P - len(p)] == PAD).all()
            assert list(b["prompt_mask"][j]) == [0] * (P - len(p)) + [1] * len(p)
            assert list(b["target_ids"][j, :len(e.target_ids)]) == e.target_ids
            assert list(b["target_mask"][j]) == [1] * len(e.target_ids) + [0] * (T - len(e.target_ids))
            # smallest bucket that holds the row (130+ prompts are cut to the largest)
            assert P == min([x for x in KW["buckets"] if x >= len(e.prompt_ids)] or [128])
            assert T == min(x for x in KW["target_buckets"] if x >= len(e.target_ids))
        seen += list(b["row"])
    assert len(seen) == len(set(seen)) == it.steps_per_epoch * 8
    assert it.truncated_prompts > 0 and set(it.shapes) >= {(P, T)}


def test_deterministic_and_epochs_differ():
    rows = _rows()
    a = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    b = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    ea, eb = _all(a, 3), _all(b, 3)
    assert len(ea) == len(eb) == a.steps_per_epoch > 0
    for x, y in zip(ea, eb):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = [list(x["row"]) for x in _all(a, 4)]
    assert other != [list(x["row"]) for x in ea]
    c = BatchIterator(rows, 8, process_index=0, process_count=1, **{**KW, "seed": 8})
    assert [list(x["row"]) for x in _all(c, 3)] != [list(x["row"]) for x in ea]


def test_resume_sees_the_same_remaining_batches():
    rows = _rows()
    ref = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    stream = iter(ref)
    want = [next(stream)["row"].tolist() for _ in range(2 * ref.steps_per_epoch + 5)]
    it = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    stream = iter(it)
    got = [next(stream)["row"].tolist() for _ in range(ref.steps_per_epoch + 3)]
    state = json.loads(json.dumps(it.get_state()))           # through a checkpoint file
    assert state["epoch"] == 1 and state["step"] == 3
    fresh = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    fresh.set_state(state)
    stream = iter(fresh)
    got += [next(stream)["row"].tolist() for _ in range(len(want) - len(got))]
    assert got == want
    # epoch(e) on a restored iterator continues mid-epoch too
    again = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    again.set_state(state)
    assert [b["row"].tolist() for b in again.epoch(1)] == want[ref.steps_per_epoch + 3:2 * ref.steps_per_epoch]
    with pytest.raises(InputError, match="seed"):
        fresh.set_state({**state, "seed": 1})
    with pytest.raises(InputError, match="steps per epoch"):
        BatchIterator(rows[:100], 8, process_index=0, process_count=1, **KW).set_state(state)


@pytest.mark.parametrize("drop_last", [True, False])
def test_host_slices_partition_the_global_batch(drop_last):
    rows = _rows()
    hosts = [BatchIterator(rows, 12, process_index=i, process_count=4, drop_last=drop_last, **KW)
             for i in range(4)]
    whole = BatchIterator(rows, 12, process_index=0, process_count=1, drop_last=drop_last, **KW)
    per_host = [_all(h, 2) for h in hosts]
    full = _all(whole, 2)
    assert all(len(p) == len(full) == whole.steps_per_epoch for p in per_host)
    for step, g in enumerate(full):
        parts = [p[step] for p in per_host]
        assert all(p["prompt_ids"].shape[0] == 3 for p in parts)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])


def test_eval_mode_keeps_every_row_once_with_fillers():
    rows = _rows(50)
    it = BatchIterator(rows, 8, shuffle=False, drop_last=False, process_index=0, process_count=1, **KW)
    real = []
    for b in it.epoch(0):
        real += b["row"][b["valid"]].tolist()
        assert (b["row"][~b["valid"]] == -1).all()
        assert b["prompt_mask"].sum(1).min() > 0              # filler rows are not empty
    assert sorted(real) == list(range(50))
    dropped = BatchIterator(rows, 8, process_index=0, process_count=1, **KW)
    assert dropped.steps_per_epoch < it.steps_per_epoch
    assert sum(b["valid"].sum() for b in dropped.epoch(0)) == 8 * dropped.steps_per_epoch


def test_bad_arguments():
    rows = _rows(10)
    with pytest.raises(InputError, match="multiple of the process count"):
        BatchIterator(rows, 10, process_index=0, process_count=4, **KW)
    with pytest.raises(InputError, match="process index 4"):
        BatchIterator(rows, 8, process_index=4, process_count=4, **KW)
    with pytest.raises(InputError, match="no batch of 64"):
        next(iter(BatchIterator(rows, 64, process_index=0, process_count=1, **KW)))
    it = BatchIterator(rows, 2, **KW)                       # defaults from jax
    assert (it.process_index, it.process_count) == (0, 1)
