"""DeviceBuffer: a fixed allocation on one device, bound to ONNX Runtime by address."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort


class DeviceBuffer:
    """`shape` elements of `dtype` on a device, allocated once. On the CPU the memory is a numpy array
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

    @property
    def nbytes(self) -> int:
        """What was allocated, as the allocation reports it (numpy's buffer; ORT's tensor on CUDA)."""
        if self.host is not None:
            return self.host.nbytes
        return int(np.prod(self.ortvalue.shape(), dtype=np.int64)) * self.dtype.itemsize

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
        """The contents as a host array: the buffer itself on the CPU, a copy from CUDA."""
        return self.host if self.host is not None else self.ortvalue.numpy()

    def bind_input(self, io: ort.IOBinding, name: str, shape, offset: int = 0) -> None:
        """Binds prod(shape) elements from element `offset` on, viewed as `shape`, as input `name`."""
        io.bind_input(name, self.device, self.device_id, self.dtype, list(shape),
                      self.ptr + offset * self.dtype.itemsize)

    def bind_output(self, io: ort.IOBinding, name: str, shape, offset: int = 0) -> None:
        io.bind_output(name, self.device, self.device_id, self.dtype, list(shape),
                       self.ptr + offset * self.dtype.itemsize)


class HostArray:
    """A preallocated host array bound to ONNX Runtime as views of its first elements (the small
    per-run inputs and outputs: ids, positions, lengths, logits rows). ORT copies host inputs to
    the device when a CUDA kernel consumes them."""

    def __init__(self, size: int, dtype, fill=0):
        self.array = np.full(size, fill, dtype=dtype)
        self.dtype = self.array.dtype
        self.ptr = self.array.ctypes.data
        self.nbytes = self.array.nbytes

    def view(self, shape) -> np.ndarray:
        """The first prod(shape) elements as an array of `shape` (shares memory)."""
        return self.array[: math.prod(shape)].reshape(shape)

    def bind_input(self, io: ort.IOBinding, name: str, shape) -> None:
        io.bind_input(name, "cpu", 0, self.dtype, list(shape), self.ptr)

    def bind_output(self, io: ort.IOBinding, name: str, shape) -> None:
        io.bind_output(name, "cpu", 0, self.dtype, list(shape), self.ptr)
