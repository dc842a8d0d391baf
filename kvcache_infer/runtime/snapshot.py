"""A sequence's cache copied to host memory, and the checks a restore makes before writing."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import InvalidInputError
from .manifest import Manifest


@dataclasses.dataclass(frozen=True, eq=False)
class CacheSnapshot:
    """Rows [0, position) of every layer's K and V, [batch, heads, position, head_dim] each, on the
    host (read-only arrays). Restoring it into an inferencer of the same model, batch size and a
    capacity >= position reproduces the cache bit for bit."""

    position: int
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    dtype: str
    batch_size: int

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def take(rows: list[tuple[np.ndarray, np.ndarray]], position: int, dtype: str, batch: int) -> CacheSnapshot:
    for k, v in rows:
        k.flags.writeable = False
        v.flags.writeable = False
    return CacheSnapshot(position, tuple((k, v) for k, v in rows), dtype, batch)


def check(snap, m: Manifest, batch: int, capacity: int) -> None:
    """Raises InvalidInputError unless `snap` fits this model, batch size and capacity."""
    if not isinstance(snap, CacheSnapshot):
        raise InvalidInputError(f"restore() needs a CacheSnapshot from snapshot(), got {type(snap).__name__}")
    want = (batch, m.num_kv_heads, snap.position, m.head_dim)
    if len(snap.layers) != m.num_layers:
        raise InvalidInputError(f"the snapshot has {len(snap.layers)} layers, this model {m.num_layers}")
    if snap.position > capacity:
        raise InvalidInputError(f"the snapshot holds {snap.position} tokens but this cache's capacity is "
                                f"{capacity} (max_seq_len); construct the inferencer with a larger max_seq_len")
    for i, (k, v) in enumerate(snap.layers):
        for name, a in (("K", k), ("V", v)):
            if not isinstance(a, np.ndarray) or a.dtype != m.cache_np_dtype:
                got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                raise InvalidInputError(f"snapshot layer {i} {name} is {got}, this cache is {m.kv_dtype}; "
                                        "snapshots are not converted")
            if a.shape != want:
                raise InvalidInputError(f"snapshot layer {i} {name} has shape {a.shape}, expected {want} "
                                        "[batch, heads, position, head_dim]")
