"""Prefix reuse at token granularity: which cache slots hold which tokens, and what a new sequence adopts.

PrefixCache is the one object that owns the policy: match (the longest indexed prefix of a prompt),
insert (a live sequence's prompt, indexed as it is fed), retain (a released sequence keeps its slot,
least recently used first), evict (a retained slot is claimed for a new sequence), and take over (a
new sequence whose prefix is exactly a retained slot's tokens moves into that slot instead of copying).
The Engine asks it for an Adoption before a run and commits it after the run succeeded.

RadixIndex is its index: a radix tree over the token sequences that cache rows hold. Each entry is (row, tokens): cache row `row` holds the K/V of `tokens[0:n]` at rows 0..n-1. The tree
stores every entry's tokens along a path of edges (int32 arrays) split where entries diverge, and
each node records which rows pass through it. match(tokens) walks the path as far as it agrees and
returns a row holding that prefix and its length, so any shared prefix is found, however it is cut
(SGLang's RadixAttention keeps pages in such a tree; here a row's tokens are contiguous, so a
match names one row to copy from or to take over).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from ..runtime.cache import KVCache


class _Node:
    __slots__ = ("edge", "children", "rows")

    def __init__(self, edge: np.ndarray):
        self.edge = edge                          # [k] int32: the tokens from the parent to this node
        self.children: dict[int, _Node] = {}      # first token of the child's edge -> child
        self.rows: set[int] = set()               # rows whose tokens pass through the whole edge


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
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
                k = common_prefix(child.edge, rest)
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
            k = common_prefix(child.edge, toks[depth:])
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


class Adoption(NamedTuple):
    """What a sequence at position 0 adopts before its first run."""
    row: int                 # the slot its run writes: its own, or the retained slot it takes over
    tokens: int              # tokens adopted (0: none; the run computes everything)
    source: int | None       # the slot they come from
    takeover: bool           # moves into `source` (a retained slot holding exactly those tokens)


class PrefixCache:
    """The slots' token index, the retained (released) slots in LRU order, and the adoption policy.

    cache: the KVCache whose rows it copies for an adoption that does not take a slot over.
    enabled: False keeps nothing: release() frees a slot at once and nothing is ever adopted."""

    def __init__(self, cache: KVCache, enabled: bool):
        self.cache, self.enabled = cache, bool(enabled)
        self.index = RadixIndex()                                # live prompts and retained sequences
        self._retained: OrderedDict[int, None] = OrderedDict()   # least recently used first
        self.stats = {"prefix_hits": 0, "prefix_tokens_reused": 0, "evictions": 0}

    @property
    def retained(self) -> list[int]:
        """Retained slots, least recently used first."""
        return list(self._retained)

    def lru(self, exclude: int | None = None) -> int | None:
        """The least recently used retained slot (not `exclude`), or None."""
        return next((s for s in self._retained if s != exclude), None)

    def match_length(self, tokens: np.ndarray, keep_last: bool = True) -> int:
        """Leading tokens a new sequence would adopt (keep_last: at most len - 1, so that the last one
        still runs and gives logits)."""
        return self._match(tokens, keep_last)[1]

    def _match(self, tokens: np.ndarray, keep_last: bool) -> tuple[int | None, int]:
        """(a slot holding the longest indexed prefix, its length); (None, 0) when nothing is adopted."""
        if not self.enabled or tokens.size < 1 + keep_last:
            return None, 0
        src, n = self.index.match(tokens[:-1] if keep_last else tokens)
        return (src, n) if src is not None and n else (None, 0)

    def plan(self, slot: int, tokens: np.ndarray, keep_last: bool = True, taken: set | None = None) -> Adoption:
        """The Adoption of an empty sequence in `slot` starting with `tokens`. Copies the adopted rows into
        `slot` when it does not take over (rows past its length 0: invisible until committed). A retained
        slot in `taken` (taken over by another sequence of the same step) is copied from instead."""
        src, n = self._match(tokens, keep_last)
        if n == 0:
            return Adoption(slot, 0, None, False)
        takeover = src in self._retained and self.index.entries[src].size == n and src not in (taken or ())
        if takeover and taken is not None:
            taken.add(src)
        if not takeover:
            self.cache.copy(src, [slot], n)
        return Adoption(src if takeover else slot, n, src, takeover)

    def commit(self, a: Adoption) -> None:
        """After the run succeeded: a taken-over slot stops being retained (its new owner re-indexes it)."""
        if a.takeover:
            del self._retained[a.source]
            self.index.remove(a.source)
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += a.tokens

    def insert(self, slot: int, tokens) -> None:
        """Indexes what a live slot holds (a prompt as it is fed)."""
        if self.enabled:
            self.index.set(slot, tokens)

    def retain(self, slot: int, tokens) -> bool:
        """A released slot: kept and indexed for reuse (True), or forgotten when disabled or empty."""
        if not self.enabled or not len(tokens):
            self.forget(slot)
            return False
        self.index.set(slot, tokens)
        self._retained[slot] = None
        return True

    def evict(self, slot: int) -> None:
        """`slot` is claimed for a new sequence: forget what it held (retained or not)."""
        if slot in self._retained:
            del self._retained[slot]
            self.stats["evictions"] += 1
        self.forget(slot)

    def forget(self, slot: int) -> None:
        self.index.remove(slot)

    def truncate(self, slot: int, length: int, tokens) -> None:
        """A live slot keeps only its first `length` tokens."""
        if slot in self.index.entries:
            self.index.set(slot, tokens[:min(length, self.index.entries[slot].size)])

    @property
    def nbytes(self) -> int:
        return self.index.nbytes
