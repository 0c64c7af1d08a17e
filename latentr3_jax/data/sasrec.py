"""SASRec (Kang & McAuley 2018): a small trained sequential baseline, full-catalog ranking.

The model: item embedding (tied with the output layer) + learned positional embedding,
`num_blocks` causal self-attention blocks (pre-LayerNorm, dropout, point-wise FFN), a
final LayerNorm. Objective: at every position predict the next item with a FULL softmax
cross-entropy over the catalog (3-6k items here, so the full softmax is cheap), instead of
the paper's binary cross-entropy with one sampled negative, which later work found weaker
(not re-measured here).

Data. Each train row gives the sequence history_ids + [target_id] (model index of item
k of catalog.ids is k + 1; 0 is the pad). The D3 train split holds every prefix of a
user's purchases as its own row, so rows whose sequence is a proper prefix of another
row of the same user are dropped: the all-positions loss on the longest sequence already
predicts each of their targets once (one sequence per user, as in the paper), and
training is ~5x cheaper. Sequences keep their last max_len + 1 items, left-padded; the
model reads the first max_len and predicts the next item at every non-pad position
(the first item is never a label). Positions count back from the most recent item, so a
sequence scores the same padded or not (tests/test_sasrec.py checks this against the
module called on the bare sequence).

Training: optax AdamW, one jitted step with static shapes: batch_size sequences (a last
short batch is padded with all-pad rows) and the output layer run only at a fixed
budget of labelled positions (padded with label 0 = no loss), since ~half of the
[batch, seq] slots are padding. Dropout RNG folded from the step; deterministic given the
seed. Early stopping on the VALID split's NDCG@10 (item-id rule) computed with
`baselines.ranks` / `baselines.metrics`, keeping the best epoch's params.

Scoring ranks the whole catalog, history items included, exactly like
`baselines.scores(..., exclude_history=False)` and the LLM's trie beam search, so
`baselines.ranks` / `baselines.metrics` give HR/NDCG with the same code as the other rows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latentr3_jax.data import baselines

VARIANT = "SASRec (trained on train, chosen on valid)"
NAME = "sasrec"
PAD = 0


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """SASRec hyperparameters, chosen on the VALID split (NDCG@10, item-id rule) of the
    three Amazon folders (CDs / Industrial / Office); test was not looked at while choosing.

    Histories in this data hold at most 10 items, so max_len = 10 covers every one. Valid
    NDCG@10 at seed 0: dropout 0.3 -> 0.0468 / 0.0842 / 0.1333, dropout 0.5 -> 0.0454 /
    0.0857 / 0.1304 (mean 0.0881 vs 0.0872); 2 heads instead of 1 and batch 128 instead of
    32 were no better (batch 128 needs ~4x the epochs); a per-item output bias changed
    valid NDCG@10 by < 0.0005 and is left out. For reference, valid NDCG@10 of last-item
    transitions 0.0529 / 0.0897 / 0.1354 and of co-occurrence 0.0457 / 0.0867 / 0.1404.
    """

    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 10
    batch_size: int = 32        # sequences per step (one per user: ~2k on the Amazon folders)
    max_epochs: int = 100
    patience: int = 5           # epochs without a better valid NDCG@10 before stopping
    eval_batch_size: int = 1024


class _Block(nn.Module):
    hidden: int
    num_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, keep, deterministic: bool):
        # x [batch, seq, hidden]; mask [batch, 1, seq, seq]; keep [batch, seq, 1]
        h = nn.LayerNorm(epsilon=1e-6)(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.hidden,
                                            dropout_rate=self.dropout)(
            h, h, mask=mask, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.LayerNorm(epsilon=1e-6)(x)
        h = nn.Dense(self.hidden)(h)
        h = nn.Dropout(self.dropout)(nn.relu(h), deterministic=deterministic)
        h = nn.Dense(self.hidden)(h)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return x * keep


class SASRec(nn.Module):
    """ids [batch, seq] (0 = pad, left-padded) -> next-item logits over the catalog."""

    num_items: int
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.3
    max_len: int = 10

    def setup(self):
        init = nn.initializers.normal(self.hidden ** -0.5)
        self.item_emb = nn.Embed(self.num_items + 1, self.hidden, embedding_init=init)
        self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=init)
        self.emb_dropout = nn.Dropout(self.dropout)
        self.blocks = [_Block(self.hidden, self.num_heads, self.dropout)
                       for _ in range(self.num_blocks)]
        self.final_norm = nn.LayerNorm(epsilon=1e-6)

    def encode(self, ids, deterministic: bool = True):
        """[batch, seq, hidden] states; position p predicts the item after ids[:, p]."""
        seq = ids.shape[1]
        valid = ids != PAD                                    # [batch, seq]
        keep = valid[..., None].astype(jnp.float32)           # [batch, seq, 1]
        back = seq - 1 - jnp.arange(seq)                      # distance from the last slot
        x = self.item_emb(ids) * self.hidden ** 0.5 + self.pos_emb(back)[None]
        x = self.emb_dropout(x, deterministic=deterministic) * keep
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        mask = causal[None, None] & valid[:, None, None, :]   # [batch, 1, seq, seq]
        for block in self.blocks:
            x = block(x, mask, keep, deterministic)
        return self.final_norm(x)

    def logits(self, states):
        """[..., hidden] -> [..., num_items], columns in catalog.ids order (output tied)."""
        return states @ self.item_emb.embedding[1:].T

    def __call__(self, ids, deterministic: bool = True, last_only: bool = False):
        states = self.encode(ids, deterministic)
        return self.logits(states[:, -1] if last_only else states)

    def position_logits(self, ids, positions, deterministic: bool = True):
        """Logits at flat positions (into [batch * seq]) only: [len(positions), num_items]."""
        states = self.encode(ids, deterministic)
        return self.logits(states.reshape(-1, self.hidden)[positions])


def make_model(cfg: SASRecConfig, num_items: int) -> SASRec:
    return SASRec(num_items=num_items, hidden=cfg.hidden, num_blocks=cfg.num_blocks,
                  num_heads=cfg.num_heads, dropout=cfg.dropout, max_len=cfg.max_len)


# ---------------------------------------------------------------- host-side arrays

def _item_index(catalog) -> dict:
    """item id -> model index (catalog.ids order, shifted by one for the pad)."""
    return {int(i): k + 1 for k, i in enumerate(catalog.ids)}


def _left_pad(seqs: Sequence[Sequence[int]], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype=np.int32)
    for r, s in enumerate(seqs):
        s = list(s)[-length:]
        if s:
            out[r, length - len(s):] = s
    return out


def history_array(rows, catalog, max_len: int) -> np.ndarray:
    """[len(rows), max_len] model inputs: the last max_len history items (unknown ids dropped)."""
    index = _item_index(catalog)
    return _left_pad([[index[h] for h in s.history_ids if h in index] for s in rows], max_len)


def train_sequences(rows, catalog) -> list:
    """history + [target] (model indices) per train row, without the rows whose sequence is
    a proper prefix of another row's of the same user: the D3 train split holds every
    prefix of a user's purchases, and the all-positions loss on the longest one already
    predicts each of them once (standard SASRec: one sequence per user)."""
    index = _item_index(catalog)
    seqs, prefixes = [], set()
    for r, s in enumerate(rows):
        user = s.user_id if s.user_id is not None else ("row", r)
        seq = tuple(index[h] for h in s.history_ids if h in index) + (index[s.target_id],)
        seqs.append((user, seq))
        prefixes.update((user, seq[:k]) for k in range(1, len(seq)))
    out = []
    for key in dict.fromkeys(seqs):            # first occurrence order, duplicates dropped
        if key not in prefixes:
            out.append(list(key[1]))
    return out


def train_arrays(rows, catalog, max_len: int) -> tuple:
    """(inputs, labels), both [num_sequences, max_len]: `train_sequences` truncated to their
    last max_len + 1 items, left-padded, shifted by one (label 0 = no loss)."""
    full = _left_pad(train_sequences(rows, catalog), max_len + 1)
    inputs, labels = full[:, :-1], full[:, 1:]
    return inputs, np.where(inputs != PAD, labels, PAD)    # the first item is never a label


def pack_batches(labels: np.ndarray, order: np.ndarray, batch_size: int,
                 label_budget: int) -> list:
    """Greedy batches over `order`: at most batch_size sequences and label_budget labelled
    positions each, so the output layer runs on [label_budget] positions, not [batch, seq]."""
    counts = (labels != PAD).sum(axis=1)
    batches, cur, used = [], [], 0
    for i in order:
        if cur and (len(cur) == batch_size or used + counts[i] > label_budget):
            batches.append(np.array(cur))
            cur, used = [], 0
        cur.append(i)
        used += counts[i]
    if cur:
        batches.append(np.array(cur))
    return batches


def batch_arrays(inputs: np.ndarray, labels: np.ndarray, idx: np.ndarray, batch_size: int,
                 label_budget: int) -> tuple:
    """Fixed-shape arrays of one batch: inputs [batch, seq], flat positions of the labels in
    [batch * seq] and the labels, both [label_budget] (padded with label 0 = no loss)."""
    x = np.zeros((batch_size, inputs.shape[1]), dtype=np.int32)
    x[:len(idx)] = inputs[idx]
    y = np.zeros_like(x)
    y[:len(idx)] = labels[idx]
    flat = np.flatnonzero(y.reshape(-1) != PAD)
    pos = np.zeros(label_budget, dtype=np.int32)
    lab = np.zeros(label_budget, dtype=np.int32)
    pos[:len(flat)] = flat
    lab[:len(flat)] = y.reshape(-1)[flat]
    return x, pos, lab


# ---------------------------------------------------------------- training

def _loss(params, model, inputs, positions, labels, rng):
    """Mean next-item cross-entropy (full softmax over the catalog) at the labelled positions."""
    logits = model.apply({"params": params}, inputs, positions, deterministic=False,
                         rngs={"dropout": rng}, method=SASRec.position_logits)  # [budget, items]
    weight = (labels != PAD).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels - 1, 0))
    count = weight.sum()
    return (ce * weight).sum() / jnp.maximum(count, 1.0), count


@functools.lru_cache(maxsize=8)
def _functions(cfg: SASRecConfig, num_items: int) -> tuple:
    """(model, optimizer, jitted init, train step and scorer), one set per (config, catalog
    size), so repeated training or scoring reuses the compiled code."""
    model = make_model(cfg, num_items)
    tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)

    @jax.jit
    def init(key):
        return model.init(key, jnp.zeros((1, cfg.max_len), dtype=jnp.int32))["params"]

    @jax.jit
    def step(params, opt_state, inputs, positions, labels, rng):
        (loss, count), grads = jax.value_and_grad(_loss, has_aux=True)(
            params, model, inputs, positions, labels, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, count

    @jax.jit
    def score(params, inputs):                                # [batch, items]
        return model.apply({"params": params}, inputs, deterministic=True, last_only=True)

    return model, tx, init, step, score


def _scores(score_fn, params, inputs: np.ndarray, batch: int) -> np.ndarray:
    """Last-position logits for every row, in fixed-size batches (one compiled shape)."""
    num_items = params["item_emb"]["embedding"].shape[0] - 1
    out = np.empty((len(inputs), num_items), dtype=np.float32)
    for a in range(0, len(inputs), batch):
        part = inputs[a:a + batch]
        padded = np.zeros((batch, inputs.shape[1]), dtype=np.int32)
        padded[:len(part)] = part
        out[a:a + len(part)] = np.asarray(score_fn(params, padded))[:len(part)]
    return out


def scores(params, cfg: SASRecConfig, rows, catalog) -> np.ndarray:
    """[len(rows), len(catalog)] scores (higher = better), columns in catalog.ids order;
    history items are not excluded (as `baselines.scores(..., exclude_history=False)`)."""
    score_fn = _functions(cfg, len(catalog))[-1]
    return _scores(score_fn, params, history_array(rows, catalog, cfg.max_len),
                   cfg.eval_batch_size)


def user_ranks(params, cfg: SASRecConfig, dataset, split: str = "test", *,
               title_rule: bool = False) -> np.ndarray:
    """0-based rank of the first correct item for each row of `split` (row order kept)."""
    rows = dataset.splits[split]
    return baselines.ranks(scores(params, cfg, rows, dataset.catalog), rows, dataset.catalog,
                           title_rule=title_rule)


def train_sasrec(dataset, cfg: SASRecConfig = SASRecConfig(), *, seed: int = 0,
                 progress: bool = False) -> tuple:
    """(best params, info) after training on train with early stopping on valid NDCG@10.

    info: best_epoch, epochs (run), valid_ndcg10 (best), valid_ranks (per valid row,
    item-id rule, best epoch), history (per epoch: epoch, loss, valid NDCG@10),
    train_sequences, steps, seconds. Per-row test ranks: `user_ranks(params, cfg, ...)`."""
    start = time.time()
    catalog = dataset.catalog
    inputs, labels = train_arrays(dataset.splits["train"], catalog, cfg.max_len)
    if not len(inputs):
        raise ValueError("sasrec: the train split is empty")
    valid_rows = dataset.splits["valid"]
    valid_inputs = history_array(valid_rows, catalog, cfg.max_len)
    bs = cfg.batch_size
    per_seq = (labels != PAD).sum(axis=1)
    budget = int(max(per_seq.max(), np.ceil(bs * per_seq.mean() * 1.25 / 8) * 8))
    _, tx, init, step, score_fn = _functions(cfg, len(catalog))
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    params = init(init_key)
    opt_state = tx.init(params)
    order_rng = np.random.default_rng(seed)
    best = (-1.0, 0, params, None)        # (valid NDCG@10, epoch, params, ranks)
    history = []
    global_step = 0
    for epoch in range(1, cfg.max_epochs + 1):
        loss_sum, label_count = 0.0, 0.0
        for idx in pack_batches(labels, order_rng.permutation(len(inputs)), bs, budget):
            x, pos, lab = batch_arrays(inputs, labels, idx, bs, budget)
            params, opt_state, loss, count = step(
                params, opt_state, x, pos, lab, jax.random.fold_in(dropout_key, global_step))
            global_step += 1
            loss_sum += float(loss) * float(count)
            label_count += float(count)
        mean_loss = loss_sum / max(label_count, 1.0)
        valid_scores = _scores(score_fn, params, valid_inputs, cfg.eval_batch_size)
        rank = baselines.ranks(valid_scores, valid_rows, catalog)
        ndcg = baselines.metrics(rank, ks=(10,))["NDCG@10"]
        history.append({"epoch": epoch, "loss": mean_loss, "valid_NDCG@10": ndcg})
        if progress:
            print(f"sasrec epoch {epoch:3d}  loss {mean_loss:.4f}  valid NDCG@10 {ndcg:.4f}"
                  f"  ({time.time() - start:.1f}s)", flush=True)
        if ndcg > best[0]:
            best = (ndcg, epoch, params, rank)
        elif epoch - best[1] >= cfg.patience:
            break
    info = {"best_epoch": best[1], "epochs": len(history), "valid_ndcg10": best[0],
            "valid_ranks": best[3], "history": history, "train_sequences": len(inputs),
            "steps": global_step, "seconds": time.time() - start}
    return best[2], info


def evaluate_sasrec(dataset, split: str = "test", *, seed: int = 0, title_rule: bool = False,
                    cfg: SASRecConfig = SASRecConfig(), ks: Sequence[int] = baselines.KS,
                    trained: tuple | None = None) -> dict:
    """HR@K / NDCG@K of SASRec on `split`; trained here unless `trained` = (params, info)
    from `train_sasrec` with this same cfg."""
    params, _ = trained if trained is not None else train_sasrec(dataset, cfg, seed=seed)
    return baselines.metrics(user_ranks(params, cfg, dataset, split, title_rule=title_rule), ks)


def table_rows(dataset, split: str = "test", *, seed: int = 0, title_rule: bool = True,
               cfg: SASRecConfig = SASRecConfig(), trained: tuple | None = None) -> list:
    """SASRec as a row of the `latentr3 run` results table (same keys as baselines.table_rows)."""
    m = evaluate_sasrec(dataset, split, seed=seed, title_rule=title_rule, cfg=cfg,
                        trained=trained)
    return [{"variant": VARIANT, "name": NAME,
             **{k: m[k] for k in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10",
                                  "NDCG@20")},
             "users": len(dataset.splits[split])}]
