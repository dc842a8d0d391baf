"""KV buffers of every layer on one device, behind one small interface (KVCache), in two layouts.

    rows x [H, capacity, D] per layer for K and for V; lengths[r] = tokens cache row r holds.

    bind(io, rows)            binds what never moves for runs over cache rows [0, rows)
    prepare(io, n)            before a run that appends n tokens to every row (growing layout)
    commit(lengths)           after that run succeeded: the new lengths, one assignment
    truncate(length, rows)    those rows keep their first `length` tokens
    read(length, rows)        host copies of tokens [0, length) of those rows: [(K, V)] of [r, H, length, D]
    write(kv, rows)           the inverse of read; the rows then hold exactly those tokens
    copy_rows(src, dst, n, src_rows)   tokens [0, n) (or the listed tokens) of row src into tokens [0, n)
                              of rows dst: data only, the lengths stay (prefix reuse before a run)
    copy(src, dst, length)    copy_rows, then rows dst hold `length` tokens (fork)
    data_ptrs(), nbytes, capacity, rows

Buffers are allocated in the constructor and never move; nothing is allocated per run. Every
state change is a single assignment made after the work succeeded, so an exception (a
KeyboardInterrupt included) never leaves a half-updated state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import numpy as np
import onnxruntime as ort

from .buffers import DeviceBuffer
from ..errors import CacheAllocationError, KVCacheError
from .manifest import Manifest


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=np.int64)
    a.flags.writeable = False
    return a


class KVCache(ABC):
    """The interface every cache layout implements (see the module docstring)."""

    layout: ClassVar[str]
    copies: ClassVar[int]       # buffers per K or V tensor: a factor of the cache-size formula
    per_row: ClassVar[bool]     # rows may hold different lengths (else they move in lockstep)

    def __init__(self, manifest: Manifest, rows: int, capacity: int, device: str, device_id: int):
        self.m, self.rows, self.capacity, self.device = manifest, rows, capacity, device

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the K and V buffers as allocated (the tests compare it with cache_bytes())."""

    @property
    @abstractmethod
    def lengths(self) -> np.ndarray:
        """[rows] int64, read-only: tokens held per row."""

    @property
    def offset(self) -> int:
        """Tokens held by row 0 (all rows, for lockstep use)."""
        return int(self.lengths[0])

    @property
    def extra_bytes(self) -> int:
        """Bytes of the layout's buffers besides K and V (the growing layout's attention mask)."""
        return 0

    @abstractmethod
    def bind(self, io: ort.IOBinding, rows: int | None = None) -> None: ...

    @abstractmethod
    def prepare(self, io: ort.IOBinding, n: int) -> None: ...

    @abstractmethod
    def commit(self, lengths) -> None: ...

    @abstractmethod
    def truncate(self, length: int, rows: Sequence[int] | None = None) -> None: ...

    @abstractmethod
    def read(self, length: int, rows: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]: ...

    @abstractmethod
    def write(self, kv: list[tuple[np.ndarray, np.ndarray]], rows: Sequence[int] | None = None) -> None: ...

    @abstractmethod
    def copy_rows(self, src: int, dst: Sequence[int] | int, n: int, src_rows: Sequence[int] | None = None) -> None: ...

    def copy(self, src: int, dst: Sequence[int], length: int) -> None:
        dst = [d for d in dst if d != src]
        self.copy_rows(src, dst, length)
        self.truncate(length, dst)

    @abstractmethod
    def data_ptrs(self) -> list[int]: ...

    def reset(self) -> None:
        self.truncate(0)


class InPlaceCache(KVCache):
    """One K and one V buffer per layer, [rows, H, C, D], bound as both past and present.

    The graph (GroupQueryAttention with a shared buffer) writes only the new tokens' rows and reads
    tokens [0, length) of each row; tokens at and past a row's length are never read, so truncating
    or freeing a row needs no clearing and a failed run leaves tokens [0, length) untouched. Rows
    hold independent lengths: one row per sequence (the Engine's slots), or a lockstep batch."""

    layout, copies, per_row = "inplace", 1, True

    def __init__(self, manifest: Manifest, rows: int, capacity: int, device: str, device_id: int):
        super().__init__(manifest, rows, capacity, device, device_id)
        self.shape = (rows, manifest.num_kv_heads, capacity, manifest.head_dim)
        dtype = manifest.cache_np_dtype
        # Zero-filled: every page is touched now, not at a run's or a fork's first write to a row (a
        # first touch costs a page fault: measured 10-50x slower copies into a fresh slot), and the
        # memory is really taken at construction, where a shortage is reported.
        self.keys = [DeviceBuffer(self.shape, dtype, device, device_id, fill=0) for _ in range(manifest.num_layers)]
        self.values = [DeviceBuffer(self.shape, dtype, device, device_id, fill=0) for _ in range(manifest.num_layers)]
        self._lengths = _frozen(np.zeros(rows))

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.keys + self.values)

    def bind(self, io: ort.IOBinding, rows: int | None = None) -> None:
        """Rows [0, rows) (default: all) as past and present of every layer: a view, nothing copied."""
        m, shape = self.m, (self.rows if rows is None else rows, *self.shape[1:])
        for i in range(m.num_layers):
            for buf, past, present in ((self.keys[i], m.past_key[i], m.present_key[i]),
                                       (self.values[i], m.past_value[i], m.present_value[i])):
                buf.bind_input(io, past, shape)
                buf.bind_output(io, present, shape)

    def prepare(self, io: ort.IOBinding, n: int) -> None:
        pass  # bound once; the graph reads the write rows from its length inputs

    def commit(self, lengths) -> None:
        self._lengths = _frozen(lengths)

    def truncate(self, length: int, rows: Sequence[int] | None = None) -> None:
        new = self._lengths.copy()
        new[slice(None) if rows is None else list(rows)] = length
        self._lengths = _frozen(new)  # O(1) in data: tokens >= length are never read and get overwritten

    def read(self, length: int, rows: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        idx = slice(None) if rows is None else list(rows)
        return [(k.to_host()[idx, :, :length].copy(), v.to_host()[idx, :, :length].copy())
                for k, v in zip(self.keys, self.values)]

    def write(self, kv: list[tuple[np.ndarray, np.ndarray]], rows: Sequence[int] | None = None) -> None:
        n = kv[0][0].shape[2]
        idx = slice(None) if rows is None else list(rows)
        for i, (k, v) in enumerate(kv):
            self.keys[i].write_at(np.s_[idx, :, :n], k)
            self.values[i].write_at(np.s_[idx, :, :n], v)
        self.truncate(n, rows)

    def copy_rows(self, src: int, dst: Sequence[int] | int, n: int, src_rows: Sequence[int] | None = None) -> None:
        """Tokens [0, n) of row src (or its tokens `src_rows`, n of them) into tokens [0, n) of rows dst:
        O(n x len(dst)) bytes moved, nothing allocated on the CPU (through a host copy on CUDA)."""
        dst = [dst] if isinstance(dst, (int, np.integer)) else [d for d in dst if d != src or src_rows is not None]
        for buf in self.keys + self.values:
            host = buf.to_host()                           # the buffer itself on the CPU, a copy from CUDA
            part = host[src][:, src_rows] if src_rows is not None else host[src, :, :n]
            for d in dst:
                host[d, :, :n] = part
            if buf.host is None:
                buf.ortvalue.update_inplace(host)

    def data_ptrs(self) -> list[int]:
        return [b.ptr for b in self.keys + self.values]


class GrowingCache(KVCache):
    """The standard layout (present = Concat(past, new), as Optimum exports GPT-2); rows in lockstep.

    Two max-size buffers per K and V per layer, used alternately: a step reads the past from the
    front buffer ([B, H, length, D] at its start) and the graph writes [B, H, length + n, D] into
    the back one; commit() swaps them. The graph still copies the whole past every step (that is
    the layout's cost), but nothing is allocated. An all-ones attention mask is bound as a view."""

    layout, copies, per_row = "growing", 2, False

    def __init__(self, manifest: Manifest, rows: int, capacity: int, device: str, device_id: int):
        super().__init__(manifest, rows, capacity, device, device_id)
        size = (rows * manifest.num_kv_heads * capacity * manifest.head_dim,)
        L = manifest.num_layers
        self.bufs = [[DeviceBuffer(size, manifest.cache_np_dtype, device, device_id, fill=0) for _ in range(4 * L)]
                     for _ in range(2)]
        self._state = (0, 0)  # (front buffer index, length): changed together, in one assignment
        self.mask = DeviceBuffer((rows * capacity,), np.int64, device, device_id, fill=1)

    @property
    def lengths(self) -> np.ndarray:
        return _frozen(np.full(self.rows, self._state[1]))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for pair in self.bufs for b in pair)

    @property
    def offset(self) -> int:
        return self._state[1]

    @property
    def extra_bytes(self) -> int:
        return self.mask.nbytes

    def _kv_shape(self, length: int) -> list[int]:
        return [self.rows, self.m.num_kv_heads, length, self.m.head_dim]

    def bind(self, io: ort.IOBinding, rows: int | None = None) -> None:
        pass  # rebound every step: the lengths change

    def prepare(self, io: ort.IOBinding, n: int) -> None:
        m, L = self.m, self.m.num_layers
        front, length = self._state
        src, dst = self.bufs[front], self.bufs[1 - front]
        past, present = self._kv_shape(length), self._kv_shape(length + n)
        for i in range(L):
            src[2 * i].bind_input(io, m.past_key[i], past)
            src[2 * i + 1].bind_input(io, m.past_value[i], past)
            dst[2 * i].bind_output(io, m.present_key[i], present)
            dst[2 * i + 1].bind_output(io, m.present_value[i], present)
        if m.attention_mask:
            self.mask.bind_input(io, m.attention_mask, [self.rows, length + n])

    def commit(self, lengths) -> None:
        front, _ = self._state
        self._state = (1 - front, int(np.asarray(lengths).reshape(-1)[0]))

    def _lockstep(self, rows, what: str) -> None:
        if rows is not None and sorted(rows) != list(range(self.rows)):
            raise KVCacheError(f"the growing cache layout moves all rows in lockstep; {what} of single rows is "
                               "not possible: export with `python -m export` for the in-place layout")

    def truncate(self, length: int, rows: Sequence[int] | None = None) -> None:
        """O(prefix): [B,H,length,D] -> [B,H,new,D] changes the packing, so the kept tokens are
        copied into the back buffer (through the host on CUDA), which then becomes the front."""
        self._lockstep(rows, "truncate")
        front, held = self._state
        if length == held:
            return
        back = self.bufs[1 - front]
        for buf, part in zip(back, (t for kv in self.read(length) for t in kv)):
            buf.write_at(np.s_[: part.size], part.ravel())
        self._state = (1 - front, length)

    def read(self, length: int, rows: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        side, held = self.bufs[self._state[0]], self._state[1]
        count = int(np.prod(self._kv_shape(held)))
        idx = slice(None) if rows is None else list(rows)
        return [tuple(side[2 * i + j].to_host()[:count].reshape(self._kv_shape(held))[idx, :, :length].copy()
                      for j in (0, 1)) for i in range(self.m.num_layers)]

    def write(self, kv: list[tuple[np.ndarray, np.ndarray]], rows: Sequence[int] | None = None) -> None:
        self._lockstep(rows, "write")
        n = kv[0][0].shape[2]
        front = self._state[0]
        for buf, part in zip(self.bufs[front], (t for pair in kv for t in pair)):
            buf.write_at(np.s_[: part.size], part.ravel())
        self._state = (front, n)

    def copy_rows(self, src: int, dst: Sequence[int] | int, n: int, src_rows: Sequence[int] | None = None) -> None:
        front, held = self._state
        if n != held or src_rows is not None:
            raise KVCacheError("the growing cache layout copies whole rows only")
        dst = [dst] if isinstance(dst, (int, np.integer)) else list(dst)
        shape = self._kv_shape(held)
        count = int(np.prod(shape))
        for buf in self.bufs[front]:
            packed = buf.to_host()[:count].reshape(shape)   # [B,H,n,D] packed at the buffer's start
            packed[dst] = packed[src]
            if buf.host is None:
                buf.write_at(np.s_[:count], packed.ravel())

    def copy(self, src: int, dst: Sequence[int], length: int) -> None:
        self.copy_rows(src, dst, length)         # rows move in lockstep: the length is already theirs

    def data_ptrs(self) -> list[int]:
        return [b.ptr for side in self.bufs for b in side]


LAYOUTS: dict[str, type[KVCache]] = {"inplace": InPlaceCache, "growing": GrowingCache}


def cache_bytes(manifest: Manifest, rows: int, capacity: int) -> int:
    """The one cache-size formula: copies x 2 (K,V) x layers x rows x heads x capacity x head_dim x itemsize."""
    return LAYOUTS[manifest.layout].copies * manifest.cache_bytes_per_token * rows * capacity


def describe_size(manifest: Manifest, rows: int, capacity: int) -> str:
    m = manifest
    return (f"{cache_bytes(m, rows, capacity) / 2**30:.2f} GiB ({LAYOUTS[m.layout].copies} x 2 x {m.num_layers} "
            f"layers x {rows} rows x {m.num_kv_heads} heads x {capacity} tokens x {m.head_dim} x "
            f"{m.cache_np_dtype.itemsize} bytes)")


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (unknown: no early check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def make_cache(manifest: Manifest, rows: int, capacity: int, device: str, device_id: int,
               fix: str = "lower max_seq_len or batch_size") -> KVCache:
    """Allocates the layout's buffers, after checking that they can fit (CacheAllocationError)."""
    if manifest.layout not in LAYOUTS:
        raise KVCacheError(f"unknown cache layout {manifest.layout!r}")
    need, what = cache_bytes(manifest, rows, capacity), describe_size(manifest, rows, capacity)
    if device == "cpu":
        avail = available_host_bytes()
        if avail is not None and need > avail:
            raise CacheAllocationError(f"the KV cache needs {what} but only {avail / 2**30:.2f} GiB of memory is "
                                       f"available; {fix}")
    try:
        return LAYOUTS[manifest.layout](manifest, rows, capacity, device, device_id)
    except (MemoryError, RuntimeError) as e:  # numpy raises MemoryError, ORT (CUDA) RuntimeError
        raise CacheAllocationError(f"allocating the KV cache ({what}) on {device} failed: {e}; {fix}") from None
