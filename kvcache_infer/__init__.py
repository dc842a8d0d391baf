"""Fast incremental (KV-cache) decoding of GPT-2 style ONNX models on ONNX Runtime."""
from .errors import (CacheAllocationError, CapacityError, ConcurrentUseError, DeviceError, InferenceError,
                     InvalidInputError, KVCacheError, ModelFormatError, ModelNotFoundError)
from .inferencer import KVCacheInferencer
from .manifest import Manifest
from .metrics import MemoryProfile, Metrics
from .model import Model

__version__ = "0.1.0"
__all__ = ["KVCacheInferencer", "Model", "Manifest", "Metrics", "MemoryProfile", "KVCacheError",
           "InvalidInputError", "CapacityError", "ModelFormatError", "ModelNotFoundError", "DeviceError",
           "InferenceError", "ConcurrentUseError", "CacheAllocationError"]
