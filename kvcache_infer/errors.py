"""One exception hierarchy. Every error says what was expected, what arrived and how to fix it."""


class KVCacheError(Exception):
    """Base of every error raised by kvcache_infer."""


class InvalidInputError(KVCacheError, ValueError):
    """A caller passed token ids or arguments of the wrong shape, type or range."""


class CapacityError(InvalidInputError):
    """A step would write past the cache capacity (max_seq_len)."""


class ModelFormatError(KVCacheError):
    """The model file or its manifest is missing, unreadable, or lacks the KV-cache I/O."""


class DeviceError(KVCacheError, RuntimeError):
    """The requested device or execution provider is unknown or cannot be loaded."""


class ModelNotFoundError(ModelFormatError, FileNotFoundError):
    """The model path does not exist or holds no model file."""


class InferenceError(KVCacheError, RuntimeError):
    """ONNX Runtime failed inside a run; the cache and position are as they were before the call."""


class NonFiniteError(InferenceError):
    """The model's activations were NaN or infinite where a greedy token was to be picked."""


class ConcurrentUseError(KVCacheError, RuntimeError):
    """An inferencer (one sequence) was entered from a second thread while in use."""


class CacheAllocationError(KVCacheError, MemoryError):
    """The cache does not fit in the device's memory; raised before (or instead of) allocating."""
