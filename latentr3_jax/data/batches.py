"""Static-shape batches: length buckets, padding, deterministic order, per-host slices.

Every row goes to the smallest prompt bucket and target bucket that hold it, so a step
function compiles once per (prompt bucket, target bucket) pair. The order of an epoch is
a pure function of (seed, epoch): rows are permuted, then dealt into per-bucket queues;
a queue that reaches `batch_size` rows emits a batch. All hosts compute the same global
order and each keeps its own contiguous slice of every global batch, so no host reads
rows another host uses. The iterator state (epoch, batches already taken) is a small
JSON-able dict saved with checkpoints.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from latentr3_jax.errors import InputError


class BatchIterator:
    """Batches of `Encoded` rows as numpy dicts (see module docstring).

    Batch layout: prompt_ids/prompt_mask [b, P] left-padded, target_ids/target_mask
    [b, T] right-padded, row [b] (index into `encoded`, -1 for filler), valid [b];
    b = batch_size // process_count. Filler rows (only with drop_last=False) copy the
    batch's first real row so no row is fully masked; they have valid=False, row=-1.
    Prompts longer than the largest bucket keep their last tokens; targets longer than
    the largest target bucket are cut (counted in `truncated_targets`).
    """

    def __init__(self, encoded: Sequence, batch_size: int, *,
                 buckets: Sequence[int] = (64, 128, 256, 512),
                 target_buckets: Sequence[int] = (16, 32, 64), pad_id: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        if process_index is None or process_count is None:
            import jax   # start-up cost: host-only users of the iterator pass both
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size <= 0 or batch_size % process_count:
            raise InputError(f"batch size {batch_size} must be a positive multiple of the "
                             f"process count {process_count}")
        if not 0 <= process_index < process_count:
            raise InputError(f"process index {process_index} outside 0..{process_count - 1}")
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.target_buckets = tuple(sorted(int(b) for b in target_buckets))
        if not self.buckets or not self.target_buckets or min(self.buckets + self.target_buckets) <= 0:
            raise InputError(f"bad buckets {buckets} / {target_buckets}")
        self.encoded = encoded
        self.batch_size = batch_size
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = batch_size // process_count

        n = len(encoded)
        p_len = np.array([len(e.prompt_ids) for e in encoded], dtype=np.int64)
        t_len = np.array([len(e.target_ids) for e in encoded], dtype=np.int64)
        if n and (p_len.min() == 0 or t_len.min() == 0):
            raise InputError("an encoded row has an empty prompt or target")
        self._pb = np.array([self._bucket(self.buckets, x) for x in p_len], dtype=np.int64)
        self._tb = np.array([self._bucket(self.target_buckets, x) for x in t_len], dtype=np.int64)
        self.truncated_prompts = int((p_len > self.buckets[-1]).sum())
        self.truncated_targets = int((t_len > self.target_buckets[-1]).sum())
        self._key = self._pb * len(self.target_buckets) + self._tb   # bucket-pair id per row
        counts = np.bincount(self._key, minlength=len(self.buckets) * len(self.target_buckets))
        full = counts // batch_size
        partial = (counts % batch_size > 0).astype(np.int64)
        self.steps_per_epoch = int(full.sum() + (0 if drop_last else partial.sum()))
        self._state = {"epoch": 0, "step": 0}
        # optional per-row fields: extra(rows [b] with -1 filler) -> {name: array [b, ...]}
        self.extra: Optional[Callable[[np.ndarray], dict]] = None

    @staticmethod
    def _bucket(bounds, length) -> int:
        return min(bisect.bisect_left(bounds, length), len(bounds) - 1)

    @property
    def shapes(self) -> list:
        """(P, T) pairs that occur, i.e. the shapes a step function compiles for."""
        keys = sorted(set(self._key.tolist()))
        nt = len(self.target_buckets)
        return [(self.buckets[k // nt], self.target_buckets[k % nt]) for k in keys]

    # ------------------------------------------------------------- order

    def epoch_plan(self, epoch: int) -> list:
        """Global batches of an epoch: a list of row-index arrays (-1 = filler)."""
        n = len(self.encoded)
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
        else:
            order = np.arange(n)
        queues = {}
        plan = []
        for r in order.tolist():
            q = queues.setdefault(int(self._key[r]), [])
            q.append(r)
            if len(q) == self.batch_size:
                plan.append(np.array(q, dtype=np.int64))
                q.clear()
        if not self.drop_last:
            for k in sorted(queues):
                q = queues[k]
                if q:
                    plan.append(np.array(q + [-1] * (self.batch_size - len(q)), dtype=np.int64))
        assert len(plan) == self.steps_per_epoch
        return plan

    def _make_batch(self, global_rows: np.ndarray) -> dict:
        b = self.local_batch_size
        rows = global_rows[self.process_index * b:(self.process_index + 1) * b]
        real = global_rows[global_rows >= 0]
        k = int(self._key[real[0]])
        nt = len(self.target_buckets)
        P, T = self.buckets[k // nt], self.target_buckets[k % nt]
        prompt_ids = np.full((b, P), self.pad_id, np.int32)
        prompt_mask = np.zeros((b, P), np.int32)
        target_ids = np.full((b, T), self.pad_id, np.int32)
        target_mask = np.zeros((b, T), np.int32)
        for j, r in enumerate(rows.tolist()):
            e = self.encoded[r if r >= 0 else int(real[0])]
            p = list(e.prompt_ids)[-P:]
            t = list(e.target_ids)[:T]
            prompt_ids[j, P - len(p):] = p
            prompt_mask[j, P - len(p):] = 1
            target_ids[j, :len(t)] = t
            target_mask[j, :len(t)] = 1
        out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
               "target_ids": target_ids, "target_mask": target_mask,
               "row": rows.astype(np.int32), "valid": rows >= 0}
        if self.extra is not None:
            out.update(self.extra(rows))
        return out

    # ------------------------------------------------------------- iteration

    def epoch(self, epoch: int, start: Optional[int] = None) -> Iterator[dict]:
        """Batches of one epoch. Starts at `start`, or, when `epoch` is the state's epoch,
        at the state's step (so a restored iterator continues where it stopped). The state
        advances as batches are taken."""
        epoch = int(epoch)
        if start is None:
            start = self._state["step"] if self._state["epoch"] == epoch else 0
        plan = self.epoch_plan(epoch)
        for step in range(start, len(plan)):
            batch = self._make_batch(plan[step])
            self._state = {"epoch": epoch, "step": step + 1}
            yield batch
        self._state = {"epoch": epoch + 1, "step": 0}

    def __iter__(self) -> Iterator[dict]:
        if self.steps_per_epoch == 0:
            raise InputError(f"no batch of {self.batch_size} rows can be formed from "
                             f"{len(self.encoded)} rows (drop_last={self.drop_last})")
        while True:
            yield from self.epoch(self._state["epoch"])

    def __len__(self) -> int:
        return self.steps_per_epoch

    def get_state(self) -> dict:
        return {"epoch": int(self._state["epoch"]), "step": int(self._state["step"]),
                "seed": self.seed, "steps_per_epoch": self.steps_per_epoch}

    def set_state(self, state: dict) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise InputError(f"iterator state has seed {state['seed']}, this iterator {self.seed}")
        if "steps_per_epoch" in state and int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise InputError(f"iterator state has {state['steps_per_epoch']} steps per epoch, "
                             f"this iterator {self.steps_per_epoch} (different data or batch size)")
        self._state = {"epoch": int(state["epoch"]), "step": int(state["step"])}
