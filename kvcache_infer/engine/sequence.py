"""Handles for what an Engine holds: a Sequence (tokens in order) and a TreeSequence (a tree of tokens
sharing one cache row, each node attending to its ancestors only)."""
from __future__ import annotations

from typing import NamedTuple, Sequence as Seq

import numpy as np

from ..errors import InvalidInputError


class SequenceState:
    """The Engine's record of one sequence; only the Engine changes it (each change after the runs that
    make it true succeeded). tokens: whose K/V slot rows 0..n-1 hold; parents/depths: tree nodes only."""

    __slots__ = ("slot", "tokens", "released", "parents", "depths")

    def __init__(self, slot: int):
        self.slot, self.tokens, self.released = slot, [], False
        self.parents: list[int] = []
        self.depths: list[int] = []


class Sequence:
    """A handle to one sequence of an Engine: its cache slot and the tokens whose K/V the slot holds.

    position: tokens held (the next step writes from there); tokens: those tokens, in order.
    A handle stays valid until Engine.release(); after that every engine call given it raises."""

    __slots__ = ("id", "state", "__weakref__")

    def __init__(self, seq_id: int, slot: int):
        self.id, self.state = seq_id, SequenceState(slot)

    @property
    def position(self) -> int:
        return len(self.state.tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self.state.tokens)

    @property
    def slot(self) -> int:
        """The cache slot (row of every layer's K/V buffer) this sequence owns."""
        return self.state.slot

    @property
    def alive(self) -> bool:
        return not self.state.released

    def __repr__(self) -> str:
        where = "released" if self.state.released else f"slot {self.state.slot}"
        return f"{type(self).__name__}(id={self.id}, position={self.position}, {where})"


class Nodes(NamedTuple):
    """New nodes for a TreeSequence: tokens[i] hangs below node parents[i] (an index into the tree's
    nodes, earlier nodes of the same call included; -1: a root). parents None: a chain that continues
    from the tree's last node."""

    tokens: Seq[int]
    parents: Seq[int] | None = None


class TreeSequence(Sequence):
    """A tree of tokens in one cache slot: node i's K/V sit at cache row i (insertion order), its position
    is its depth, and it attends to its ancestors only. Every node's K/V is computed once and nothing is
    copied when the tree branches, which is what a tree search (expand a node, evaluate its children)
    needs. position: nodes held; tokens: every node's token in insertion order."""

    __slots__ = ()

    def parent(self, node: int) -> int:
        return self.state.parents[node]

    def depth(self, node: int) -> int:
        return self.state.depths[node]

    def path(self, node: int) -> list[int]:
        """Nodes from a root down to `node` (inclusive)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.state.parents[node]
        return out[::-1]

    def path_tokens(self, node: int) -> list[int]:
        return [self.state.tokens[i] for i in self.path(node)]

    def check_parents(self, parents, n: int) -> np.ndarray:
        """The parents of n new nodes as int64 (None: a chain from the last node); InvalidInputError unless
        each is -1 or an earlier node (one of this call's earlier nodes included)."""
        start = self.position
        if parents is None:
            return np.arange(start - 1, start + n - 1, dtype=np.int64)
        try:
            p = np.asarray(parents)
        except (ValueError, TypeError):
            raise InvalidInputError(f"parents must be a 1-D sequence of node indices, got {parents!r}") from None
        if p.shape != (n,) or p.dtype.kind not in "iu":
            raise InvalidInputError(f"parents must be {n} ints (one per new node), got {parents!r}")
        bad = [(i, int(x)) for i, x in enumerate(p) if not -1 <= x < start + i]
        if bad:
            i, x = bad[0]
            raise InvalidInputError(f"parents[{i}] = {x}: a parent must be -1 (a root) or an earlier node "
                                    f"(0 .. {start + i - 1})")
        return p.astype(np.int64)

    def new_depths(self, parents: Seq[int]) -> np.ndarray:
        """[n] int64: the depths (positions) of new nodes with these parents."""
        d = list(self.state.depths)
        for p in parents:
            d.append(0 if p < 0 else d[p] + 1)
        return np.asarray(d[self.position:], dtype=np.int64)

    def ancestors(self, parents: Seq[int], start: int) -> np.ndarray:
        """[n, start + n] bool: which nodes each of n new nodes (with these parents, placed at rows
        start .. start + n - 1) may attend to: its ancestors and itself."""
        n = len(parents)
        mask = np.zeros((n, start + n), dtype=bool)
        for i, p in enumerate(parents):
            mask[i, start + i] = True
            if p >= 0:
                mask[i, :p + 1] = mask[p - start, :p + 1] if p >= start else self._ancestor_row(p, start + n)
        return mask

    def _ancestor_row(self, node: int, width: int) -> np.ndarray:
        row = np.zeros(width, dtype=bool)
        row[self.path(node)] = True
        return row[:node + 1]
