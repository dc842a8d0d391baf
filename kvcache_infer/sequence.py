"""Handles for what an Engine holds: a Sequence (tokens in order) and a TreeSequence (a tree of tokens
sharing one cache row, each node attending to its ancestors only)."""
from __future__ import annotations

from typing import NamedTuple, Sequence as Seq

import numpy as np


class Sequence:
    """One sequence of an Engine: its cache slot and the tokens whose K/V the slot holds.

    position: tokens held (the next step writes from there); tokens: those tokens, in order.
    A handle stays valid until Engine.release(); after that every engine call given it raises."""

    __slots__ = ("id", "_slot", "_tokens", "_released", "__weakref__")

    def __init__(self, seq_id: int, slot: int):
        self.id, self._slot, self._tokens, self._released = seq_id, slot, [], False

    @property
    def position(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    @property
    def slot(self) -> int:
        """The cache slot (row of every layer's K/V buffer) this sequence owns."""
        return self._slot

    @property
    def alive(self) -> bool:
        return not self._released

    def __repr__(self) -> str:
        state = "released" if self._released else f"slot {self._slot}"
        return f"{type(self).__name__}(id={self.id}, position={self.position}, {state})"


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

    __slots__ = ("_parents", "_depths")

    def __init__(self, seq_id: int, slot: int):
        super().__init__(seq_id, slot)
        self._parents: list[int] = []
        self._depths: list[int] = []

    def parent(self, node: int) -> int:
        return self._parents[node]

    def depth(self, node: int) -> int:
        return self._depths[node]

    def path(self, node: int) -> list[int]:
        """Nodes from a root down to `node` (inclusive)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self._parents[node]
        return out[::-1]

    def path_tokens(self, node: int) -> list[int]:
        return [self._tokens[i] for i in self.path(node)]

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
