"""Prefix tree of catalog titles as dense device arrays (SPEC.md section 7).

Each catalog title is tokenised exactly as the model writes it after the response header
(`"Title"\\n` + EOS). Equal token sequences (duplicate titles) share one path and one leaf;
the leaf remembers every item id that carries it.

On device a node's children are looked up without Python: nodes with few children keep
(token, child) pairs in a padded [num_nodes, width] table, the few nodes with many
children (the root, the node after the opening quote) keep a dense row over the whole
vocabulary. `child_table` turns a batch of node ids into a [n, vocab] table of child ids
(-1 = token not allowed) with one scatter and one gather.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np


class TrieArrays(NamedTuple):
    """Device side of the trie (a pytree; pass it to jitted functions as an argument)."""

    narrow_tokens: jax.Array    # [num_nodes, width] int32, -1 = empty slot
    narrow_children: jax.Array  # [num_nodes, width] int32, -1 = empty slot
    wide_index: jax.Array       # [num_nodes] int32 row in wide_children, -1 = narrow node
    wide_children: jax.Array    # [num_wide + 1, vocab] int32 child id per token, -1 = none
    leaf_index: jax.Array       # [num_nodes] int32 distinct-title index, -1 = not a leaf


class ItemTrie:
    """Host-side trie: numpy arrays plus the leaf <-> item maps.

    Node 0 is the root. `leaf_items[j]` lists the item ids whose title tokenises to the
    j-th distinct sequence `leaf_tokens[j]`; `item_leaf[item_id]` is the reverse map.
    """

    def __init__(self, sequences: Union[Mapping[int, Sequence[int]], Sequence[Sequence[int]]],
                 vocab_size: int, width: int = 64):
        if isinstance(sequences, Mapping):
            items = sorted(sequences.items())
        else:
            items = list(enumerate(sequences))
        if not items:
            raise ValueError("cannot build a trie from an empty catalog")
        self.vocab_size = int(vocab_size)
        children: list[dict] = [{}]
        leaf_of_node: dict[int, int] = {}
        self.leaf_tokens: list[tuple] = []
        self.leaf_items: list[list[int]] = []
        self.leaf_node: list[int] = []
        self.item_leaf: dict[int, int] = {}
        ends: set = set()
        for item_id, seq in items:
            seq = tuple(int(t) for t in seq)
            if not seq:
                raise ValueError(f"item {item_id}: empty token sequence")
            bad = [t for t in seq if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"item {item_id}: token id {bad[0]} outside vocab of {self.vocab_size}")
            node = 0
            for t in seq:
                if node in ends:
                    raise ValueError(f"item {item_id}: another title's token sequence is a prefix of "
                                     "this one (sequences must end with EOS)")
                nxt = children[node].get(t)
                if nxt is None:
                    nxt = len(children)
                    children[node][t] = nxt
                    children.append({})
                node = nxt
            if children[node]:
                raise ValueError(f"item {item_id}: token sequence is a prefix of another title's "
                                 "(sequences must end with EOS)")
            ends.add(node)
            if node not in leaf_of_node:
                leaf_of_node[node] = len(self.leaf_tokens)
                self.leaf_tokens.append(seq)
                self.leaf_items.append([])
                self.leaf_node.append(node)
            leaf = leaf_of_node[node]
            self.leaf_items[leaf].append(int(item_id))
            self.item_leaf[int(item_id)] = leaf

        n = len(children)
        self.num_nodes = n
        self.num_leaves = len(self.leaf_tokens)
        self.max_len = max(len(s) for s in self.leaf_tokens)
        fanout = np.array([len(c) for c in children])
        self.width = int(max(1, min(width, fanout.max())))
        wide_nodes = [i for i in range(n) if fanout[i] > self.width]
        self.narrow_tokens = np.full((n, self.width), -1, np.int32)
        self.narrow_children = np.full((n, self.width), -1, np.int32)
        self.wide_index = np.full((n,), -1, np.int32)
        self.wide_children = np.full((len(wide_nodes) + 1, self.vocab_size), -1, np.int32)
        for row, i in enumerate(wide_nodes):
            self.wide_index[i] = row
            for t, c in children[i].items():
                self.wide_children[row, t] = c
        for i in range(n):
            if self.wide_index[i] < 0 and children[i]:
                toks = sorted(children[i])
                self.narrow_tokens[i, :len(toks)] = toks
                self.narrow_children[i, :len(toks)] = [children[i][t] for t in toks]
        self.leaf_index = np.full((n,), -1, np.int32)
        for node, leaf in leaf_of_node.items():
            self.leaf_index[node] = leaf
        self._children = children

    def arrays(self) -> TrieArrays:
        """The device arrays (numpy; `jax.device_put` them or pass them to a jitted call)."""
        return TrieArrays(self.narrow_tokens, self.narrow_children, self.wide_index,
                          self.wide_children, self.leaf_index)

    def children(self, node: int) -> dict:
        """token -> child node (host-side, for tests and debugging)."""
        return dict(self._children[node])

    def walk(self, tokens: Sequence[int]) -> int:
        """Node reached by a token sequence from the root, or -1 if it leaves the trie."""
        node = 0
        for t in tokens:
            node = self._children[node].get(int(t), -1)
            if node < 0:
                return -1
        return node


def child_table(trie: TrieArrays, nodes: jax.Array, vocab_size: int) -> jax.Array:
    """Child node id of every (node, token) pair: [n] node ids -> [n, vocab] int32, -1 = not allowed."""
    n = nodes.shape[0]
    safe = jnp.maximum(nodes, 0)
    toks = trie.narrow_tokens[safe]                                   # [n, width]
    kids = trie.narrow_children[safe]
    toks = jnp.where(toks < 0, vocab_size, toks)                      # empty slots -> spare column
    rows = jnp.arange(n)[:, None]
    narrow = jnp.full((n, vocab_size + 1), -1, jnp.int32).at[rows, toks].set(kids)[:, :vocab_size]
    widx = trie.wide_index[safe]
    wide = trie.wide_children[jnp.maximum(widx, 0)]                   # [n, vocab]
    table = jnp.where((widx >= 0)[:, None], wide, narrow)
    return jnp.where((nodes >= 0)[:, None], table, -1)
