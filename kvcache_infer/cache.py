"""KV buffers per layer on one device, in one of two layouts behind one small interface.

    offset                    tokens held per row; the next run writes from this row
    bind(io)                  once per IOBinding: binds what never moves
    prepare(io, n)            before a run that writes rows [offset, offset + n)
    commit(n)                 after that run succeeded: offset += n (one assignment)
    truncate(length)          keep rows [0, length): the next run overwrites from there
    reset()                   offset = 0; nothing is cleared (rows >= offset are never read)
    read(length)              host copies of rows [0, length) of every layer: [(K, V)] of [B, H, length, D]
    write(rows)               the inverse of read: rows [0, n) of every layer from host arrays; offset = n
    fork(src, dst)            copies batch row src's rows [0, offset) into batch rows dst
    data_ptrs(), nbytes, capacity

Both layouts allocate everything in the constructor; nothing is allocated per step. Every state
change is a single attribute assignment, so an exception (KeyboardInterrupt included) can never
leave a half-updated state.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import CacheAllocationError, KVCacheError
from .manifest import Manifest

NP_DTYPE = {"float32": np.float32, "float16": np.float16}


class DeviceBuffer:
    """`n` elements of `dtype` on a device, allocated once. On the CPU the memory is a numpy array
    shared with the OrtValue (zero copy); on CUDA it is an ORT-owned CUDA allocation."""

    def __init__(self, shape: tuple[int, ...], dtype, device: str, device_id: int, fill=None):
        self.shape, self.dtype, self.device, self.device_id = tuple(shape), np.dtype(dtype), device, device_id
        if device == "cpu":
            self.host = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
            self.ortvalue = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.host = None
            self.ortvalue = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, device_id)
            if fill is not None:
                self.ortvalue.update_inplace(np.full(shape, fill, dtype))
        self.ptr = self.ortvalue.data_ptr()
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize

    def write_at(self, index, array: np.ndarray) -> None:
        """buffer[index] = array. CPU: in place; CUDA: through a host copy of the whole buffer
        (ORT's Python API has no device-to-device or partial copy)."""
        if self.host is not None:
            self.host[index] = array
        else:
            full = self.to_host()
            full[index] = array
            self.ortvalue.update_inplace(full)

    def to_host(self) -> np.ndarray:
        return self.host if self.host is not None else self.ortvalue.numpy()

    def bind_input(self, io: ort.IOBinding, name: str, shape) -> None:
        """Binds the first prod(shape) elements, viewed as `shape`, as input `name`."""
        io.bind_input(name, self.device, self.device_id, self.dtype, list(shape), self.ptr)

    def bind_output(self, io: ort.IOBinding, name: str, shape) -> None:
        io.bind_output(name, self.device, self.device_id, self.dtype, list(shape), self.ptr)


class InPlaceCache:
    """One K and one V buffer per layer, [B, H, C, D], bound as both past and present.

    The graph (GroupQueryAttention with a shared buffer) writes only the new rows and reads rows
    [0, position + n); rows at and past `position` before a run are never read, so a reset needs no
    clearing and a failed run leaves rows [0, position) untouched."""

    layout = "inplace"

    def __init__(self, manifest: Manifest, batch: int, capacity: int, device: str, device_id: int):
        self.m, self.batch, self.capacity = manifest, batch, capacity
        shape = (batch, manifest.num_kv_heads, capacity, manifest.head_dim)
        dtype = NP_DTYPE[manifest.dtype]
        self.keys = [DeviceBuffer(shape, dtype, device, device_id) for _ in range(manifest.num_layers)]
        self.values = [DeviceBuffer(shape, dtype, device, device_id) for _ in range(manifest.num_layers)]
        self.nbytes = sum(b.nbytes for b in self.keys + self.values)
        self.offset = 0

    def bind(self, io: ort.IOBinding) -> None:
        m = self.m
        for i in range(m.num_layers):
            io.bind_ortvalue_input(m.past_key[i], self.keys[i].ortvalue)
            io.bind_ortvalue_output(m.present_key[i], self.keys[i].ortvalue)
            io.bind_ortvalue_input(m.past_value[i], self.values[i].ortvalue)
            io.bind_ortvalue_output(m.present_value[i], self.values[i].ortvalue)

    def prepare(self, io: ort.IOBinding, n: int) -> None:
        pass  # bound once; the graph reads the write rows from position_ids

    def commit(self, n: int) -> None:
        self.offset += n

    def truncate(self, length: int) -> None:
        self.offset = length  # O(1): rows >= length are never read and get overwritten

    def reset(self) -> None:
        self.offset = 0

    def read(self, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(k.to_host()[:, :, :length].copy(), v.to_host()[:, :, :length].copy())
                for k, v in zip(self.keys, self.values)]

    def write(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        n = rows[0][0].shape[2]
        for buf, arr in zip(self.keys + self.values, [k for k, _ in rows] + [v for _, v in rows]):
            buf.write_at(np.s_[:, :, :n], arr)
        self.offset = n

    def fork(self, src: int, dst: list[int]) -> None:
        n = self.offset
        for buf in self.keys + self.values:
            rows = buf.to_host()[src, :, :n]          # a view on the CPU, a host copy on CUDA
            buf.write_at(np.s_[dst, :, :n], rows[None])

    def data_ptrs(self) -> list[int]:
        return [b.ptr for b in self.keys + self.values]


class GrowingCache:
    """The standard layout (present = Concat(past, new), as Optimum exports GPT-2).

    Two max-size buffers per K and V per layer, used alternately: a step reads the past from the
    front buffer ([B, H, position, D] at its start) and the graph writes [B, H, position + n, D] into
    the back one; commit() swaps them. The graph still copies the whole past every step (that is
    the layout's cost), but nothing is allocated. An all-ones attention mask is bound as a view."""

    layout = "growing"

    def __init__(self, manifest: Manifest, batch: int, capacity: int, device: str, device_id: int):
        self.m, self.batch, self.capacity = manifest, batch, capacity
        shape = (batch * manifest.num_kv_heads * capacity * manifest.head_dim,)
        dtype = NP_DTYPE[manifest.dtype]
        L = manifest.num_layers
        self.bufs = [[DeviceBuffer(shape, dtype, device, device_id) for _ in range(4 * L)] for _ in range(2)]
        self._state = (0, 0)  # (front buffer index, offset): changed together, in one assignment
        self.mask = DeviceBuffer((batch * capacity,), np.int64, device, device_id, fill=1)
        self.nbytes = sum(b.nbytes for side in self.bufs for b in side)

    @property
    def offset(self) -> int:
        return self._state[1]

    def _kv_shape(self, length: int) -> list[int]:
        return [self.batch, self.m.num_kv_heads, length, self.m.head_dim]

    def bind(self, io: ort.IOBinding) -> None:
        pass  # rebound every step: the lengths change

    def prepare(self, io: ort.IOBinding, n: int) -> None:
        m, L = self.m, self.m.num_layers
        front, position = self._state
        src, dst = self.bufs[front], self.bufs[1 - front]
        past, present = self._kv_shape(position), self._kv_shape(position + n)
        for i in range(L):
            src[2 * i].bind_input(io, m.past_key[i], past)
            src[2 * i + 1].bind_input(io, m.past_value[i], past)
            dst[2 * i].bind_output(io, m.present_key[i], present)
            dst[2 * i + 1].bind_output(io, m.present_value[i], present)
        self.mask.bind_input(io, m.attention_mask, [self.batch, position + n])

    def commit(self, n: int) -> None:
        front, offset = self._state
        self._state = (1 - front, offset + n)

    def truncate(self, length: int) -> None:
        """O(prefix): [B,H,offset,D] -> [B,H,length,D] changes the packing, so the kept rows are
        copied into the back buffer (through the host on CUDA), which then becomes the front."""
        front, offset = self._state
        if length == offset:
            return
        back = self.bufs[1 - front]
        for buf, rows in zip(back, (t for kv in self.read(length) for t in kv)):
            buf.write_at(np.s_[: rows.size], rows.ravel())
        self._state = (1 - front, length)

    def reset(self) -> None:
        self._state = (self._state[0], 0)

    def read(self, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        side, offset = self.bufs[self._state[0]], self._state[1]
        held = int(np.prod(self._kv_shape(offset)))
        return [tuple(side[2 * i + j].to_host()[:held].reshape(self._kv_shape(offset))[:, :, :length].copy()
                      for j in (0, 1)) for i in range(self.m.num_layers)]

    def write(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        n = rows[0][0].shape[2]
        front = self._state[0]
        for buf, arr in zip(self.bufs[front], (t for kv in rows for t in kv)):
            buf.write_at(np.s_[: arr.size], arr.ravel())
        self._state = (front, n)

    def fork(self, src: int, dst: list[int]) -> None:
        front, n = self._state
        shape = self._kv_shape(n)
        count = int(np.prod(shape))
        for buf in self.bufs[front]:
            packed = buf.to_host()[:count].reshape(shape)   # [B,H,n,D] packed at the buffer's start
            packed[dst] = packed[src]
            if buf.host is None:
                buf.write_at(np.s_[:count], packed.ravel())

    def data_ptrs(self) -> list[int]:
        return [b.ptr for side in self.bufs for b in side]


LAYOUTS = {"inplace": (InPlaceCache, 1), "growing": (GrowingCache, 2)}  # class, buffers per tensor


def cache_bytes(manifest: Manifest, batch: int, capacity: int) -> int:
    """Bytes the layout allocates: copies x 2 (K,V) x layers x batch x heads x capacity x head_dim x itemsize."""
    copies = LAYOUTS[manifest.layout][1]
    return copies * manifest.cache_bytes_per_token * batch * capacity


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


def make_cache(manifest: Manifest, batch: int, capacity: int, device: str, device_id: int):
    """Allocates the layout's buffers, after checking that they can fit (CacheAllocationError)."""
    if manifest.layout not in LAYOUTS:
        raise KVCacheError(f"unknown cache layout {manifest.layout!r}")
    need = cache_bytes(manifest, batch, capacity)
    what = (f"{need / 2**30:.2f} GiB ({LAYOUTS[manifest.layout][1]} x 2 x {manifest.num_layers} layers x batch {batch} x "
            f"{manifest.num_kv_heads} heads x {capacity} tokens x {manifest.head_dim} x "
            f"{np.dtype(NP_DTYPE[manifest.dtype]).itemsize} bytes)")
    fix = "lower max_seq_len or batch_size"
    if device == "cpu":
        avail = available_host_bytes()
        if avail is not None and need > avail:
            raise CacheAllocationError(f"the KV cache needs {what} but only {avail / 2**30:.2f} GiB of memory is "
                                       f"available; {fix}")
    try:
        return LAYOUTS[manifest.layout][0](manifest, batch, capacity, device, device_id)
    except (MemoryError, RuntimeError) as e:  # numpy raises MemoryError, ORT (CUDA) RuntimeError
        raise CacheAllocationError(f"allocating the KV cache ({what}) on {device} failed: {e}; {fix}") from None
