"""A radix tree over the token sequences that cache rows hold, for prefix reuse at token granularity.

Each entry is (row, tokens): cache row `row` holds the K/V of `tokens[0:n]` at rows 0..n-1. The tree
stores every entry's tokens along a path of edges (int32 arrays) split where entries diverge, and
each node records which rows pass through it. match(tokens) walks the path as far as it agrees and
returns a row holding that prefix and its length, so any shared prefix is found, however it is cut
(SGLang's RadixAttention keeps pages in such a tree; here a row's tokens are contiguous, so a
match names one row to copy from or to take over).
"""
from __future__ import annotations

import sys

import numpy as np


class _Node:
    __slots__ = ("edge", "children", "rows")

    def __init__(self, edge: np.ndarray):
        self.edge = edge                          # [k] int32: the tokens from the parent to this node
        self.children: dict[int, _Node] = {}      # first token of the child's edge -> child
        self.rows: set[int] = set()               # rows whose tokens pass through the whole edge


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two 1-D arrays."""
    k = min(a.size, b.size)
    if k == 0:
        return 0
    diff = np.flatnonzero(a[:k] != b[:k])
    return int(diff[0]) if diff.size else k


class RadixIndex:
    """Entries (row -> tokens) in a radix tree; one entry per row."""

    def __init__(self) -> None:
        self.root = _Node(np.zeros(0, np.int32))
        self.entries: dict[int, np.ndarray] = {}   # row -> its indexed tokens (int32)
        self.nodes = 1

    def __len__(self) -> int:
        return len(self.entries)

    def set(self, row: int, tokens) -> None:
        """Indexes `tokens` as what `row` holds (replacing the row's previous entry)."""
        self.remove(row)
        toks = np.asarray(tokens, dtype=np.int32)
        if toks.size == 0:
            return
        node, rest = self.root, toks
        while rest.size:
            child = node.children.get(int(rest[0]))
            if child is None:
                child = _Node(rest.copy())
                node.children[int(rest[0])] = child
                self.nodes += 1
            else:
                k = _common(child.edge, rest)
                if k < child.edge.size:               # split child at k: a new node for the shared part
                    mid = _Node(child.edge[:k].copy())
                    mid.rows = set(child.rows)
                    child.edge = child.edge[k:].copy()
                    mid.children[int(child.edge[0])] = child
                    node.children[int(mid.edge[0])] = mid
                    self.nodes += 1
                    child = mid
            child.rows.add(row)
            node, rest = child, rest[child.edge.size:]
        self.entries[row] = toks

    def remove(self, row: int) -> None:
        """Forgets `row`'s entry; prunes nodes no entry passes through."""
        toks = self.entries.pop(row, None)
        if toks is None:
            return
        node, rest = self.root, toks
        while rest.size:
            child = node.children[int(rest[0])]
            child.rows.discard(row)
            if not child.rows:
                del node.children[int(rest[0])]
                self.nodes -= self._count(child)
                return
            node, rest = child, rest[child.edge.size:]

    def _count(self, node: _Node) -> int:
        return 1 + sum(self._count(c) for c in node.children.values())

    def match(self, tokens) -> tuple[int | None, int]:
        """(row, n): some row holding the longest indexed prefix of `tokens`, n tokens long ((None, 0):
        none). Among rows holding it, one whose entry ends exactly there is preferred (it can be taken
        over without losing anything)."""
        toks = np.asarray(tokens, dtype=np.int32)
        node, depth, best = self.root, 0, (None, 0)
        while depth < toks.size:
            child = node.children.get(int(toks[depth]))
            if child is None:
                break
            k = _common(child.edge, toks[depth:])
            depth += k
            exact = [r for r in child.rows if self.entries[r].size == depth]
            best = (exact[0] if exact else min(child.rows), depth)
            if k < child.edge.size:
                break
            node = child
        return best

    @property
    def nbytes(self) -> int:
        """Host bytes of the index: every node's object, edge array, child map and row set, plus the
        per-row token arrays (sys.getsizeof: what CPython reports for each object)."""
        total = sys.getsizeof(self.entries) + sum(sys.getsizeof(t) for t in self.entries.values())
        stack = [self.root]
        while stack:
            n = stack.pop()
            total += sys.getsizeof(n) + sys.getsizeof(n.edge) + sys.getsizeof(n.children) + sys.getsizeof(n.rows)
            stack.extend(n.children.values())
        return total
