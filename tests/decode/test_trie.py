"""Item trie: structure, duplicate titles, and the on-device child table vs a dict walk."""

import numpy as np
import pytest

import jax.numpy as jnp

from latentr3_jax.decode.trie import ItemTrie, child_table

EOS = 2


def _catalog():
    # item id -> token ids; items 11/12 share a title, 13 shares a prefix with 10
    return {10: [5, 6, 7, EOS], 11: [5, 8, EOS], 12: [5, 8, EOS], 13: [5, 6, 9, EOS],
            14: [20, EOS], 15: [21, 22, 23, 24, EOS]}


def test_structure_and_duplicates():
    trie = ItemTrie(_catalog(), vocab_size=32)
    assert trie.num_leaves == 5
    assert trie.max_len == 5
    assert trie.leaf_items[trie.item_leaf[11]] == [11, 12]
    assert trie.item_leaf[11] == trie.item_leaf[12]
    assert set(trie.children(0)) == {5, 20, 21}
    n56 = trie.walk([5, 6])
    assert set(trie.children(n56)) == {7, 9}
    leaf = trie.walk([5, 6, 9, EOS])
    assert trie.leaf_index[leaf] == trie.item_leaf[13]
    assert trie.walk([5, 7]) == -1
    for j, seq in enumerate(trie.leaf_tokens):
        assert trie.leaf_index[trie.walk(seq)] == j


@pytest.mark.parametrize("width", [1, 2, 64])
def test_child_table_matches_dict(width):
    rng = np.random.default_rng(0)
    cat = {i: list(rng.integers(3, 12, size=rng.integers(1, 5))) + [EOS] for i in range(40)}
    trie = ItemTrie(cat, vocab_size=16, width=width)
    if width == 1:
        assert (trie.wide_index >= 0).sum() > 1  # exercise the dense rows
    nodes = np.arange(-1, trie.num_nodes)
    table = np.asarray(child_table(trie.arrays(), jnp.asarray(nodes), 16))
    for row, node in enumerate(nodes):
        expect = np.full(16, -1)
        if node >= 0:
            for t, c in trie.children(node).items():
                expect[t] = c
        np.testing.assert_array_equal(table[row], expect)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="prefix"):
        ItemTrie({1: [5, 6], 2: [5, 6, 7]}, vocab_size=16)
    with pytest.raises(ValueError, match="prefix"):
        ItemTrie({1: [5, 6, 7], 2: [5, 6]}, vocab_size=16)
    with pytest.raises(ValueError, match="outside vocab"):
        ItemTrie({1: [5, 99]}, vocab_size=16)
    with pytest.raises(ValueError, match="empty"):
        ItemTrie({}, vocab_size=16)
