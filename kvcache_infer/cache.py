"""KV buffers per layer on one device, in one of two layouts behind one small interface.

    bind(io)                  once per IOBinding: binds what never moves
    prepare(io, position, n)  before a run that writes rows [position, position + n)
    commit()                  after that run succeeded
    read(length)              host copies of rows [0, length) of every layer (for checks, snapshots)
    data_ptrs(), nbytes, capacity

Both layouts allocate everything in the constructor; nothing is allocated per step.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import KVCacheError
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

    def write(self, array: np.ndarray) -> None:
        """Copies a host array of the buffer's full shape and dtype into the buffer."""
        if self.host is not None:
            self.host[...] = array
        else:
            self.ortvalue.update_inplace(np.ascontiguousarray(array))

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

    def bind(self, io: ort.IOBinding) -> None:
        m = self.m
        for i in range(m.num_layers):
            io.bind_ortvalue_input(m.past_key[i], self.keys[i].ortvalue)
            io.bind_ortvalue_output(m.present_key[i], self.keys[i].ortvalue)
            io.bind_ortvalue_input(m.past_value[i], self.values[i].ortvalue)
            io.bind_ortvalue_output(m.present_value[i], self.values[i].ortvalue)

    def prepare(self, io: ort.IOBinding, position: int, n: int) -> None:
        pass  # bound once; the graph reads the write rows from position_ids

    def commit(self) -> None:
        pass

    def read(self, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(k.to_host()[:, :, :length].copy(), v.to_host()[:, :, :length].copy())
                for k, v in zip(self.keys, self.values)]

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
        self.front = 0
        self.mask = DeviceBuffer((batch * capacity,), np.int64, device, device_id, fill=1)
        self.nbytes = sum(b.nbytes for side in self.bufs for b in side)

    def _kv_shape(self, length: int) -> list[int]:
        return [self.batch, self.m.num_kv_heads, length, self.m.head_dim]

    def bind(self, io: ort.IOBinding) -> None:
        pass  # rebound every step: the lengths change

    def prepare(self, io: ort.IOBinding, position: int, n: int) -> None:
        m, L = self.m, self.m.num_layers
        src, dst = self.bufs[self.front], self.bufs[1 - self.front]
        past, present = self._kv_shape(position), self._kv_shape(position + n)
        for i in range(L):
            src[2 * i].bind_input(io, m.past_key[i], past)
            src[2 * i + 1].bind_input(io, m.past_value[i], past)
            dst[2 * i].bind_output(io, m.present_key[i], present)
            dst[2 * i + 1].bind_output(io, m.present_value[i], present)
        self.mask.bind_input(io, m.attention_mask, [self.batch, position + n])

    def commit(self) -> None:
        self.front = 1 - self.front

    def read(self, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        count = int(np.prod(self._kv_shape(length)))
        side = self.bufs[self.front]
        return [tuple(side[2 * i + j].to_host()[:count].reshape(self._kv_shape(length)).copy() for j in (0, 1))
                for i in range(self.m.num_layers)]

    def data_ptrs(self) -> list[int]:
        return [b.ptr for side in self.bufs for b in side]


def make_cache(manifest: Manifest, batch: int, capacity: int, device: str, device_id: int):
    cls = {"inplace": InPlaceCache, "growing": GrowingCache}.get(manifest.layout)
    if cls is None:
        raise KVCacheError(f"unknown cache layout {manifest.layout!r}")
    return cls(manifest, batch, capacity, device, device_id)
